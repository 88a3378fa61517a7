"""Text side of DSRAN: the BERT build's token projection and the GRU build's encoder.

Both return per-token features (B, L, E) and the node mask the text GAT should use.
`text_padding="masked"` (default) attends to, normalises over and averages real tokens
only. `text_padding="reference"` reproduces the authors' code exactly:
- BERT is called without an attention mask, and everything runs over all L positions
  (their ids are zero-padded to 32).
- GRU outputs are zero past each caption's length (pack/pad_packed_sequence) and the
  graph spans the batch's longest caption, so padded positions up to that length count.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.bert import BertConfig, BertEncoder
from dsran_jax.models.layers import Dropout, Linear, l2norm

Dtype = Any


class BertTextEncoder(nn.Module):
  """BERT last hidden layer -> Linear(hidden, E) + ReLU + Dropout(0.1)."""
  bert_config: BertConfig
  embed_size: int
  reference_padding: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    bert_mask = None if self.reference_padding else attention_mask
    h = BertEncoder(self.bert_config, dtype=self.dtype, name="bert")(
        input_ids, attention_mask=bert_mask, train=train)
    x = nn.relu(Linear(self.embed_size, dtype=self.dtype, name="fc")(h))
    x = Dropout(0.1, deterministic=not train)(x)
    node_mask = None if self.reference_padding else attention_mask.astype(bool)
    return x, node_mask


class GRU(nn.Module):
  """Single-layer unidirectional GRU with PyTorch's gate equations and layout.

  Gates are ordered (r, z, n) in one (in, 3H) kernel for the input and one (H, 3H)
  for the hidden state, so `weight_ih_l0.T` / `weight_hh_l0.T` map over directly. The
  input projection of all steps is one matmul; only the hidden matmul is scanned.
  """
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    h_size = self.hidden_size
    bound = 1.0 / h_size ** 0.5
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    w_ih = self.param("w_ih", init, (x.shape[-1], 3 * h_size))
    b_ih = self.param("b_ih", init, (3 * h_size,))
    w_hh = self.param("w_hh", init, (h_size, 3 * h_size))
    b_hh = self.param("b_hh", init, (3 * h_size,))
    gi = jnp.einsum("bld,dg->lbg", x.astype(self.dtype), w_ih.astype(self.dtype))
    gi = gi.astype(jnp.float32) + b_ih

    def step(h, inputs):
      g_i, m = inputs
      g_h = h @ w_hh + b_hh
      r = jax.nn.sigmoid(g_i[:, :h_size] + g_h[:, :h_size])
      z = jax.nn.sigmoid(g_i[:, h_size:2 * h_size] + g_h[:, h_size:2 * h_size])
      n = jnp.tanh(g_i[:, 2 * h_size:] + r * g_h[:, 2 * h_size:])
      h_new = (1 - z) * n + z * h
      # Past the caption's end the state is frozen and the output is zero, as with
      # PyTorch's packed sequences.
      h_new = jnp.where(m[:, None], h_new, h)
      return h_new, jnp.where(m[:, None], h_new, 0.0)

    h0 = jnp.zeros((x.shape[0], h_size), jnp.float32)
    _, out = jax.lax.scan(step, h0, (gi, mask.T.astype(bool)))
    return out.transpose(1, 0, 2)


class GruTextEncoder(nn.Module):
  """Word embedding (word_dim) -> Dropout(0.1) -> GRU(E) -> per-token L2 norm."""
  vocab_size: int
  word_dim: int
  embed_size: int
  reference_padding: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    x = nn.Embed(self.vocab_size, self.word_dim,
                 embedding_init=nn.initializers.normal(1.0), name="embed")(input_ids)
    x = Dropout(0.1, deterministic=not train)(x)
    mask = attention_mask.astype(bool)
    out = l2norm(GRU(self.embed_size, dtype=self.dtype, name="gru")(x, mask))
    if self.reference_padding:
      lengths = jnp.sum(attention_mask, axis=-1)
      positions = jnp.arange(input_ids.shape[1])
      return out, jnp.broadcast_to(positions < jnp.max(lengths), mask.shape)
    return out, mask


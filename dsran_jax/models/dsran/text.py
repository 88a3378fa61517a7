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
import jax.numpy as jnp

from dsran_jax.models.common.bert import BertConfig, BertEncoder
from dsran_jax.models.common.layers import Dropout, Linear, l2norm
from dsran_jax.models.common.text import recurrent_tokens

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


class GruTextEncoder(nn.Module):
  """Word embedding (word_dim) -> Dropout(0.1) -> GRU(E) -> per-token L2 norm."""
  vocab_size: int
  word_dim: int
  embed_size: int
  reference_padding: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    mask = attention_mask.astype(bool)
    out = l2norm(recurrent_tokens(input_ids, attention_mask, train,
                                  vocab_size=self.vocab_size, word_dim=self.word_dim,
                                  hidden_size=self.embed_size, embed_dropout=0.1,
                                  dtype=self.dtype))
    if self.reference_padding:
      lengths = jnp.sum(attention_mask, axis=-1)
      positions = jnp.arange(input_ids.shape[1])
      return out, jnp.broadcast_to(positions < jnp.max(lengths), mask.shape)
    return out, mask

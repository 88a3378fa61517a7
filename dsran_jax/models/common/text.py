"""Recurrent text encoders shared by the families: PyTorch-layout GRU and LSTM (uni- and
bidirectional) over word embeddings, with exact padding semantics.

Every encoder returns per-token features `(B, L, H)` that are exactly zero past each
caption's length, as PyTorch's `pack_padded_sequence` / `pad_packed_sequence` leave them,
so a padded position can never leak into an attention, a normaliser or a mean.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.layers import Dropout, l2norm

Dtype = Any


def _cell_weights(module: nn.Module, x, gates: int):
  """A PyTorch-layout recurrent cell's `w_ih` (in, G H), `b_ih`, `w_hh` (H, G H), `b_hh`
  (G = `gates`; init U(+-1/sqrt(H)) as torch's), made in `module`'s compact scope, and
  the input projection of every step at once, (L, B, G H) float32."""
  h_size = module.hidden_size
  bound = 1.0 / h_size ** 0.5
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  w_ih = module.param("w_ih", init, (x.shape[-1], gates * h_size))
  b_ih = module.param("b_ih", init, (gates * h_size,))
  w_hh = module.param("w_hh", init, (h_size, gates * h_size))
  b_hh = module.param("b_hh", init, (gates * h_size,))
  gi = jnp.einsum("bld,dg->lbg", x.astype(module.dtype), w_ih.astype(module.dtype))
  return gi.astype(jnp.float32) + b_ih, w_hh, b_hh


class GRU(nn.Module):
  """Single-layer GRU with PyTorch's gate equations and layout.

  Gates are ordered (r, z, n) in one (in, 3H) kernel for the input and one (H, 3H)
  for the hidden state, so `weight_ih_l0.T` / `weight_hh_l0.T` map over directly. The
  input projection of all steps is one matmul; only the hidden matmul is scanned.
  `reverse=True` runs each caption from its last real token back to its first (the
  backward half of a bidirectional PyTorch GRU on packed sequences).
  """
  hidden_size: int
  reverse: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    h_size = self.hidden_size
    gi, w_hh, b_hh = _cell_weights(self, x, 3)

    def step(h, inputs):
      g_i, m = inputs
      g_h = h @ w_hh + b_hh
      r = jax.nn.sigmoid(g_i[:, :h_size] + g_h[:, :h_size])
      z = jax.nn.sigmoid(g_i[:, h_size:2 * h_size] + g_h[:, h_size:2 * h_size])
      n = jnp.tanh(g_i[:, 2 * h_size:] + r * g_h[:, 2 * h_size:])
      h_new = (1 - z) * n + z * h
      # Padding freezes the state and outputs zero. Forward, that holds the final state
      # after the caption's end; in reverse it keeps the zero initial state until the
      # last real token, which is where a packed backward pass starts.
      h_new = jnp.where(m[:, None], h_new, h)
      return h_new, jnp.where(m[:, None], h_new, 0.0)

    h0 = jnp.zeros((x.shape[0], h_size), jnp.float32)
    _, out = jax.lax.scan(step, h0, (gi, mask.T.astype(bool)), reverse=self.reverse)
    return out.transpose(1, 0, 2)


def lstm_update(gates, cell):
  """One PyTorch LSTM cell update from the summed pre-activations `gates` (..., 4H),
  ordered (i, f, g, o) as torch.nn.LSTM lays them out; returns (h, cell)."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(cell), cell


class LSTM(nn.Module):
  """Single-layer LSTM with PyTorch's gate equations and layout.

  Gates are ordered (i, f, g, o) in one (in, 4H) kernel for the input and one (H, 4H)
  for the hidden state, so `weight_ih_l0.T` / `weight_hh_l0.T` map over directly; init
  U(+-1/sqrt(H)) as torch's. Padding works as in `GRU`: a padded step freezes both the
  hidden and the cell state and outputs zero, so `reverse=True` starts at each caption's
  last real token, as a packed backward pass does.
  """
  hidden_size: int
  reverse: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    gi, w_hh, b_hh = _cell_weights(self, x, 4)

    def step(state, inputs):
      h, c = state
      g_i, m = inputs
      h_new, c_new = lstm_update(g_i + h @ w_hh + b_hh, c)
      keep = m[:, None]
      h_new, c_new = jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)
      return (h_new, c_new), jnp.where(keep, h_new, 0.0)

    zeros = jnp.zeros((x.shape[0], self.hidden_size), jnp.float32)
    _, out = jax.lax.scan(step, (zeros, zeros), (gi, mask.T.astype(bool)),
                          reverse=self.reverse)
    return out.transpose(1, 0, 2)


CELLS = {"gru": GRU, "lstm": LSTM}


def _embedding_init(kind: str):
  if kind == "normal":
    return nn.initializers.normal(1.0)
  if kind == "uniform":
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -0.1, 0.1)
  raise ValueError(f"embed_init={kind!r}: expected 'normal' or 'uniform'")


def recurrent_tokens(input_ids, attention_mask, train: bool, *, vocab_size: int,
                     word_dim: int, hidden_size: int, bidirectional: bool = False,
                     embed_dropout: float = 0.1, embed_init: str = "normal",
                     dtype: Dtype = jnp.float32, cell: str = "gru"):
  """Word embedding -> Dropout -> (Bi)GRU or (Bi)LSTM, built in the *calling* compact
  module's scope.

  A function rather than a module so that families keep their parameter paths
  (`<encoder>/embed`, `<encoder>/<cell>`, `<encoder>/<cell>_reverse`, with `cell` "gru"
  or "lstm") whatever else their encoder adds. Bidirectional outputs are the average of
  the two halves, `(h_fwd + h_bwd) / 2`, as SCAN and SGRAF compute them with `--bi_gru`.
  """
  if cell not in CELLS:
    raise ValueError(f"cell={cell!r}: expected one of {tuple(CELLS)}")
  x = nn.Embed(vocab_size, word_dim, embedding_init=_embedding_init(embed_init),
               name="embed")(input_ids)
  x = Dropout(embed_dropout, deterministic=not train)(x)
  mask = attention_mask.astype(bool)
  rnn = CELLS[cell]
  out = rnn(hidden_size, dtype=dtype, name=cell)(x, mask)
  if bidirectional:
    back = rnn(hidden_size, reverse=True, dtype=dtype, name=f"{cell}_reverse")(x, mask)
    out = (out + back) / 2
  return out


class RecurrentTextEncoder(nn.Module):
  """`recurrent_tokens` followed by an optional per-token L2 norm.

  Attributes:
    vocab_size, word_dim, hidden_size: table and GRU widths.
    bidirectional: a second GRU runs backwards; the halves are averaged.
    embed_dropout: dropout on the word embeddings (DSRAN/MLASM 0.1, SGRAF 0.4, SCAN 0).
    embed_init: "normal" (PyTorch's nn.Embedding default N(0, 1): DSRAN, MLASM) or
      "uniform" (U(-0.1, 0.1): SCAN, SGRAF).
    normalize: L2-normalise each token's output (padded rows stay exactly zero).
  """
  vocab_size: int
  word_dim: int
  hidden_size: int
  bidirectional: bool = False
  embed_dropout: float = 0.1
  embed_init: str = "normal"
  normalize: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    out = recurrent_tokens(
        input_ids, attention_mask, train, vocab_size=self.vocab_size,
        word_dim=self.word_dim, hidden_size=self.hidden_size,
        bidirectional=self.bidirectional, embed_dropout=self.embed_dropout,
        embed_init=self.embed_init, dtype=self.dtype)
    return l2norm(out) if self.normalize else out

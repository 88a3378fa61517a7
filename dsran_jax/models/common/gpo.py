"""Generalized Pooling Operator (GPO; Chen et al., "Learning the Best Pooling Strategy for
Visual Semantic Embedding", CVPR 2021; woodfrog/vse_infty lib/modules/aggr/gpo.py), the
pooling of VSE∞ (HREM, built on its code, pools otherwise: `models/hrem`).

For a set of n feature vectors (regions or tokens), GPO learns one weight per *rank*:

    pe_k      = sin/cos positional encoding of position k = 0..n-1      (d_pe wide)
    h_k       = (GRU_fwd(pe)_k + GRU_bwd(pe)_k) / 2                    (d_hidden wide)
    theta     = softmax_k(w . h_k / 0.1)                                (w: Linear, no bias)
    pooled_d  = sum_k theta_k * sort_desc(x_{., d})_k                   per dimension d

The weights depend on n alone; each dimension's values are sorted in descending order
before the weighted sum, so GPO spans max pooling, mean pooling and K-max pooling. The
GRU reads the encodings of the n real positions only (a packed sequence in their code);
padded positions get the score -10000 (weight 0) and sort to the end, where they are
zeroed.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsran_jax.models.common.text import GRU

# The fill of their masked_fill calls: padded scores and padded features.
FILL = -10000.0
TEMPERATURE = 0.1


def positional_encoding_1d(d_model: int, length: int) -> np.ndarray:
  """(length, d_model) float32 sin/cos encodings: even columns sin(k * f_i), odd columns
  cos(k * f_i), f_i = exp(-2i ln(10000) / d_model), as their `positional_encoding_1d`."""
  if d_model % 2:
    raise ValueError(f"GPO positional encoding needs an even width, got d_pe={d_model}")
  position = np.arange(length, dtype=np.float32)[:, None]
  div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32)
                    * np.float32(-(np.log(10000.0) / d_model))).astype(np.float32)
  pe = np.zeros((length, d_model), np.float32)
  pe[:, 0::2] = np.sin(position * div_term)
  pe[:, 1::2] = np.cos(position * div_term)
  return pe


class GPO(nn.Module):
  """GPO(d_pe, d_hidden) over `features` (B, L, D) with `mask` (B, L) of real items.

  Parameters (PyTorch layout, names as `convert.engine`'s "gru" / "linear" kinds):
  `gru` / `gru_reverse` (their `gru`, bidirectional, one layer) and `linear/kernel`
  (d_hidden, 1), no bias. The items need not be a prefix: the weights depend on the
  count of real items only, and the features are sorted.

  Returns `(pooled (B, D) float32, weights (B, L, 1))`.
  """
  d_pe: int = 32
  d_hidden: int = 32

  @nn.compact
  def __call__(self, features, mask):
    b, length = mask.shape
    mask = mask.astype(bool)
    lengths = jnp.sum(mask, axis=1)
    prefix = jnp.arange(length)[None, :] < lengths[:, None]
    pe = jnp.broadcast_to(jnp.asarray(positional_encoding_1d(self.d_pe, length)),
                          (b, length, self.d_pe))
    pe = jnp.where(prefix[..., None], pe, 0.0)
    out = (GRU(self.d_hidden, name="gru")(pe, prefix)
           + GRU(self.d_hidden, reverse=True, name="gru_reverse")(pe, prefix)) / 2
    # PyTorch's nn.Linear default init (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
    linear = nn.Dense(1, use_bias=False, name="linear",
                      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))
    scores = jnp.where(prefix[..., None], linear(out), FILL)
    weights = jax.nn.softmax(scores / TEMPERATURE, axis=1)
    x = jnp.where(mask[..., None], features.astype(jnp.float32), FILL)
    x = -jnp.sort(-x, axis=1)  # descending per dimension
    x = jnp.where(prefix[..., None], x, 0.0)
    return jnp.sum(x * weights, axis=1), weights

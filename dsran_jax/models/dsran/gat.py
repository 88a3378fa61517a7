"""The graph-attention relation block of DSRAN (the authors' GAT.py, one `GATLayer`).

    a = MHA(x)                                  8 heads over all nodes, dropout on probs
    h = BN(x + Dropout(W_in a))
    y = BN(h + Dropout(W_out relu(W_int h)))

`node_mask` (B, N) marks real nodes: padded nodes are never attended to and stay out of
the BatchNorm statistics. With an all-True mask this is exactly the authors' layer.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.layers import Dropout, Linear, MaskedBatchNorm

Dtype = Any


class MultiHeadAttention(nn.Module):
  """Scaled dot-product self-attention over graph nodes (no output projection: the
  authors' GATLayer applies `fc_in` after it)."""
  num_heads: int = 8
  dropout: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, node_mask: Optional[jnp.ndarray], train: bool):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"GAT width {d} is not divisible by {self.num_heads} heads")
    hd = d // self.num_heads
    split = lambda t: t.reshape(b, n, self.num_heads, hd)
    q = split(Linear(d, dtype=self.dtype, name="query")(x))
    k = split(Linear(d, dtype=self.dtype, name="key")(x))
    v = split(Linear(d, dtype=self.dtype, name="value")(x))
    # Softmax in fp32 even under bf16 compute: the logits of 100+ nodes need the range.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / hd ** 0.5)
    if node_mask is not None:
      logits = jnp.where(node_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention", probs)  # no-op unless "intermediates" is mutable
    probs = Dropout(self.dropout, deterministic=not train)(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    return out.reshape(b, n, d)


class GATLayer(nn.Module):
  """One relation layer: attention + residual BN, feed-forward + residual BN."""
  num_heads: int = 8
  dropout: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, node_mask: Optional[jnp.ndarray], train: bool):
    d = x.shape[-1]
    drop = lambda name: Dropout(self.dropout, deterministic=not train, name=name)
    a = MultiHeadAttention(self.num_heads, self.dropout, self.dtype, name="mha")(
        x, node_mask, train)
    a = drop("dropout_in")(Linear(d, dtype=self.dtype, name="fc_in")(a))
    h = MaskedBatchNorm(name="bn_in")(a + x, node_mask, train)
    f = Linear(d, dtype=self.dtype, name="fc_int")(h)
    f = Linear(d, dtype=self.dtype, name="fc_out")(nn.relu(f))
    f = drop("dropout_out")(f)
    return MaskedBatchNorm(name="bn_out")(f + h, node_mask, train)


class GAT(nn.Module):
  """A stack of `num_layers` GATLayers (the authors use one)."""
  num_layers: int = 1
  num_heads: int = 8
  dropout: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, node_mask: Optional[jnp.ndarray], train: bool):
    for i in range(self.num_layers):
      x = GATLayer(self.num_heads, self.dropout, self.dtype, name=f"layer_{i}")(
          x, node_mask, train)
    return x

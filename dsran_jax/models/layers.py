"""Small building blocks shared by the DSRAN modules: PyTorch-initialised Dense, L2 norm,
masked mean, and a BatchNorm whose statistics skip padding."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _torch_bias_init(fan_in: int):
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None, **kwargs):
  """`lax.dot_general` that computes `lhs @ rhs` over lhs's last axis as one 2-D matmul.

  Same products and sums. Why: for a (B, N, D) input the backward's weight gradient
  would contract two axes (B and N), and XLA CPU then materialises a transposed copy of
  the (B, N, E) cotangent fused with its elementwise producers (a slow strided loop);
  with the leading axes merged first it contracts one axis and feeds the cotangent to
  the matmul as it is (about a third of a dense layer's backward time). Any other
  contraction goes to `lax.dot_general` unchanged. Usable as `nn.Dense(dot_general=...)`.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
      and not lb and not rb):
    y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                            precision=precision,
                            preferred_element_type=preferred_element_type, **kwargs)
    return y.reshape(lhs.shape[:-1] + (rhs.shape[1],))
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


class Linear(nn.Module):
  """`nn.Dense` initialised like the authors' layers.

  init="torch" is PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)) for kernel and bias;
  init="xavier" is the uniform Xavier kernel with zero bias the GRU build uses.
  """
  features: int
  init: str = "torch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    if self.init == "torch":
      k_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      b_init = _torch_bias_init(fan_in)
    elif self.init == "xavier":
      k_init, b_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
    else:
      raise ValueError(f"unknown init {self.init!r}")
    kernel = self.param("kernel", k_init, (fan_in, self.features), jnp.float32)
    bias = self.param("bias", b_init, (self.features,), jnp.float32)
    y = flat_dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                         (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias.astype(self.dtype)


def l2norm(x, axis=-1, eps=1e-12):
  """x / (||x|| + eps), with a gradient that stays finite for all-zero rows (padding)."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / (jnp.sqrt(jnp.maximum(sq, 1e-30)) + eps)


def masked_mean(x, mask, axis=1):
  """Mean of x (B, N, C) over nodes where mask (B, N) is True (all nodes if None)."""
  if mask is None:
    return jnp.mean(x, axis=axis)
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


class MaskedBatchNorm(nn.Module):
  """BatchNorm1d over (batch x nodes) per channel, as PyTorch's, but padding-aware.

  Train mode normalises with the biased batch variance and updates the running stats
  with momentum 0.1 and the unbiased variance, exactly like torch.nn.BatchNorm1d; eval
  mode uses the running stats. Nodes where `mask` is False do not enter the statistics.
  Under `jax.jit` over a device mesh the sums are global, so the statistics are those of
  the global batch.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, mask: Optional[jnp.ndarray], train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      if mask is None:
        mask = jnp.ones(x.shape[:-1], bool)
      m = mask.astype(jnp.float32)[..., None]
      n = jnp.maximum(jnp.sum(m), 1.0)
      mean = jnp.sum(x32 * m, axis=(0, 1)) / n
      var = jnp.sum(jnp.square(x32 - mean) * m, axis=(0, 1)) / n
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)

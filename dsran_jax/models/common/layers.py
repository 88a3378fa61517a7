"""Small building blocks shared by the DSRAN modules: PyTorch-initialised Dense, L2 norm,
masked mean, and a BatchNorm whose statistics skip padding."""
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint
import numpy as np

from dsran_jax.core import precision

Dtype = Any


def _torch_bias_init(fan_in: int):
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _row_major_transpose(a):
  """a.T as a physically transposed, row-major array.

  XLA imports a transpose as a layout change (a bitcast); a dot reading it then sees a
  column-major operand, which XLA:CPU's fast (YNNPACK, AMX) bf16 path rejects, so the
  dot is upcast to fp32. Pinning the row-major layout makes XLA write the transposed copy
  (a few ms) and keeps the dot on the fast path.
  """
  return with_layout_constraint(a.T, Layout(major_to_minor=(0, 1)))


def _lowp_dense_fwd(x, kernel, bias):
  y = jax.lax.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  return (y + bias).astype(x.dtype), (x, kernel)


def _lowp_dense_bwd(res, g):
  x, kernel = res
  g = g.astype(x.dtype)
  dx = jax.lax.dot(g, _row_major_transpose(kernel.astype(x.dtype)),
                   preferred_element_type=jnp.float32)
  dkernel = jax.lax.dot(_row_major_transpose(x), g, preferred_element_type=jnp.float32)
  dbias = jnp.sum(g.astype(jnp.float32), axis=0)
  return dx.astype(x.dtype), dkernel, dbias


@jax.custom_vjp
def lowp_dense(x, kernel, bias):
  """x @ kernel + bias for low-precision (bf16) x (M, K) and fp32 kernel (K, N), bias (N,).

  Mixed precision as usual (bf16 operands, fp32 accumulation and bias add, output in x's
  dtype; fp32 parameter gradients), with every dot of the forward and backward pass given
  to XLA in the canonical row-major form that XLA:CPU's AMX/YNNPACK bf16 kernels accept
  (~5x its fp32 matmul rate here). Autodiff's own backward contracts transposed operands,
  which XLA:CPU upcasts to fp32, and rounds parameter gradients through bf16.
  """
  return _lowp_dense_fwd(x, kernel, bias)[0]


lowp_dense.defvjp(_lowp_dense_fwd, _lowp_dense_bwd)


def compute_dtype(model_config) -> str:
  """`config.model.dtype` as this backend runs it: float32 where a bf16 request meets a
  CPU without native bf16 (`core.precision`, `model.bf16_on_cpu`)."""
  return precision.compute_dtype(str(model_config.dtype), model_config.bf16_on_cpu,
                                 jax.default_backend())[0]


def dense(x, kernel, bias, dtype):
  """`x @ kernel + bias` over x's last axis, computed in `dtype` (fp32 params).

  The leading axes are merged first, so every dense layer is one 2-D matmul. Why: for a
  (B, N, D) input the backward's weight gradient would otherwise contract two axes (B and
  N), and XLA CPU then materialises a transposed copy of the (B, N, E) cotangent fused
  with its elementwise producers (a slow strided loop); with one axis the cotangent
  feeds the matmul as it is (about a third of a dense layer's backward time). bf16 on
  CPU goes through `lowp_dense`; GPUs and TPUs take transposed bf16 operands natively.
  """
  x2 = x.astype(dtype).reshape(-1, x.shape[-1])
  if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
    y = lowp_dense(x2, kernel, bias)
  else:
    y = jnp.dot(x2, kernel.astype(dtype)) + bias.astype(dtype)
  return y.reshape(x.shape[:-1] + (kernel.shape[1],))


def _rotate_left(x, d: int):
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 (20 rounds), the same function as `jax.random`'s, written unrolled.

  Why: JAX lowers threefry on CPU as a rolled 5-iteration `while` loop, which writes the
  four u32 state arrays to memory every iteration (memory-bound: ~100 ms per 5M dropout
  elements here, over 1 s of a 32-pair train step). Unrolled, XLA fuses the whole hash
  into the consumer and it is ~15x cheaper. Bit-identical outputs.
  """
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in rotations[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ _rotate_left(x[1], r)
    x[0] = x[0] + ks[(i + 1) % 3]
    x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x[0], x[1]


def _fast_bernoulli_supported(rng, size: int) -> bool:
  if jax.config.jax_enable_x64 or not jax.config.jax_threefry_partitionable:
    return False
  if size >= 2 ** 32:
    return False
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(rng)) == "threefry2x32"
  return (rng.shape == (2,) and rng.dtype == jnp.uint32
          and jax.config.jax_default_prng_impl == "threefry2x32")


def bernoulli(rng, p: float, shape) -> jnp.ndarray:
  """`jax.random.bernoulli(rng, p, shape)`, bit for bit, with an unrolled threefry.

  Reproduces JAX's partitionable threefry bits (counter = the element's row-major index,
  bits = xor of the two hash words), its [0, 1) float32 uniform and the `< p` test, so
  dropout masks are exactly those `flax.linen.Dropout` draws. Falls back to
  `jax.random.bernoulli` for other PRNG implementations or settings.
  """
  shape = tuple(shape)
  size = int(np.prod(shape))
  if not _fast_bernoulli_supported(rng, size):
    return jax.random.bernoulli(rng, p, shape)
  key = jax.random.key_data(rng) if jax.dtypes.issubdtype(
      rng.dtype, jax.dtypes.prng_key) else rng
  # Row-major element index as a sum of broadcast iotas (as jax's iota_2x32_shape), which
  # XLA's SPMD partitioner shards like the data; the high counter word is 0 below 2**32.
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride)
    stride *= shape[d]
  b1, b2 = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), index)
  bits = (b1 ^ b2) >> np.uint32(9) | np.uint32(0x3F800000)
  uniform = jax.lax.bitcast_convert_type(bits, jnp.float32) - np.float32(1.0)
  return jnp.maximum(np.float32(0.0), uniform) < np.float32(p)


class Dropout(nn.Dropout):
  """`flax.linen.Dropout` with the same masks, drawn with `bernoulli` above (faster on
  CPU). Same class name, so auto-named instances keep their names and rng streams."""

  @nn.compact
  def __call__(self, inputs, deterministic: Optional[bool] = None, rng=None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if (self.rate == 0.0) or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jnp.broadcast_to(bernoulli(rng, keep_prob, shape), inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class Linear(nn.Module):
  """`nn.Dense` initialised like the authors' layers.

  init="torch" is PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)) for kernel and bias;
  init="xavier" is the uniform Xavier kernel with zero bias the GRU build uses;
  init="bert" is BERT's N(0, 0.02) kernel with zero bias;
  init="torch_zero_bias" is nn.Linear's kernel with a zero bias (the `out_proj` of
  torch's MultiheadAttention).
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
    elif self.init == "torch_zero_bias":
      k_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      b_init = nn.initializers.zeros
    elif self.init == "bert":
      k_init, b_init = nn.initializers.normal(stddev=0.02), nn.initializers.zeros
    else:
      raise ValueError(f"unknown init {self.init!r}")
    kernel = self.param("kernel", k_init, (fan_in, self.features), jnp.float32)
    bias = self.param("bias", b_init, (self.features,), jnp.float32)
    return dense(x, kernel, bias, self.dtype)


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


def _bn_train_fwd(x, m, scale, bias, eps):
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m, axis=(0, 1)) / n
  var = jnp.sum(jnp.square(x - mean) * m, axis=(0, 1)) / n
  inv = jax.lax.rsqrt(var + eps)
  y = (x - mean) * inv * scale + bias
  return (y, mean, var), (x, m, n, mean, inv, scale)


def _bn_train_bwd(eps, res, cotangents):
  del eps
  x, m, n, mean, inv, scale = res
  dy, dmean, dvar = cotangents
  xc = x - mean
  xhat = xc * inv
  dbias = jnp.sum(dy, axis=(0, 1))
  dscale = jnp.sum(dy * xhat, axis=(0, 1))
  # Through y: scale*inv*(dy - m/n*(dbias + xhat*dscale)); through the returned mean and
  # var (they only feed the running stats, so zero in training): m/n*(dmean + 2*xc*dvar).
  dx = (scale * inv) * (dy - (m / n) * (dbias + xhat * dscale)) + (m / n) * (
      dmean + 2.0 * xc * dvar)
  return dx, None, dscale, dbias


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bn_train(x, m, scale, bias, eps):
  """Masked batch norm over axes (0, 1) of (B, N, C): returns (y, mean, biased var).

  Same forward expressions as a plain implementation; the VJP is written by hand (the
  textbook BatchNorm backward: two channel reductions and one elementwise pass) because
  the one autodiff derives makes several more passes over the (B, N, C) activations
  (~2-3% of a train step at the benchmark shape).
  """
  return _bn_train_fwd(x, m, scale, bias, eps)[0]


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


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
      y, mean, var = _bn_train(x32, m, scale, bias, self.epsilon)
      if not self.is_initializing():
        n = jnp.maximum(jnp.sum(m), 1.0)
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
      return y.astype(x.dtype)
    mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)

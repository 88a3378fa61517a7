"""PyTorch's `nn.TransformerEncoderLayer` in its default form (post-norm, ReLU,
`batch_first=False` weights) as a Flax block, for the models trained from code that
uses it (HREM's fragment- and instance-level relation modules).

Per layer, on x (N, L, E) (batch first here; their sequence-first tensors are only
transposed):

    a = MHA(x) = out_proj(softmax(q k^T / sqrt(d) + bias) v),  [q k v] = x W_in + b_in
    x = norm1(x + dropout(a))
    x = norm2(x + dropout(linear2(dropout(relu(linear1(x))))))

`bias` is an additive (N or 1, L, L) or (N, 1, L) attention bias: 0 where attending is
allowed, `NEG` where torch has `-inf` (a key padding mask, a float `mask` with -inf),
finite so a query with no allowed key (an all-padding row of an evaluation tile) stays
finite (torch would give NaN there). Parameter names follow torch's state dict:
`self_attn/in_proj_kernel` (E, 3E) (their `in_proj_weight` (3E, E), transposed) and
`in_proj_bias`, `self_attn/out_proj`, `linear1`, `linear2`, `norm1`, `norm2` (LayerNorm
eps 1e-5). Initialisation as torch's: Xavier-uniform `in_proj`, zero in-projection and
out-projection biases, nn.Linear defaults elsewhere, LayerNorm (1, 0).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.layers import Dropout, Linear

NEG = -1e30  # a masked logit: exp(NEG - max) is 0 in float32, as torch's -inf


def padding_bias(mask: jnp.ndarray) -> jnp.ndarray:
  """(N, 1, L) attention bias of a (N, L) bool key mask (True: a real token): torch's
  `src_key_padding_mask = ~mask`."""
  return jnp.where(mask, 0.0, NEG)[:, None, :].astype(jnp.float32)


class TorchSelfAttention(nn.Module):
  """torch `nn.MultiheadAttention(E, num_heads, dropout)` used as self-attention."""
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, bias, train: bool):
    n, length, e = x.shape
    h = self.num_heads
    d = e // h
    w = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (e, 3 * e), jnp.float32)
    b = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,), jnp.float32)
    qkv = jnp.matmul(x, w) + b
    q, k, v = (t.reshape(n, length, h, d) for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q / jnp.sqrt(float(d)), k)
    logits = logits + bias[:, None, :, :]
    p = jax.nn.softmax(logits, axis=-1)
    p = Dropout(self.dropout)(p, deterministic=not train)
    out = jnp.einsum("nhqk,nkhd->nqhd", p, v).reshape(n, length, e)
    return Linear(e, init="torch_zero_bias", name="out_proj")(out)


class TorchEncoderLayer(nn.Module):
  """torch `nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout)` (the
  defaults: post-norm, ReLU) on batch-first x (N, L, E) with an additive `bias`."""
  num_heads: int
  dim_feedforward: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, bias, train: bool):
    e = x.shape[-1]
    drop = lambda y: Dropout(self.dropout)(y, deterministic=not train)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
    a = TorchSelfAttention(self.num_heads, self.dropout, name="self_attn")(x, bias, train)
    x = norm("norm1")(x + drop(a))
    f = Linear(self.dim_feedforward, name="linear1")(x)
    f = Linear(e, name="linear2")(drop(jax.nn.relu(f)))
    return norm("norm2")(x + drop(f))


class TorchEncoder(nn.Module):
  """torch `nn.TransformerEncoder(layer, num_layers)` without a final norm: layers
  `layers_{i}` (their `layers.{i}`)."""
  num_layers: int
  num_heads: int
  dim_feedforward: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, bias, train: bool):
    for i in range(self.num_layers):
      x = TorchEncoderLayer(self.num_heads, self.dim_feedforward, self.dropout,
                            name=f"layers_{i}")(x, bias, train)
    return x


def same_initial_layers(params: dict) -> dict:
  """A `TorchEncoder`'s fresh params with every layer a copy of `layers_0`, as torch's
  `_get_clones` deep-copies one initialised layer (copies, not shared arrays: a jitted
  step may donate every buffer of its state)."""
  if "layers_0" not in params:
    return params
  first = params["layers_0"]
  return {k: (jax.tree_util.tree_map(jnp.copy, first) if k.startswith("layers_") and
              k != "layers_0" else v) for k, v in params.items()}

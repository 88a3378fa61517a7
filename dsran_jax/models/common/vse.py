"""Per-item encoders of the VSE∞ code base (woodfrog/vse_infty lib/encoders.py,
lib/modules/mlp.py), shared by the models trained from it: VSE∞ pools their outputs with
GPO (`common/gpo.py`); HREM (its `FC_MLP`, `models/hrem`) and CHAN (word and region
features scored by hard alignment) use them before their own pooling or scoring.

- `RegionMLP`: their `MLP(img_dim, E/2, E, 2)`, Linear -> BatchNorm1d -> ReLU -> Linear,
  whose BatchNorm1d normalises every row of the (B x max_len) padded batch, padding
  included (a zero region's row is the first Linear's bias): `PaddedBatchNorm` counts the
  same rows, so training statistics equal theirs however our batch is padded.
- `bert_words`: BERT (attention mask `ids != 0`) -> Linear(hidden, E) per token.
- `bidirectional_gru`: nn.GRU(bidirectional, num_layers) on packed sequences, the last
  layer's halves averaged.
- `MaskedWordEmbedding`: their BiGRU builds' word table with the `<mask>` row train.py
  appends to the vocabulary.
- `config_fields` / `check_text_encoder`: the Module config every one of these families
  builds (shared widths, its options, the text encoder's `BertConfig`) and its checks.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.bert import BertConfig, BertEncoder
from dsran_jax.models.common.layers import Linear
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.common.text import GRU


def config_fields(options, name: str) -> type:
  """The frozen dataclass (named `name`) a family's Module config subclasses: the
  shared widths, `options`' Module fields, then `bert`, the text encoder's BertConfig
  (None for a BiGRU build)."""
  return options.dataclass(name, head=WIDTHS, tail=(("bert", Optional[BertConfig], None),))


def check_text_encoder(config, family: str, section: str) -> None:
  """Raises ValueError when a Module `config` with a BERT / BiGRU `text_encoder` lacks
  what that build needs: a BertConfig, or a word vocabulary (`family` ("VSE∞") and
  `section` name it in the message)."""
  if config.text_encoder == "bert" and config.bert is None:
    raise ValueError(f"{family}'s BERT build needs a BertConfig (model.{section}.bert_path "
                     f"or bert_random_init)")
  if config.text_encoder == "bigru" and config.vocab_size <= 0:
    raise ValueError(f"{family}'s BiGRU build needs a word vocabulary: "
                     f"vocab_size={config.vocab_size}")


class PaddedBatchNorm(nn.Module):
  """torch BatchNorm1d over the rows of a padded (B, R, C) batch, counted their way.

  Train mode: the statistics are over the real rows (`mask`) plus `n_pad` copies of
  `pad_row` (what their padded rows hold), biased variance for the output, running
  stats with momentum 0.1 and the unbiased variance; eval mode: the running stats.
  Parameters and statistics are named as `convert.engine`'s "bn" kind expects.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, mask, pad_row, n_pad, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      m = mask.astype(jnp.float32)[..., None]
      n = jnp.maximum(jnp.sum(m) + n_pad, 1.0)
      mean = (jnp.sum(x * m, axis=(0, 1)) + n_pad * pad_row) / n
      var = (jnp.sum(jnp.square(x - mean) * m, axis=(0, 1))
             + n_pad * jnp.square(pad_row - mean)) / n
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class RegionMLP(nn.Module):
  """Their `MLP(img_dim, embed // 2, embed, 2)`: layer_0 -> bn_0 -> ReLU -> layer_1 (a
  `bns.1` exists in their state dict but is never called). `init`: the Linears' (see
  `layers.Linear`; HREM's `FC_MLP` applies Xavier to them)."""
  hidden: int
  out: int
  init: str = "torch"

  @nn.compact
  def __call__(self, x, mask, train: bool):
    layer_0 = Linear(self.hidden, init=self.init, name="layer_0")
    h = layer_0(x)
    lengths = jnp.sum(mask, axis=1)
    # Their collate pads each batch to its longest image with zero rows.
    n_pad = (x.shape[0] * jnp.max(lengths) - jnp.sum(lengths)).astype(jnp.float32)
    pad_row = layer_0(jnp.zeros((1, x.shape[-1]), x.dtype))[0]
    h = PaddedBatchNorm(name="bn_0")(h, mask, pad_row, n_pad, train)
    return Linear(self.out, init=self.init, name="layer_1")(jax.nn.relu(h))


def bidirectional_gru(x, mask, hidden: int, num_layers: int):
  """nn.GRU(bidirectional=True, num_layers) on packed sequences, the last layer's two
  halves averaged (their BiGRU text encoders); layer n > 0 reads both halves of n - 1.
  Module names: `gru` / `gru_reverse`, then `gru_l{n}` / `gru_l{n}_reverse`. Call from
  a compact scope."""
  for layer in range(num_layers):
    name = "gru" if layer == 0 else f"gru_l{layer}"
    fwd = GRU(hidden, name=name)(x, mask)
    bwd = GRU(hidden, reverse=True, name=f"{name}_reverse")(x, mask)
    x = jnp.concatenate([fwd, bwd], -1) if layer < num_layers - 1 else (fwd + bwd) / 2
  return x


def bert_words(input_ids, mask, bert: BertConfig, embed_size: int, train: bool):
  """Their BERT text path up to the pooling: BERT with attention mask `mask & ids != 0`
  (theirs is `ids != 0`, which is the same on 0-padded ids) -> Linear(hidden, E) per
  token. Module names `bert`, `linear`; call from a compact scope."""
  h = BertEncoder(bert, name="bert")(input_ids, mask & (input_ids != 0), train=train)
  return Linear(embed_size, name="linear")(h)


class MaskedWordEmbedding(nn.Module):
  """Their `nn.Embedding(len(vocab) + 1, word_dim)`: `embedding` holds the `vocab_size`
  rows of the vocabulary's words and `mask` the row after them, their `<mask>` (id
  `vocab_size`), which train.py appends to the vocabulary. Kept apart so the word table
  has exactly the vocabulary's rows, as every word-vocabulary model's.

  Initialisation: U(-bound, bound) with `bound` (VSE∞: 0.1); None is
  `nn.init.xavier_uniform_` of the whole (vocab_size + 1, features) table (CHAN).
  """
  vocab_size: int
  features: int
  bound: Optional[float] = 0.1

  @nn.compact
  def __call__(self, ids):
    bound = self.bound
    if bound is None:  # xavier over their one table: fan_in + fan_out = rows + columns
      bound = (6.0 / (self.vocab_size + 1 + self.features)) ** 0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    words = self.param("embedding", uniform, (self.vocab_size, self.features))
    mask_row = self.param("mask", uniform, (1, self.features))
    return jnp.take(jnp.concatenate([words, mask_row]), ids, axis=0)

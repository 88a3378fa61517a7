"""VSE∞ (Chen et al., CVPR 2021; woodfrog/vse_infty lib/encoders.py), the precomputed-
region build, as a `MatchingModel`: one unit vector per image and per caption, scored
by a dot product.

- Image (`EncoderImageAggr`): fc (Xavier-uniform, bias 0) of the regions, plus for
  `precomp_enc_type="basic"` a two-layer MLP residual (Linear -> BatchNorm1d -> ReLU ->
  Linear), GPO over the regions, l2norm.
- Text, BERT build (`master`): BERT (attention mask `ids != 0`) -> Linear(hidden, embed)
  -> GPO over the tokens ([CLS] and [SEP] included) -> l2norm.
- Text, BiGRU build (branch `bigru`): Embedding U(-0.1, 0.1) with one extra row (their
  `<mask>`, a parameter of its own here) -> bidirectional GRU, the last layer's halves averaged -> GPO -> l2norm.

Their MLP's BatchNorm1d normalises every row of the (B x max_len) padded batch, padding
included (a zero region's row is the first Linear's bias): `PaddedBatchNorm` counts the
same rows, so training statistics equal theirs however our batch is padded.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.base import RegionWordModel, region_inputs
from dsran_jax.models.common.bert import BertConfig, BertEncoder
from dsran_jax.models.common.gpo import GPO
from dsran_jax.models.common.layers import Linear, l2norm
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.common.text import GRU
from dsran_jax.models.vse_infty import config as spec

EPS = 1e-8  # their l2norm: x / (||x|| + 1e-8)


class VseInftyConfig(spec.OPTIONS.dataclass(
    "VseInftyConfigFields", head=WIDTHS, tail=(("bert", Optional[BertConfig], None),))):
  """Hashable VSE∞ description: the shared widths, every `config.model.vse_infty` option
  that shapes the Module, and the BERT build's `BertConfig`; built by `vse_infty.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.text_encoder == "bert" and self.bert is None:
      raise ValueError("VSE∞'s BERT build needs a BertConfig (model.vse_infty.bert_path or "
                       "bert_random_init)")
    if self.text_encoder == "bigru" and self.vocab_size <= 0:
      raise ValueError(f"VSE∞'s BiGRU build needs a word vocabulary: "
                       f"vocab_size={self.vocab_size}")


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
  `bns.1` exists in their state dict but is never called)."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x, mask, train: bool):
    layer_0 = Linear(self.hidden, name="layer_0")
    h = layer_0(x)
    lengths = jnp.sum(mask, axis=1)
    # Their collate pads each batch to its longest image with zero rows.
    n_pad = (x.shape[0] * jnp.max(lengths) - jnp.sum(lengths)).astype(jnp.float32)
    pad_row = layer_0(jnp.zeros((1, x.shape[-1]), x.dtype))[0]
    h = PaddedBatchNorm(name="bn_0")(h, mask, pad_row, n_pad, train)
    return Linear(self.out, name="layer_1")(jax.nn.relu(h))


class ImageEncoder(nn.Module):
  """EncoderImageAggr on precomputed features: (B, R, img_dim) + mask -> (B, E)."""
  config: VseInftyConfig

  @nn.compact
  def __call__(self, regions, mask, train: bool):
    c = self.config
    x = jnp.where(mask[..., None], regions.astype(jnp.float32), 0.0)
    features = Linear(c.embed_size, init="xavier", name="fc")(x)
    if c.precomp_enc_type == "basic":
      features = features + RegionMLP(c.embed_size // 2, c.embed_size, name="mlp")(
          x, mask, train)
    pooled, _ = GPO(name="gpool")(features, mask)
    return pooled if c.no_imgnorm else l2norm(pooled, eps=EPS)


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


class BertTextEncoder(nn.Module):
  """EncoderText of `master`: BERT -> Linear(hidden, E) -> GPO -> l2norm."""
  config: VseInftyConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    c = self.config
    # Their BERT mask is `ids != 0`; the GPO lengths count every token of the caption.
    h = BertEncoder(c.bert, name="bert")(input_ids, mask & (input_ids != 0), train=train)
    words = Linear(c.embed_size, name="linear")(h)
    pooled, _ = GPO(name="gpool")(words, mask)
    return pooled if c.no_txtnorm else l2norm(pooled, eps=EPS)


class MaskedWordEmbedding(nn.Module):
  """Their `nn.Embedding(len(vocab) + 1, word_dim)`, U(-0.1, 0.1): `embedding` holds the
  `vocab_size` rows of the vocabulary's words and `mask` the row after them, their
  `<mask>` (id `vocab_size`), which train.py appends to the vocabulary. Kept apart so
  the word table has exactly the vocabulary's rows, as every word-vocabulary model's."""
  vocab_size: int
  features: int

  @nn.compact
  def __call__(self, ids):
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -0.1, 0.1)
    words = self.param("embedding", uniform, (self.vocab_size, self.features))
    mask_row = self.param("mask", uniform, (1, self.features))
    return jnp.take(jnp.concatenate([words, mask_row]), ids, axis=0)


class BiGruTextEncoder(nn.Module):
  """EncoderText of branch `bigru`: word embedding (plus their `<mask>` row) -> BiGRU,
  halves averaged -> GPO -> l2norm."""
  config: VseInftyConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    del train
    c = self.config
    x = MaskedWordEmbedding(c.vocab_size, c.word_dim, name="embed")(input_ids)
    words = bidirectional_gru(x, mask, c.embed_size, c.num_layers)
    pooled, _ = GPO(name="gpool")(words, mask)
    return pooled if c.no_txtnorm else l2norm(pooled, eps=EPS)


class VseInfty(RegionWordModel):
  """VSE∞: reps `{"embedding": (B, E)}` on both sides, scores their dot products (their
  `get_sim`); `__call__(batch, train)` is the (B, B) matrix their ContrastiveLoss takes."""
  spec = spec
  config: VseInftyConfig

  def setup(self):
    self.img_enc = ImageEncoder(self.config)
    self.txt_enc = (BertTextEncoder(self.config) if self.config.text_encoder == "bert"
                    else BiGruTextEncoder(self.config))

  def encode_images(self, batch, train: bool = False):
    regions, mask = region_inputs(batch, self.config.img_dim)
    return {"embedding": self.img_enc(regions, mask, train)}

  def encode_texts(self, batch, train: bool = False):
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = (ids != 0) if mask is None else mask.astype(bool)
    return {"embedding": self.txt_enc(ids, mask, train)}

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    return jnp.matmul(image_reps["embedding"], text_reps["embedding"].T,
                      preferred_element_type=jnp.float32)

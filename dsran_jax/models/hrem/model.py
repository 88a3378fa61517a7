"""HREM's encoders (Fu et al., CVPR 2023; CrossmodalGroup/HREM lib/encoders.py,
lib/mlp.py) as a `MatchingModel`: one unit vector per image and per caption, scored by a
dot product. The instance-level relation module is part of the training objective
(`objective.py`), not of the model: their evaluation never runs it.

- Image (`EncoderImageAggr`): `FC_MLP` = fc(x) + MLP(x) (Linear -> BatchNorm1d -> ReLU ->
  Linear, every Linear Xavier-uniform with bias 0) per region -> features f.
- Text (`EncoderText_BERT`): BERT (attention mask `ids != 0`) -> Linear(hidden, E) per
  token -> features f.
- Both: r = max-2 pool of f over the real items (per dimension, the mean of the two
  largest values; the one value of a single item); a = mean over the real items of one
  torch TransformerEncoderLayer(E, nhead, ff E, dropout) with a key padding mask;
  embedding = l2norm(w r + (1 - w) a), w = `residual_weight`.

Their `maxk_pool1d_var` lowers `k` for good once an item of the batch has fewer than
two items (`k = min(k, length)` inside the loop): later items of that batch then pool
their single largest value. Only a caption or image of one item triggers it (never in
their data: captions have [CLS] and [SEP]); here every item pools min(2, its length).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.base import (RegionWordModel, embedding_scores, region_inputs,
                                          text_inputs)
from dsran_jax.models.common.layers import Linear, l2norm, masked_mean
from dsran_jax.models.common.transformer import TorchEncoder, padding_bias
from dsran_jax.models.common.vse import RegionMLP, bert_words, config_fields
from dsran_jax.models.hrem import config as spec

EPS = 1e-8  # their l2norm: x / (||x|| + 1e-8)


class HremConfig(config_fields(spec.OPTIONS, "HremConfigFields")):
  """Hashable HREM description: the shared widths, every `config.model.hrem` option
  that shapes the Module, and the text encoder's `BertConfig`; built by `hrem.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.bert is None:
      raise ValueError("HREM needs a BertConfig (model.hrem.bert_path or bert_random_init)")
    if self.embed_size % self.nhead:
      raise ValueError(f"embed_size={self.embed_size} is not divisible by nhead={self.nhead}")


def max2_pool(x, mask):
  """Per dimension, the mean of the two largest values of x (B, N, C) over the real
  items (`mask` (B, N)); the largest alone for one item, 0 for none."""
  n = jnp.sum(mask, axis=1)[:, None]
  vals = jnp.where(mask[..., None], x, -jnp.inf)
  top = jax.lax.top_k(jnp.swapaxes(vals, 1, 2), 2)[0]  # (B, C, 2)
  first = jnp.where(n >= 1, top[..., 0], 0.0)
  second = jnp.where(n >= 2, top[..., 1], 0.0)
  return jnp.where(n >= 2, (first + second) / 2, first)


class Aggregate(nn.Module):
  """Their pooling of per-item features f (B, N, E): w max2(f) + (1 - w) mean(encoder
  layer(f)), then l2norm unless `no_norm`. Returns (embedding, pooled before the norm)."""
  config: "HremConfig"
  no_norm: bool

  @nn.compact
  def __call__(self, features, mask, train: bool):
    c = self.config
    residual = max2_pool(features, mask)
    h = TorchEncoder(1, c.nhead, c.embed_size, c.dropout, name="aggr")(
        features, padding_bias(mask), train)
    pooled = c.residual_weight * residual + (1 - c.residual_weight) * masked_mean(h, mask)
    return (pooled if self.no_norm else l2norm(pooled, eps=EPS)), pooled


class FcMlp(nn.Module):
  """Their `FC_MLP(img_dim, E/2, E, 2, bn=True)`: fc(x) + MLP(x), Xavier-initialised."""
  embed_size: int

  @nn.compact
  def __call__(self, x, mask, train: bool):
    fc = Linear(self.embed_size, init="xavier", name="fc")(x)
    return fc + RegionMLP(self.embed_size // 2, self.embed_size, init="xavier",
                          name="mlp")(x, mask, train)


class ImageEncoder(nn.Module):
  """EncoderImageAggr: (B, R, img_dim) + mask -> {embedding, pooled, features, mask}."""
  config: HremConfig

  @nn.compact
  def __call__(self, regions, mask, train: bool):
    c = self.config
    x = jnp.where(mask[..., None], regions.astype(jnp.float32), 0.0)  # their zero padding
    features = FcMlp(c.embed_size, name="fc")(x, mask, train)
    emb, pooled = Aggregate(c, c.no_imgnorm, name="pool")(features, mask, train)
    return {"embedding": emb, "pooled": pooled, "features": features, "mask": mask}


class TextEncoder(nn.Module):
  """EncoderText_BERT: ids (B, L) + mask -> {embedding, pooled, features, mask}."""
  config: HremConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    c = self.config
    features = bert_words(input_ids, mask, c.bert, c.embed_size, train)
    emb, pooled = Aggregate(c, c.no_txtnorm, name="pool")(features, mask, train)
    return {"embedding": emb, "pooled": pooled, "features": features, "mask": mask}


class Hrem(RegionWordModel):
  """HREM: reps `{"embedding": (B, E)}` on both sides, scored by their dot products;
  `training_outputs(batch)` adds what the GraphLoss objective reads (the embeddings
  before the norm, the per-item features before pooling and their masks)."""
  spec = spec
  config: HremConfig

  def setup(self):
    self.img_enc = ImageEncoder(self.config)
    self.txt_enc = TextEncoder(self.config)

  def _image(self, batch, train):
    regions, mask = region_inputs(batch, self.config.img_dim)
    return self.img_enc(regions, mask, train)

  def _text(self, batch, train):
    return self.txt_enc(*text_inputs(batch), train)

  def encode_images(self, batch, train: bool = False):
    return {"embedding": self._image(batch, train)["embedding"]}

  def encode_texts(self, batch, train: bool = False):
    return {"embedding": self._text(batch, train)["embedding"]}

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    return embedding_scores(image_reps, text_reps)

  def training_outputs(self, batch, train: bool = True):
    """{"image": ..., "text": ...}, each {"embedding", "pooled", "features", "mask"}
    (their `graph=True` encoder outputs), for the training objective."""
    return {"image": self._image(batch, train), "text": self._text(batch, train)}

"""VSE∞ (Chen et al., CVPR 2021; woodfrog/vse_infty lib/encoders.py), the precomputed-
region build, as a `MatchingModel`: one unit vector per image and per caption, scored
by a dot product.

- Image (`EncoderImageAggr`): fc (Xavier-uniform, bias 0) of the regions, plus for
  `precomp_enc_type="basic"` a two-layer MLP residual (Linear -> BatchNorm1d -> ReLU ->
  Linear), GPO over the regions, l2norm.
- Text, BERT build (`master`): BERT (attention mask `ids != 0`) -> Linear(hidden, embed)
  -> GPO over the tokens ([CLS] and [SEP] included) -> l2norm.
- Text, BiGRU build (branch `bigru`): Embedding U(-0.1, 0.1) with one extra row (their
  `<mask>`, a parameter of its own here) -> bidirectional GRU, the last layer's halves
  averaged -> GPO -> l2norm.

The per-item parts (the region MLP, BERT + Linear, the BiGRU) are the shared blocks of
`models/common/vse.py`, which the models built on VSE∞'s code reuse.
"""
import flax.linen as nn
import jax.numpy as jnp

from dsran_jax.models.common.base import (RegionWordModel, embedding_scores, region_inputs,
                                          text_inputs)
from dsran_jax.models.common.gpo import GPO
from dsran_jax.models.common.layers import Linear, l2norm
from dsran_jax.models.common.vse import (MaskedWordEmbedding, RegionMLP, bert_words,
                                         bidirectional_gru, check_text_encoder,
                                         config_fields)
from dsran_jax.models.vse_infty import config as spec

EPS = 1e-8  # their l2norm: x / (||x|| + 1e-8)


class VseInftyConfig(config_fields(spec.OPTIONS, "VseInftyConfigFields")):
  """Hashable VSE∞ description: the shared widths, every `config.model.vse_infty` option
  that shapes the Module, and the BERT build's `BertConfig`; built by `vse_infty.build`."""

  def __post_init__(self):
    super().__post_init__()
    check_text_encoder(self, "VSE∞", "vse_infty")


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


class BertTextEncoder(nn.Module):
  """EncoderText of `master`: BERT -> Linear(hidden, E) -> GPO -> l2norm."""
  config: VseInftyConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    c = self.config
    words = bert_words(input_ids, mask, c.bert, c.embed_size, train)
    pooled, _ = GPO(name="gpool")(words, mask)
    return pooled if c.no_txtnorm else l2norm(pooled, eps=EPS)


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
    return {"embedding": self.img_enc(*region_inputs(batch, self.config.img_dim), train)}

  def encode_texts(self, batch, train: bool = False):
    ids, mask = text_inputs(batch)
    return {"embedding": self.txt_enc(ids, mask, train)}

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    return embedding_scores(image_reps, text_reps)

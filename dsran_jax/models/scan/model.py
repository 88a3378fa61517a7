"""SCAN (Lee et al., ECCV 2018): region and word encoders plus stacked cross attention
(kuanghuei/SCAN model.py), as a `MatchingModel`.

Reps are token-level: images `{"regions": (B, k, E), "region_mask": (B, k)}`, captions
`{"words": (B, L, E), "word_mask": (B, L)}`; all the cross-modal work happens in `score`
(common/cross_attention.py), so evaluation can tile a gallery freely.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common import cross_attention as xattn
from dsran_jax.models.common.base import RegionWordModel, region_inputs, text_inputs
from dsran_jax.models.common.layers import Linear, dense, l2norm
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.common.text import GRU
from dsran_jax.models.scan import config as spec

EPS = 1e-8  # SCAN's l2norm adds 1e-8 to the norm


class ScanConfig(spec.OPTIONS.dataclass("ScanConfigFields", head=WIDTHS)):
  """Hashable SCAN description: the shared widths and every `config.model.scan` option
  (fields, defaults and rules from `scan.config.OPTIONS`); built by `scan.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.vocab_size <= 0:
      raise ValueError(f"SCAN needs a word vocabulary: vocab_size={self.vocab_size}")


class WeightNormLinear(nn.Module):
  """`weight_norm(nn.Linear, dim=None)`: kernel = g * v / ||v||_F, one scalar g.

  Initialised like PyTorch's nn.Linear (SCAN does not re-initialise this encoder):
  v and bias U(+-1/sqrt(fan_in)), g = ||v||_F.
  """
  features: int

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    bound = 1.0 / fan_in ** 0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    v = self.param("v", uniform, (fan_in, self.features))
    g = self.param("g", lambda key: jnp.sqrt(jnp.sum(jnp.square(v))))
    bias = self.param("bias", uniform, (self.features,))
    kernel = g * v / jnp.sqrt(jnp.sum(jnp.square(v)))
    return dense(x, kernel, bias, jnp.float32)


class ScanImageEncoder(nn.Module):
  """EncoderImagePrecomp: one Linear (Xavier-uniform, bias 0) from the region features to
  the joint space, then l2norm per region (unless no_imgnorm); padded regions -> 0."""
  config: ScanConfig

  @nn.compact
  def __call__(self, regions, region_mask):
    c = self.config
    if c.precomp_enc_type == "weight_norm":
      x = WeightNormLinear(c.embed_size, name="fc")(regions)
    else:
      x = Linear(c.embed_size, init="xavier", name="fc")(regions)
    if not c.no_imgnorm:
      x = l2norm(x, eps=EPS)
    # Zero padded regions: their bias would otherwise make them look like real ones to
    # anything that ignores the mask (they are masked in `score` anyway).
    return jnp.where(region_mask[..., None], x, 0.0)


class ScanTextEncoder(nn.Module):
  """EncoderText: Embedding U(-0.1, 0.1) -> `num_layers` GRU layers (bi_gru: each layer
  runs both ways and feeds the next the concatenated halves, as nn.GRU does) -> the
  last layer's halves averaged -> l2norm per word (unless no_txtnorm).

  Parameter paths follow `common.text.recurrent_tokens` for the first layer (`embed`,
  `gru`, `gru_reverse`); layer n > 0 is `gru_l{n}` / `gru_l{n}_reverse`.
  """
  config: ScanConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    c = self.config
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -0.1, 0.1)
    x = nn.Embed(c.vocab_size, c.word_dim, embedding_init=uniform, name="embed")(input_ids)
    mask = attention_mask.astype(bool)
    for layer in range(c.num_layers):
      name = "gru" if layer == 0 else f"gru_l{layer}"
      fwd = GRU(c.embed_size, name=name)(x, mask)
      if not c.bi_gru:
        x = fwd
        continue
      bwd = GRU(c.embed_size, reverse=True, name=f"{name}_reverse")(x, mask)
      x = jnp.concatenate([fwd, bwd], -1) if layer < c.num_layers - 1 else (fwd + bwd) / 2
    if not c.no_txtnorm:
      x = l2norm(x, eps=EPS)
    return x  # exactly zero past each caption's length (GRU outputs 0 there)


class SCAN(RegionWordModel):
  """Stacked Cross Attention Network, t2i or i2t, with SCAN's aggregations.

  `__call__(batch, train)` is `score(encode_images(batch), encode_texts(batch))`: the
  (B, B) matrix SCAN's ContrastiveLoss builds with xattn_score_t2i / _i2t.
  """
  spec = spec
  config: ScanConfig

  def setup(self):
    self.img_enc = ScanImageEncoder(self.config)
    self.txt_enc = ScanTextEncoder(self.config)

  def encode_images(self, batch, train: bool = False):
    del train  # SCAN has no dropout or batch norm
    regions, mask = region_inputs(batch, self.config.img_dim)
    return {"regions": self.img_enc(regions, mask), "region_mask": mask}

  def encode_texts(self, batch, train: bool = False):
    del train
    ids, mask = text_inputs(batch)
    return {"words": self.txt_enc(ids, mask), "word_mask": mask}

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    c = self.config
    return xattn.pairwise_xattn_scores(
        image_reps["regions"], image_reps["region_mask"], text_reps["words"],
        text_reps["word_mask"], max_elements=c.max_block_elements or None,
        direction=c.cross_attn, lambda_softmax=c.lambda_softmax, agg_func=c.agg_func,
        lambda_lse=c.lambda_lse, norm=c.raw_feature_norm)

"""SGRAF (Diao et al., AAAI 2021; Paranioar/SGRAF model.py) as a `MatchingModel`:
region and word encoders, the per-item self-attention globals, and the SGR or SAF
similarity head (`similarity.py`).

Reps: images `{"regions": (B, k, d), "region_mask": (B, k), "global": (B, d)}`,
captions `{"words": (B, L, d), "word_mask": (B, L), "global": (B, d)}`. Everything that
depends on one item only (encoders, VisualSA, TextSA) is computed in `encode_*`, once
per item; `score` runs the per-pair head over the whole tile at once.

Parameter paths mirror their state dicts (`model = [img_enc, txt_enc, sim_enc]`):
`img_enc/fc`, `txt_enc/{embed,gru,gru_reverse}`, `sim_enc/{v_global_w,t_global_w,
sim_tranloc_w,sim_tranglo_w,sim_eval_w,SGR_module_<i>,SAF_module}`.
"""
import flax.linen as nn
import jax.numpy as jnp

from dsran_jax.models.sgraf import similarity as sim
from dsran_jax.models.common.base import RegionWordModel, region_inputs, text_inputs
from dsran_jax.models.common.layers import Linear, l2norm, masked_mean
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.common.text import recurrent_tokens
from dsran_jax.models.sgraf import config as spec


class SgrafConfig(spec.OPTIONS.dataclass(
    "SgrafConfigFields", head=WIDTHS,
    tail=(("dtype", str, "float32"), ("ext", sim.Extensions, sim.Extensions())))):
  """Hashable SGRAF description: the shared widths, every `config.model.sgraf` option
  (fields, defaults and rules from `sgraf.config.OPTIONS`), the compute `dtype` and
  `ext`, KIDRR's per-pair modules (SGRAF itself always leaves them off); built by
  `sgraf.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.vocab_size <= 0:
      raise ValueError(f"SGRAF needs a word vocabulary: vocab_size={self.vocab_size}")

  @property
  def reasoning_steps(self) -> int:
    return self.sgr_step if self.module == "SGR" else self.ext.saf_steps

  def pair_options(self) -> sim.PairOptions:
    return sim.PairOptions(head=self.module, lambda_softmax=self.lambda_softmax,
                           max_block_elements=self.max_block_elements,
                           length_bucket=self.length_bucket, dtype=self.dtype, ext=self.ext)


class SgrafImageEncoder(nn.Module):
  """EncoderImage: Linear (Xavier-uniform, bias 0) then l2norm (unless no_imgnorm);
  padded regions -> 0."""
  config: SgrafConfig

  @nn.compact
  def __call__(self, regions, region_mask):
    x = Linear(self.config.embed_size, init="xavier", name="fc")(regions)
    if not self.config.no_imgnorm:
      x = l2norm(x, eps=sim.EPS)
    return jnp.where(region_mask[..., None], x, 0.0)


class SgrafTextEncoder(nn.Module):
  """EncoderText: Embedding U(-0.1, 0.1) -> Dropout(0.4) -> (Bi)GRU over the real words
  (halves averaged) -> l2norm (unless no_txtnorm); exactly 0 past each length."""
  config: SgrafConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    c = self.config
    x = recurrent_tokens(input_ids, attention_mask, train, vocab_size=c.vocab_size,
                         word_dim=c.word_dim, hidden_size=c.embed_size,
                         bidirectional=c.bi_gru, embed_dropout=c.embed_dropout,
                         embed_init="uniform")
    if not c.no_txtnorm:
      x = l2norm(x, eps=sim.EPS)
    return jnp.where(attention_mask.astype(bool)[..., None], x, 0.0)


class SimEncoder(nn.Module):
  """EncoderSimilarity: VisualSA / TextSA (per item) and the pair head's weights."""
  config: SgrafConfig

  def setup(self):
    c = self.config
    d, s = c.embed_size, c.sim_dim
    self.v_global_w = sim.VisualSA(d, c.sa_dropout, c.num_regions, c.reference_bn)
    self.t_global_w = sim.TextSA(d, c.sa_dropout)
    self.sim_tranloc_w = sim.DenseParams(d, s)
    self.sim_tranglo_w = sim.DenseParams(d, s)
    self.sim_eval_w = sim.DenseParams(s, 1)
    # Edge blending starts at the second step, so the first step has no gate.
    self.SGR_module = [sim.GraphParams(s, c.ext.blend if t else "none")
                       for t in range(c.reasoning_steps)]
    if c.module == "SAF":
      self.SAF_module = sim.FiltrationParams(s)
    if c.ext.i2t:
      self.sim_tranloc_i2t_w = sim.DenseParams(d, s)
    if c.ext.global_local:
      self.sim_glo_v_w = sim.DenseParams(d, s)
      self.sim_glo_t_w = sim.DenseParams(d, s)

  def image_global(self, regions, region_mask, train: bool):
    """v* = VisualSA(V, mean_r V) over the real regions."""
    return self.v_global_w(regions, region_mask, masked_mean(regions, region_mask), train)

  def text_global(self, words, word_mask, train: bool):
    """e* = TextSA(E, mean_t E) over the real words."""
    return self.t_global_w(words, word_mask, masked_mean(words, word_mask), train)

  def head_arrays(self) -> dict:
    """The per-pair head's parameter arrays, as `similarity.tile_scores` reads them."""
    c = self.config
    p = {"loc": self.sim_tranloc_w.arrays(), "glo": self.sim_tranglo_w.arrays(),
         "eval": self.sim_eval_w.arrays(), "sgr": [g.arrays() for g in self.SGR_module]}
    if c.module == "SAF":
      p["saf"] = self.SAF_module.arrays()
    if c.ext.i2t:
      p["i2t"] = self.sim_tranloc_i2t_w.arrays()
    if c.ext.global_local:
      p["glv"], p["glt"] = self.sim_glo_v_w.arrays(), self.sim_glo_t_w.arrays()
    return p

  def pair_scores(self, image_reps, text_reps, train: bool):
    c = self.config
    scores, stats = sim.tile_scores(self.head_arrays(), image_reps, text_reps,
                                    c.pair_options(), train)
    if train and c.module == "SAF" and not self.is_initializing():
      bn = self.SAF_module.bn
      mean, var = sim.running_stats_after_captions(bn.mean.value[0], bn.var.value[0], stats)
      bn.mean.value = mean[None]
      bn.var.value = var[None]
    return scores


class SGRAF(RegionWordModel):
  """Similarity Graph Reasoning and Attention Filtration, SGR or SAF head.

  `__call__(batch, train)` is `score(encode_images(batch), encode_texts(batch))`: the
  (B, B) matrix their `forward_sim` builds for the contrastive loss.
  """
  spec = spec
  config: SgrafConfig

  def setup(self):
    self.img_enc = SgrafImageEncoder(self.config)
    self.txt_enc = SgrafTextEncoder(self.config)
    self.sim_enc = SimEncoder(self.config)

  def _regions(self, batch):
    """Region features and mask, padded with masked slots up to the slot BatchNorm's
    size (a batch never has more regions than it)."""
    c = self.config
    regions, mask = region_inputs(batch, c.img_dim)
    if mask.shape != regions.shape[:2]:
      raise ValueError(f"region_mask: expected {regions.shape[:2]}, got {tuple(mask.shape)}")
    if c.reference_bn:
      n = regions.shape[1]
      if n > c.num_regions:
        raise ValueError(f"regions: {n} per image, but the VisualSA slot BatchNorm has "
                         f"config.model.sgraf.num_regions={c.num_regions} slots")
      if n < c.num_regions:
        extra = c.num_regions - n
        regions = jnp.pad(regions, ((0, 0), (0, extra), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, extra)))
    return regions, mask

  def encode_images(self, batch, train: bool = False):
    regions, mask = self._regions(batch)
    v = self.img_enc(regions, mask)
    return {"regions": v, "region_mask": mask,
            "global": self.sim_enc.image_global(v, mask, train)}

  def encode_texts(self, batch, train: bool = False):
    ids, mask = text_inputs(batch)
    e = self.txt_enc(ids, mask, train)
    return {"words": e, "word_mask": mask, "global": self.sim_enc.text_global(e, mask, train)}

  def score(self, image_reps, text_reps, train: bool = False):
    return self.sim_enc.pair_scores(image_reps, text_reps, train)

"""MLASM (ICANN 2022; xiaohu306/MLASM @ 77e6f58, the class `JZK`), as a `MatchingModel`.

The authors' model, in their notation (docs/models/mlasm.md):

    V   = l2n(fc_region(regions))                      (k, E)  region_enc
    E   = l2n(GRU(Dropout_0.1(embed(ids))))            (L, E)  word_enc, unidirectional
    v_g = fc(l2n(global_feat))                         (E,)    img_enc, global_feat = the
                                                               pooled ResNet-152 feature
    t2i: c_t = sum_r softmax_r(9 S'_rt) v_r,  s_t2i = mean_t cos(e_t, c_t)
    i2t: u_r = sum_t softmax_t(4 S''_rt) e_t, s_i2t = mean_r cos(v_r, u_r)
         (SCAN's clipped_l2norm attention both ways, S = V E^T)
    S_local  = (s_t2i + s_i2t) / 2
    v_l = mean_t c_t,  t_l = mean_r u_r                        (per pair!)
    img_emb = l2n(Fusion(v_g, fc_attn_i(v_l)))   Fusion(a, b) = t a + (1 - t) b,
                                                  t = sigmoid(gate0([a; b]))
    cap_emb = l2n(fc_text(t_l))
    S = ratio S_local + (1 - ratio) img_emb . cap_emb

`fc_attn_i` and `fusion.gate0` are never trained (not in their optimizer; `frozen_paths`).

Global modes (`model.mlasm.global_mode`)
----------------------------------------
v_l and t_l belong to a *pair*. The authors keep only the batch diagonal: image i's
global vector is conditioned on caption i, caption j's on image j, and at evaluation
that is each item's ground-truth partner (`reference` mode, reproduced here for parity).

- "pairwise" (default): `score` computes the global vectors of every pair (i, j) from the
  pair's own attention weights, so pair (i, j) depends on image i and caption j only.
  Every map after the attention is affine, and the averaged attention weights of one
  query sum to 1, so with abar_ir = mean_t a_tr (t2i) and bbar_jt = mean_r b_rt (i2t):

      fc_attn_i(v_l)   = sum_r abar_r P_r,      P_r = fc_attn_i(v_r)       (per region)
      gate0([v_g; .])  = g0 + sum_r abar_r Q_r, Q_r = P_r W_g2, g0 = W_g1 v_g + b_g
      fc_text(t_l)     = sum_t bbar_t T_t,      T_t = fc_text(e_t)         (per word)

  P, Q, g0 (per image) and T (per caption) are computed once in `encode_*`; a pair costs
  three weighted sums of size (k or L) x E plus O(E) elementwise work, next to SCAN's
  k L E dot products.
- "reference": the authors' pair-conditioned global vectors. The training call uses the
  batch's diagonal partners (their ContrastiveLoss). For a gallery, `score` needs reps
  carrying each item's conditioned global embedding (`global_emb`), which
  `condition_on_partners` computes from row-aligned (image, caption) pairs; the
  evaluation scorer (`evaluation.ModelScorer`) runs it once over the ground-truth pairs
  of the evaluation layout (caption j describes image j // 5; image i keeps the
  embedding conditioned on caption 5 i, as their `img_embs[::5]`) when the model's
  `partner_conditioning` says it must. `score` on reps without them is an error.

Reps (leading dim B): images `{"regions" (B, k, E), "region_mask" (B, k), "global" (B, E)
= v_g}` plus, in pairwise mode, `"attn_proj"` P, `"gate_proj"` Q (B, k, E) and
`"gate_base"` g0 (B, E); captions `{"words" (B, L, E), "word_mask" (B, L)}` plus, in
pairwise mode, `"text_proj"` T (B, L, E); in reference mode, after the paired pre-pass,
both sides also carry `"global_emb"` (B, E).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common import cross_attention as xattn
from dsran_jax.models.common.base import RegionWordModel, region_inputs
from dsran_jax.models.common.layers import Linear, dense, l2norm, masked_mean
from dsran_jax.models.common.text import recurrent_tokens
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.mlasm import config as spec
from dsran_jax.models.mlasm.config import LAMBDA_I2T, LAMBDA_T2I

EPS = 1e-8          # their l2norm adds 1e-8 to the norm; cosine_similarity clamps at 1e-8
NORM = "clipped_l2norm"  # their func_attention: LeakyReLU(0.1), then l2 over the queries
HIGHEST = jax.lax.Precision.HIGHEST
PAIRWISE_LEAVES = ("attn_proj", "gate_proj", "gate_base")
# Floats per (I, captions, E) vector of a block of `pairwise_global` (16 MB: 32 captions at
# I = 128, E = 1024). Measured at that shape on the 2-core EPYC, global branch alone, CPU
# s: 2^18 0.30, 2^19 0.22, 1.5 x 2^20 0.17, 2^22 0.13, 2^24 0.29, whole tile 0.32.
GLOBAL_BLOCK_ELEMENTS = 1 << 22


class MlasmConfig(spec.OPTIONS.dataclass("MlasmConfigFields", head=WIDTHS)):
  """Hashable MLASM description: the shared widths and every `config.model.mlasm`
  option (fields, defaults and rules from `mlasm.config.OPTIONS`); built by
  `mlasm.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.vocab_size <= 0:
      raise ValueError(f"MLASM needs a word vocabulary: vocab_size={self.vocab_size}")

  @property
  def uses_global(self) -> bool:
    """Whether scores include the global branch (ratio < 1)."""
    return self.ratio < 1.0


def _sqrt(x):
  """sqrt with a finite gradient at 0 (padded rows are all zeros)."""
  return jnp.sqrt(jnp.maximum(x, 1e-30))


class Dense(nn.Module):
  """`nn.Linear(in_features, features)` whose kernel other methods can read (the
  pairwise mode folds the frozen layers into per-region projections).

  init "xavier": their `init_weights` (Xavier-uniform kernel, zero bias); "torch":
  PyTorch's default, U(+-1/sqrt(in_features)) for kernel and bias (their Fusion).
  """
  in_features: int
  features: int
  init: str = "xavier"

  def setup(self):
    shape = (self.in_features, self.features)
    if self.init == "xavier":
      k_init, b_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
    elif self.init == "torch":
      bound = 1.0 / self.in_features ** 0.5
      k_init = b_init = lambda key, s, dtype=jnp.float32: jax.random.uniform(
          key, s, dtype, -bound, bound)
    else:
      raise ValueError(f"unknown init {self.init!r}")
    self.kernel = self.param("kernel", k_init, shape, jnp.float32)
    self.bias = self.param("bias", b_init, (self.features,), jnp.float32)

  def __call__(self, x):
    return dense(x, self.kernel, self.bias, jnp.float32)


class Fusion(nn.Module):
  """Their `Fusion`: `t = sigmoid(gate0([a; b]))`, `t a + (1 - t) b` (fusion0 / fusion1
  exist in their module but are never called, so they are not kept here)."""
  features: int

  def setup(self):
    self.gate0 = Dense(2 * self.features, self.features, init="torch")

  def __call__(self, vec1, vec2):
    t = jax.nn.sigmoid(self.gate0(jnp.concatenate([vec1, vec2], -1)))
    return t * vec1 + (1 - t) * vec2

  def gate_parts(self):
    """(W_g1, W_g2, b_g): gate0([a; b]) = a W_g1 + b W_g2 + b_g."""
    k = self.gate0.kernel
    return k[:self.features], k[self.features:], self.gate0.bias


class ImageEncoder(nn.Module):
  """Their `EncoderImage` after its CNN: `fc` on the l2-normalised pooled feature, and
  the fusion of that global vector with `fc_attn_i` of the attended regions."""
  config: MlasmConfig

  def setup(self):
    c = self.config
    self.fc = Dense(c.global_dim, c.embed_size)
    self.fc_attn_i = Dense(c.embed_size, c.embed_size)
    self.fusion = Fusion(c.embed_size)

  def global_vector(self, global_feat):
    """v_g = fc(l2n(cnn(image))) from the pooled CNN feature (B, global_dim)."""
    return self.fc(l2norm(global_feat, eps=EPS))

  def __call__(self, v_g, v_l):
    """img_emb = l2n(Fusion(v_g, fc_attn_i(v_l))) for row-aligned (B, E) inputs."""
    return l2norm(self.fusion(v_g, self.fc_attn_i(v_l)), eps=EPS)

  def pairwise_terms(self, v_g, regions):
    """(P (B, k, E), Q (B, k, E), g0 (B, E)): see the module docstring."""
    p = self.fc_attn_i(regions)
    w1, w2, b = self.fusion.gate_parts()
    q = jnp.einsum("bre,ef->brf", p, w2, precision=HIGHEST)
    g0 = jnp.dot(v_g, w1, precision=HIGHEST) + b
    return p, q, g0


class CaptionEncoder(nn.Module):
  """Their `EncoderText`: `l2n(fc_text(t_l))` (its `sa`, never called, is not kept)."""
  config: MlasmConfig

  def setup(self):
    self.fc_text = Dense(self.config.embed_size, self.config.embed_size)

  def __call__(self, t_l):
    return l2norm(self.fc_text(t_l), eps=EPS)

  def project_words(self, words):
    """T_t = fc_text(e_t) per word (B, L, E)."""
    return self.fc_text(words)


class RegionEncoder(nn.Module):
  """Their `EncoderRegion`: Linear (Xavier, bias 0), l2norm; padded regions -> 0."""
  config: MlasmConfig

  @nn.compact
  def __call__(self, regions, region_mask):
    x = l2norm(Linear(self.config.embed_size, init="xavier", name="fc_region")(regions),
               eps=EPS)
    return jnp.where(region_mask[..., None], x, 0.0)


class WordEncoder(nn.Module):
  """Their `EncoderWord`: Embedding (PyTorch's N(0, 1); GloVe rows via
  `load_pretrained`), Dropout(0.1), unidirectional GRU over the real tokens, l2norm per
  token; exactly zero past each caption's length, as pad_packed_sequence leaves it."""
  config: MlasmConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    c = self.config
    x = recurrent_tokens(input_ids, attention_mask, train, vocab_size=c.vocab_size,
                         word_dim=c.word_dim, hidden_size=c.embed_size,
                         bidirectional=False, embed_dropout=c.embed_dropout,
                         embed_init="normal")
    return l2norm(x, eps=EPS)


# ------------------------------------------------------------------ tile computations


def local_alignment(regions, region_mask, words_t, word_mask, word_norm, word_gram, *,
                    pooled: bool = False, precision=HIGHEST):
  """Both SCAN directions of a block of images against every caption of the tile, from
  one region-word product, and (pooled) the attention averages of the global branch.

  Args:
    regions (c, k, E), region_mask (c, k) bool: a block of images.
    words_t (E, L J): the tile's words, `xattn.columns_minor(words)`; word_mask (J, L);
    word_norm (L, J): |e_t|; word_gram (L, L, J): `xattn.column_grams(words)`.

  Returns:
    (s_t2i (c, J), s_i2t (c, J)), the two mean-aggregated SCAN scores (0 for an item
    with no valid position), and with `pooled` also abar (c, k, J), the t2i weights of
    each region averaged over the caption's words, and bbar (c, J, L), the i2t weights of
    each word averaged over the image's regions.

  S is laid out (image, region, word, caption), the captions minor
  (`xattn.query_minor_products`): t2i attends over its rows (the regions), i2t over its
  columns (the words), and neither transposes it (docs/models/mlasm.md).
  """
  region_mask = region_mask.astype(bool)
  word_mask = word_mask.astype(bool)
  s = xattn.query_minor_products(regions, words_t, word_mask.shape[1], precision)
  rm = region_mask[:, :, None, None]                                    # (c, k, 1, 1)
  wm = word_mask.T[None, None]                                          # (1, 1, L, J)
  kw = dict(norm=NORM, precision=precision)
  # t2i: the words query, the regions are the context.
  gram_v = jnp.einsum("ird,isd->irs", regions, regions, precision=precision)
  r_t2i, a, za = xattn.attention_cosines(s, rm, wm, word_norm[None], gram_v,
                                         context_axis=1, lam=LAMBDA_T2I, **kw)
  s_t2i = xattn.aggregate(jnp.swapaxes(r_t2i, 1, 2), word_mask[None], "Mean")
  # i2t: the regions query, the words are the context.
  v_norm = _sqrt(jnp.sum(jnp.square(regions), -1))[:, :, None]          # (c, k, 1)
  r_i2t, b, zb = xattn.attention_cosines(s, wm, rm, v_norm, word_gram,
                                         context_axis=2, lam=LAMBDA_I2T, **kw)
  s_i2t = xattn.aggregate(jnp.swapaxes(r_i2t, 1, 2), region_mask[:, None, :], "Mean")
  nonempty = xattn.nonempty_pairs(region_mask, word_mask)
  s_t2i = jnp.where(nonempty, s_t2i, 0.0)
  s_i2t = jnp.where(nonempty, s_i2t, 0.0)
  if not pooled:
    return s_t2i, s_i2t
  n_words = jnp.sum(word_mask, -1).astype(jnp.float32)                  # (J,)
  n_regions = jnp.sum(region_mask, -1).astype(jnp.float32)              # (c,)
  abar = (jnp.sum(jnp.where(wm, a / za[:, None], 0.0), 2)
          / jnp.maximum(n_words, 1.0)[None, None, :])
  bbar = (jnp.sum(jnp.where(rm, b / zb[:, :, None], 0.0), 1)
          / jnp.maximum(n_regions, 1.0)[:, None, None])                # (c, L, J)
  return s_t2i, s_i2t, abar, jnp.swapaxes(bbar, 1, 2)


def tile_scores(image_reps, text_reps, *, ratio: float = 1.0, pairwise: bool = False,
                block_elements: int = xattn.BLOCK_ELEMENTS, precision=HIGHEST):
  """(I, J) `ratio S_local` of a tile, plus `(1 - ratio)` times the pairwise global
  scores with `pairwise`: images in cache-sized blocks (`xattn.map_item_blocks`), each
  against every caption transposed once per tile. The global branch runs once over the
  whole tile from the blocks' averaged weights: its per-caption products
  `(images, L) @ (L, E)` want all the tile's images, not a block's."""
  words, word_mask = text_reps["words"], text_reps["word_mask"].astype(bool)
  words_t = xattn.columns_minor(words)
  word_norm = _sqrt(jnp.sum(jnp.square(words), -1)).T                  # (L, J)
  word_gram = xattn.column_grams(words, precision)

  def block(img):
    out = local_alignment(img[0], img[1], words_t, word_mask, word_norm, word_gram,
                          pooled=pairwise, precision=precision)
    return (0.5 * out[0] + 0.5 * out[1],) + tuple(out[2:])

  size = xattn.context_block(image_reps["regions"].shape[1], word_mask.shape[1],
                             word_mask.shape[0], block_elements)
  out = xattn.map_item_blocks(block, (image_reps["regions"], image_reps["region_mask"]),
                              size)
  if not pairwise:
    return ratio * out[0]
  return ratio * out[0] + (1 - ratio) * pairwise_global(out[1], out[2], image_reps,
                                                        text_reps, precision)


def pairwise_global(abar, bbar, image_reps, text_reps, precision=HIGHEST,
                    block_elements: int = GLOBAL_BLOCK_ELEMENTS):
  """(I, J) global scores img_emb(i | j) . cap_emb(j | i) of every pair of a tile, from
  the attention averages of `local_alignment` (abar (I, k, J), bbar (I, J, L)) and the
  pairwise reps (module docstring).

  The captions go in blocks (`xattn.map_item_blocks`) of `block_elements` floats per
  (I, captions, E) vector: over a whole tile each of them is I J E floats (134 MB at
  128 x 256 and E = 1024), and the elementwise gate and the two l2 norms stream them from
  memory several times."""
  v_g, gate_base = image_reps["global"], image_reps["gate_base"]
  attn_proj, gate_proj = image_reps["attn_proj"], image_reps["gate_proj"]

  def block(args):
    ab, bb, text_proj = args                      # (j, I, k), (j, I, L), (j, L, E)
    vl = jnp.einsum("jir,ire->ije", ab, attn_proj, precision=precision)
    t = jax.nn.sigmoid(gate_base[:, None] + jnp.einsum("jir,ire->ije", ab, gate_proj,
                                                       precision=precision))
    img = l2norm(t * v_g[:, None] + (1 - t) * vl, eps=EPS)
    cap = l2norm(jnp.einsum("jit,jte->ije", bb, text_proj, precision=precision), eps=EPS)
    return jnp.sum(img * cap, -1).T               # (j, I)

  size = max(int(block_elements) // max(v_g.shape[0] * v_g.shape[1], 1), 1)
  return xattn.map_item_blocks(
      block, (jnp.transpose(abar, (2, 0, 1)), jnp.swapaxes(bbar, 0, 1),
              text_reps["text_proj"]), size).T


def caption_block(num_images: int, per_pair: int, max_elements: int) -> int:
  """Captions per block so that one (images, captions, per_pair) array holds at most
  `max_elements` floats (at least one caption)."""
  return max(int(max_elements) // max(num_images * per_pair, 1), 1)


def blocked_over_captions(fn, image_reps, text_reps, per_pair: int,
                          max_elements: Optional[int]):
  """`fn(image_reps, text_reps) -> (I, J)` over caption blocks (`xattn.map_item_blocks`:
  the last block is padded with masked captions, whose columns are dropped)."""
  if not max_elements:
    return fn(image_reps, text_reps)
  chunk = caption_block(image_reps["regions"].shape[0], per_pair, max_elements)
  return xattn.map_item_blocks(lambda t: fn(image_reps, t).T, text_reps, chunk).T


MISUSE = (
    "MLASM global_mode='reference' scores with global vectors conditioned on each item's "
    "ground-truth partner (the authors' evaluation), so `score` needs reps that carry "
    "them ('global_emb', from `condition_on_partners` over ground-truth (image, caption) "
    "pairs). Score through evaluation.ModelScorer / inference.Matcher.score on a gallery "
    "in the evaluation layout (5 captions per image, caption j describing image j // 5), "
    "or use global_mode='pairwise' (model.mlasm.global_mode in config.json) for any other "
    "gallery")


class MLASM(RegionWordModel):
  """MLASM: SCAN t2i + i2t (mean) plus the gated global branch; see the module docstring.

  `__call__(batch, train)` is the (B, B) matrix of their ContrastiveLoss: in pairwise
  mode `score(encode_images(batch), encode_texts(batch))`; in reference mode the global
  term is `img_emb(i | caption i) . cap_emb(j | image j)`, the batch's diagonal partners.
  """
  spec = spec
  config: MlasmConfig

  @property
  def input_dims(self):
    return {"img_dim": self.config.img_dim, "global_dim": self.config.global_dim}

  @property
  def pairwise(self) -> bool:
    return self.config.global_mode == "pairwise"

  @property
  def partner_conditioning(self) -> Optional[str]:
    """Why this model's reps need each item's ground-truth partner before `score` (the
    evaluation scorer's paired pre-pass), or None when they do not: only in reference
    mode with a global term (ratio < 1)."""
    if self.pairwise or not self.config.uses_global:
      return None
    return ("MLASM with model.mlasm.global_mode='reference' conditions each image's and "
            "caption's global vector on its ground-truth partner, as the authors' "
            "evaluation does; set model.mlasm.global_mode='pairwise' (in config.json) to "
            "score any other gallery")

  def setup(self):
    self.region_enc = RegionEncoder(self.config)
    self.word_enc = WordEncoder(self.config)
    self.img_enc = ImageEncoder(self.config)
    self.cap_enc = CaptionEncoder(self.config)

  # ----------------------------------------------------------------- encoders

  def encode_images(self, batch, train: bool = False):
    del train  # no dropout or batch norm on the image side
    c = self.config
    regions, mask = region_inputs(batch, c.img_dim)
    glob = batch["global_feat"]
    if glob.shape != (regions.shape[0], c.global_dim):
      raise ValueError(f"global_feat: expected ({regions.shape[0]}, {c.global_dim}) (the "
                       f"pooled ResNet feature, model.mlasm.global_dim={c.global_dim}), got "
                       f"{tuple(glob.shape)}")
    v = self.region_enc(regions, mask)
    v_g = self.img_enc.global_vector(glob.astype(jnp.float32))
    reps = {"regions": v, "region_mask": mask, "global": v_g}
    if self.pairwise:
      p, q, g0 = self.img_enc.pairwise_terms(v_g, v)
      reps.update(attn_proj=p, gate_proj=q, gate_base=g0)
    return reps

  def encode_texts(self, batch, train: bool = False):
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = (ids != 0) if mask is None else mask.astype(bool)
    words = self.word_enc(ids, mask, train)
    reps = {"words": words, "word_mask": mask}
    if self.pairwise:
      reps["text_proj"] = self.cap_enc.project_words(words)
    return reps

  # -------------------------------------------------------------- reference mode

  def condition_on_partners(self, image_reps, text_reps, train: bool = False):
    """The authors' pair-conditioned global embeddings of B row-aligned pairs (image
    b with caption b): `({"global_emb": img_emb (B, E)}, {"global_emb": cap_emb (B, E)})`,
    img_emb conditioned on its caption, cap_emb on its image (their diagonal
    `weiContext_i[i, i]` / `weiContext_t[i, i]`)."""
    del train
    regions, rmask = image_reps["regions"], image_reps["region_mask"].astype(bool)
    words, wmask = text_reps["words"], text_reps["word_mask"].astype(bool)
    if regions.shape[0] != words.shape[0]:
      raise ValueError(f"condition_on_partners pairs image b with caption b: got "
                       f"{regions.shape[0]} images and {words.shape[0]} captions")
    a = xattn.attend(words, regions, wmask, rmask, lam=LAMBDA_T2I, norm=NORM)  # (B, L, k)
    v_l = masked_mean(xattn.attended_context(a, regions), wmask)              # (B, E)
    b = xattn.attend(regions, words, rmask, wmask, lam=LAMBDA_I2T, norm=NORM)  # (B, k, L)
    t_l = masked_mean(xattn.attended_context(b, words), rmask)                # (B, E)
    return ({"global_emb": self.img_enc(image_reps["global"], v_l)},
            {"global_emb": self.cap_enc(t_l)})

  # ------------------------------------------------------------------- scoring

  def _local(self, image_reps, text_reps):
    return tile_scores(image_reps, text_reps)

  def _local_and_pairwise_global(self, image_reps, text_reps):
    return tile_scores(image_reps, text_reps, ratio=self.config.ratio, pairwise=True)

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    c = self.config
    k = image_reps["regions"].shape[1]
    n_words = text_reps["words"].shape[1]
    blocked = lambda fn, per_pair: blocked_over_captions(
        fn, image_reps, text_reps, per_pair, c.max_block_elements or None)
    if not c.uses_global:
      return blocked(self._local, k * n_words)
    if self.pairwise:
      missing = [n for n in PAIRWISE_LEAVES if n not in image_reps]
      if missing or "text_proj" not in text_reps:
        raise ValueError(f"MLASM pairwise score: reps lack {missing or ['text_proj']}; "
                         f"encode them with this model's encode_images / encode_texts")
      return blocked(self._local_and_pairwise_global, max(k * n_words, c.embed_size))
    if "global_emb" not in image_reps or "global_emb" not in text_reps:
      raise ValueError(MISUSE)
    s_glob = jnp.dot(image_reps["global_emb"], text_reps["global_emb"].T, precision=HIGHEST)
    return c.ratio * blocked(self._local, k * n_words) + (1 - c.ratio) * s_glob

  def __call__(self, batch, train: bool = False):
    img = self.encode_images(batch, train)
    txt = self.encode_texts(batch, train)
    if self.pairwise:
      return self.score(img, txt, train)
    # Reference: the batch's own pairs condition the global vectors (their forward_emb).
    # Called even at ratio 1, so that every parameter exists (XLA drops the unused work).
    gi, gt = self.condition_on_partners(img, txt)
    s_local = blocked_over_captions(self._local, img, txt,
                                    img["regions"].shape[1] * txt["words"].shape[1],
                                    self.config.max_block_elements or None)
    if not self.config.uses_global:
      return s_local
    r = self.config.ratio
    return r * s_local + (1 - r) * jnp.dot(gi["global_emb"], gt["global_emb"].T,
                                           precision=HIGHEST)

"""BSSAN-R: the reconstruction of BSSAN (Huang et al., IEEE TIP 2019) that
docs/models/bssan.md specifies, as a `MatchingModel`. Only the abstract is
public, so every equation below is a design choice; the switches are in config.py.

Encoders (per item):
    v_r = l2n(W_v f_r + b_v)             regions (O2W's objects; W2R's context by default)
    g_n = l2n(W_g f_n + b_g)             the 7x7 grid (W2R's context if w2r_visual="grid")
    x_t = Dropout(E[w_t])                word embeddings U(-0.1, 0.1), dropout lstm_dropout
    h_t = l2n(LSTM(x)_t)                 text-only (Bi)LSTM, PyTorch gates (i, f, g, o)
Below, C = {c_n} is W2R's context (regions or grid), O = {o_r} the regions.

W2R, decoupled (pair (i, j); words t of caption j, context n of image i):
    alpha_tn = softmax_n(lambda_w2r * (h_t W_b) . c_n)   over the valid context
    ctx_t    = sum_n alpha_tn c_n
    R_t      = cos(P_h h_t, P_c ctx_t)                   (P = Linear d->d; cosine_proj)
    S_W2R    = agg_t R_t                                 (Mean | LogSumExp)
W2R, coupled (the LSTM reads the attended context, so its states depend on the pair):
    h_0 = s_0 = 0;  for each valid t:
      alpha_tn = softmax_n(lambda_w2r * (l2n(h_{t-1}) W_b) . c_n),  ctx_t = sum alpha c
      (h_t, s_t) = LSTMCell([x_t; ctx_t], (h_{t-1}, s_{t-1}))   one (word_dim + d, 4H) kernel
      R_t = cos(P_h l2n(h_t), P_c ctx_t)
    S_W2R = agg_t R_t
O2W (regions r of image i over the words of caption j):
    beta_rt = softmax_t(lambda_o2w * (h_t W_o) . o_r)    over the valid words
    u_r     = sum_t beta_rt h_t
    R_r     = cos(Q_o o_r, Q_u u_r);   S_O2W = agg_r R_r
Fusion:  fixed  S = w S_W2R + (1 - w) S_O2W;   learned  w = sigmoid(theta);
         mlp    S = sigmoid(w_2 . ReLU(W_1 p + b_1) + b_2),
                p = [mean_t ctx_t; mean_t h_t; mean_r u_r; mean_r o_r; S_W2R; S_O2W]
                (coupled: the pair's h_t). Pooled features (docs/models/bssan.md) plus the two
                branch scores, so the cosine heads keep a gradient [INFERRED]

How a tile is scored without (I, J, L, d) intermediates: every map after an attention is
affine, so with the per-item projections precomputed in the encoders (W_b^T applied to
each h_t, P_c to each c_n, the W_1 slices to each item), `P_c ctx_t = sum_n alpha_tn
(P_c c_n)` (the weights sum to 1), its dot with P_h h_t is `sum_n alpha_tn (P_h h_t .
P_c c_n)`, and its squared norm `alpha_t^T G alpha_t` with the Gram matrix G of the
projected context. The decoupled pair cost is then two (I, n, J, L) contractions per
direction (logits and projected dots), as SCAN's fused t2i is one. The coupled recurrence
is a `lax.scan` over the words with the (I, J) pairs of a block batched in every step:
per pair and step it costs the query (H x d), the hidden (H x 4H) and the P_h (H x d)
matmuls; the context's share of the input gates, `W_c c_n`, is precomputed per image.

Padding never enters an attention, a normaliser, a mean or an LSTM step: masked softmaxes,
masked aggregations, frozen states on padded steps; a fully padded item scores 0 (finite).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.bssan import config as spec
from dsran_jax.models.common import cross_attention as xattn
from dsran_jax.models.common.base import RegionWordModel, region_inputs
from dsran_jax.models.common.layers import Dropout, Linear, l2norm, masked_mean
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.common.text import LSTM, lstm_update

EPS = 1e-8  # SCAN's l2norm / cosine eps
HIGHEST = jax.lax.Precision.HIGHEST
GRID_CELLS = 49


class BssanConfig(spec.OPTIONS.dataclass("BssanConfigFields", head=WIDTHS)):
  """Hashable BSSAN-R description: the shared widths and every `config.model.bssan`
  option (fields, defaults and rules from `bssan.config.OPTIONS`); built by
  `bssan.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.vocab_size <= 0:
      raise ValueError(f"BSSAN needs a word vocabulary: vocab_size={self.vocab_size}")
    if self.coupled and self.bi_lstm:
      raise ValueError("config.model.bssan.bi_lstm=True with w2r='coupled': the coupled "
                       "recurrence runs forward only")
    if self.fuse == "mlp" and self.directions != "both":
      raise ValueError(f"config.model.bssan.fuse='mlp' needs directions='both', got "
                       f"{self.directions!r}")
    if self.fuse == "learned" and not 0.0 < self.fuse_weight < 1.0:
      raise ValueError(f"config.model.bssan.fuse_weight={self.fuse_weight}: must be in "
                       f"(0, 1) for fuse='learned'")

  @property
  def use_w2r(self) -> bool:
    return self.directions in ("both", "w2r")

  @property
  def use_o2w(self) -> bool:
    return self.directions in ("both", "o2w")

  @property
  def coupled(self) -> bool:
    return self.use_w2r and self.w2r == "coupled"

  @property
  def use_grid(self) -> bool:
    return self.use_w2r and self.w2r_visual == "grid"

  @property
  def use_regions(self) -> bool:
    return self.use_o2w or not self.use_grid

  @property
  def text_lstm(self) -> bool:
    """Whether the text-only LSTM runs (O2W, or W2R decoupled)."""
    return self.use_o2w or (self.use_w2r and not self.coupled)

  @property
  def mlp(self) -> bool:
    return self.fuse == "mlp" and self.directions == "both"


# ----------------------------------------------------------------------- parameters


class Affine(nn.Module):
  """`x @ kernel (+ bias)` whose arrays are attributes, so `score` can hand them to the
  pure tile functions (inside `lax.map` / `lax.scan`, where no module may be called).

  init: "xavier" (uniform Xavier kernel, zero bias) or "identity" (a square I, zero bias).
  """
  in_features: int
  features: int
  init: str = "xavier"
  use_bias: bool = True

  def setup(self):
    if self.init == "identity":
      if self.in_features != self.features:
        raise ValueError(f"identity init of a {self.in_features} x {self.features} kernel")
      k_init = lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], dtype=dtype)
    elif self.init == "xavier":
      k_init = nn.initializers.xavier_uniform()
    else:
      raise ValueError(f"Affine init={self.init!r}: expected 'identity' or 'xavier'")
    self.kernel = self.param("kernel", k_init, (self.in_features, self.features))
    self.bias = (self.param("bias", nn.initializers.zeros, (self.features,))
                 if self.use_bias else jnp.zeros((self.features,), jnp.float32))

  def __call__(self, x):
    return _mm(x, self.kernel) + self.bias


class CoupledLSTMParams(nn.Module):
  """The coupled W2R LSTM's weights in torch.nn.LSTM(word_dim + d, H)'s layout: input
  rows [x_t ; ctx_t], gates (i, f, g, o), init U(+-1/sqrt(H))."""
  input_size: int
  hidden_size: int

  def setup(self):
    bound = 1.0 / self.hidden_size ** 0.5
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    g = 4 * self.hidden_size
    self.w_ih = self.param("w_ih", init, (self.input_size, g))
    self.b_ih = self.param("b_ih", init, (g,))
    self.w_hh = self.param("w_hh", init, (self.hidden_size, g))
    self.b_hh = self.param("b_hh", init, (g,))


def _mm(x, w):
  """x @ w over x's last axis at full fp32 precision."""
  return jnp.einsum("...a,ab->...b", x, w, precision=HIGHEST)


def _l2n(x):
  return l2norm(x, eps=EPS)


def _safe_sqrt(x):
  """sqrt with a finite gradient at 0 (padded rows are zeros)."""
  return jnp.sqrt(jnp.maximum(x, 1e-30))


def _masked_pool(weights, mask, axis: int):
  """Mean of attention `weights` over the valid positions `mask` (broadcastable) of
  `axis`: the pooled weights of the mean of the attended vectors."""
  mask = jnp.broadcast_to(mask, weights.shape)
  count = jnp.sum(mask.astype(jnp.float32), axis=axis)
  return jnp.sum(jnp.where(mask, weights, 0.0), axis=axis) / jnp.maximum(count, 1.0)


# ------------------------------------------------------------- pure tile functions


def _blocked_attention(rows, row_mask, rows_proj, columns, columns_proj, column_mask, *,
                       lam: float, agg: str, lambda_lse: float, pooled: bool,
                       block_elements: int):
  """(R, C) scores of every row item (the contexts) against every column item (the
  queries), each query position attending over the row's positions with the bilinear
  logits `lam rows . columns` and scored by `cos(Q columns_proj, sum alpha rows_proj)`,
  aggregated over the query positions; with `pooled` also the weights averaged over the
  valid query positions, (R, C, n).

  The rows go in cache-sized blocks (`xattn.map_item_blocks`); each block's logits and
  projected dots are two plain products against the columns transposed once per tile,
  laid out (row, n, m, column) as SCAN's (`xattn.attention_cosines`, no raw-feature
  norm)."""
  row_mask, column_mask = row_mask.astype(bool), column_mask.astype(bool)
  m_pos = column_mask.shape[1]
  columns_t = xattn.columns_minor(columns)
  proj_t = xattn.columns_minor(columns_proj)
  column_norm = _safe_sqrt(jnp.sum(jnp.square(columns_proj), -1)).T[None]  # (1, m, C)
  cm = column_mask.T[None, None]                                         # (1, 1, m, C)

  def block(args):
    ctx, mask, ctx_proj = args
    s = xattn.query_minor_products(ctx, columns_t, m_pos, HIGHEST)        # (c, n, m, C)
    dots = xattn.query_minor_products(ctx_proj, proj_t, m_pos, HIGHEST)
    gram = jnp.einsum("ind,imd->inm", ctx_proj, ctx_proj, precision=HIGHEST)
    r, e, z = xattn.attention_cosines(s, mask[:, :, None, None], cm, column_norm, gram,
                                      context_axis=1, lam=lam, norm="no_norm", dots=dots)
    scores = xattn.aggregate(jnp.swapaxes(r, 1, 2), column_mask[None], agg, lambda_lse)
    scores = jnp.where(xattn.nonempty_pairs(mask, column_mask), scores, 0.0)
    if not pooled:
      return scores
    return scores, jnp.swapaxes(_masked_pool(e / z[:, None], cm, axis=2), 1, 2)

  # Two products of S's size per block: half of SCAN's block keeps them both cached.
  size = xattn.context_block(row_mask.shape[1], m_pos, column_mask.shape[0],
                             block_elements // 2)
  return xattn.map_item_blocks(block, (rows, row_mask, rows_proj), size)


def w2r_decoupled(ctx, ctx_mask, ctx_proj, queries, words_proj, word_mask, *, lam: float,
                  agg: str, lambda_lse: float, pooled: bool = False,
                  block_elements: int = xattn.BLOCK_ELEMENTS):
  """(I, J) decoupled W2R scores of a tile (`_blocked_attention`, images as the rows).

  Args:
    ctx: (I, n, d) W2R context (regions or grid cells); ctx_mask (I, n) bool.
    ctx_proj: (I, n, d) `P_c c_n` (or `ctx` itself without projections).
    queries: (J, L, d) `h_t W_b`; words_proj (J, L, d) `P_h h_t` (or h_t); word_mask (J, L).
    lam, agg, lambda_lse: temperature and aggregation over the words.
    pooled: also return the attention weights averaged over the valid words, (I, J, n)
      (`mean_t ctx_t = sum_n pooled_n c_n`).
  """
  return _blocked_attention(ctx, ctx_mask, ctx_proj, queries, words_proj, word_mask,
                            lam=lam, agg=agg, lambda_lse=lambda_lse, pooled=pooled,
                            block_elements=block_elements)


def o2w(regions, region_mask, regions_proj, keys, words_proj, word_mask, *, lam: float,
        agg: str, lambda_lse: float, pooled: bool = False,
        block_elements: int = xattn.BLOCK_ELEMENTS):
  """(I, J) O2W scores of a tile: every region attends to the caption's words
  (`_blocked_attention`, captions as the rows).

  Args:
    regions: (I, k, d) o_r; region_mask (I, k); regions_proj (I, k, d) `Q_o o_r` (or o_r).
    keys: (J, L, d) `h_t W_o`; words_proj (J, L, d) `Q_u h_t + b` (or h_t); word_mask.
    pooled: also return the attention weights averaged over the valid regions, (I, J, L)
      (`mean_r u_r = sum_t pooled_t h_t`).
  """
  out = _blocked_attention(keys, word_mask, words_proj, regions, regions_proj, region_mask,
                           lam=lam, agg=agg, lambda_lse=lambda_lse, pooled=pooled,
                           block_elements=block_elements)
  if not pooled:
    return out.T
  return out[0].T, jnp.swapaxes(out[1], 0, 1)


def w2r_coupled(ctx, ctx_mask, ctx_proj, ctx_gates, word_gates, word_mask, *, w_b, w_hh,
                b_hh, proj_h=None, lam: float, txt_norm: bool, agg: str, lambda_lse: float,
                pooled: bool = False, unroll: int = 1):
  """(I, J) coupled W2R scores of a tile: one LSTM per pair, all pairs in each step.

  Args:
    ctx: (I, n, d) context; ctx_mask (I, n); ctx_proj (I, n, d) `P_c c_n` (or ctx).
    ctx_gates: (I, n, 4H) the context rows of the LSTM input kernel applied to c_n.
    word_gates: (J, L, 4H) the word rows applied to x_t, plus b_ih; word_mask (J, L).
    w_b: (H, d) bilinear matrix; w_hh (H, 4H), b_hh (4H,): the LSTM's hidden weights.
    proj_h: (kernel (H, d), bias (d,)) of P_h, or None (no projection).
    pooled: also return (mean_t l2n(h_t) (I, J, H), mean_t alpha_t (I, J, n)).
    unroll: steps per loop iteration (`lax.scan`'s unroll).
  """
  ctx_mask, word_mask = ctx_mask.astype(bool), word_mask.astype(bool)
  n_img, n_cap = ctx.shape[0], word_gates.shape[0]
  hidden = w_hh.shape[0]

  def step(carry, inputs):
    h, cell, h_sum, a_sum = carry
    g_x, m = inputs                                                     # (J, 4H), (J,)
    query = _mm(_l2n(h) if txt_norm else h, w_b)                        # (I, J, d)
    logits = lam * jnp.einsum("ijd,ind->ijn", query, ctx, precision=HIGHEST)
    alpha = xattn.masked_softmax(logits, ctx_mask[:, None, :], axis=-1)
    gates = (g_x[None] + jnp.einsum("ijn,ing->ijg", alpha, ctx_gates, precision=HIGHEST)
             + _mm(h, w_hh) + b_hh)
    h_new, cell_new = lstm_update(gates, cell)
    keep = m[None, :, None]
    # A padded step freezes the pair's state, as packing leaves it.
    h_new, cell_new = jnp.where(keep, h_new, h), jnp.where(keep, cell_new, cell)
    h_out = _l2n(h_new) if txt_norm else h_new
    ph = h_out if proj_h is None else _mm(h_out, proj_h[0]) + proj_h[1]
    pc = jnp.einsum("ijn,ind->ijd", alpha, ctx_proj, precision=HIGHEST)
    r = xattn.cosine(ph, pc)
    if pooled:
      h_sum = h_sum + jnp.where(keep, h_out, 0.0)
      a_sum = a_sum + jnp.where(keep, alpha, 0.0)
    return (h_new, cell_new, h_sum, a_sum), jnp.where(m[None], r, 0.0)

  zeros = jnp.zeros((n_img, n_cap, hidden), jnp.float32)
  sums = ((zeros, jnp.zeros((n_img, n_cap, ctx.shape[1]), jnp.float32)) if pooled
          else (jnp.zeros(()), jnp.zeros(())))
  (_, _, h_sum, a_sum), r = jax.lax.scan(
      step, (zeros, zeros) + sums, (jnp.swapaxes(word_gates, 0, 1), word_mask.T),
      unroll=max(1, min(int(unroll), word_mask.shape[1])))
  r = jnp.moveaxis(r, 0, -1)                                            # (I, J, L)
  s = xattn.aggregate(r, word_mask[None], agg, lambda_lse)
  s = jnp.where(jnp.any(ctx_mask, -1)[:, None] & jnp.any(word_mask, -1)[None], s, 0.0)
  if not pooled:
    return s
  count = jnp.maximum(jnp.sum(word_mask, -1).astype(jnp.float32), 1.0)[None, :, None]
  return s, (h_sum / count, a_sum / count)


def mlp_fusion(hidden_pre, w_2, b_2):
  """sigmoid(w_2 . ReLU(hidden_pre) + b_2): (..., Hm) first-layer sums -> (...) scores."""
  return jax.nn.sigmoid(_mm(jax.nn.relu(hidden_pre), w_2)[..., 0] + b_2[0])


def caption_blocks(fn, text_reps, n_img: int, per_caption: int, max_elements: int):
  """`fn(text_block) -> (n_img, chunk)` over blocks of captions with `lax.map`, so no
  intermediate exceeds `max_elements` floats (`per_caption` of them per caption); the
  last block is padded with masked captions, whose columns are dropped."""
  n_cap = jax.tree.leaves(text_reps)[0].shape[0]
  if not max_elements:
    return fn(text_reps)
  chunk = max(int(max_elements) // max(per_caption, 1), 1)
  if chunk >= n_cap:
    return fn(text_reps)
  blocks = -(-n_cap // chunk)
  pad = blocks * chunk - n_cap
  split = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
      (blocks, chunk) + x.shape[1:])
  out = jax.lax.map(fn, jax.tree.map(split, text_reps))                # (blocks, I, chunk)
  return jnp.moveaxis(out, 0, 1).reshape(n_img, blocks * chunk)[:, :n_cap]


# --------------------------------------------------------------------------- module


class BssanTextEncoder(nn.Module):
  """Embedding U(-0.1, 0.1) -> Dropout(lstm_dropout) -> the text-only (Bi)LSTM (when a
  branch reads it), halves averaged, l2n per word (txt_norm). Returns the dropped-out
  embeddings (the coupled LSTM's word input) and the states (or None). Paths: `embed`,
  `lstm`, `lstm_reverse`, as `common.text.recurrent_tokens(cell="lstm")` names them."""
  config: BssanConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    c = self.config
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -0.1, 0.1)
    x = nn.Embed(c.vocab_size, c.word_dim, embedding_init=uniform, name="embed")(input_ids)
    x = Dropout(c.lstm_dropout, deterministic=not train)(x)
    if not c.text_lstm:
      return x, None
    h = LSTM(c.embed_size, name="lstm")(x, mask)
    if c.bi_lstm:
      h = (h + LSTM(c.embed_size, reverse=True, name="lstm_reverse")(x, mask)) / 2
    return x, (_l2n(h) if c.txt_norm else h)  # zero past each caption


class BSSAN(RegionWordModel):
  """BSSAN-R: W2R (LSTM + bilinear attention) and O2W (bilinear attention) scores of every
  pair, fused. Reps are token-level (see `encode_images` / `encode_texts`); `score` does
  all the pairwise work, so evaluation can tile a gallery freely."""
  spec = spec
  config: BssanConfig

  def setup(self):
    c = self.config
    d = c.embed_size
    if c.use_regions:
      self.img_fc = Linear(d, init="xavier")
    if c.use_grid:
      self.grid_fc = Linear(d, init="xavier")
    self.txt_enc = BssanTextEncoder(c)
    if c.use_w2r:
      self.w2r_bilinear = Affine(d, d, init=c.bilinear_init, use_bias=False)
      if c.cosine_proj:
        self.w2r_proj_h = Affine(d, d)
        self.w2r_proj_c = Affine(d, d)
      if c.coupled:
        self.w2r_lstm = CoupledLSTMParams(c.word_dim + d, d)
    if c.use_o2w:
      self.o2w_bilinear = Affine(d, d, init=c.bilinear_init, use_bias=False)
      if c.cosine_proj:
        self.o2w_proj_o = Affine(d, d)
        self.o2w_proj_u = Affine(d, d)
    if c.fuse == "learned" and c.directions == "both":
      w = float(c.fuse_weight)
      self.fuse_logit = self.param(
          "fuse_logit", lambda key: jnp.asarray(math.log(w / (1.0 - w)), jnp.float32))
    if c.mlp:
      self.mlp_1 = Affine(4 * d + 2, c.mlp_hidden)
      self.mlp_2 = Affine(c.mlp_hidden, 1)

  def _mlp_slice(self, part: int):
    """Rows of the MLP's first kernel for input block `part` of
    [ctx; h; u; o; S_W2R, S_O2W] (blocks of d rows, then the two score rows)."""
    d = self.config.embed_size
    return self.mlp_1.kernel[part * d:(part + 1) * d] if part < 4 else self.mlp_1.kernel[4 * d:]

  def encode_images(self, batch, train: bool = False):
    """{"regions" (B, k, d) l2-normalised (zero past the mask), "region_mask",
    "grid" (B, 49, d) with w2r_visual="grid", and the per-image projections}."""
    del train  # no dropout on the image side
    c = self.config
    reps = {}
    if c.use_regions:
      regions, mask = region_inputs(batch, c.img_dim)
      v = jnp.where(mask[..., None], _l2n(self.img_fc(regions)), 0.0)
      reps["regions"], reps["region_mask"] = v, mask
    if c.use_grid:
      grid = batch["grid"]
      if grid.ndim != 3 or grid.shape[1:] != (GRID_CELLS, c.img_dim):
        raise ValueError(f"grid: expected (B, {GRID_CELLS}, {c.img_dim}), got "
                         f"{tuple(grid.shape)}")
      reps["grid"] = _l2n(self.grid_fc(grid))
    if c.use_w2r:
      ctx, ctx_mask = self._context(reps)
      keep = ctx_mask[..., None]
      if c.cosine_proj:
        reps["w2r_ctx_proj"] = jnp.where(keep, self.w2r_proj_c(ctx), 0.0)
      if c.coupled:
        reps["w2r_ctx_gates"] = _mm(ctx, self.w2r_lstm.w_ih[c.word_dim:])
    if c.use_o2w and c.cosine_proj:
      reps["o2w_regions_proj"] = jnp.where(reps["region_mask"][..., None],
                                           self.o2w_proj_o(reps["regions"]), 0.0)
    if c.mlp:
      ctx, _ = self._context(reps)
      reps["mlp_ctx"] = _mm(ctx, self._mlp_slice(0))
      reps["mlp_o"] = _mm(masked_mean(reps["regions"], reps["region_mask"]),
                          self._mlp_slice(3))
    return reps

  def _context(self, image_reps):
    """W2R's context and its mask: the grid (every cell real) or the regions."""
    if self.config.use_grid:
      grid = image_reps["grid"]
      return grid, jnp.ones(grid.shape[:2], bool)
    return image_reps["regions"], image_reps["region_mask"]

  def encode_texts(self, batch, train: bool = False):
    """{"word_mask" (B, L), "words" (B, L, d) the text-only LSTM's l2-normalised states
    (zero past each caption), and the per-caption projections}."""
    c = self.config
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = (ids != 0) if mask is None else mask.astype(bool)
    keep = mask[..., None]
    x, h = self.txt_enc(ids, mask, train)
    reps = {"word_mask": mask}
    if c.text_lstm:
      reps["words"] = h
      if c.use_w2r and not c.coupled:
        reps["w2r_queries"] = _mm(h, self.w2r_bilinear.kernel)
        if c.cosine_proj:
          reps["w2r_words_proj"] = jnp.where(keep, self.w2r_proj_h(h), 0.0)
      if c.use_o2w:
        reps["o2w_keys"] = _mm(h, self.o2w_bilinear.kernel)
        if c.cosine_proj:
          reps["o2w_words_proj"] = jnp.where(keep, self.o2w_proj_u(h), 0.0)
      if c.mlp:
        reps["mlp_u"] = _mm(h, self._mlp_slice(2))
        if not c.coupled:
          reps["mlp_h"] = _mm(masked_mean(h, mask), self._mlp_slice(1))
    if c.coupled:
      lstm = self.w2r_lstm
      reps["w2r_word_gates"] = jnp.where(
          keep, _mm(x, lstm.w_ih[:c.word_dim]) + lstm.b_ih, 0.0)
    return reps

  def _per_caption_elements(self, n_img: int, n_ctx: int, n_reg: int, n_words: int) -> int:
    c = self.config
    sizes = [1]
    if c.use_w2r:
      sizes.append(8 * c.embed_size if c.coupled else n_ctx * n_words)
    if c.use_o2w:
      sizes.append(n_reg * n_words)
    return n_img * max(sizes)

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    c = self.config
    ctx, ctx_mask = self._context(image_reps) if c.use_w2r else (None, None)
    kw = dict(lambda_lse=c.lambda_lse, pooled=c.mlp)
    # Parameters the tile functions use, fetched here: no module runs inside lax.map.
    if c.coupled:
      lstm = self.w2r_lstm
      coupled_kw = dict(w_b=self.w2r_bilinear.kernel, w_hh=lstm.w_hh, b_hh=lstm.b_hh,
                        proj_h=((self.w2r_proj_h.kernel, self.w2r_proj_h.bias)
                                if c.cosine_proj else None),
                        lam=c.lambda_w2r, txt_norm=c.txt_norm, agg=c.w2r_agg,
                        unroll=c.scan_unroll, **kw)
    if c.mlp:
      w_h, w_s, b_1 = self._mlp_slice(1), self._mlp_slice(4), self.mlp_1.bias
      w_2, b_2 = self.mlp_2.kernel, self.mlp_2.bias
    if c.fuse == "learned" and c.directions == "both":
      weight = jax.nn.sigmoid(self.fuse_logit)
    else:
      weight = c.fuse_weight
    img = image_reps

    def block(txt):
      mask = txt["word_mask"]
      out = {}
      if c.use_w2r:
        ctx_proj = img["w2r_ctx_proj"] if c.cosine_proj else ctx
        if c.coupled:
          out["w2r"] = w2r_coupled(ctx, ctx_mask, ctx_proj, img["w2r_ctx_gates"],
                                   txt["w2r_word_gates"], mask, **coupled_kw)
        else:
          words_proj = txt["w2r_words_proj"] if c.cosine_proj else txt["words"]
          out["w2r"] = w2r_decoupled(ctx, ctx_mask, ctx_proj, txt["w2r_queries"],
                                     words_proj, mask, lam=c.lambda_w2r, agg=c.w2r_agg,
                                     **kw)
      if c.use_o2w:
        regions_proj = img["o2w_regions_proj"] if c.cosine_proj else img["regions"]
        words_proj = txt["o2w_words_proj"] if c.cosine_proj else txt["words"]
        out["o2w"] = o2w(img["regions"], img["region_mask"], regions_proj,
                         txt["o2w_keys"], words_proj, mask, lam=c.lambda_o2w,
                         agg=c.o2w_agg, **kw)
      if c.directions != "both":
        return out[c.directions]
      if not c.mlp:
        return weight * out["w2r"] + (1.0 - weight) * out["o2w"]
      (s_w2r, w2r_pool), (s_o2w, o2w_pool) = out["w2r"], out["o2w"]
      if c.coupled:
        mean_h, ctx_pool = w2r_pool
        h_part = _mm(mean_h, w_h)
      else:
        ctx_pool, h_part = w2r_pool, txt["mlp_h"][None]
      pre = (jnp.einsum("ijn,inh->ijh", ctx_pool, img["mlp_ctx"], precision=HIGHEST)
             + h_part
             + jnp.einsum("ijt,jth->ijh", o2w_pool, txt["mlp_u"], precision=HIGHEST)
             + img["mlp_o"][:, None] + s_w2r[..., None] * w_s[0] + s_o2w[..., None] * w_s[1]
             + b_1)
      return mlp_fusion(pre, w_2, b_2)

    n_img = jax.tree.leaves(img)[0].shape[0]
    n_words = text_reps["word_mask"].shape[1]
    n_ctx = ctx.shape[1] if ctx is not None else 0
    n_reg = img["regions"].shape[1] if "regions" in img else 0
    per_caption = self._per_caption_elements(n_img, n_ctx, n_reg, n_words)
    return caption_blocks(block, text_reps, n_img, per_caption,
                          c.max_block_elements).astype(jnp.float32)

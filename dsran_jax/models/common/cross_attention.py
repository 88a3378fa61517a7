"""SCAN's stacked cross attention (Lee et al., ECCV 2018), masked and batched over tiles of
(image, caption) pairs: the alignment block of every family that attends words to regions
or regions to words (SCAN; later MLASM, KIDRR, BSSAN).

Shapes: a tile holds `I` images with `k` regions, `regions (I, k, d)` and
`region_mask (I, k)`, and `J` captions of at most `L` words, `words (J, L, d)` and
`word_mask (J, L)`. Scores come back as `(I, J)` float32.

One direction, for a query set Q (n_q x d) and a context set C (n_c x d) (SCAN's
`func_attention`; t2i: Q = words, C = regions; i2t: Q = regions, C = words):

    S      = C Q^T                          (n_c x n_q) raw dot products
    S'     = norm(S) over the QUERY axis    (see NORMS)
    A      = softmax over the CONTEXT axis of lambda * S'^T          (n_q x n_c)
    ctx_q  = A_q C                          attended context of query q
    R_q    = cos(q, ctx_q)                  SCAN's cosine: q.c / max(|q| |c|, 1e-8)
    score  = aggregate over the queries of R  (Mean, LogSumExp, Max, Sum; see AGGS)

Padding never enters: padded context positions get no attention weight, padded query
positions are left out of the normaliser over the query axis and out of the
aggregation, exactly as SCAN's per-caption slices `captions[i, :n_word]` leave them out.
An item with no valid position (a padded tile row: zero reps, mask all False) scores 0
with everything, with finite gradients.

The fused tile functions never build the `(I, J, n_q, d)` attended contexts: with the
raw dot products S already at hand, `q.ctx_q = sum_c A_qc S_cq` and
`|ctx_q|^2 = A_q^T G A_q` with the context Gram matrix `G = C C^T` (`k x k` per image for
t2i, `L x L` per caption for i2t). That is exact algebra, and it leaves one large
contraction per tile (S, `2 I J k L d` flops; the Gram products add `2 I J k^2 L` or
`2 I J k L^2`) where SCAN's loop also contracts the contexts (`2 I J k L d` more) and
their cosines. `xattn_scores` lays S out (context item, its position, query position,
query item), the query items minor: each block of context items is one plain matrix
product against the queries transposed once per tile, and every reduction (over the
query positions for the norm, over the context positions for the softmax and the sums)
runs across rows, vectorised along the query items, with no transpose of S. The blocks
are sized to stay in the cache (BLOCK_ELEMENTS). `attention_cosines` is that block step
for either axis of S as the context, so a model that needs both directions (MLASM)
reads one S twice, and one whose logits and cosine numerators are different products
(BSSAN) passes both. Precision: HIGHEST (full fp32) by default, since ranks are sensitive
to score errors.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Raw-feature normalisations over the query axis (SCAN's --raw_feature_norm):
#   softmax              softmax over the queries
#   l2norm               S / (||S||_2 over the queries + 1e-8)
#   clipped_l2norm       LeakyReLU(0.1), then l2norm (SCAN's default; note: leaky, not ReLU)
#   clipped_leaky_l2norm the same maths under the name SCAN-derived codes give it (some of
#                        them use clipped_l2norm for a ReLU variant); not a SCAN option
#   clipped              LeakyReLU(0.1) only
#   no_norm              S unchanged
NORMS = ("softmax", "l2norm", "clipped_l2norm", "clipped_leaky_l2norm", "clipped", "no_norm")
# Aggregations over the query positions (SCAN's --agg_func).
AGGS = ("Mean", "LogSumExp", "Max", "Sum")
DIRECTIONS = ("t2i", "i2t")
# Norms whose outputs lie in [-1, 1] whatever the inputs (a softmax, or divided by their
# l2 norm over the queries).
_UNIT_NORMS = ("softmax", "l2norm", "clipped_l2norm", "clipped_leaky_l2norm")
EPS = 1e-8         # SCAN's l2norm and cosine_similarity eps
LEAKY_SLOPE = 0.1  # nn.LeakyReLU(0.1)
_NEG = -1e30       # finite "minus infinity" for masked logits: a fully masked row stays NaN-free
HIGHEST = jax.lax.Precision.HIGHEST
# Floats of S per block of `xattn_scores` (6 MB): a block is scored while its S sits in the
# last-level cache. Measured on a 2-core EPYC (L2 1 MB per core, L3 32 MB); see
# docs/benchmarks.md, "Cross-attention scoring against the roofline".
BLOCK_ELEMENTS = 1 << 20 | 1 << 19


def _safe_sqrt(x):
  """sqrt with a finite gradient at 0 (padded rows are all zeros)."""
  return jnp.sqrt(jnp.maximum(x, 1e-30))


def masked_softmax(x, mask, axis: int = -1, bound: Optional[float] = None):
  """softmax of `x` over `axis` restricted to `mask` (broadcastable to x); masked entries
  get weight 0 and a fully masked row gets all zeros (not NaN).

  `bound`: a known bound on |x| (at most 40). The exponent is then shifted by the
  constant instead of the row max (the same softmax, no overflow, and no e^-2bound
  underflow to worry about below 40), which saves a reduction pass over x.
  """
  mask = jnp.broadcast_to(mask, x.shape)
  # Masked entries become a huge negative number *before* exp: exp gives exactly 0 there,
  # and no overflow can turn a gradient into inf * 0.
  x = jnp.where(mask, x, _NEG)
  if bound is not None and bound <= 40.0:
    e = jnp.exp(x - bound)
  else:
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True)))
    e = jnp.where(mask, e, 0.0)  # a fully masked row: all entries equal the max
  return e / jnp.maximum(jnp.sum(e, axis=axis, keepdims=True), 1e-30)


def normalize_over_queries(s, query_mask, norm: str, axis: int = -1):
  """SCAN's raw-feature normalisation of dot products `s` over the query `axis`.

  Args:
    s: raw context-query dot products, any shape with the query positions on `axis`.
    query_mask: bool, broadcastable to `s`; padded queries are left out of the softmax
      and of the l2 normaliser (their own entries are computed but never used).
    norm: one of NORMS.
  """
  if norm not in NORMS:
    raise ValueError(f"raw_feature_norm={norm!r}: expected one of {NORMS}")
  if norm == "softmax":
    return masked_softmax(s, query_mask, axis)
  if norm in ("clipped_l2norm", "clipped_leaky_l2norm", "clipped"):
    s = jax.nn.leaky_relu(s, LEAKY_SLOPE)
  if norm in ("l2norm", "clipped_l2norm", "clipped_leaky_l2norm"):
    sq = jnp.sum(jnp.where(query_mask, jnp.square(s), 0.0), axis=axis, keepdims=True)
    s = s / (_safe_sqrt(sq) + EPS)
  return s


def aggregate(r, mask, agg_func: str, lambda_lse: float = 6.0):
  """SCAN's aggregation of per-query similarities `r` over the last axis, over the
  positions where `mask` (broadcastable to r) is True.

  Mean and Sum are the masked mean / sum; LogSumExp is
  `log(sum_q exp(lambda_lse * r_q)) / lambda_lse` (computed stably); Max the masked max.
  A row with no valid position gives 0.
  """
  if agg_func not in AGGS:
    raise ValueError(f"agg_func={agg_func!r}: expected one of {AGGS}")
  mask = jnp.broadcast_to(mask, r.shape)
  count = jnp.sum(mask.astype(r.dtype), axis=-1)
  # where, not r * mask: a masked entry may hold anything (even inf) without leaking.
  if agg_func == "Sum":
    return jnp.sum(jnp.where(mask, r, 0.0), axis=-1)
  if agg_func == "Mean":
    return jnp.sum(jnp.where(mask, r, 0.0), axis=-1) / jnp.maximum(count, 1.0)
  top = jnp.max(jnp.where(mask, r, _NEG), axis=-1)
  top = jnp.where(count > 0, top, 0.0)
  if agg_func == "Max":
    return top
  top = jax.lax.stop_gradient(top)
  total = jnp.sum(jnp.exp(lambda_lse * (jnp.where(mask, r, _NEG) - top[..., None])), axis=-1)
  lse = top + jnp.log(jnp.maximum(total, 1e-30)) / lambda_lse
  return jnp.where(count > 0, lse, 0.0)


# ------------------------------------------------------------------ per-pair attention


def attend(query, context, query_mask=None, context_mask=None, *, lam: float,
           norm: str = "clipped_l2norm", precision=HIGHEST):
  """SCAN's `func_attention` weights for paired query and context sets.

  Args:
    query: (..., n_q, d); context: (..., n_c, d), with the same (broadcastable) batch dims.
    query_mask: (..., n_q) bool, or None (all valid).
    context_mask: (..., n_c) bool, or None (all valid).
    lam: the softmax temperature (SCAN's lambda_softmax: 9 for t2i, 4 for i2t).
    norm: raw-feature normalisation over the query axis, one of NORMS.

  Returns:
    (..., n_q, n_c) attention weights; row q sums to 1 over the valid context positions
    (all zeros if there is none); a padded query's row is the attention of an all-zero
    query (finite, never meant to be used).
  """
  if query_mask is None:
    query_mask = jnp.ones(query.shape[:-1], bool)
  if context_mask is None:
    context_mask = jnp.ones(context.shape[:-1], bool)
  s = jnp.einsum("...cd,...qd->...cq", context, query, precision=precision)
  qm = query_mask.astype(bool)[..., None, :]
  s = jnp.where(qm, normalize_over_queries(s, qm, norm, axis=-1), 0.0)
  return masked_softmax(lam * jnp.swapaxes(s, -1, -2),
                        context_mask.astype(bool)[..., None, :], axis=-1,
                        bound=abs(lam) if norm in _UNIT_NORMS else None)


def attended_context(weights, context, precision=HIGHEST):
  """(..., n_q, d) weighted contexts `weights @ context` (SCAN does not re-normalise)."""
  return jnp.einsum("...qc,...cd->...qd", weights, context, precision=precision)


def cosine(x1, x2, eps: float = EPS):
  """SCAN's cosine_similarity over the last axis: x1.x2 / max(|x1| |x2|, eps)."""
  w12 = jnp.sum(x1 * x2, axis=-1)
  w1 = _safe_sqrt(jnp.sum(jnp.square(x1), axis=-1))
  w2 = _safe_sqrt(jnp.sum(jnp.square(x2), axis=-1))
  return w12 / jnp.maximum(w1 * w2, eps)


# ------------------------------------------------------------------- fused tile scores


def region_word_similarities(regions, words, direction: str = "t2i", precision=HIGHEST):
  """Raw dot products of every region with every word of the tile, context-major.

  Returns (I, k, J, L) for "t2i" (the context, regions, first) and (J, L, I, k) for
  "i2t" (the context, words, first): `S[c, n, q, m]` = context item c's position n with
  query item q's position m. That is the plain (items x positions) matrix product's
  layout, which every later step reads without a transpose. Both hold the same numbers,
  so a model using both directions can compute one and transpose it.
  """
  spec = {"t2i": "ird,jtd->irjt", "i2t": "ird,jtd->jtir"}
  if direction not in spec:
    raise ValueError(f"cross_attn={direction!r}: expected one of {DIRECTIONS}")
  return jnp.einsum(spec[direction], regions, words, precision=precision,
                    preferred_element_type=jnp.float32)


def _quadratic_form(gram, e, context_axis: int, precision):
  """`sum_n e_n (G e)_n` over the context axis of a (c, n, m, q) block of weights e.

  context_axis 1 (the rows are the contexts): gram (c, n, n), one per row item, applied
  as a batched matrix product. context_axis 2 (the columns are): gram (m, m', q), the
  query items minor like e, applied as a product batched over q (its m'^2 work per entry
  is small next to S's d). Not as a broadcast product summed over m': that is as fast on
  one device, but XLA CPU (jax 0.10.2) computes it wrongly when e's rows are sharded
  over several devices (ModelScorer's tiles are)."""
  if context_axis == 1:
    ge = jnp.einsum("cnk,ckmq->cnmq", gram, e, precision=precision)
  else:
    ge = jnp.einsum("cnpq,mpq->cnmq", e, gram, precision=precision)
  return jnp.sum(e * ge, axis=context_axis)


def attention_cosines(s, context_mask, query_mask, query_norm, gram, *,
                      context_axis: int, lam: float, norm: str = "clipped_l2norm",
                      dots=None, precision=HIGHEST):
  """Per-query cosines of one direction of attention over a block S laid out (c, n, m, q):
  row item c, its position n; column position m, column item q (minor).

  `context_axis` 1: the rows are the contexts (SCAN t2i with image rows) and the result
  is (c, m, q); 2: the columns are (i2t on the same S) and the result is (c, n, q).
  Every reduction runs over a non-minor axis, so each pass over S is a vectorised sweep
  along the column items, with no transpose of S. The softmax's normaliser z is applied
  to the per-query sums, not to the weights: with unnormalised weights e,
  `q.ctx = sum(e s) / z` and `|ctx| = sqrt(e^T G e) / z`.

  Args:
    s: (c, n, m, q) raw dot products that the attention logits come from.
    context_mask, query_mask: bool, broadcastable to s (the positions of the context and
      of the query axis).
    query_norm: |q|, broadcastable to the result.
    gram: the contexts' Gram matrices, (c, n, n) for context_axis 1 and (m, m', q) for 2
      (see `_quadratic_form`).
    lam, norm: softmax temperature and raw-feature normalisation (one of NORMS).
    dots: (c, n, m, q) products the cosine's numerator sums (BSSAN's projected
      features), or None: `s` itself (SCAN).

  Returns:
    (r, e, z): the cosines, the unnormalised weights (zero at padded contexts) and their
    sums over the context axis (at least 1e-30), for callers that pool the weights.
  """
  query_axis = 3 - context_axis
  sn = jnp.where(query_mask, normalize_over_queries(s, query_mask, norm, axis=query_axis),
                 0.0)
  # Padded query positions are never aggregated; zeroing them above keeps whatever their
  # reps hold from overflowing the exponent (the bound holds for real queries only).
  logits = lam * sn
  if norm in _UNIT_NORMS and abs(lam) <= 40.0:
    shift = abs(lam)  # |logits| <= lam: no overflow, no underflow to 0 (see masked_softmax)
  else:
    # Masked logits become a huge negative number before exp (as in masked_softmax): a
    # padded context's logit above the row's max would overflow, and a fully masked row
    # would exponentiate +1e30, either making an inf * 0 gradient.
    logits = jnp.where(context_mask, logits, _NEG)
    shift = jax.lax.stop_gradient(jnp.max(logits, axis=context_axis, keepdims=True))
  e = jnp.where(context_mask, jnp.exp(logits - shift), 0.0)
  z = jnp.maximum(jnp.sum(e, axis=context_axis), 1e-30)
  q_dot_ctx = jnp.sum(e * (s if dots is None else dots), axis=context_axis) / z
  ctx_norm = _safe_sqrt(jnp.maximum(_quadratic_form(gram, e, context_axis, precision),
                                    0.0)) / z
  return q_dot_ctx / jnp.maximum(query_norm * ctx_norm, EPS), e, z


def _query_minor_scores(s, context, context_mask, query, query_mask, *, lam, agg_func,
                        lambda_lse, norm, precision):
  """(n_context_items, n_query_items) scores from S laid out (c, n, m, q): context item
  c, its position n; query position m, query item q (minor). See `attention_cosines`."""
  gram = jnp.einsum("cnd,ckd->cnk", context, context, precision=precision)
  query_norm = _safe_sqrt(jnp.sum(jnp.square(query), -1)).T[None]     # (1, m, q)
  r, _, _ = attention_cosines(s, context_mask[:, :, None, None], query_mask.T[None, None],
                              query_norm, gram, context_axis=1, lam=lam, norm=norm,
                              precision=precision)
  scores = aggregate(jnp.swapaxes(r, 1, 2), query_mask[None], agg_func, lambda_lse)
  # An item with nothing to attend to (a padded tile row) scores 0 with everything, not
  # log(n) / lambda_lse, which a LogSumExp of zero similarities would give.
  return jnp.where(nonempty_pairs(context_mask, query_mask), scores, 0.0)


def nonempty_pairs(row_mask, column_mask):
  """(rows, columns) bool: both items have a valid position. A pair without one scores
  0 (a padded tile row)."""
  return jnp.any(row_mask, -1)[:, None] & jnp.any(column_mask, -1)[None, :]


def column_grams(columns, precision=HIGHEST):
  """(m, m', q) Gram matrices of every column item's positions, the items minor: the
  `gram` of `attention_cosines` when the columns are the contexts."""
  return jnp.einsum("qmd,qpd->mpq", columns, columns, precision=precision)


def context_block(context_positions: int, query_positions: int, query_items: int,
                  block_elements: int = BLOCK_ELEMENTS) -> int:
  """Context items per block of `xattn_scores`: as many as keep one (items, n, m, q)
  block of S within `block_elements` floats (at least one)."""
  per_item = max(context_positions * query_positions * query_items, 1)
  return max(int(block_elements) // per_item, 1)


def columns_minor(x):
  """(items, positions, d) -> (d, positions x items): the right-hand side of every
  block's product, transposed once per tile so that no block copies it."""
  return jnp.transpose(x, (2, 1, 0)).reshape(x.shape[2], x.shape[1] * x.shape[0])


def query_minor_products(rows, columns_t, column_positions: int, precision=HIGHEST):
  """(c, n, m, q) float32 products of a block of row items (c, n, d) with every column
  item, `columns_t = columns_minor(columns)`: one plain matrix product."""
  s = jnp.dot(rows.reshape(-1, rows.shape[-1]), columns_t, precision=precision,
              preferred_element_type=jnp.float32)
  return s.reshape(rows.shape[:2] + (column_positions, -1))


def map_item_blocks(fn, items, size: int):
  """`fn(block)` over blocks of `size` leading items of the pytree `items` (`lax.map`;
  the blocks as even as possible, the last padded with zeros, i.e. masked items, whose
  rows are dropped). fn returns a pytree of arrays with the block's items leading; so
  does this, with all the items."""
  n = jax.tree.leaves(items)[0].shape[0]
  size = max(min(int(size), n), 1)
  blocks = -(-n // size)
  if blocks == 1:
    return fn(items)
  size = -(-n // blocks)
  pad = blocks * size - n
  split = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
      (blocks, size) + x.shape[1:])
  out = jax.lax.map(fn, jax.tree.map(split, items))
  return jax.tree.map(lambda o: o.reshape((blocks * size,) + o.shape[2:])[:n], out)


def xattn_scores(regions, region_mask, words, word_mask, *, direction: str,
                 lambda_softmax: float, agg_func: str = "Mean", lambda_lse: float = 6.0,
                 norm: str = "clipped_l2norm", precision=HIGHEST,
                 block_elements: int = BLOCK_ELEMENTS):
  """(I, J) float32 SCAN scores of every image of a tile with every caption of it
  (SCAN's xattn_score_t2i / xattn_score_i2t without the per-caption loop).

  The context items (images for t2i, captions for i2t) are scored in blocks of
  `context_block(...)` (`map_item_blocks`), each one plain matrix product
  `(items n) x d @ d x (m q)` against the query set transposed once (so no block copies
  the queries), followed by the passes over its S while that is in the cache.
  """
  kw = dict(lam=lambda_softmax, agg_func=agg_func, lambda_lse=lambda_lse, norm=norm,
            precision=precision)
  if direction not in DIRECTIONS:
    raise ValueError(f"cross_attn={direction!r}: expected one of {DIRECTIONS}")
  regions = regions.astype(jnp.float32)
  words = words.astype(jnp.float32)
  region_mask = region_mask.astype(bool)
  word_mask = word_mask.astype(bool)
  context, context_mask, query, query_mask = (
      (regions, region_mask, words, word_mask) if direction == "t2i" else
      (words, word_mask, regions, region_mask))
  n_pos = context.shape[1]
  n_query, m_pos = query_mask.shape
  query_t = columns_minor(query)                                       # (d, m q)

  def block(args):
    ctx, cmask = args
    s = query_minor_products(ctx, query_t, m_pos, precision)
    return _query_minor_scores(s, ctx, cmask, query, query_mask, **kw)

  scores = map_item_blocks(block, (context, context_mask),
                           context_block(n_pos, m_pos, n_query, block_elements))
  return scores if direction == "t2i" else scores.T


def caption_chunk(num_images: int, num_regions: int, num_words: int,
                  max_elements: int) -> int:
  """Captions per block so that one (images, captions, k, L) array holds at most
  `max_elements` floats (at least one caption)."""
  per_caption = max(num_images * num_regions * num_words, 1)
  return max(int(max_elements) // per_caption, 1)


def map_caption_blocks(score, regions, region_mask, words, word_mask, *,
                       max_elements: Optional[int] = 1 << 25):
  """`score(regions, region_mask, words, word_mask) -> (I, J)` of a tile, over any number
  of captions with bounded memory.

  The captions are cut into the fewest equal blocks of at most `caption_chunk(...)`
  (static shapes: the last block is padded with masked captions, whose columns are
  dropped) and scored one block at a time with `lax.map`, so no (I, J, k, L)
  intermediate exceeds `max_elements` floats. `max_elements=None` scores the whole
  (I, J) at once.
  """
  if max_elements is None:
    return score(regions, region_mask, words, word_mask)
  chunk = caption_chunk(regions.shape[0], regions.shape[1], words.shape[1], max_elements)
  return map_item_blocks(lambda wm: score(regions, region_mask, *wm).T,
                         (words, word_mask.astype(bool)), chunk).T


def pairwise_xattn_scores(regions, region_mask, words, word_mask, *,
                          max_elements: Optional[int] = 1 << 25, **kwargs):
  """`xattn_scores` over any number of images and captions with bounded memory
  (`map_caption_blocks`). kwargs: those of `xattn_scores`."""
  return map_caption_blocks(functools.partial(xattn_scores, **kwargs), regions,
                            region_mask, words, word_mask, max_elements=max_elements)


__all__ = ["AGGS", "DIRECTIONS", "NORMS", "EPS", "aggregate", "attend", "attended_context",
           "attention_cosines", "caption_chunk", "column_grams", "columns_minor",
           "context_block", "cosine", "map_caption_blocks", "map_item_blocks",
           "masked_softmax", "nonempty_pairs", "normalize_over_queries",
           "pairwise_xattn_scores", "query_minor_products", "region_word_similarities",
           "xattn_scores"]

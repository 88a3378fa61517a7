"""The image-text retrieval protocol on similarity matrices (pure numpy).

A similarity matrix `sims` has one row per image and one column per caption, shape
`(N_img, cpi * N_img)` with `cpi` captions per image (5 for Flickr30K and MS-COCO);
caption `c` belongs to image `c // cpi`. Higher scores rank first.

Ranks are 0-based positions in a *stable descending sort*: the rank of a positive is the
number of scores strictly greater than it plus the number of equal scores at a smaller
index (caption index for i2t, image index for t2i). Ties are therefore broken by index
and results are deterministic. (The authors' `numpy.argsort(d)[::-1]` breaks ties in an
unspecified order, so exact ties are the only place where the two can differ.) A NaN or
Inf score anywhere is an error (`NonFiniteScoresError`, saying how many and where): a
NaN negative would otherwise rank below every number and inflate the recalls silently.

- i2t rank of image i: the best (smallest) rank among its `cpi` captions in row i.
- t2i rank of caption c: the rank of image `c // cpi` in column c.
- `recall_metrics`: R@1/5/10 = 100 * mean(rank < K), medr = floor(median) + 1,
  meanr = mean + 1, rsum = the sum of the six recalls.
- COCO 1K (`fold5=True`): 5 sequential folds of N/5 images (rows `f*N/5 ...`, captions
  `f*cpi*N/5 ...`); every metric is the mean over folds.
- i2t re-rank (`rerank=True`, the authors' `rerank.py`, K1 = 15): each image's top-15
  captions are re-ordered (stably) by the rank of that image in each caption's t2i
  ordering; t2i is unchanged.

Everything works on row blocks, never on the whole matrix at once, so a 5000 x 25000
COCO 5K matrix (or a memory-mapped one) is ranked in well under a second per direction.
`RankAccumulator` is the streaming form used by `dsran_jax.evaluation`: it takes row
blocks one at a time and never needs more than one block in memory.
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_CHUNK_SIZE = 128
KERNEL_ROWS = 128   # rows ranked at once inside RankAccumulator (larger blocks are cut)
RERANK_K = 15
METRIC_KEYS = ("r1_i2t", "r5_i2t", "r10_i2t", "medr_i2t", "meanr_i2t",
               "r1_t2i", "r5_t2i", "r10_t2i", "medr_t2i", "meanr_t2i", "rsum")


class NonFiniteScoresError(ValueError):
  """A sims matrix (or a block of one) holds NaN or Inf scores."""


MAX_POSITIONS_SHOWN = 5


class NonFiniteTally:
  """Counts the NaN / +Inf / -Inf scores of row blocks and remembers where the first are.

  `add(row_offset, block)` returns True if the block is finite; `raise_if_any()` raises
  a `NonFiniteScoresError` over everything added so far. Integer blocks are finite.
  """

  def __init__(self, name: str = "sims"):
    self.name = name
    self.nan = self.pos_inf = self.neg_inf = 0
    self.rows = 0
    self.first: List[Tuple[int, int, float]] = []

  @property
  def count(self) -> int:
    return self.nan + self.pos_inf + self.neg_inf

  def add(self, row_offset: int, block: np.ndarray) -> bool:
    if not np.issubdtype(block.dtype, np.floating):
      return True
    finite = np.isfinite(block)
    if finite.all():
      return True
    bad = ~finite
    nan = np.isnan(block)
    self.nan += int(np.count_nonzero(nan))
    self.pos_inf += int(np.count_nonzero(block == np.inf))
    self.neg_inf += int(np.count_nonzero(block == -np.inf))
    self.rows += int(np.count_nonzero(bad.any(axis=1)))
    if len(self.first) < MAX_POSITIONS_SHOWN:
      r, c = np.nonzero(bad)
      for i, j in zip(r[:MAX_POSITIONS_SHOWN], c[:MAX_POSITIONS_SHOWN]):
        if len(self.first) < MAX_POSITIONS_SHOWN:
          self.first.append((int(row_offset + i), int(j), float(block[i, j])))
    return False

  def message(self, num_rows: Optional[int] = None) -> str:
    kinds = ", ".join(f"{n} {k}" for n, k in ((self.nan, "NaN"), (self.pos_inf, "+Inf"),
                                             (self.neg_inf, "-Inf")) if n)
    where = "; ".join(f"image {i} caption {j} ({v})" for i, j, v in self.first)
    more = " ..." if self.count > len(self.first) else ""
    rows = f" in {self.rows}{f' of {num_rows}' if num_rows else ''} image rows"
    return (f"{self.name} has {self.count} non-finite scores ({kinds}){rows}, first at "
            f"{where}{more}; ranking them would give meaningless recalls (NaN/Inf "
            f"embeddings from diverged weights or NaN/Inf input features?)")

  def raise_if_any(self, num_rows: Optional[int] = None) -> None:
    if self.count:
      raise NonFiniteScoresError(self.message(num_rows))


def check_finite(sims, name: str = "sims", chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
  """Raises NonFiniteScoresError if any score of `sims` (array or memmap) is NaN or Inf,
  saying how many of each kind and where the first ones are. Reads by row blocks."""
  tally = NonFiniteTally(name)
  for o, block in iter_row_blocks(sims, chunk_size):
    tally.add(o, block)
  tally.raise_if_any(np.shape(sims)[0])


def _check_sims_shape(shape, cpi: int) -> Tuple[int, int]:
  """Returns (num_images, num_captions) after checking `shape` is (N, cpi * N)."""
  if len(shape) != 2:
    raise ValueError(f"sims must be 2-D (images x captions), got shape {tuple(shape)}")
  if cpi < 1:
    raise ValueError(f"captions per image (cpi) must be >= 1, got {cpi}")
  n_img, n_cap = shape
  if n_cap != cpi * n_img:
    raise ValueError(
        f"sims has shape {tuple(shape)}: expected {cpi} * {n_img} = "
        f"{cpi * n_img} caption columns for {n_img} images "
        f"(captions per image: {cpi})")
  return n_img, n_cap


def positive_scores(sims, cpi: int = 5) -> np.ndarray:
  """Returns the (N_cap,) scores of the matching pairs, `sims[c // cpi, c]`."""
  _check_sims_shape(np.shape(sims), cpi)
  cols = np.arange(np.shape(sims)[1])
  return np.asarray(sims[cols // cpi, cols])


def _count_true(mask: np.ndarray, axis: int) -> np.ndarray:
  """`np.count_nonzero(mask, axis)` as int64, about 4x faster (uint8 view summed in
  uint16 when the axis is short enough not to overflow)."""
  dtype = np.uint16 if mask.shape[axis] < (1 << 16) else np.int64
  return np.add.reduce(mask.view(np.uint8), axis=axis, dtype=dtype).astype(np.int64)


def _i2t_block(block: np.ndarray, row_offset: int, cpi: int) -> np.ndarray:
  """i2t ranks of the images in `block` (rows `row_offset...` of sims, all captions).

  The best-ranked positive p of a row is the one with the highest score, the smallest
  caption index among equal scores (`argmax` returns the first maximum). Its rank is
  #(scores >= v left of p) + #(scores > v right of p), the stable tie rule in one pass:
  the columns left of the block's diagonal band are all left of p, those right of the
  band all right of it, and only the (b, b * cpi) band needs a per-element mask.
  """
  b = block.shape[0]
  rows = np.arange(b)
  first = (row_offset + rows) * cpi
  pos_vals = block[rows[:, None], first[:, None] + np.arange(cpi)[None, :]]
  best = np.argmax(pos_vals, axis=1)
  v = pos_vals[rows, best]
  if np.isnan(v).any():
    bad = row_offset + int(np.flatnonzero(np.isnan(v))[0])
    raise ValueError(f"sims has NaN at a positive pair (image row {bad})")
  p = first + best
  vv = v[:, None]
  c0, c1 = row_offset * cpi, (row_offset + b) * cpi
  ranks = _count_true(block[:, :c0] >= vv, 1) + _count_true(block[:, c1:] > vv, 1)
  band = block[:, c0:c1]
  cols = np.arange(c0, c1)[None, :]
  ahead = ((cols < p[:, None]) & (band >= vv)) | ((cols > p[:, None]) & (band > vv))
  ranks += _count_true(ahead, 1)
  return ranks


def _t2i_block(block: np.ndarray, row_offset: int, pos: np.ndarray, cpi: int) -> np.ndarray:
  """Contribution of image rows `row_offset...` (`block`) to every caption's t2i rank.

  `pos` holds the (N_cap,) positive scores. Row r is ahead of caption c's image
  g = c // cpi when `block[r, c] >= pos[c]` and r < g, or `block[r, c] > pos[c]` and
  r > g (stable tie rule). Columns left of the block's diagonal band have g below every
  row of the block, those right of it g above, so one comparison per element suffices;
  only the band needs a per-element mask.
  """
  b, n_cap = block.shape
  c0, c1 = row_offset * cpi, min(n_cap, (row_offset + b) * cpi)
  out = np.empty(n_cap, np.int64)
  out[:c0] = _count_true(block[:, :c0] > pos[None, :c0], 0)
  out[c1:] = _count_true(block[:, c1:] >= pos[None, c1:], 0)
  band, pband = block[:, c0:c1], pos[None, c0:c1]
  r = (row_offset + np.arange(b))[:, None]
  g = (np.arange(c0, c1) // cpi)[None, :]
  ahead = ((r < g) & (band >= pband)) | ((r > g) & (band > pband))
  out[c0:c1] = _count_true(ahead, 0)
  return out


def _pieces(todo: np.ndarray) -> Iterator[Tuple[int, int]]:
  """[lo, hi) runs of True in `todo`, cut into pieces of at most KERNEL_ROWS rows."""
  rows = KERNEL_ROWS
  idx = np.flatnonzero(todo)
  if not idx.size:
    return
  for run in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1):
    for lo in range(run[0], run[-1] + 1, rows):
      yield int(lo), int(min(lo + rows, run[-1] + 1))


class RankAccumulator:
  """Streaming i2t/t2i ranks from row blocks of a (N_img, cpi * N_img) sims matrix.

  Feed blocks with `add(row_offset, block)`, where `block` holds rows
  `row_offset ... row_offset + len(block) - 1` against *all* caption columns, in any
  order; then read `ranks()`. Only one block is needed in memory at a time.

  i2t ranks need only the block's own rows. t2i ranks need every caption's positive
  score before any row can be counted; a block only reveals the positives of its own
  images. So:
  - with `positive_scores` given (e.g. `positive_scores(sims)` of an in-memory matrix),
    one pass over the blocks is enough;
  - otherwise the first pass collects i2t ranks and positive scores, and the blocks must
    be fed a second time (`complete` is False until then; `needs_rows` tells which
    blocks are still needed). The block in hand when the last positive arrives is
    counted at once, so a single whole-matrix block also needs one pass.
  `add` is idempotent per row: rows already counted are skipped.
  """

  def __init__(self, num_images: int, cpi: int = 5,
               positive_scores: Optional[np.ndarray] = None):
    self.num_images = int(num_images)
    self.cpi = int(cpi)
    self.num_captions = self.num_images * self.cpi
    self._i2t = np.zeros(self.num_images, np.int64)
    self._t2i = np.zeros(self.num_captions, np.int64)
    self._i2t_done = np.zeros(self.num_images, bool)
    self._t2i_done = np.zeros(self.num_images, bool)
    # Rows already checked for NaN/Inf (each is counted once, on its first add).
    self._scanned = np.zeros(self.num_images, bool)
    self._tally = NonFiniteTally("sims")
    if positive_scores is None:
      self._pos = None
      self._pos_known = np.zeros(self.num_images, bool)
    else:
      pos = np.asarray(positive_scores)
      if pos.shape != (self.num_captions,):
        raise ValueError(f"positive_scores has shape {pos.shape}, expected "
                         f"({self.num_captions},)")
      if np.issubdtype(pos.dtype, np.floating) and not np.isfinite(pos).all():
        bad = np.flatnonzero(~np.isfinite(pos))
        raise NonFiniteScoresError(
            f"positive_scores hold {bad.size} NaN/Inf values, first at captions "
            f"{bad[:MAX_POSITIONS_SHOWN].tolist()} (images "
            f"{(bad[:MAX_POSITIONS_SHOWN] // self.cpi).tolist()})")
      self._pos = pos
      self._pos_known = np.ones(self.num_images, bool)

  @property
  def positives_known(self) -> bool:
    """True once every caption's positive score is known (t2i rows can be counted)."""
    return bool(self._pos_known.all())

  @property
  def complete(self) -> bool:
    """True when every row has contributed to both directions."""
    return bool(self._i2t_done.all() and self._t2i_done.all())

  def needs_rows(self, row_offset: int, num_rows: int) -> bool:
    """Whether `add` of rows [row_offset, row_offset + num_rows) would still do work."""
    s = slice(row_offset, row_offset + num_rows)
    return bool((~self._i2t_done[s]).any() or (~self._t2i_done[s]).any())

  def add(self, row_offset: int, block) -> None:
    """Adds rows `row_offset ... row_offset + len(block) - 1` of the sims matrix."""
    block = np.asarray(block)
    if block.ndim != 2 or block.shape[1] != self.num_captions:
      raise ValueError(f"block has shape {block.shape}, expected (rows, "
                       f"{self.num_captions})")
    b = block.shape[0]
    row_offset = int(row_offset)
    if row_offset < 0 or row_offset + b > self.num_images:
      raise ValueError(f"rows [{row_offset}, {row_offset + b}) are outside "
                       f"[0, {self.num_images})")
    if b == 0:
      return
    s = slice(row_offset, row_offset + b)
    cpi = self.cpi
    finite = True
    for lo, hi in _pieces(~self._scanned[s]):
      finite &= self._tally.add(row_offset + lo, block[lo:hi])
    self._scanned[s] = True
    if not finite or self._tally.count:
      # Nothing of a matrix with NaN/Inf scores is ranked: `ranks()` raises, saying
      # how many there are and where, once every block has been seen.
      self._i2t_done[s] = True
      self._pos_known[s] = True
      self._t2i_done[s] = True
      return
    for lo, hi in _pieces(~self._i2t_done[s]):
      self._i2t[row_offset + lo:row_offset + hi] = _i2t_block(block[lo:hi], row_offset + lo,
                                                              cpi)
    self._i2t_done[s] = True
    if not self.positives_known:
      if self._pos is None:
        self._pos = np.zeros(self.num_captions, block.dtype)
      own = np.arange(row_offset * cpi, (row_offset + b) * cpi)
      self._pos[own] = block[own // cpi - row_offset, own]
      self._pos_known[s] = True
      if not self.positives_known:
        return
    for lo, hi in _pieces(~self._t2i_done[s]):
      self._t2i += _t2i_block(block[lo:hi], row_offset + lo, self._pos, cpi)
    self._t2i_done[s] = True

  def ranks(self) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (i2t_ranks (N_img,), t2i_ranks (N_cap,)), both int64 and 0-based.

    Raises NonFiniteScoresError if any block added held NaN or Inf scores.
    """
    self._tally.raise_if_any(self.num_images)
    missing_i2t = int((~self._i2t_done).sum())
    if missing_i2t:
      raise ValueError(f"RankAccumulator: {missing_i2t} of {self.num_images} image rows "
                       "were never added")
    missing_t2i = int((~self._t2i_done).sum())
    if missing_t2i:
      raise ValueError(
          f"RankAccumulator: t2i counts missing for {missing_t2i} image rows; the "
          "positive scores were not known when they were added: add the blocks again "
          "(second pass) or pass positive_scores")
    return self._i2t.copy(), self._t2i.copy()


def iter_row_blocks(sims, chunk_size: int = DEFAULT_CHUNK_SIZE
                    ) -> Iterator[Tuple[int, np.ndarray]]:
  """Yields (row_offset, block) for consecutive blocks of `chunk_size` rows of `sims`."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  for o in range(0, np.shape(sims)[0], chunk_size):
    yield o, np.asarray(sims[o:o + chunk_size])


def ranks(sims, cpi: int = 5, chunk_size: int = DEFAULT_CHUNK_SIZE,
          _check: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (i2t_ranks, t2i_ranks) of a whole matrix in one pass over row blocks.

  Raises NonFiniteScoresError if any score is NaN or Inf.
  """
  n_img, _ = _check_sims_shape(np.shape(sims), cpi)
  if _check:
    check_finite(sims, chunk_size=chunk_size)
  acc = RankAccumulator(n_img, cpi, positive_scores(sims, cpi))
  for o, block in iter_row_blocks(sims, chunk_size):
    acc.add(o, block)
  return acc.ranks()


def i2t_ranks(sims, cpi: int = 5,
              chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Returns (N_img,) int64: per image, the best 0-based rank among its captions.

  Raises NonFiniteScoresError if any score is NaN or Inf.
  """
  n_img, _ = _check_sims_shape(np.shape(sims), cpi)
  out = np.zeros(n_img, np.int64)
  tally = NonFiniteTally()
  for o, block in iter_row_blocks(sims, chunk_size):
    if tally.add(o, block) and not tally.count:
      out[o:o + len(block)] = _i2t_block(block, o, cpi)
  tally.raise_if_any(n_img)
  return out


def t2i_ranks(sims, cpi: int = 5,
              chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Returns (N_cap,) int64: per caption, the 0-based rank of its image in its column.

  Raises NonFiniteScoresError if any score is NaN or Inf.
  """
  n_img, _ = _check_sims_shape(np.shape(sims), cpi)
  pos = positive_scores(sims, cpi)
  out = np.zeros(pos.shape[0], np.int64)
  tally = NonFiniteTally()
  for o, block in iter_row_blocks(sims, chunk_size):
    if tally.add(o, block) and not tally.count:
      out += _t2i_block(block, o, pos, cpi)
  tally.raise_if_any(n_img)
  return out


def topk_stable(block: np.ndarray, k: int) -> np.ndarray:
  """(B, k) column indices of each row's k best scores, best first.

  Ties are broken by the smaller column index, both inside the k and at the k-th place
  (the order of a stable descending sort of the whole row, without sorting it: an
  `np.partition` finds the k-th value, then only the k selected columns are sorted).
  Integer scores are compared as float64. Raises ValueError if a row has fewer than k
  non-NaN scores.
  """
  if not np.issubdtype(block.dtype, np.floating):
    block = block.astype(np.float64)   # negation below must not wrap around
  b = block.shape[0]
  kth = -np.partition(-block, k - 1, axis=1)[:, k - 1]   # k-th largest per row
  if np.isnan(kth).any():
    raise ValueError(f"sims rows have fewer than {k} non-NaN scores")
  kv = kth[:, None]
  gt = block > kv
  eq = block == kv
  need = k - np.count_nonzero(gt, axis=1)
  sel = gt | eq
  crowded = np.flatnonzero(np.count_nonzero(eq, axis=1) > need)
  if crowded.size:
    # More ties at the k-th value than places left: keep the smallest indices.
    eqc = eq[crowded]
    sel[crowded] = gt[crowded] | (eqc & (np.cumsum(eqc, axis=1) <= need[crowded, None]))
  idx = np.nonzero(sel)[1].reshape(b, k)   # row-major: ascending index within a row
  vals = np.take_along_axis(block, idx, axis=1)
  order = np.argsort(-vals, axis=1, kind="stable")
  return np.take_along_axis(idx, order, axis=1)


def rerank_i2t_topk(sims, k: int = RERANK_K, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    column_width: Optional[int] = None) -> np.ndarray:
  """(N_img, k) caption indices: every image's top k after the authors' i2t re-rank.

  `rerank.py: i2t_rerank` with K1 = k: for image i, its top-k captions t_1..t_k (stable
  descending order of row i) are re-ordered, stably, by `address_j` = the rank of image
  i in caption t_j's t2i ordering (column t_j, stable descending). Positions beyond k
  are not changed by the re-rank.

  Equal addresses are common (several captions rank image i first) and keep their
  score order. That is what the authors' `np.argsort(address)` did with the numpy of
  their time (insertion sort below 17 elements); numpy >= 2 on AVX-512/AVX2 machines
  uses an unstable SIMD argsort there, so their script now gives machine-dependent
  re-ranked results.

  Two sweeps: row blocks find every image's top k; then column blocks of sims (all
  rows, `column_width` columns, default ~4M scores, so the gathers stay in cache) give
  the addresses of all the (image, caption) pairs whose caption falls in the block.
  """
  if np.ndim(sims) != 2:
    raise ValueError(f"sims must be 2-D (images x captions), got shape {np.shape(sims)}")
  n_img, n_cap = np.shape(sims)
  k = min(k, n_cap)
  top = np.empty((n_img, k), np.int64)
  vals = None
  tally = NonFiniteTally()
  for o, block in iter_row_blocks(sims, chunk_size):
    if not tally.add(o, block) or tally.count:
      continue
    t = topk_stable(block, k)
    if vals is None:
      vals = np.empty((n_img, k), block.dtype)
    top[o:o + len(block)] = t
    vals[o:o + len(block)] = np.take_along_axis(block, t, axis=1)
  tally.raise_if_any(n_img)

  cap, val = top.ravel(), vals.ravel()
  img = np.repeat(np.arange(n_img), k)
  by_cap = np.argsort(cap, kind="stable")
  width = column_width or max(1, (1 << 22) // n_img)
  edges = np.searchsorted(cap[by_cap], np.arange(0, n_cap + width, width))
  address = np.zeros(n_img * k, np.int64)
  row_index = np.arange(n_img)[:, None]
  for j, c0 in enumerate(range(0, n_cap, width)):
    pairs = by_cap[edges[j]:edges[j + 1]]
    if not pairs.size:
      continue
    sub = np.ascontiguousarray(sims[:, c0:c0 + width])
    cols = np.take(sub, cap[pairs] - c0, axis=1)                     # (n_img, m)
    v = val[pairs][None, :]
    gt = _count_true(cols > v, 0)
    ties = _count_true(cols >= v, 0) - gt - 1                        # besides image i
    tied = np.flatnonzero(ties > 0)   # exact ties, resolved by image index
    if tied.size:
      gt[tied] += _count_true((cols[:, tied] == v[:, tied])
                              & (row_index < img[pairs[tied]][None, :]), 0)
    address[pairs] = gt
  order = np.argsort(address.reshape(n_img, k), axis=1, kind="stable")
  return np.take_along_axis(top, order, axis=1)


def rerank_i2t_ranks(sims, i2t: np.ndarray, cpi: int = 5,
                     k: int = RERANK_K, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """i2t ranks after the authors' re-rank (see `rerank_i2t_topk`, K1 = k).

  `i2t` are the plain i2t ranks of `sims` (`i2t_ranks`), kept for images with no
  positive in their top k (the re-rank does not move anything beyond k).
  """
  n_img, _ = _check_sims_shape(np.shape(sims), cpi)
  out = np.asarray(i2t).astype(np.int64)
  if out.shape != (n_img,):
    raise ValueError(f"i2t ranks have shape {out.shape}, expected ({n_img},)")
  reranked = rerank_i2t_topk(sims, k, chunk_size)
  is_pos = (reranked // cpi) == np.arange(n_img)[:, None]
  return np.where(is_pos.any(axis=1), np.argmax(is_pos, axis=1), out)


def recall_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> Dict[str, float]:
  """R@1/5/10, medr, meanr both ways and rsum from 0-based ranks (plain floats)."""
  out = {}
  for name, r in (("i2t", np.asarray(i2t_ranks)), ("t2i", np.asarray(t2i_ranks))):
    if r.size == 0:
      raise ValueError(f"no {name} ranks")
    for kk in (1, 5, 10):
      # 100 * count / n, as the authors compute it (exact for whole percentages).
      out[f"r{kk}_{name}"] = 100.0 * int(np.count_nonzero(r < kk)) / r.size
    out[f"medr_{name}"] = float(np.floor(np.median(r)) + 1)
    out[f"meanr_{name}"] = float(np.mean(r) + 1)
  out["rsum"] = float(sum(out[f"r{kk}_{d}"] for d in ("i2t", "t2i") for kk in (1, 5, 10)))
  return {key: out[key] for key in METRIC_KEYS}


def mean_metrics(metrics: Sequence[Dict[str, float]]) -> Dict[str, float]:
  """Key-wise mean of several metric dicts (COCO 1K: the mean over the 5 folds)."""
  if not metrics:
    raise ValueError("no metrics to average")
  return {key: float(np.mean([m[key] for m in metrics])) for key in metrics[0]}


def fold_slices(num_images: int, cpi: int = 5,
                num_folds: int = 5) -> List[Tuple[slice, slice]]:
  """(rows, cols) slices of the COCO 1K folds: sequential blocks of N/num_folds images."""
  if num_images % num_folds:
    raise ValueError(
        f"5-fold evaluation needs a number of images divisible by {num_folds} (COCO 1K: "
        f"5000 test images in 5 folds of 1000); got {num_images}")
  fs = num_images // num_folds
  return [(slice(f * fs, (f + 1) * fs),
           slice(f * fs * cpi, (f + 1) * fs * cpi))
          for f in range(num_folds)]


def _evaluate_single(sims, cpi: int, rerank: bool, chunk_size: int) -> Dict[str, float]:
  r_i2t, r_t2i = ranks(sims, cpi, chunk_size, _check=False)  # checked by the caller
  if rerank:
    r_i2t = rerank_i2t_ranks(sims, r_i2t, cpi, RERANK_K, chunk_size)
  return recall_metrics(r_i2t, r_t2i)


def evaluate_sims(sims, cpi: int = 5, fold5: bool = False,
                  rerank: bool = False,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> Dict[str, float]:
  """Metrics of a (N_img, cpi * N_img) sims matrix (an array or a read-only memmap).

  fold5: the COCO 1K protocol, the mean of every metric over 5 sequential folds of N/5
  images (requires N % 5 == 0; N = 5000 for COCO). rerank: the authors' i2t re-rank
  (K1 = 15) applied within each evaluated matrix (each fold when fold5).

  Raises NonFiniteScoresError (a ValueError) if any score is NaN or Inf, with how many
  and the first positions (image row, caption column of the whole matrix).
  """
  n_img, _ = _check_sims_shape(np.shape(sims), cpi)
  check_finite(sims, chunk_size=chunk_size)
  if not fold5:
    return _evaluate_single(sims, cpi, rerank, chunk_size)
  return mean_metrics([
      _evaluate_single(sims[rs, cs], cpi, rerank, chunk_size)
      for rs, cs in fold_slices(n_img, cpi)])


def sum_sims(arrays: Sequence, names: Optional[Sequence[str]] = None) -> np.ndarray:
  """Sums several models' sims matrices (an ensemble); checks they have one shape.

  `names` (e.g. file paths) label the arrays in error messages. A single array is
  returned as is (no copy); otherwise the sum is a new array in the inputs' result
  dtype, at least float32 (float32 for float32 inputs, as the authors sum them; float16
  ones would overflow at 65504).
  """
  arrays = list(arrays)
  if not arrays:
    raise ValueError("sum_sims: no sims matrices given")
  if names is None:
    names = [f"sims[{i}]" for i in range(len(arrays))]
  names = list(names)
  if len(names) != len(arrays):
    raise ValueError(f"sum_sims: {len(names)} names for {len(arrays)} arrays")
  for a, n in zip(arrays, names):
    if np.ndim(a) != 2:
      raise ValueError(f"{n}: sims must be 2-D (images x captions), got shape "
                       f"{tuple(np.shape(a))}")
  shape0 = tuple(np.shape(arrays[0]))
  for a, n in zip(arrays[1:], names[1:]):
    if tuple(np.shape(a)) != shape0:
      raise ValueError(f"{n} has shape {tuple(np.shape(a))}, but {names[0]} has shape "
                       f"{shape0}: ensembled sims must have one shape")
  if len(arrays) == 1:
    return np.asarray(arrays[0])
  dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
  if not np.issubdtype(dtype, np.floating):
    dtype = np.float64
  # float16 files sum in float32: in float16 two scores of 40000 overflow to Inf.
  dtype = np.promote_types(dtype, np.float32)
  out = np.array(arrays[0], dtype=dtype, copy=True)
  for a in arrays[1:]:
    np.add(out, a, out=out)
  return out


TIE_RULE = ("stable descending sort: equal scores rank by index, the smaller first (caption "
            "index for i2t, image index for t2i)")


def protocol_info(num_images: int, cpi: int = 5, fold5: bool = False,
                  rerank: bool = False, split: Optional[str] = None, **extra) -> Dict:
  """The conditions a metrics dict was measured under, to store next to it (eval_results,
  `tools.rank`): split, sizes, folds, the i2t/t2i rules and the tie rule.

  `extra` entries (e.g. `two_stage=...`, `ensemble=...`) are added as they are.
  """
  folds = 5 if fold5 else 1
  per_fold = num_images // folds
  out = {"split": split, "num_images": int(num_images),
         "num_captions": int(num_images * cpi), "captions_per_image": int(cpi),
         "folds": folds,
         "fold_images": int(per_fold),
         "fold_rule": ("metrics averaged over 5 sequential folds of N/5 images" if fold5
                       else "one matrix of all images"),
         "i2t": f"rank of the best-ranked of an image's {cpi} captions",
         "t2i": "rank of the caption's own image",
         "tie_rule": TIE_RULE,
         "rerank": f"authors' i2t re-rank, top {RERANK_K}" if rerank else None}
  out.update(extra)
  return out

"""Short lists, shared by two-stage evaluation and two-stage search: a first stage's
top K per query, and the order a second stage's scores give them.

The final ordering of a query: its short list sorted by the second stage's score
(`fusion = w`: by `(1 - w) * second + w * first`), ties by index, then every other item
in the first stage's order. Ranks follow `ranking.py` exactly: i2t, the best rank among
an image's captions; t2i, the rank of the caption's image. So a ground truth inside the
short list is ranked by its position in the re-scored list, and one outside keeps its
first-stage rank (everything in the short list is ahead of it in both orderings). With
K >= the gallery size the result is the full evaluation of the second model.
"""
import dataclasses
from typing import Dict, Tuple

import numpy as np

from dsran_jax import ranking


class ShortlistError(ValueError):
  """The shortlist workdir cannot serve this evaluation (another dataset or split, no
  checkpoint, a bad K): the message names the workdir, the key and both values."""


@dataclasses.dataclass
class ShortLists:
  """The first stage of one gallery (N images, cpi * N captions).

  Attributes:
    i2t / i2t_scores: (N, K_i) caption indices of each image's top K_i captions (stable
      descending order of the first stage's scores) and those scores.
    t2i / t2i_scores: (cpi N, K_t) image indices of each caption's top K_t images.
    i2t_ranks / t2i_ranks: the first stage's own 0-based ranks (`ranking.ranks`).
  """
  i2t: np.ndarray
  i2t_scores: np.ndarray
  t2i: np.ndarray
  t2i_scores: np.ndarray
  i2t_ranks: np.ndarray
  t2i_ranks: np.ndarray

  @property
  def k_i2t(self) -> int:
    return int(self.i2t.shape[1])

  @property
  def k_t2i(self) -> int:
    return int(self.t2i.shape[1])

  def recall(self) -> Dict[str, float]:
    """How often the ground truth is inside the short list, in percent (i2t: any of the
    image's captions; t2i: the caption's image)."""
    return {"i2t": 100.0 * float(np.mean(self.i2t_ranks < self.k_i2t)),
            "t2i": 100.0 * float(np.mean(self.t2i_ranks < self.k_t2i))}


def check_k(k) -> int:
  """K as an int, or a ShortlistError if it is not an integer >= 1."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ShortlistError(f"shortlist k must be an integer >= 1, got {k!r}")
  return int(k)


def short_lists(sims, k: int, cpi: int = 5,
                chunk_size: int = ranking.DEFAULT_CHUNK_SIZE) -> ShortLists:
  """Top-k lists of both directions and the first stage's ranks of a sims matrix.

  Args:
    sims: (N, cpi N) first-stage scores (array or memmap); read in row blocks for i2t
      and in column slabs for t2i, never whole.
    k: candidates per query; capped at the gallery size of each direction.
  Raises NonFiniteScoresError on NaN/Inf scores.
  """
  k = check_k(k)
  n_img, n_cap = np.shape(sims)
  r_i2t, r_t2i = ranking.ranks(sims, cpi, chunk_size)  # checks shape and finiteness
  ki, kt = min(k, n_cap), min(k, n_img)
  i2t = np.empty((n_img, ki), np.int64)
  i2t_scores = np.empty((n_img, ki), np.float32)
  for o, block in ranking.iter_row_blocks(sims, chunk_size):
    top = ranking.topk_stable(block, ki)
    i2t[o:o + len(block)] = top
    i2t_scores[o:o + len(block)] = np.take_along_axis(block, top, axis=1)
  t2i = np.empty((n_cap, kt), np.int64)
  t2i_scores = np.empty((n_cap, kt), np.float32)
  # Column slabs of ~4M scores: a transposed slab is (captions, images), ranked by row.
  width = max(1, (1 << 22) // max(n_img, 1))
  for c0 in range(0, n_cap, width):
    slab = np.ascontiguousarray(np.asarray(sims[:, c0:c0 + width]).T)
    top = ranking.topk_stable(slab, kt)
    t2i[c0:c0 + len(slab)] = top
    t2i_scores[c0:c0 + len(slab)] = np.take_along_axis(slab, top, axis=1)
  return ShortLists(i2t, i2t_scores, t2i, t2i_scores, r_i2t, r_t2i)


def check_fusion(fusion) -> float:
  """The fusion weight as a float, or a ShortlistError if it is not in [0, 1]."""
  if isinstance(fusion, bool) or not isinstance(fusion, (int, float, np.floating)) or \
      not 0.0 <= float(fusion) <= 1.0:
    raise ShortlistError(f"shortlist fusion weight must be in [0, 1], got {fusion!r}")
  return float(fusion)


def fuse(second: np.ndarray, first: np.ndarray, fusion: float) -> np.ndarray:
  """The scores a short list is ordered by: the second stage's (fusion 0), or the
  weighted sum `(1 - fusion) * second + fusion * first` (in float64)."""
  if check_fusion(fusion) == 0:
    return second
  return (1.0 - fusion) * second.astype(np.float64) + fusion * first.astype(np.float64)


def shortlist_ranks(candidates: np.ndarray, scores: np.ndarray, positive: np.ndarray,
                    first_ranks: np.ndarray) -> np.ndarray:
  """0-based ranks after re-ordering each query's short list by `scores`.

  Args:
    candidates: (Q, K) gallery indices of each query's short list.
    scores: (Q, K) the scores the short list is ordered by (descending, ties by index).
    positive: (Q, K) bool, True where the candidate is a ground truth of the query.
    first_ranks: (Q,) the first stage's ranks, kept where no ground truth is listed.
  Returns:
    (Q,) int64: the position of the query's best-placed ground truth.
  """
  has = positive.any(axis=1)
  v = np.max(np.where(positive, scores, -np.inf), axis=1)
  tied = positive & (scores == v[:, None])
  # The best ground truth: the highest score, the smallest index among equal ones.
  best = np.min(np.where(tied, candidates, np.iinfo(np.int64).max), axis=1)
  vv, bb = v[:, None], best[:, None]
  ahead = (scores > vv) | ((scores == vv) & (candidates < bb))
  return np.where(has, np.count_nonzero(ahead, axis=1), first_ranks).astype(np.int64)


def two_stage_ranks(shortlist: ShortLists, second_i2t: np.ndarray, second_t2i: np.ndarray,
                    cpi: int = 5, fusion: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
  """(i2t ranks (N,), t2i ranks (cpi N,)) of the two-stage ordering (module docstring),
  from the second stage's scores of the short lists (`second_*`, shaped like
  `shortlist.i2t` / `shortlist.t2i`)."""
  s = shortlist
  for name, got, want in (("i2t", second_i2t, s.i2t), ("t2i", second_t2i, s.t2i)):
    if np.shape(got) != want.shape:
      raise ValueError(f"second-stage {name} scores have shape {np.shape(got)}, expected "
                       f"{want.shape} (one per short-list entry)")
  n_img, n_cap = s.i2t.shape[0], s.t2i.shape[0]
  pos_i2t = (s.i2t // cpi) == np.arange(n_img)[:, None]
  pos_t2i = s.t2i == (np.arange(n_cap) // cpi)[:, None]
  i2t = shortlist_ranks(s.i2t, fuse(np.asarray(second_i2t), s.i2t_scores, fusion), pos_i2t,
                        s.i2t_ranks)
  t2i = shortlist_ranks(s.t2i, fuse(np.asarray(second_t2i), s.t2i_scores, fusion), pos_t2i,
                        s.t2i_ranks)
  return i2t, t2i


def order_query(first_scores: np.ndarray, first_ids: np.ndarray, second: np.ndarray,
                k: int, fusion: float):
  """[(item, score, first-stage score, stage)] of one query: its first `k` items (the
  short list) ordered by the fused score, ties by index, then the rest of `first_ids`
  in the first stage's order (stage 1)."""
  cand = np.asarray(first_ids[:k])
  fused = np.asarray(fuse(np.asarray(second), np.asarray(first_scores[:k]), fusion),
                     np.float64)
  order = np.lexsort((cand, -fused))
  out = [(int(cand[o]), float(fused[o]), float(first_scores[o]), 2) for o in order]
  out += [(int(i), float(v), float(v), 1) for i, v in zip(first_ids[k:], first_scores[k:])]
  return out

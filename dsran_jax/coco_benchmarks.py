"""ECCV Caption, CxC and COCO 1K/5K on COCO 5K sims matrices (numpy), with the ground
truths of the `eccv-caption` package (the `eccv` extra: `pip install "dsran_jax[eccv]"`).

The package (0.1.0, NAVER AI) ships every benchmark's positives keyed by COCO image ids
and caption annotation ids (`eccv_caption/data/{original,cxc,eccv}_{image_to_caption,
caption_to_image}.json`) and `coco_test_ids.npy`, the 25,000 caption annotation ids of
the COCO 5K test split in VSE++ order (captions 5i..5i+4 describe image i). Its `Metrics`
defines the metrics; this module computes the same numbers on a sims matrix, fast:

- what the project owns is the map from the matrix's rows and columns to COCO ids
  (`CocoLayout`): the package order itself, a COCO split read in VSE++ order
  (`data.format="coco_vsepp"`), or one caption annotation id per caption row given by the
  user; ids the package does not know, duplicates, a caption on another image's row and
  queries a benchmark needs but the matrix lacks are refused, naming what is wrong;
- every query's ranking is the project's (`ranking.topk_stable`: a stable descending
  sort, equal scores ranked by the smaller index), cut at the depth its metrics read
  (10 for R@K, R for mAP@R and R-Precision): a partition per row instead of the
  package's Python loops over full rankings, so a 5K evaluation with every benchmark
  takes seconds;
- R counts every positive the package lists, also the few ECCV positives outside the
  5K test ids (they can never be retrieved; the package keeps them in R and so do we);
- COCO 1K folds are the package's: the captions of `coco_test_ids[5000 f: 5000 (f+1)]`
  and their images, ranked within the fold (the same as `ranking.py`'s folds when the
  matrix is in the package order).

Values are percentages, unrounded (the package's fractions x 100). With `i2t_head` (the
authors' re-ranked top 15 of each image, `ranking.rerank_i2t_topk`) the i2t lists start
with it (`tools.rank --rerank`).

`evaluation/eccv.py` is the evaluator of a workdir's test split built on this module;
`tools.rank --eccv` uses it directly (no jax import).
"""
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from dsran_jax import integrity, ranking

EXTRA_INSTALL = 'pip install "dsran_jax[eccv]"'
PACKAGE = "eccv_caption"
DIST = "eccv-caption"
CPI = 5
NUM_TEST_IMAGES = 5000
NUM_FOLDS = 5
RECALL_KS = (1, 5, 10)
DEPTH_FLOOR = max(RECALL_KS)
# benchmark -> the package's file prefix of its ground truth
GT_PREFIX = {"coco": "original", "cxc": "cxc", "eccv": "eccv"}
PM_FILES = ("pm_image_to_caption.json", "pm_caption_to_image.json")
BENCHMARKS = ("eccv", "cxc", "coco_5k", "coco_1k", "pmrp")
DEFAULT_BENCHMARKS = ("eccv", "cxc")
NAMES = {"eccv": "ECCV Caption (Chun et al., ECCV 2022): mAP@R, R-Precision, R@1",
         "cxc": "CxC (Parekh et al., EACL 2021): R@1/5/10",
         "coco_5k": "COCO 5K R@1/5/10 (the package's ground truth)",
         "coco_1k": "COCO 1K R@1/5/10, mean of the package's 5 folds",
         "pmrp": "Plausible Match R-Precision (ECCV Caption paper)"}
TIE_RULE = ("equal scores rank by index, the smaller first (row for t2i, column for i2t); "
            "the package ranks the lists it is given")
SHOWN = 5


class MissingExtraError(RuntimeError):
  """The optional `eccv-caption` package is not installed."""


class LayoutError(ValueError):
  """Ids that do not fit a sims matrix or a benchmark (unknown, duplicated, on the wrong
  image row, or not covering the benchmark's queries)."""


def _shown(values: Iterable) -> str:
  values = list(values)
  more = f" ... ({len(values)} in all)" if len(values) > SHOWN else ""
  return ", ".join(str(v) for v in values[:SHOWN]) + more


# -- the package's files ------------------------------------------------------------------

def package_dir() -> str:
  """The installed `eccv_caption` package's directory (its `data/` holds the ground
  truths), without importing it; MissingExtraError naming the extra when it is absent."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.origin:
    raise MissingExtraError(
        f"ECCV Caption / CxC evaluation needs the eccv-caption package: {EXTRA_INSTALL}")
  return os.path.dirname(spec.origin)


def package_version() -> str:
  """The installed eccv-caption version ("unknown" if its metadata is missing)."""
  try:
    return importlib.metadata.version(DIST)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def sha256(path: str) -> str:
  """Hex sha256 of a file (the protocol record names the algorithm)."""
  return integrity.file_digest(path, algorithm="sha256")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """One benchmark's positives: {query id: unique positive ids}, both directions.

  `i2t` maps COCO image ids to caption annotation ids, `t2i` caption annotation ids to
  image ids; `files` {path: sha256} of the files read."""
  name: str
  i2t: Dict[int, np.ndarray]
  t2i: Dict[int, np.ndarray]
  files: Dict[str, str]


def _read_gt_json(path: str) -> Dict[int, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (ground truth)")
  try:
    with open(path, "rb") as f:
      obj = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a valid JSON ground-truth file: {e}") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected an object {{query id: [positive ids]}}")
  try:
    # The package takes set(...) of each list: duplicates count once.
    return {int(k): np.unique(np.asarray(v, np.int64)) for k, v in obj.items()}
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: ids must be integers: {e}") from e


@functools.lru_cache(maxsize=8)
def _load_gt(name: str, i2t_path: str, t2i_path: str, mtimes: Tuple[float, float]
             ) -> GroundTruth:
  del mtimes  # cache key only: a changed file is read again
  return GroundTruth(name, _read_gt_json(i2t_path), _read_gt_json(t2i_path),
                     {i2t_path: sha256(i2t_path), t2i_path: sha256(t2i_path)})


def _gt_paths(benchmark: str, pm_dir: Optional[str]) -> Tuple[str, str]:
  if benchmark == "pmrp":
    if not pm_dir:
      raise ValueError("pmrp needs the plausible-match files: give their directory "
                       f"(--pm_dir / eval.eccv_pm_dir) holding {' and '.join(PM_FILES)}")
    return tuple(os.path.join(pm_dir, f) for f in PM_FILES)
  prefix = GT_PREFIX[benchmark.split("_")[0]]
  d = os.path.join(package_dir(), "data")
  return (os.path.join(d, f"{prefix}_image_to_caption.json"),
          os.path.join(d, f"{prefix}_caption_to_image.json"))


def load_ground_truth(benchmark: str, pm_dir: Optional[str] = None) -> GroundTruth:
  """The positives of `benchmark` ("eccv", "cxc", "coco_5k"/"coco_1k" (COCO's own),
  "pmrp" from `pm_dir`), cached per file version."""
  i2t_path, t2i_path = _gt_paths(benchmark, pm_dir)
  mtimes = tuple(os.path.getmtime(p) if os.path.exists(p) else 0.0
                 for p in (i2t_path, t2i_path))
  return _load_gt(benchmark.split("_")[0], i2t_path, t2i_path, mtimes)


def pm_files_present(pm_dir: Optional[str]) -> bool:
  """Whether `pm_dir` holds both plausible-match files."""
  return bool(pm_dir) and all(os.path.isfile(os.path.join(pm_dir, f)) for f in PM_FILES)


def test_ids_path() -> str:
  """The package's `coco_test_ids.npy`."""
  return os.path.join(package_dir(), "data", "coco_test_ids.npy")


@functools.lru_cache(maxsize=1)
def package_test_ids() -> np.ndarray:
  """The 25,000 caption annotation ids of COCO 5K test in VSE++ order (int64)."""
  ids = np.load(test_ids_path(), allow_pickle=False).astype(np.int64)
  ids.setflags(write=False)
  return ids


@functools.lru_cache(maxsize=1)
def _caption_image_table() -> Tuple[np.ndarray, np.ndarray]:
  """(sorted caption ids, their image ids) of the 25K test captions, from COCO's own
  ground truth of the package (`original_caption_to_image.json`)."""
  t2i = load_ground_truth("coco_5k").t2i
  caps = np.fromiter(t2i.keys(), np.int64, len(t2i))
  imgs = np.array([v[0] for v in t2i.values()], np.int64)
  order = np.argsort(caps)
  return caps[order], imgs[order]


def caption_images(caption_ids: np.ndarray) -> np.ndarray:
  """COCO image id of each caption annotation id (-1 if not a 5K test caption)."""
  caps, imgs = _caption_image_table()
  caption_ids = np.asarray(caption_ids, np.int64)
  pos = np.clip(np.searchsorted(caps, caption_ids), 0, len(caps) - 1)
  return np.where(caps[pos] == caption_ids, imgs[pos], -1)


# -- rows and columns -> COCO ids ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CocoLayout:
  """The COCO ids of a sims matrix's rows (`image_ids`) and columns (`caption_ids`,
  caption annotation ids); caption j describes row j // cpi. `source` says where the ids
  came from (stored in the protocol record)."""
  image_ids: np.ndarray
  caption_ids: np.ndarray
  source: str

  @property
  def cpi(self) -> int:
    return len(self.caption_ids) // max(1, len(self.image_ids))

  @property
  def package_order(self) -> bool:
    """True when the matrix is in the package's `coco_test_ids` order."""
    return np.array_equal(self.caption_ids, package_test_ids())


def layout_from_caption_ids(caption_ids, cpi: int = CPI, image_ids=None,
                            source: str = "caption ids") -> CocoLayout:
  """The layout of a matrix whose column j is caption annotation `caption_ids[j]`.

  Row i's image is that of captions cpi*i..cpi*i+cpi-1 (COCO's own caption -> image map
  in the package); `image_ids`, when the reader knows them, must agree.

  Raises:
    LayoutError: a count that is not cpi per image, ids the package's COCO 5K test set
      does not hold, a caption id given twice, captions of one row that belong to
      different images, or `image_ids` that contradict the captions.
  """
  caption_ids = np.asarray(caption_ids)
  if caption_ids.ndim != 1 or not np.issubdtype(caption_ids.dtype, np.integer):
    raise LayoutError(f"{source}: expected a 1-D list of integer caption annotation ids, "
                      f"got {caption_ids.dtype} of shape {caption_ids.shape}")
  caption_ids = caption_ids.astype(np.int64)
  n = len(caption_ids)
  if n == 0 or n % cpi:
    raise LayoutError(f"{source}: {n} caption ids, expected {cpi} per image row")
  uniq, counts = np.unique(caption_ids, return_counts=True)
  if (counts > 1).any():
    raise LayoutError(f"{source}: caption ids given more than once: "
                      f"{_shown(uniq[counts > 1].tolist())}")
  imgs = caption_images(caption_ids)
  unknown = np.flatnonzero(imgs < 0)
  if unknown.size:
    raise LayoutError(
        f"{source}: {unknown.size} of {n} ids are not caption annotation ids of the COCO "
        f"5K test split (eccv_caption's coco_test_ids.npy): "
        f"{_shown(f'{caption_ids[j]} (column {j})' for j in unknown)}")
  rows = imgs.reshape(-1, cpi)
  derived = rows[:, 0]
  wrong = np.argwhere(rows != derived[:, None])
  if wrong.size:
    msgs = [f"caption {caption_ids[i * cpi + k]} (column {i * cpi + k}) is of image "
            f"{rows[i, k]}, but row {i} holds image {derived[i]}" for i, k in wrong]
    raise LayoutError(f"{source}: {len(msgs)} captions sit on another image's row: "
                      f"{_shown(msgs)}")
  if image_ids is not None:
    given = np.asarray(image_ids, np.int64)
    if given.shape != derived.shape:
      raise LayoutError(f"{source}: {len(given)} image ids for {len(derived)} image rows")
    bad = np.flatnonzero(given != derived)
    if bad.size:
      raise LayoutError(
          f"{source}: image ids contradict the captions at {bad.size} rows: "
          f"{_shown(f'row {i}: image {given[i]}, its captions are of {derived[i]}' for i in bad)}")
  dup_img, c = np.unique(derived, return_counts=True)
  if (c > 1).any():
    raise LayoutError(f"{source}: images on more than one row: "
                      f"{_shown(dup_img[c > 1].tolist())}")
  return CocoLayout(derived, caption_ids, source)


def package_layout() -> CocoLayout:
  """The package's own order: columns = `coco_test_ids.npy`, 5 per image row."""
  return layout_from_caption_ids(package_test_ids(), CPI,
                                 source="eccv_caption coco_test_ids.npy order")


def read_caption_ids(path: str) -> np.ndarray:
  """Caption annotation ids from a `.npy` (1-D integers) or a text file (one per line)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (caption annotation ids, one per caption row)")
  if path.endswith(".npy"):
    try:
      ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise LayoutError(f"{path}: cannot read as .npy: {e}") from e
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise LayoutError(f"{path}: expected a 1-D integer array of caption annotation ids, "
                        f"got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)
  with open(path, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f.read().split("\n")]
  while lines and not lines[-1]:
    lines.pop()
  try:
    return np.array([int(ln) for ln in lines], np.int64)
  except ValueError:
    bad = next(i for i, ln in enumerate(lines) if not ln.lstrip("-").isdigit())
    raise LayoutError(f"{path}: line {bad + 1} is {lines[bad]!r}, expected one integer "
                      f"caption annotation id per line") from None


# -- ranking to the depth the metrics read ------------------------------------------------

def _tops(sims, axis: int, queries: np.ndarray, depth: int,
          block: int = 256, column_width: int = 2048) -> np.ndarray:
  """(len(queries), depth) item indices of each query's best `depth`, best first, ties
  by the smaller index: rows of `sims` for i2t (axis 0), its columns for t2i (axis 1)."""
  queries = np.asarray(queries, np.int64)
  out = np.empty((len(queries), depth), np.int64)
  if axis == 0:
    order = np.argsort(queries, kind="stable")   # rows read in file order
    for s in range(0, len(order), block):
      sel = order[s:s + block]
      out[sel] = ranking.topk_stable(np.asarray(sims[queries[sel]]), depth)
    return out
  # t2i: read column ranges once, rank the query columns inside each.
  n_cap = np.shape(sims)[1]
  for c0 in range(0, n_cap, column_width):
    sel = np.flatnonzero((queries >= c0) & (queries < c0 + column_width))
    if not sel.size:
      continue
    cols = np.asarray(sims[:, c0:c0 + column_width])
    out[sel] = ranking.topk_stable(np.ascontiguousarray(cols[:, queries[sel] - c0].T), depth)
  return out


def top_items(sims, direction: str, queries, depth: int) -> np.ndarray:
  """(len(queries), depth) indices of each query's best `depth` items, best first, equal
  scores by the smaller index: captions of image rows `queries` ("i2t") or images of
  caption columns `queries` ("t2i")."""
  if direction not in ("i2t", "t2i"):
    raise ValueError(f"direction {direction!r}: expected 'i2t' or 't2i'")
  axis = 0 if direction == "i2t" else 1
  return _tops(sims, axis, np.asarray(queries, np.int64),
               min(depth, np.shape(sims)[1 - axis]))


def _best_ranks(sims, axis: int, sets, block: int = 256) -> List[np.ndarray]:
  """For each `(queries, positives)` of `sets`: the rank of every query's best-ranked
  positive (`ranking.py`'s rule: #greater + #equal at a smaller index), or the gallery
  size when none is in the matrix. One pass over the matrix for all sets: row blocks for
  i2t (axis 0), column blocks, transposed, for t2i (axis 1); two comparisons an element,
  as `ranking.py` ranks, instead of a partition."""
  n_q, n_items = np.shape(sims)[axis], np.shape(sims)[1 - axis]
  prepared, out = [], []
  for queries, positives in sets:
    lens = np.array([len(p) for p in positives], np.int64)
    has = np.flatnonzero(lens > 0)
    order = has[np.argsort(queries[has], kind="stable")]
    prepared.append((queries[order], order, [positives[i] for i in order]))
    out.append(np.full(len(queries), n_items, np.int64))
  for lo in range(0, n_q, block):
    hi = min(n_q, lo + block)
    if axis == 0:
      blk = np.asarray(sims[lo:hi])
    else:
      blk = np.ascontiguousarray(np.asarray(sims[:, lo:hi]).T)
    for (q_sorted, order, pos), ranks in zip(prepared, out):
      a, b = np.searchsorted(q_sorted, [lo, hi])
      if a == b:
        continue
      local = q_sorted[a:b] - lo
      group = pos[a:b]
      lens = np.array([len(p) for p in group], np.int64)
      items = np.concatenate(group)
      owner = np.repeat(np.arange(b - a), lens)
      vals = blk[local[owner], items]
      starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
      best = np.maximum.reduceat(vals, starts)
      first = np.minimum.reduceat(np.where(vals == best[owner], items, n_items), starts)
      rows = blk[local]
      v = best[:, None]
      gt = ranking._count_true(rows > v, 1)  # pylint: disable=protected-access
      ties = ranking._count_true(rows >= v, 1) - gt - 1  # pylint: disable=protected-access
      for t in np.flatnonzero(ties > 0):   # exact ties: the smaller index ranks first
        gt[t] += int(np.count_nonzero(rows[t, :first[t]] == best[t]))
      ranks[order[a:b]] = gt
  return out


def _hits(tops: np.ndarray, positives: List[np.ndarray], width: int) -> np.ndarray:
  """(Q, depth) bool: whether each listed item (an index below `width`) is a positive
  of its query."""
  q, depth = tops.shape
  keys = (np.arange(q, dtype=np.int64)[:, None] * width + tops).ravel()
  pos_keys = np.concatenate(
      [i * width + p for i, p in enumerate(positives)] or [np.zeros(0, np.int64)])
  return np.isin(keys, pos_keys).reshape(q, depth)


def _percent(mask: np.ndarray) -> float:
  """100 * count / n, as `ranking.recall_metrics` computes it (the same float)."""
  return 100.0 * int(np.count_nonzero(mask)) / mask.size


def _recalls(hits: np.ndarray, ks=RECALL_KS) -> Dict[str, float]:
  return {f"r@{k}": _percent(hits[:, :k].any(axis=1)) for k in ks}


def _eccv(hits: np.ndarray, r: np.ndarray) -> Dict[str, float]:
  """mAP@R, R-Precision and R@1 (percent): with R = a query's positives (all the package
  lists), mAP@R = mean over r <= R of [item r positive] * precision@r, R-Precision =
  precision@R, as `eccv_caption._metrics.compute_eccv_metrics`."""
  depth = hits.shape[1]
  within = np.arange(depth)[None, :] < r[:, None]
  h = hits & within
  cum = np.cumsum(h, axis=1)
  prec_at = cum / np.arange(1, depth + 1)[None, :]
  ap = (prec_at * h).sum(axis=1) / r
  rprec = cum[:, -1] / r
  return {"map@r": 100.0 * float(np.mean(ap)), "r-precision": 100.0 * float(np.mean(rprec)),
          "r@1": _percent(hits[:, 0])}


@dataclasses.dataclass
class _Direction:
  """One direction of one benchmark on one matrix: the query indices, the positives'
  item indices, R (every positive the ground truth lists), and the ids of queries and
  positives the matrix lacks."""
  queries: np.ndarray
  positives: List[np.ndarray]
  r: np.ndarray
  missing_queries: List[int]
  outside: int


def _direction(gt: Dict[int, np.ndarray], query_index: Dict[int, int],
               item_index: Dict[int, int]) -> _Direction:
  queries, positives, r, missing, outside = [], [], [], [], 0
  for qid, pos in gt.items():
    qi = query_index.get(qid)
    if qi is None:
      missing.append(qid)
      continue
    idx = [item_index[p] for p in pos.tolist() if p in item_index]
    outside += len(pos) - len(idx)
    queries.append(qi)
    positives.append(np.asarray(idx, np.int64))
    r.append(len(pos))
  return _Direction(np.asarray(queries, np.int64), positives, np.asarray(r, np.int64),
                    missing, outside)


def _check_sims(sims, layout: CocoLayout) -> None:
  shape = tuple(np.shape(sims))
  want = (len(layout.image_ids), len(layout.caption_ids))
  if shape != want:
    raise LayoutError(f"sims has shape {shape}, but the ids ({layout.source}) give "
                      f"{want[0]} image rows and {want[1]} caption columns")


def _evaluate_on(sims, layout: CocoLayout, gts: Dict[str, GroundTruth],
                 i2t_head: Optional[np.ndarray], kinds: Dict[str, str]
                 ) -> Tuple[Dict[str, dict], Dict[str, dict]]:
  """Metrics of each benchmark in `gts` on one matrix; `kinds` {benchmark: "recall" |
  "eccv" | "rprecision"}. Returns (results, per-benchmark counts)."""
  img_index = {int(v): i for i, v in enumerate(layout.image_ids)}
  cap_index = {int(v): j for j, v in enumerate(layout.caption_ids)}
  dirs = {}
  for name, gt in gts.items():
    d = {"i2t": _direction(gt.i2t, img_index, cap_index),
         "t2i": _direction(gt.t2i, cap_index, img_index)}
    for way, dd in d.items():
      if dd.missing_queries:
        kind = "images" if way == "i2t" else "captions"
        raise LayoutError(
            f"{name}: {len(dd.missing_queries)} of its {len(gt.i2t if way == 'i2t' else gt.t2i)} "
            f"{way} query {kind} are not in the matrix ({layout.source}): "
            f"{_shown(dd.missing_queries)}")
    dirs[name] = d
  results, counts = {}, {}
  for way, axis in (("i2t", 0), ("t2i", 1)):
    for n, d in dirs.items():
      counts.setdefault(n, {})[way] = {"queries": int(d[way].queries.size),
                                       "positives": int(d[way].r.sum()),
                                       "positives_outside_matrix": int(d[way].outside)}
    head = i2t_head if way == "i2t" else None
    # R@K reads only the best positive's rank: counted in one pass (no lists), unless a
    # re-ranked head reorders the lists.
    counted = [n for n in dirs if kinds[n] == "recall" and head is None]
    if counted:
      best = _best_ranks(sims, axis, [(dirs[n][way].queries, dirs[n][way].positives)
                                      for n in counted])
      for n, ranks in zip(counted, best):
        results.setdefault(n, {})[way] = {f"r@{k}": _percent(ranks < k) for k in RECALL_KS}
    wanted = [(n, d[way]) for n, d in dirs.items() if n not in counted]
    if not wanted:
      continue
    queries = np.unique(np.concatenate([d.queries for _, d in wanted]))
    depth = DEPTH_FLOOR
    for n, d in wanted:
      if kinds[n] != "recall" and d.r.size:
        depth = max(depth, int(d.r.max()))
    if way == "i2t" and i2t_head is not None:
      depth = max(depth, i2t_head.shape[1])
    depth = min(depth, np.shape(sims)[1 - axis])
    tops = _tops(sims, axis, queries, depth)
    if way == "i2t" and i2t_head is not None:
      tops[:, :i2t_head.shape[1]] = i2t_head[queries]
    row_of = np.searchsorted(queries, np.arange(np.shape(sims)[axis]))
    for n, d in wanted:
      hits = _hits(tops[row_of[d.queries]], d.positives, np.shape(sims)[1 - axis])
      if kinds[n] == "recall":
        m = _recalls(hits)
      elif kinds[n] == "eccv":
        m = _eccv(hits, d.r)
      else:
        m = {"r-precision": _eccv(hits, d.r)["r-precision"]}
      results.setdefault(n, {})[way] = m
  return results, counts


KINDS = {"eccv": "eccv", "cxc": "recall", "coco_5k": "recall", "coco_1k": "recall",
         "pmrp": "rprecision"}


def evaluate_benchmarks(sims, layout: Optional[CocoLayout] = None,
                        benchmarks: Sequence[str] = DEFAULT_BENCHMARKS,
                        pm_dir: Optional[str] = None, rerank: bool = False,
                        check_finite: bool = True,
                        i2t_head: Optional[np.ndarray] = None) -> Dict[str, dict]:
  """Metrics of a COCO 5K sims matrix (rows images, columns captions) on each benchmark.

  Args:
    sims: (5000, 25000) array or memmap; row i / column j are `layout`'s ids.
    layout: default `package_layout()` (the matrix is in `coco_test_ids` order).
    benchmarks: any of BENCHMARKS.
    pm_dir: directory of the plausible-match files (for "pmrp").
    rerank: i2t lists start with the authors' re-ranked top 15 (`ranking.rerank_i2t_topk`;
      for COCO 1K, of each fold's matrix).
    i2t_head: with `rerank`, `ranking.rerank_i2t_topk(sims)` when the caller has it.
  Returns:
    {"eccv": {"i2t": {"map@r", "r-precision", "r@1"}, "t2i": {...}}, "cxc": {"i2t":
    {"r@1", "r@5", "r@10"}, ...}, "coco_5k"/"coco_1k": like cxc, "pmrp": {"i2t": {
    "r-precision"}, ...}} in percent, and "protocol": the record of `protocol_record`.
  """
  unknown = [b for b in benchmarks if b not in BENCHMARKS]
  if unknown:
    raise ValueError(f"unknown benchmarks {unknown}; expected some of {list(BENCHMARKS)}")
  layout = package_layout() if layout is None else layout
  _check_sims(sims, layout)
  if check_finite:
    ranking.check_finite(sims)
  gts = {b: load_ground_truth(b, pm_dir) for b in benchmarks}
  whole = {b: g for b, g in gts.items() if b != "coco_1k"}
  results, counts = {}, {}
  if whole:
    head = None
    if rerank:
      head = ranking.rerank_i2t_topk(sims) if i2t_head is None else np.asarray(i2t_head)
      if head.shape != (np.shape(sims)[0], min(ranking.RERANK_K, np.shape(sims)[1])):
        raise ValueError(f"i2t_head has shape {head.shape}, expected one re-ranked top "
                         f"{ranking.RERANK_K} per image row")
    r, c = _evaluate_on(sims, layout, whole, head, KINDS)
    results.update(r)
    counts.update(c)
  if "coco_1k" in gts:
    results["coco_1k"], counts["coco_1k"] = _coco_1k(sims, layout, gts["coco_1k"], rerank)
  out = {b: results[b] for b in benchmarks}
  out["protocol"] = protocol_record(benchmarks, gts, counts, layout, rerank)
  return out


def _coco_1k(sims, layout: CocoLayout, gt: GroundTruth, rerank: bool):
  """COCO 1K as the package computes it: fold f holds the captions of
  `coco_test_ids[5000 f: 5000 (f + 1)]` and their images; lists are ranked within the
  fold (in the matrix's order); every metric is the mean over the folds."""
  ids = package_test_ids()
  per = len(ids) // NUM_FOLDS
  cap_col = {int(v): j for j, v in enumerate(layout.caption_ids)}
  img_row = {int(v): i for i, v in enumerate(layout.image_ids)}
  fold_results, counts = [], None
  for f in range(NUM_FOLDS):
    fold_caps = ids[f * per:(f + 1) * per]
    missing = [int(c) for c in fold_caps if int(c) not in cap_col]
    if missing:
      raise LayoutError(f"coco_1k: fold {f} captions not in the matrix ({layout.source}): "
                        f"{_shown(missing)}")
    cols = np.sort([cap_col[int(c)] for c in fold_caps])
    rows = np.unique([img_row[int(i)] for i in caption_images(fold_caps)])
    sub = np.asarray(sims[rows][:, cols])
    sub_layout = CocoLayout(layout.image_ids[rows], layout.caption_ids[cols],
                            f"{layout.source}, COCO 1K fold {f}")
    fold_gt = GroundTruth("coco", {int(i): gt.i2t[int(i)] for i in sub_layout.image_ids},
                          {int(c): gt.t2i[int(c)] for c in sub_layout.caption_ids},
                          gt.files)
    head = ranking.rerank_i2t_topk(sub) if rerank else None
    r, c = _evaluate_on(sub, sub_layout, {"coco_1k": fold_gt}, head, KINDS)
    fold_results.append(r["coco_1k"])
    counts = c["coco_1k"]
  mean = {way: {k: float(np.mean([fr[way][k] for fr in fold_results]))
                for k in fold_results[0][way]} for way in ("i2t", "t2i")}
  return mean, {"folds": NUM_FOLDS, "per_fold": counts}


def protocol_record(benchmarks, gts: Dict[str, GroundTruth], counts, layout: CocoLayout,
                    rerank: bool) -> Dict:
  """What the numbers were measured under: each benchmark's name, ground-truth files and
  their sha256, query counts; the package version, the id source, tie and R rules."""
  return {
      "package": f"{DIST} {package_version()}",
      "benchmarks": {b: {"name": NAMES[b],
                         "ground_truth": {os.path.basename(p): h
                                          for p, h in gts[b].files.items()},
                         "counts": counts[b]} for b in benchmarks},
      "ids": layout.source,
      "ids_in_package_order": bool(layout.package_order),
      "num_images": len(layout.image_ids),
      "num_captions": len(layout.caption_ids),
      "unit": "percent (the package's fractions x 100), unrounded",
      "r_rule": "R = every positive the ground truth lists, also those outside the matrix",
      "tie_rule": TIE_RULE,
      "rerank": f"authors' i2t re-rank, top {ranking.RERANK_K}" if rerank else None,
  }

"""Two-stage retrieval evaluation: an embedding model shortlists, the evaluated model
re-scores only each query's short list.

    python -m dsran_jax.main --mode=eval --workdir=SCAN_DIR \\
        --config.eval.shortlist_workdir=DSRAN_DIR --config.eval.shortlist_k=20

The model in `eval.shortlist_workdir` (the first stage: any family whose `score` is cheap,
typically a DSRAN workdir) scores every pair of the test split; each image's top K
captions and each caption's top K images (stable descending order: ties by index, as
`ranking` does) are re-scored by the evaluated model (the second stage) through
`evaluation.ModelScorer.score_candidates`, K pairs per query in tiles of one shape.

The final ordering of a query: its short list sorted by the second stage's score
(`eval.shortlist_fusion = w`: by `(1 - w) * second + w * first`), ties by index, then
every other item in the first stage's order. Ranks follow the protocol of
`ranking.py` exactly: i2t, the best rank among an image's captions; t2i, the rank of the
caption's image. So a ground truth inside the short list is ranked by its position in
the re-scored list, and one outside keeps its first-stage rank (everything in the short
list is ahead of it in both orderings). With K >= the gallery size the result is the full
evaluation of the second model (`tests/test_two_stage.py`).

COCO 1K folds are separate galleries: each fold is shortlisted and re-scored within its
own 1000 images. Memory: the first stage's matrix is kept like a full evaluation's
(host, or memory-mapped beyond `max_host_bytes`); the second stage holds only
(n_queries, K) scores.
"""
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import numpy as np
from absl import logging

from dsran_jax import evaluation, ranking

PyTree = Any
# Data keys that say which dataset a workdir was trained and evaluated on; the two models
# of a two-stage evaluation must agree on all of them.
DATASET_KEYS = ("format", "name", "img_dim", "num_regions")
SYNTHETIC_KEYS = ("seed", "num_train_images", "num_dev_images", "num_test_images",
                  "num_regions")


class ShortlistError(ValueError):
  """The shortlist workdir cannot serve this evaluation (another dataset or split, no
  checkpoint, a bad K): the message names the workdir, the key and both values."""


@dataclasses.dataclass
class Shortlist:
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
    raise ShortlistError(f"shortlist K (eval.shortlist_k) must be an integer >= 1, got {k!r}")
  return int(k)


def first_stage(sims, k: int, cpi: int = 5,
                chunk_size: int = ranking.DEFAULT_CHUNK_SIZE) -> Shortlist:
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
  return Shortlist(i2t, i2t_scores, t2i, t2i_scores, r_i2t, r_t2i)


def fuse(second: np.ndarray, first: np.ndarray, fusion: float) -> np.ndarray:
  """The scores a short list is ordered by: the second stage's (fusion 0), or the
  weighted sum `(1 - fusion) * second + fusion * first` (in float64)."""
  if not 0.0 <= float(fusion) <= 1.0:
    raise ShortlistError(f"shortlist fusion weight must be in [0, 1], got {fusion}")
  if fusion == 0:
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


def two_stage_ranks(shortlist: Shortlist, second_i2t: np.ndarray, second_t2i: np.ndarray,
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


def _slice(tree: PyTree, span: slice) -> PyTree:
  return jax.tree.map(lambda x: x[span], tree)


def score_shortlist(scorer, image_reps: PyTree, text_reps: PyTree, shortlist: Shortlist,
                    should_stop: Optional[Callable[[], bool]] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """The second stage: `scorer` (a `ModelScorer`) scores each image's listed captions and
  each caption's listed images, nothing else."""
  i2t = scorer.score_candidates(image_reps, text_reps, shortlist.i2t, queries="images",
                                desc="re-score i2t", should_stop=should_stop)
  t2i = scorer.score_candidates(image_reps, text_reps, shortlist.t2i, queries="texts",
                                desc="re-score t2i", should_stop=should_stop)
  return i2t, t2i


def evaluate(scorer, shortlist_scorer, image_batches: Iterable[Dict[str, Any]],
             caption_batches: Iterable[Dict[str, Any]],
             shortlist_image_batches: Iterable[Dict[str, Any]],
             shortlist_caption_batches: Iterable[Dict[str, Any]], k: int, cpi: int = 5,
             protocol: str = "1k", fusion: float = 0.0, chunk_size: int = 1000,
             max_host_bytes: int = 4 << 30, ranks_out: Optional[dict] = None,
             should_stop: Optional[Callable[[], bool]] = None
             ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Any]]:
  """Two-stage metrics of a test split, in `evaluation.evaluate`'s protocols.

  Args:
    scorer: the evaluated model's `ModelScorer` (second stage).
    shortlist_scorer: the first stage's scorer (anything with `encode_*` and
      `score_into`, e.g. a DSRAN `ModelScorer`).
    image_batches / caption_batches: the split's eval batches for `scorer`;
    shortlist_*_batches: the same split's batches for the first stage (its own
      tokenizer and image keys); caption c belongs to image c // cpi in both.
    k: candidates per query; fusion: `eval.shortlist_fusion`.
    Others: as `evaluation.evaluate`.
  Returns:
    ({protocol name: recall metrics}, report): the report has, per protocol name, the
    short lists' recall, the pairs scored by the second stage, the first stage's own
    metrics, and wall times.
  """
  k = check_k(k)
  fuse(np.zeros(1, np.float32), np.zeros(1, np.float32), fusion)  # checks the weight
  if protocol not in ("1k", "coco"):
    raise ValueError(f"protocol must be '1k' or 'coco', got {protocol!r}")
  times = {}
  t0 = time.time()
  enc = lambda fn, batches, desc: evaluation.encode_all(fn, batches, desc=desc,
                                                         should_stop=should_stop)
  image_reps = enc(scorer.encode_images, image_batches, "encode images")
  text_reps = enc(scorer.encode_texts, caption_batches, "encode captions")
  times["encode_s"] = time.time() - t0
  t0 = time.time()
  sl_image = enc(shortlist_scorer.encode_images, shortlist_image_batches,
                 "shortlist: encode images")
  sl_text = enc(shortlist_scorer.encode_texts, shortlist_caption_batches,
                "shortlist: encode captions")
  n_img = evaluation._leading_dim(image_reps, "image reps")  # pylint: disable=protected-access
  n_cap = evaluation._leading_dim(text_reps, "caption reps")  # pylint: disable=protected-access
  got = (evaluation._leading_dim(sl_image, "shortlist image reps"),  # pylint: disable=protected-access
         evaluation._leading_dim(sl_text, "shortlist caption reps"))  # pylint: disable=protected-access
  if n_cap != cpi * n_img:
    raise ValueError(f"{n_img} images and {n_cap} captions: expected {cpi} captions per "
                     f"image ({cpi * n_img})")
  if got != (n_img, n_cap):
    raise ShortlistError(f"the shortlist model encoded {got[0]} images and {got[1]} "
                         f"captions, the evaluated model {n_img} and {n_cap}: not one split")
  # A partner-conditioned model (MLASM's reference mode) gets its paired pre-pass on the
  # whole split, as `evaluation.evaluate` does; then every pair is independent again.
  for which in ("second", "first"):
    sc = scorer if which == "second" else shortlist_scorer
    condition = getattr(sc, "condition_on_partners", None)
    if condition is not None:
      if which == "second":
        image_reps, text_reps = condition(image_reps, text_reps, cpi)
      else:
        sl_image, sl_text = condition(sl_image, sl_text, cpi)
  if protocol == "1k":
    spans = [("1k", slice(0, n_img), slice(0, n_cap))]
  else:
    spans = [("coco5k", slice(0, n_img), slice(0, n_cap))]
    spans += [("coco1k", rs, cs) for rs, cs in ranking.fold_slices(n_img, cpi)]

  per_span = []
  times["first_stage_s"] = times["second_stage_s"] = 0.0
  with evaluation._SimsStore(n_img, n_cap, None, max_host_bytes) as first:  # pylint: disable=protected-access
    shortlist_scorer.score_into(sl_image, sl_text, first.array, desc="shortlist: score",
                                should_stop=should_stop)
    times["first_stage_s"] += time.time() - t0
    for name, rs, cs in spans:
      t0 = time.time()
      sl = first_stage(first.array[rs, cs], k, cpi, chunk_size)
      times["first_stage_s"] += time.time() - t0
      t0 = time.time()
      s_i2t, s_t2i = score_shortlist(scorer, _slice(image_reps, rs), _slice(text_reps, cs),
                                     sl, should_stop)
      times["second_stage_s"] += time.time() - t0
      r_i2t, r_t2i = two_stage_ranks(sl, s_i2t, s_t2i, cpi, fusion)
      per_span.append((name, sl, r_i2t, r_t2i))
      logging.info("two-stage %s: shortlist recall i2t %.1f%% t2i %.1f%% at K=%d, %d pairs "
                   "re-scored", name, *sl.recall().values(), k, sl.i2t.size + sl.t2i.size)
  if ranks_out is not None:
    ranks_out["i2t"], ranks_out["t2i"] = per_span[0][2], per_span[0][3]

  results: Dict[str, Dict[str, float]] = {}
  report: Dict[str, Any] = {"k": k, "fusion": float(fusion), "targets": {}}
  for name in dict.fromkeys(n for n, *_ in per_span):
    rows = [p for p in per_span if p[0] == name]
    results[name] = ranking.mean_metrics([ranking.recall_metrics(r1, r2)
                                          for _, _, r1, r2 in rows])
    recalls = [sl.recall() for _, sl, _, _ in rows]
    pairs_i2t = sum(int(sl.i2t.size) for _, sl, _, _ in rows)
    pairs_t2i = sum(int(sl.t2i.size) for _, sl, _, _ in rows)
    full = sum(int(sl.i2t.shape[0]) * int(sl.t2i.shape[0]) for _, sl, _, _ in rows)
    report["targets"][name] = {
        "k_i2t": rows[0][1].k_i2t, "k_t2i": rows[0][1].k_t2i,
        "shortlist_recall_i2t": float(np.mean([r["i2t"] for r in recalls])),
        "shortlist_recall_t2i": float(np.mean([r["t2i"] for r in recalls])),
        "pairs_scored_i2t": pairs_i2t, "pairs_scored_t2i": pairs_t2i,
        "pairs_scored": pairs_i2t + pairs_t2i, "pairs_full": full,
        "first_stage": ranking.mean_metrics([
            ranking.recall_metrics(sl.i2t_ranks, sl.t2i_ranks) for _, sl, _, _ in rows]),
    }
  report["seconds"] = {key: round(v, 3) for key, v in times.items()}
  return results, report


# -------------------------------------------------------------- workdir-level entry


def _fmt(key: str, mine, theirs, workdir: str, split: str) -> str:
  return (f"eval.shortlist_workdir={workdir!r} is for another dataset or split: its "
          f"data.{key}={theirs!r}, this evaluation's data.{key}={mine!r} (split {split!r})")


def check_shortlist_config(config, split_name: str, shortlist_config, workdir: str) -> None:
  """Raises ShortlistError if the shortlist workdir was made for another dataset (data
  format, name, feature sizes, synthetic world) or evaluates another split."""
  mine, theirs = config.data, shortlist_config.data
  for key in DATASET_KEYS:
    if mine[key] != theirs[key]:
      raise ShortlistError(_fmt(key, mine[key], theirs[key], workdir, split_name))
  if mine.format == "synthetic":
    for key in SYNTHETIC_KEYS:
      if mine.synthetic[key] != theirs.synthetic[key]:
        raise ShortlistError(_fmt(f"synthetic.{key}", mine.synthetic[key],
                                  theirs.synthetic[key], workdir, split_name))
  if theirs.test_split != split_name:
    raise ShortlistError(_fmt("test_split", split_name, theirs.test_split, workdir,
                              split_name))


def shortlist_data_config(config, shortlist_config):
  """The config that reads this evaluation's split for the shortlist model: this
  config's data location, the shortlist workdir's model and tokenizer settings."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(config.to_dict())
  out.model = ml_collections.ConfigDict(shortlist_config.model.to_dict())
  out.data.max_len = shortlist_config.data.max_len
  out.data.vocab_file = shortlist_config.data.vocab_file
  return out


def check_same_split(split, shortlist_split, workdir: str) -> None:
  """Raises ShortlistError unless both splits hold the same images and captions."""
  for what, a, b in (("image ids", split.image_ids, shortlist_split.image_ids),
                     ("captions", split.texts, shortlist_split.texts)):
    if len(a) != len(b) or any(str(x) != str(y) for x, y in zip(a, b)):
      first = next((i for i, (x, y) in enumerate(zip(a, b)) if str(x) != str(y)),
                   min(len(a), len(b)))
      raise ShortlistError(
          f"eval.shortlist_workdir={workdir!r} reads split {shortlist_split.name!r} with "
          f"{len(b)} {what}, this evaluation {len(a)}; they differ first at #{first}: the "
          f"two stages must rank one gallery")


def evaluate_split(model, variables, split, config, ranks_out: Optional[dict] = None,
                   should_stop=None) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Any]]:
  """Two-stage evaluation of `split` with `config.eval.shortlist_*` (see `evaluate`).

  Returns (results, two_stage): `two_stage` describes the run for eval_results.json
  (the shortlist workdir, its family and checkpoint step, K, the fusion weight, and
  `evaluate`'s report).
  """
  from dsran_jax import inference, train  # pylint: disable=g-import-not-at-top
  from dsran_jax import data  # pylint: disable=g-import-not-at-top
  from dsran_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dsran_jax.default_config import CONFIG_FILE, load_workdir_config  # pylint: disable=g-import-not-at-top
  e = config.eval
  sl_dir = e.shortlist_workdir
  k = check_k(e.shortlist_k)
  if not os.path.isfile(os.path.join(sl_dir, CONFIG_FILE)):
    raise ShortlistError(f"eval.shortlist_workdir={sl_dir!r}: no {CONFIG_FILE} there (a "
                         f"trained or converted dsran_jax workdir is needed)")
  sl_config = load_workdir_config(sl_dir)
  check_shortlist_config(config, split.name, sl_config, sl_dir)
  try:
    matcher = inference.load(sl_dir)
  except FileNotFoundError as err:
    raise ShortlistError(f"eval.shortlist_workdir={sl_dir!r}: {err}") from err
  sl_split = data.load_split(shortlist_data_config(config, sl_config), split.name, sl_dir)
  check_same_split(split, sl_split, sl_dir)
  scorer = train.make_scorer(model, variables, config)
  bs = e.batch_size
  t0 = time.time()
  results, report = evaluate(
      scorer, matcher.scorer(), pipeline.eval_image_batches(split, bs, model.image_keys),
      pipeline.eval_caption_batches(split, bs),
      pipeline.eval_image_batches(split, bs, matcher.model.image_keys),
      pipeline.eval_caption_batches(sl_split, bs), k=k, cpi=split.captions_per_image,
      protocol=e.protocol, fusion=e.shortlist_fusion, chunk_size=e.chunk_size,
      ranks_out=ranks_out, should_stop=should_stop)
  report["seconds"]["total_s"] = round(time.time() - t0, 3)
  two_stage = {"shortlist_workdir": os.path.abspath(sl_dir),
               "shortlist_model": sl_config.model.name,
               "shortlist_checkpoint_step": matcher.meta.get("step"),
               "rule": ("each query's top K of the first stage re-ordered by the second "
                        "stage's score (ties by index), the rest in the first stage's "
                        "order"), **report}
  return results, two_stage


def format_report(two_stage: Dict[str, Any]) -> str:
  """Lines summarising a two-stage run (shortlist recall, pairs scored, times)."""
  lines = [f"two-stage: K={two_stage['k']}, fusion {two_stage['fusion']}, first stage "
           f"{two_stage['shortlist_model']} ({two_stage['shortlist_workdir']})"]
  for name, t in two_stage["targets"].items():
    lines.append(f"  {name}: shortlist recall i2t {t['shortlist_recall_i2t']:.1f}% t2i "
                 f"{t['shortlist_recall_t2i']:.1f}%; {t['pairs_scored']} of "
                 f"{t['pairs_full']} pairs re-scored "
                 f"({100.0 * t['pairs_scored'] / max(t['pairs_full'], 1):.2f}%)")
  lines.append("  seconds: " + ", ".join(f"{k} {v}" for k, v in two_stage["seconds"].items()))
  return "\n".join(lines)

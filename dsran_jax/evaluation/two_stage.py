"""Two-stage retrieval evaluation: an embedding model shortlists, the evaluated model
re-scores only each query's short list.

    python -m dsran_jax.main --mode=eval --workdir=SCAN_DIR \\
        --config.eval.shortlist_workdir=DSRAN_DIR --config.eval.shortlist_k=20

The model in `eval.shortlist_workdir` (the first stage: any family whose `score` is cheap,
typically a DSRAN workdir) scores every pair of the test split; each image's top K
captions and each caption's top K images (stable descending order: ties by index, as
`ranking` does) are re-scored by the evaluated model (the second stage) through
`evaluation.ModelScorer.score_candidates`, K pairs per query in tiles of one shape.

The ordering and the ranks it gives are `evaluation.shortlist`'s; with K >= the gallery
size the result is the full evaluation of the second model (`tests/test_two_stage.py`).

COCO 1K folds are separate galleries: each fold is shortlisted and re-scored within its
own 1000 images. Memory: the first stage's matrix is kept like a full evaluation's
(host, or memory-mapped beyond `max_host_bytes`); the second stage holds only
(n_queries, K) scores.
"""
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging

from dsran_jax import data, ranking
from dsran_jax.data import pipeline
from dsran_jax.evaluation import registry
from dsran_jax.evaluation.retrieval import (SimsStore, check_protocol, encode_split,
                                            protocol_of, protocol_spans)
from dsran_jax.evaluation.scorer import leading_dim, make_scorer
from dsran_jax.evaluation.shortlist import (ShortlistError, ShortLists, check_fusion,
                                            check_k, short_lists, two_stage_ranks)
from dsran_jax.workdir import CONFIG_FILE, Workdir

PyTree = Any
# Data keys that say which dataset a workdir was trained and evaluated on; the two models
# of a two-stage evaluation must agree on all of them.
DATASET_KEYS = ("format", "name", "img_dim", "num_regions")
SYNTHETIC_KEYS = ("seed", "num_train_images", "num_dev_images", "num_test_images",
                  "num_regions")


def _slice(tree: PyTree, span: slice) -> PyTree:
  return jax.tree.map(lambda x: x[span], tree)


def score_shortlist(scorer, image_reps: PyTree, text_reps: PyTree, shortlist: ShortLists,
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
  check_fusion(fusion)
  check_protocol(protocol)
  times = {}
  t0 = time.time()
  image_reps, text_reps = encode_split(scorer, image_batches, caption_batches, cpi,
                                       should_stop)
  times["encode_s"] = time.time() - t0
  t0 = time.time()
  sl_image, sl_text = encode_split(shortlist_scorer, shortlist_image_batches,
                                   shortlist_caption_batches, cpi, should_stop)
  n_img, n_cap = leading_dim(image_reps, "image reps"), leading_dim(text_reps, "caption reps")
  got = (leading_dim(sl_image, "shortlist image reps"),
         leading_dim(sl_text, "shortlist caption reps"))
  if got != (n_img, n_cap):
    raise ShortlistError(f"the shortlist model encoded {got[0]} images and {got[1]} "
                         f"captions, the evaluated model {n_img} and {n_cap}: not one split")
  spans = protocol_spans(protocol, n_img, n_cap, cpi)

  per_span = []
  times["first_stage_s"] = times["second_stage_s"] = 0.0
  with SimsStore(n_img, n_cap, None, max_host_bytes) as first:
    shortlist_scorer.score_into(sl_image, sl_text, first.array, desc="shortlist: score",
                                should_stop=should_stop)
    times["first_stage_s"] += time.time() - t0
    for name, rs, cs in spans:
      t0 = time.time()
      sl = short_lists(first.array[rs, cs], k, cpi, chunk_size)
      times["first_stage_s"] += time.time() - t0
      t0 = time.time()
      s_i2t, s_t2i = score_shortlist(scorer, _slice(image_reps, rs), _slice(text_reps, cs),
                                     sl, should_stop)
      times["second_stage_s"] += time.time() - t0
      r_i2t, r_t2i = two_stage_ranks(sl, s_i2t, s_t2i, cpi, fusion)
      per_span.append((name, sl, r_i2t, r_t2i))
      logging.info("two-stage %s: shortlist recall i2t %.1f%% t2i %.1f%% at K=%d%s, %d "
                   "pairs re-scored", name, *sl.recall().values(), k,
                   f" ({k_capped(k, sl.k_i2t, sl.k_t2i)})" if sl.k_i2t < k or sl.k_t2i < k
                   else "", sl.i2t.size + sl.t2i.size)
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


@registry.register("two_stage", when=lambda config: bool(config.eval.shortlist_workdir))
def two_stage(task: registry.Task) -> registry.Outcome:
  """Two-stage evaluation of the task's split with `config.eval.shortlist_*` (see
  `evaluate`): the section `two_stage` of eval_results.json describes the run (the
  shortlist workdir, its family and checkpoint step, K, the fusion weight, and
  `evaluate`'s report)."""
  config, split, model = task.config, task.split, task.model
  e = config.eval
  if task.sims_path:
    raise ShortlistError("eval.save_sims needs every pair scored; a two-stage evaluation "
                         "(eval.shortlist_workdir) scores only the short lists")
  sl_dir = e.shortlist_workdir
  k = check_k(e.shortlist_k)
  first_wd = Workdir(sl_dir)
  if not first_wd.has_config():
    raise ShortlistError(f"eval.shortlist_workdir={sl_dir!r}: no {CONFIG_FILE} there (a "
                         f"trained or converted dsran_jax workdir is needed)")
  sl_config = first_wd.load_config()
  check_shortlist_config(config, split.name, sl_config, sl_dir)
  try:
    first = first_wd.restore(sl_config)
  except FileNotFoundError as err:
    raise ShortlistError(f"eval.shortlist_workdir={sl_dir!r}: {err}") from err
  sl_split = data.load_split(shortlist_data_config(config, sl_config), split.name, sl_dir)
  check_same_split(split, sl_split, sl_dir)
  bs = e.batch_size
  ranks = {}
  t0 = time.time()
  results, report = evaluate(
      make_scorer(model, task.variables, config),
      make_scorer(first.model, first.variables, sl_config, progress=False),
      pipeline.eval_image_batches(split, bs, model.image_keys),
      pipeline.eval_caption_batches(split, bs),
      pipeline.eval_image_batches(split, bs, first.model.image_keys),
      pipeline.eval_caption_batches(sl_split, bs), k=k, cpi=split.captions_per_image,
      protocol=e.protocol, fusion=e.shortlist_fusion, chunk_size=e.chunk_size,
      ranks_out=ranks, should_stop=task.should_stop)
  report["seconds"]["total_s"] = round(time.time() - t0, 3)
  section = {"shortlist_workdir": os.path.abspath(sl_dir),
             "shortlist_model": sl_config.model.name,
             "shortlist_checkpoint_step": first.meta.get("step"),
             "rule": ("each query's top K of the first stage re-ordered by the second "
                      "stage's score (ties by index), the rest in the first stage's "
                      "order"), **report}
  return registry.Outcome(results, protocol_of(results, split, section), ranks,
                          {"two_stage": section}, [format_report(section)])


def k_capped(k: int, k_i2t: int, k_t2i: int) -> str:
  """"" when both directions list K items, else how the gallery caps K: "K=4000 is capped
  at the gallery: 50 captions per image, 10 images per caption"."""
  if k_i2t == k and k_t2i == k:
    return ""
  return (f"K={k} is capped at the gallery: {k_i2t} captions per image, {k_t2i} images "
          "per caption")


def format_report(two_stage: Dict[str, Any]) -> str:
  """Lines summarising a two-stage run (shortlist recall, pairs scored, times). Each
  direction re-scores its own short lists, so each is counted against the gallery's
  image-caption pairs (with K capped at the gallery, both are 100%)."""
  lines = [f"two-stage: K={two_stage['k']}, fusion {two_stage['fusion']}, first stage "
           f"{two_stage['shortlist_model']} ({two_stage['shortlist_workdir']})"]
  for name, t in two_stage["targets"].items():
    full = max(t["pairs_full"], 1)
    capped = k_capped(two_stage["k"], t["k_i2t"], t["k_t2i"])
    lines.append(f"  {name}: {capped + '; ' if capped else ''}shortlist recall "
                 f"i2t {t['shortlist_recall_i2t']:.1f}% t2i "
                 f"{t['shortlist_recall_t2i']:.1f}%; of the {t['pairs_full']} "
                 f"image-caption pairs, {t['pairs_scored_i2t']} re-scored i2t "
                 f"({100.0 * t['pairs_scored_i2t'] / full:.2f}%) and "
                 f"{t['pairs_scored_t2i']} t2i ({100.0 * t['pairs_scored_t2i'] / full:.2f}%)")
  lines.append("  seconds: " + ", ".join(f"{k} {v}" for k, v in two_stage["seconds"].items()))
  return "\n".join(lines)

"""The retrieval protocols as an evaluator: every pair of a split scored once, ranked by
`ranking` (Flickr30K-style 1K; COCO 5K and the mean of its five 1K folds).

`evaluate` encodes every image and caption once, scores every tile exactly once into a
float32 sims matrix held in host memory (or a memory-mapped file when it is larger than
`max_host_bytes`, or when it is being saved), and feeds row blocks of it to
`ranking.RankAccumulator`s. t2i ranks need every caption's positive score before rows
can be counted, so the second pass reads the stored matrix back instead of scoring again.
"""
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np
from absl import logging

from dsran_jax import atomic, ranking
from dsran_jax.data import pipeline
from dsran_jax.evaluation import registry
from dsran_jax.evaluation.scorer import (ModelScorer, Scorer, check_finite,
                                         compute_sims_blocks, encode_all, leading_dim,
                                         make_scorer, stop_check)

PROTOCOLS = ("1k", "coco")


def check_protocol(protocol: str) -> str:
  """`protocol`, or a ValueError naming eval.protocol and the known ones."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"eval.protocol={protocol!r}: expected one of "
                     f"{', '.join(repr(p) for p in PROTOCOLS)}")
  return protocol


def mean_by_name(per_span) -> Dict[str, Dict[str, float]]:
  """{results key: metrics averaged over its spans} from [(key, metrics)] (COCO's five
  1K folds are one key)."""
  return {name: ranking.mean_metrics([m for n, m in per_span if n == name])
          for name in dict.fromkeys(n for n, _ in per_span)}


def protocol_spans(protocol: str, n_img: int, n_cap: int, cpi: int):
  """[(results key, image rows, caption columns)] a protocol ranks: "1k" one matrix;
  "coco" the whole 5K ("coco5k") and five sequential 1K folds ("coco1k")."""
  check_protocol(protocol)
  if protocol == "1k":
    return [("1k", slice(0, n_img), slice(0, n_cap))]
  return ([("coco5k", slice(0, n_img), slice(0, n_cap))]
          + [("coco1k", rs, cs) for rs, cs in ranking.fold_slices(n_img, cpi)])


def encode_split(scorer, image_batches, caption_batches, cpi: int, should_stop=None):
  """(image reps, caption reps) of one split, checked to hold `cpi` captions an image,
  after the scorer's paired pre-pass when it has one (MLASM's reference mode)."""
  image_reps = encode_all(scorer.encode_images, image_batches, desc="encode images",
                          should_stop=should_stop)
  text_reps = encode_all(scorer.encode_texts, caption_batches, desc="encode captions",
                         should_stop=should_stop)
  n_img = leading_dim(image_reps, "image reps")
  n_cap = leading_dim(text_reps, "caption reps")
  if n_cap != cpi * n_img:
    raise ValueError(f"{n_img} images and {n_cap} captions: expected {cpi} captions per "
                     f"image ({cpi * n_img})")
  condition = getattr(scorer, "condition_on_partners", None)
  if condition is not None:
    image_reps, text_reps = condition(image_reps, text_reps, cpi)
  return image_reps, text_reps


class _Target:
  """One ranked matrix (rows/cols of the stored sims matrix) and its accumulator, which
  knows every positive score up front, so one pass over row blocks ranks both ways."""

  def __init__(self, name: str, rows: slice, cols: slice, cpi: int, sims: np.ndarray):
    self.name = name
    self.rows = rows
    self.cols = cols
    sub = sims[rows, cols]
    self.acc = ranking.RankAccumulator(rows.stop - rows.start, cpi,
                                       ranking.positive_scores(sub, cpi))

  def feed(self, offset: int, block: np.ndarray) -> None:
    lo, hi = max(offset, self.rows.start), min(offset + block.shape[0], self.rows.stop)
    if lo < hi:
      self.acc.add(lo - self.rows.start, block[lo - offset:hi - offset, self.cols])


class SimsStore:
  """Where `evaluate` keeps the (n_img, n_cap) matrix: host memory, or a memory-mapped
  `.npy` (when saving, a temporary name beside `sims_path`, fsynced and renamed into
  place only when complete: `atomic`; else a temporary file removed afterwards)."""

  def __init__(self, n_img: int, n_cap: int, sims_path: Optional[str], max_host_bytes: int):
    self.final = self.partial = self._tmpdir = None
    nbytes = 4 * n_img * n_cap
    if sims_path:
      sims_path = os.fspath(sims_path)
      if not sims_path.endswith(".npy"):
        sims_path += ".npy"
      os.makedirs(os.path.dirname(os.path.abspath(sims_path)), exist_ok=True)
      self.final, self.partial = sims_path, atomic.temporary_path(sims_path)
    elif nbytes > max_host_bytes:
      self._tmpdir = tempfile.mkdtemp(prefix="dsran_sims_")
      self.partial = os.path.join(self._tmpdir, "sims.npy")
      logging.info("sims matrix of %.1f GiB kept in %s", nbytes / 2**30, self.partial)
    if self.partial:
      try:
        self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32,
                                               shape=(n_img, n_cap))
      except BaseException:  # no `with` yet to remove it: a full disk leaves nothing
        self.__exit__(None, None, None)
        raise
    else:
      self.array = np.empty((n_img, n_cap), np.float32)

  def commit(self) -> None:
    if self.final:
      self.array.flush()
      self.array = None
      atomic.install(self.partial, self.final)
      self.partial = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.array = None
    if self.partial and os.path.exists(self.partial):  # failed half-way: no partial file
      os.remove(self.partial)
    if self._tmpdir:
      shutil.rmtree(self._tmpdir, ignore_errors=True)


def evaluate(scorer: Scorer, image_batches: Iterable[Dict[str, Any]],
             caption_batches: Iterable[Dict[str, Any]], cpi: int = 5,
             protocol: str = "1k", chunk_size: int = 1000,
             sims_path: Optional[str] = None,
             max_host_bytes: int = 4 << 30,
             ranks_out: Optional[dict] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Dict[str, float]]:
  """Encodes a test split once and returns its retrieval metrics.

  Args:
    scorer: see `Scorer`.
    image_batches / caption_batches: eval batches in order (caption c belongs to image
      c // cpi), each with a `valid` mask.
    cpi: captions per image.
    protocol: "1k" (one matrix, e.g. Flickr30K test or a 1000-image dev split) ->
      {"1k": metrics}; "coco" (5000 images) -> {"coco5k": all images,
      "coco1k": mean over 5 sequential folds of N/5 images}.
    chunk_size: images per block fed to the rank accumulators (and scored per call for
      scorers without `score_into`).
    sims_path: if set, the full float32 sims matrix is also saved there as .npy (for
      `python -m dsran_jax.tools.rank` ensembles).
    max_host_bytes: a sims matrix larger than this is kept in a temporary memory-mapped
      file instead of host memory.
    ranks_out: if given, receives `{"i2t": ranks (n_img,), "t2i": ranks (n_cap,)}` of
      the whole split (0 = ground truth first), for figures.
    should_stop: polled between batches and tiles; when it returns True, `Interrupted`
      is raised (a preempted run stops within one batch or tile).
  Returns:
    {protocol name: `ranking.recall_metrics` dict}.
  """
  check_protocol(protocol)
  image_reps, text_reps = encode_split(scorer, image_batches, caption_batches, cpi,
                                       should_stop)
  n_img = leading_dim(image_reps, "image reps")
  n_cap = leading_dim(text_reps, "caption reps")
  spans = protocol_spans(protocol, n_img, n_cap, cpi)

  with SimsStore(n_img, n_cap, sims_path, max_host_bytes) as sims:
    # Every pair scored exactly once, into the stored matrix; then one ranking pass
    # over its row blocks.
    if hasattr(scorer, "score_into"):
      scorer.score_into(image_reps, text_reps, sims.array, should_stop=should_stop)
    else:
      for o, block in compute_sims_blocks(scorer, image_reps, text_reps, chunk_size):
        stop_check(should_stop)
        check_finite(block, o)
        sims.array[o:o + block.shape[0]] = block
    targets = [_Target(name, rs, cs, cpi, sims.array) for name, rs, cs in spans]
    for o in range(0, n_img, chunk_size):
      block = np.asarray(sims.array[o:o + chunk_size])
      for t in targets:
        t.feed(o, block)
    sims.commit()

  if ranks_out is not None:
    ranks_out["i2t"], ranks_out["t2i"] = targets[0].acc.ranks()
  return mean_by_name([(t.name, ranking.recall_metrics(*t.acc.ranks())) for t in targets])


def evaluate_split(model, variables, split, config, protocol: str,
                   sims_path: Optional[str] = None, ranks_out: Optional[dict] = None,
                   should_stop=None, scorer: Optional[ModelScorer] = None) -> dict:
  """Encodes a split once and ranks it with `protocol` (with `scorer`, the compiled
  scorer of an earlier call, given these `variables`: training's dev evaluations)."""
  if scorer is None:
    scorer = make_scorer(model, variables, config)
  else:
    scorer.set_variables(variables)
  bs = config.eval.batch_size
  return evaluate(
      scorer, pipeline.eval_image_batches(split, bs, model.image_keys),
      pipeline.eval_caption_batches(split, bs),
      cpi=split.captions_per_image, protocol=protocol, chunk_size=config.eval.chunk_size,
      sims_path=sims_path, ranks_out=ranks_out, should_stop=should_stop)


def headline(results: dict) -> dict:
  """The one metrics dict model selection looks at (1K, or COCO's 1K folds)."""
  for key in ("1k", "coco1k", "coco5k"):
    if key in results:
      return results[key]
  raise KeyError(f"no known protocol in {sorted(results)}")


@registry.register("retrieval", when=lambda config: not config.eval.shortlist_workdir)
def retrieval(task: registry.Task) -> registry.Outcome:
  """Every pair of the split scored by the model, ranked with `eval.protocol`."""
  ranks = {}
  results = evaluate_split(task.model, task.variables, task.split, task.config,
                           task.config.eval.protocol, task.sims_path, ranks_out=ranks,
                           should_stop=task.should_stop)
  return registry.Outcome(results, protocol_of(results, task.split), ranks)


def protocol_of(results: Dict[str, Dict[str, float]], split,
                two_stage: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """The conditions of each entry of `evaluate`'s results (`ranking.protocol_info`: split,
  sizes, folds, rank and tie rules), and the two-stage settings when there were two
  stages (else None), for eval_results.json."""
  settings = None
  if two_stage is not None:
    settings = {k: two_stage[k] for k in ("shortlist_workdir", "shortlist_model",
                                          "shortlist_checkpoint_step", "k", "fusion", "rule")}
  out = {}
  for name in results:
    out[name] = ranking.protocol_info(split.num_images, split.captions_per_image,
                                      fold5=name == "coco1k",
                                      split=split.name, two_stage=settings)
    if settings is not None:
      t = two_stage["targets"][name]
      out[name]["two_stage"] = {**settings, "k_i2t": t["k_i2t"], "k_t2i": t["k_t2i"]}
  return out


def protocol_label(name: str, num_images: Optional[int] = None) -> str:
  """How a results key reads in a table: "1k" is only called 1K when it has 1000
  images (a 20-image demo split is "20 img")."""
  if name == "1k" and num_images is not None and num_images != 1000:
    return f"{num_images} img"
  return {"coco5k": "COCO 5K", "coco1k": "COCO 1K", "1k": "1K"}.get(name, name)


def format_table(results: Dict[str, Dict[str, float]],
                 num_images: Optional[int] = None) -> str:
  """A fixed-width text table: one row per protocol, R@1/5/10 + medr both ways, rsum.

  `num_images` (the split's) labels the "1k" row truthfully for other sizes."""
  head1 = f"{'':<10}| {'image -> text':^28} | {'text -> image':^28} |"
  cols = "".join(f"{c:>7}" for c in ("R@1", "R@5", "R@10", "medr"))
  head2 = f"{'protocol':<10}| {cols} | {cols} | {'rsum':>7}"
  lines = [head1, head2, "-" * len(head2)]
  for name, m in results.items():
    cells = []
    for d in ("i2t", "t2i"):
      cells.append("".join(f"{m[f'r{k}_{d}']:7.1f}" for k in (1, 5, 10))
                   + f"{m[f'medr_{d}']:7.1f}")
    lines.append(f"{protocol_label(name, num_images):<10}| {cells[0]} | {cells[1]} | "
                 f"{m['rsum']:7.1f}")
  return "\n".join(lines)

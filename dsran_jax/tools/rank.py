"""Retrieval metrics of saved similarity matrices, alone or summed as an ensemble.

    python -m dsran_jax.tools.rank --sims=a.npy [--sims=b.npy ...] [--fold5] [--rerank]
        [--eccv [--eccv_ids=IDS] [--pm_dir=DIR]]

Each file is a float (N_img, 5 * N_img) .npy matrix (rows = images, columns = captions,
caption c belongs to image c // 5), e.g. written by `evaluation.evaluate(sims_path=...)`.
Several files are summed (the authors' ensemble). A NaN or Inf score in any file is an
error (exit 1) naming the file, how many there are and where. `--fold5`: the COCO 1K protocol (mean
over 5 folds of N/5 images); `--rerank`: the authors' i2t re-rank (top 15). Prints one
JSON object with r1_i2t, r5_i2t, r10_i2t, medr_i2t, meanr_i2t, the same for t2i, and rsum,
plus `protocol` (`ranking.protocol_info`: sizes, folds, rank and tie rules, the files summed).

`--eccv` (COCO 5K, the `eccv` extra: `pip install "dsran_jax[eccv]"`) adds `eccv` (i2t /
t2i: `map@r`, `r-precision`, `r@1`) and `cxc` (i2t / t2i: `r@1`, `r@5`, `r@10`), in
percent and unrounded, from `evaluation.eccv` on the whole (summed, re-ranked) matrix,
plus `pmrp` when `--pm_dir` holds the plausible-match files, and their record as
`protocol.eccv`. The matrix is in the package's `coco_test_ids` order unless
`--eccv_ids` gives one caption annotation id per column (.txt or .npy).
"""
import json
import os
import types
from typing import Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from dsran_jax import cli, ranking
from dsran_jax import coco_benchmarks as eccv_lib

COCO_5K_IMAGES = 5000   # the COCO test split that --fold5 cuts into 1K folds


def load_sims(paths: Sequence[str]) -> List[np.ndarray]:
  """Memory-maps the .npy files, checking that each exists and is a 2-D array of finite
  numbers (a NaN or Inf score is an error naming the file, the count and the place)."""
  out = []
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"sims file not found: {p}")
    try:
      a = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # not an .npy file, object arrays, truncated file, ...
      raise ValueError(f"cannot read {p} as a .npy array: {e}") from e
    if not isinstance(a, np.ndarray):
      raise ValueError(f"{p} is not a single .npy array")
    if a.ndim != 2:
      raise ValueError(f"{p}: sims must be 2-D (images x captions), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
      raise ValueError(f"{p}: sims must hold numbers, got dtype {a.dtype}")
    # Named per file: in an ensemble sum the culprit could no longer be told apart.
    ranking.check_finite(a, name=p)
    out.append(a)
  return out


def rank_files(paths: Sequence[str], fold5: bool = False, rerank: bool = False,
               captions_per_image: int = 5) -> Dict[str, float]:
  """Loads, sums and evaluates sims files; returns the `ranking.recall_metrics` dict."""
  if not paths:
    raise ValueError("no sims files given (--sims=FILE.npy)")
  arrays = load_sims(paths)
  sims = ranking.sum_sims(arrays, names=list(paths))
  n_img, n_cap = sims.shape
  if n_cap != captions_per_image * n_img:
    raise ValueError(
        f"{paths[0] if len(paths) == 1 else 'the summed sims'} has shape {sims.shape}: "
        f"expected {captions_per_image} * {n_img} = {captions_per_image * n_img} caption "
        f"columns (captions_per_image={captions_per_image})")
  return ranking.evaluate_sims(sims, cpi=captions_per_image, fold5=fold5, rerank=rerank)


def eccv_block(paths: Sequence[str], rerank: bool = False, ids_path: str = "",
               pm_dir: str = "") -> Dict:
  """`{"eccv", "cxc"[, "pmrp"], "protocol"}` of the summed sims files (COCO 5K in the
  package's order, or in the order of the caption annotation ids at `ids_path`)."""
  sims = ranking.sum_sims(load_sims(paths), names=list(paths))
  if ids_path:
    layout = eccv_lib.layout_from_caption_ids(eccv_lib.read_caption_ids(ids_path),
                                              source=ids_path)
  else:
    layout = eccv_lib.package_layout()
  benchmarks = list(eccv_lib.DEFAULT_BENCHMARKS)
  if pm_dir:
    benchmarks.append("pmrp")
  return eccv_lib.evaluate_benchmarks(sims, layout, benchmarks, pm_dir=pm_dir or None,
                                      rerank=rerank, check_finite=False)


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  return types.SimpleNamespace(
      sims=flags.DEFINE_multi_string(
          "sims", None,
          "A (N_img, cpi * N_img) .npy sims matrix; repeat to sum an ensemble."),
      fold5=flags.DEFINE_bool("fold5", False, "COCO 1K: mean over 5 folds of N/5 images."),
      rerank=flags.DEFINE_bool("rerank", False, "Apply the authors' i2t re-rank (top 15)."),
      captions_per_image=flags.DEFINE_integer("captions_per_image", 5, "Captions per image."),
      eccv=flags.DEFINE_bool("eccv", False, "Also ECCV Caption and CxC (COCO 5K; the "
                             "eccv extra)."),
      eccv_ids=flags.DEFINE_string("eccv_ids", "", "One caption annotation id per column "
                                   "(.txt or .npy); default: the package's coco_test_ids."),
      pm_dir=flags.DEFINE_string("pm_dir", "", "Directory of ECCV Caption's plausible-match "
                                 "files: adds pmrp."),
  )


def main(argv):
  f = _FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.sims.value:
    raise app.UsageError("give at least one --sims=FILE.npy")
  if (f.eccv_ids.value or f.pm_dir.value) and not f.eccv.value:
    raise app.UsageError("--eccv_ids and --pm_dir go with --eccv")
  if f.pm_dir.value and not eccv_lib.pm_files_present(f.pm_dir.value):
    raise FileNotFoundError(f"{f.pm_dir.value}: no {' and '.join(eccv_lib.PM_FILES)} "
                            "(--pm_dir: the plausible-match files of ECCV Caption)")
  if f.eccv.value:
    eccv_lib.package_dir()  # the extra missing: say so before any ranking
  cpi = f.captions_per_image.value
  n_img = int(np.load(f.sims.value[0], mmap_mode="r").shape[0])
  if f.fold5.value and n_img != COCO_5K_IMAGES:
    logging.warning("--fold5 on %d images: 5 folds of %d images, not the COCO 1K "
                    "protocol (5 folds of 1000 of the 5000 test images)", n_img, n_img // 5)
  metrics = rank_files(f.sims.value, f.fold5.value, f.rerank.value, cpi)
  # The conditions travel with the numbers (sizes, folds, tie rule, ensemble).
  protocol = ranking.protocol_info(n_img, cpi, fold5=f.fold5.value, rerank=f.rerank.value,
                                   ensemble=list(f.sims.value))
  out = {**metrics, "protocol": protocol}
  if f.eccv.value:
    block = eccv_block(f.sims.value, f.rerank.value, f.eccv_ids.value, f.pm_dir.value)
    out["protocol"]["eccv"] = block.pop("protocol")
    out.update(block)
  print(json.dumps(out))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  # A file that is missing, not a sims matrix or not finite: `error: ...`, exit 1.
  cli.run_cli(main, errors=(OSError, ValueError, eccv_lib.MissingExtraError), exit_code=1)

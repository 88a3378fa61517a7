"""The ECCV Caption / CxC evaluator of a workdir's COCO 5K test split (`eval.eccv`): the
split's rows and columns mapped to COCO ids, the benchmarks of `dsran_jax.coco_benchmarks`
(the `eccv-caption` package's ground truths, `pip install "dsran_jax[eccv]"`) computed on
the sims matrix the retrieval evaluator wrote, written to eval_results.json as the
sections `eccv` and `cxc` (plus `pmrp` with `eval.eccv_pm_dir`) and the record
`protocol.eccv`, and printed as a table after the recall table.
"""
import os
from typing import Dict, List

import numpy as np

from dsran_jax.coco_benchmarks import (BENCHMARKS, DEFAULT_BENCHMARKS, PM_FILES, CocoLayout,
                                       LayoutError, evaluate_benchmarks,
                                       layout_from_caption_ids, package_dir,
                                       pm_files_present, read_caption_ids)
from dsran_jax.evaluation import registry


def split_layout(config, split_name: str, num_captions: int, captions_per_image: int,
                 format_module=None) -> CocoLayout:
  """The COCO ids of an evaluated split's rows and columns: `eval.eccv_ids` when set;
  else the reader's own (`format_module.caption_ids(config, split_name)` -> (caption ids,
  image ids), the VSE++-order reader); else `{data.root}/{split}_ids.txt` with one
  caption annotation id per caption. LayoutError / FileNotFoundError naming what is
  missing otherwise."""
  where = f"split {split_name!r}"
  if config.eval.eccv_ids:
    caption_ids, image_ids, source = (read_caption_ids(config.eval.eccv_ids), None,
                                      config.eval.eccv_ids)
  elif format_module is not None and hasattr(format_module, "caption_ids"):
    caption_ids, image_ids = format_module.caption_ids(config, split_name)
    source = f"{config.data.format} reader, {where}"
  else:
    path = os.path.join(config.data.root or ".", f"{split_name}_ids.txt")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{path}: missing; ECCV Caption / CxC need the COCO caption annotation id of "
          f"every caption of {where} (data.format={config.data.format!r} has none): give "
          f"eval.eccv_ids=FILE (one id per caption row, .txt or .npy) or read COCO in "
          f"VSE++ order (data.format='coco_vsepp')")
    caption_ids, image_ids, source = read_caption_ids(path), None, path
  if len(caption_ids) != num_captions:
    raise LayoutError(f"{source}: {len(caption_ids)} caption ids for the "
                      f"{num_captions} captions of {where}")
  return layout_from_caption_ids(caption_ids, captions_per_image, image_ids, source)


def format_lines(results: Dict[str, dict]) -> List[str]:
  """The benchmarks as a small fixed-width table (printed after the recall table)."""
  lines = [f"{'benchmark':<10}| {'image -> text':^34} | {'text -> image':^34}"]
  lines.append("-" * len(lines[0]))
  labels = {"eccv": "ECCV", "cxc": "CxC", "coco_5k": "COCO 5K", "coco_1k": "COCO 1K",
            "pmrp": "PMRP"}
  short = {"map@r": "mAP@R", "r-precision": "R-P", "r@1": "R@1", "r@5": "R@5",
           "r@10": "R@10"}
  for name in BENCHMARKS:
    if name not in results:
      continue
    cells = ["  ".join(f"{short[k]} {v:5.1f}" for k, v in results[name][way].items())
             for way in ("i2t", "t2i")]
    lines.append(f"{labels[name]:<10}| {cells[0]:<34} | {cells[1]:<34}")
  return lines


@registry.register("eccv", when=lambda config: bool(config.eval.eccv), needs_sims=True)
def eccv_evaluator(task: registry.Task) -> registry.Outcome:
  """ECCV Caption and CxC (plus PMRP with `eval.eccv_pm_dir`) of the split the retrieval
  evaluator scored (its sims matrix, `task.sims_path`)."""
  config = task.config
  if config.eval.shortlist_workdir:
    raise ValueError("eval.eccv ranks the full sims matrix: it cannot run with "
                     "eval.shortlist_workdir (two-stage evaluation scores short lists only)")
  package_dir()
  split = task.split
  layout = split_layout(config, split.name, split.num_captions, split.captions_per_image,
                        task.format_module)
  if not task.sims_path or not os.path.isfile(task.sims_path):
    raise RuntimeError(f"eccv evaluator: no sims matrix at {task.sims_path!r} (the "
                       "retrieval evaluator writes it first)")
  sims = np.load(task.sims_path, mmap_mode="r")
  benchmarks = list(DEFAULT_BENCHMARKS)
  pm_dir = config.eval.eccv_pm_dir or None
  if pm_dir:
    if not pm_files_present(pm_dir):
      raise FileNotFoundError(f"{pm_dir}: no {' and '.join(PM_FILES)} (eval.eccv_pm_dir: "
                              "the plausible-match files of ECCV Caption)")
    benchmarks.append("pmrp")
  out = evaluate_benchmarks(sims, layout, benchmarks, pm_dir=pm_dir)
  record = out.pop("protocol")
  record["split"] = task.split.name
  return registry.Outcome(results={}, protocol={"eccv": record}, sections=out,
                          lines=format_lines(out))

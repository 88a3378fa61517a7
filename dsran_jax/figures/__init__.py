"""PNG figures saved in a workdir (matplotlib, headless), a layer above inference.

- `training_curves(workdir)` (curves.py): loss, learning rate and dev rsum from the
  metrics log.
- `recall_curves(sims, path)` (recall.py): Recall@K against K, image -> text and
  text -> image.
- `attention_map(workdir, images)` (attention.py): the model's attention over image
  nodes, for a family whose package has an `attention_maps` hook.
- `eccv_queries(sims, path)` / `eccv_figure(workdir)` (eccv.py): a few ECCV Caption
  queries with their top items marked COCO positive / ECCV positive / neither.
- `evaluation_figures(workdir)`: all of the above after an evaluation, from what it
  saved; the one entry point `main` calls.

Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas, never through
pyplot's global state, so importing this package does not switch a notebook's backend.
"""
import json
import os
from typing import Dict

import numpy as np

from dsran_jax import atomic
from dsran_jax.figures.attention import attention_figures, attention_map, attention_weights
from dsran_jax.figures.curves import read_metrics, training_curves
from dsran_jax.figures.eccv import eccv_figure, eccv_queries
from dsran_jax.figures.recall import recall_at, recall_curves, recall_figure
from dsran_jax.workdir import Workdir


def evaluation_figures(workdir: str, config=None, encoder=None) -> Dict[str, str]:
  """Training curves and Recall@K curves of a workdir's last evaluation (from its saved
  `eval_results.json` and `ranks_<split>.npz`: nothing is restored or re-encoded), plus
  the attention map of a family with an `attention_maps` hook (on synthetic data);
  returns {figure name: PNG path}.

  Args:
    workdir: an evaluated dsran_jax workdir.
    config: config whose `data` section locates the data (default: the workdir's).
    encoder: a loaded `inference.Matcher` of the workdir, for the attention map.
  """
  wd = Workdir(workdir)
  config = config or wd.load_config()
  out = {}
  if os.path.exists(wd.metrics_file):
    out["training_curves"] = training_curves(workdir)
  results_path = wd.eval_results_file
  if not os.path.exists(results_path):
    raise FileNotFoundError(f"{results_path} not found: evaluate the workdir first "
                            f"(python -m dsran_jax.main --mode=eval --workdir={workdir})")
  with open(results_path) as f:
    results = json.load(f)
  split = results["split"]
  with np.load(wd.ranks_file(split)) as r:
    ranks = (r["i2t"], r["t2i"])
  step = results.get("checkpoint_step")
  out["recall_curves"] = recall_curves(
      ranks, wd.figure_file("recall_curves"),
      title=f"Recall@K, {split} split ({results['num_images']} images)"
            + (f", step {step}" if step is not None else ""))
  if "eccv" in results and os.path.exists(wd.sims_file(split)):
    out["eccv_queries"] = eccv_figure(workdir, config)["path"]
  kept = wd.evaluation_dir(results.get("evaluation_id") or "")
  if results.get("evaluation_id") and os.path.isdir(kept):
    for path in out.values():   # the evaluation's own copies, beside its results
      if path != out.get("training_curves"):
        atomic.publish(path, os.path.join(kept, os.path.basename(path)))
  out.update(attention_figures(workdir, config, encoder=encoder))
  return out


__all__ = ["attention_figures", "attention_map", "attention_weights", "eccv_figure",
           "eccv_queries", "evaluation_figures", "read_metrics", "recall_at", "recall_curves",
           "recall_figure", "training_curves"]

"""PNG figures saved in a workdir (matplotlib, headless).

- `training_curves(workdir)`: loss, learning rate and dev rsum from `metrics.jsonl`.
- `recall_curves(sims, path)`: Recall@K against K, image -> text and text -> image.
- `evaluation_figures(workdir)`: the above after an evaluation, from the ranks it saved,
  plus the model family's own figures (DSRAN: an attention map on synthetic data).

Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas, never through
pyplot's global state, so importing this module does not switch a notebook's backend.
"""
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

def _figure(figsize) -> Figure:
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str, dpi: int = 110) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def read_metrics(workdir: str) -> list:
  """Rows of `{workdir}/metrics.jsonl`."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def training_curves(workdir: str, filename: str = "training_curves.png") -> str:
  """Loss, learning rate and dev rsum against step; returns the PNG path."""
  rows = read_metrics(workdir)
  series = {key: [(r["step"], r[key]) for r in rows if key in r]
            for key in ("loss", "lr", "dev_rsum")}
  panels = [k for k, v in series.items() if v]
  fig = _figure((4.5 * max(len(panels), 1), 3.4))
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
  titles = {"loss": "training loss", "lr": "learning rate", "dev_rsum": "dev rsum"}
  for ax, key in zip(axes[0], panels):
    steps, values = zip(*series[key])
    ax.plot(steps, values, marker="o" if key == "dev_rsum" else None, ms=3)
    ax.set_title(titles[key])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, os.path.join(workdir, filename))


# --------------------------------------------------------------------- recall curves


def _ranks_of(source, cpi: int) -> Tuple[np.ndarray, np.ndarray]:
  """(i2t ranks, t2i ranks) of a sims matrix, a `.npy` path, an object with `sims()`
  (a `search.Gallery`) or a ready `(i2t, t2i)` pair."""
  from dsran_jax import ranking  # pylint: disable=g-import-not-at-top
  if isinstance(source, tuple) and len(source) == 2:
    return np.asarray(source[0]), np.asarray(source[1])
  if isinstance(source, (str, os.PathLike)):
    source = np.load(os.fspath(source), mmap_mode="r")
  elif hasattr(source, "sims"):
    cpi = getattr(source, "captions_per_image", cpi)
    source = source.sims()
  return ranking.i2t_ranks(source, cpi), ranking.t2i_ranks(source, cpi)


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """R@K (percent) for each K of `ks`, from 0-based ranks (the `ranking` convention)."""
  ranks = np.asarray(ranks)
  return np.array([100.0 * np.mean(ranks < k) for k in ks])


def recall_curves(sims, path: str, cpi: int = 5, max_k: int = 50,
                  title: Optional[str] = None) -> str:
  """Recall@K for K = 1..max_k, image -> text and text -> image; returns the PNG path.

  Args:
    sims: a (N, cpi * N) sims matrix (array or `.npy` path), a `search.Gallery`, an
      `(i2t_ranks, t2i_ranks)` pair from `ranking`, or a dict `{label: any of those}`
      to compare several models on one figure.
    path: output PNG.
    cpi: captions per image.
    max_k: largest K (cut to the number of images).
    title: figure title.
  """
  sources = sims if isinstance(sims, dict) else {"": sims}
  fig = _figure((6.4, 4.2))
  ax = fig.subplots()
  last_k = 1
  for n, (label, source) in enumerate(sources.items()):
    i2t, t2i = _ranks_of(source, cpi)
    # Candidates: captions for a query image, images for a query caption; beyond that
    # count every recall is 100% and the curve stops.
    for d, (direction, ranks, n_items) in enumerate((("image → text", i2t, len(t2i)),
                                                     ("text → image", t2i, len(i2t)))):
      ks = np.arange(1, max(1, min(max_k, n_items)) + 1)
      last_k = max(last_k, int(ks[-1]))
      r = recall_at(ranks, ks)
      name = f"{label}: {direction}" if label else direction
      # One colour per direction for one model; one per model (and a line style per
      # direction) when several are compared.
      colour = f"C{d}" if len(sources) == 1 else f"C{n % 10}"
      style = "-" if d == 0 else "--"
      ax.plot(ks, r, style, color=colour, label=name)
      marks = [k for k in (1, 5, 10) if k <= ks[-1]]
      ax.plot(marks, r[np.array(marks) - 1], "o", color=colour, ms=4)
      for k in marks:
        ax.annotate(f"{r[k - 1]:.1f}", (k, r[k - 1]), textcoords="offset points",
                    xytext=(4, -11 if d else 4), fontsize=7, color=colour)
  ax.set_xlabel("K")
  ax.set_ylabel("Recall@K (%)")
  ax.set_ylim(0, 108)  # room above 100 for the labels of saturated curves
  ax.set_xlim(0.5, last_k + 0.5)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(title or "Recall@K")
  fig.tight_layout()
  return _save(fig, path)


def _wrap(text: str, width: int) -> str:
  import textwrap  # pylint: disable=g-import-not-at-top
  return "\n  ".join(textwrap.wrap(text, width)) or text


# ------------------------------------------------------------------------- together


def evaluation_figures(workdir: str, config=None, encoder=None) -> Dict[str, str]:
  """Training curves and Recall@K curves of a workdir's last evaluation (from its saved
  `eval_results.json` and `ranks_<split>.npz`: nothing is restored or re-encoded), plus
  the model family's own figures (its `figures(workdir, config)` hook, if it has one);
  returns {figure name: PNG path}.

  Args:
    workdir: an evaluated dsran_jax workdir.
    config: config whose `data` section locates the data (default: the workdir's).
    encoder: a loaded `inference.Matcher` of the workdir, passed to the family's hook.
  """
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  from dsran_jax.default_config import load_workdir_config  # pylint: disable=g-import-not-at-top
  config = config or load_workdir_config(workdir)
  out = {}
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    out["training_curves"] = training_curves(workdir)
  results_path = os.path.join(workdir, "eval_results.json")
  if not os.path.exists(results_path):
    raise FileNotFoundError(f"{results_path} not found: evaluate the workdir first "
                            f"(python -m dsran_jax.main --mode=eval --workdir={workdir})")
  with open(results_path) as f:
    results = json.load(f)
  split = results["split"]
  ranks_path = os.path.join(workdir, f"ranks_{split}.npz")
  with np.load(ranks_path) as r:
    ranks = (r["i2t"], r["t2i"])
  step = results.get("checkpoint_step")
  out["recall_curves"] = recall_curves(
      ranks, os.path.join(workdir, "recall_curves.png"),
      title=f"Recall@K, {split} split ({results['num_images']} images)"
            + (f", step {step}" if step is not None else ""))
  hook = getattr(models.family(config.model.name), "figures", None)
  if hook is not None:
    out.update(hook(workdir, config, encoder=encoder))
  return out

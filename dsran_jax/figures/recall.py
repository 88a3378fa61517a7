"""Recall@K against K, image -> text and text -> image, of one model or several."""
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from dsran_jax import ranking
from dsran_jax.figures.canvas import figure, save


def _ranks_of(source, cpi: int) -> Tuple[np.ndarray, np.ndarray]:
  """(i2t ranks, t2i ranks) of a sims matrix, a `.npy` path, an object with `sims()`
  (a `search.Gallery`) or a ready `(i2t, t2i)` pair."""
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
  """`recall_figure(sims, ...)` saved as a PNG at `path`; returns the path."""
  return save(recall_figure(sims, cpi, max_k, title), path)


def recall_figure(sims, cpi: int = 5, max_k: int = 50, title: Optional[str] = None):
  """Recall@K for K = 1..max_k, image -> text and text -> image, as a Figure; R@1, R@5
  and R@10 are marked on the curves and given in the legend.

  Args:
    sims: a (N, cpi * N) sims matrix (array or `.npy` path), a `search.Gallery`, an
      `(i2t_ranks, t2i_ranks)` pair from `ranking`, or a dict `{label: any of those}`
      to compare several models on one figure.
    cpi: captions per image.
    max_k: largest K (cut to the number of images).
    title: figure title.
  """
  sources = sims if isinstance(sims, dict) else {"": sims}
  fig = figure((6.4, 4.2))
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
      marks = [k for k in (1, 5, 10) if k <= ks[-1]]
      # The R@1/5/10 values go in the legend: printed beside the points they collide
      # with each other and with the curves.
      values = "/".join(f"{r[k - 1]:.1f}" for k in marks)
      name = (f"{label}: {direction}" if label else direction) + \
          f"  (R@{'/'.join(map(str, marks))} {values})"
      # One colour per direction for one model; one per model (and a line style per
      # direction) when several are compared.
      colour = f"C{d}" if len(sources) == 1 else f"C{n % 10}"
      style = "-" if d == 0 else "--"
      ax.plot(ks, r, style, color=colour, label=name)
      ax.plot(marks, r[np.array(marks) - 1], "o", color=colour, ms=4)
  ax.set_xlabel("K")
  ax.set_ylabel("Recall@K (%)")
  ax.set_ylim(0, 102)
  ax.set_xlim(0.5, last_k + 0.5)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(title or "Recall@K")
  fig.tight_layout()
  return fig

"""Figures a user reads: no labels drawn over each other, the loss on a log axis."""
import itertools
import json
import os

import numpy as np

from dsran_jax import figures


def _near_perfect_sims(n_images: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  sims = rng.normal(size=(n_images, 5 * n_images))
  for i in range(n_images):
    sims[i, 5 * i:5 * i + 5] += 2.5
  return sims


def _text_boxes(fig):
  fig.canvas.draw()   # lays out the legend
  renderer = fig.canvas.get_renderer()
  texts = [t for ax in fig.axes for t in ax.texts if t.get_text().strip()]
  for ax in fig.axes:
    legend = ax.get_legend()
    if legend is not None:
      texts += [t for t in legend.get_texts() if t.get_text().strip()]
  return [(t.get_text(), t.get_window_extent(renderer)) for t in texts]


def test_recall_values_of_two_close_models_do_not_overlap():
  # Two models whose R@K are almost equal: labels printed beside their points collided.
  fig = figures.recall_figure({"a": _near_perfect_sims(100, 0),
                               "b": _near_perfect_sims(100, 1)})
  boxes = _text_boxes(fig)
  legend = " ".join(text for text, _ in boxes)
  assert legend.count("R@1/5/10") == 4, legend   # both models, both directions
  for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
    assert not a.overlaps(b), (ta, tb)


def test_training_loss_is_drawn_on_a_log_axis(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(1, 101):
      f.write(json.dumps({"step": step, "loss": 50.0 / step, "lr": 1e-3}) + "\n")
  path = figures.training_curves(str(tmp_path))
  assert os.path.getsize(path) > 0
  fig = figures.curves.training_figure(str(tmp_path))
  loss_axis = next(ax for ax in fig.axes if ax.get_title().startswith("training loss"))
  assert loss_axis.get_yscale() == "log"

"""PNG figures saved in a workdir (matplotlib, headless)."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
  titles = {"loss": "training loss", "lr": "learning rate", "dev_rsum": "dev rsum"}
  for ax, key in zip(axes[0], panels):
    steps, values = zip(*series[key])
    ax.plot(steps, values, marker="o" if key == "dev_rsum" else None, ms=3)
    ax.set_title(titles[key])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

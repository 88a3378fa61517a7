"""Training curves: loss, learning rate and dev rsum from a workdir's metrics log."""
from dsran_jax.figures.canvas import figure, save
from dsran_jax.workdir import Workdir


def read_metrics(workdir: str) -> list:
  """Rows of the workdir's metrics log (`metrics.jsonl`)."""
  return Workdir(workdir).read_metrics()


def training_curves(workdir: str, filename: str = "training_curves.png") -> str:
  """`training_figure(workdir)` saved as `{workdir}/{filename}`; returns the PNG path."""
  return save(training_figure(workdir), Workdir(workdir).file(filename))


def training_figure(workdir: str):
  """Loss (log axis), learning rate and dev rsum against step, as a Figure."""
  rows = read_metrics(workdir)
  series = {key: [(r["step"], r[key]) for r in rows if key in r]
            for key in ("loss", "lr", "dev_rsum")}
  panels = [k for k, v in series.items() if v]
  fig = figure((4.5 * max(len(panels), 1), 3.4))
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
  titles = {"loss": "training loss", "lr": "learning rate", "dev_rsum": "dev rsum"}
  for ax, key in zip(axes[0], panels):
    steps, values = zip(*series[key])
    ax.plot(steps, values, marker="o" if key == "dev_rsum" else None, ms=3)
    if key == "loss" and min(values) > 0:
      # The loss falls by orders of magnitude early on: on a linear axis everything after
      # the first tenth of training is flat at the bottom.
      ax.set_yscale("log")
    ax.set_title(titles[key] + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig

"""Drawing helpers shared by the figures: a headless Agg figure, saving and text wrapping.

Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas, never through
pyplot's global state, so importing `dsran_jax.figures` does not switch a notebook's
backend.
"""
import os
import textwrap

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsran_jax import atomic


def figure(figsize) -> Figure:
  """A new figure of `figsize` inches with its own Agg canvas."""
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str, dpi: int = 110) -> str:
  """Writes `fig` at `path` (directories created) atomically, in the format its suffix
  names (PNG without one); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fmt = os.path.splitext(path)[1][1:].lower() or "png"
  with atomic.replacing(path, "wb") as f:
    fig.savefig(f, dpi=dpi, format=fmt)
  return path


def wrap(text: str, width: int) -> str:
  """`text` wrapped at `width` characters, continuation lines indented."""
  return "\n  ".join(textwrap.wrap(text, width)) or text

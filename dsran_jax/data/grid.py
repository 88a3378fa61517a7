"""Grid features (the SSR grid branch): the one layout dsran_jax defines itself.

Layout: one float32 `.npy` per split, `{data.root}/{split}_grid.npy`, shape
`(N_images, 49, 2048)`:
- row i is the split's image i, in the same order as that split's images (the precomp
  `{split}_ims.npy` rows, or the Karpathy-JSON order of the VLP reader);
- the 49 cells are ResNet-152's last conv block (`layer4`, 2048 channels, ImageNet
  weights) on the image resized to 256 (shorter side) and center-cropped to 224x224,
  laid out row-major: cell `7 * row + col` (the `(2048, 7, 7)` map transposed to
  `(7, 7, 2048)` and reshaped).

`data.grid_file` overrides the path: a file containing `{split}` is formatted with the
split name, a directory is searched for `{split}_grid.npy`, any other path is used for
every split (its row count must then match each split it is used for).

Files are memory-mapped; only the rows of a batch are read.
"""
import os
from typing import Optional

import numpy as np

from dsran_jax import models
from dsran_jax.core.batch import GRID_CELLS
from dsran_jax.data import raw


def uses_grid(config) -> bool:
  """Whether the configured model reads grid features."""
  return "grid" in models.image_keys(config)


def grid_path(config, split_name: str) -> str:
  """The grid file of a split (see the module docstring for `data.grid_file`)."""
  override = config.data.grid_file
  if override:
    override = os.path.expanduser(override)
    if "{split}" in override:
      return override.format(split=split_name)
    if os.path.isdir(override):
      return os.path.join(override, f"{split_name}_grid.npy")
    return override
  return os.path.join(config.data.root, f"{split_name}_grid.npy")


def open_grid(config, split_name: str, num_images: int) -> Optional[np.ndarray]:
  """The split's grid memmap `(num_images, 49, img_dim)`, or None when the file is absent.

  Raises:
    DataError: the file exists but is unreadable or has the wrong shape.
  """
  path = grid_path(config, split_name)
  if not os.path.isfile(path):
    return None
  return raw.load_npy(path, (num_images, GRID_CELLS, config.data.img_dim),
                      f"grid features of split {split_name!r} ({num_images} images)",
                      mmap=True)


def require_grid(config, split_name: str, num_images: int) -> Optional[np.ndarray]:
  """The grid memmap when the model reads grid features (`models.image_keys`), else None.

  Raises:
    MissingDataError: grid features are needed and the file is absent; the message says
      how to train without them.
  """
  if not uses_grid(config):
    return None
  grid = open_grid(config, split_name, num_images)
  if grid is None:
    path = grid_path(config, split_name)
    hint = models.input_hint(config, "grid")
    raise raw.MissingDataError(
        f"{path}: missing (grid features, float32 ({num_images}, {GRID_CELLS}, "
        f"{config.data.img_dim}), which model {config.model.name!r} reads). "
        + (f"To do without them, {hint}; or provide" if hint else "Provide")
        + " grid features (layout in dsran_jax/data/grid.py; data.grid_file sets the path)")
  return grid


def read_rows(grid: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """float32 rows of a grid memmap."""
  return np.asarray(grid[indices], dtype=np.float32)

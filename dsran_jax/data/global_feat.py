"""Global image features (MLASM's `global_feat`): the average-pooled ResNet-152 feature.

Layout: one float32 `.npy` per split, `{data.root}/{split}_global.npy`, shape
`(N_images, 2048)`:
- row i is the split's image i, in the same order as that split's images (as for
  `{split}_grid.npy`, see `dsran_jax/data/grid.py`);
- the 2048 values are ResNet-152's `layer4` map (ImageNet weights; the image resized to
  256 on its shorter side and center-cropped to 224x224) averaged over its 7x7 cells:
  torchvision's `avgpool` output with `fc` = identity, before any normalisation. It is
  the mean of the same image's 49 grid cells.

`python -m dsran_jax.extract` writes both files. `data.global_file` overrides the path
with the same rules as `data.grid_file`: a file containing `{split}` is formatted with
the split name, a directory is searched for `{split}_global.npy`, any other path is used
for every split (its row count must then match each split it is used for).

Files are memory-mapped; only the rows of a batch are read.
"""
import os
from typing import Optional

import numpy as np

from dsran_jax import models
from dsran_jax.data import raw

GLOBAL_DIM = 2048  # ResNet-50/101/152's pooled width


def uses_global(config) -> bool:
  """Whether the configured model reads global features (batch key `global_feat`)."""
  return "global_feat" in models.image_keys(config)


def global_path(config, split_name: str) -> str:
  """The global-feature file of a split (see the module docstring for `data.global_file`)."""
  override = config.data.global_file
  if override:
    override = os.path.expanduser(override)
    if "{split}" in override:
      return override.format(split=split_name)
    if os.path.isdir(override):
      return os.path.join(override, f"{split_name}_global.npy")
    return override
  return os.path.join(config.data.root, f"{split_name}_global.npy")


def open_global(config, split_name: str, num_images: int,
                global_dim: int = GLOBAL_DIM) -> Optional[np.ndarray]:
  """The split's global-feature memmap `(num_images, global_dim)`, or None when absent.

  Raises:
    DataError: the file exists but is unreadable or has the wrong shape (naming it).
  """
  path = global_path(config, split_name)
  if not os.path.isfile(path):
    return None
  return raw.load_npy(path, (num_images, global_dim),
                      f"global features of split {split_name!r} ({num_images} images)",
                      mmap=True)


def require_global(config, split_name: str, num_images: int,
                   global_dim: int = GLOBAL_DIM) -> Optional[np.ndarray]:
  """The global memmap when the model reads `global_feat`, else None.

  Raises:
    MissingDataError: the model needs global features and the file is absent; the
      message says how to make it.
  """
  if not uses_global(config):
    return None
  feats = open_global(config, split_name, num_images, global_dim)
  if feats is None:
    path = global_path(config, split_name)
    raise raw.MissingDataError(
        f"{path}: missing (global image features, float32 ({num_images}, {global_dim}), "
        f"which model.name={config.model.name!r} reads as global_feat). Write it with "
        f"`python -m dsran_jax.extract --images=... --weights=resnet152.pth "
        f"--out={os.path.dirname(path) or '.'} --split={split_name}` (layout in "
        f"dsran_jax/data/global_feat.py; data.global_file sets the path)")
  return feats


def read_rows(feats: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """float32 rows of a global-feature memmap."""
  return np.asarray(feats[indices], dtype=np.float32)

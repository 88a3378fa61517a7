"""Reader of the SCAN / VSE++ "precomp" release (BUTD region features).

Layout under `data.root`, for each split (COCO: train, dev, test (1K), testall (5K);
Flickr30K: train, dev, test):
- `{split}_ims.npy`: float32 `(N, R, img_dim)`, R = 36 in the release; memory-mapped.
  Another dtype (float16, float64, int64) is an error naming the file, not a cast.
- `{split}_caps.txt`: UTF-8, one caption per line, 5 lines per image in image order (1 per
  image when the file has exactly N lines).
- `{split}_ids.txt` (optional): one image id per image (or per caption) line; otherwise
  images are named by row number.
- `{split}_grid.npy` (optional): grid features, see `dsran_jax.data.grid`.
- `{split}_global.npy` (when the model reads `global_feat`, MLASM): pooled ResNet
  features, see `dsran_jax.data.global_feat`.

The release has no boxes or class probabilities: `region_pos` is all zeros and every
region is real (`region_mask` all True). Regions are given as stored (R from the file;
`data.num_regions` applies to the VLP reader, whose files hold 100 detections).
"""
import os

import numpy as np

from dsran_jax.data import global_feat as global_lib
from dsran_jax.data import grid as grid_lib
from dsran_jax.data import raw
from dsran_jax.data.region_pos import POS_DIM


def split_files(root: str, split_name: str) -> dict:
  """Paths of a split's files (whether or not they exist)."""
  return {k: os.path.join(root, f"{split_name}_{k}.{ext}")
          for k, ext in (("ims", "npy"), ("caps", "txt"), ("ids", "txt"))}


def available_splits(root: str) -> list:
  """Split names that have a `{split}_caps.txt` or `{split}_ims.npy` under `root`."""
  names = set()
  if os.path.isdir(root):
    for f in os.listdir(root):
      for suffix in ("_caps.txt", "_ims.npy"):
        if f.endswith(suffix):
          names.add(f[:-len(suffix)])
  return sorted(names)


def _image_ids(path: str, num_images: int, cpi: int) -> list:
  if not os.path.isfile(path):
    return [str(i) for i in range(num_images)]
  ids = raw.read_text_lines(path, "image ids")
  if len(ids) == num_images:
    return ids
  if len(ids) == num_images * cpi:
    return ids[::cpi]
  raise raw.DataError(
      f"{path}: {len(ids)} ids for {num_images} images; expected {num_images} (one per "
      f"image) or {num_images * cpi} (one per caption)")


def read_raw_split(config, split_name: str) -> raw.RawSplit:
  """Reads a precomp split: captions now, features on demand (memory-mapped).

  Raises:
    MissingDataError: `{split}_ims.npy` / `{split}_caps.txt` (or a needed grid file) absent.
    DataError: unreadable or misshapen features, or a caption count that matches neither
      5 nor 1 per image.
  """
  root = config.data.root
  if not root:
    raise ValueError("config.data.root='': give the precomp directory")
  if not os.path.isdir(root):
    raise raw.MissingDataError(f"{root}: not a directory (config.data.root, the precomp "
                               f"directory of split {split_name!r})")
  files = split_files(root, split_name)
  if not os.path.isfile(files["ims"]) and not os.path.isfile(files["caps"]):
    raise raw.MissingDataError(
        f"{files['ims']}, {files['caps']}: missing (precomp split {split_name!r}); "
        f"splits found under {root}: {available_splits(root) or 'none'}")
  ims = raw.load_npy(files["ims"], (None, None, config.data.img_dim),
                     "precomp region features (images, regions, img_dim)", mmap=True,
                     dtype=np.float32)
  if ims.shape[0] == 0 or ims.shape[1] == 0:
    raise raw.DataError(f"{files['ims']}: empty features {ims.shape}")
  texts = raw.read_text_lines(files["caps"], "captions")
  cpi = raw.captions_per_image(ims.shape[0], len(texts), files["caps"])
  image_ids = _image_ids(files["ids"], ims.shape[0], cpi)
  grid = grid_lib.require_grid(config, split_name, ims.shape[0])
  glob = global_lib.require_global(config, split_name, ims.shape[0])
  images = PrecompImages(files["ims"], grid.filename if grid is not None else None,
                         glob.filename if glob is not None else None)
  return raw.RawSplit(image_ids=image_ids, texts=texts, captions_per_image=cpi,
                      read_images=images)


class PrecompImages:
  """`indices -> dict` reader of a precomp split (the `RawSplit.read_images`).

  Holds paths, not arrays: pickling it (to a worker process) never copies the features;
  each process memory-maps the files itself.
  """

  def __init__(self, ims_path: str, grid_path=None, global_path=None):
    self.ims_path, self.grid_path, self.global_path = ims_path, grid_path, global_path
    self._ims = self._grid = self._global = None

  def __getstate__(self):
    return {"ims_path": self.ims_path, "grid_path": self.grid_path,
            "global_path": self.global_path}

  def __setstate__(self, state):
    self.__init__(state["ims_path"], state["grid_path"], state.get("global_path"))

  def _arrays(self):
    if self._ims is None:  # shapes were checked when the split was read
      self._ims = np.load(self.ims_path, mmap_mode="r")
      if self.grid_path:
        self._grid = np.load(self.grid_path, mmap_mode="r")
      if self.global_path:
        self._global = np.load(self.global_path, mmap_mode="r")
    return self._ims, self._grid

  def __call__(self, indices) -> dict:
    ims, grid = self._arrays()
    indices = np.asarray(indices, np.int64)
    b, num_regions = len(indices), ims.shape[1]
    out = {
        "regions": np.asarray(ims[indices], dtype=np.float32),
        "region_pos": np.zeros((b, num_regions, POS_DIM), np.float32),
        "region_mask": np.ones((b, num_regions), bool),
    }
    if grid is not None:
      out["grid"] = grid_lib.read_rows(grid, indices)
    if self._global is not None:
      out["global_feat"] = global_lib.read_rows(self._global, indices)
    return out


def list_splits(config) -> list:
  """The splits the checker scans: those configured plus any other found under the root."""
  configured = [config.data.train_split, config.data.dev_split, config.data.test_split]
  extra = [s for s in available_splits(config.data.root) if s not in configured]
  return list(dict.fromkeys(configured + extra))

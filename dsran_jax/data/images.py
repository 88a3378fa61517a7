"""Raw images for a model that runs its CNN in the training step (DSRAN's online grid).

A model whose image keys include `image` (`models.image_keys`) reads pixels, not grid
features: `attach` gives a split's reader an `image` array, uint8 (B, crop, crop, 3)
RGB, made from the split's raw images with the authors' torchvision transforms
(kywen1119/DSRAN `data.py` / `data_bert.py`, `get_transform`), on PIL images as theirs:

- training (`Split.train_images`, the tf.data training pipeline's map):
  `RandomResizedCrop(crop)` (scale (0.08, 1), ratio (3/4, 4/3), ten tries then the
  centre fallback; bilinear) and `RandomHorizontalFlip()`; each view is drawn from an
  rng keyed by the row's entropy (`train.seed`, global step, row of the global batch),
  so a resumed run sees the same crops;
- evaluation (`Split.images`): `Resize(resize)` (shorter side, bilinear) and
  `CenterCrop(crop)`.

`ToTensor()` and the ImageNet `Normalize` are the model's first operation (on the
device, in float32, the same arithmetic), so the batch carries a quarter of the bytes.
`(crop, resize)` come from the family (`models.image_views`: DSRAN's
`model.dsran.crop_size` / `resize_size`, 224 / 256).

Where the images are: a format that makes its own (the synthetic world) provides
`RawSplit.read_pixels`; every other split finds image `id` as the file of stem `id`
(any image suffix) under `data.image_dir`, searched recursively (Flickr30K's
`flickr30k-images/`, COCO's `train2014/` + `val2014/`), every id found before training
starts. PIL is imported where an image is decoded; a file that cannot be decoded is an
error naming it, never a substitute image.
"""
import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
from typing import Callable, Dict, Sequence, Tuple

import numpy as np

from dsran_jax import models
from dsran_jax.data import raw

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SCALE = (0.08, 1.0)        # torchvision RandomResizedCrop defaults
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
_VIEW_STREAM = 0x76696577  # "view": this module's rng stream tag

_POOL_LOCK = threading.Lock()
_POOL = []


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """One decode pool per process (PIL releases the GIL while decoding and resizing)."""
  with _POOL_LOCK:
    if not _POOL:
      _POOL.append(concurrent.futures.ThreadPoolExecutor(
          max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="images"))
    return _POOL[0]


# ----------------------------------------------------------------------------- geometry

def resized_size(width: int, height: int, size: int) -> Tuple[int, int]:
  """`(width, height)` after torchvision's `Resize(size)`: the shorter side becomes
  `size`, the longer `int(size * long / short)` (truncated, as torchvision)."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
  """PIL box `(left, top, right, bottom)` of torchvision's `CenterCrop(size)` (offsets
  `int(round((side - size) / 2))`)."""
  if width < size or height < size:
    raise ValueError(f"image of {width}x{height} is smaller than the {size}x{size} crop")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=SCALE, ratio=RATIO) -> Tuple[int, int, int, int]:
  """PIL box of torchvision's `RandomResizedCrop.get_params`: up to ten draws of an
  area fraction U(scale) and a log-uniform aspect ratio, the first that fits placed
  uniformly; else the centre crop of the whole image clamped to `ratio`."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(ATTEMPTS):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def eval_view(image, crop: int, resize: int) -> np.ndarray:
  """`Resize(resize)` + `CenterCrop(crop)` of a PIL RGB image: uint8 (crop, crop, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = image.resize(resized_size(*image.size, resize), Image.Resampling.BILINEAR)
  return np.asarray(im.crop(center_crop_box(*im.size, crop)), dtype=np.uint8)


def train_view(image, crop: int, rng: np.random.Generator) -> np.ndarray:
  """`RandomResizedCrop(crop)` + `RandomHorizontalFlip()` of a PIL RGB image, drawn
  from `rng`: uint8 (crop, crop, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  box = random_resized_crop_box(*image.size, rng)
  im = image.crop(box).resize((crop, crop), Image.Resampling.BILINEAR)
  if rng.random() < 0.5:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(im, dtype=np.uint8)


def view_rng(key: Sequence[int]) -> np.random.Generator:
  """The rng of one training view, from its row of entropy (seed, step, row)."""
  return np.random.default_rng([int(k) for k in key] + [_VIEW_STREAM])


# ----------------------------------------------------------------------------- sources

@functools.lru_cache(maxsize=4)
def index_directory(image_dir: str) -> Dict[str, str]:
  """`{file stem: path}` of every image file under `image_dir` (recursively).

  Raises:
    MissingDataError: no such directory. DataError: two images share a stem (both
      named), or none is there.
  """
  if not os.path.isdir(image_dir):
    raise raw.MissingDataError(f"{image_dir}: missing (data.image_dir, the raw images)")
  found, clashes = {}, []
  for root, dirs, files in os.walk(image_dir, followlinks=True):
    dirs.sort()
    for name in sorted(files):
      stem, suffix = os.path.splitext(name)
      if suffix.lower() not in SUFFIXES:
        continue
      path = os.path.join(root, name)
      if stem in found:
        clashes.append(f"{found[stem]} and {path}")
      else:
        found[stem] = path
  if clashes:
    raise raw.DataError(f"{image_dir}: {len(clashes)} image stems found twice, so an id "
                        f"names no single file: " + "; ".join(clashes[:5]))
  if not found:
    raise raw.DataError(f"{image_dir}: no image files ({'/'.join(SUFFIXES)}) under it")
  return found


def directory_pixels(image_dir: str, image_ids: Sequence[str], split_name: str
                     ) -> Callable[[int], "object"]:
  """`index -> PIL RGB image` of a split's images under `image_dir`, every id checked.

  Raises:
    MissingDataError: ids without an image (the count and the first ones named).
  """
  index = index_directory(os.path.abspath(os.path.expanduser(image_dir)))
  paths = [index.get(str(i)) for i in image_ids]
  missing = [str(i) for i, p in zip(image_ids, paths) if p is None]
  if missing:
    raise raw.MissingDataError(
        f"{image_dir}: {len(missing)} of the {len(paths)} images of split {split_name!r} "
        f"have no file of that stem, e.g. {', '.join(missing[:5])}")

  def load(i: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    path = paths[i]
    try:
      with Image.open(path) as im:
        return im.convert("RGB")  # decodes the whole file: truncated data fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise raw.DataError(f"{path}: cannot decode image: {e}") from e
  return load


def array_pixels(read_pixels: Callable[[int], np.ndarray]) -> Callable[[int], "object"]:
  """`index -> PIL RGB image` of a format's own `(H, W, 3)` uint8 pixels."""
  def load(i: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return Image.fromarray(np.asarray(read_pixels(i), dtype=np.uint8), "RGB")
  return load


def attach(config, split_name: str, split: raw.RawSplit) -> raw.RawSplit:
  """`split` with an `image` key in its readers when the configured model reads raw
  images (`models.image_views`), else `split` unchanged.

  `read_images` adds the evaluation view of each image, `read_train_images` (indices,
  keys) the random training view keyed by each row of `keys`.

  Raises:
    MissingDataError: no raw images for the split (the format makes none and
      `data.image_dir` is empty, or ids without a file).
  """
  views = models.image_views(config)
  if views is None:
    return split
  crop, resize = views
  if split.read_pixels is not None:
    load = array_pixels(split.read_pixels)
  elif config.data.image_dir:
    load = directory_pixels(config.data.image_dir, split.image_ids, split_name)
  else:
    hint = models.input_hint(config, "image")
    raise raw.MissingDataError(
        f"split {split_name!r}: model {config.model.name!r} reads raw images and "
        f"data.format={config.data.format!r} has none: "
        + (hint or "set data.image_dir"))
  base = split.read_images

  def read_eval(indices):
    out = dict(base(indices))
    views_ = _pool().map(lambda i: eval_view(load(int(i)), crop, resize), indices)
    out["image"] = np.stack(list(views_)) if len(indices) else np.zeros(
        (0, crop, crop, 3), np.uint8)
    return out

  def read_train(indices, keys):
    if len(keys) != len(indices):
      raise ValueError(f"{len(keys)} rng keys for {len(indices)} images")
    out = dict(base(indices))
    views_ = _pool().map(lambda ik: train_view(load(int(ik[0])), crop, view_rng(ik[1])),
                         zip(indices, keys))
    out["image"] = np.stack(list(views_)) if len(indices) else np.zeros(
        (0, crop, crop, 3), np.uint8)
    return out

  return dataclasses.replace(split, read_images=read_eval, read_train_images=read_train)

"""What a format reader returns before tokenisation, and checked file reads they share.

A format module (`synthetic`, `precomp`, `vlp`) provides
`read_raw_split(config, split_name) -> RawSplit`; `dsran_jax.data.load_split` tokenises the
texts once and turns the result into a `base.Split`.

Every read here fails loudly: a missing or malformed file raises an error that names the
file (and the HDF5 key) and what was expected. Readers never substitute random features
(the authors' loader silently does, which hides holes in the public feature zips).
"""
import collections
import dataclasses
import os
import threading
from typing import Callable, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class RawSplit:
  """One split as a format reader sees it: raw captions and an image-feature reader.

  Attributes:
    image_ids: one id per image (file stem, COCO id, row number, ...).
    texts: raw captions, `captions_per_image` consecutive entries per image.
    captions_per_image: 5 for the standard releases, 1 when #images == #captions.
    read_images: `indices (int64 array) -> dict` of image-side arrays, batch dimension
      first (keys from `base.IMAGE_KEYS`; see docs/architecture.md).
    read_pixels: optional `index -> (H, W, 3) uint8` RGB image, for a format that makes
      its own raw images (the synthetic world); others find them in `data.image_dir`
      (`data.images`).
    read_train_images: optional `(indices, keys) -> dict`, the training-time reader
      when it differs from `read_images` (random image views; `keys` int64 (B, k), one
      row of rng entropy per image); set by `data.images.attach`.
  """
  image_ids: Sequence[str]
  texts: Sequence[str]
  captions_per_image: int
  read_images: Callable[[np.ndarray], dict]
  read_pixels: Optional[Callable[[int], np.ndarray]] = None
  read_train_images: Optional[Callable[[np.ndarray, np.ndarray], dict]] = None


class DataError(ValueError):
  """A dataset file is malformed: truncated, corrupt, wrong shape, inconsistent counts."""


class MissingDataError(DataError, FileNotFoundError):
  """A file, or a key inside an HDF5 file, that the split needs is absent."""


def shape_str(shape) -> str:
  """`(None, 36, 2048)` -> `(*, 36, 2048)`, for messages about expected shapes."""
  return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def check_shape(array_shape, expected, where: str, what: str) -> None:
  """Raises DataError unless `array_shape` matches `expected` (None matches any size)."""
  ok = len(array_shape) == len(expected) and all(
      e is None or e == a for a, e in zip(array_shape, expected))
  if not ok:
    raise DataError(
        f"{where}: expected {what} of shape {shape_str(expected)}, "
        f"got {tuple(array_shape)}")


def require_file(path: str, what: str) -> str:
  """Returns `path` if it is a file, else raises MissingDataError naming it."""
  if not os.path.isfile(path):
    raise MissingDataError(f"{path}: missing ({what})")
  return path


def load_npy(path: str, expected_shape=None, what: str = "features",
             mmap: bool = False, dtype=None) -> np.ndarray:
  """Loads a floating-point `.npy` file, checked.

  Args:
    path: the file.
    expected_shape: tuple with None for free dimensions, or None to skip the check.
    what: what the file holds, for messages.
    mmap: memory-map instead of reading (large split-level arrays).
    dtype: if given, the file must store exactly this dtype (a documented format:
      float16 or int64 features are a conversion gone wrong, not data to cast).

  Returns:
    The array (a read-only memmap when `mmap`).
  """
  require_file(path, what)
  with open(path, "rb") as f:
    magic = f.read(6)
  if magic != b"\x93NUMPY":
    raise DataError(f"{path}: not a .npy file ({what}): no NUMPY header "
                    f"({os.path.getsize(path)} bytes)")
  try:
    arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(
        f"{path}: cannot read as .npy ({what}): {e} -- the file is truncated or corrupt"
    ) from e
  if not isinstance(arr, np.ndarray):
    raise DataError(f"{path}: expected a single array ({what}), got {type(arr).__name__}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise DataError(f"{path}: expected numeric {what}, got dtype {arr.dtype}")
  if dtype is not None and arr.dtype != np.dtype(dtype):
    raise DataError(
        f"{path}: {what} stored as {arr.dtype}, expected {np.dtype(dtype)} (the documented "
        f"format); convert the file, e.g. np.save(path, np.load(path).astype("
        f"np.{np.dtype(dtype)}))")
  if expected_shape is not None:
    check_shape(arr.shape, expected_shape, path, what)
  return arr


def read_text_lines(path: str, what: str = "captions") -> list:
  """UTF-8 lines of a text file, each stripped; blank lines at the end of file dropped.

  Blank lines inside the file are kept (they are captions, reported as empty by the
  checker) so that the caption -> image alignment is never silently shifted.
  """
  require_file(path, what)
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line} is not valid UTF-8 ({what}): {e.reason}") from e
  # splitlines() would also split on \x0b, \x1c, U+2028, ...; only \n ends a line in these
  # releases (VSE++ reads them with `for line in f`).
  lines = [ln.strip() for ln in text.split("\n")]
  while lines and not lines[-1]:
    lines.pop()
  return lines


class H5Reader:
  """Checked reads of datasets from many HDF5 files, keeping a bounded set open.

  COCO's VLP features are spread over 1000+ shards: opening a file per image is slow and
  keeping all open exceeds the usual 1024 file-descriptor limit, so the most recently
  used `max_open` files stay open. Safe to share between threads; a forked child or an
  unpickled copy reopens files itself (HDF5 handles must not cross processes).
  """

  def __init__(self, max_open: int = 32):
    self._max_open = max_open
    self._reset()

  def _reset(self):
    self._files = collections.OrderedDict()
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def __getstate__(self):
    return {"_max_open": self._max_open}

  def __setstate__(self, state):
    self._max_open = state["_max_open"]
    self._reset()

  def _open(self, path: str, what: str):
    f = self._files.get(path)
    if f is not None:
      self._files.move_to_end(path)
      return f
    import h5py  # pylint: disable=g-import-not-at-top
    require_file(path, what)
    try:
      f = h5py.File(path, "r")
    except OSError as e:
      raise DataError(
          f"{path}: cannot open as HDF5 ({what}): {e} -- the file is truncated or corrupt"
      ) from e
    self._files[path] = f
    while len(self._files) > self._max_open:
      _, old = self._files.popitem(last=False)
      old.close()
    return f

  def keys(self, path: str, what: str) -> set:
    """All top-level keys of an HDF5 file."""
    self._after_fork()
    with self._lock:
      return set(self._open(path, what).keys())

  def read(self, path: str, key: str, expected_shape=None, what: str = "features"
           ) -> np.ndarray:
    """Dataset `key` of HDF5 file `path` as an array, checked like `load_npy`."""
    self._after_fork()
    with self._lock:
      f = self._open(path, what)
      if key not in f:
        raise MissingDataError(f"{path}: no key {key!r} ({what})")
      try:
        arr = f[key][()]
      except (OSError, ValueError, TypeError) as e:
        raise DataError(
            f"{path}: key {key!r}: cannot read ({what}): {e} -- truncated or corrupt"
        ) from e
    arr = np.asarray(arr)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
      raise DataError(f"{path}: key {key!r}: expected numeric {what}, got dtype {arr.dtype}")
    if expected_shape is not None:
      check_shape(arr.shape, expected_shape, f"{path}: key {key!r}", what)
    return arr

  def _after_fork(self):
    if self._pid != os.getpid():
      self._reset()  # the parent's handles are dropped, not closed: they are the parent's

  def close(self) -> None:
    """Closes every open file."""
    if self._pid != os.getpid():
      return
    with self._lock:
      while self._files:
        self._files.popitem()[1].close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # interpreter shutdown: h5py may already be gone


def captions_per_image(num_images: int, num_captions: int, where: str,
                       expected: Optional[int] = 5) -> int:
  """`expected` (5) captions per image, or 1 when #images == #captions; else DataError."""
  if num_images and num_captions == expected * num_images:
    return expected
  if num_images and num_captions == num_images:
    return 1
  raise DataError(
      f"{where}: {num_captions} captions for {num_images} images; expected "
      f"{expected * num_images} ({expected} per image) or {num_images} (one per image)")

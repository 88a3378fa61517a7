r"""ResNet grid and global features of your own images, in the layouts the readers take.

    python -m dsran_jax.extract --images=DIR_OR_LIST --weights=resnet152.pth --out=DIR \
        [--split=test] [--batch_size=32]

- `--images`: a directory (its image files, .jpg .jpeg .png .bmp .gif .webp .tif .tiff
  .ppm, in sorted name order; other files are skipped and counted in the log) or a
  text file with one image path per line (that order; relative paths are relative to
  the list file's directory; blank lines are skipped).
- `--weights`: a ResNet-50/101/152 state dict in torchvision's layout (`resnet152-*.pth`
  as torchvision saves it) or Hugging Face's `ResNetModel` layout, as `.pth`/`.pt`/`.bin`
  or `.safetensors`, with or without a `module.` / `cnn.module.` prefix; the depth is
  read from the weights. Nothing is downloaded.
  For a workdir converted from a DSRAN or MLASM checkpoint (`dsran_jax.tools.
  convert_torch`), give its `resnet152.safetensors`: the checkpoint's own ResNet-152,
  whose BatchNorm statistics drifted while the authors trained (their frozen CNN ran in
  train mode), so the features the checkpoint was evaluated on come from it, not from
  torchvision's ImageNet weights. To train a recipe from scratch, use ImageNet weights.
- Decoding is torchvision's eval transform on PIL images: RGB, `Resize(256)` (shorter
  side to 256, bilinear), `CenterCrop(224)`, `ToTensor()` (/255), `Normalize` with the
  ImageNet mean/std. EXIF orientation is not applied (torchvision does not either).
  16-bit images (PNG, TIFF, PGM grayscale: PIL modes I;16 and I) are scaled to 8 bits
  over their full range (`round(v / 257)`), as PIL itself does for 16-bit RGB; 32-bit
  integer and floating-point images (TIFF modes I and F), whose range the file does not
  give, are refused naming the file. An image of more than `--max_image_pixels`
  (default 89,478,485, PIL's own warning threshold, which this limit replaces) is
  refused from its header, before it is decoded: a decompression bomb costs nothing.
- An image-named entry of the directory that cannot be opened (a symlink loop, a broken
  link) is an error naming it, not a skipped file.

Writes into `--out`:
- `{split}_grid.npy` float32 (N, 49, 2048): the `layer4` map, cell `7 * row + col`
  (`dsran_jax/data/grid.py`);
- `{split}_global.npy` float32 (N, 2048): its average pool, MLASM's `global_feat`
  (`dsran_jax/data/global_feat.py`);
- `{split}_images.txt`: the images of rows 0..N-1, one a line (as listed, or the file
  names of the directory);
- `{split}_extract.json`: a progress record (rows written, checksums of the image list
  and the weights file). A re-run continues after the rows already written; it refuses
  a changed image list or weights file. Every file is written atomically (the record
  first, the `.npy` files made whole under a temporary name), so a kill at any instant
  leaves a record to continue from, or nothing.

The default split, "test", is where evaluation and `dsran_jax.search` look
(`config.data.test_split`).
"""
import concurrent.futures
import errno
import functools
import hashlib
import json
import os
import stat
import time
import types
from typing import List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsran_jax import atomic, cli, integrity  # noqa: E402
from dsran_jax.models.common import resnet  # noqa: E402
from dsran_jax.progress import Progress  # noqa: E402

RESIZE = 256
CROP = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
GRID_CELLS = 49
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                  ".ppm")
RECORD_VERSION = 1
MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: a 9459x9459 picture
# PIL modes holding 16-bit samples; mode I (32-bit) does when PNG (old Pillow) or PGM/PPM
# (maxval > 255) decoded them, but a TIFF's mode I may hold any 32-bit range.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_FORMATS_16BIT_IN_I = ("PNG", "PPM")


class ImageError(ValueError):
  """An image file that cannot be decoded."""


class ResumeError(ValueError):
  """An output directory holding an extraction this run must not continue or overwrite."""


# ----------------------------------------------------------------------------- images

def list_images(images: str) -> Tuple[List[str], List[str]]:
  """`(entries, paths)`: the images of a directory or list file, in extraction order.

  `entries` are what `{split}_images.txt` records (directory: file names; list file:
  the lines as written); `paths` are the files to open.

  Raises:
    FileNotFoundError: `images` does not exist, or listed images are missing, or image
      files of the directory cannot be opened (symlink loops, broken links; all named,
      with their line numbers). ValueError: no images.
  """
  if os.path.isdir(images):
    names = sorted(os.listdir(images))
    entries, unreadable = [], []
    for n in names:
      if not n.lower().endswith(IMAGE_SUFFIXES):
        continue
      why = _not_a_file(os.path.join(images, n))
      if why is None:
        entries.append(n)
      elif why != "a directory":  # a directory named x.jpg is no image: skipped, counted
        unreadable.append(f"{os.path.join(images, n)}: {why}")
    if unreadable:
      shown = "\n  ".join(unreadable[:20]) + ("\n  ..." if len(unreadable) > 20 else "")
      raise FileNotFoundError(f"{len(unreadable)} image file(s) of {images} cannot be "
                              f"opened:\n  {shown}")
    skipped = len(names) - len(entries)
    if skipped:
      logging.info("%s: %d entries that are not image files (%s) skipped", images, skipped,
                   "/".join(IMAGE_SUFFIXES))
    if not entries:
      raise ValueError(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return entries, [os.path.join(images, n) for n in entries]
  if not os.path.isfile(images):
    raise FileNotFoundError(f"{images}: no such image directory or list file")
  base = os.path.dirname(os.path.abspath(images))
  entries, paths, missing = [], [], []
  with open(images, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      entry = line.rstrip("\r\n")
      if not entry.strip():
        continue
      path = entry if os.path.isabs(entry) else os.path.join(base, entry)
      why = _not_a_file(path)
      if why is not None:
        missing.append(f"{path} (line {number} of {images}): {why}")
      entries.append(entry)
      paths.append(path)
  if missing:
    shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
    raise FileNotFoundError(f"{len(missing)} listed image(s) cannot be opened:\n  {shown}")
  if not entries:
    raise ValueError(f"{images}: the list names no images")
  return entries, paths


def _not_a_file(path: str) -> Optional[str]:
  """None for a regular file (or a link to one), else why not, in a few words."""
  try:
    st = os.stat(path)
  except OSError as e:
    if os.path.islink(path):
      reason = ("a symlink loop" if e.errno == errno.ELOOP else
                f"a broken symlink to {os.readlink(path)}")
      return f"{reason}: {e.strerror}"
    return e.strerror or "not found"
  if stat.S_ISDIR(st.st_mode):
    return "a directory"
  return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def resized_size(width: int, height: int, size: int = RESIZE) -> Tuple[int, int]:
  """`(width, height)` after torchvision's `Resize(size)`: the shorter side becomes
  `size`, the longer one `int(size * long / short)` (truncated, as torchvision does)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (size, new_long) if width <= height else (new_long, size)


def center_crop_box(width: int, height: int, size: int = CROP) -> Tuple[int, int, int, int]:
  """PIL box `(left, top, right, bottom)` of torchvision's `CenterCrop(size)`: offsets
  `int(round((side - size) / 2))`, Python's round (half to even)."""
  if width < size or height < size:
    raise ValueError(f"image of {width}x{height} is smaller than the {size}x{size} crop")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def _rgb8(im, path: str):
  """`im` (opened, not yet decoded) as an 8-bit RGB PIL image, over its full range."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mode = im.mode
  if mode in _MODES_16BIT or (mode == "I" and im.format in _FORMATS_16BIT_IN_I):
    # convert("RGB") would clip 16-bit samples at 255 (a white image): scale them.
    samples = np.asarray(im).astype(np.float32)  # decodes the whole file
    if samples.min() < 0 or samples.max() > 65535:
      raise ImageError(f"{path}: {im.format} image of mode {mode} holds values in "
                       f"[{samples.min():g}, {samples.max():g}], outside 16 bits")
    return Image.fromarray(np.round(samples / 257.0).astype(np.uint8), "L").convert("RGB")
  if mode in ("I", "F") or mode.startswith("I;"):
    raise ImageError(f"{path}: {im.format} image of mode {mode} ("
                     f"{'32-bit floating point' if mode == 'F' else 'integer'} samples) "
                     "has no defined range to map to 8 bits; convert it to an 8- or "
                     "16-bit image")
  return im.convert("RGB")  # decodes the whole file: truncated data fails here


def decode_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """One image as the network input: (224, 224, 3) float32, ImageNet-normalised (HWC).

  Args:
    path: the image file.
    max_pixels: larger images are refused from their header, before decoding.

  Raises:
    ImageError: the file cannot be read or decoded, is larger than `max_pixels`, or has
      samples of no defined range (naming it).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # `max_pixels` replaces PIL's process-wide limit, which only warns below twice itself
  # (a 12000x12000 picture was decoded with a warning) and could not be raised per call.
  Image.MAX_IMAGE_PIXELS = None
  try:
    with Image.open(path) as im:  # reads the header only
      w, h = im.size
      if w * h > max_pixels:
        raise ImageError(f"{path}: {w}x{h} image ({w * h / 1e6:.1f} megapixels) is larger "
                         f"than the limit of {max_pixels / 1e6:.1f} megapixels (a "
                         "decompression bomb?); raise --max_image_pixels to decode it")
      im = _rgb8(im, path)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f"{path}: cannot decode image: {e}") from e
  w, h = im.size
  im = im.resize(resized_size(w, h), Image.Resampling.BILINEAR)
  im = im.crop(center_crop_box(*im.size))
  x = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
  return (x - MEAN) / STD


def decode_batch(paths: Sequence[str], pool: concurrent.futures.Executor,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """(len(paths), 224, 224, 3) float32, decoded on `pool`'s threads (PIL releases the
  GIL while decoding and resizing)."""
  return np.stack(list(pool.map(functools.partial(decode_image, max_pixels=max_pixels),
                                paths)))


# ----------------------------------------------------------------------------- outputs

def output_paths(out: str, split: str) -> dict:
  """The files an extraction of `split` writes into `out`."""
  return {"grid": os.path.join(out, f"{split}_grid.npy"),
          "global": os.path.join(out, f"{split}_global.npy"),
          "images": os.path.join(out, f"{split}_images.txt"),
          "record": os.path.join(out, f"{split}_extract.json")}


def _sha256_lines(lines: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _decode_settings() -> dict:
  return {"resize": RESIZE, "crop": CROP, "interpolation": "bilinear",
          "mean": MEAN.tolist(), "std": STD.tolist()}


def _restart_hint(files: dict, split: str) -> str:
  out = os.path.dirname(files["record"]) or "."
  return (f"delete {split}_grid.npy, {split}_global.npy, {split}_images.txt and "
          f"{split}_extract.json in {out} to start over, or choose another --out or --split")


def _check_resume(record: dict, files: dict, split: str, entries: Sequence[str],
                  weights: str, weights_sha: str) -> int:
  """Rows already written by the extraction `record` describes; raises ResumeError when
  this run's inputs differ from that extraction's."""
  where, hint = files["record"], _restart_hint(files, split)
  if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
    version = record.get("version") if isinstance(record, dict) else None
    raise ResumeError(f"{where}: record version {version!r}, this extractor writes "
                      f"{RECORD_VERSION}; {hint}")
  lacking = [k for k in ("num_images", "images_sha256", "weights", "weights_sha256",
                         "decode", "done") if k not in record]
  if lacking:
    raise ResumeError(f"{where}: progress record lacks {', '.join(lacking)}; {hint}")
  if record["images_sha256"] != _sha256_lines(entries):
    old = []
    if os.path.isfile(files["images"]):
      with open(files["images"], encoding="utf-8") as f:
        old = f.read().splitlines()
    diff = next((i for i, (a, b) in enumerate(zip(old, entries)) if a != b),
                min(len(old), len(entries)))
    first = (f"; first difference at entry {diff + 1}: "
             f"{old[diff] if diff < len(old) else '(end)'!r} before, "
             f"{entries[diff] if diff < len(entries) else '(end)'!r} now") if old else ""
    raise ResumeError(
        f"{where}: this extraction was started for a different image list "
        f"({record['num_images']} images, listed in {files['images']}; {len(entries)} now"
        f"{first}); {hint}")
  if record["weights_sha256"] != weights_sha:
    raise ResumeError(
        f"{where}: this extraction was started with other weights ({record['weights']}, "
        f"sha256 {record['weights_sha256'][:16]}...), not {weights} (sha256 "
        f"{weights_sha[:16]}...); {hint}")
  if record["decode"] != _decode_settings():
    raise ResumeError(f"{where}: written with decode settings {record['decode']}, this "
                      f"extractor uses {_decode_settings()}; {hint}")
  done = int(record["done"])
  if not 0 <= done <= len(entries):
    raise ResumeError(f"{where}: {done} rows done of {len(entries)}; {hint}")
  return done


def _open_outputs(files: dict, n: int, channels: int, fresh: bool):
  """The grid and global memmaps, opened to write rows in place. `fresh` ones are made
  whole under a temporary name first, so a kill never leaves a half-made file under
  the final name."""
  arrays = []
  for key, shape in (("grid", (n, GRID_CELLS, channels)), ("global", (n, channels))):
    try:
      if fresh:
        with atomic.replacing_path(files[key]) as tmp:
          np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape).flush()
      a = np.lib.format.open_memmap(files[key], mode="r+")
    except (OSError, ValueError) as e:
      raise ResumeError(f"{files[key]}: cannot open for writing: {e}") from e
    if a.shape != shape or a.dtype != np.float32:
      raise ResumeError(f"{files[key]}: float32 {shape} expected from "
                        f"{files['record']}, the file holds {a.dtype} {a.shape}")
    arrays.append(a)
  return arrays


def _extract_batches(load, prefetch, starts, batch_size, features, grid, pooled, record,
                     record_path, progress) -> Optional[float]:
  """Decodes (one batch ahead, on `prefetch`), runs and writes every batch, recording
  progress after each; returns the time the first batch finished (None: no batches)."""
  t_first = None
  upcoming = prefetch.submit(load, starts[0]) if starts else None
  for i, start in enumerate(starts):
    x = upcoming.result()
    # Decode the next batch while this one runs.
    upcoming = prefetch.submit(load, starts[i + 1]) if i + 1 < len(starts) else None
    count = x.shape[0]
    if count < batch_size:  # one compiled shape: pad the last batch
      x = np.concatenate([x, np.zeros((batch_size - count,) + x.shape[1:], x.dtype)])
    g, p = features(x)
    grid[start:start + count] = g[:count]
    pooled[start:start + count] = p[:count]
    # Rows reach the files before the record counts them: a crash loses at most a batch.
    grid.flush()
    pooled.flush()
    record["done"] = start + count
    record["complete"] = record["done"] == record["num_images"]
    atomic.write_json(record_path, record, indent=1)
    if t_first is None:
      t_first = time.time()
    if progress is not None:
      progress.update(count)
  return t_first


# ----------------------------------------------------------------------------- run

def run(images: str, weights: str, out: str, split: str = "test", batch_size: int = 32,
        num_workers: int = 0, show_progress: bool = True,
        max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
  """Extracts grid and global features of the images (see the module docstring).

  Returns:
    A summary: the output files, `num_images`, `extracted` (rows this run wrote),
    `resumed_from` (rows already written), `first_batch_s` (compile + first batch),
    `images_per_s` (this run, after the first batch), `network`.

  Raises:
    FileNotFoundError: a missing image (checked before any work) or weights file.
    ImageError: an image that cannot be decoded (rows before its batch stay written).
    ResumeError: `out` holds an extraction of other images or weights, or outputs
      without a progress record.
    ValueError: weights that do not map onto a bottleneck ResNet (naming the key), or a
      network whose 224x224 map is not 7x7.
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: must be positive")
  if max_image_pixels < 1:
    raise ValueError(f"--max_image_pixels={max_image_pixels}: must be positive")
  entries, paths = list_images(images)
  n = len(entries)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{weights}: ResNet weights file not found")
  weights_sha = integrity.file_digest(weights, algorithm="sha256")
  files = output_paths(out, split)
  record = None
  if os.path.isfile(files["record"]):
    with open(files["record"], encoding="utf-8") as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ResumeError(f"{files['record']}: unreadable progress record ({e}); "
                          f"{_restart_hint(files, split)}") from e
    done = _check_resume(record, files, split, entries, weights, weights_sha)
  else:
    done = 0
    stale = [files[k] for k in ("grid", "global", "images") if os.path.exists(files[k])]
    if stale:
      raise ResumeError(f"{', '.join(stale)}: already exist(s) without the progress record "
                        f"{files['record']}, so they are not an extraction this tool can "
                        f"continue; refusing to overwrite: {_restart_hint(files, split)}")

  config, variables = resnet.load_weights(weights)
  cells = (CROP // config.stride) ** 2 if CROP % config.stride == 0 else None
  if cells != GRID_CELLS:
    raise ValueError(f"{weights}: {config.describe()} maps a {CROP}x{CROP} crop to "
                     f"{CROP / config.stride:g}x{CROP / config.stride:g} cells, not the 7x7 "
                     f"grid (4 stages) the grid layout needs")
  channels = config.out_channels
  os.makedirs(out, exist_ok=True)
  if not done:
    # A new extraction, or one killed before its first batch: (re)made from the start,
    # the record first, so a kill at any instant leaves a record to continue from or
    # nothing under the final names.
    record = {"version": RECORD_VERSION, "split": split, "num_images": n,
              "images": os.path.abspath(images), "images_sha256": _sha256_lines(entries),
              "weights": os.path.abspath(weights), "weights_sha256": weights_sha,
              "network": config.describe(), "channels": channels,
              "decode": _decode_settings(), "done": 0, "complete": False}
    atomic.write_json(files["record"], record, indent=1)
    atomic.write_text(files["images"], "".join(e + "\n" for e in entries))
  grid, pooled = _open_outputs(files, n, channels, fresh=not done)
  logging.info("extract %s: %d images, %s from %s; %d rows already written",
               split, n, config.describe(), weights, done)

  model = resnet.ResNet(config)
  variables = jax.device_put(variables)

  @jax.jit
  def features(v, x):
    fmap, avg = model.apply(v, x, train=False)
    return resnet.grid_cells(fmap), avg

  # No padding beyond the images left (a small gallery needs no batch of 32).
  batch_size = max(1, min(batch_size, n - done))
  starts = list(range(done, n, batch_size))
  workers = num_workers or min(8, os.cpu_count() or 1)
  t0 = time.time()
  progress = Progress(total=n, desc=f"extract {split}", unit="image",
                      initial=done) if show_progress else None
  try:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
        concurrent.futures.ThreadPoolExecutor(1) as prefetch:
      t_after_first = _extract_batches(
          lambda s: decode_batch(paths[s:s + batch_size], pool, max_image_pixels), prefetch,
          starts,
          batch_size, lambda x: jax.device_get(features(variables, x)), grid, pooled,
          record, files["record"], progress)
  finally:
    if progress is not None:
      progress.close()
  record["complete"] = True
  atomic.write_json(files["record"], record, indent=1)
  extracted = n - done
  first_batch_s = None if t_after_first is None else t_after_first - t0
  steady = extracted - min(batch_size, extracted)
  rate = steady / (time.time() - t_after_first) if steady else None
  del grid, pooled
  return {"grid": files["grid"], "global": files["global"], "images": files["images"],
          "record": files["record"], "num_images": n, "extracted": extracted,
          "resumed_from": done, "first_batch_s": first_batch_s, "images_per_s": rate,
          "network": config.describe()}


# ----------------------------------------------------------------------------- cli

def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  return types.SimpleNamespace(
      images=flags.DEFINE_string(
          "images", None, "A directory of images (sorted by name) or a file listing one "
          "image path per line (relative paths: relative to the list file)."),
      weights=flags.DEFINE_string(
          "weights", None, "ResNet-50/101/152 weights: torchvision or HF layout, "
          ".pth/.pt/.bin or .safetensors. For a workdir converted from a DSRAN or MLASM "
          "checkpoint: its resnet152.safetensors (the checkpoint's own CNN, drifted "
          "BatchNorm statistics included), not ImageNet weights."),
      out=flags.DEFINE_string("out", None, "Output directory."),
      split=flags.DEFINE_string("split", "test",
                                "Split name: files are {split}_grid.npy, ..."),
      batch_size=flags.DEFINE_integer("batch_size", 32, "Images per forward pass."),
      num_workers=flags.DEFINE_integer(
          "num_workers", 0, "Image decoding threads (0: one per CPU core, at most 8)."),
      max_image_pixels=flags.DEFINE_integer(
          "max_image_pixels", MAX_IMAGE_PIXELS, "Larger images are refused from their "
          "header, before decoding (decompression bombs)."),
  )


def main(argv):
  f = _FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("images", "weights", "out"):
    if not getattr(f, name).value:
      raise app.UsageError(f"--{name} is required")
  logging.set_verbosity(logging.INFO)
  summary = run(f.images.value, f.weights.value, f.out.value, f.split.value,
                f.batch_size.value, f.num_workers.value,
                max_image_pixels=f.max_image_pixels.value)
  print(json.dumps(summary))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  # A missing image or weights file, an image that does not decode, weights that are not
  # a ResNet, an output directory of another extraction: `error: ...`, exit 2.
  cli.run_cli(main, errors=(OSError, ValueError))

"""Reader of the authors' VLP/GVD region features (Bottom-up detector on Visual Genome).

Captions and splits come from the Karpathy JSON `{data.root}/dataset_flickr30k.json`
(`data.name == "f30k"`) or `{data.root}/dataset_coco.json` (`"coco"`): `images[]` with
`filename`, `split` and `sentences[].raw`. Split names map as
  train -> "train" (COCO: "train" + "restval"), dev -> "val", test / testall -> "test"
(COCO "test" and "testall" are the same 5000 images; the 1K folds are an evaluation
matter). Images keep the JSON order; each keeps its first 5 sentences (a few COCO images
have 6 or 7; fewer than 5 is an error). Image ids are file stems (`1000092795`,
`COCO_val2014_000000391895`).

Features, per image stem S:
- Flickr30K: `{root}/trainval/S.npy` (100, 2048) and `{root}/trainval/S_cls_prob.npy`
  (100, 1601).
- COCO: `{prefix}_feat{NNN}.h5` and `{prefix}_cls{NNN}.h5`, key S, NNN = the last 3 digits
  of S. The shards are looked for as `{root}/*_featNNN.h5` or `{root}/*/*_featNNN.h5` and
  must share one prefix (the release's `feat_cls_1000/coco_detection_vg_100dets_..._feat000.h5`).
- Boxes, both datasets: one HDF5 file keyed by S, (100, 6) = x1, y1, x2, y2, class, score.
  It is found as `{root}/bbox.h5` or else the single `{root}/*_detection_*.h5` that is not
  a feature shard (the release's `..._detection_vg_thresh0.2_feat_gvd_checkpoint_trainvaltest.h5`);
  zero or several candidates are an error.
- Grid features (when the model's image keys name "grid"): `dsran_jax.data.grid`.
- Global features (for models reading `global_feat`, MLASM): `dsran_jax.data.global_feat`.

Regions are padded or cut to `data.num_regions` (`region_mask` marks real ones);
`region_pos` is computed on all of an image's boxes before the cut, as the authors do.
A missing or malformed file or key is an error naming it: no random stand-ins.
"""
import concurrent.futures
import functools
import glob
import json
import os
import re

import numpy as np

from dsran_jax.data import global_feat as global_lib
from dsran_jax.data import grid as grid_lib
from dsran_jax.data import raw
from dsran_jax.data.region_pos import BOX_DIM, NUM_CLASSES, POS_DIM, region_pos

KARPATHY_JSON = {"f30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
CAPTIONS_PER_IMAGE = 5
_SHARD_RE = re.compile(r"^(?P<prefix>.+)_(?:feat|cls)(?P<nnn>\d{3})\.h5$")
_MAX_MISSING_SHOWN = 5


def karpathy_splits(dataset: str, split_name: str) -> tuple:
  """Karpathy split labels that make up one of our splits."""
  table = {"train": ("train", "restval") if dataset == "coco" else ("train",),
           "dev": ("val",), "test": ("test",), "testall": ("test",)}
  if split_name not in table:
    raise ValueError(f"vlp split {split_name!r}: expected one of {sorted(table)}")
  return table[split_name]


def _dataset(config) -> str:
  name = config.data.name
  if name not in KARPATHY_JSON:
    raise ValueError(f"data.name={name!r}: the vlp format knows {sorted(KARPATHY_JSON)}")
  return name


@functools.lru_cache(maxsize=2)
def _karpathy_images(path: str, mtime: float) -> tuple:
  """(stem, split, first-5 raw sentences) per JSON image; cached per file version."""
  del mtime  # part of the cache key only
  with open(path, "rb") as f:
    try:
      obj = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise raw.DataError(f"{path}: not a valid UTF-8 JSON file: {e}") from e
  if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
    raise raw.DataError(f"{path}: expected a Karpathy split JSON with an 'images' list")
  out = []
  seen = {}  # stem -> index of the first image with it
  for i, im in enumerate(obj["images"]):
    try:
      filename, split = im["filename"], im["split"]
      sents = [s["raw"] for s in im["sentences"]]
    except (KeyError, TypeError) as e:
      raise raw.DataError(
          f"{path}: images[{i}] lacks filename / split / sentences[].raw ({e!r})") from e
    if not isinstance(filename, str) or not filename:
      raise raw.DataError(f"{path}: images[{i}] has filename {filename!r}, expected a "
                          f"non-empty string")
    if len(sents) < CAPTIONS_PER_IMAGE:
      raise raw.DataError(
          f"{path}: images[{i}] ({filename}) has {len(sents)} sentences, expected "
          f"{CAPTIONS_PER_IMAGE}")
    for j, sent in enumerate(sents[:CAPTIONS_PER_IMAGE]):
      # str(None) would train on the caption "None".
      if not isinstance(sent, str):
        raise raw.DataError(f"{path}: images[{i}] ({filename}) sentences[{j}].raw is "
                            f"{sent!r}, expected a string")
    stem = os.path.splitext(os.path.basename(filename))[0]
    if stem in seen:
      first = obj["images"][seen[stem]]["filename"]
      raise raw.DataError(
          f"{path}: images[{i}] ({filename}) has the file stem {stem!r} of images"
          f"[{seen[stem]}] ({first}); image ids must be unique (both would read one "
          f"image's features)")
    seen[stem] = i
    out.append((stem, split, tuple(s.strip() for s in sents[:CAPTIONS_PER_IMAGE])))
  return tuple(out)


def split_captions(config, split_name: str):
  """`(image_ids, texts)` of a split from the Karpathy JSON, in JSON order."""
  dataset = _dataset(config)
  labels = karpathy_splits(dataset, split_name)
  path = os.path.join(config.data.root, KARPATHY_JSON[dataset])
  raw.require_file(path, f"Karpathy split JSON for {dataset}")
  images = [im for im in _karpathy_images(path, os.path.getmtime(path)) if im[1] in labels]
  if not images:
    raise raw.DataError(f"{path}: no images with split in {labels} (our split {split_name!r})")
  return [im[0] for im in images], [t for im in images for t in im[2]]


def find_bbox_file(root: str) -> str:
  """The box HDF5 file: `{root}/bbox.h5`, else the single non-shard `*_detection_*.h5`."""
  explicit = os.path.join(root, "bbox.h5")
  if os.path.isfile(explicit):
    return explicit
  pattern = os.path.join(root, "*_detection_*.h5")
  found = sorted(p for p in glob.glob(pattern) if not _SHARD_RE.match(os.path.basename(p)))
  if not found:
    raise raw.MissingDataError(
        f"{explicit}: missing, and no {pattern} (VLP box file, one (R, 6) dataset per "
        f"image id)")
  if len(found) > 1:
    raise raw.DataError(
        f"{pattern}: {len(found)} candidate box files {found}; keep one or name it "
        f"{explicit}")
  return found[0]


def find_coco_shard_prefix(root: str) -> str:
  """The common `{prefix}` of COCO's `{prefix}_featNNN.h5` / `{prefix}_clsNNN.h5` shards."""
  patterns = [os.path.join(root, "*_feat[0-9][0-9][0-9].h5"),
              os.path.join(root, "*", "*_feat[0-9][0-9][0-9].h5")]
  prefixes = sorted({p[:-len("_feat000.h5")] for pat in patterns for p in glob.glob(pat)})
  if not prefixes:
    raise raw.MissingDataError(
        f"{patterns[0]}: no COCO VLP feature shards (also looked in {patterns[1]})")
  if len(prefixes) > 1:
    raise raw.DataError(f"{root}: COCO feature shards with several prefixes {prefixes}")
  return prefixes[0]


class VlpImages:
  """`indices -> dict` reader of a split's VLP features (the `RawSplit.read_images`)."""

  def __init__(self, config, split_name: str, image_ids, check_files: bool = True):
    self.root = config.data.root
    self.dataset = _dataset(config)
    self.image_ids = list(image_ids)
    self.img_dim = config.data.img_dim
    self.num_regions = config.data.num_regions
    self.bbox_file = find_bbox_file(self.root)
    self.shard_prefix = (find_coco_shard_prefix(self.root) if self.dataset == "coco"
                         else None)
    self.h5 = raw.H5Reader()
    self.grid = grid_lib.require_grid(config, split_name, len(self.image_ids))
    self.global_feat = global_lib.require_global(config, split_name, len(self.image_ids))
    self._pool, self._pool_pid = None, None
    if check_files:
      self.check_files_exist()

  # Paths -----------------------------------------------------------------------------
  def feature_paths(self, stem: str):
    """((features file, key or None), (class-prob file, key or None)) of an image."""
    if self.dataset == "coco":
      nnn = stem[-3:]
      return ((f"{self.shard_prefix}_feat{nnn}.h5", stem),
              (f"{self.shard_prefix}_cls{nnn}.h5", stem))
    d = os.path.join(self.root, "trainval")
    return (os.path.join(d, f"{stem}.npy"), None), (os.path.join(d, f"{stem}_cls_prob.npy"), None)

  def check_files_exist(self) -> None:
    """Fails early (one listing / key scan, no feature reads) if any file or key is absent."""
    missing = []
    bbox_keys = self.h5.keys(self.bbox_file, "boxes")
    missing += [f"{self.bbox_file}: key {s!r}" for s in self.image_ids if s not in bbox_keys]
    needed = {p for s in self.image_ids for p, _ in self.feature_paths(s)}
    dirs = {os.path.dirname(p) for p in needed}
    present = set()
    for d in dirs:
      if os.path.isdir(d):
        present |= {os.path.join(d, f) for f in os.listdir(d)}
    missing += sorted(needed - present)
    if missing:
      shown = "; ".join(missing[:_MAX_MISSING_SHOWN])
      more = len(missing) - _MAX_MISSING_SHOWN
      raise raw.MissingDataError(
          f"{len(missing)} VLP feature files/keys missing: {shown}"
          + (f" ... and {more} more" if more > 0 else "")
          + " (run python -m dsran_jax.data.check for a full report)")

  # Reads -----------------------------------------------------------------------------
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_pool"], state["_pool_pid"] = None, None
    # A pickled memmap would carry the whole grid file; the copy maps it again instead.
    state["grid"] = None if self.grid is None else self.grid.filename
    glob = state.get("global_feat")
    state["global_feat"] = None if glob is None else glob.filename
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self.grid is not None:
      self.grid = np.load(self.grid, mmap_mode="r")
    if self.__dict__.get("global_feat") is not None:
      self.global_feat = np.load(self.global_feat, mmap_mode="r")

  def _executor(self):
    # Image reads are I/O bound and np.load releases the GIL (h5py reads serialise). Made
    # per process: a pool's threads do not survive a fork.
    if self._pool is None or self._pool_pid != os.getpid():
      self._pool = concurrent.futures.ThreadPoolExecutor(
          max_workers=min(8, os.cpu_count() or 1))
      self._pool_pid = os.getpid()
    return self._pool

  def _read(self, path_key, expected, what):
    path, key = path_key
    if key is None:
      return raw.load_npy(path, expected, what)
    return self.h5.read(path, key, expected, what)

  def read_one(self, index: int):
    """All of one image's regions `(R, img_dim)` and their `region_pos` `(R, 1607)`."""
    stem = self.image_ids[index]
    feat_pk, cls_pk = self.feature_paths(stem)
    what_f, what_c = f"region features of image {stem}", f"class probabilities of image {stem}"
    what_b = f"boxes of image {stem}"
    feats = self._read(feat_pk, (None, self.img_dim), what_f)
    cls = self._read(cls_pk, None, what_c)
    boxes = self.h5.read(self.bbox_file, stem, None, what_b)
    # The row count the majority of the three files agree on is the image's: a short
    # feature file is blamed, not its correctly sized class and box files.
    rows = [a.shape[0] if a.ndim else -1 for a in (feats, cls, boxes)]
    r = max(set(rows), key=lambda n: (rows.count(n), n == rows[0]))
    if rows.count(r) == 1:
      r = rows[0]  # no two agree: the features decide, as before
    raw.check_shape(feats.shape, (r, self.img_dim), self._where(feat_pk), what_f)
    if r == 0:
      raise raw.DataError(f"{feat_pk[0]}: image {stem} has no regions")
    raw.check_shape(cls.shape, (r, NUM_CLASSES), self._where(cls_pk), what_c)
    raw.check_shape(boxes.shape, (r, BOX_DIM), f"{self.bbox_file}: key {stem!r}", what_b)
    return np.asarray(feats, np.float32), region_pos(boxes, cls)

  @staticmethod
  def _where(path_key) -> str:
    path, key = path_key
    return path if key is None else f"{path}: key {key!r}"

  def __call__(self, indices) -> dict:
    indices = np.asarray(indices, np.int64)
    b, n = len(indices), self.num_regions
    out = {"regions": np.zeros((b, n, self.img_dim), np.float32),
           "region_pos": np.zeros((b, n, POS_DIM), np.float32),
           "region_mask": np.zeros((b, n), bool)}
    for row, (feats, pos) in enumerate(self._executor().map(self.read_one, indices.tolist())):
      k = min(n, feats.shape[0])
      out["regions"][row, :k] = feats[:k]
      out["region_pos"][row, :k] = pos[:k]
      out["region_mask"][row, :k] = True
    if self.grid is not None:
      out["grid"] = grid_lib.read_rows(self.grid, indices)
    if self.global_feat is not None:
      out["global_feat"] = global_lib.read_rows(self.global_feat, indices)
    return out


def read_raw_split(config, split_name: str, check_files: bool = True) -> raw.RawSplit:
  """Reads a VLP split: captions from the Karpathy JSON, features on demand.

  Args:
    config: full config (`data.root`, `data.name`, `data.num_regions`, `data.img_dim`,
      the model's image keys (`models.image_keys`), `data.grid_file`).
    split_name: "train", "dev", "test" or "testall".
    check_files: verify up front that every feature file and box key exists (a directory
      listing and one key scan), so training cannot die on a hole hours in.
  """
  if not config.data.root:
    raise ValueError("config.data.root='': give the VLP feature directory")
  image_ids, texts = split_captions(config, split_name)
  images = VlpImages(config, split_name, image_ids, check_files=check_files)
  return raw.RawSplit(image_ids=image_ids, texts=texts,
                      captions_per_image=CAPTIONS_PER_IMAGE, read_images=images)


def read_raw_split_for_check(config, split_name: str) -> raw.RawSplit:
  """The split for `python -m dsran_jax.data.check`: missing files are left to its
  per-image scan, which reports every hole instead of stopping at the first."""
  return read_raw_split(config, split_name, check_files=False)


def list_splits(config) -> list:
  """The splits the checker scans (COCO "testall" is "test")."""
  return list(dict.fromkeys(
      [config.data.train_split, config.data.dev_split, config.data.test_split]))

"""Reader of MS-COCO in VSE++'s order (`data.format="coco_vsepp"`), as DSRAN and MLASM
read it: VSE++'s caption annotation id lists plus COCO's caption annotations.

Files, each under `data.root/annotations/` or `data.root/` (VSE++'s `data/coco/annotations`):
- `coco_train_ids.npy`, `coco_restval_ids.npy`, `coco_dev_ids.npy`, `coco_test_ids.npy`:
  1-D integer COCO caption annotation ids;
- `captions_train2014.json` (the train ids' annotations) and `captions_val2014.json`
  (restval, dev and test): COCO's `annotations[]` (`id`, `image_id`, `caption`) and
  `images[]` (`id`, `file_name`).

Splits, as VSE++'s `get_paths` / `CocoDataset` (with `use_restval`):
- `train`: every annotation of `coco_train_ids` then `coco_restval_ids`, one training
  pair each (an image with 6 or 7 annotations is seen 6 or 7 times an epoch): one image
  row per caption (captions_per_image 1), its image repeated;
- `dev`: the first 5000 ids of `coco_dev_ids` (1000 images);
- `test` / `testall`: `coco_test_ids`, 25,000 captions, 5000 images (the COCO 1K folds are
  its sequential fifths).
For dev and test the images are those of every 5th caption (the authors' `img_embs[::5]`):
captions 5i..5i+4 must share image i, else the file is refused naming the caption.

Image features are the VLP/GVD release's, read by `data.vlp.VlpImages` per image file stem
(`COCO_val2014_000000391895`), with `data.name="coco"`; grid and global features, when the
model reads them, are `{split}_grid.npy` / `{split}_global.npy` in this reader's image order.
`caption_ids(config, split)` gives the annotation and COCO image ids of every row, for the
ECCV Caption / CxC evaluator. How this order differs from the Karpathy JSON's:
docs/data_formats.md.
"""
import functools
import json
import os
from typing import Dict, List, Tuple

import numpy as np

from dsran_jax.data import raw, vlp

CAPTIONS_PER_IMAGE = 5
DEV_CAPTIONS = 5000
ANNOTATION_FILES = {"train": "captions_train2014.json", "val": "captions_val2014.json"}
# our split -> [(VSE++ ids file, annotation file)], in reading order
SPLITS = {"train": [("coco_train_ids.npy", "train"), ("coco_restval_ids.npy", "val")],
          "dev": [("coco_dev_ids.npy", "val")],
          "test": [("coco_test_ids.npy", "val")],
          "testall": [("coco_test_ids.npy", "val")]}


def find_file(root: str, name: str, what: str) -> str:
  """`{root}/annotations/{name}` or `{root}/{name}`; MissingDataError naming both."""
  candidates = [os.path.join(root, "annotations", name), os.path.join(root, name)]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise raw.MissingDataError(f"{candidates[0]}: missing, nor {candidates[1]} ({what})")


def read_ids(path: str) -> np.ndarray:
  """A VSE++ ids file: 1-D integer caption annotation ids."""
  ids = raw.load_npy(path, (None,), "VSE++ caption annotation ids")
  if not np.issubdtype(ids.dtype, np.integer):
    raise raw.DataError(f"{path}: expected integer caption annotation ids, got {ids.dtype}")
  return np.asarray(ids, np.int64)


@functools.lru_cache(maxsize=2)
def _annotations(path: str, mtime: float) -> Tuple[Dict[int, Tuple[int, str]], Dict[int, str]]:
  """({annotation id: (image id, caption)}, {image id: file stem}) of a COCO captions
  JSON, cached per file version."""
  del mtime  # cache key only
  try:
    with open(path, "rb") as f:
      obj = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise raw.DataError(f"{path}: not a valid UTF-8 JSON file: {e}") from e
  if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list) \
     or not isinstance(obj.get("images"), list):
    raise raw.DataError(f"{path}: expected COCO captions with 'annotations' and 'images' lists")
  anns = {}
  for i, a in enumerate(obj["annotations"]):
    try:
      ann_id, image_id, caption = int(a["id"]), int(a["image_id"]), a["caption"]
    except (KeyError, TypeError, ValueError) as e:
      raise raw.DataError(f"{path}: annotations[{i}] lacks an integer id / image_id or a "
                          f"caption ({e!r})") from e
    if not isinstance(caption, str):
      raise raw.DataError(f"{path}: annotations[{i}] (id {ann_id}) has caption {caption!r}, "
                          f"expected a string")
    anns[ann_id] = (image_id, caption.strip())
  stems = {}
  for i, im in enumerate(obj["images"]):
    try:
      stems[int(im["id"])] = os.path.splitext(os.path.basename(im["file_name"]))[0]
    except (KeyError, TypeError, ValueError) as e:
      raise raw.DataError(f"{path}: images[{i}] lacks an integer id or a file_name "
                          f"({e!r})") from e
  return anns, stems


def _annotation_file(root: str, which: str):
  path = find_file(root, ANNOTATION_FILES[which], f"COCO caption annotations ({which}2014)")
  return path, _annotations(path, os.path.getmtime(path))


def split_rows(config, split_name: str) -> Tuple[np.ndarray, np.ndarray, List[str], List[str], int]:
  """(caption annotation ids, COCO image id per image row, file stem per image row,
  captions, captions per image) of a split, in VSE++ order.

  Raises:
    MissingDataError: an ids or annotation file absent.
    DataError: an id absent from its annotation file, or (dev / test) captions 5i..5i+4
      not all of image i.
  """
  root = config.data.root
  if split_name not in SPLITS:
    raise ValueError(f"coco_vsepp split {split_name!r}: expected one of {sorted(SPLITS)}")
  caption_ids, image_ids, texts, stems = [], [], [], []
  for ids_name, which in SPLITS[split_name]:
    ids_path = find_file(root, ids_name, "VSE++ caption annotation ids")
    ids = read_ids(ids_path)
    if split_name == "dev":
      ids = ids[:DEV_CAPTIONS]   # VSE++: np.load(coco_dev_ids.npy)[:5000]
    ann_path, (anns, file_stems) = _annotation_file(root, which)
    missing = [int(a) for a in ids if int(a) not in anns]
    if missing:
      shown = ", ".join(map(str, missing[:5]))
      raise raw.DataError(f"{ids_path}: {len(missing)} annotation ids are not in "
                          f"{ann_path}: {shown}{' ...' if len(missing) > 5 else ''}")
    for a in ids.tolist():
      image_id, caption = anns[a]
      if image_id not in file_stems:
        raise raw.DataError(f"{ann_path}: annotation {a} is of image {image_id}, which "
                            f"'images' does not list")
      caption_ids.append(a)
      image_ids.append(image_id)
      texts.append(caption)
      stems.append(file_stems[image_id])
  caption_ids = np.asarray(caption_ids, np.int64)
  image_ids = np.asarray(image_ids, np.int64)
  if split_name == "train":
    return caption_ids, image_ids, stems, texts, 1
  cpi = CAPTIONS_PER_IMAGE
  if len(caption_ids) % cpi:
    raise raw.DataError(f"{split_name}: {len(caption_ids)} caption ids, not {cpi} per image")
  groups = image_ids.reshape(-1, cpi)
  bad = np.argwhere(groups != groups[:, :1])
  if bad.size:
    i, k = bad[0]
    raise raw.DataError(
        f"{split_name}: caption {caption_ids[i * cpi + k]} (position {i * cpi + k}) is of "
        f"image {groups[i, k]}, but captions {i * cpi}..{i * cpi + cpi - 1} describe image "
        f"{groups[i, 0]} ({len(bad)} such captions): the VSE++ order has 5 captions an image")
  return caption_ids, groups[:, 0].copy(), stems[::cpi], texts, cpi


def _check_name(config) -> None:
  if config.data.name != "coco":
    raise ValueError(f"data.format='coco_vsepp' is MS-COCO: set data.name='coco' "
                     f"(got {config.data.name!r})")
  if not config.data.root:
    raise ValueError("config.data.root='': give the COCO directory (VSE++ ids, caption "
                     "annotations, VLP features)")


def read_raw_split(config, split_name: str, check_files: bool = True) -> raw.RawSplit:
  """A COCO split in VSE++ order: captions from the annotations, VLP features by stem."""
  _check_name(config)
  _, _, stems, texts, cpi = split_rows(config, split_name)
  images = vlp.VlpImages(config, split_name, stems, check_files=check_files)
  return raw.RawSplit(image_ids=stems, texts=texts, captions_per_image=cpi,
                      read_images=images)


def read_raw_split_for_check(config, split_name: str) -> raw.RawSplit:
  """The split for the data checker: missing feature files are left to its scan."""
  return read_raw_split(config, split_name, check_files=False)


def caption_ids(config, split_name: str) -> Tuple[np.ndarray, np.ndarray]:
  """(caption annotation id of every caption row, COCO image id of every image row)."""
  _check_name(config)
  caps, images, _, _, _ = split_rows(config, split_name)
  return caps, images

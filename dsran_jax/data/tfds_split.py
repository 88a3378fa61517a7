"""Reading a split packed by `dsran_jax.data.tfds_builder` (`data.tfds_dir`).

`read_raw_split(config, split)` returns a `RawSplit` (captions tokenised again by
`data.load_split`), `load_tfds_split(config, split)` a `Split` with the token ids stored
at build time. Layout: `{data.tfds_dir}/dsran_split/{config_name}/{DATASET_VERSION}/`,
`config_name` = `{data.format}_{data.name}_{split}` (`dataset_config_name`). Arrays that
were all zero at build time (region_pos of the precomp release) are not stored; they are
rebuilt as zeros on read.

TensorFlow and TFDS are imported when a packed split is opened, so importing this module
(and `dsran_jax.data`) stays light.
"""
import json
import os
import re
import threading

import numpy as np

from dsran_jax import models
from dsran_jax.data import base
from dsran_jax.data import raw as raw_lib

BUILDER_NAME = "dsran_split"
DATASET_VERSION = "1.0.0"
FORMAT_TAG = "dsran_jax.tfds_split/1"  # metadata.json "format" of a packed split


def dataset_config_name(config, split_name: str) -> str:
  """TFDS config name of a split: `{format}_{name}_{split}`, lowercase, [a-z0-9_]."""
  name = f"{config.data.format}_{config.data.name}_{split_name}".lower()
  return re.sub(r"[^a-z0-9_]", "_", name)


def dataset_dir(tfds_dir: str, config_name: str) -> str:
  """Where a packed split lives."""
  return os.path.join(tfds_dir, BUILDER_NAME, config_name, DATASET_VERSION)


def _read_metadata(path: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  meta_file = os.path.join(path, "metadata.json")
  if not tf.io.gfile.exists(meta_file):
    raise raw_lib.MissingDataError(
        f"{meta_file}: missing (no packed split here; build it with `python -m "
        "dsran_jax.data.tfds_builder --config=... --split=... --out_dir=...`)")
  with tf.io.gfile.GFile(meta_file, "r") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_TAG:
    raise raw_lib.DataError(
        f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT_TAG!r}")
  return meta


class _Reader:
  """Random access to a packed split's image arrays; one data source per thread."""

  def __init__(self, path: str, split_name: str, meta: dict):
    self._path = path
    self._split_name = split_name
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._builder = tfds.builder_from_directory(path)
    self._zero = {k: (tuple(shape), np.dtype(dtype))
                  for k, (shape, dtype) in meta["zero_keys"].items()}
    self._keys = [k for k in meta["image_keys"] if k not in self._zero]
    self._num_images = int(meta["num_images"])
    self._local = threading.local()
    self.data_source()  # fail now, naming the path, if the records cannot be opened

  def data_source(self):
    source = getattr(self._local, "source", None)
    if source is None:
      try:
        source = self._builder.as_data_source(split=self._split_name)
      except (ValueError, KeyError) as e:
        raise raw_lib.DataError(f"{self._path}: cannot open split "
                                f"{self._split_name!r}: {e}") from e
      if len(source) != self._num_images:
        raise raw_lib.DataError(
            f"{self._path}: {len(source)} records, metadata.json says {self._num_images}")
      self._local.source = source
    return source

  def __call__(self, indices) -> dict:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self._num_images):
      raise IndexError(f"{self._path}: image indices must be in [0, {self._num_images}), "
                       f"got min {indices.min()} max {indices.max()}")
    examples = self.data_source().__getitems__([int(i) for i in indices])
    out = {k: np.stack([np.asarray(ex[k]) for ex in examples]) if examples else None
           for k in self._keys}
    got = np.array([int(ex["image_index"]) for ex in examples], np.int64)
    if not np.array_equal(got, indices):
      raise raw_lib.DataError(
          f"{self._path}: records hold images {got[:8].tolist()}... for requested "
          f"{indices[:8].tolist()}... (the dataset is not in image order)")
    for k, (shape, dtype) in self._zero.items():
      out[k] = np.zeros((len(indices),) + shape, dtype)
    if not examples:
      out = {k: v for k, v in out.items() if v is not None}
    return out


def _open(config, split_name: str):
  if not config.data.tfds_dir:
    raise ValueError("config.data.tfds_dir='': set it to the --out_dir of tfds_builder")
  path = dataset_dir(config.data.tfds_dir, dataset_config_name(config, split_name))
  meta = _read_metadata(path)
  return path, meta


def read_raw_split(config, split_name: str) -> raw_lib.RawSplit:
  """A packed split as a `RawSplit` (captions re-tokenised by `data.load_split`)."""
  path, meta = _open(config, split_name)
  return raw_lib.RawSplit(image_ids=list(meta["image_ids"]), texts=list(meta["texts"]),
                          captions_per_image=int(meta["captions_per_image"]),
                          read_images=_Reader(path, meta["split"], meta))


def load_tfds_split(config, split_name: str) -> base.Split:
  """A packed split as a `Split`, with the token ids stored at build time.

  The stored ids are those of the tokenizer the split was built with; its caption cut
  must be the config's (`models.caption_cap`; use `read_raw_split` + `data.load_split`
  to tokenise again).
  """
  path, meta = _open(config, split_name)
  width = int(meta["max_len"])  # the stored id columns
  source = meta.get("source") or {}
  # Packs made before the length rule recorded only their width, which was the cut.
  packed_cap = int(source.get("caption_cap", source.get("max_len", width)))
  cap = models.caption_cap(config)
  if cap != packed_cap:
    raise ValueError(
        f"{path}: captions were tokenised with a cut of {packed_cap or 'none'} tokens, but "
        f"the config cuts at {cap or 'none'} (data.max_len={config.data.max_len}): pack "
        f"the split again, or set data.max_len={packed_cap}")
  n = len(meta["texts"])
  input_ids = np.zeros((n, width), np.int32)
  attention_mask = np.zeros((n, width), np.int32)
  for c, row in enumerate(meta["tokens"]):
    input_ids[c, :len(row)] = row
    attention_mask[c, :len(row)] = 1
  return base.Split(name=split_name, image_ids=list(meta["image_ids"]),
                    texts=list(meta["texts"]), input_ids=input_ids,
                    attention_mask=attention_mask,
                    captions_per_image=int(meta["captions_per_image"]),
                    read_images=_Reader(path, meta["split"], meta))

"""Pack a split of any format into a TFDS dataset, and read it back as a `Split`.

One TFDS example per image: its image-side arrays (grid, regions, region_pos,
region_mask, whichever the split has), its index and id, and its `captions_per_image`
captions (texts and the token ids / masks of the tokenizer used at build time). Records
are ArrayRecord (random access, so the training order stays a pure function of
(seed, step) exactly as with raw files), written in image order (`disable_shuffling`).
Split-level text data (image ids, captions, token ids) is also kept in the dataset's
`metadata.json`, so opening a split never scans the feature records.

Layout: `{out_dir}/dsran_split/{config_name}/{DATASET_VERSION}/`, where `config_name` is
`{data.format}_{data.name}_{split}` (see `dataset_config_name`): one TFDS dataset per
split, so splits of a large dataset can be packed by separate jobs.

Build (offline: nothing is downloaded, GCS is never consulted):
  python -m dsran_jax.data.tfds_builder --config=configs/demo.py --split=train \\
      --out_dir=/data/tfds [--workdir=DIR (GRU vocabulary)] [--config.data.root=...]

Read: set `data.tfds_dir=/data/tfds`; `load_tfds_split(config, split)` returns a `Split`
with the stored tokens, `read_raw_split(config, split)` a `RawSplit` (to be tokenised
again by `data.load_split`). Arrays that were all zero at build time (region_pos of the
precomp release) are not stored; they are rebuilt as zeros on read.
"""
import json
import os
import re
import threading
import types
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from dsran_jax.data import base
from dsran_jax.data import raw as raw_lib

BUILDER_NAME = "dsran_split"
DATASET_VERSION = "1.0.0"
FILE_FORMAT = "array_record"
_WRITE_BATCH = 64
_FORMAT_TAG = "dsran_jax.tfds_split/1"


def dataset_config_name(config, split_name: str) -> str:
  """TFDS config name of a split: `{format}_{name}_{split}`, lowercase, [a-z0-9_]."""
  name = f"{config.data.format}_{config.data.name}_{split_name}".lower()
  return re.sub(r"[^a-z0-9_]", "_", name)


def dataset_dir(tfds_dir: str, config_name: str) -> str:
  """Where a packed split lives."""
  return os.path.join(tfds_dir, BUILDER_NAME, config_name, DATASET_VERSION)


def _feature_spec(arrays: dict, zero_keys, captions_per_image: int, max_len: int):
  feats = {
      "image_index": tfds.features.Scalar(dtype=np.int64),
      "image_id": tfds.features.Text(),
      "texts": tfds.features.Sequence(tfds.features.Text(), length=captions_per_image),
      # Raw bytes: an order of magnitude faster to write and read than float lists.
      "input_ids": tfds.features.Tensor(
          shape=(captions_per_image, max_len), dtype=np.int32,
          encoding=tfds.features.Encoding.BYTES),
      "attention_mask": tfds.features.Tensor(
          shape=(captions_per_image, max_len), dtype=np.int32,
          encoding=tfds.features.Encoding.BYTES),
  }
  for key, value in arrays.items():
    if key in zero_keys:
      continue
    dtype = np.bool_ if value.dtype == np.bool_ else value.dtype
    feats[key] = tfds.features.Tensor(
        shape=value.shape[1:], dtype=dtype, encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict(feats)


# Not in the TFDS registry: packed splits are opened by path (builder_from_directory), and
# registration would fail when the module is loaded twice (`python -m` plus an import).
class DsranSplit(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One dsran_jax `Split` (features, captions, tokens) as a TFDS dataset."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Per-image examples, ArrayRecord, metadata with captions."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9.x resolves this through the `importlib_resources` backport, which it does
    # not install on Python >= 3.9; the path only locates download checksums (none here).
    return None

  def __init__(self, *, source: base.Split, config_name: str, source_info: dict = None,
               **kwargs):
    """Builder for writing `source` (reading goes through `tfds.builder_from_directory`).

    Args:
      source: the split to pack.
      config_name: TFDS config name (`dataset_config_name`).
      source_info: JSON-able description of where the split came from (kept in
        metadata.json).
      **kwargs: `data_dir`, `file_format`, ... for `tfds.core.DatasetBuilder`.
    """
    self._source = source
    self._source_info = dict(source_info or {})
    probe = source.images(np.arange(min(_WRITE_BATCH, source.num_images)))
    # An array that is all zero on the first images (precomp has no boxes) is assumed
    # absent and not stored; every later batch is checked (see _generate_examples).
    self._zero_keys = sorted(k for k, v in probe.items()
                             if np.issubdtype(v.dtype, np.number) and not np.any(v))
    self._probe = {k: v[:1] for k, v in probe.items()}
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(
        config=tfds.core.BuilderConfig(name=config_name, version=DATASET_VERSION,
                                       description=f"dsran_jax split {source.name!r}"),
        **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    src = self._source
    metadata = tfds.core.MetadataDict(
        format=_FORMAT_TAG,
        split=src.name,
        num_images=src.num_images,
        captions_per_image=src.captions_per_image,
        max_len=int(src.input_ids.shape[1]),
        image_ids=[str(x) for x in src.image_ids],
        texts=[str(t) for t in src.texts],
        # Unpadded token rows: the mask is 1 exactly on a row's first len(row) positions.
        tokens=[row[:int(n)].tolist() for row, n in
                zip(src.input_ids, src.attention_mask.sum(1))],
        zero_keys={k: [list(self._probe[k].shape[1:]), str(self._probe[k].dtype)]
                   for k in self._zero_keys},
        image_keys=sorted(self._probe),
        source=self._source_info,
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description="Image-side features and captions of one dsran_jax split.",
        features=_feature_spec(self._probe, self._zero_keys, src.captions_per_image,
                               int(src.input_ids.shape[1])),
        metadata=metadata,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {self._source.name: self._generate_examples()}

  def _generate_examples(self):
    src = self._source
    cpi = src.captions_per_image
    for start in range(0, src.num_images, _WRITE_BATCH):
      indices = np.arange(start, min(src.num_images, start + _WRITE_BATCH))
      arrays = src.images(indices)
      for key in self._zero_keys:
        nonzero = np.flatnonzero(np.any(arrays[key].reshape(len(indices), -1), axis=1))
        if nonzero.size:
          i = int(indices[nonzero[0]])
          raise raw_lib.DataError(
              f"split {src.name!r}: {key} of image {i} ({src.image_ids[i]}) is nonzero, "
              f"but it was all zero on the first {_WRITE_BATCH} images and is not stored")
      for row, i in enumerate(indices):
        caps = slice(int(i) * cpi, (int(i) + 1) * cpi)
        example = {
            "image_index": int(i),
            "image_id": str(src.image_ids[i]),
            "texts": [str(t) for t in src.texts[caps]],
            "input_ids": np.asarray(src.input_ids[caps], np.int32),
            "attention_mask": np.asarray(src.attention_mask[caps], np.int32),
        }
        for key, value in arrays.items():
          if key not in self._zero_keys:
            example[key] = value[row]
        yield int(i), example


def build_split(split: base.Split, out_dir: str, config_name: str,
                source_info: Optional[dict] = None) -> str:
  """Packs `split` under `out_dir`; returns the dataset directory.

  Builds offline (no download, no GCS). An existing complete dataset of the same
  config name and version is left as is (TFDS datasets are immutable: delete the
  directory to rebuild).
  """
  builder = DsranSplit(source=split, config_name=config_name, source_info=source_info,
                       data_dir=out_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


def _read_metadata(path: str) -> dict:
  meta_file = os.path.join(path, "metadata.json")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(meta_file):
    raise raw_lib.MissingDataError(
        f"{meta_file}: missing (no packed split here; build it with `python -m "
        "dsran_jax.data.tfds_builder --config=... --split=... --out_dir=...`)")
  with tf.io.gfile.GFile(meta_file, "r") as f:
    meta = json.load(f)
  if meta.get("format") != _FORMAT_TAG:
    raise raw_lib.DataError(
        f"{meta_file}: format {meta.get('format')!r}, expected {_FORMAT_TAG!r}")
  return meta


class _Reader:
  """Random access to a packed split's image arrays; one data source per thread."""

  def __init__(self, path: str, split_name: str, meta: dict):
    self._path = path
    self._split_name = split_name
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
    raise ValueError("data.tfds_dir is empty: set it to the --out_dir of tfds_builder")
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

  The stored ids are those of the tokenizer the split was built with; `data.max_len`
  must match (use `read_raw_split` + `data.load_split` to tokenise again).
  """
  path, meta = _open(config, split_name)
  max_len = int(meta["max_len"])
  if int(config.data.max_len) != max_len:
    raise ValueError(
        f"{path}: captions were tokenised with max_len {max_len}, but data.max_len="
        f"{config.data.max_len}")
  n = len(meta["texts"])
  input_ids = np.zeros((n, max_len), np.int32)
  attention_mask = np.zeros((n, max_len), np.int32)
  for c, row in enumerate(meta["tokens"]):
    input_ids[c, :len(row)] = row
    attention_mask[c, :len(row)] = 1
  return base.Split(name=split_name, image_ids=list(meta["image_ids"]),
                    texts=list(meta["texts"]), input_ids=input_ids,
                    attention_mask=attention_mask,
                    captions_per_image=int(meta["captions_per_image"]),
                    read_images=_Reader(path, meta["split"], meta))


def _source_info(config, split_name: str) -> dict:
  info = {"format": config.data.format, "name": config.data.name, "root": config.data.root,
          "split": split_name, "text_encoder": config.model.text_encoder,
          "bert_path": config.model.bert_path, "max_len": int(config.data.max_len)}
  if config.data.format == "synthetic":
    info["synthetic"] = config.data.synthetic.to_dict()
    info["img_dim"] = int(config.data.img_dim)
  return info


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  f = types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py)."),
      split=flags.DEFINE_string("split", None,
                                "Split to pack (train, dev, test, testall, ...)."),
      out_dir=flags.DEFINE_string("out_dir", None,
                                  "TFDS data directory (later data.tfds_dir)."),
      workdir=flags.DEFINE_string("workdir", None,
                                  "Workdir holding the GRU vocabulary, if any."),
  )
  flags.mark_flags_as_required(["config", "split", "out_dir"])
  return f


def main(argv):
  """CLI: packs `--split` of `--config` under `--out_dir`."""
  del argv
  from dsran_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  f = _FLAGS
  config = f.config.value
  split_name = f.split.value
  tfds.disable_progress_bar()
  with config.unlocked():
    config.data.tfds_dir = ""  # pack from the raw files, never from a packed copy
  split = data_lib.load_split(config, split_name, f.workdir.value)
  path = build_split(split, f.out_dir.value, dataset_config_name(config, split_name),
                     _source_info(config, split_name))
  print(json.dumps({"dataset_dir": path, "images": split.num_images,
                    "captions": split.num_captions}))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAGS = _define_flags()
  app.run(main)

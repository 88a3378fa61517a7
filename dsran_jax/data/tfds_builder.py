"""Pack a split of any format into a TFDS dataset (read back by `data.tfds_split`).

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

Read: set `data.tfds_dir=/data/tfds`; `dsran_jax.data.tfds_split` (re-exported here)
has `load_tfds_split(config, split)`, a `Split` with the stored tokens, and
`read_raw_split(config, split)`, a `RawSplit` (to be tokenised again by
`data.load_split`). Arrays that were all zero at build time (region_pos of the precomp
release) are not stored; they are rebuilt as zeros on read.
"""
import json
import types
from typing import Optional

from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow_datasets as tfds

from dsran_jax import data as data_lib
from dsran_jax import models
from dsran_jax import cli, validation
from dsran_jax.data import base
from dsran_jax.data import raw as raw_lib
# The reading side (re-exported: `tfds_builder.load_tfds_split` etc. keep working).
from dsran_jax.data.tfds_split import (  # noqa: F401
    BUILDER_NAME, DATASET_VERSION, FORMAT_TAG, dataset_config_name, dataset_dir,
    load_tfds_split, read_raw_split)

FILE_FORMAT = "array_record"
_WRITE_BATCH = 64


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
        format=FORMAT_TAG,
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


def _source_info(config, split_name: str) -> dict:
  info = {"format": config.data.format, "name": config.data.name, "root": config.data.root,
          "split": split_name, "model": config.model.name,
          "tokenizer": models.tokenizer_kind(config), "bert_path": models.bert_path(config),
          "max_len": int(config.data.max_len), "caption_cap": models.caption_cap(config)}
  if config.data.format == "synthetic":
    info["synthetic"] = config.data.synthetic.to_dict()
    info["img_dim"] = int(config.data.img_dim)
  return info


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
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
  f = _FLAGS
  config = f.config.value
  split_name = f.split.value
  tfds.disable_progress_bar()
  with config.unlocked():
    config.data.tfds_dir = ""  # pack from the raw files, never from a packed copy
  try:
    split = data_lib.load_split(config, split_name, f.workdir.value)
    path = build_split(split, f.out_dir.value, dataset_config_name(config, split_name),
                       _source_info(config, split_name))
  except (ValueError, OSError) as e:  # a user's mistake: bad value, missing/bad file
    cli.fail(str(e), exit_code=1)
  print(json.dumps({"dataset_dir": path, "images": split.num_images,
                    "captions": split.num_captions}))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  # A bad config value fails before any data is read; user errors: one `error:` line.
  cli.run_cli(main, check=lambda: validation.validate_config(_FLAGS.config.value))

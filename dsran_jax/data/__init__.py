"""Dataset splits: `load_split(config, split_name, workdir) -> Split`.

`config.data.format` picks the reader module, registered once in `data.formats`
("synthetic", "precomp", "vlp"); each provides
`read_raw_split(config, split_name) -> raw.RawSplit` (captions plus a feature reader), and
`load_split` tokenises the captions here, once per caption, for every format alike.
Importing this package pulls in neither h5py, the tokenizers library nor TensorFlow:
those are imported where a file is opened or a tokenizer built.
"""
from typing import Optional

from dsran_jax import models
from dsran_jax.core.batch import IMAGE_KEYS, TEXT_KEYS
from dsran_jax.data import formats, images, tfds_split, tokenize
from dsran_jax.data.base import Split
from dsran_jax.data.formats import FORMATS, format_module
from dsran_jax.data.raw import DataError, MissingDataError, RawSplit

__all__ = ["FORMATS", "IMAGE_KEYS", "TEXT_KEYS", "DataError", "MissingDataError",
           "RawSplit", "Split", "format_module", "gru_vocabulary", "load_split", "read_raw_split",
           "vocab_size"]


def read_raw_split(config, split_name: str) -> RawSplit:
  """A split's raw captions and feature reader, before tokenisation: from the TFDS
  copy packed by `dsran_jax.data.tfds_builder` (read by `data.tfds_split`) when
  `data.tfds_dir` is set, else from the raw files of `data.format`."""
  if config.data.tfds_dir:
    return tfds_split.read_raw_split(config, split_name)
  return formats.read_raw_split(config, split_name)


def load_split(config, split_name: str, workdir: Optional[str] = None) -> Split:
  """Reads one split and tokenises its captions.

  Args:
    config: the full config (`data.*`; `model.name` picks the tokenizer and the image
      keys read, see `dsran_jax.models`).
    split_name: "train", "dev", "test", "testall" (COCO precomp), or a synthetic split.
    workdir: run directory; the GRU vocabulary is built from the training captions on
      first use and kept as `{workdir}/vocab.json` (or `data.vocab_file`).

  Returns:
    The `Split`, with `input_ids` / `attention_mask` int32 `(num_captions, data.max_len)`.
  """
  raw_split = images.attach(config, split_name, read_raw_split(config, split_name))

  def train_texts():
    if split_name == config.data.train_split:
      return raw_split.texts
    return read_raw_split(config, config.data.train_split).texts

  tokenizer = tokenize.make_tokenizer(config, workdir, train_texts)
  input_ids, attention_mask = tokenizer.encode(raw_split.texts)
  return Split(name=split_name, image_ids=list(raw_split.image_ids),
               texts=list(raw_split.texts), input_ids=input_ids,
               attention_mask=attention_mask,
               captions_per_image=raw_split.captions_per_image,
               read_images=raw_split.read_images,
               read_train_images=raw_split.read_train_images)


def gru_vocabulary(config, workdir: Optional[str] = None):
  """The word `Vocabulary` of models that use one (built from the training captions on
  first use and saved in the workdir); None for BERT tokenizers."""
  if models.tokenizer_kind(config) != "vocab":
    return None
  tokenizer = tokenize.make_tokenizer(
      config, workdir, lambda: read_raw_split(config, config.data.train_split).texts)
  return tokenizer.vocab


def vocab_size(config, workdir: Optional[str] = None) -> Optional[int]:
  """Size of the word vocabulary (`model.vocab_size` if set); None for BERT tokenizers."""
  if models.tokenizer_kind(config) != "vocab":
    return None
  return config.model.vocab_size or len(gru_vocabulary(config, workdir))

"""Dataset splits: `load_split(config, split_name, workdir) -> Split`.

`config.data.format` picks the reader module ("synthetic", "precomp", "vlp"); each provides
`read_raw_split(config, split_name) -> raw.RawSplit` (captions plus a feature reader), and
`load_split` tokenises the captions here, once per caption, for every format alike.
Readers are imported lazily so that importing this package pulls in neither h5py nor the
tokenizers library.
"""
import importlib
from typing import Optional

from dsran_jax.core.batch import IMAGE_KEYS, TEXT_KEYS
from dsran_jax.data.base import Split
from dsran_jax.data.raw import DataError, MissingDataError, RawSplit

FORMATS = ("synthetic", "precomp", "vlp")

__all__ = ["FORMATS", "IMAGE_KEYS", "TEXT_KEYS", "DataError", "MissingDataError",
           "RawSplit", "Split", "format_module", "gru_vocabulary", "load_split", "read_raw_split",
           "vocab_size"]


def format_module(config):
  """The reader module of `config.data.format`."""
  fmt = config.data.format
  if fmt not in FORMATS:
    raise ValueError(f"data.format={fmt!r}: expected one of {', '.join(FORMATS)}")
  return importlib.import_module(f"dsran_jax.data.{fmt}")


def read_raw_split(config, split_name: str) -> RawSplit:
  """A split's raw captions and feature reader, before tokenisation: from the TFRecord
  shards of `dsran_jax.data.tfds_builder` when `data.tfds_dir` is set, else the raw files."""
  if config.data.tfds_dir:
    from dsran_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    return tfds_builder.read_raw_split(config, split_name)
  return format_module(config).read_raw_split(config, split_name)


def load_split(config, split_name: str, workdir: Optional[str] = None) -> Split:
  """Reads one split and tokenises its captions.

  Args:
    config: the full config (`data.*`, `model.text_encoder`, `model.bert_path`,
      `model.image_inputs`).
    split_name: "train", "dev", "test", "testall" (COCO precomp), or a synthetic split.
    workdir: run directory; the GRU vocabulary is built from the training captions on
      first use and kept as `{workdir}/vocab.json` (or `data.vocab_file`).

  Returns:
    The `Split`, with `input_ids` / `attention_mask` int32 `(num_captions, data.max_len)`.
  """
  from dsran_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  raw_split = read_raw_split(config, split_name)

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
               read_images=raw_split.read_images)


def gru_vocabulary(config, workdir: Optional[str] = None):
  """The word `Vocabulary` of models that use one (built from the training captions on
  first use and saved in the workdir); None for BERT tokenizers."""
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  if models.tokenizer_kind(config) != "vocab":
    return None
  from dsran_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  tokenizer = tokenize.make_tokenizer(
      config, workdir, lambda: read_raw_split(config, config.data.train_split).texts)
  return tokenizer.vocab


def vocab_size(config, workdir: Optional[str] = None) -> Optional[int]:
  """Size of the word vocabulary (`model.vocab_size` if set); None for BERT tokenizers."""
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  if models.tokenizer_kind(config) != "vocab":
    return None
  return config.model.vocab_size or len(gru_vocabulary(config, workdir))

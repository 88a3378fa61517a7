"""Dataset splits: `load_split(config, split_name, workdir) -> Split`.

`config.data.format` picks the reader module, registered once in `data.formats`
("synthetic", "precomp", "vlp"); each provides
`read_raw_split(config, split_name) -> raw.RawSplit` (captions plus a feature reader), and
`load_split` tokenises the captions here, once per caption, for every format alike.
Importing this package pulls in neither h5py, the tokenizers library nor TensorFlow:
those are imported where a file is opened or a tokenizer built.
"""
from typing import Optional

from absl import logging

from dsran_jax import models
from dsran_jax.core.batch import IMAGE_KEYS, TEXT_KEYS
from dsran_jax.data import formats, images, tfds_split, tokenize
from dsran_jax.data.base import Split
from dsran_jax.data.formats import FORMATS, format_module
from dsran_jax.data.raw import DataError, MissingDataError, RawSplit

__all__ = ["FORMATS", "IMAGE_KEYS", "TEXT_KEYS", "DataError", "MissingDataError",
           "RawSplit", "Split", "format_module", "gru_vocabulary", "load_dev_split",
           "load_split", "read_raw_split", "report_lengths", "vocab_size",
           "vocab_split_names"]

# `data.vocab_splits` -> the config keys of the splits whose captions a new word
# vocabulary counts. The authors' vocab.py counts train + dev captions (SCAN, SGRAF:
# `{train,dev}_caps.txt`) or every caption of the dataset (VSE++'s f30k_vocab.pkl /
# coco_vocab.pkl, from the whole Karpathy JSON / both COCO caption files, which DSRAN's
# GRU build and MLASM load).
VOCAB_SPLITS = {"train": ("train_split",), "train+dev": ("train_split", "dev_split"),
                "all": ("train_split", "dev_split", "test_split")}


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
    workdir: run directory; the GRU vocabulary is built on first use from the captions
      of the splits `data.vocab_splits` names and kept as `{workdir}/vocab.json` (or
      `data.vocab_file`).

  Returns:
    The `Split`, with `input_ids` / `attention_mask` int32 `(num_captions, W)`, W its
    longest caption after the cut (`models.caption_cap`), and `caption_lengths` (what
    the cut did: logged as a warning when it shortened captions).
  """
  raw_split = images.attach(config, split_name, read_raw_split(config, split_name))
  tokenizer = tokenize.make_tokenizer(config, workdir,
                                      lambda: _vocab_texts(config, {split_name: raw_split}))
  input_ids, attention_mask, lengths = tokenizer.encode_report(raw_split.texts)
  report_lengths(lengths, f"split {split_name!r}")
  return Split(name=split_name, image_ids=list(raw_split.image_ids),
               texts=list(raw_split.texts), input_ids=input_ids,
               attention_mask=attention_mask,
               captions_per_image=raw_split.captions_per_image,
               read_images=raw_split.read_images, caption_lengths=lengths,
               read_train_images=raw_split.read_train_images)


def report_lengths(lengths: tokenize.CaptionLengths, what: str) -> None:
  """Logs what the caption cut did: a warning when it shortened captions (how many, the
  longest), an info line otherwise."""
  if lengths.cut:
    logging.warning("%s", lengths.message(what))
  else:
    logging.info("%s", lengths.message(what))


def vocab_split_names(config) -> tuple[str, ...]:
  """The splits whose captions a new word vocabulary counts (`data.vocab_splits`)."""
  return tuple(dict.fromkeys(config.data[key]
                             for key in VOCAB_SPLITS[config.data.vocab_splits]))


def _vocab_texts(config, read: Optional[dict[str, RawSplit]] = None) -> list[str]:
  """The captions of `vocab_split_names(config)`, reusing the splits already `read`."""
  read = dict(read or {})
  texts = []
  for name in vocab_split_names(config):
    if name not in read:
      read[name] = read_raw_split(config, name)
    texts.extend(read[name].texts)
  return texts


def gru_vocabulary(config, workdir: Optional[str] = None):
  """The word `Vocabulary` of models that use one (built on first use from the captions
  of `data.vocab_splits` and saved in the workdir); None for BERT tokenizers."""
  if models.tokenizer_kind(config) != "vocab":
    return None
  tokenizer = tokenize.make_tokenizer(config, workdir, lambda: _vocab_texts(config))
  return tokenizer.vocab


def load_dev_split(config, workdir: Optional[str] = None) -> Split:
  """The split of model selection: `data.dev_split`, cut to its first
  `eval.max_dev_images` images where the authors cut (SCAN/SGRAF: 5000 captions, 1000
  images; COCO: VSE++'s first 5000 dev ids), whole when that is 0 (DSRAN and MLASM on
  Flickr30K select on all 1014 val images)."""
  split = load_split(config, config.data.dev_split, workdir)
  n = config.eval.max_dev_images
  return split.subset_images(n) if n else split


def vocab_size(config, workdir: Optional[str] = None) -> Optional[int]:
  """Size of the word vocabulary (`model.vocab_size` if set); None for BERT tokenizers."""
  if models.tokenizer_kind(config) != "vocab":
    return None
  return config.model.vocab_size or len(gru_vocabulary(config, workdir))

"""Caption tokenisers: BERT WordPiece (BERT build) and a word vocabulary (GRU build).

Both produce `(input_ids int32 (N, max_len), attention_mask int32 (N, max_len))`, 0-padded,
exactly as the authors' loaders build their ids:
- BERT: `[CLS] wordpieces [SEP]`, cut to max_len *after* adding [SEP] (so a caption longer
  than max_len - 2 wordpieces loses its [SEP], as in data_bert.py), then 0-padded.
- GRU: `<start> words <end>` with the vocabulary ids (`<unk>` for unknown words), cut to
  max_len (the authors pad to the batch's longest caption instead; we need a fixed width).

`make_tokenizer(config, workdir, train_texts_fn)` picks the one the model family asks for.
"""
import itertools
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from dsran_jax import models
from dsran_jax import workdir as workdir_lib
from dsran_jax.core.vocab import (  # noqa: F401  (re-exported: the tokenizers' vocabulary)
    DEFAULT_THRESHOLD, SPECIAL_WORDS, Vocabulary, word_tokenize)
from dsran_jax.hub import resolve_pretrained_dir


def _pad_rows(rows: Sequence[Sequence[int]], max_len: int):
  """Rows cut to max_len and 0-padded, with their attention mask (vectorised: COCO has
  ~600k captions)."""
  lens = np.fromiter((min(len(r), max_len) for r in rows), np.int64, len(rows))
  flat = np.fromiter(itertools.chain.from_iterable(r[:max_len] for r in rows), np.int32,
                     int(lens.sum()))
  mask = np.arange(max_len)[None, :] < lens[:, None]
  ids = np.zeros((len(rows), max_len), np.int32)
  ids[mask] = flat  # boolean assignment fills row by row, in order
  return ids, mask.astype(np.int32)


# ------------------------------------------------------------------------------ BERT


class BertTokenizer:
  """BERT WordPiece ids in the authors' layout, from a local BERT directory.

  Uses `tokenizer.json` when the directory has one, else `vocab.txt` with the standard
  BERT normaliser (lower-casing per `tokenizer_config.json`'s `do_lower_case`, default
  True like the authors' `BertTokenizer(vocab.txt)`).
  """

  def __init__(self, bert_dir: str, max_len: int):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self.max_len = int(max_len)
    tok_json = os.path.join(bert_dir, "tokenizer.json")
    vocab_txt = os.path.join(bert_dir, "vocab.txt")
    if os.path.isfile(tok_json):
      tok = Tokenizer.from_file(tok_json)
    elif os.path.isfile(vocab_txt):
      tok = self._from_vocab_txt(bert_dir, vocab_txt)
    else:
      raise FileNotFoundError(
          f"{bert_dir}: no tokenizer.json or vocab.txt (the model's BERT path must be a "
          f"BERT directory)")
    # Released tokenizer.json files carry their own truncation/padding (e.g. 128); the
    # authors' cut happens after [SEP] is added, so we add specials and cut ourselves.
    tok.no_truncation()
    tok.no_padding()
    self._tok = tok
    self.cls_id = self._special_id("[CLS]", bert_dir)
    self.sep_id = self._special_id("[SEP]", bert_dir)

  @staticmethod
  def _from_vocab_txt(bert_dir: str, vocab_txt: str):
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    lower = True
    cfg_path = os.path.join(bert_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path, encoding="utf-8") as f:
        lower = bool(json.load(f).get("do_lower_case", True))
    # strip_accents=None follows `lowercase`, as BERT's BasicTokenizer does.
    return BertWordPieceTokenizer(
        vocab_txt, clean_text=True, handle_chinese_chars=True, strip_accents=None,
        lowercase=lower, wordpieces_prefix="##")._tokenizer  # pylint: disable=protected-access

  def _special_id(self, token: str, bert_dir: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"{bert_dir}: vocabulary has no {token} token")
    return i

  def tokenize(self, texts: Sequence[str]) -> list:
    """Token-id lists `[CLS] wordpieces [SEP]`, not truncated."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [[self.cls_id] + e.ids + [self.sep_id] for e in encs]

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts, [CLS] and [SEP] included."""
    return np.array([len(r) for r in self.tokenize(texts)], np.int64)

  def encode(self, texts: Sequence[str]):
    """`(input_ids, attention_mask)`, int32 `(len(texts), max_len)`."""
    return _pad_rows(self.tokenize(texts), self.max_len)


class GruTokenizer:
  """`encode(texts)` for the GRU build, from a `Vocabulary`."""

  def __init__(self, vocab: Vocabulary, max_len: int):
    self.vocab = vocab
    self.max_len = int(max_len)

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts, <start> and <end> included."""
    return np.array([len(word_tokenize(t)) + 2 for t in texts], np.int64)

  def encode(self, texts: Sequence[str]):
    """`(input_ids, attention_mask)`, int32 `(len(texts), max_len)`."""
    return _pad_rows([self.vocab.encode_one(t) for t in texts], self.max_len)


def make_tokenizer(config, workdir: Optional[str] = None,
                   train_texts_fn: Optional[Callable[[], Sequence[str]]] = None):
  """The tokenizer the configured model family asks for (`models.tokenizer_kind`: BERT
  WordPiece or a word vocabulary): an object with `encode(texts)`.

  Args:
    config: the full config (`model.name` and its family's keys, whose BERT directory
      `models.bert_path` gives; `data.max_len`, `data.vocab_file`).
    workdir: run directory; the GRU vocabulary is kept there (`workdir.vocab_path`:
      `{workdir}/vocab.json`) unless `data.vocab_file` is set.
    train_texts_fn: returns the captions a new vocabulary counts (`data.vocab_splits`:
      the training split, or more, as the authors count); called only when one has
      to be built (it is then saved, so every later split and run reuses it).
  """
  kind = models.tokenizer_kind(config)
  if kind == "bert":
    path = models.bert_path(config)
    if not path:
      raise ValueError(f"config.model.name={config.model.name!r} tokenizes with BERT but "
                       f"its BERT path is empty: set the BERT directory (or hub name) in "
                       f"config.model.{config.model.name}")
    return BertTokenizer(str(resolve_pretrained_dir(path)), config.data.max_len)
  if kind == "vocab":
    path = workdir_lib.vocab_path(config, workdir)
    if path and os.path.isfile(path):
      vocab = Vocabulary.load(path)
    else:
      if workdir and workdir_lib.Workdir(workdir).has_checkpoints():
        # A fresh vocabulary's ids would not be the ones the weights were trained with.
        raise ValueError(
            f"{workdir} has checkpoints but no word vocabulary at {path}: the word ids its "
            "embedding was trained with are unknown. For a converted checkpoint, convert "
            "again with --vocab=<the authors' vocab .json/.pkl>; else set data.vocab_file")
      if train_texts_fn is None:
        raise ValueError(
            f"no word vocabulary at {path or '(no workdir and no data.vocab_file)'} and no "
            f"training captions to build one from")
      vocab = Vocabulary.build(train_texts_fn())
      if path:
        vocab.save(path)
    return GruTokenizer(vocab, config.data.max_len)
  raise ValueError(f"tokenizer kind {kind!r} of model.name={config.model.name!r}: "
                   f"expected 'bert' or 'vocab'")

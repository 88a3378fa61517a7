"""Caption tokenisers: BERT WordPiece (BERT build) and a word vocabulary (GRU build).

Both produce `(input_ids int32 (N, W), attention_mask int32 (N, W))`, 0-padded, exactly
as the authors' loaders build their ids:
- BERT: `[CLS] wordpieces [SEP]`, cut *after* adding [SEP] (so a caption longer than
  cut - 2 wordpieces loses its [SEP], as in DSRAN's data_bert.py), then 0-padded.
- GRU: `<start> words <end>` with the vocabulary ids (`<unk>` for unknown words).

The cut is `models.caption_cap(config)`: the authors' (DSRAN's BERT build: 32) unless
`data.max_len` sets one; 0 keeps every caption whole, as every GRU loader of the
authors does. W is the longest caption after the cut (the cut itself for a model that
attends to padding, `models.pads_to_cap`); batches are narrowed to their own longest
caption by the pipelines (`core.text_policy.bucket_width`). `encode_report` also says
how many captions the cut shortened (`CaptionLengths`), which `data.load_split` and
the matcher report: a cut is never silent.

`make_tokenizer(config, workdir, train_texts_fn)` picks the one the model family asks for.
"""
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class CaptionLengths:
  """What tokenising a set of captions did to their lengths (tokens, end tokens
  included).

  Attributes:
    count: captions tokenised.
    longest: tokens of the longest caption, before any cut.
    cap: the cut (0: none).
    cut: captions longer than the cut, shortened to it.
    width: columns of the id arrays.
  """
  count: int
  longest: int
  cap: int
  cut: int
  width: int

  def message(self, what: str) -> str:
    """One line saying what the cut did to `what` ("split 'test'", "the queries")."""
    if not self.cut:
      return (f"{what}: every caption whole ({self.count} captions, the longest "
              f"{self.longest} tokens)")
    return (f"{what}: cut at {self.cap} tokens, {self.cut} of {self.count} captions "
            f"shortened (the longest has {self.longest} tokens); data.max_len=0 keeps "
            f"every caption whole")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _pad_rows(rows: Sequence[Sequence[int]], cap: int = 0, fixed: bool = False):
  """Rows cut to `cap` (0: none) and 0-padded to the longest (`fixed`: to exactly
  `cap`), with their attention mask and what the cut did (vectorised: COCO has ~600k
  captions)."""
  full = np.fromiter((len(r) for r in rows), np.int64, len(rows))
  lens = np.minimum(full, cap) if cap else full
  width = cap if fixed else max(int(lens.max(initial=0)), 1)
  flat = np.fromiter(itertools.chain.from_iterable(
      r[:cap] if cap else r for r in rows), np.int32, int(lens.sum()))
  mask = np.arange(width)[None, :] < lens[:, None]
  ids = np.zeros((len(rows), width), np.int32)
  ids[mask] = flat  # boolean assignment fills row by row, in order
  report = CaptionLengths(count=len(rows), longest=int(full.max(initial=0)), cap=int(cap),
                          cut=int((full > lens).sum()), width=int(width))
  return ids, mask.astype(np.int32), report


class _Encoder:
  """`encode` / `encode_report` over a subclass's `tokenize(texts) -> rows`."""

  cap = 0
  fixed = False

  def tokenize(self, texts: Sequence[str]) -> list:
    raise NotImplementedError

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts, the end tokens included."""
    return np.array([len(r) for r in self.tokenize(texts)], np.int64)

  def encode_report(self, texts: Sequence[str]):
    """`(input_ids, attention_mask, CaptionLengths)`: int32 `(len(texts), W)` ids cut
    to the tokenizer's cut (if any), W the longest caption after it (the cut itself
    when `fixed`)."""
    ids, mask, report = _pad_rows(self.tokenize(texts), self.cap, self.fixed)
    self._check(report)
    return ids, mask, report

  def encode(self, texts: Sequence[str]):
    """`(input_ids, attention_mask)`, int32 `(len(texts), W)` (see `encode_report`)."""
    ids, mask, _ = self.encode_report(texts)
    return ids, mask

  def _check(self, report: CaptionLengths) -> None:
    del report


# ------------------------------------------------------------------------------ BERT


class BertTokenizer(_Encoder):
  """BERT WordPiece ids in the authors' layout, from a local BERT directory.

  Uses `tokenizer.json` when the directory has one, else `vocab.txt` with the standard
  BERT normaliser (lower-casing per `tokenizer_config.json`'s `do_lower_case`, default
  True like the authors' `BertTokenizer(vocab.txt)`). `cap`: the cut after [SEP] (0:
  none); `fixed`: pad to exactly `cap`. Uncut captions longer than the BERT's
  positions (its `config.json`) are an error.
  """

  def __init__(self, bert_dir: str, cap: int = 0, fixed: bool = False):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self.cap, self.fixed = int(cap), bool(fixed)
    self.bert_dir = bert_dir
    self.max_positions = _bert_positions(bert_dir)
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

  def _check(self, report: CaptionLengths) -> None:
    if self.max_positions and report.width > self.max_positions:
      raise ValueError(
          f"captions of up to {report.longest} tokens, but the BERT at {self.bert_dir} "
          f"has {self.max_positions} positions: set data.max_len <= {self.max_positions} "
          f"to cut them")


def _bert_positions(bert_dir: str) -> Optional[int]:
  """`max_position_embeddings` of a BERT directory's config.json (None without one)."""
  path = os.path.join(bert_dir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    value = json.load(f).get("max_position_embeddings")
  return int(value) if value else None


class GruTokenizer(_Encoder):
  """`encode(texts)` for the word-vocabulary families, from a `Vocabulary`: `<start>
  words <end>`, cut to `cap` tokens when `cap` > 0 (their loaders never cut)."""

  def __init__(self, vocab: Optional[Vocabulary], cap: int = 0):
    self.vocab = vocab
    self.cap = int(cap)

  def tokenize(self, texts: Sequence[str]) -> list:
    """Word-id lists `<start> ids <end>`, not truncated."""
    return [self.vocab.encode_one(t) for t in texts]

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts, <start> and <end> included (no vocabulary needed)."""
    return np.array([len(word_tokenize(t)) + 2 for t in texts], np.int64)




def make_tokenizer(config, workdir: Optional[str] = None,
                   train_texts_fn: Optional[Callable[[], Sequence[str]]] = None):
  """The tokenizer the configured model family asks for (`models.tokenizer_kind`: BERT
  WordPiece or a word vocabulary): an object with `encode(texts)` and
  `encode_report(texts)`, cutting at `models.caption_cap(config)` (0: never).

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
    return BertTokenizer(str(resolve_pretrained_dir(path)), models.caption_cap(config),
                         models.pads_to_cap(config))
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
    return GruTokenizer(vocab, models.caption_cap(config))
  raise ValueError(f"tokenizer kind {kind!r} of model.name={config.model.name!r}: "
                   f"expected 'bert' or 'vocab'")

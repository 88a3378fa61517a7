"""Caption tokenisers: BERT WordPiece (BERT build) and a word vocabulary (GRU build).

Both produce `(input_ids int32 (N, max_len), attention_mask int32 (N, max_len))`, 0-padded,
exactly as the authors' loaders build their ids:
- BERT: `[CLS] wordpieces [SEP]`, cut to max_len *after* adding [SEP] (so a caption longer
  than max_len - 2 wordpieces loses its [SEP], as in data_bert.py), then 0-padded.
- GRU: `<start> words <end>` with the vocabulary ids (`<unk>` for unknown words), cut to
  max_len (the authors pad to the batch's longest caption instead; we need a fixed width).

`make_tokenizer(config, workdir, train_texts_fn)` picks the one the model family asks for.
"""
import collections
import itertools
import json
import os
import re
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_WORDS = (PAD, START, END, UNK)
# Words seen >= 4 times: the VSE++ threshold that produced the authors' shipped vocabularies
# (vocab/f30k_vocab.pkl: 8590 entries). Their vocab.py main() as committed passes 300 and
# keeps the 256 most frequent words, which does not reproduce those files.
DEFAULT_THRESHOLD = 4
_VOCAB_FORMAT = "dsran_jax.vocab/1"


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
          f"{bert_dir}: no tokenizer.json or vocab.txt (model.bert_path must be a BERT "
          f"directory)")
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


# ------------------------------------------------------------------------------- GRU

# An approximation of nltk.word_tokenize (Treebank rules) on lower-cased captions: nltk is
# not a dependency. Hyphenated words, a/b, and numbers with , . : stay whole; clitics ('s,
# n't, 're, ...) split off; other punctuation is its own token; double quotes become `` / '';
# a period stays on single letters and abbreviations ("a.", "u.s.") except at the very end.
_CLITIC = re.compile(r"(n't|'s|'m|'d|'ll|'re|'ve)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}
_TOKEN = re.compile(
    r"""\d+(?:[.,:]\d+)+                    # 3.5  1,000  10:30
      | \w+(?:[-'./]\w+)*(?:\.(?!\.))?     # words, hyphenated words, u.s.
      | \.\.\.|--|``|''
      | \S                                 # any other single symbol
    """, re.VERBOSE)


def word_tokenize(text: str) -> list:
  """Lower-cased word tokens of a caption (approximates nltk.word_tokenize)."""
  text = text.lower().strip()
  text = re.sub(r'^"', "`` ", text)
  text = re.sub(r'(?<=[\s(\[{<])"', " `` ", text)
  text = text.replace('"', " '' ")
  toks = _TOKEN.findall(text)
  out = []
  for i, tok in enumerate(toks):
    if len(tok) > 1 and tok.endswith(".") and not tok[0].isdigit():
      stem = tok[:-1]
      keep = i < len(toks) - 1 and (len(stem) == 1 or "." in stem)
      if not keep:
        out.extend(_split_word(stem) + ["."])
        continue
    out.extend(_split_word(tok))
  return out


def _split_word(tok: str) -> list:
  if tok in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[tok])
  m = _CLITIC.search(tok)
  if m and m.start() > 0:
    return [tok[:m.start()], tok[m.start():]]
  return [tok]


class Vocabulary:
  """Word <-> id map of the GRU build: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3."""

  def __init__(self, words: Sequence[str]):
    words = list(words)
    if tuple(words[:4]) != SPECIAL_WORDS:
      raise ValueError(f"vocabulary must start with {SPECIAL_WORDS}, got {words[:4]}")
    if len(set(words)) != len(words):
      raise ValueError("vocabulary has duplicate words")
    self.idx2word = words
    self.word2idx = {w: i for i, w in enumerate(words)}

  def __len__(self) -> int:
    return len(self.idx2word)

  def __call__(self, word: str) -> int:
    return self.word2idx.get(word, self.word2idx[UNK])

  @classmethod
  def build(cls, texts: Iterable[str], threshold: int = DEFAULT_THRESHOLD) -> "Vocabulary":
    """Words seen >= `threshold` times in `texts` (give training captions only).

    Ordered by decreasing count, then alphabetically, so the ids are reproducible (the
    authors' order follows dict iteration and is not).
    """
    counter = collections.Counter()
    for t in texts:
      counter.update(word_tokenize(t))
    words = sorted((w for w, c in counter.items() if c >= threshold and w not in SPECIAL_WORDS),
                   key=lambda w: (-counter[w], w))
    return cls(list(SPECIAL_WORDS) + words)

  def save(self, path: str) -> None:
    """Writes the vocabulary as JSON (`{"format", "words"}`; id = position in words)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"format": _VOCAB_FORMAT, "words": self.idx2word}, f, ensure_ascii=False)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    """Reads a vocabulary written by `save`."""
    with open(path, encoding="utf-8") as f:
      try:
        obj = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON vocabulary: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != _VOCAB_FORMAT:
      raise ValueError(f"{path}: expected a JSON object with format {_VOCAB_FORMAT!r}")
    return cls(obj["words"])

  def encode_one(self, text: str) -> list:
    """`<start> word ids <end>`, not truncated."""
    return [self.word2idx[START]] + [self(w) for w in word_tokenize(text)] + [
        self.word2idx[END]]


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


def vocab_path(config, workdir: Optional[str]) -> Optional[str]:
  """Where the GRU vocabulary lives: `data.vocab_file`, else `{workdir}/vocab.json`."""
  if config.data.vocab_file:
    return os.path.expanduser(config.data.vocab_file)
  if workdir:
    return os.path.join(workdir, "vocab.json")
  return None


def make_tokenizer(config, workdir: Optional[str] = None,
                   train_texts_fn: Optional[Callable[[], Sequence[str]]] = None):
  """The tokenizer the configured model family asks for (`models.tokenizer_kind`: BERT
  WordPiece or a word vocabulary): an object with `encode(texts)`.

  Args:
    config: the full config (`model.name` and its family's keys, `model.bert_path`,
      `data.max_len`, `data.vocab_file`).
    workdir: run directory; the GRU vocabulary is kept in `{workdir}/vocab.json` unless
      `data.vocab_file` is set.
    train_texts_fn: returns the training captions; called only when a GRU vocabulary has
      to be built (it is then saved, so every later split and run reuses it).
  """
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  kind = models.tokenizer_kind(config)
  if kind == "bert":
    from dsran_jax.hub import resolve_pretrained_dir  # pylint: disable=g-import-not-at-top
    return BertTokenizer(str(resolve_pretrained_dir(config.model.bert_path)),
                         config.data.max_len)
  if kind == "vocab":
    path = vocab_path(config, workdir)
    if path and os.path.isfile(path):
      vocab = Vocabulary.load(path)
    else:
      if workdir and os.path.isdir(os.path.join(workdir, "checkpoints")):
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

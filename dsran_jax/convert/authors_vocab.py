"""The authors' GRU vocabularies as our word vocabulary, every word keeping its id, for
the converters of every family (`models/<family>/params.py`).

`load_vocab` reads any of
- a pickled `vocab.Vocabulary` (DSRAN's and MLASM's `vocab/<data_name>_vocab.pkl`, Python
  2 pickles; only a Vocabulary with dicts, ints and strings is unpickled);
- SCAN's vocabulary JSON (`vocab/{f30k,coco}_precomp_vocab.json`, vocab.py
  serialize_vocab: `{"word2idx", "idx2word", "idx"}`), also SGRAF's;
- a dsran_jax `vocab.json` (`Vocabulary.save`: `{"format", "words"}`).
"""
import json
import os
import pickle
from typing import Mapping

from dsran_jax.convert.engine import ConversionError
from dsran_jax.core.vocab import Vocabulary


class _AuthorsVocabulary:
  """Stand-in for the authors' `vocab.Vocabulary`: unpickling only fills its __dict__."""


_VOCAB_GLOBALS = {
    ("vocab", "Vocabulary"): _AuthorsVocabulary,
    ("__main__", "Vocabulary"): _AuthorsVocabulary,  # how their shipped .pkl files name it
    ("builtins", "dict"): dict, ("builtins", "int"): int, ("builtins", "str"): str,
}


class _VocabUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _VOCAB_GLOBALS:
      return _VOCAB_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: an authors' vocabulary pickle holds only a "
        f"vocab.Vocabulary with dicts, ints and strings")


def _from_word2idx(word2idx: Mapping[str, int], path: str):
  """Our vocabulary of the authors' `word2idx`, whose ids must be 0..n-1, each once."""
  words = [None] * len(word2idx)
  for word, idx in word2idx.items():
    if not isinstance(idx, int) or not 0 <= idx < len(words) or words[idx] is not None:
      raise ValueError(f"{path}: word ids are not 0..{len(words) - 1}, each once (word "
                       f"{word!r} has id {idx!r})")
    words[idx] = word
  try:
    return Vocabulary(words)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def _from_pickle(path: str):
  """The authors' pickled `Vocabulary` (DSRAN, MLASM) as our vocabulary."""
  with open(path, "rb") as f:
    try:
      # Their files are Python 2 pickles: byte strings are UTF-8 words.
      obj = _VocabUnpickler(f, encoding="utf-8").load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: {e}") from None
  word2idx = getattr(obj, "word2idx", None)
  if not isinstance(obj, _AuthorsVocabulary) or not isinstance(word2idx, dict):
    raise ValueError(f"{path}: not an authors' vocabulary (a Vocabulary with word2idx)")
  return _from_word2idx(word2idx, path)


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON: {e}") from None


def _from_scan_json(obj, path: str):
  """SCAN's vocabulary JSON (SGRAF's too); its `idx2word`, when present, must agree
  with `word2idx`."""
  word2idx = obj.get("word2idx") if isinstance(obj, dict) else None
  if not isinstance(word2idx, dict):
    raise ValueError(f"{path}: expected SCAN's vocabulary JSON with a 'word2idx' object")
  vocab = _from_word2idx(word2idx, path)
  idx2word = obj.get("idx2word")
  if isinstance(idx2word, dict):
    words = vocab.idx2word
    for idx, word in idx2word.items():
      if not str(idx).isdigit() or int(idx) >= len(words) or words[int(idx)] != word:
        raise ValueError(f"{path}: idx2word[{idx!r}]={word!r} disagrees with word2idx")
  return vocab


def _is_json(path: str) -> bool:
  """`.json` files, and any file whose first non-blank byte opens a JSON object (a
  pickle never starts with `{`)."""
  if path.endswith(".json"):
    return True
  with open(path, "rb") as f:
    return f.read(64).lstrip()[:1] == b"{"


def load_vocab(path: str):
  """A GRU vocabulary (`core.vocab.Vocabulary`)
  from the authors' `.pkl`, SCAN's vocabulary JSON or a dsran_jax `vocab.json`, ids
  unchanged."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"vocabulary not found: {path}")
  if not _is_json(path):
    return _from_pickle(path)
  obj = _read_json(path)
  if isinstance(obj, dict) and "format" in obj:
    return Vocabulary.load(path)
  return _from_scan_json(obj, path)


def check_vocab_rows(vocab, path: str, rows: int, tensor: str) -> None:
  """Raises ConversionError unless `vocab` (read from `path`) has one word per row of
  the checkpoint's word embedding `tensor`."""
  if len(vocab) != rows:
    raise ConversionError(f"{path} has {len(vocab)} words but the checkpoint's {tensor} "
                          f"has {rows} rows")


def load_checked_vocab(path: str, rows: int, tensor: str):
  """`load_vocab(path)`, checked to have the `rows` words of the checkpoint's
  `tensor`."""
  vocab = load_vocab(path)
  check_vocab_rows(vocab, path, rows, tensor)
  return vocab

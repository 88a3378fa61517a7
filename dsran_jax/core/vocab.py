"""The word vocabulary of the word-id families (DSRAN's GRU build, SCAN, SGRAF, ...): a
contract shared by data loading, the families' pretrained hooks (GloVe rows) and the
checkpoint converters (the authors' vocabularies), so it sits below all of them.
"""
import collections
import json
import os
import re
from typing import Iterable, Sequence

from dsran_jax import atomic, integrity

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_WORDS = (PAD, START, END, UNK)
# Words seen >= 4 times: the VSE++ threshold that produced the authors' shipped vocabularies
# (vocab/f30k_vocab.pkl: 8590 entries). Their vocab.py main() as committed passes 300 and
# keeps the 256 most frequent words, which does not reproduce those files.
DEFAULT_THRESHOLD = 4
_VOCAB_FORMAT = "dsran_jax.vocab/1"

# An approximation of nltk.word_tokenize (Treebank rules) on lower-cased captions: nltk is
# not a dependency. Hyphenated words, a/b, and numbers with , . : stay whole; clitics ('s,
# n't, 're, ...) split off; other punctuation is its own token; double quotes become `` / '';
# a period stays on single letters, abbreviations and numbers ("a.", "u.s.") except at the
# very end; a clitic already split off ('s, 're: pre-tokenised captions) stays one token,
# and '' after a space opens a quote (``) as in nltk. Measured against nltk 3.10's
# NLTKWordTokenizer on 40,070 Flickr30K / COCO captions, 0.1-0.2% of the captions are
# tokenised differently (docs/fidelity.md).
_CLITIC = re.compile(r"(n't|'s|'m|'d|'ll|'re|'ve)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}
_TOKEN = re.compile(
    r"""\d+(?:[.,:]\d+)+                    # 3.5  1,000  10:30
      | (?<!\w)'(?=(?:re|ve|ll|m|t|s|d|n)\b)\w+(?:[-'./]\w+)*(?:\.(?!\.))?
                                         # a clitic already split off: 's 're n't
      | \w+(?:[-'./]\w+)*(?:\.(?!\.))?     # words, hyphenated words, u.s.
      | \.\.\.|--|``|''
      | \S                                 # any other single symbol
    """, re.VERBOSE)


def word_tokenize(text: str) -> list:
  """Lower-cased word tokens of a caption (approximates nltk.word_tokenize)."""
  text = text.lower().strip()
  text = re.sub(r'^"', "`` ", text)
  text = re.sub(r'(?<=[\s(\[{<])"', " `` ", text)
  # nltk opens a quote at '' after a space or bracket, as at " (pre-tokenised captions
  # close quotes with '' after a space: nltk turns those into `` too).
  text = re.sub(r"(?<=[\s(\[{<])''", " `` ", text)
  text = text.replace('"', " '' ")
  toks = _TOKEN.findall(text)
  out = []
  for i, tok in enumerate(toks):
    if len(tok) > 1 and tok.endswith("."):
      stem = tok[:-1]
      # The caption's final period always goes (nltk's final-period rule); inside the
      # text a word's period goes too (nltk's sentence split), but not an initial's,
      # an abbreviation's or a number's ("a.", "u.s.", "no. 3.").
      keep = i < len(toks) - 1 and (len(stem) == 1 or "." in stem or stem[0].isdigit())
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
    """Words seen >= `threshold` times in `texts` (the captions of the splits the
    authors count: `data.vocab_splits`).

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
    """Writes the vocabulary as JSON (`{"format", "words", "checksum"}`; id = position in
    words; the checksum is of the content, `integrity.seal`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_json(path, integrity.seal({"format": _VOCAB_FORMAT,
                                            "words": self.idx2word}),
                      ensure_ascii=False, indent=None)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    """Reads a vocabulary written by `save`, refused (IntegrityError naming `path`) when
    its words differ from the checksum written with them; one written before
    checksums were (no "checksum") is read as it is."""
    with open(path, encoding="utf-8") as f:
      try:
        obj = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON vocabulary: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != _VOCAB_FORMAT:
      raise ValueError(f"{path}: expected a JSON object with format {_VOCAB_FORMAT!r}")
    unknown = sorted(set(obj) - {"format", "words", integrity.SEAL_KEY})
    if unknown:  # e.g. a damaged "checksum" key, which would otherwise go unchecked
      raise ValueError(f"{path}: unknown keys {unknown} in a {_VOCAB_FORMAT} vocabulary")
    return cls(integrity.unseal(obj, path)["words"])

  def encode_one(self, text: str) -> list:
    """`<start> word ids <end>`, not truncated."""
    return [self.word2idx[START]] + [self(w) for w in word_tokenize(text)] + [
        self.word2idx[END]]

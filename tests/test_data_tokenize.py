"""Caption tokenisers: BERT ids as the authors build them, the GRU vocabulary."""
import json
import shutil
import unicodedata

import numpy as np
import pytest

from dsran_jax.data import tokenize
from dsran_jax.default_config import get_base_config

CAPTIONS = [
    "A man in an orange hat starring at something.",
    "Two young, White males are outside near many bushes.",
    "A café's crêpe-maker serves 3.5 crêpes to Zoë!!",
    "  Extra   spaces\tand\ttabs\n",
    "",
    "unaffable xylophonist's (quasi-)hyperparameterization",
    "中文 mixed with english",
    # 40+ wordpieces: loses its [SEP] at max_len 32, as in the authors' loader.
    " ".join(["the dog runs across the grassy field while chasing a red ball"] * 4),
]


def _authors_ids(text, vocab, max_len):
  """The authors' BertTokenizer (basic + greedy WordPiece) and get_text_input, in brief."""

  def is_punct(ch):
    cp = ord(ch)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or
            unicodedata.category(ch).startswith("P"))

  def is_cjk(cp):
    return any(a <= cp <= b for a, b in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))

  chars = []
  for ch in text:
    if ord(ch) in (0, 0xFFFD) or (unicodedata.category(ch).startswith("C")
                                  and ch not in "\t\n\r"):
      continue
    chars.append(f" {ch} " if is_cjk(ord(ch)) else " " if ch.isspace() else ch)
  words = []
  for tok in "".join(chars).split():
    tok = "".join(c for c in unicodedata.normalize("NFD", tok.lower())
                  if unicodedata.category(c) != "Mn")
    cur = ""
    for ch in tok:
      if is_punct(ch):
        words += [cur, ch] if cur else [ch]
        cur = ""
      else:
        cur += ch
    if cur:
      words.append(cur)
  pieces = []
  for w in words:
    start, sub = 0, []
    while start < len(w):
      end = len(w)
      while end > start and (("##" if start else "") + w[start:end]) not in vocab:
        end -= 1
      if end == start:
        sub = ["[UNK]"]
        break
      sub.append(("##" if start else "") + w[start:end])
      start = end
    pieces += sub if len(w) <= 100 else ["[UNK]"]
  ids = [vocab[t] for t in ["[CLS]"] + pieces + ["[SEP]"]]
  return (ids + [0] * max_len)[:max_len]


@pytest.fixture(scope="module")
def vocab(minilm_dir):
  with open(f"{minilm_dir}/vocab.txt", encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


@pytest.mark.parametrize("max_len", [32, 12])
def test_bert_ids_match_the_authors(minilm_dir, vocab, max_len):
  tok = tokenize.BertTokenizer(minilm_dir, max_len)
  ids, mask = tok.encode(CAPTIONS)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(CAPTIONS), max_len)
  for row, text in zip(ids, CAPTIONS):
    assert row.tolist() == _authors_ids(text, vocab, max_len), text
  np.testing.assert_array_equal(mask, (ids != 0).astype(np.int32))
  long_row = ids[-1]
  assert long_row[0] == vocab["[CLS]"] and vocab["[SEP]"] not in long_row.tolist()
  assert ids[4].tolist()[:3] == [vocab["[CLS]"], vocab["[SEP]"], 0]  # empty caption


def test_bert_vocab_txt_only_dir(minilm_dir, tmp_path):
  for f in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(f"{minilm_dir}/{f}", tmp_path / f)
  a = tokenize.BertTokenizer(minilm_dir, 32).encode(CAPTIONS)
  b = tokenize.BertTokenizer(str(tmp_path), 32).encode(CAPTIONS)
  np.testing.assert_array_equal(a[0], b[0])
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  cased = tokenize.BertTokenizer(str(tmp_path), 32).encode(["A Man"])[0]
  assert cased[0, 1] == 100  # "A" is not in the uncased vocabulary: [UNK]


def test_make_tokenizer_bert(minilm_dir):
  c = get_base_config()
  c.model.dsran.bert_path, c.data.max_len = minilm_dir, 16
  ids, _ = tokenize.make_tokenizer(c).encode(["a dog"])
  # As wide as the longest caption; the reference build pads to exactly the cut.
  assert ids.shape == (1, 4) and ids[0, 0] == 101
  c.model.dsran.text_padding = "reference"
  ids, _ = tokenize.make_tokenizer(c).encode(["a dog"])
  assert ids.shape == (1, 16) and ids[0, 0] == 101


def test_word_tokenize_follows_treebank_rules():
  assert tokenize.word_tokenize("A man's dog isn't running.") == [
      "a", "man", "'s", "dog", "is", "n't", "running", "."]
  assert tokenize.word_tokenize('Two-year-old boy in a t-shirt, says "hi" at 10:30.') == [
      "two-year-old", "boy", "in", "a", "t-shirt", ",", "says", "``", "hi", "''", "at",
      "10:30", "."]
  assert tokenize.word_tokenize("The players' jerseys... 1,000 fans!") == [
      "the", "players", "'", "jerseys", "...", "1,000", "fans", "!"]


def test_gru_vocabulary_from_train_only(tmp_path):
  train = ["a dog runs on the grass ."] * 4 + ["a cat sleeps ."] * 3
  test_only = ["zebra zebra zebra zebra zebra"]
  calls = []

  def train_texts():
    calls.append(1)
    return train

  c = get_base_config()
  c.model.dsran.text_encoder, c.data.max_len = "gru", 6
  tok = tokenize.make_tokenizer(c, str(tmp_path), train_texts)
  vocab = tok.vocab
  assert vocab.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
  assert vocab.idx2word[4:6] == [".", "a"]  # most frequent first (7 times), then by word
  assert "dog" in vocab.word2idx and "cat" not in vocab.word2idx  # threshold 4
  assert "zebra" not in vocab.word2idx
  ids, mask = tok.encode(["A dog sleeps", "a dog runs on the grass ."] + test_only)
  unk = vocab("<unk>")
  assert ids[0].tolist() == [1, vocab("a"), vocab("dog"), unk, 2, 0]
  assert ids[1].tolist() == [1, vocab("a"), vocab("dog"), vocab("runs"), vocab("on"),
                             vocab("the")]  # cut at max_len: no <end>
  assert ids[2].tolist() == [1, unk, unk, unk, unk, unk]
  np.testing.assert_array_equal(mask, (ids != 0).astype(np.int32))
  # Saved as JSON; the next run loads it instead of rebuilding.
  saved = json.loads((tmp_path / "vocab.json").read_text())
  assert saved["words"] == vocab.idx2word
  again = tokenize.make_tokenizer(c, str(tmp_path), train_texts)
  assert calls == [1] and again.vocab.idx2word == vocab.idx2word
  # data.vocab_file overrides the location.
  c.data.vocab_file = str(tmp_path / "elsewhere" / "v.json")
  tokenize.make_tokenizer(c, None, train_texts)
  assert tokenize.Vocabulary.load(c.data.vocab_file).idx2word == vocab.idx2word


def test_no_vocabulary_is_built_beside_existing_checkpoints(tmp_path):
  # A converted workdir without the authors' vocabulary: a vocabulary built from the
  # training captions would silently give the embedding the wrong word ids.
  c = get_base_config()
  c.model.dsran.text_encoder = "gru"
  (tmp_path / "checkpoints" / "best").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"has checkpoints but no word vocabulary at .*"
                     r"vocab\.json.*--vocab="):
    tokenize.make_tokenizer(c, str(tmp_path), lambda: ["a dog"] * 5)
  assert not (tmp_path / "vocab.json").exists()

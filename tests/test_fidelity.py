"""The recipes follow the authors' data pipelines where the forward parity tests do not
look (docs/fidelity.md): GloVe lookups as their `init_weights`, the departure a run
without GloVe reports, the dev split of model selection, the splits a vocabulary
counts, and the word tokeniser on the captions nltk splits differently."""
import json
import logging

import pytest

from dsran_jax import data, models, train
from dsran_jax.core.vocab import word_tokenize
from dsran_jax.data.raw import RawSplit
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.common.glove import read_glove, stripped_form

# ------------------------------------------------------------------------------- GloVe


def _glove_file(path, rows):
  path.write_text("".join(f"{w} {' '.join(str(x) for x in v)}\n" for w, v in rows),
                  encoding="utf-8")
  return str(path)


def test_glove_prefers_the_exact_word_then_the_stripped_form(tmp_path):
  """Whatever the file's order: `t-shirt` takes `t-shirt`'s vector when the file has
  it, else `tshirt`'s; `o'clock` falls back to `oclock`, `a/b` to `a`; a token listed
  twice keeps its last vector; a header line is skipped."""
  path = _glove_file(tmp_path / "g.txt", [
      ("2", [3]),                      # a "<count> <dim>" header
      ("tshirt", [1, 1, 1]), ("t-shirt", [2, 2, 2]), ("oclock", [3, 3, 3]),
      ("up", [4, 4, 4]), ("dog", [5, 5, 5]), ("dog", [6, 6, 6])])
  word2idx = {"<pad>": 0, "t-shirt": 1, "o'clock": 2, "up/down": 3, "dog": 4, "cat": 5,
              "tshirt": 6}
  rows, missing = read_glove(path, word2idx, 3)
  assert {i: v.tolist() for i, v in rows.items()} == {
      1: [2, 2, 2], 2: [3, 3, 3], 3: [4, 4, 4], 4: [6, 6, 6], 6: [1, 1, 1]}
  assert missing == 2  # <pad>, cat
  # Without the exact form, the stripped one.
  path = _glove_file(tmp_path / "h.txt", [("tshirt", [1, 1, 1])])
  rows, _ = read_glove(path, {"t-shirt": 0}, 3)
  assert rows[0].tolist() == [1, 1, 1]
  assert stripped_form("u.s.-made/x") == "usmade"


def test_a_bad_glove_vector_names_its_line(tmp_path):
  path = _glove_file(tmp_path / "g.txt", [("cat", [1, 2, 3]), ("dog", [1, "x", 3])])
  with pytest.raises(ValueError, match=r"g\.txt:2: the vector of 'dog' is not 3 numbers"):
    read_glove(path, {"dog": 0}, 3)
  with pytest.raises(ValueError, match=r"g\.txt:1: the vector of 'cat' is not 4 numbers"):
    read_glove(path, {"cat": 0}, 4)


# ------------------------------------------------------------------------- departures


@pytest.mark.parametrize("family,departs", [("dsran,text_encoder=gru", True),
                                            ("mlasm", True), ("dsran", False),
                                            ("scan", False)])
def test_glove_recipes_report_a_missing_glove_file(family, departs):
  c = recipe_config("f30k", family)
  notes = models.departures(c)
  assert bool(notes) == departs
  if departs:
    assert "model.glove_path is empty" in notes[0] and "glove.840B.300d" in notes[0]
    c.model.glove_path = "/data/glove.840B.300d.txt"
    assert models.departures(c) == ()


def test_a_run_says_and_records_its_departure(tmp_path, monkeypatch, caplog):
  """Before any data is read, the run logs the departure and config.json holds it."""
  c = recipe_config("f30k", "mlasm")
  c.data.format, c.data.name = "synthetic", "synthetic"
  c.data.num_regions = c.data.synthetic.num_regions = 4
  c.model.mlasm.global_dim = c.model.img_dim = c.data.img_dim = 32
  c.train.batch_size = 8
  seen = {}

  class Stop(Exception):
    pass

  def build(config, workdir):
    with open(tmp_path / "wd" / "config.json") as f:
      seen.update(json.load(f))
    raise Stop

  monkeypatch.setattr(train, "build", build)
  with caplog.at_level(logging.WARNING), pytest.raises(Stop):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert "model.glove_path is empty" in seen["train"]["departures"]
  assert any("departs from the authors' recipe: model.glove_path is empty" in r.getMessage()
             for r in caplog.records)


# ------------------------------------------------------------------------ dev and vocab


@pytest.mark.parametrize("dataset,family,dev", [
    ("f30k", "dsran", 0), ("f30k", "dsran,text_encoder=gru", 0), ("f30k", "mlasm", 0),
    ("coco", "dsran", 1000), ("coco", "mlasm", 1000), ("f30k", "scan", 1000),
    ("coco", "scan", 1000), ("f30k", "sgraf", 1000), ("f30k", "kidrr", 1000),
    ("f30k", "bssan", 1000)])
def test_recipes_select_on_the_dev_images_their_authors_use(dataset, family, dev):
  assert recipe_config(dataset, family).eval.max_dev_images == dev


@pytest.mark.parametrize("family,splits", [("dsran,text_encoder=gru", "all"),
                                           ("mlasm", "all"), ("scan", "train+dev"),
                                           ("sgraf", "train+dev"), ("bssan", "train+dev")])
def test_recipes_count_the_vocabulary_splits_their_authors_count(family, splits):
  assert recipe_config("f30k", family).data.vocab_splits == splits


def _synthetic(num_dev):
  c = get_base_config()
  c.model.name = "scan"
  c.data.format = "synthetic"
  c.data.synthetic.num_train_images = 10
  c.data.synthetic.num_dev_images = num_dev
  c.data.synthetic.num_test_images = 10
  return c


def test_dev_split_is_whole_unless_the_recipe_cuts_it():
  c = _synthetic(1014)
  assert data.load_dev_split(c).num_images == 1014  # 0: every image (DSRAN, MLASM)
  c.eval.max_dev_images = 1000
  dev = data.load_dev_split(c)
  assert dev.num_images == 1000 and dev.num_captions == 5000  # SCAN's 5000 captions


def test_vocabulary_counts_the_configured_splits(monkeypatch):
  """Words of dev or test captions enter the vocabulary only when the switch counts
  their split; a split already read is not read again."""
  texts = {"train": ["a dog"] * 4, "dev": ["a cat"] * 4, "test": ["a cow"] * 4}
  reads = []

  def read_raw_split(config, name):
    reads.append(name)
    return RawSplit(image_ids=["0"], texts=texts[name], captions_per_image=4,
                    read_images=lambda idx: {})

  monkeypatch.setattr(data, "read_raw_split", read_raw_split)
  c = _synthetic(10)
  for splits, words in (("train", {"dog"}), ("train+dev", {"dog", "cat"}),
                        ("all", {"dog", "cat", "cow"})):
    c.data.vocab_splits = splits
    vocab = data.gru_vocabulary(c)
    assert {"dog", "cat", "cow"} & set(vocab.word2idx) == words, splits
  reads.clear()
  c.data.vocab_splits = "train+dev"
  split = data.load_split(c, "dev")
  assert reads == ["dev", "train"]
  assert split.input_ids[0, :4].tolist() == [1, vocab.word2idx["a"],
                                             data.gru_vocabulary(c).word2idx["cat"], 2]


# ---------------------------------------------------------------------------- tokeniser


@pytest.mark.parametrize("caption,tokens", [
    # Pre-tokenised captions (the precomp releases): a clitic split off stays one token.
    ("Two cats on someone 's sneakers .", ["two", "cats", "on", "someone", "'s", "sneakers",
                                           "."]),
    ("where they 're going", ["where", "they", "'re", "going"]),
    ("a 't-ball ' stand", ["a", "'t-ball", "'", "stand"]),
    # nltk opens a quote at '' after a space.
    ("a `` book bus '' is here", ["a", "``", "book", "bus", "``", "is", "here"]),
    # Raw captions: clitics split, a number's final period goes, a word's inside goes.
    ("The dog's bone.", ["the", "dog", "'s", "bone", "."]),
    ("He can't see route 1.", ["he", "ca", "n't", "see", "route", "1", "."]),
    ("A bird on a branch. It is yellow.", ["a", "bird", "on", "a", "branch", ".", "it",
                                            "is", "yellow", "."]),
    ('A sign that says "stop" in the U.S. today', ["a", "sign", "that", "says", "``", "stop",
                                                  "''", "in", "the", "u.s.", "today"]),
])
def test_word_tokenize_splits_as_nltk(caption, tokens):
  assert word_tokenize(caption) == tokens

"""`inference.load` on converted workdirs: parity with PyTorch, chunking, tokenizers, errors."""
import numpy as np
import pytest

from dsran_jax import evaluation
from dsran_jax import inference
from dsran_jax.data.tokenize import Vocabulary, word_tokenize
from dsran_jax.tools import convert_torch
# The PyTorch model (tests/torchref/dsran.py) runs in the reference process; the helpers
# that have it save checkpoints live with the converter's tests.
from test_convert_torch import (E, GRID, IMG, POS, R, TOL, bert_ids, image_inputs, maxdiff,
                                pad_captions, save_bert_checkpoint, save_gru_checkpoint,
                                tiny_bert_config)

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the",
              "grass", "cat", "sits", "mat", "##s", "."]


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, torch_ref):
  """(reference checkpoint path, workdir) of a converted K=2 BERT build with a tiny
  WordPiece vocab."""
  tmp = tmp_path_factory.mktemp("bert")
  ckpt = save_bert_checkpoint(torch_ref, tmp / "model_best.pth.tar", 2, tiny_bert_config(),
                              torch_seed=3, init_seed=3)
  bert_dir = tmp / "bert"
  bert_dir.mkdir()
  words = BERT_WORDS + [f"w{i}" for i in range(60 - len(BERT_WORDS))]
  (bert_dir / "vocab.txt").write_text("\n".join(words) + "\n")
  convert_torch.convert_checkpoint(ckpt, str(tmp / "wd"), bert_path=str(bert_dir))
  return ckpt, str(tmp / "wd")


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory, torch_ref):
  """(reference checkpoint path, workdir, vocabulary) of a converted K=2 GRU build, eval
  batches of 4."""
  tmp = tmp_path_factory.mktemp("gru")
  ckpt = save_gru_checkpoint(torch_ref, tmp / "model_best.pth.tar", 2, vocab=50, word_dim=12,
                             torch_seed=4, init_seed=4, batch_size=4)
  vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the",
                      "grass", "."] + [f"w{i}" for i in range(39)])
  vocab.save(str(tmp / "vocab.json"))
  convert_torch.convert_checkpoint(ckpt, str(tmp / "wd"), vocab=str(tmp / "vocab.json"))
  return ckpt, str(tmp / "wd"), vocab


def test_bert_workdir_matches_torch_and_chunks(bert_run, torch_ref):
  ckpt, workdir = bert_run
  one_shot = inference.load(workdir)
  chunked = inference.load(workdir, batch_size=4)
  assert one_shot.model.config.K == 2 and one_shot.config.model.dsran.text_encoder == "bert"
  assert set(one_shot.variables) == {"params", "batch_stats"}

  grid, regions, pos = image_inputs(0, b=11)  # 11 rows: chunks of 4, 4 and a padded 3
  ids = bert_ids(0, b=11)
  want_img = torch_ref("dsran.embed_images", ckpt_path=ckpt, grid=grid, regions=regions, pos=pos)
  want_txt = torch_ref("dsran.bert_embed_texts", ckpt_path=ckpt, ids=ids)
  img = one_shot.encode_images(grid=grid, regions=regions, region_pos=pos)
  txt = one_shot.encode_texts(input_ids=ids)
  print(f"inference BERT: max|diff| image {maxdiff(img, want_img):.2e}, "
        f"text {maxdiff(txt, want_txt):.2e}")
  assert img.shape == (11, E) and img.dtype == np.float32
  assert maxdiff(img, want_img) <= TOL and maxdiff(txt, want_txt) <= TOL
  assert maxdiff(chunked.encode_images(grid=grid, regions=regions, region_pos=pos), img) <= 1e-6
  assert maxdiff(chunked.encode_texts(input_ids=ids), txt) <= 1e-6
  # Reference mode ignores the region mask (the authors attend to every region).
  mask = np.ones((11, R), bool)
  mask[:, -2:] = False
  assert maxdiff(one_shot.encode_images(grid, regions, pos, region_mask=mask), img) <= 1e-6
  assert one_shot.encode_texts(input_ids=np.zeros((0, 32), np.int32)).shape == (0, E)


def test_bert_texts_use_the_workdir_tokenizer(bert_run):
  _, workdir = bert_run
  enc = inference.load(workdir)
  texts = ["A dog runs on the grass.", "a cat sits on the mats"]
  ids, mask = enc.tokenize(texts)
  assert ids.shape == (2, 32)
  assert list(ids[0, :8]) == [2, 5, 6, 7, 8, 9, 10, 15] and ids[0, 8] == 3  # [CLS] ... [SEP]
  assert list(ids[1, 5:8]) == [9, 13, 14]  # mats -> mat ##s
  np.testing.assert_array_equal(enc.encode_texts(texts), enc.encode_texts(input_ids=ids))


def test_gru_workdir_matches_torch_in_author_batches(gru_run, torch_ref):
  ckpt, workdir, vocab = gru_run
  enc = inference.load(workdir, batch_size=3)  # GRU reference groups follow eval.batch_size
  assert enc.config.eval.batch_size == 4
  texts = ["a dog runs on the grass .", "the dog", "a zebra on the grass", "grass",
           "the dog runs", "a a a a a a a a a a a a a a", "dog ."]
  caps = [np.array(vocab.encode_one(t)) for t in texts]
  want = torch_ref("dsran.gru_embed_texts", ckpt_path=ckpt, batches=[caps[i:i + 4] for i in (0, 4)])
  got = enc.encode_texts(texts)
  print(f"inference GRU: max|diff| text {maxdiff(got, want):.2e}")
  assert maxdiff(got, want) <= TOL
  assert maxdiff(enc.encode_texts(input_ids=pad_captions(caps, 20)), want) <= TOL
  assert word_tokenize("A dog.") == ["a", "dog", "."]

  grid, regions, pos = image_inputs(5, b=7)
  want_img = torch_ref("dsran.embed_images", ckpt_path=ckpt, grid=grid, regions=regions)
  assert maxdiff(enc.encode_images(grid=grid, regions=regions), want_img) <= TOL


def test_batch_callables_work_with_the_scorer(gru_run):
  _, workdir, _ = gru_run
  enc = inference.load(workdir)
  grid, regions, pos = image_inputs(6, b=4)
  ids = pad_captions([np.array([1, 5, 6, 2]), np.array([1, 7, 2])], 32)
  scorer = evaluation.EmbeddingScorer(enc.image_fn, enc.text_fn)
  img = np.asarray(scorer.encode_images({"grid": grid, "regions": regions, "region_pos": pos,
                                         "region_mask": np.ones((4, R), bool),
                                         "valid": np.ones(4, bool)}))
  txt = np.asarray(scorer.encode_texts({"input_ids": ids, "attention_mask": (ids > 0) * 1}))
  assert maxdiff(img, enc.encode_images(grid=grid, regions=regions)) <= 1e-6
  assert maxdiff(txt, enc.encode_texts(input_ids=ids)) <= 1e-6
  assert np.asarray(scorer.score(img, txt)).shape == (4, 2)


def test_bad_inputs_name_the_argument(bert_run):
  _, workdir = bert_run
  enc = inference.load(workdir)
  grid, regions, pos = image_inputs(1, b=2)
  cases = [
      (dict(grid=grid, regions=regions[0]), r"regions must have rank 3, got shape \(5, 40\)"),
      (dict(grid=grid, regions=regions[..., :8]),
       rf"regions has shape \(2, 5, 8\), expected \(\?, \?, {IMG}\)"),
      (dict(grid=grid[:1], regions=regions),
       rf"grid has shape \(1, {GRID}, {IMG}\), expected \(2, {GRID}, {IMG}\)"),
      (dict(regions=regions), r"needs grid"),
      (dict(grid=grid, regions=regions, region_pos=pos[..., :6]),
       rf"region_pos has shape \(2, 5, 6\), expected \(2, 5, {POS}\)"),
      (dict(grid=grid, regions=regions, region_mask=np.ones((2, 4))),
       r"region_mask has shape \(2, 4\), expected \(2, 5\)"),
      # Values that would give a NaN or an input-free unit-norm embedding:
      (dict(grid=grid, regions=np.where(np.arange(2)[:, None, None] == 1, np.nan, regions)),
       r"regions holds 200 NaN/Inf values, in image rows \[1\]"),
      (dict(grid=np.full_like(grid, np.inf), regions=regions), r"grid holds .* rows \[0, 1\]"),
      (dict(grid=grid, regions=regions, region_mask=np.array([[1, 1, 0, 0, 0], [0] * 5], bool)),
       r"region_mask is all False in image rows \[1\]"),
      (dict(grid=grid, regions=regions[:, :0]), r"regions has shape \(2, 0, 40\): every image"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      enc.encode_images(**kwargs)
  ids = bert_ids(1, b=2)
  text_cases = [
      (dict(input_ids=ids[0]), r"input_ids must have rank 2"),
      (dict(input_ids=ids, attention_mask=np.ones((2, 5))),
       r"attention_mask has shape \(2, 5\), expected \(2, 32\)"),
      (dict(input_ids=ids + 100), r"input_ids must be in \[0, 60\)"),
      (dict(input_ids=np.ones((2, 33), np.int32)), r"takes at most 32 tokens"),
      (dict(), r"exactly one of texts or input_ids"),
  ]
  for kwargs, message in text_cases:
    with pytest.raises(ValueError, match=message):
      enc.encode_texts(**kwargs)
  with pytest.raises(TypeError, match="list of strings"):
    enc.encode_texts("a dog")


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    inference.load(str(tmp_path))

"""Caption lengths: no caption is cut where the authors keep it whole (every GRU loader
of theirs pads a batch to its longest caption; DSRAN's BERT build alone cuts at 32).

- Converted SCAN and DSRAN-GRU (reference padding) workdirs, evaluated on precomp files
  whose captions run to 60 words, write the authors' similarity matrix for every
  caption: PyTorch references written from their evaluation code (tests/torchref/),
  run on the full captions.
- The inference matcher scores a long caption exactly as the evaluation does.
- Training batches are as wide as the global batch's longest caption, rounded up to
  `data.caption_bucket` (the same width on every host), and a cut a user sets is
  reported (how many, the longest).
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from _xla_flags import subprocess_env

from dsran_jax import data as data_lib
from dsran_jax import default_config, models
from dsran_jax.core.text_policy import bucket_width
from dsran_jax.data import base, pipeline, tokenize
from dsran_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
LONGEST_WORDS = 60


# ------------------------------------------------------------------------ fixtures


def _vocab_json(path, words, rng):
  """SCAN's vocabulary JSON (ids in dict order, not sorted), as their vocab.py writes."""
  ids_of = dict(zip(["<pad>", "<start>", "<end>", "<unk>"], range(4)))
  ids_of.update(zip(words, 4 + rng.permutation(len(words))))
  ids_of = {w: int(i) for w, i in ids_of.items()}
  path.write_text(json.dumps({"word2idx": ids_of, "idx": len(ids_of),
                              "idx2word": {str(i): w for w, i in ids_of.items()}}))
  return ids_of


def _long_captions(rng, words, n):
  """n captions of 1..60 words: most short, several past the old 32-token cut, one of
  exactly 60 words; one holds an unknown word."""
  lengths = rng.integers(1, 14, n)
  lengths[rng.choice(n, 4, replace=False)] = rng.integers(31, LONGEST_WORDS, 4)
  lengths[n // 2] = LONGEST_WORDS
  texts = [" ".join(rng.choice(words, k)) for k in lengths]
  texts[1] += " zebra"  # not in the vocabulary: <unk>
  return texts


def _their_ids(texts, ids_of):
  """`<start> ids <end>` as their PrecompDataset builds them (never cut)."""
  return [np.array([1] + [ids_of.get(w, 3) for w in t.split()] + [2], np.int64)
          for t in texts]


def _padded(rows):
  lens = np.array([len(r) for r in rows])
  ids = np.zeros((len(rows), lens.max()), np.int64)
  for j, row in enumerate(rows):
    ids[j, :len(row)] = row
  return ids, lens


def _write_precomp(root, images, texts, grid=None):
  os.makedirs(root, exist_ok=True)
  np.save(os.path.join(root, "test_ims.npy"), images)
  with open(os.path.join(root, "test_caps.txt"), "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in texts))
  if grid is not None:
    np.save(os.path.join(root, "test_grid.npy"), grid)


def _main_eval(workdir, root):
  """`python -m dsran_jax.main --mode=eval --save_sims` on `workdir`, data under `root`."""
  proc = subprocess.run(
      [sys.executable, "-m", "dsran_jax.main", "--mode=eval", f"--workdir={workdir}",
       "--save_sims", f"--config.data.root={root}"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


# ---------------------------------------------------------------- SCAN, converted


def test_converted_scan_workdir_evaluates_every_caption_whole(torch_ref, tmp_path):
  """tools.convert_torch on their checkpoint -> `--mode=eval --save_sims` on precomp
  files with captions of up to 60 words -> sims_test.npy equals their evalrank matrix
  on the full captions; the matcher scores the longest caption as the evaluation did."""
  from dsran_jax import inference  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  vocab = 30
  words = [f"w{i}" for i in range(vocab - 4)]
  ids_of = _vocab_json(tmp_path / "f30k_precomp_vocab.json", words, rng)
  n_img, img_dim = 4, 12
  texts = _long_captions(rng, words, 5 * n_img)
  images = rng.standard_normal((n_img, 5, img_dim)).astype(np.float32)
  root = str(tmp_path / "precomp")
  _write_precomp(root, images, texts)
  ckpt = str(tmp_path / "model_best.pth.tar")
  opt = {"embed_size": 16, "word_dim": 8, "img_dim": img_dim, "cross_attn": "t2i",
         "agg_func": "LogSumExp", "bi_gru": True, "lambda_softmax": 9.0, "lambda_lse": 6.0,
         "data_name": "f30k_precomp"}
  torch_ref("scan.save_checkpoint", path=ckpt, opt=opt, vocab_size=vocab, seed=4)
  their_ids, lens = _padded(_their_ids(texts, ids_of))
  assert lens.max() == LONGEST_WORDS + 2 and (lens > 32).sum() >= 3
  want = torch_ref("scan.sims", path=ckpt, images=images, captions=their_ids,
                   lengths=lens, shard_size=8)
  workdir = str(tmp_path / "workdir")
  convert_torch.convert_checkpoint(ckpt, workdir, vocab=str(tmp_path / "f30k_precomp_vocab.json"))
  config = Workdir(workdir).load_config()
  assert models.caption_cap(config) == 0  # SCAN's authors never cut

  _main_eval(workdir, root)
  got = np.load(os.path.join(workdir, "sims_test.npy"))
  assert got.shape == want.shape == (n_img, 5 * n_img)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  assert results["num_captions"] == 5 * n_img
  assert results["caption_lengths"] == {"count": 5 * n_img, "longest": LONGEST_WORDS + 2,
                                        "cap": 0, "cut": 0, "width": LONGEST_WORDS + 2}

  # The matcher, on the raw texts (the 60-word caption among them), gives the same
  # scores: it tokenises and cuts exactly as the evaluation does.
  matcher = inference.load(workdir)
  ids, _ = matcher.tokenize(texts)
  np.testing.assert_array_equal(ids, their_ids)
  longest = int(np.argmax(lens))
  one = matcher.score(matcher.encode_images(regions=images),
                      matcher.encode_texts([texts[longest]]))
  np.testing.assert_allclose(one[:, 0], got[:, longest], atol=TOL, rtol=0)


# ------------------------------------------------------- DSRAN-GRU, reference padding


def test_converted_dsran_gru_reference_padding_evaluates_every_caption_whole(
    torch_ref, tmp_path):
  """A converted DSRAN GRU-build workdir (reference padding: the text graph spans its eval
  batch's longest caption) evaluated on 60-word captions equals their eval: batches of
  their opt.batch_size in order, each padded to its longest caption, nothing cut."""
  from test_convert_torch import GRID, IMG, save_gru_checkpoint  # pylint: disable=g-import-not-at-top

  from dsran_jax import evaluation, inference  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  vocab = 50
  words = [f"w{i}" for i in range(vocab - 4)]
  ids_of = _vocab_json(tmp_path / "vocab.json", words, rng)
  n_img, batch = 3, 4
  texts = _long_captions(rng, words, 5 * n_img)
  grid = rng.standard_normal((n_img, GRID, IMG)).astype(np.float32)
  regions = rng.standard_normal((n_img, 5, IMG)).astype(np.float32)
  root = str(tmp_path / "precomp")
  _write_precomp(root, regions, texts, grid=grid)
  ckpt = save_gru_checkpoint(torch_ref, tmp_path / "model_best.pth.tar", 2, vocab=vocab,
                             word_dim=12, torch_seed=7, init_seed=9, batch_size=batch)
  rows = _their_ids(texts, ids_of)
  assert max(len(r) for r in rows) == LONGEST_WORDS + 2
  want_img = torch_ref("dsran.embed_images", ckpt_path=ckpt, grid=grid, regions=regions)
  want_txt = torch_ref("dsran.gru_embed_texts", ckpt_path=ckpt,
                       batches=[rows[i:i + batch] for i in range(0, len(rows), batch)])
  want = want_img @ want_txt.T

  workdir = str(tmp_path / "workdir")
  convert_torch.convert_checkpoint(ckpt, workdir, data_format="precomp",
                                   vocab=str(tmp_path / "vocab.json"))
  config = Workdir(workdir).load_config({"data.root": root})
  assert config.model.dsran.text_padding == "reference" and config.eval.batch_size == batch
  assert models.caption_cap(config) == 0
  evaluation.evaluate_workdir(workdir, config, save_sims=True)
  got = np.load(os.path.join(workdir, "sims_test.npy"))
  assert got.shape == (n_img, 5 * n_img)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  # Cutting at the old 32 would change every caption of a batch holding a longer one.
  cut = [r[:32] for r in rows]
  cut_txt = torch_ref("dsran.gru_embed_texts", ckpt_path=ckpt,
                      batches=[cut[i:i + batch] for i in range(0, len(cut), batch)])
  assert np.abs(want_img @ cut_txt.T - want).max() > 10 * TOL

  # The matcher groups captions as the eval loader did: the same scores.
  matcher = inference.load(workdir)
  txt = matcher.encode_texts(texts)
  np.testing.assert_allclose(matcher.score(matcher.encode_images(grid=grid, regions=regions),
                                           txt), got, atol=TOL, rtol=0)


# ---------------------------------------------------------------- training widths


def _split(lengths, cpi=1, name="train"):
  n = len(lengths)
  width = int(max(lengths))
  ids = np.where(np.arange(width)[None] < np.asarray(lengths)[:, None],
                 np.arange(n)[:, None] + 10, 0).astype(np.int32)

  def images(idx):
    return {"regions": np.ones((len(idx), 2, 4), np.float32) * idx[:, None, None],
            "region_pos": np.zeros((len(idx), 2, 1607), np.float32),
            "region_mask": np.ones((len(idx), 2), bool)}

  return base.Split(name=name, image_ids=[str(i) for i in range(n // cpi)],
                    texts=[f"c{i}" for i in range(n)], input_ids=ids,
                    attention_mask=(ids > 0).astype(np.int32), captions_per_image=cpi,
                    read_images=images)


def _train_config(batch_size=8, bucket=8):
  c = default_config.get_base_config()
  c.model.name = "scan"
  c.train.batch_size = batch_size
  c.data.caption_bucket = bucket
  return c


def test_bucket_width():
  assert [bucket_width(n, 8) for n in (1, 7, 8, 9, 62)] == [8, 8, 8, 16, 64]
  assert bucket_width(62, 8, limit=62) == 62 and bucket_width(5, 8, limit=6) == 6
  assert bucket_width(0, 4) == 4


def test_train_batches_are_as_wide_as_the_global_batch_longest_caption():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 14, 96)
  lengths[rng.choice(96, 5, replace=False)] = [33, 40, 47, 55, 62]
  split = _split(lengths)
  config = _train_config()
  steps = 2 * pipeline.steps_per_epoch(split, config)
  whole = list(_take(pipeline.train_batches(split, config, process_index=0,
                                            process_count=1), steps))
  halves = [list(_take(pipeline.train_batches(split, config, process_index=p,
                                              process_count=2), steps)) for p in range(2)]
  widths = set()
  for s, b in enumerate(whole):
    longest = int(lengths[b["caption_index"]].max())
    assert b["input_ids"].shape[1] == bucket_width(longest, 8, 62)
    # Nothing cut: every caption keeps all its tokens.
    np.testing.assert_array_equal(b["attention_mask"].sum(1), lengths[b["caption_index"]])
    for h in halves:  # each host pads its half to the global batch's width
      assert h[s]["input_ids"].shape == (4, b["input_ids"].shape[1])
    np.testing.assert_array_equal(
        np.concatenate([h[s]["input_ids"] for h in halves]), b["input_ids"])
    widths.add(b["input_ids"].shape[1])
  assert widths <= set(pipeline.train_widths(split, config))
  assert pipeline.train_widths(split, config) == (8, 16, 24, 32, 40, 48, 56, 62)
  assert len(widths) > 1


def test_split_captions_never_cuts_a_batch():
  split = _split([3, 9, 5])
  assert split.captions([0, 2], 5)["input_ids"].shape == (2, 5)
  with pytest.raises(ValueError, match="captions of up to 9 tokens cannot be given 8"):
    split.captions([1], 8)


def test_a_model_that_attends_to_padding_gets_the_cut_exactly():
  split = _split([3, 5, 9, 32] * 4)
  config = _train_config(batch_size=4)
  config.model.name = "dsran"
  config.model.dsran.text_padding = "reference"  # the BERT build: their 32 always
  assert models.pads_to_cap(config) and models.caption_cap(config) == 32
  assert pipeline.train_widths(split, config) == (32,)


def _take(it, n):
  with it:
    for _ in range(n):
      yield next(it)


# ---------------------------------------------------------------- the cap is reported


def test_a_cap_the_user_sets_is_reported(tmp_path, caplog):
  rng = np.random.default_rng(3)
  root = str(tmp_path / "precomp")
  texts = [" ".join(["a"] * k) for k in (2, 4, 9, 3, 12, 1, 5, 2, 6, 3)]
  _write_precomp(root, rng.standard_normal((2, 3, 8)).astype(np.float32), texts)
  os.rename(os.path.join(root, "test_caps.txt"), os.path.join(root, "train_caps.txt"))
  os.rename(os.path.join(root, "test_ims.npy"), os.path.join(root, "train_ims.npy"))
  c = default_config.get_base_config()
  c.model.name = "scan"
  c.data.format, c.data.root, c.data.img_dim = "precomp", root, 8
  with caplog.at_level(logging.INFO):
    whole = data_lib.load_split(c, "train", str(tmp_path / "wd"))
  assert whole.input_ids.shape == (10, 14) and whole.caption_lengths.cut == 0
  assert "every caption whole" in caplog.text
  caplog.clear()
  c.data.max_len = 6
  with caplog.at_level(logging.WARNING):
    cut = data_lib.load_split(c, "train", str(tmp_path / "wd"))
  assert cut.input_ids.shape == (10, 6)
  assert cut.caption_lengths == tokenize.CaptionLengths(count=10, longest=14, cap=6, cut=4,
                                                        width=6)
  assert "cut at 6 tokens, 4 of 10 captions shortened (the longest has 14 tokens)" in (
      caplog.text)


def test_dsran_bert_keeps_the_authors_cut_and_reports_it(minilm_dir):
  c = default_config.get_base_config()
  c.model.dsran.bert_path = minilm_dir
  assert c.data.max_len == -1 and models.caption_cap(c) == 32  # data_bert.py's 32
  long_text = " ".join(["dog"] * 40)
  ids, _, lengths = tokenize.make_tokenizer(c).encode_report(["a dog", long_text])
  assert ids.shape == (2, 32) and lengths.cut == 1 and lengths.longest == 42
  assert lengths.message("split 'test'") == (
      "split 'test': cut at 32 tokens, 1 of 2 captions shortened (the longest has 42 "
      "tokens); data.max_len=0 keeps every caption whole")
  c.data.max_len = 0  # whole, within the BERT's 512 positions
  ids, _ = tokenize.make_tokenizer(c).encode([long_text])
  assert ids.shape == (1, 42)
  with pytest.raises(ValueError, match="has 512 positions: set data.max_len <= 512"):
    tokenize.make_tokenizer(c).encode([" ".join(["dog"] * 600)])


def test_a_config_json_from_before_the_rule_keeps_captions_whole(tmp_path):
  """Saved with the old fixed width (no data.caption_bucket): a word-vocabulary model
  gets its authors' rule back; DSRAN's BERT build keeps its cut."""
  for name, encoder, want in (("scan", "bert", -1), ("dsran", "gru", -1),
                              ("dsran", "bert", 32)):
    c = default_config.get_base_config()
    c.model.name, c.model.dsran.text_encoder = name, encoder
    saved = c.to_dict()
    saved["data"]["max_len"] = 32
    del saved["data"]["caption_bucket"]
    wd = tmp_path / f"{name}_{encoder}"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(saved))
    assert Workdir(str(wd)).load_config().data.max_len == want, (name, encoder)
    saved["data"]["caption_bucket"] = 8  # written after the rule: a cut the user set
    (wd / "config.json").write_text(json.dumps(saved))
    assert Workdir(str(wd)).load_config().data.max_len == 32

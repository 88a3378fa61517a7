"""Parity of converted checkpoints with a PyTorch DSRAN written after the authors' code.

The PyTorch side (tests/torchref/dsran.py, run in the jax-free reference process; torch is
never imported here) re-implements the authors' modules (GAT.py, model_bert.py, model.py)
with their module and attribute names, so its state dict has their keys; BERT is a
`transformers.BertModel` (same key names as their vendored pytorch_pretrained_bert).
Every weight, including BatchNorm affine parameters and running statistics, is random.
Each test has the reference process save a checkpoint in their layout, converts it with
the CLI's function and compares eval-mode embeddings with the reference model's.
"""
import argparse
import pickle
import sys

import numpy as np
import pytest

from dsran_jax import inference
from dsran_jax.workdir import Workdir
from dsran_jax.models.dsran import params as dsran_params
from dsran_jax.convert import authors_vocab, engine as convert_engine
from dsran_jax.tools import convert_torch

E, IMG, POS, R, GRID = 32, 40, 1607, 5, 49
DIMS = {"embed": E, "img": IMG, "pos": POS}  # the reference models' widths
BERT_MAX_LEN = 32
TOL = 1e-4


# ------------------------------------------------------------- PyTorch reference


def tiny_bert_config(hidden=64, layers=2, heads=4, vocab=60):
  """`transformers.BertConfig` kwargs of a tiny BERT (built by the reference process)."""
  return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, intermediate_size=2 * hidden + 8,
              max_position_embeddings=40, type_vocab_size=2)


def opt_namespace(**kw):
  base = dict(data_name="f30k", batch_size=4, embed_size=E, img_dim=IMG, K=2, margin=0.2,
              learning_rate=2e-5, num_epochs=12, lr_update=6, bert_path="uncased_L-2_H-64_A-4/")
  base.update(kw)
  return argparse.Namespace(**base)


def save_bert_checkpoint(torch_ref, path, K, bert, torch_seed, init_seed, gamma_beta=False,
                         **opt):
  """The reference process builds a random BERT-build DSRAN and saves their file at
  `path` (DataParallel keys, opt, best_rsum, Eiters); returns `path` as a string, which
  names that model in `torch_ref("dsran.embed_images", ckpt_path=...)` and the like."""
  path = str(path)
  torch_ref("dsran.make_bert", ckpt_path=path, K=K, bert=bert, dims=DIMS,
            torch_seed=torch_seed, init_seed=init_seed, opt=opt_namespace(K=K, **opt),
            gamma_beta=gamma_beta)
  return path


def save_gru_checkpoint(torch_ref, path, K, vocab, word_dim, torch_seed, init_seed, **opt):
  """Their GRU-build file ('model' is [state_dict], no 'module.' prefix), as above."""
  path = str(path)
  torch_ref("dsran.make_gru", ckpt_path=path, K=K, vocab=vocab, word_dim=word_dim, dims=DIMS,
            torch_seed=torch_seed, init_seed=init_seed,
            opt=opt_namespace(K=K, grad_clip=2.0, learning_rate=2e-4, **opt))
  return path


def image_inputs(seed, b=3):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, GRID, IMG)).astype(np.float32),
          rng.standard_normal((b, R, IMG)).astype(np.float32),
          rng.standard_normal((b, R, POS)).astype(np.float32))


def bert_ids(seed, b=4, vocab=60):
  """[CLS]-like 1 ... [SEP]-like 2, zero-padded to 32 as their loader does."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((b, BERT_MAX_LEN), np.int64)
  for i, n in enumerate(rng.integers(3, 12, b)):
    ids[i, :n] = np.concatenate([[1], rng.integers(3, vocab, n - 2), [2]])
  return ids


def gru_captions(seed, b=6, vocab=50):
  rng = np.random.default_rng(seed)
  return [np.concatenate([[1], rng.integers(4, vocab, n - 2), [2]])
          for n in rng.integers(3, 10, b)]


def pad_captions(captions, width):
  ids = np.zeros((len(captions), width), np.int32)
  for i, c in enumerate(captions):
    ids[i, :len(c)] = c
  return ids


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("K", [1, 2, 4])
def test_bert_build_parity(tmp_path, torch_ref, K):
  bert_cfg = tiny_bert_config() if K != 1 else tiny_bert_config(hidden=64, heads=1)
  # K=1 also checks the oldest LayerNorm naming and heads inferred as hidden / 64.
  ckpt = save_bert_checkpoint(torch_ref, tmp_path / "model_best.pth.tar", K, bert_cfg,
                              torch_seed=K, init_seed=10 + K, gamma_beta=(K == 1),
                              **({"bert_path": "somewhere/"} if K == 1 else {}))
  workdir = tmp_path / "wd"
  summary = convert_torch.convert_checkpoint(ckpt, str(workdir))
  assert summary["build"] == "bert" and summary["K"] == K
  assert summary["bert"]["num_heads"] == (1 if K == 1 else 4)

  cfg = Workdir(str(workdir)).load_config()
  assert cfg.model.dsran.text_padding == "reference" and cfg.model.dsran.bert_random_init
  assert cfg.model.dsran.bert.num_layers == 2 and cfg.data.max_len == 32 and cfg.model.dsran.K == K
  enc = inference.load(str(workdir))
  assert enc.meta["best_rsum"] == 500.25 and enc.meta["epoch"] == 7

  grid, regions, pos = image_inputs(K)
  ids = bert_ids(K)
  want_img = torch_ref("dsran.embed_images", ckpt_path=ckpt, grid=grid, regions=regions, pos=pos)
  want_txt = torch_ref("dsran.bert_embed_texts", ckpt_path=ckpt, ids=ids)
  got_img = enc.encode_images(grid=grid, regions=regions, region_pos=pos)
  # Shorter ids are padded to 32 internally, as their loader pads.
  got_txt = enc.encode_texts(input_ids=ids[:, :14])
  d_img, d_txt = maxdiff(got_img, want_img), maxdiff(got_txt, want_txt)
  print(f"BERT build K={K}: max|diff| image {d_img:.2e}, text {d_txt:.2e}")
  assert d_img <= TOL and d_txt <= TOL


@pytest.mark.parametrize("K", [1, 2, 4])
def test_gru_build_parity(tmp_path, torch_ref, K):
  ckpt = save_gru_checkpoint(torch_ref, tmp_path / "model_best.pth.tar", K, vocab=50,
                             word_dim=12, torch_seed=100 + K, init_seed=20 + K, batch_size=4)
  workdir = tmp_path / "wd"
  summary = convert_torch.convert_checkpoint(ckpt, str(workdir), data_format="precomp")
  assert summary["build"] == "gru" and summary["K"] == K and summary["vocab_size"] == 50
  cfg = Workdir(str(workdir)).load_config()
  assert cfg.model.vocab_size == 50 and cfg.model.word_dim == 12
  assert not cfg.model.dsran.use_region_pos and cfg.data.format == "precomp"
  assert cfg.eval.batch_size == 4 and cfg.train.grad_clip == 2.0

  enc = inference.load(str(workdir))
  grid, regions, pos = image_inputs(K)
  want_img = torch_ref("dsran.embed_images", ckpt_path=ckpt, grid=grid, regions=regions)
  got_img = enc.encode_images(grid=grid, regions=regions, region_pos=pos)

  # 10 captions = their eval batches of 4, 4, 2, each padded to its own longest caption.
  caps = gru_captions(K, b=10)
  want_txt = torch_ref("dsran.gru_embed_texts", ckpt_path=ckpt,
                       batches=[caps[i:i + 4] for i in range(0, 10, 4)])
  got_txt = enc.encode_texts(input_ids=pad_captions(caps, 15))
  d_img, d_txt = maxdiff(got_img, want_img), maxdiff(got_txt, want_txt)
  print(f"GRU build K={K}: max|diff| image {d_img:.2e}, text {d_txt:.2e}")
  assert d_img <= TOL and d_txt <= TOL


# ------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gru_state(torch_ref):
  """A random K=2 GRU-build state dict (numpy), from the reference process."""
  return torch_ref("dsran.gru_state_dict", K=2, vocab=30, word_dim=8, dims=DIMS, torch_seed=0,
                   init_seed=0)


@pytest.fixture(scope="module")
def bert_state(torch_ref):
  """A random K=2 BERT-build state dict (numpy, 'module.' keys)."""
  return torch_ref("dsran.bert_state_dict", K=2,
                   bert=tiny_bert_config(hidden=32, layers=1, heads=2), dims=DIMS,
                   torch_seed=0, init_seed=0)


def test_detects_build_and_K(gru_state, bert_state):
  assert dsran_params.detect_build(gru_state) == "gru"
  assert dsran_params.detect_build(convert_engine.strip_prefix(bert_state)) == "bert"
  _, over = dsran_params.convert_state_dict(bert_state, bert_heads=2)
  assert over["K"] == 2 and over["embed_size"] == E and over["bert"].hidden_size == 32
  assert over["bert"].num_layers == 1 and over["bert"].intermediate_size == 72


def test_unexpected_key_is_named(gru_state):
  sd = dict(gru_state)
  sd["txt_enc.rnn.weight_ih_l1"] = sd["txt_enc.rnn.weight_ih_l0"]  # a second GRU layer
  sd["extra_head.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"2 unexpected keys") as e:
    dsran_params.convert_state_dict(sd)
  assert "txt_enc.rnn.weight_ih_l1" in str(e.value) and "extra_head.weight" in str(e.value)


def test_missing_key_is_named(gru_state, bert_state):
  sd = {k: v for k, v in gru_state.items() if k != "gat_cap.encoder.0.bn_out.running_var"}
  # Both names: the model's variable and the checkpoint key it is read from.
  with pytest.raises(ValueError,
                     match=r"1 missing keys:\n  batch_stats/gat_text/layer_0/bn_out/var "
                           r"\(checkpoint key gat_cap\.encoder\.0\.bn_out\.running_var\)"):
    dsran_params.convert_state_dict(sd)
  # A rule with a template group and a bidirectional-style leaf still names its key.
  sd = {k: v for k, v in gru_state.items() if k != "txt_enc.rnn.weight_hh_l0"}
  with pytest.raises(ValueError, match=r"text_enc/gru/w_hh \(checkpoint key "
                                       r"txt_enc\.rnn\.weight_hh_l0\)"):
    dsran_params.convert_state_dict(sd)
  sd = {k: v for k, v in bert_state.items()
        if k != "module.txt_enc.bert.encoder.layer.0.output.dense.bias"}
  with pytest.raises(ValueError, match=r"layer_0/output/bias"):
    dsran_params.convert_state_dict(sd, bert_heads=2)


def test_shape_mismatch_names_tensor_and_shapes(gru_state):
  sd = dict(gru_state)
  sd["gat_cap.encoder.0.fc_int.weight"] = np.zeros((E, E + 3), np.float32)
  with pytest.raises(ValueError) as e:
    dsran_params.convert_state_dict(sd)
  msg = str(e.value)
  assert "gat_cap.encoder.0.fc_int.weight" in msg
  assert f"({E + 3}, {E})" in msg and f"({E}, {E})" in msg


def test_bad_K_and_non_dsran_are_refused(gru_state):
  sd = {k: v for k, v in gru_state.items() if not k.startswith("gat_cat_2.")}
  sd.update({k.replace("gat_cat_1.", "gat_cat_3."): v for k, v in gru_state.items()
             if k.startswith("gat_cat_1.")})
  with pytest.raises(ValueError, match="cannot infer K"):
    dsran_params.convert_state_dict(sd)
  with pytest.raises(ValueError, match="not a DSRAN checkpoint"):
    dsran_params.convert_state_dict({"fc.weight": np.zeros((2, 2), np.float32)})


def test_forbidden_pickle_global_is_refused(tmp_path, torch_ref, gru_state):
  path = str(tmp_path / "evil.pth.tar")
  # The entry "extra" is a torchref.checkpoints.Sneaky(), a class the loader must not build.
  torch_ref("checkpoints.save", path=path, sneaky_key="extra",
            content={"epoch": 1, "model": [gru_state], "opt": opt_namespace()})
  with pytest.raises(ValueError, match=r"refusing to load.*Sneaky"):
    convert_engine.load_checkpoint(path)


def test_authors_vocab_pickle(tmp_path, monkeypatch):
  class Vocabulary:  # pickled as __main__.Vocabulary, like their shipped files
    pass

  Vocabulary.__module__, Vocabulary.__qualname__ = "__main__", "Vocabulary"
  monkeypatch.setattr(sys.modules["__main__"], "Vocabulary", Vocabulary, raising=False)
  v = Vocabulary()
  words = ["<pad>", "<start>", "<end>", "<unk>", "zebra", "a", "dog"]  # their order, not sorted
  v.word2idx = {w: i for i, w in enumerate(words)}
  v.idx2word = dict(enumerate(words))
  v.idx = len(words)
  path = tmp_path / "f30k_vocab.pkl"
  path.write_bytes(pickle.dumps(v, protocol=2))
  voc = authors_vocab.load_vocab(str(path))
  assert voc.idx2word == words and voc("dog") == 6

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  bad = tmp_path / "bad.pkl"
  bad.write_bytes(pickle.dumps(Evil()))
  with pytest.raises(ValueError, match=r"refusing to load builtins.print"):
    authors_vocab.load_vocab(str(bad))


def test_gru_vocab_written_to_workdir(tmp_path, torch_ref, gru_state):
  from dsran_jax.data.tokenize import Vocabulary
  words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(26)]
  Vocabulary(words).save(str(tmp_path / "in.json"))
  ckpt = tmp_path / "gru.pth.tar"
  torch_ref("checkpoints.save", path=str(ckpt),
            content={"epoch": 1, "model": [gru_state], "opt": opt_namespace(), "best_rsum": 1.0})
  convert_torch.convert_checkpoint(str(ckpt), str(tmp_path / "wd"), vocab=str(tmp_path / "in.json"))
  assert Vocabulary.load(str(tmp_path / "wd" / "vocab.json")).idx2word == words
  Vocabulary(words[:-1]).save(str(tmp_path / "short.json"))
  with pytest.raises(ValueError, match="29 words but .* 30 rows"):
    convert_torch.convert_checkpoint(str(ckpt), str(tmp_path / "wd2"),
                                     vocab=str(tmp_path / "short.json"))
  # A family without public code has no converter: one error line, not a traceback.
  for model, message in (("bssan", "bssan: this family has no converter"),
                         ("nosuch", "nosuch: not a model family")):
    with pytest.raises(convert_torch.ConversionError, match=message):
      convert_torch.convert_checkpoint(str(ckpt), str(tmp_path / "wd3"), model=model)

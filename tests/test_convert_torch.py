"""Parity of converted checkpoints with a PyTorch DSRAN written after the authors' code.

The PyTorch side re-implements the authors' modules (GAT.py, model_bert.py, model.py) with
their module and attribute names, so its state dict has their keys; BERT is a
`transformers.BertModel` (same key names as their vendored pytorch_pretrained_bert). Every
weight, including BatchNorm affine parameters and running statistics, is random. Each
test saves a checkpoint in their layout, converts it with the CLI's function and compares
eval-mode embeddings.
"""
import argparse
import math
import pickle
import sys

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dsran_jax import inference
from dsran_jax.default_config import load_workdir_config
from dsran_jax.tools import convert_torch

E, IMG, POS, R, GRID = 32, 40, 1607, 5, 49
BERT_MAX_LEN = 32
TOL = 1e-4


# ------------------------------------------------------------- PyTorch reference


class MultiHeadAttention(nn.Module):
  """Their GAT attention: 8 heads, scaled dot product over all nodes, no output proj."""

  def __init__(self, d, heads=8):
    super().__init__()
    self.heads, self.hd = heads, d // heads
    self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
    self.dropout = nn.Dropout(0.2)

  def forward(self, x):
    b, n, d = x.shape
    split = lambda t: t.view(b, n, self.heads, self.hd).permute(0, 2, 1, 3)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    probs = self.dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), -1))
    return (probs @ v).permute(0, 2, 1, 3).reshape(b, n, d)


class GATLayer(nn.Module):

  def __init__(self, d):
    super().__init__()
    self.mha = MultiHeadAttention(d)
    self.fc_in, self.bn_in, self.dropout_in = nn.Linear(d, d), nn.BatchNorm1d(d), nn.Dropout(0.2)
    self.fc_int = nn.Linear(d, d)
    self.fc_out, self.bn_out, self.dropout_out = nn.Linear(d, d), nn.BatchNorm1d(d), nn.Dropout(0.2)

  def forward(self, x):
    bn = lambda norm, t: norm(t.permute(0, 2, 1)).permute(0, 2, 1)
    h = bn(self.bn_in, self.dropout_in(self.fc_in(self.mha(x))) + x)
    f = self.dropout_out(self.fc_out(torch.relu(self.fc_int(h))))
    return bn(self.bn_out, f + h)


class GAT(nn.Module):

  def __init__(self, d, layers=1):
    super().__init__()
    self.encoder = nn.ModuleList([GATLayer(d) for _ in range(layers)])

  def forward(self, x):
    for layer in self.encoder:
      x = layer(x)
    return x


class Fusion(nn.Module):

  def __init__(self, d):
    super().__init__()
    self.gate0, self.gate1 = nn.Linear(d, d), nn.Linear(d, d)
    self.fusion0, self.fusion1 = nn.Linear(d, d), nn.Linear(d, d)

  def forward(self, a, b):
    f1, f2 = self.gate0(a), self.gate1(b)
    t = torch.sigmoid(self.fusion0(f1) + self.fusion1(f2))
    return t * f1 + (1 - t) * f2


def _cnn():
  # Stands in for their ResNet-152 (img_enc.cnn.*), which the converter drops.
  return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


class _BertImageEncoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.cnn = _cnn()
    self.fc = nn.Sequential(nn.Linear(IMG, E), nn.ReLU(), nn.Dropout(0.1))

  def forward(self, grid):  # precomputed ResNet output
    return self.fc(grid)


class _BertRcnnEncoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.fc_image = nn.Sequential(nn.Linear(IMG, IMG), nn.ReLU(), nn.Linear(IMG, E), nn.ReLU(),
                                  nn.Dropout(0.1))
    self.fc_pos = nn.Sequential(nn.Linear(POS, E), nn.ReLU(), nn.Dropout(0.1))
    self.fc = nn.Linear(2 * E, E)  # unused in their forward

  def forward(self, regions, pos):
    return self.fc_image(regions) + self.fc_pos(pos)


class _BertTextEncoder(nn.Module):

  def __init__(self, bert_cfg):
    super().__init__()
    self.bert = transformers.BertModel(bert_cfg)
    self.fc = nn.Sequential(nn.Linear(bert_cfg.hidden_size, E), nn.ReLU(), nn.Dropout(0.1))

  def forward(self, ids):
    # No attention mask: their call is self.bert(captions).
    return self.fc(self.bert(ids).last_hidden_state)


def _jsr(model, nodes, names, fusions):
  pooled = [getattr(model, n)(nodes).mean(1) for n in names]
  if len(pooled) == 1:
    return pooled[0]
  if len(pooled) == 2:
    return getattr(model, fusions[0])(*pooled)
  left = getattr(model, fusions[0])(pooled[0], pooled[1])
  right = getattr(model, fusions[1])(pooled[2], pooled[3])
  return getattr(model, fusions[2])(left, right)


class TorchDSRANBert(nn.Module):
  """model_bert.py's DSRAN: gat_1 on the grid, gat_2 on regions, gat_cat[_1.._3]."""

  def __init__(self, K, bert_cfg):
    super().__init__()
    self.K = K
    self.img_enc = _BertImageEncoder()
    self.txt_enc = _BertTextEncoder(bert_cfg)
    self.rcnn_enc = _BertRcnnEncoder()
    self.gat_1, self.gat_2, self.gat_cap = GAT(E), GAT(E), GAT(E)
    self.gat_cat = GAT(E)
    if K in (2, 4):
      self.gat_cat_1 = GAT(E)
      self.fusion = Fusion(E)
    if K == 4:
      self.gat_cat_2, self.gat_cat_3 = GAT(E), GAT(E)
      self.fusion_1, self.fusion_2 = Fusion(E), Fusion(E)

  def embed_images(self, grid, regions, pos):
    nodes = torch.cat([self.gat_1(self.img_enc(grid)), self.gat_2(self.rcnn_enc(regions, pos))], 1)
    names = ["gat_cat", "gat_cat_1", "gat_cat_2", "gat_cat_3"][:self.K]
    fusions = ["fusion"] if self.K == 2 else ["fusion_1", "fusion_2", "fusion"]
    x = _jsr(self, nodes, names, fusions)
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()  # their l2norm has no eps

  def embed_texts(self, ids):
    x = self.gat_cap(self.txt_enc(ids)).mean(1)
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


class _GruImageEncoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.cnn = _cnn()
    self.fc = nn.Linear(IMG, E)


class _GruRcnnEncoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.fc_image = nn.Linear(IMG, E)


def _l2norm_eps(x):
  return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-12)


class _GruTextEncoder(nn.Module):

  def __init__(self, vocab, word_dim):
    super().__init__()
    self.embed = nn.Embedding(vocab, word_dim)
    self.rnn = nn.GRU(word_dim, E, 1, batch_first=True)
    self.dropout = nn.Dropout(0.1)

  def forward(self, ids, lengths):
    packed = pack_padded_sequence(self.dropout(self.embed(ids)), lengths, batch_first=True)
    out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
    return _l2norm_eps(out)


class TorchDSRANGru(nn.Module):
  """model.py's DSRAN: gat_1 on regions, gat_2 on the grid, gat_cat_1.._4, fusion[2,3]."""

  def __init__(self, K, vocab, word_dim):
    super().__init__()
    self.K = K
    self.img_enc, self.rcnn_enc = _GruImageEncoder(), _GruRcnnEncoder()
    self.txt_enc = _GruTextEncoder(vocab, word_dim)
    self.gat_1, self.gat_2, self.gat_cap = GAT(E), GAT(E), GAT(E)
    for k in range(1, K + 1):
      setattr(self, f"gat_cat_{k}", GAT(E))
    if K in (2, 4):
      self.fusion = Fusion(E)
    if K == 4:
      self.fusion2, self.fusion3 = Fusion(E), Fusion(E)

  def embed_images(self, grid, regions):
    nodes = torch.cat([self.gat_2(self.img_enc.fc(grid)),
                       self.gat_1(self.rcnn_enc.fc_image(regions))], 1)
    names = [f"gat_cat_{k}" for k in range(1, self.K + 1)]
    fusions = ["fusion"] if self.K == 2 else ["fusion", "fusion2", "fusion3"]
    return _l2norm_eps(_jsr(self, nodes, names, fusions))

  def embed_texts(self, ids, lengths):
    """`ids` / `lengths` in their collate layout: sorted by decreasing length, padded to
    the batch's longest caption."""
    return _l2norm_eps(self.gat_cap(self.txt_enc(ids, lengths)).mean(1))


def randomize(model: nn.Module, seed: int) -> nn.Module:
  """Random weights everywhere (LayerNorm/BN affine too) and non-trivial BN stats."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or ".bn_" in name or name.endswith(("bn_in.weight", "bn_out.weight")):
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
      elif p.dim() == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for mod in model.modules():
      if isinstance(mod, nn.BatchNorm1d):
        mod.running_mean.copy_(0.5 * torch.randn(mod.running_mean.shape, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
        mod.num_batches_tracked.fill_(7)
  return model.eval()


def tiny_bert_config(hidden=64, layers=2, heads=4, vocab=60):
  return transformers.BertConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=2 * hidden + 8, max_position_embeddings=40, type_vocab_size=2,
      attn_implementation="eager")


def opt_namespace(**kw):
  base = dict(data_name="f30k", batch_size=4, embed_size=E, img_dim=IMG, K=2, margin=0.2,
              learning_rate=2e-5, num_epochs=12, lr_update=6, bert_path="uncased_L-2_H-64_A-4/")
  base.update(kw)
  return argparse.Namespace(**base)


def save_bert_checkpoint(model, path, gamma_beta=False, **opt):
  """Their BERT-build file: DataParallel keys ('module.'), opt, best_rsum, Eiters."""
  sd = {}
  for k, v in model.state_dict().items():
    if gamma_beta and "LayerNorm" in k:  # pytorch_pretrained_bert < 0.5 naming
      k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
      k = k.replace("LayerNorm.bias", "LayerNorm.beta")
    sd["module." + k] = v
  torch.save({"epoch": 7, "model": sd, "best_rsum": 500.25, "opt": opt_namespace(K=model.K, **opt),
              "Eiters": 1234}, path)


def save_gru_checkpoint(model, path, **opt):
  """Their GRU-build file: 'model' is [state_dict], no 'module.' prefix."""
  torch.save({"epoch": 5, "model": [model.state_dict()], "best_rsum": 420.5,
              "opt": opt_namespace(K=model.K, grad_clip=2.0, learning_rate=2e-4, **opt),
              "Eiters": 99}, path)


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


def torch_gru_texts(model, captions):
  """Their eval on one batch: collate (sort by length, pad to the longest), then unsort."""
  order = sorted(range(len(captions)), key=lambda i: -len(captions[i]))
  lengths = [len(captions[i]) for i in order]
  ids = torch.zeros(len(captions), max(lengths), dtype=torch.long)
  for row, i in enumerate(order):
    ids[row, :lengths[row]] = torch.as_tensor(captions[i])
  with torch.no_grad():
    out = model.embed_texts(ids, lengths).numpy()
  res = np.zeros_like(out)
  res[order] = out
  return res


def pad_captions(captions, width):
  ids = np.zeros((len(captions), width), np.int32)
  for i, c in enumerate(captions):
    ids[i, :len(c)] = c
  return ids


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("K", [1, 2, 4])
def test_bert_build_parity(tmp_path, K):
  torch.manual_seed(K)
  bert_cfg = tiny_bert_config() if K != 1 else tiny_bert_config(hidden=64, heads=1)
  model = randomize(TorchDSRANBert(K, bert_cfg), seed=10 + K)
  ckpt = tmp_path / "model_best.pth.tar"
  # K=1 also checks the oldest LayerNorm naming and heads inferred as hidden / 64.
  save_bert_checkpoint(model, ckpt, gamma_beta=(K == 1),
                       **({"bert_path": "somewhere/"} if K == 1 else {}))
  workdir = tmp_path / "wd"
  summary = convert_torch.convert_checkpoint(str(ckpt), str(workdir))
  assert summary["build"] == "bert" and summary["K"] == K
  assert summary["bert"]["num_heads"] == (1 if K == 1 else 4)

  cfg = load_workdir_config(str(workdir))
  assert cfg.model.text_padding == "reference" and cfg.model.bert_random_init
  assert cfg.model.bert.num_layers == 2 and cfg.data.max_len == 32 and cfg.model.K == K
  enc = inference.load(str(workdir))
  assert enc.meta["best_rsum"] == 500.25 and enc.meta["epoch"] == 7

  grid, regions, pos = image_inputs(K)
  ids = bert_ids(K)
  with torch.no_grad():
    want_img = model.embed_images(*map(torch.from_numpy, (grid, regions, pos))).numpy()
    want_txt = model.embed_texts(torch.from_numpy(ids)).numpy()
  got_img = enc.encode_images(grid=grid, regions=regions, region_pos=pos)
  # Shorter ids are padded to 32 internally, as their loader pads.
  got_txt = enc.encode_texts(input_ids=ids[:, :14])
  d_img, d_txt = maxdiff(got_img, want_img), maxdiff(got_txt, want_txt)
  print(f"BERT build K={K}: max|diff| image {d_img:.2e}, text {d_txt:.2e}")
  assert d_img <= TOL and d_txt <= TOL


@pytest.mark.parametrize("K", [1, 2, 4])
def test_gru_build_parity(tmp_path, K):
  torch.manual_seed(100 + K)
  model = randomize(TorchDSRANGru(K, vocab=50, word_dim=12), seed=20 + K)
  ckpt = tmp_path / "model_best.pth.tar"
  save_gru_checkpoint(model, ckpt, batch_size=4)
  workdir = tmp_path / "wd"
  summary = convert_torch.convert_checkpoint(str(ckpt), str(workdir), data_format="precomp")
  assert summary["build"] == "gru" and summary["K"] == K and summary["vocab_size"] == 50
  cfg = load_workdir_config(str(workdir))
  assert cfg.model.vocab_size == 50 and cfg.model.word_dim == 12
  assert not cfg.model.use_region_pos and cfg.data.format == "precomp"
  assert cfg.eval.batch_size == 4 and cfg.train.grad_clip == 2.0

  enc = inference.load(str(workdir))
  grid, regions, pos = image_inputs(K)
  with torch.no_grad():
    want_img = model.embed_images(torch.from_numpy(grid), torch.from_numpy(regions)).numpy()
  got_img = enc.encode_images(grid=grid, regions=regions, region_pos=pos)

  # 10 captions = their eval batches of 4, 4, 2, each padded to its own longest caption.
  caps = gru_captions(K, b=10)
  want_txt = np.concatenate([torch_gru_texts(model, caps[i:i + 4]) for i in range(0, 10, 4)])
  got_txt = enc.encode_texts(input_ids=pad_captions(caps, 15))
  d_img, d_txt = maxdiff(got_img, want_img), maxdiff(got_txt, want_txt)
  print(f"GRU build K={K}: max|diff| image {d_img:.2e}, text {d_txt:.2e}")
  assert d_img <= TOL and d_txt <= TOL


# ------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gru_state():
  torch.manual_seed(0)
  return randomize(TorchDSRANGru(2, vocab=30, word_dim=8), seed=0).state_dict()


@pytest.fixture(scope="module")
def bert_state():
  torch.manual_seed(0)
  model = randomize(TorchDSRANBert(2, tiny_bert_config(hidden=32, layers=1, heads=2)), seed=0)
  return {"module." + k: v for k, v in model.state_dict().items()}


def test_detects_build_and_K(gru_state, bert_state):
  assert convert_torch.detect_build(gru_state) == "gru"
  assert convert_torch.detect_build(convert_torch.strip_data_parallel(bert_state)) == "bert"
  _, over = convert_torch.convert_state_dict(bert_state, bert_heads=2)
  assert over["K"] == 2 and over["embed_size"] == E and over["bert"].hidden_size == 32
  assert over["bert"].num_layers == 1 and over["bert"].intermediate_size == 72


def test_unexpected_key_is_named(gru_state):
  sd = dict(gru_state)
  sd["txt_enc.rnn.weight_ih_l1"] = sd["txt_enc.rnn.weight_ih_l0"]  # a second GRU layer
  sd["extra_head.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match=r"2 unexpected keys") as e:
    convert_torch.convert_state_dict(sd)
  assert "txt_enc.rnn.weight_ih_l1" in str(e.value) and "extra_head.weight" in str(e.value)


def test_missing_key_is_named(gru_state, bert_state):
  sd = {k: v for k, v in gru_state.items() if k != "gat_cap.encoder.0.bn_out.running_var"}
  with pytest.raises(ValueError,
                     match=r"missing params:\n  batch_stats/gat_text/layer_0/bn_out/var"):
    convert_torch.convert_state_dict(sd)
  sd = {k: v for k, v in bert_state.items()
        if k != "module.txt_enc.bert.encoder.layer.0.output.dense.bias"}
  with pytest.raises(ValueError, match=r"layer_0/output/bias"):
    convert_torch.convert_state_dict(sd, bert_heads=2)


def test_shape_mismatch_names_tensor_and_shapes(gru_state):
  sd = dict(gru_state)
  sd["gat_cap.encoder.0.fc_int.weight"] = torch.zeros(E, E + 3)
  with pytest.raises(ValueError) as e:
    convert_torch.convert_state_dict(sd)
  msg = str(e.value)
  assert "gat_cap.encoder.0.fc_int.weight" in msg
  assert f"({E + 3}, {E})" in msg and f"({E}, {E})" in msg


def test_bad_K_and_non_dsran_are_refused(gru_state):
  sd = {k: v for k, v in gru_state.items() if not k.startswith("gat_cat_2.")}
  sd.update({k.replace("gat_cat_1.", "gat_cat_3."): v for k, v in gru_state.items()
             if k.startswith("gat_cat_1.")})
  with pytest.raises(ValueError, match="cannot infer K"):
    convert_torch.convert_state_dict(sd)
  with pytest.raises(ValueError, match="not a DSRAN checkpoint"):
    convert_torch.convert_state_dict({"fc.weight": torch.zeros(2, 2)})


class Sneaky:
  """A class the safe loader must not construct."""

  def __init__(self):
    self.x = 1


def test_forbidden_pickle_global_is_refused(tmp_path, gru_state):
  path = tmp_path / "evil.pth.tar"
  torch.save({"epoch": 1, "model": [gru_state], "opt": opt_namespace(), "extra": Sneaky()}, path)
  with pytest.raises(ValueError, match=r"refusing to load.*Sneaky"):
    convert_torch.load_checkpoint(str(path))


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
  voc = convert_torch.load_authors_vocab(str(path))
  assert voc.idx2word == words and voc("dog") == 6

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  bad = tmp_path / "bad.pkl"
  bad.write_bytes(pickle.dumps(Evil()))
  with pytest.raises(ValueError, match=r"refusing to load builtins.print"):
    convert_torch.load_authors_vocab(str(bad))


def test_gru_vocab_written_to_workdir(tmp_path, monkeypatch, gru_state):
  from dsran_jax.data.tokenize import Vocabulary
  words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(26)]
  Vocabulary(words).save(str(tmp_path / "in.json"))
  ckpt = tmp_path / "gru.pth.tar"
  torch.save({"epoch": 1, "model": [gru_state], "opt": opt_namespace(), "best_rsum": 1.0}, ckpt)
  convert_torch.convert_checkpoint(str(ckpt), str(tmp_path / "wd"), vocab=str(tmp_path / "in.json"))
  assert Vocabulary.load(str(tmp_path / "wd" / "vocab.json")).idx2word == words
  Vocabulary(words[:-1]).save(str(tmp_path / "short.json"))
  with pytest.raises(ValueError, match="29 words but .* 30 rows"):
    convert_torch.convert_checkpoint(str(ckpt), str(tmp_path / "wd2"),
                                     vocab=str(tmp_path / "short.json"))

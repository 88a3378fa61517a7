"""A PyTorch DSRAN written after the authors' code, for the converter and inference tests.

The modules re-implement the authors' GAT.py, model_bert.py and model.py with their module
and attribute names, so the state dicts have their keys; BERT is a
`transformers.BertModel` (same key names as their vendored pytorch_pretrained_bert).
Every weight, BatchNorm affine parameters and running statistics included, is random.
`img_enc.cnn` is their ResNet (`tv_resnet`, torchvision's keys): a small one by default,
the real ResNet-152 with `dims["cnn"] = {}` (see `_cnn`).

`make_bert` / `make_gru` build a model, save it in the authors' checkpoint layout and keep
it in this (session-long) process under the checkpoint path; `embed_images`,
`bert_embed_texts` and `gru_embed_texts` then compute its eval-mode embeddings from
numpy inputs. Widths come in as `dims = {"embed": E, "img": IMG, "pos": POS}`.
"""
import math

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from torchref import common, tv_resnet

_MODELS = {}  # checkpoint path -> the model saved there


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


def _cnn(dims):
  """Their ResNet (`img_enc.cnn.*`, torchvision's keys): `dims["cnn"]` (tv_resnet.ResNet
  kwargs; ResNet-152 by default there), else a small one with the same key names whose
  `layer4` gives `dims["img"]` channels, as their grid branch's fc takes."""
  if dims.get("cnn") is not None:
    return tv_resnet.ResNet(**dims["cnn"])
  return tv_resnet.ResNet(layers=(1, 1, 1, 1), widths=(4, 4, 4, dims["img"] // 4), stem=8,
                          num_classes=10)


class _BertImageEncoder(nn.Module):

  def __init__(self, dims):
    super().__init__()
    self.cnn = _cnn(dims)
    self.fc = nn.Sequential(nn.Linear(dims["img"], dims["embed"]), nn.ReLU(), nn.Dropout(0.1))

  def forward(self, grid):  # precomputed ResNet output
    return self.fc(grid)


class _BertRcnnEncoder(nn.Module):

  def __init__(self, dims):
    super().__init__()
    img, e = dims["img"], dims["embed"]
    self.fc_image = nn.Sequential(nn.Linear(img, img), nn.ReLU(), nn.Linear(img, e), nn.ReLU(),
                                  nn.Dropout(0.1))
    self.fc_pos = nn.Sequential(nn.Linear(dims["pos"], e), nn.ReLU(), nn.Dropout(0.1))
    self.fc = nn.Linear(2 * e, e)  # unused in their forward

  def forward(self, regions, pos):
    return self.fc_image(regions) + self.fc_pos(pos)


class _BertTextEncoder(nn.Module):

  def __init__(self, bert_cfg, dims):
    super().__init__()
    self.bert = transformers.BertModel(bert_cfg)
    self.fc = nn.Sequential(nn.Linear(bert_cfg.hidden_size, dims["embed"]), nn.ReLU(),
                            nn.Dropout(0.1))

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

  def __init__(self, K, bert_cfg, dims):
    super().__init__()
    self.K = K
    e = dims["embed"]
    self.img_enc = _BertImageEncoder(dims)
    self.txt_enc = _BertTextEncoder(bert_cfg, dims)
    self.rcnn_enc = _BertRcnnEncoder(dims)
    self.gat_1, self.gat_2, self.gat_cap = GAT(e), GAT(e), GAT(e)
    self.gat_cat = GAT(e)
    if K in (2, 4):
      self.gat_cat_1 = GAT(e)
      self.fusion = Fusion(e)
    if K == 4:
      self.gat_cat_2, self.gat_cat_3 = GAT(e), GAT(e)
      self.fusion_1, self.fusion_2 = Fusion(e), Fusion(e)

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

  def __init__(self, dims):
    super().__init__()
    self.cnn = _cnn(dims)
    self.fc = nn.Linear(dims["img"], dims["embed"])


class _GruRcnnEncoder(nn.Module):

  def __init__(self, dims):
    super().__init__()
    self.fc_image = nn.Linear(dims["img"], dims["embed"])


def _l2norm_eps(x):
  return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-12)


class _GruTextEncoder(nn.Module):

  def __init__(self, vocab, word_dim, embed):
    super().__init__()
    self.embed = nn.Embedding(vocab, word_dim)
    self.rnn = nn.GRU(word_dim, embed, 1, batch_first=True)
    self.dropout = nn.Dropout(0.1)

  def forward(self, ids, lengths):
    packed = pack_padded_sequence(self.dropout(self.embed(ids)), lengths, batch_first=True)
    out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
    return _l2norm_eps(out)


class TorchDSRANGru(nn.Module):
  """model.py's DSRAN: gat_1 on regions, gat_2 on the grid, gat_cat_1.._4, fusion[2,3]."""

  def __init__(self, K, vocab, word_dim, dims):
    super().__init__()
    self.K = K
    e = dims["embed"]
    self.img_enc, self.rcnn_enc = _GruImageEncoder(dims), _GruRcnnEncoder(dims)
    self.txt_enc = _GruTextEncoder(vocab, word_dim, e)
    self.gat_1, self.gat_2, self.gat_cap = GAT(e), GAT(e), GAT(e)
    for k in range(1, K + 1):
      setattr(self, f"gat_cat_{k}", GAT(e))
    if K in (2, 4):
      self.fusion = Fusion(e)
    if K == 4:
      self.fusion2, self.fusion3 = Fusion(e), Fusion(e)

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
      if name.startswith("img_enc.cnn."):
        continue  # tv_resnet.randomise below
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
  tv_resnet.randomise(model.img_enc.cnn, seed)
  return model.eval()


def _bert_model(K, bert, dims, torch_seed, init_seed):
  torch.manual_seed(torch_seed)
  cfg = transformers.BertConfig(**bert, attn_implementation="eager")
  return randomize(TorchDSRANBert(K, cfg, dims), seed=init_seed)


def _gru_model(K, vocab, word_dim, dims, torch_seed, init_seed):
  torch.manual_seed(torch_seed)
  return randomize(TorchDSRANGru(K, vocab, word_dim, dims), seed=init_seed)


def _numpy_state(model, prefix=""):
  return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def make_bert(ckpt_path, K, bert, dims, torch_seed, init_seed, opt, gamma_beta=False):
  """Builds a random BERT-build DSRAN and saves their BERT-build file at `ckpt_path`:
  DataParallel keys ('module.'), `opt` (argparse.Namespace), epoch 7, best_rsum 500.25,
  Eiters 1234. `bert`: transformers.BertConfig kwargs. `gamma_beta`: LayerNorm weights
  named as pytorch_pretrained_bert < 0.5 named them."""
  model = _bert_model(K, bert, dims, torch_seed, init_seed)
  sd = {}
  for k, v in model.state_dict().items():
    if gamma_beta and "LayerNorm" in k:
      k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
      k = k.replace("LayerNorm.bias", "LayerNorm.beta")
    sd["module." + k] = v
  common.save_checkpoint(ckpt_path, sd, opt, epoch=7, best_rsum=500.25, eiters=1234)
  _MODELS[ckpt_path] = model


def make_gru(ckpt_path, K, vocab, word_dim, dims, torch_seed, init_seed, opt):
  """Builds a random GRU-build DSRAN and saves their GRU-build file at `ckpt_path`:
  'model' is [state_dict] without 'module.', `opt`, epoch 5, best_rsum 420.5, Eiters 99."""
  model = _gru_model(K, vocab, word_dim, dims, torch_seed, init_seed)
  common.save_checkpoint(ckpt_path, [model.state_dict()], opt, epoch=5, best_rsum=420.5,
                         eiters=99)
  _MODELS[ckpt_path] = model


def bert_state_dict(K, bert, dims, torch_seed, init_seed):
  """A random BERT-build DSRAN's state dict with 'module.' keys, as numpy."""
  return _numpy_state(_bert_model(K, bert, dims, torch_seed, init_seed), "module.")


def gru_state_dict(K, vocab, word_dim, dims, torch_seed, init_seed):
  """A random GRU-build DSRAN's state dict, as numpy."""
  return _numpy_state(_gru_model(K, vocab, word_dim, dims, torch_seed, init_seed))


def _model(ckpt_path):
  if ckpt_path not in _MODELS:
    raise KeyError(f"no model was saved at {ckpt_path} by this reference process "
                   "(make_bert / make_gru)")
  return _MODELS[ckpt_path]


def embed_images(ckpt_path, grid, regions, pos=None):
  """Eval-mode image embeddings of the model saved at `ckpt_path` (the GRU build takes no
  `pos`)."""
  model = _model(ckpt_path)
  args = [torch.from_numpy(grid), torch.from_numpy(regions)]
  if isinstance(model, TorchDSRANBert):
    args.append(torch.from_numpy(pos))
  with torch.no_grad():
    return model.embed_images(*args).numpy()


def bert_embed_texts(ckpt_path, ids):
  """Eval-mode text embeddings of the BERT build from their zero-padded ids."""
  with torch.no_grad():
    return _model(ckpt_path).embed_texts(torch.from_numpy(ids)).numpy()


def gru_embed_texts(ckpt_path, batches):
  """The GRU build's eval over `batches` (lists of 1-D id arrays), as theirs runs one
  batch: collate (sort by length, pad to the longest), embed, unsort; concatenated."""
  model = _model(ckpt_path)
  outs = []
  for captions in batches:
    order = sorted(range(len(captions)), key=lambda i: -len(captions[i]))
    lengths = [len(captions[i]) for i in order]
    ids = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for row, i in enumerate(order):
      ids[row, :lengths[row]] = torch.as_tensor(captions[i])
    with torch.no_grad():
      out = model.embed_texts(ids, lengths).numpy()
    res = np.zeros_like(out)
    res[order] = out
    outs.append(res)
  return np.concatenate(outs)


def cnn_digests(ckpt_path):
  """{torchvision key: (dtype, shape, sha256 of the bytes)} of every tensor of the CNN
  (`img_enc.cnn.*`) of the model saved at `ckpt_path`: what its weights file must hold."""
  import hashlib  # pylint: disable=g-import-not-at-top
  out = {}
  for key, value in _model(ckpt_path).img_enc.cnn.state_dict().items():
    a = value.detach().numpy()  # tobytes() is C order; 0-d counters stay 0-d
    out[key] = (str(a.dtype), tuple(a.shape), hashlib.sha256(a.tobytes()).hexdigest())
  return out


def cnn_grid(ckpt_path, pixels_nchw):
  """Their grid features in evaluation (`val_start()`: eval-mode BatchNorm): the CNN's
  `x4` as EncoderImageFull.forward lays it out before its fc, (B, H * W, C)."""
  cnn = _model(ckpt_path).img_enc.cnn.eval()
  with torch.no_grad():
    top = cnn(torch.from_numpy(np.ascontiguousarray(pixels_nchw, np.float32)))[-1]
    return top.view(top.size(0), top.size(1), -1).transpose(2, 1).numpy().copy()


def forget(ckpt_path):
  """Drops the model saved at `ckpt_path` from this process (a ResNet-152 is 240 MB)."""
  _MODELS.pop(ckpt_path, None)

"""PyTorch reference of SCAN (Lee et al., ECCV 2018), written from kuanghuei/SCAN @ 8063557
(model.py, evaluation.py, train.py, data.py, vocab.py) for the parity tests.

What it reproduces, equation for equation and in their order of operations:
- `EncoderImagePrecomp` (Linear, Xavier-uniform, bias 0, then l2norm unless --no_imgnorm)
  and `EncoderImageWeightNormPrecomp` (--precomp_enc_type=weight_norm: `weight_norm(...,
  dim=None)`, PyTorch's default Linear init);
- `EncoderText`: Embedding U(-0.1, 0.1), nn.GRU over packed sequences (--num_layers,
  --bi_gru with the two halves averaged), l2norm unless --no_txtnorm;
- `func_attention` with every --raw_feature_norm their code runs (softmax, l2norm,
  clipped_l2norm = LeakyReLU(0.1) then l2 over the query axis, clipped, no_norm; their
  l1norm / clipped_l1norm call an undefined `l1norm_d` and raise NameError, and any other
  name, e.g. clipped_leaky_l2norm, raises their ValueError);
- `cosine_similarity` (eps 1e-8 on the product of norms, then `.squeeze()`),
  `xattn_score_t2i` / `xattn_score_i2t` with LogSumExp, Mean, Max and Sum;
- `shard_xattn_t2i` / `shard_xattn_i2t`: their double loop over shards and, inside, the
  Python loop over each shard's captions, filling a float64 NumPy matrix.

Adaptations to a current PyTorch on CPU, none of which changes a number: Python 3 integer
division where their Python 2 code wrote `/` (shard counts, the BiGRU split); no
`Variable`/`volatile`/`.cuda()`; `nn.Softmax(dim=1)` spelled out where they relied on the
implicit dim (1 for 2-D inputs). Their `.squeeze()` quirk is kept: a shard with a single
image (or a caption of one word) makes their aggregation raise, so callers avoid it.

Module-level imports: torch, numpy and the standard library only (tests/torchref/__init__.py).
"""
import argparse
import statistics
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from torchref import common

# train.py's argparse defaults (the options a released `opt` Namespace carries).
DEFAULT_OPT = dict(
    data_path="./data/", data_name="precomp", vocab_path="./vocab/", margin=0.2,
    num_epochs=30, batch_size=128, word_dim=300, embed_size=1024, grad_clip=2.0,
    num_layers=1, learning_rate=0.0002, lr_update=15, workers=10, log_step=10,
    val_step=500, logger_name="./runs/runX/log", model_name="./runs/runX/checkpoint",
    resume="", max_violation=False, img_dim=2048, no_imgnorm=False, no_txtnorm=False,
    raw_feature_norm="clipped_l2norm", agg_func="LogSumExp", cross_attn="t2i",
    precomp_enc_type="basic", bi_gru=False, lambda_lse=6.0, lambda_softmax=9.0)


def make_opt(opt: dict, vocab_size: int = 0) -> argparse.Namespace:
  """Their `opt`: train.py's defaults updated with `opt`, plus `vocab_size` as train.py
  sets it after loading the vocabulary."""
  return common.make_opt(DEFAULT_OPT, opt, vocab_size, "SCAN train.py")


# --------------------------------------------------------------------------- model.py


def l1norm(X, dim, eps=1e-8):
  norm = torch.abs(X).sum(dim=dim, keepdim=True) + eps
  return torch.div(X, norm)


def l2norm(X, dim, eps=1e-8):
  norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
  return torch.div(X, norm)


class EncoderImagePrecomp(nn.Module):

  def __init__(self, img_dim, embed_size, no_imgnorm=False):
    super().__init__()
    self.embed_size = embed_size
    self.no_imgnorm = no_imgnorm
    self.fc = nn.Linear(img_dim, embed_size)
    r = np.sqrt(6.) / np.sqrt(self.fc.in_features + self.fc.out_features)
    self.fc.weight.data.uniform_(-r, r)
    self.fc.bias.data.fill_(0)

  def forward(self, images):
    features = self.fc(images)
    if not self.no_imgnorm:
      features = l2norm(features, dim=-1)
    return features


class EncoderImageWeightNormPrecomp(nn.Module):

  def __init__(self, img_dim, embed_size, no_imgnorm=False):
    super().__init__()
    from torch.nn.utils.weight_norm import weight_norm  # pylint: disable=g-import-not-at-top
    self.embed_size = embed_size
    self.no_imgnorm = no_imgnorm
    self.fc = weight_norm(nn.Linear(img_dim, embed_size), dim=None)

  def forward(self, images):
    features = self.fc(images)
    if not self.no_imgnorm:
      features = l2norm(features, dim=-1)
    return features


def EncoderImage(opt):  # pylint: disable=invalid-name
  if opt.precomp_enc_type == "basic":
    return EncoderImagePrecomp(opt.img_dim, opt.embed_size, opt.no_imgnorm)
  if opt.precomp_enc_type == "weight_norm":
    return EncoderImageWeightNormPrecomp(opt.img_dim, opt.embed_size, opt.no_imgnorm)
  raise ValueError("Unknown precomp_enc_type: {}".format(opt.precomp_enc_type))


class EncoderText(nn.Module):

  def __init__(self, vocab_size, word_dim, embed_size, num_layers, use_bi_gru=False,
               no_txtnorm=False):
    super().__init__()
    self.embed_size = embed_size
    self.no_txtnorm = no_txtnorm
    self.embed = nn.Embedding(vocab_size, word_dim)
    self.use_bi_gru = use_bi_gru
    self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                      bidirectional=use_bi_gru)
    self.embed.weight.data.uniform_(-0.1, 0.1)

  def forward(self, x, lengths):
    """x: (B, L) ids sorted by decreasing length (their collate_fn sorts)."""
    x = self.embed(x)
    packed = pack_padded_sequence(x, lengths, batch_first=True)
    out, _ = self.rnn(packed)
    cap_emb, cap_len = pad_packed_sequence(out, batch_first=True)
    if self.use_bi_gru:
      half = cap_emb.size(2) // 2  # their Python 2 `/`
      cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2
    if not self.no_txtnorm:
      cap_emb = l2norm(cap_emb, dim=-1)
    return cap_emb, cap_len


def func_attention(query, context, opt, smooth, eps=1e-8):
  """query: (n_context, queryL, d), context: (n_context, sourceL, d)."""
  del eps  # unused in their code too
  batch_size, sourceL = context.size(0), context.size(1)
  queryL = query.size(1)
  queryT = torch.transpose(query, 1, 2)
  # (batch, sourceL, queryL)
  attn = torch.bmm(context, queryT)
  if opt.raw_feature_norm == "softmax":
    attn = attn.view(batch_size * sourceL, queryL)
    attn = nn.Softmax(dim=1)(attn)
    attn = attn.view(batch_size, sourceL, queryL)
  elif opt.raw_feature_norm == "l2norm":
    attn = l2norm(attn, 2)
  elif opt.raw_feature_norm == "clipped_l2norm":
    attn = nn.LeakyReLU(0.1)(attn)
    attn = l2norm(attn, 2)
  elif opt.raw_feature_norm in ("l1norm", "clipped_l1norm"):
    raise NameError("name 'l1norm_d' is not defined")  # what their code raises
  elif opt.raw_feature_norm == "clipped":
    attn = nn.LeakyReLU(0.1)(attn)
  elif opt.raw_feature_norm == "no_norm":
    pass
  else:
    raise ValueError("unknown first norm type:", opt.raw_feature_norm)
  attn = torch.transpose(attn, 1, 2).contiguous()
  attn = attn.view(batch_size * queryL, sourceL)
  attn = nn.Softmax(dim=1)(attn * smooth)
  attn = attn.view(batch_size, queryL, sourceL)
  attnT = torch.transpose(attn, 1, 2).contiguous()
  contextT = torch.transpose(context, 1, 2)
  weightedContext = torch.bmm(contextT, attnT)
  weightedContext = torch.transpose(weightedContext, 1, 2)
  return weightedContext, attnT


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
  w12 = torch.sum(x1 * x2, dim)
  w1 = torch.norm(x1, 2, dim)
  w2 = torch.norm(x2, 2, dim)
  return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def _aggregate(row_sim, opt):
  if opt.agg_func == "LogSumExp":
    row_sim.mul_(opt.lambda_lse).exp_()
    row_sim = row_sim.sum(dim=1, keepdim=True)
    row_sim = torch.log(row_sim) / opt.lambda_lse
  elif opt.agg_func == "Max":
    row_sim = row_sim.max(dim=1, keepdim=True)[0]
  elif opt.agg_func == "Sum":
    row_sim = row_sim.sum(dim=1, keepdim=True)
  elif opt.agg_func == "Mean":
    row_sim = row_sim.mean(dim=1, keepdim=True)
  else:
    raise ValueError("unknown aggfunc: {}".format(opt.agg_func))
  return row_sim


def _xattn_score(images, captions, cap_lens, opt, t2i: bool):
  """The loop of their xattn_score_t2i (words attend to regions) / xattn_score_i2t
  (regions attend to words)."""
  similarities = []
  n_image = images.size(0)
  n_caption = captions.size(0)
  for i in range(n_caption):
    n_word = int(cap_lens[i])
    cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous()
    cap_i_expand = cap_i.repeat(n_image, 1, 1)
    if t2i:
      weiContext, _ = func_attention(cap_i_expand, images, opt, smooth=opt.lambda_softmax)
      row_sim = cosine_similarity(cap_i_expand.contiguous(), weiContext.contiguous(), dim=2)
    else:
      weiContext, _ = func_attention(images, cap_i_expand, opt, smooth=opt.lambda_softmax)
      row_sim = cosine_similarity(images, weiContext, dim=2)
    similarities.append(_aggregate(row_sim, opt))
  return torch.cat(similarities, 1)


def xattn_score_t2i(images, captions, cap_lens, opt):
  """images (n_image, n_regions, d), captions (n_caption, max_n_word, d) -> (n_image, n_caption)."""
  return _xattn_score(images, captions, cap_lens, opt, t2i=True)


def xattn_score_i2t(images, captions, cap_lens, opt):
  """images (n_image, n_regions, d), captions (n_caption, max_n_word, d) -> (n_image, n_caption)."""
  return _xattn_score(images, captions, cap_lens, opt, t2i=False)


# ---------------------------------------------------------------------- evaluation.py


def _shard_xattn(score_fn, images, captions, caplens, opt, shard_size):
  n_im_shard = (len(images) - 1) // shard_size + 1
  n_cap_shard = (len(captions) - 1) // shard_size + 1
  d = np.zeros((len(images), len(captions)))
  for i in range(n_im_shard):
    im_start, im_end = shard_size * i, min(shard_size * (i + 1), len(images))
    for j in range(n_cap_shard):
      cap_start, cap_end = shard_size * j, min(shard_size * (j + 1), len(captions))
      im = torch.from_numpy(images[im_start:im_end])
      s = torch.from_numpy(captions[cap_start:cap_end])
      l = caplens[cap_start:cap_end]
      with torch.no_grad():
        sim = score_fn(im, s, l, opt)
      d[im_start:im_end, cap_start:cap_end] = sim.data.cpu().numpy()
  return d


def shard_xattn_t2i(images, captions, caplens, opt, shard_size=128):
  """Their pairwise t2i similarity with locality sharding (numpy in, float64 numpy out)."""
  return _shard_xattn(xattn_score_t2i, images, captions, caplens, opt, shard_size)


def shard_xattn_i2t(images, captions, caplens, opt, shard_size=128):
  """Their pairwise i2t similarity with locality sharding (numpy in, float64 numpy out)."""
  return _shard_xattn(xattn_score_i2t, images, captions, caplens, opt, shard_size)


def shard_xattn(images, captions, caplens, opt, shard_size=128):
  """evalrank's dispatch on opt.cross_attn."""
  if opt.cross_attn == "t2i":
    return shard_xattn_t2i(images, captions, caplens, opt, shard_size)
  if opt.cross_attn == "i2t":
    return shard_xattn_i2t(images, captions, caplens, opt, shard_size)
  raise NotImplementedError


# ------------------------------------------------------------------ model + checkpoint


class ScanModel:
  """model.py's `SCAN` without its optimizer: `img_enc`, `txt_enc` and their state-dict
  list layout."""

  def __init__(self, opt):
    self.opt = opt
    self.img_enc = EncoderImage(opt)
    self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size,
                               opt.num_layers, use_bi_gru=opt.bi_gru,
                               no_txtnorm=opt.no_txtnorm)

  def state_dict(self):
    return [self.img_enc.state_dict(), self.txt_enc.state_dict()]

  def load_state_dict(self, state_dict):
    # Their EncoderImagePrecomp.load_state_dict keeps only the keys it owns.
    own = self.img_enc.state_dict()
    self.img_enc.load_state_dict(OrderedDict((k, v) for k, v in state_dict[0].items()
                                             if k in own))
    self.txt_enc.load_state_dict(state_dict[1])

  def val_start(self):
    self.img_enc.eval()
    self.txt_enc.eval()


def _randomize(model: ScanModel, seed: int) -> None:
  """Non-trivial weights: every parameter gets a random perturbation, so a converter that
  drops a bias or mixes up a gate shows in the scores."""
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in (model.img_enc, model.txt_enc):
      for name, p in module.named_parameters():
        scale = 0.5 if "weight_g" in name else 0.05
        p.add_(scale * torch.randn(p.shape, generator=g))


def save_checkpoint(path: str, opt: dict, vocab_size: int, seed: int = 0) -> str:
  """Builds their model for `opt` (train.py options), with seeded random weights, and
  saves it as their train.py does (`model_best.pth.tar` layout:
  {"model": [img_enc.state_dict(), txt_enc.state_dict()], "opt": Namespace, "epoch",
  "best_rsum", "Eiters"}). Returns `path`."""
  torch.manual_seed(seed)
  ns = make_opt(opt, vocab_size)
  model = ScanModel(ns)
  _randomize(model, seed)
  common.save_checkpoint(path, model.state_dict(), ns, epoch=3, best_rsum=123.4, eiters=456)
  return path


def _load(path: str) -> ScanModel:
  ckpt = common.load_checkpoint(path)
  model = ScanModel(ckpt["opt"])
  model.load_state_dict(ckpt["model"])
  model.val_start()
  return model


def _encode(model: ScanModel, images, captions, lengths):
  """encode_data: images through img_enc; captions sorted by decreasing length (their
  collate_fn), encoded, and put back in order, zero-padded to the longest caption."""
  lengths = np.asarray(lengths, np.int64)
  with torch.no_grad():
    img_embs = model.img_enc(torch.from_numpy(np.asarray(images, np.float32))).numpy()
    order = np.argsort(-lengths, kind="stable")
    max_n_word = int(lengths.max())
    ids = torch.from_numpy(np.asarray(captions, np.int64)[order, :max_n_word])
    cap_emb, cap_len = model.txt_enc(ids, lengths[order].tolist())
  cap_embs = np.zeros((len(lengths), max_n_word, cap_emb.size(2)), np.float32)
  cap_embs[order, :cap_emb.size(1)] = cap_emb.numpy()
  cap_lens = [0] * len(lengths)
  for j, nid in enumerate(order):
    cap_lens[nid] = int(cap_len[j])
  return img_embs, cap_embs, cap_lens


def embeddings(path: str, images, captions, lengths) -> dict:
  """Their image region embeddings (n_img, k, E) and word embeddings (n_cap, L, E)
  (zero past each length) for the checkpoint at `path`."""
  model = _load(path)
  img_embs, cap_embs, cap_lens = _encode(model, images, captions, lengths)
  return {"images": img_embs, "captions": cap_embs, "lengths": np.asarray(cap_lens)}


def sims(path: str, images, captions, lengths, shard_size: int = 128) -> np.ndarray:
  """Their (n_img, n_cap) similarity matrix: load the checkpoint at `path`, encode as
  encode_data does, then shard_xattn_t2i / _i2t per opt.cross_attn (evalrank)."""
  model = _load(path)
  img_embs, cap_embs, cap_lens = _encode(model, images, captions, lengths)
  return shard_xattn(img_embs, cap_embs, cap_lens, model.opt, shard_size)


def xattn_scores(images, captions, lengths, opt: dict, shard_size: int = 128) -> np.ndarray:
  """Their shard loop on given embeddings (images (n_img, k, d), captions (n_cap, L, d),
  lengths) with options `opt` (cross_attn, agg_func, raw_feature_norm, lambdas)."""
  return shard_xattn(np.asarray(images, np.float32), np.asarray(captions, np.float32),
                     [int(n) for n in lengths], make_opt(opt), shard_size)


def time_shard_xattn(n_images: int, n_captions: int, n_regions: int = 36,
                     embed_size: int = 1024, lengths=None, opt: dict = None,
                     shard_size: int = 128, repeats: int = 3, threads: int = 0,
                     seed: int = 0) -> dict:
  """Median wall (and process CPU) seconds of their shard loop on random l2-normalised
  embeddings.

  Args:
    n_images, n_captions, n_regions, embed_size: the gallery's shape.
    lengths: caption lengths (n_captions,); default 5..25 words, seeded.
    opt: SCAN options (default t2i, clipped_l2norm, LogSumExp).
    repeats: timed runs (the median is returned).
    threads: torch intra-op threads (0: keep the process's setting).
  """
  if threads:
    torch.set_num_threads(int(threads))
  rng = np.random.default_rng(seed)
  if lengths is None:
    lengths = rng.integers(5, 26, n_captions)
  lengths = np.asarray(lengths, np.int64)
  images, captions = common.unit_embeddings(rng, n_images, n_captions, n_regions, embed_size,
                                            lengths)
  ns = make_opt(opt or {})
  caplens = lengths.tolist()
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    shard_xattn(images, captions, caplens, ns, shard_size)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {"median_s": statistics.median(times), "times_s": times,
          "median_cpu_s": statistics.median(cpu), "threads": torch.get_num_threads(),
          "torch": torch.__version__, "pairs": n_images * n_captions}


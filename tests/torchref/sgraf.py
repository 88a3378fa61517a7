"""PyTorch reference of SGRAF (Diao et al., AAAI 2021), written from Paranioar/SGRAF
(`main` @ 50d0c6f, `python3.6` @ a19d1a9: model.py, evaluation.py, opts.py, data.py) for
the parity tests and the speed comparison. Nothing here is their file; it restates
their equations in their order of operations:

- `EncoderImage`: Linear (Xavier-uniform, bias 0), l2norm (eps 1e-8 on the norm) unless
  --no_imgnorm;
- `EncoderText`: Embedding U(-0.1, 0.1), Dropout(0.4), nn.GRU `cap_rnn` over packed
  sequences, the BiGRU halves averaged (--bi_gru is store_false: on by default), l2norm;
- `VisualSA` (`embedding_local` = Linear, BatchNorm1d(36) over the region *slots*, Tanh,
  Dropout; `embedding_global` = Linear, BatchNorm1d(d), Tanh, Dropout; `embedding_common`
  = Linear(d, 1); softmax over regions; l2norm) and `TextSA` (the same without the
  BatchNorms);
- `EncoderSimilarity.forward`: the per-caption loop (caption sliced to its length and
  repeated over the shard's images), `SCAN_attention` (LeakyReLU(0.1), l2norm over the
  query axis, softmax(9 x) over the regions, l2norm of the context), the local and
  global similarity vectors l2norm(W (a - b)^2), SGR (`GraphReasoning` x sgr_step, no
  scaling, read node 0) or SAF (`AttentionFiltration`: Linear(s, 1), BatchNorm1d(1) over
  (images x nodes), sigmoid, l1norm, l2norm), then sigmoid(Linear(s, 1));
- `shard_attn_scores(..., shard_size=100)` of evaluation.py, filling a float64 matrix.

Adaptations to a current PyTorch on CPU that change no number: no `.cuda()`, `//` in the
BiGRU split (their python3.6 branch), `enforce_sorted` left at its default with the
captions sorted as their collate_fn sorts them.

Module-level imports: torch, numpy and the standard library only (tests/torchref/__init__.py).
"""
import argparse
import statistics
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from torchref import common

# opts.py defaults (what a released `opt` Namespace carries), paths shortened.
DEFAULT_OPT = dict(
    data_path="./data", data_name="f30k_precomp", vocab_path="./vocab/",
    model_name="./runs/f30k_SGR/checkpoint", logger_name="./runs/f30k_SGR/log",
    batch_size=128, num_epochs=40, lr_update=30, learning_rate=0.0002, workers=10,
    log_step=10, val_step=1000, grad_clip=2.0, margin=0.2, max_violation=True,
    img_dim=2048, word_dim=300, embed_size=1024, sim_dim=256, num_layers=1, bi_gru=True,
    no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=3)
NUM_REGION = 36  # EncoderSimilarity builds VisualSA(embed_size, 0.4, 36)


def make_opt(opt: dict, vocab_size: int = 0) -> argparse.Namespace:
  return common.make_opt(DEFAULT_OPT, opt, vocab_size, "SGRAF opts.py")


# --------------------------------------------------------------------------- model.py


def l1norm(x, dim, eps=1e-8):
  return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def l2norm(x, dim=-1, eps=1e-8):
  return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _xavier(linear: nn.Linear) -> None:
  r = np.sqrt(6.0) / np.sqrt(linear.in_features + linear.out_features)
  linear.weight.data.uniform_(-r, r)
  linear.bias.data.fill_(0)


class EncoderImage(nn.Module):

  def __init__(self, img_dim, embed_size, no_imgnorm=False):
    super().__init__()
    self.no_imgnorm = no_imgnorm
    self.fc = nn.Linear(img_dim, embed_size)
    _xavier(self.fc)

  def forward(self, images):
    emb = self.fc(images)
    return emb if self.no_imgnorm else l2norm(emb, dim=-1)


class EncoderText(nn.Module):

  def __init__(self, vocab_size, word_dim, embed_size, num_layers, use_bi_gru=False,
               no_txtnorm=False):
    super().__init__()
    self.no_txtnorm = no_txtnorm
    self.use_bi_gru = use_bi_gru
    self.embed = nn.Embedding(vocab_size, word_dim)
    self.dropout = nn.Dropout(0.4)
    self.cap_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=use_bi_gru)
    self.embed.weight.data.uniform_(-0.1, 0.1)

  def forward(self, captions, lengths):
    emb = self.dropout(self.embed(captions))
    out, _ = self.cap_rnn(pack_padded_sequence(emb, lengths, batch_first=True))
    emb, _ = pad_packed_sequence(out, batch_first=True)
    if self.use_bi_gru:
      half = emb.size(2) // 2
      emb = (emb[:, :, :half] + emb[:, :, half:]) / 2
    return emb if self.no_txtnorm else l2norm(emb, dim=-1)


def _init_bn(bn: nn.BatchNorm1d) -> None:
  bn.weight.data.fill_(1)
  bn.bias.data.zero_()


class _SelfAttentionPool(nn.Module):
  """The forward their VisualSA and TextSA share (they differ in their layers): local
  features weighted by their agreement with the global one, summed, l2-normalised."""

  def forward(self, local, raw_global):
    l_emb = self.embedding_local(local)
    g_emb = self.embedding_global(raw_global)
    g_emb = g_emb.unsqueeze(1).repeat(1, l_emb.size(1), 1)
    weights = self.embedding_common(l_emb.mul(g_emb)).squeeze(2)
    weights = torch.softmax(weights, dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(dim=1), dim=-1)


class VisualSA(_SelfAttentionPool):

  def __init__(self, embed_dim, dropout_rate, num_region):
    super().__init__()
    self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim),
                                         nn.BatchNorm1d(num_region), nn.Tanh(),
                                         nn.Dropout(dropout_rate))
    self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim),
                                          nn.BatchNorm1d(embed_dim), nn.Tanh(),
                                          nn.Dropout(dropout_rate))
    self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
    for seq in self.children():
      for m in seq:
        if isinstance(m, nn.Linear):
          _xavier(m)
        elif isinstance(m, nn.BatchNorm1d):
          _init_bn(m)


class TextSA(_SelfAttentionPool):

  def __init__(self, embed_dim, dropout_rate):
    super().__init__()
    self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(),
                                         nn.Dropout(dropout_rate))
    self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(),
                                          nn.Dropout(dropout_rate))
    self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
    for seq in self.children():
      for m in seq:
        if isinstance(m, nn.Linear):
          _xavier(m)


class GraphReasoning(nn.Module):

  def __init__(self, sim_dim):
    super().__init__()
    self.graph_query_w = nn.Linear(sim_dim, sim_dim)
    self.graph_key_w = nn.Linear(sim_dim, sim_dim)
    self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
    for m in (self.graph_query_w, self.graph_key_w, self.sim_graph_w):
      _xavier(m)

  def forward(self, sim_emb):
    query = self.graph_query_w(sim_emb)
    key = self.graph_key_w(sim_emb)
    edge = torch.softmax(torch.bmm(query, key.permute(0, 2, 1)), dim=-1)
    return torch.relu(self.sim_graph_w(torch.bmm(edge, sim_emb)))


class AttentionFiltration(nn.Module):

  def __init__(self, sim_dim):
    super().__init__()
    self.attn_sim_w = nn.Linear(sim_dim, 1)
    self.bn = nn.BatchNorm1d(1)
    _xavier(self.attn_sim_w)
    _init_bn(self.bn)

  def forward(self, sim_emb):
    attn = self.bn(self.attn_sim_w(sim_emb).permute(0, 2, 1))
    attn = l1norm(torch.sigmoid(attn), dim=-1)
    return l2norm(torch.matmul(attn, sim_emb).squeeze(1), dim=-1)


def scan_attention(query, context, smooth):
  """SCAN_attention: query (n, L, d), context (n, k, d) -> l2-normalised contexts."""
  attn = torch.bmm(context, query.transpose(1, 2))            # (n, k, L)
  attn = l2norm(nn.LeakyReLU(0.1)(attn), 2)                   # over the query axis
  attn = F.softmax(attn.transpose(1, 2).contiguous() * smooth, dim=2)   # over regions
  weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous())
  return l2norm(weighted.transpose(1, 2), dim=-1)


class EncoderSimilarity(nn.Module):

  def __init__(self, embed_size, sim_dim, module_name="SGR", sgr_step=3):
    super().__init__()
    self.module_name = module_name
    self.v_global_w = VisualSA(embed_size, 0.4, NUM_REGION)
    self.t_global_w = TextSA(embed_size, 0.4)
    self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
    self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
    self.sim_eval_w = nn.Linear(sim_dim, 1)
    if module_name == "SGR":
      self.SGR_module = nn.ModuleList([GraphReasoning(sim_dim) for _ in range(sgr_step)])
    elif module_name == "SAF":
      self.SAF_module = AttentionFiltration(sim_dim)
    else:
      raise ValueError("Invalid input of opt.module_name in opts.py")
    for m in (self.sim_tranloc_w, self.sim_tranglo_w, self.sim_eval_w):
      _xavier(m)

  def forward(self, img_emb, cap_emb, cap_lens):
    n_image = img_emb.size(0)
    img_glo = self.v_global_w(img_emb, torch.mean(img_emb, 1))
    out = []
    for i in range(cap_emb.size(0)):
      n_word = int(cap_lens[i])
      cap_i = cap_emb[i, :n_word, :].unsqueeze(0)
      cap_i_expand = cap_i.repeat(n_image, 1, 1)
      cap_glo_i = self.t_global_w(cap_i, torch.mean(cap_i, 1))
      context = scan_attention(cap_i_expand, img_emb, smooth=9.0)
      sim_loc = l2norm(self.sim_tranloc_w(torch.pow(context - cap_i_expand, 2)), dim=-1)
      sim_glo = l2norm(self.sim_tranglo_w(torch.pow(img_glo - cap_glo_i, 2)), dim=-1)
      sim_emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)
      if self.module_name == "SGR":
        for module in self.SGR_module:
          sim_emb = module(sim_emb)
        sim_vec = sim_emb[:, 0, :]
      else:
        sim_vec = self.SAF_module(sim_emb)
      out.append(torch.sigmoid(self.sim_eval_w(sim_vec)))
    return torch.cat(out, 1)


class SgrafModel:
  """model.py's `SGRAF` without its optimizer: img_enc, txt_enc, sim_enc."""

  def __init__(self, opt):
    self.opt = opt
    self.img_enc = EncoderImage(opt.img_dim, opt.embed_size, no_imgnorm=opt.no_imgnorm)
    self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers,
                               use_bi_gru=opt.bi_gru, no_txtnorm=opt.no_txtnorm)
    self.sim_enc = EncoderSimilarity(opt.embed_size, opt.sim_dim, opt.module_name,
                                     opt.sgr_step)

  @property
  def modules(self):
    return (self.img_enc, self.txt_enc, self.sim_enc)

  def state_dict(self):
    return [m.state_dict() for m in self.modules]

  def load_state_dict(self, state):
    own = self.img_enc.state_dict()
    self.img_enc.load_state_dict(OrderedDict((k, v) for k, v in state[0].items() if k in own))
    self.txt_enc.load_state_dict(state[1])
    self.sim_enc.load_state_dict(state[2])

  def val_start(self):
    for m in self.modules:
      m.eval()

  def train_start(self):
    for m in self.modules:
      m.train()


# ------------------------------------------------------------------------ evaluation.py


def shard_attn_scores(sim_enc, img_embs, cap_embs, cap_lens, shard_size=100):
  """Their shard loop (numpy in, float64 numpy out)."""
  n_im_shard = (len(img_embs) - 1) // shard_size + 1
  n_cap_shard = (len(cap_embs) - 1) // shard_size + 1
  sims = np.zeros((len(img_embs), len(cap_embs)))
  for i in range(n_im_shard):
    im_start, im_end = shard_size * i, min(shard_size * (i + 1), len(img_embs))
    for j in range(n_cap_shard):
      ca_start, ca_end = shard_size * j, min(shard_size * (j + 1), len(cap_embs))
      with torch.no_grad():
        im = torch.from_numpy(img_embs[im_start:im_end]).float()
        ca = torch.from_numpy(cap_embs[ca_start:ca_end]).float()
        sim = sim_enc(im, ca, cap_lens[ca_start:ca_end])
      sims[im_start:im_end, ca_start:ca_end] = sim.numpy()
  return sims


# ------------------------------------------------------------------ checkpoint helpers


def _randomize(model: SgrafModel, seed: int) -> None:
  """Every parameter and every BatchNorm running stat gets a seeded perturbation, so a
  converter that drops a bias, a stat or swaps a gate shows in the scores."""
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules:
      for name, p in module.named_parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
      for name, b in module.named_buffers():
        if name.endswith("running_mean"):
          b.copy_(0.2 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
          b.copy_(0.5 + torch.rand(b.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
          b.fill_(17)


def save_checkpoint(path: str, opt: dict, vocab_size: int, seed: int = 0) -> str:
  """Their model for `opt` (opts.py options) with seeded random weights, saved as their
  train.py saves it ({"epoch", "model": [img_enc, txt_enc, sim_enc] state dicts,
  "best_rsum", "opt": Namespace, "Eiters"}). Returns `path`."""
  torch.manual_seed(seed)
  ns = make_opt(opt, vocab_size)
  model = SgrafModel(ns)
  _randomize(model, seed)
  common.save_checkpoint(path, model.state_dict(), ns, epoch=7, best_rsum=321.5, eiters=890)
  return path


def _load(path: str) -> SgrafModel:
  ckpt = common.load_checkpoint(path)
  model = SgrafModel(ckpt["opt"])
  model.load_state_dict(ckpt["model"])
  return model


def _encode(model: SgrafModel, images, captions, lengths):
  """encode_data: images through img_enc; captions sorted by decreasing length (their
  collate_fn), encoded, put back in order and zero-padded to the longest caption."""
  lengths = np.asarray(lengths, np.int64)
  img_embs = model.img_enc(torch.from_numpy(np.asarray(images, np.float32)))
  order = np.argsort(-lengths, kind="stable")
  max_n_word = int(lengths.max())
  ids = torch.from_numpy(np.asarray(captions, np.int64)[order, :max_n_word])
  cap_emb = model.txt_enc(ids, lengths[order].tolist())
  cap_embs = torch.zeros((len(lengths), max_n_word, cap_emb.size(2)))
  cap_embs[torch.from_numpy(order)] = cap_emb
  return img_embs, cap_embs, lengths.tolist()


def embeddings(path: str, images, captions, lengths) -> dict:
  """Their region (n_img, k, d) and word (n_cap, L, d) embeddings, eval mode."""
  model = _load(path)
  model.val_start()
  with torch.no_grad():
    img, cap, lens = _encode(model, images, captions, lengths)
    img_glo = model.sim_enc.v_global_w(img, torch.mean(img, 1))
    cap_glo = torch.stack([model.sim_enc.t_global_w(cap[j:j + 1, :n], torch.mean(
        cap[j:j + 1, :n], 1))[0] for j, n in enumerate(lens)])
  return {"images": img.numpy(), "captions": cap.numpy(), "image_global": img_glo.numpy(),
          "caption_global": cap_glo.numpy()}


def sims(path: str, images, captions, lengths, shard_size: int = 100) -> np.ndarray:
  """Their evalrank similarity matrix: load, encode (eval mode), shard_attn_scores."""
  model = _load(path)
  model.val_start()
  with torch.no_grad():
    img, cap, lens = _encode(model, images, captions, lengths)
  return shard_attn_scores(model.sim_enc, img.numpy(), cap.numpy(), lens, shard_size)


def train_forward(path: str, images, captions, lengths) -> dict:
  """One train-mode forward (train_start, forward_emb, forward_sim) with every dropout
  set to 0, as their train_emb runs it on a batch whose captions are sorted by
  decreasing length (pass them sorted). Returns the (B, B) scores and every BatchNorm's
  running stats afterwards ({state-dict key: array})."""
  model = _load(path)
  model.train_start()
  for module in model.modules:
    for m in module.modules():
      if isinstance(m, nn.Dropout):
        m.p = 0.0
  lengths = [int(n) for n in lengths]
  if lengths != sorted(lengths, reverse=True):
    raise ValueError("train_forward: captions must be sorted by decreasing length")
  with torch.no_grad():
    img = model.img_enc(torch.from_numpy(np.asarray(images, np.float32)))
    ids = torch.from_numpy(np.asarray(captions, np.int64)[:, :max(lengths)])
    cap = model.txt_enc(ids, lengths)
    scores = model.sim_enc(img, cap, lengths)
  stats = {f"sim_enc.{k}": v.numpy().copy() for k, v in model.sim_enc.state_dict().items()
           if k.endswith(("running_mean", "running_var"))}
  return {"scores": scores.numpy(), "stats": stats}


def time_shard_attn(n_images: int, n_captions: int, n_regions: int = NUM_REGION,
                    embed_size: int = 1024, sim_dim: int = 256, module_name: str = "SGR",
                    lengths=None, max_len: int = 32, shard_size: int = 100,
                    repeats: int = 1, threads: int = 0, seed: int = 0) -> dict:
  """Wall and process-CPU seconds of their shard_attn_scores on random l2-normalised
  embeddings (CPU seconds stay comparable on a shared machine).

  Args:
    lengths: caption lengths; default uniform in 8..max_len, seeded (the benchmark's).
    repeats: timed runs (the median is returned). threads: torch intra-op threads
      (0: keep the process's).
  """
  if threads:
    torch.set_num_threads(int(threads))
  if n_regions != NUM_REGION:
    raise ValueError(f"their EncoderSimilarity hard-codes {NUM_REGION} regions")
  rng = np.random.default_rng(seed)
  if lengths is None:
    lengths = rng.integers(min(8, max_len), max_len + 1, n_captions)
  lengths = np.asarray(lengths, np.int64)
  images, captions = common.unit_embeddings(rng, n_images, n_captions, n_regions, embed_size,
                                            lengths)
  torch.manual_seed(seed)
  sim_enc = EncoderSimilarity(embed_size, sim_dim, module_name, 3)
  sim_enc.eval()
  times, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    out = shard_attn_scores(sim_enc, images, captions, lengths.tolist(), shard_size)
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return {"median_s": statistics.median(times), "times_s": times,
          "median_cpu_s": statistics.median(cpu), "cpu_s": cpu,
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "pairs": n_images * n_captions, "mean_len": float(lengths.mean()),
          "finite": bool(np.isfinite(out).all())}

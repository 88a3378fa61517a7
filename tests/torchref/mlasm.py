"""PyTorch reference of MLASM, written from xiaohu306/MLASM @ 77e6f58 (model.py,
evaluation.py, train.py, opts.py, data.py) for the parity tests. Nothing here is their
file; it restates their model in their order of operations:

- `EncoderImage`: `cnn` (their `nn.DataParallel(resnet152)` with `fc = nn.Sequential()`,
  so it returns the pooled feature), l2norm, `fc`; `fc_attn_i` of the attended regions;
  `Fusion` (`gate0` on [global; local], sigmoid gate, `fusion0` / `fusion1` built and
  never called); l2norm. Xavier-uniform init of `fc` and `fc_attn_i`, PyTorch defaults
  for the fusion;
- `EncoderRegion` (Linear, Xavier, bias 0, l2norm), `EncoderWord` (Embedding,
  Dropout(0.1), unidirectional nn.GRU over packed sequences with enforce_sorted=False,
  l2norm per token), `EncoderText` (`fc_text`, l2norm; its `sa = TextSA(E, 0.4)` is the
  SGRAF module their code evidently had in scope (the released model.py neither defines
  nor imports it): taken from torchref.sgraf so that the checkpoint carries `sa.*`);
- `func_attention` (LeakyReLU(0.1), l2norm over the query axis, softmax over the
  context with the hard-coded smooth 9 (t2i) / 4 (i2t)), `cosine_similarity`,
  `xattn_score_t2i` / `xattn_score_i2t` with their diagonal `weiContext[i, i]` (the
  pair-conditioned local vectors), `xattn_score_t2i1` / `_i2t1` and `shard_xattn_all`
  of evaluation.py (shard loop, per-caption loop, float64 NumPy matrix, `ratio`);
- `encode_data` on their paired eval loader (caption c with image c // 5, batches in
  order, each batch's captions padded to its longest), then `img_embs[::5]` (evalrank);
- `ContrastiveLoss`'s score matrix `ratio S_local + (1 - ratio) img_emb cap_emb^T` and
  hinge (always the hardest negatives).

Adaptations that change no number at their sizes: `embed_size` replaces their
hard-coded 1024 (fc_attn_i, Fusion, fc_text, the `.view(1, 1024)`) and `img_dim` their
2048 (fc_region); the CNN is a small transformers `ResNetModel` (bottleneck v1.5, the
maths of torchvision's ResNet-152; torchvision does not install beside this torch),
saved under torchvision's key names after `cnn.module.` as their checkpoint holds it; no
vocabulary pickle or torchtext GloVe is loaded in `EncoderWord.__init__` (the weights
come from the checkpoint); no `Variable` / `.cuda()`.

Module-level imports: torch, transformers, numpy and the standard library only.
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import ResNetConfig, ResNetModel

from torchref import common
from torchref import resnet as ref_resnet
from torchref.sgraf import TextSA

# opts.py defaults (the options a released `opt` Namespace carries), paths shortened;
# train.py then sets cross_attn = "all".
DEFAULT_OPT = dict(
    ratio=0.8, logger_name="./run/coco/checkpoint", data_name="coco",
    model_name="./run/coco/checkpoint", data_path="/data1/data/vlp", feature_path="",
    vocab_path="./vocab/", margin=0.2, num_epochs=20, batch_size=128, word_dim=300,
    embed_size=1024, grad_clip=2.0, crop_size=224, num_layers=1, learning_rate=0.0005,
    lr_update=10, workers=4, log_step=20, val_step=10, resume="", max_violation=True,
    img_dim=2048, finetune=False, cnn_type="resnet152", use_restval=False,
    measure="cosine", use_abs=False, no_imgnorm=False, no_txtnorm=False, reset_train=True,
    cross_attn="all")


def make_opt(opt: dict, vocab_size: int = 0) -> argparse.Namespace:
  return common.make_opt(DEFAULT_OPT, opt, vocab_size, "MLASM opts.py")


# --------------------------------------------------------------------------- model.py


def l2norm(X, dim=-1, eps=1e-8):
  norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
  return torch.div(X, norm)


def _xavier(linear: nn.Linear) -> None:
  r = np.sqrt(6.) / np.sqrt(linear.in_features + linear.out_features)
  linear.weight.data.uniform_(-r, r)
  linear.bias.data.fill_(0)


class Fusion(nn.Module):

  def __init__(self, f_size):
    super().__init__()
    self.f_size = f_size
    self.gate0 = nn.Linear(self.f_size * 2, self.f_size)
    self.fusion0 = nn.Linear(self.f_size, self.f_size)
    self.fusion1 = nn.Linear(self.f_size, self.f_size)

  def forward(self, vec1, vec2):
    vec = torch.cat((vec1, vec2), dim=1)
    features_1 = self.gate0(vec)
    t = torch.sigmoid(features_1)
    return t * vec1 + (1 - t) * vec2


class EncoderImage(nn.Module):

  def __init__(self, embed_size, cnn: ResNetModel):
    super().__init__()
    self.embed_size = embed_size
    self.cnn = cnn
    for param in self.cnn.parameters():
      param.requires_grad = False  # finetune=False
    self.fc = nn.Linear(cnn.config.hidden_sizes[-1], embed_size)
    self.fc_attn_i = nn.Linear(embed_size, embed_size)
    self.fusion = Fusion(embed_size)
    _xavier(self.fc)
    _xavier(self.fc_attn_i)

  def pooled(self, images):
    """What their `self.cnn(images)` returns: torchvision's avgpool output, flattened
    (fc replaced by an empty Sequential)."""
    return self.cnn(pixel_values=images).pooler_output.flatten(1)

  def forward(self, images, local_image):
    features = self.pooled(images)
    features = l2norm(features)
    features = self.fc(features)
    features_1 = self.fc_attn_i(local_image)
    return l2norm(self.fusion(features, features_1))

  def authors_state_dict(self):
    """The state dict their EncoderImage holds: `cnn.module.<torchvision key>`."""
    out = {}
    for key, value in self.state_dict().items():
      if not key.startswith("cnn."):
        out[key] = value
    for key, value in ref_resnet.hf_to_torchvision(self.cnn.state_dict()).items():
      out["cnn.module." + key] = value
    return out


class EncoderRegion(nn.Module):

  def __init__(self, img_dim, embed_size):
    super().__init__()
    self.fc_region = nn.Linear(img_dim, embed_size)
    _xavier(self.fc_region)

  def forward(self, region_feat):
    return l2norm(self.fc_region(region_feat), dim=-1)


class EncoderWord(nn.Module):

  def __init__(self, vocab_size, word_dim, embed_size, num_layers=1):
    super().__init__()
    self.embed_size = embed_size
    self.embed = nn.Embedding(vocab_size, word_dim)
    self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True)
    self.dropout = nn.Dropout(0.1)

  def forward(self, x, lengths):
    x = self.embed(x)
    x = self.dropout(x)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = self.rnn(packed)
    cap_emb, _ = pad_packed_sequence(out, batch_first=True)
    cap_emb = l2norm(cap_emb, dim=-1)
    cap_emb_mean = l2norm(torch.mean(cap_emb, 1))
    return cap_emb, cap_emb_mean


class EncoderText(nn.Module):

  def __init__(self, embed_size):
    super().__init__()
    self.sa = TextSA(embed_size, 0.4)
    self.fc_text = nn.Linear(embed_size, embed_size)
    _xavier(self.fc_text)

  def forward(self, word_emb):
    return l2norm(self.fc_text(word_emb))


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
  w12 = torch.sum(x1 * x2, dim)
  w1 = torch.norm(x1, 2, dim)
  w2 = torch.norm(x2, 2, dim)
  return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def func_attention(query, context, smooth):
  queryT = torch.transpose(query, 1, 2)
  attn = torch.bmm(context, queryT)
  attn = nn.LeakyReLU(0.1)(attn)
  attn = l2norm(attn, 2)
  attn = torch.transpose(attn, 1, 2).contiguous()
  attn = F.softmax(attn * smooth, dim=2)
  attnT = torch.transpose(attn, 1, 2).contiguous()
  contextT = torch.transpose(context, 1, 2)
  weightedContext = torch.bmm(contextT, attnT)
  return torch.transpose(weightedContext, 1, 2)


def _xattn(images, captions, cap_lens, t2i: bool):
  """The loop of their xattn_score_t2i / _i2t (and the `1` variants): (n_image,
  n_caption) scores and the contexts averaged over words (t2i) or regions (i2t),
  (n_image, n_caption, d)."""
  similarities, wei = [], []
  n_image, n_caption = images.size(0), captions.size(0)
  for i in range(n_caption):
    n_word = cap_lens[i]
    cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous()
    cap_i_expand = cap_i.repeat(n_image, 1, 1)
    if t2i:
      query = cap_i_expand.contiguous()
      weiContext = func_attention(cap_i_expand, images, smooth=9.).contiguous()
    else:
      query = images
      weiContext = func_attention(images, cap_i_expand, smooth=4.)
    row_sim = cosine_similarity(query, weiContext, dim=2)
    similarities.append(row_sim.mean(dim=1, keepdim=True))
    wei.append(weiContext.mean(dim=1, keepdim=True))
  return torch.cat(similarities, 1), torch.cat(wei, 1)


def _diagonal(wei):
  """Their `torch.cat([wei[i, i, :].view(1, d) ...])`: each image's own context."""
  return torch.cat([wei[i, i, :].view(1, wei.size(2)) for i in range(wei.size(0))], 0)


def xattn_score_t2i(images, captions, cap_lens):
  """Scores (n_image, n_caption) and the diagonal t2i contexts averaged over words."""
  similarities, wei = _xattn(images, captions, cap_lens, t2i=True)
  return similarities, _diagonal(wei)


def xattn_score_i2t(images, captions, cap_lens):
  """Scores (n_image, n_caption) and the diagonal i2t contexts averaged over regions."""
  similarities, wei = _xattn(images, captions, cap_lens, t2i=False)
  return similarities, _diagonal(wei)


def xattn_score_t2i1(images, captions, cap_lens):
  return _xattn(images, captions, cap_lens, t2i=True)[0]


def xattn_score_i2t1(images, captions, cap_lens):
  return _xattn(images, captions, cap_lens, t2i=False)[0]


class JZK:
  """model.py's `JZK` without its optimizer and logger."""

  def __init__(self, opt, cnn: ResNetModel):
    self.opt = opt
    self.img_enc = EncoderImage(opt.embed_size, cnn)
    self.region_enc = EncoderRegion(opt.img_dim, opt.embed_size)
    self.cap_enc = EncoderText(opt.embed_size)
    self.word_enc = EncoderWord(opt.vocab_size, opt.word_dim, opt.embed_size,
                                opt.num_layers)

  def modules(self):
    return (self.img_enc, self.cap_enc, self.region_enc, self.word_enc)

  def state_dict(self):
    return [self.img_enc.authors_state_dict(), self.cap_enc.state_dict(),
            self.region_enc.state_dict(), self.word_enc.state_dict()]

  def train_start(self):
    for m in self.modules():
      m.train()

  def val_start(self):
    for m in self.modules():
      m.eval()

  def local_sim(self, region_emb, word_emb, length):
    score1, attn_t = xattn_score_i2t(region_emb, word_emb, length)
    score2, attn_i = xattn_score_t2i(region_emb, word_emb, length)
    return 0.5 * (score1 + score2), attn_t, attn_i

  def forward_emb(self, images, region_feat, captions, lengths):
    region_emb = self.region_enc(region_feat)
    word_emb, _ = self.word_enc(captions, lengths)
    sims_local, attn_txt, attn_img = self.local_sim(region_emb, word_emb, lengths)
    img_emb = self.img_enc(images, attn_img)
    cap_emb = self.cap_enc(attn_txt)
    return img_emb, cap_emb, region_emb, word_emb, lengths, sims_local

  def loss_scores(self, img_emb, cap_emb, sims_local):
    """ContrastiveLoss.forward's score matrix."""
    return self.opt.ratio * sims_local + (1 - self.opt.ratio) * img_emb.mm(cap_emb.t())


def hinge(scores, margin):
  """ContrastiveLoss.forward from the score matrix on: always the hardest negatives."""
  diagonal = scores.diag().view(scores.size(0), 1)
  d1 = diagonal.expand_as(scores)
  d2 = diagonal.t().expand_as(scores)
  cost_s = (margin + scores - d1).clamp(min=0)
  cost_im = (margin + scores - d2).clamp(min=0)
  mask = torch.eye(scores.size(0)) > .5
  cost_s = cost_s.masked_fill_(mask, 0)
  cost_im = cost_im.masked_fill_(mask, 0)
  return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


# ---------------------------------------------------------------------- evaluation.py


def shard_xattn_all(img_embs, cap_embs, region_embs, word_embs, caplens, opt,
                    shard_size=128):
  n_im_shard = (len(region_embs) - 1) // shard_size + 1
  n_cap_shard = (len(word_embs) - 1) // shard_size + 1
  sims_local = np.zeros((len(region_embs), len(word_embs)))
  with torch.no_grad():
    for i in range(n_im_shard):
      im_start, im_end = shard_size * i, min(shard_size * (i + 1), len(region_embs))
      for j in range(n_cap_shard):
        cap_start, cap_end = shard_size * j, min(shard_size * (j + 1), len(word_embs))
        re = torch.from_numpy(region_embs[im_start:im_end]).float()
        wo = torch.from_numpy(word_embs[cap_start:cap_end]).float()
        l = caplens[cap_start:cap_end]
        sim1 = xattn_score_i2t1(re, wo, l)
        sim2 = xattn_score_t2i1(re, wo, l)
        sims_local[im_start:im_end, cap_start:cap_end] = (0.5 * sim1 + 0.5 * sim2).numpy()
  sims_global = np.dot(img_embs, cap_embs.T)
  d = opt.ratio * sims_local + (1 - opt.ratio) * sims_global
  return d, sims_local, sims_global


def _paired_batches(n_cap, batch_size, cpi):
  for start in range(0, n_cap, batch_size):
    ids = list(range(start, min(start + batch_size, n_cap)))
    yield ids, [c // cpi for c in ids]


def encode_data(model: JZK, pixels, regions, captions, lengths, batch_size, cpi=5):
  """Their encode_data over their paired eval loader: batch items are (image c // cpi,
  caption c) for captions c in order; each batch's captions padded to its longest."""
  model.val_start()
  n = len(lengths)
  max_n_word = int(max(lengths))
  img_embs = cap_embs = region_embs = word_embs = None
  cap_lens = [0] * n
  with torch.no_grad():
    for ids, owners in _paired_batches(n, batch_size, cpi):
      lens = [int(lengths[c]) for c in ids]
      width = max(lens)
      targets = torch.from_numpy(np.asarray(captions, np.int64)[ids, :width])
      images = torch.from_numpy(np.asarray(pixels, np.float32)[owners])
      region_feat = torch.from_numpy(np.asarray(regions, np.float32)[owners])
      img_emb, cap_emb, region_emb, word_emb, cap_len, _ = model.forward_emb(
          images, region_feat, targets, lens)
      if img_embs is None:
        img_embs = np.zeros((n, img_emb.size(1)))
        cap_embs = np.zeros((n, cap_emb.size(1)))
        region_embs = np.zeros((n, region_emb.size(1), region_emb.size(2)))
        word_embs = np.zeros((n, max_n_word, word_emb.size(2)))
      img_embs[ids] = img_emb.numpy().copy()
      cap_embs[ids] = cap_emb.numpy().copy()
      region_embs[ids] = region_emb.numpy().copy()
      word_embs[ids, :width, :] = word_emb.numpy().copy()
      for j, nid in enumerate(ids):
        cap_lens[nid] = cap_len[j]
  return img_embs, cap_embs, region_embs, word_embs, cap_lens


# ------------------------------------------------------------------ model + checkpoint


def _randomize(model: JZK, seed: int) -> None:
  """Non-trivial weights: every trained or frozen parameter outside the CNN gets a
  random perturbation, so a converter that drops a bias or mixes up a gate shows."""
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in (model.img_enc, model.cap_enc, model.region_enc, model.word_enc):
      for name, p in module.named_parameters():
        if not name.startswith("cnn."):
          p.add_(0.05 * torch.randn(p.shape, generator=g))


def save_checkpoint(path: str, opt: dict, vocab_size: int, cnn_dir: str, depths=(1, 1, 1, 1),
                    hidden_sizes=(16, 32, 48, 64), embedding_size: int = 8,
                    drift_pixels=None, seed: int = 0) -> dict:
  """Builds their model for `opt` with a small random ResNet as `cnn` (written to
  `cnn_dir` by torchref.resnet.build, whose random BatchNorm statistics it starts from),
  seeded random weights, and saves it as their train.py does: {"epoch", "model":
  [img_enc, cap_enc, region_enc, word_enc] state dicts, "best_rsum", "opt", "Eiters"}.

  `drift_pixels` (NCHW): one `train_start()` pass of the CNN over them first, which
  drifts its BatchNorm running stats as their frozen-but-train-mode CNN does.

  Returns {"path", "global_dim", "keys": {encoder: [keys]}}.
  """
  torch.manual_seed(seed)
  ref_resnet.build(cnn_dir, depths, hidden_sizes, embedding_size, seed=seed)
  cnn = ref_resnet._model(cnn_dir)  # pylint: disable=protected-access
  cnn = ResNetModel(cnn.config)
  cnn.load_state_dict(ref_resnet._model(cnn_dir).state_dict())  # pylint: disable=protected-access
  ns = make_opt(opt, vocab_size)
  model = JZK(ns, cnn)
  _randomize(model, seed)
  if drift_pixels is not None:
    model.train_start()
    with torch.no_grad():
      model.img_enc.pooled(torch.from_numpy(np.asarray(drift_pixels, np.float32)))
  model.val_start()
  state = model.state_dict()
  common.save_checkpoint(path, state, ns, epoch=15, best_rsum=501.66, eiters=9876)
  return {"path": path, "global_dim": int(cnn.config.hidden_sizes[-1]),
          "keys": {name: list(sd) for name, sd in
                   zip(("img_enc", "cap_enc", "region_enc", "word_enc"), state)}}


def _load(path: str) -> JZK:
  ckpt = common.load_checkpoint(path)
  opt = ckpt["opt"]
  img_state = ckpt["model"][0]
  # Rebuild the small CNN from the checkpoint's own shapes (their code builds resnet152).
  stages = sorted({int(k.split(".")[2][len("layer"):]) for k in img_state
                   if k.startswith("cnn.module.layer")})
  depths = [1 + max(int(k.split(".")[3]) for k in img_state
                    if k.startswith(f"cnn.module.layer{s}.")) for s in stages]
  hidden = [int(img_state[f"cnn.module.layer{s}.0.conv3.weight"].shape[0]) for s in stages]
  stem = int(img_state["cnn.module.conv1.weight"].shape[0])
  config = ResNetConfig(num_channels=3, embedding_size=stem, hidden_sizes=hidden,
                        depths=depths, layer_type="bottleneck", hidden_act="relu",
                        downsample_in_first_stage=False, downsample_in_bottleneck=False)
  model = JZK(opt, ResNetModel(config))
  own = {k: v for k, v in img_state.items() if not k.startswith("cnn.")}
  tv = {k[len("cnn.module."):]: v for k, v in img_state.items() if k.startswith("cnn.")}
  hf_names = ref_resnet.hf_to_torchvision(model.img_enc.cnn.state_dict())
  back = {tv_key: hf_key for hf_key, tv_key in zip(model.img_enc.cnn.state_dict(), hf_names)}
  model.img_enc.cnn.load_state_dict({back[k]: v for k, v in tv.items()}, strict=True)
  missing = model.img_enc.load_state_dict(own, strict=False)
  if missing.unexpected_keys or [k for k in missing.missing_keys if not k.startswith("cnn.")]:
    raise KeyError(f"img_enc keys do not match: {missing}")
  model.cap_enc.load_state_dict(ckpt["model"][1])
  model.region_enc.load_state_dict(ckpt["model"][2])
  model.word_enc.load_state_dict(ckpt["model"][3])
  model.val_start()
  return model


def evalrank_sims(path: str, pixels, regions, captions, lengths, batch_size: int = 8,
                  shard_size: int = 128, cpi: int = 5) -> dict:
  """Their evalrank (fold5=False) on given inputs: encode_data over the paired loader,
  `[::5]` subsampling, shard_xattn_all. Returns {"sims" (ratio-mixed), "sims_local",
  "sims_global", "global_feat" (the CNN's pooled features of the images)}."""
  model = _load(path)
  img_embs, cap_embs, region_embs, word_embs, cap_lens = encode_data(
      model, pixels, regions, captions, lengths, batch_size, cpi)
  img_embs = img_embs[::cpi]
  region_embs = region_embs[::cpi]
  d, sims_local, sims_global = shard_xattn_all(img_embs, cap_embs, region_embs, word_embs,
                                               cap_lens, model.opt, shard_size)
  with torch.no_grad():
    pooled = model.img_enc.pooled(torch.from_numpy(np.asarray(pixels, np.float32))).numpy()
  return {"sims": d, "sims_local": sims_local, "sims_global": sims_global,
          "global_feat": pooled}


def train_scores(path: str, pixels, regions, captions, lengths) -> dict:
  """The score matrix and loss of their ContrastiveLoss on one batch of B (image,
  caption) pairs, every module in eval mode (no dropout, running BatchNorm stats)."""
  model = _load(path)
  with torch.no_grad():
    img_emb, cap_emb, _, _, _, sims_local = model.forward_emb(
        torch.from_numpy(np.asarray(pixels, np.float32)),
        torch.from_numpy(np.asarray(regions, np.float32)),
        torch.from_numpy(np.asarray(captions, np.int64)[:, :int(max(lengths))]),
        [int(n) for n in lengths])
    scores = model.loss_scores(img_emb, cap_emb, sims_local)
    loss = hinge(scores, model.opt.margin)
  return {"scores": scores.numpy(), "loss": float(loss)}

"""CHAN's PyTorch modules, written from the authors' code (ppanzx/CHAN lib/encoders.py,
lib/coding.py, lib/modules.py, lib/loss.py, lib/model.py, lib/evaluation.py, train.py),
the reference for dsran_jax's chan family. Module level: torch, transformers, numpy,
stdlib only.
"""
import numpy as np
import torch
import transformers
from torch import nn

from torchref import common, vse_infty

EPS = 1e-8
MASK = -1

# Their lib/arguments.py defaults (the options these modules read), plus word2idx, which
# train.py sets on opt (None without GloVe).
DEFAULTS = dict(data_name="precomp", num_epochs=30, batch_size=128, word_dim=300,
                embed_size=1024, num_layers=1, grad_clip=2.0, learning_rate=0.0002,
                lr_update=15, optim="adam", max_violation=False, img_dim=2048,
                no_imgnorm=False, no_txtnorm=False, precomp_enc_type="basic",
                text_enc_type="bigru", wemb_type=None, vse_mean_warmup_epochs=0,
                embedding_warmup_epochs=2, drop=False, obj_drop_rate=0.2,
                criterion="ContrastiveLoss", margin=0.2, temperature=0.01,
                coding_type=None, pooling_type=None, alpha=None, belta=0.1, seed=2022,
                word2idx=None)


def l2norm(x, dim, eps=EPS):
  return x / (torch.norm(x, p=2, dim=dim, keepdim=True) + eps)


def get_mask(lens):
  batch, max_l = lens.shape[0], int(lens.max())
  mask = torch.arange(max_l).expand(batch, max_l)
  return (mask < lens.long().unsqueeze(dim=1)).float().unsqueeze(-1)


def get_fgsims(imgs, caps):
  bi, n_r, embi = imgs.shape
  bc, n_w, embc = caps.shape
  sims = torch.matmul(imgs.reshape(bi * n_r, embi), caps.reshape(bc * n_w, embc).t())
  return sims.reshape(bi, n_r, bc, n_w).permute(0, 2, 1, 3)


def get_fgmask(img_lens, cap_lens):
  bi, bc = img_lens.shape[0], cap_lens.shape[0]
  max_r, max_w = int(img_lens.max()), int(cap_lens.max())
  mask_i = torch.arange(max_r).expand(bi, max_r)
  mask_i = (mask_i < img_lens.long().unsqueeze(dim=1)).float().unsqueeze(-1)
  mask_i = mask_i.reshape(bi * max_r, 1)
  mask_c = torch.arange(max_w).expand(bc, max_w)
  mask_c = (mask_c < cap_lens.long().unsqueeze(dim=1)).float().unsqueeze(-1)
  mask_c = mask_c.reshape(bc * max_w, 1).t()
  return torch.matmul(mask_i, mask_c).reshape(bi, max_r, bc, max_w).permute(0, 2, 1, 3)


class VHACoding(nn.Module):
  def forward(self, imgs, caps, img_lens, cap_lens):
    max_r, max_w = int(img_lens.max()), int(cap_lens.max())
    sims = get_fgsims(imgs, caps)[:, :, :max_r, :max_w]
    sims = sims.masked_fill(get_fgmask(img_lens, cap_lens) == 0, MASK)
    return sims.max(dim=-2)[0]


class THACoding(nn.Module):
  def forward(self, imgs, caps, img_lens, cap_lens):
    max_r, max_w = int(img_lens.max()), int(cap_lens.max())
    sims = get_fgsims(imgs, caps)[:, :, :max_r, :max_w]
    sims = sims.masked_fill(get_fgmask(img_lens, cap_lens) == 0, MASK)
    return sims.max(dim=-1)[0]


class VSACoding(nn.Module):
  def __init__(self, temperature=0.1):
    super().__init__()
    self.temperature = temperature

  def forward(self, imgs, caps, img_lens, cap_lens):
    max_r, max_w = int(img_lens.max()), int(cap_lens.max())
    imgs, caps = imgs[:, :max_r, :], caps[:, :max_w, :]
    sims = get_fgsims(imgs, caps)[:, :, :max_r, :max_w]
    mask = get_fgmask(img_lens, cap_lens)
    sims = sims / self.temperature
    sims = torch.softmax(sims.masked_fill(mask == 0, -torch.inf), dim=-1)
    sims = sims.masked_fill(mask == 0, 0)
    sims = torch.matmul(sims, caps)
    sims = torch.mul(sims.permute(1, 0, 2, 3), imgs).permute(1, 0, 2, 3).sum(dim=-1) \
        / (torch.norm(sims, p=2, dim=-1, keepdim=False) + EPS)
    mask = get_mask(img_lens).permute(0, 2, 1).repeat(1, cap_lens.size(0), 1)
    return sims.masked_fill(mask == 0, -1)


class MaxPooling(nn.Module):
  def forward(self, sims):
    return sims.max(dim=-1)[0]


class MeanPooling(nn.Module):
  def forward(self, sims):
    lens = (sims != MASK).sum(dim=-1)
    sims[sims == MASK] = 0
    return sims.sum(dim=-1) / lens


class SumPooling(nn.Module):
  def forward(self, sims):
    sims[sims == MASK] = 0
    return sims.sum(dim=-1)


class LSEPooling(nn.Module):
  def __init__(self, temperature=0.1):
    super().__init__()
    self.temperature = temperature

  def forward(self, sims):
    sims[sims == MASK] = -torch.inf
    return torch.logsumexp(sims / self.temperature, dim=-1)


class SoftmaxPooling(nn.Module):
  def __init__(self, temperature=0.1):
    super().__init__()
    self.temperature = temperature

  def forward(self, sims):
    sims[sims == MASK] = -torch.inf
    weight = torch.softmax(sims / self.temperature, dim=-1)
    return (weight * sims).sum(dim=-1)


def get_coding(opt):
  return {"VHACoding": VHACoding, "THACoding": THACoding,
          "VSACoding": lambda: VSACoding(opt.alpha)}[opt.coding_type]()


def get_pooling(opt):
  return {"MaxPooling": MaxPooling, "MeanPooling": MeanPooling, "SumPooling": SumPooling,
          "SoftmaxPooling": lambda: SoftmaxPooling(opt.belta),
          "LSEPooling": lambda: LSEPooling(opt.belta)}[opt.pooling_type]()


class SimsEncoder(nn.Module):
  def __init__(self, opt):
    super().__init__()
    self.coding, self.pooling = get_coding(opt), get_pooling(opt)

  def forward(self, img_emb, cap_emb, img_lens, cap_lens):
    return self.pooling(self.coding(img_emb, cap_emb, img_lens, cap_lens))


class SelfAttention(nn.Module):
  def __init__(self, d_model, n_head=8):
    super().__init__()
    self.ln = nn.LayerNorm(d_model)
    self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)

  def forward(self, x):  # their EncoderImagePrecomp passes no lengths: no padding mask
    y = self.ln(x)
    return x + self.attn(y, y, y, need_weights=False, key_padding_mask=None)[0]


class EncoderImagePrecomp(nn.Module):
  def __init__(self, img_dim, embed_size, precomp_enc_type="basic", no_imgnorm=False):
    super().__init__()
    self.no_imgnorm = no_imgnorm
    self.fc = nn.Linear(img_dim, embed_size)
    if precomp_enc_type == "basic":
      self.feedforward = nn.Identity()
    elif precomp_enc_type == "selfattention":
      self.feedforward = SelfAttention(embed_size)
    else:
      raise ValueError(precomp_enc_type)
    r = np.sqrt(6.) / np.sqrt(self.fc.in_features + self.fc.out_features)
    self.fc.weight.data.uniform_(-r, r)
    self.fc.bias.data.fill_(0)

  def forward(self, images, image_lengths):
    features = self.feedforward(self.fc(images))
    return features if self.no_imgnorm else l2norm(features, dim=-1)


class EncoderTextBigru(nn.Module):
  """Their BiGRU text encoder without GloVe (xavier embedding); `fc` is built, never
  called."""

  def __init__(self, vocab_size, embed_size, word_dim, num_layers, no_txtnorm=False):
    super().__init__()
    self.no_txtnorm = no_txtnorm
    self.embed = nn.Embedding(vocab_size, word_dim)
    self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)
    self.fc = nn.Linear(embed_size, embed_size)
    nn.init.xavier_uniform_(self.embed.weight)

  def forward(self, x, lengths):
    cap_emb, _ = vse_infty.bigru_words(self.embed, self.rnn, x, lengths)
    return cap_emb if self.no_txtnorm else l2norm(cap_emb, dim=-1)


class EncoderTextBert(vse_infty.EncoderTextBert):
  """Their BERT text encoder: VSE∞'s BERT -> Linear (its BertModel built from
  `bert_config`; theirs loads bert-base-uncased) without the GPO, each token a word."""

  def __init__(self, embed_size, bert_config, no_txtnorm=False):
    super().__init__(embed_size, bert_config, no_txtnorm, pool=False)

  def forward(self, x, lengths):
    cap_emb = self.words(x)
    return cap_emb if self.no_txtnorm else l2norm(cap_emb, dim=-1)


class ContrastiveLoss(vse_infty.ContrastiveLoss):
  """VSE∞'s hinge, on the (B, B) sims of their SimsEncoder."""

  def __init__(self, margin=0.2, max_violation=False):
    super().__init__(margin, max_violation)

  def forward(self, sims):
    return self.hinge(sims)


def _modules(opt, bert):
  img_enc = EncoderImagePrecomp(opt.img_dim, opt.embed_size, opt.precomp_enc_type,
                                opt.no_imgnorm)
  if opt.text_enc_type == "bert":
    cfg = transformers.BertConfig(**bert, attn_implementation="eager")
    txt_enc = EncoderTextBert(opt.embed_size, cfg, opt.no_txtnorm)
  else:
    txt_enc = EncoderTextBigru(opt.vocab_size, opt.embed_size, opt.word_dim, opt.num_layers,
                               opt.no_txtnorm)
  return img_enc, txt_enc, SimsEncoder(opt)


def save_checkpoint(path, opt, bert=None, vocab_size=0, seed=0):
  """Random-weight CHAN saved as their train.py saves it: `model` is Model.state_dict(),
  `[img_enc, txt_enc, sim_enc, criterion]` state dicts (the last two empty: neither has
  parameters). Every parameter is redrawn (their inits leave LayerNorm at (1, 0) and
  zero biases, which hide mis-mappings).

  Args:
    opt: train.py options over `DEFAULTS` (`text_enc_type`, `coding_type`, ...); bert:
      `transformers.BertConfig` kwargs of the BERT build; vocab_size: BiGRU rows (words
      + <mask>).
  """
  torch.manual_seed(seed)
  opt = common.make_opt(DEFAULTS, opt, vocab_size, "CHAN train.py")
  img_enc, txt_enc, sim_enc = _modules(opt, bert)
  with torch.no_grad():
    for module in (img_enc, txt_enc):
      for name, p in module.named_parameters():
        p.normal_(0.0, 0.3 if "bert" in name else 0.5)
  criterion = ContrastiveLoss(opt.margin)
  common.save_checkpoint(path, [img_enc.state_dict(), txt_enc.state_dict(),
                                sim_enc.state_dict(), criterion.state_dict()], opt,
                         epoch=4, best_rsum=388.0, eiters=1200)


def _load(path, bert):
  ckpt = common.load_checkpoint(path)
  opt = ckpt["opt"]
  img_enc, txt_enc, sim_enc = _modules(opt, bert)
  img_enc.load_state_dict(ckpt["model"][0])
  txt_enc.load_state_dict(ckpt["model"][1])
  sim_enc.load_state_dict(ckpt["model"][2])
  return opt, img_enc, txt_enc, sim_enc


def _encode(img_enc, txt_enc, images, image_lengths, captions, lengths):
  """Their forward_emb on one batch, the captions in decreasing length (their BiGRU
  collate sorts the batch; the image encoder does not depend on the order) and returned
  in the given order, zero-padded to their longest."""
  order = np.argsort(-np.asarray(lengths), kind="stable")
  inverse = torch.from_numpy(np.argsort(order))
  img_emb = img_enc(torch.from_numpy(np.asarray(images)).float(),
                    torch.tensor(np.asarray(image_lengths)).float())
  cap_emb = txt_enc(torch.from_numpy(np.asarray(captions)[order]).long(),
                    torch.tensor(np.asarray(lengths)[order]).float())
  return img_emb, cap_emb[inverse]


def sims(path, images, image_lengths, captions, lengths, bert=None, shard_size=2):
  """Their evalrank: eval mode, encode_data (one batch; caption embeddings zero-padded to
  the longest), compute_sims over shards of `shard_size` images x captions."""
  _, img_enc, txt_enc, sim_enc = _load(path, bert)
  for m in (img_enc, txt_enc, sim_enc):
    m.eval()
  with torch.no_grad():
    img_emb, cap_emb = _encode(img_enc, txt_enc, images, image_lengths, captions, lengths)
    img_embs, cap_embs = img_emb.numpy(), cap_emb.numpy()
    img_lens, cap_lens = list(image_lengths), list(lengths)
    d = np.zeros((len(img_embs), len(cap_embs)))
    for i in range((len(img_embs) - 1) // shard_size + 1):
      i0, i1 = shard_size * i, min(shard_size * (i + 1), len(img_embs))
      for j in range((len(cap_embs) - 1) // shard_size + 1):
        j0, j1 = shard_size * j, min(shard_size * (j + 1), len(cap_embs))
        sim = sim_enc(torch.from_numpy(img_embs[i0:i1]).float(),
                      torch.from_numpy(cap_embs[j0:j1]).float(),
                      torch.Tensor(img_lens[i0:i1]), torch.Tensor(cap_lens[j0:j1]))
        d[i0:i1, j0:j1] = sim.numpy()
  return d


def train_loss(path, images, image_lengths, captions, lengths, max_violation, bert=None):
  """One train_emb's loss (train mode) on a batch padded as their collate pads it, with
  ContrastiveLoss(opt.margin) and `max_violation` (off in the warm-up epochs)."""
  opt, img_enc, txt_enc, sim_enc = _load(path, bert)
  for m in (img_enc, txt_enc, sim_enc):
    m.train()
  img_emb, cap_emb = _encode(img_enc, txt_enc, images, image_lengths, captions, lengths)
  sims_ = sim_enc(img_emb, cap_emb, torch.Tensor(np.asarray(image_lengths)),
                  torch.Tensor(np.asarray(lengths)))
  return float(ContrastiveLoss(opt.margin, max_violation)(sims_).item())


def coded(imgs, caps, img_lens, cap_lens, coding_type, pooling_type, alpha=0.1, belta=0.1):
  """Their SimsEncoder on given embeddings (every coding x pooling pair): the pooled
  (n_img, n_cap) matrix."""
  opt = common.make_opt(DEFAULTS, dict(coding_type=coding_type, pooling_type=pooling_type,
                                       alpha=alpha, belta=belta), 0, "CHAN train.py")
  with torch.no_grad():
    out = SimsEncoder(opt)(torch.from_numpy(imgs).float(), torch.from_numpy(caps).float(),
                           torch.tensor(img_lens).float(), torch.tensor(cap_lens).float())
  return out.numpy()

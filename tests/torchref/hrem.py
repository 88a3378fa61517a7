"""HREM's PyTorch modules, written from the authors' code (CrossmodalGroup/HREM at
1ad2612: lib/encoders.py, lib/mlp.py, lib/mca.py, lib/loss.py, graph_lib.py, lib/vse.py,
train.py, arguments.py), the reference for dsran_jax's hrem family. Module level: torch,
transformers, numpy, stdlib only.

Harness departures (not the model's): the BERT is built from a config (theirs loads
bert-base-uncased), tensors stay on the CPU (theirs call .cuda()), and the triplet loss
records every negative it draws under a name ("base/i2t", "gnn_1/t2i", ...) so the jax
side can replay the same draws.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from torchref import common
# lib/mlp.py's MLP and lib/encoders.py's l2norm are VSE∞'s (the code HREM starts from).
from torchref.vse_infty import MLP, l2norm

# arguments.py + graph_lib.extra_parameters defaults (the options these modules read).
DEFAULTS = dict(dataset="f30k", margin=0.2, num_epochs=30, batch_size=128, embed_size=1024,
                grad_clip=2.0, learning_rate=5e-4, max_violation=False, img_dim=2048,
                no_imgnorm=False, no_txtnorm=False, vse_mean_warmup_epochs=1,
                size_augment=1, mask_repeat=1, bert_path="bert-base-uncased",
                lr_schedules=[15, 25], decay_rate=0.1, base_loss="trip", gnn_loss="trip",
                warmup=8000, residual_weight=0.8, num_layers_enc=1, nhead=16, dropout=0.1,
                graph_lr_factor=1.0, mask_weight=1.0, threshold=0.5, topk=10,
                reg_loss_weight=10.0, norm_input=1, cross_loss=1)


# ------------------------------------------------------------------ lib/encoders.py


def padding_mask(embs, lengths):
  mask = torch.ones(len(lengths), embs.shape[1])
  for i in range(mask.shape[0]):
    mask[i, :int(lengths[i])] = 0.
  return mask.bool()


def init_weights(m):
  if isinstance(m, nn.Linear):
    torch.nn.init.xavier_uniform_(m.weight)
    m.bias.data.fill_(0.)


def maxk_pool1d_var(x, dim, k, lengths):
  results = []
  for idx in range(x.size(0)):
    k = min(k, int(lengths[idx].item()))  # their k stays lowered for later items
    tmp = torch.split(x[idx], split_size_or_sections=int(lengths[idx]), dim=dim - 1)[0]
    results.append(tmp.topk(k, dim=dim - 1)[0].mean(dim - 1))
  return torch.stack(results, dim=0)


def avg_pool1d_var(x, dim, lengths):
  results = []
  for idx in range(x.size(0)):
    tmp = torch.split(x[idx], split_size_or_sections=int(lengths[idx]), dim=dim - 1)[0]
    results.append(tmp.mean(dim - 1))
  return torch.stack(results, dim=0)


class FC_MLP(nn.Module):  # pylint: disable=invalid-name
  def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
    super().__init__()
    self.fc = nn.Linear(input_dim, output_dim)
    self.mlp = MLP(input_dim, hidden_dim, output_dim, num_layers)

  def forward(self, x):
    return self.fc(x) + self.mlp(x)


def _aggr(opt):
  layer = nn.TransformerEncoderLayer(d_model=opt.embed_size, nhead=opt.nhead,
                                     dim_feedforward=opt.embed_size, dropout=opt.dropout)
  return nn.TransformerEncoder(layer, num_layers=1, norm=None)


def _pool(opt, aggr, emb, lengths, no_norm):
  """Their forward after the per-item features: max-2 residual, encoder layer, mean,
  mix, l2norm. Returns (emb, emb_notnorm)."""
  res = maxk_pool1d_var(emb, 1, 2, lengths)
  key_mask = padding_mask(emb, lengths)
  out = aggr(emb.transpose(1, 0), src_key_padding_mask=key_mask).transpose(1, 0)
  out = avg_pool1d_var(out, 1, lengths)
  out = opt.residual_weight * res + (1 - opt.residual_weight) * out
  return (out if no_norm else l2norm(out, dim=-1)), out


class EncoderImageAggr(nn.Module):
  def __init__(self, opt):
    super().__init__()
    self.opt = opt
    self.fc = FC_MLP(opt.img_dim, opt.embed_size // 2, opt.embed_size, 2)
    self.fc.apply(init_weights)
    self.aggr = _aggr(opt)

  def forward(self, images, image_lengths, graph=False):
    img_emb = self.fc(images)
    emb, notnorm = _pool(self.opt, self.aggr, img_emb, image_lengths, self.opt.no_imgnorm)
    if graph:
      return images, image_lengths, emb, notnorm, img_emb
    return emb


class EncoderText_BERT(nn.Module):  # pylint: disable=invalid-name
  def __init__(self, opt, bert_config):
    super().__init__()
    self.opt = opt
    self.bert = transformers.BertModel(bert_config)
    self.linear = nn.Linear(bert_config.hidden_size, opt.embed_size)
    self.aggr = _aggr(opt)

  def forward(self, x, lengths, graph=False):
    bert_emb = self.bert(input_ids=x, attention_mask=(x != 0).float())[0]
    cap_emb = self.linear(bert_emb)
    emb, notnorm = _pool(self.opt, self.aggr, cap_emb, lengths, self.opt.no_txtnorm)
    if graph:
      return bert_emb, lengths, emb, notnorm, cap_emb
    return emb


# ---------------------------------------------------------------------- lib/loss.py


class ContrastiveLoss(nn.Module):
  def __init__(self, opt, margin=0.2, max_violation=False):
    super().__init__()
    self.margin, self.max_violation, self.mask_repeat = margin, max_violation, opt.mask_repeat

  def forward(self, im, s, img_ids=None):
    scores = im.mm(s.t())
    diagonal = scores.diag().view(im.size(0), 1)
    cost_s = (self.margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (self.margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    if not self.mask_repeat:
      mask = torch.eye(scores.size(0), dtype=torch.bool)
    else:
      mask = img_ids.unsqueeze(1) == img_ids.unsqueeze(0)
    cost_s, cost_im = cost_s.masked_fill_(mask, 0), cost_im.masked_fill_(mask, 0)
    if self.max_violation:
      cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


class TripletLoss(nn.Module):
  def __init__(self, opt, margin=0.2):
    super().__init__()
    self.margin, self.cut_off, self.d = margin, 0.5, 512
    self.nonzero_loss_cutoff = 1.9 if opt.dataset == "coco" else 1.7
    self.tag, self.draws = "", []  # harness: the recorded draws

  def forward(self, im, s, img_ids):
    sim_mat = im.mm(s.t())
    pos_mask = img_ids.unsqueeze(0) == img_ids.unsqueeze(1)
    neg_mask = img_ids.unsqueeze(0) != img_ids.unsqueeze(1)
    loss_im = self.loss_forward(sim_mat, pos_mask, neg_mask, f"{self.tag}/i2t")
    loss_s = self.loss_forward(sim_mat.t(), pos_mask.t(), neg_mask.t(), f"{self.tag}/t2i")
    return loss_im + loss_s

  def loss_forward(self, sim_mat, pos_mask, neg_mask, name):
    pos_pair_idx = pos_mask.nonzero(as_tuple=False)
    anchor_idx, pos_idx = pos_pair_idx[:, 0], pos_pair_idx[:, 1]
    dist = (2 - 2 * sim_mat).sqrt().clamp(min=self.cut_off)
    log_weight = ((2.0 - self.d) * dist.log()
                  - ((self.d - 3.0) / 2.0) * (1.0 - 0.25 * (dist * dist)).log())
    inf_or_nan = torch.isinf(log_weight) | torch.isnan(log_weight)
    log_weight = log_weight * neg_mask
    log_weight[inf_or_nan] = 0.
    weight = (log_weight - log_weight.max(dim=1, keepdim=True)[0]).exp()
    weight = weight * (neg_mask * (dist < self.nonzero_loss_cutoff)).float()
    weight = weight / (weight.sum(dim=1, keepdim=True) + 1e-20)
    weight = weight[anchor_idx]
    try:
      neg_idx = torch.multinomial(weight, 1).squeeze(1)
    except Exception:  # pylint: disable=broad-except
      self.draws.append((name, None))
      return torch.zeros([], requires_grad=True)
    self.draws.append((name, np.stack([anchor_idx.numpy(), pos_idx.numpy(),
                                       neg_idx.numpy()])))
    s_ap = sim_mat[anchor_idx, pos_idx]
    s_an = sim_mat[anchor_idx, neg_idx]
    return F.relu(self.margin + s_an - s_ap).sum()


def loss_select(opt, loss_type):
  if loss_type == "vse":
    return ContrastiveLoss(opt, margin=opt.margin, max_violation=opt.max_violation)
  if loss_type == "trip":
    return TripletLoss(opt)
  raise ValueError(loss_type)


# ----------------------------------------------------------------------- lib/mca.py


class AdjacencyLearning(nn.Module):
  def __init__(self, topk=20, T=1., sigma=1.):  # pylint: disable=invalid-name
    super().__init__()
    self.topk, self.T, self.sigma = topk, T, sigma
    self.mlp_t2i = nn.Sequential(nn.Linear(topk, topk), nn.ReLU(inplace=True),
                                 nn.Dropout(0.), nn.Linear(topk, 1))
    self.mlp_i2t = copy.deepcopy(self.mlp_t2i)

  def forward(self, img_regions, cap_words, img_len=None, cap_len=None):
    i2t_sim, t2i_sim, i2t_sim_mean, t2i_sim_mean = [], [], [], []
    n_image = img_regions.size(0)
    img_regions = F.normalize(img_regions, dim=-1)
    for i in range(cap_words.size(0)):
      seq_word = int(cap_len[i])
      num_selected_word = self.topk if seq_word < self.topk else seq_word
      cap_i_expand = cap_words[i, :num_selected_word, :].repeat(n_image, 1, 1)
      cap_i_expand = F.normalize(cap_i_expand, dim=-1)
      cap2img_sim = torch.bmm(cap_i_expand, img_regions.transpose(1, 2))
      cap2img_sim = F.leaky_relu(cap2img_sim, negative_slope=0.1)
      cap2img_sim_norm = F.normalize(cap2img_sim, dim=1)
      row_sim = cap2img_sim_norm.max(dim=2)[0]
      row_sim_mean = row_sim[:, 0:seq_word].mean(dim=1)
      row_sim_topk = row_sim.topk(k=self.topk, dim=1, largest=True)[0]
      cap2img_sim_norm = F.normalize(cap2img_sim, dim=2)
      column_sim = cap2img_sim_norm[:, 0:seq_word, :].max(dim=1)[0]
      column_sim_mean = column_sim.mean(dim=1)
      column_sim_topk = column_sim.topk(k=self.topk, dim=1, largest=True)[0]
      i2t_sim.append(column_sim_topk)
      t2i_sim.append(row_sim_topk)
      i2t_sim_mean.append(column_sim_mean)
      t2i_sim_mean.append(row_sim_mean)
    batch_t2i = torch.stack(t2i_sim, 0)
    batch_t2i_mean = torch.stack(t2i_sim_mean, 0)
    batch_i2t = torch.stack(i2t_sim, 0).transpose(0, 1)
    batch_i2t_mean = torch.stack(i2t_sim_mean, 0).transpose(0, 1)
    batch_t2i_relation = self.mlp_t2i(batch_t2i).squeeze(-1) + batch_t2i_mean
    batch_i2t_relation = self.mlp_i2t(batch_i2t).squeeze(-1) + batch_i2t_mean
    return batch_t2i_relation, batch_i2t_relation, batch_t2i_mean, batch_i2t_mean

  def relation_reg_loss(self, t2i_relation, i2t_relation, img_emb, cap_emb):
    sim = torch.exp(-torch.cdist(img_emb, cap_emb) / self.sigma).detach()
    return self.kl_div(sim, i2t_relation) + self.kl_div(sim.t(), t2i_relation)

  def kl_div(self, a, b):
    log_p_a = F.log_softmax(a / self.T, dim=-1)
    p_b = F.softmax(b / self.T, dim=-1)
    return F.kl_div(log_p_a, p_b, reduction="batchmean") * (self.T ** 2)


class AdjacencyModel(nn.Module):
  def __init__(self, threshold=0.5, topk=10, sigma=1.):
    super().__init__()
    self.threshold, self.sigma = threshold, sigma
    self.adj_learning = AdjacencyLearning(topk=topk, sigma=sigma)

  def forward(self, img_emb, cap_emb, img_regions, cap_words, img_len, cap_len):
    n_img, n_cap = img_emb.size(0), cap_emb.size(0)
    with torch.no_grad():
      sim_t2t = torch.matmul(cap_emb, cap_emb.t())
      sim_i2i = torch.matmul(img_emb, img_emb.t())
      t2t_c = (sim_t2t - sim_t2t.topk(k=int(n_cap * self.threshold), dim=1)[0][:, -1:]) >= 0
      i2i_c = (sim_i2i - sim_i2i.topk(k=int(n_img * self.threshold), dim=1)[0][:, -1:]) >= 0
    i2i = torch.exp(-torch.cdist(img_emb, img_emb) / self.sigma)
    t2t = torch.exp(-torch.cdist(cap_emb, cap_emb) / self.sigma)
    t2i, i2t, t2i_mean, i2t_mean = self.adj_learning(img_regions.detach(), cap_words.detach(),
                                                     img_len, cap_len)
    t2i_c = (t2i_mean - t2i_mean.topk(k=int(n_img * self.threshold), dim=1)[0][:, -1:]) >= 0
    i2t_c = (i2t_mean - i2t_mean.topk(k=int(n_cap * self.threshold), dim=1)[0][:, -1:]) >= 0
    reg_loss = self.adj_learning.relation_reg_loss(t2i, i2t, img_emb, cap_emb)
    return ({"i2i": i2i_c, "t2t": t2t_c, "i2t": i2t_c, "t2i": t2i_c},
            {"i2i": i2i, "t2t": t2t, "i2t": i2t, "t2i": t2i}, reg_loss)


# --------------------------------------------------------------------- graph_lib.py


class GraphLoss(nn.Module):
  def __init__(self, opt):
    super().__init__()
    self.opt = opt
    self.iter_count = 0
    self.base_loss = loss_select(opt, opt.base_loss)
    self.gnn_loss = loss_select(opt, opt.gnn_loss)
    layer = nn.TransformerEncoderLayer(d_model=opt.embed_size, nhead=opt.nhead,
                                       dim_feedforward=opt.embed_size, dropout=opt.dropout)
    self.gnn = nn.TransformerEncoder(layer, num_layers=opt.num_layers_enc)
    self.adj_model = AdjacencyModel(threshold=opt.threshold, topk=opt.topk)

  def _gnn_loss(self, tag, im, s, img_ids):
    self.gnn_loss.tag = tag
    return self.gnn_loss(im, s, img_ids)

  def forward(self, img_emb, cap_emb, img_ids):
    _, img_len, img_emb, img_emb_notnorm, img_emb_pre_pool = img_emb
    _, cap_len, cap_emb, cap_emb_notnorm, cap_emb_pre_pool = cap_emb
    bs = img_emb.shape[0]
    self.base_loss.tag = "base"
    base_loss = self.base_loss(img_emb, cap_emb, img_ids)
    parts = {"base": float(base_loss)}
    if self.iter_count >= self.opt.warmup:
      batch_c, batch_r, reg_loss = self.adj_model(img_emb, cap_emb, img_emb_pre_pool,
                                                  cap_emb_pre_pool, img_len, cap_len)
      connect = torch.cat((torch.cat((batch_c["i2i"], batch_c["i2t"]), 1),
                           torch.cat((batch_c["t2i"], batch_c["t2t"]), 1)), 0)
      relation = torch.cat((torch.cat((batch_r["i2i"], batch_r["i2t"]), 1),
                            torch.cat((batch_r["t2i"], batch_r["t2t"]), 1)), 0)
      mask = self.opt.mask_weight * relation.masked_fill_(~connect, float("-inf"))
      if self.opt.norm_input:
        all_embs = torch.cat((img_emb, cap_emb), 0)
      else:
        all_embs = torch.cat((img_emb_notnorm, cap_emb_notnorm), 0)
      out = self.gnn(all_embs.unsqueeze(1), mask).squeeze(1)
      img_gnn, cap_gnn = torch.split(out, bs, dim=0)
      img_gnn, cap_gnn = F.normalize(img_gnn), F.normalize(cap_gnn)
      if self.opt.cross_loss:
        g1 = self._gnn_loss("gnn_1", img_emb, cap_gnn, img_ids)
        g2 = self._gnn_loss("gnn_2", img_gnn, cap_emb, img_ids)
      else:
        g1 = g2 = 0.
      g3 = self._gnn_loss("gnn_3", img_gnn, cap_gnn, img_ids)
      gnn_loss = g1 + g2 + g3
      parts.update(gnn=float(gnn_loss), reg=float(reg_loss))
    else:
      gnn_loss, reg_loss = 0., 0.
    loss = base_loss + gnn_loss + self.opt.reg_loss_weight * reg_loss
    self.iter_count += 1
    return loss, parts


# ------------------------------------------------------------------------- harness


def _bert_config(bert: dict):
  return transformers.BertConfig(**bert, attn_implementation="eager")


def _encoders(opt, bert):
  return EncoderImageAggr(opt), EncoderText_BERT(opt, _bert_config(bert))


def _perturb(module, seed_scale=0.3):
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.normal_(0.0, 0.3 if "bert" in name else seed_scale)
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.normal_(0.0, 0.5)
      elif name.endswith("running_var"):
        b.uniform_(0.5, 2.0)


def save_checkpoint(path, opt, bert, seed=0):
  """Random-weight HREM saved as their train.py saves it: `{"model": [img_enc, txt_enc]
  state dicts, "opt", "epoch", "best_rsum", "Eiters"}`, the text side with the
  `bert.embeddings.position_ids` buffer transformers 4 (before 4.31) saved. Every
  parameter and BatchNorm statistic is redrawn."""
  torch.manual_seed(seed)
  opt = common.make_opt(DEFAULTS, opt, 0, "HREM train.py")
  img_enc, txt_enc = _encoders(opt, bert)
  _perturb(img_enc)
  _perturb(txt_enc)
  txt_state = txt_enc.state_dict()
  txt_state["bert.embeddings.position_ids"] = torch.arange(
      bert["max_position_embeddings"]).unsqueeze(0)
  common.save_checkpoint(path, [img_enc.state_dict(), txt_state], opt, epoch=7,
                         best_rsum=501.5, eiters=7000)


def _load(path, bert, overrides=None):
  ckpt = common.load_checkpoint(path)
  opt = ckpt["opt"]
  for k, v in (overrides or {}).items():
    setattr(opt, k, v)
  img_enc, txt_enc = _encoders(opt, bert)
  img_enc.load_state_dict(ckpt["model"][0], strict=True)
  txt_enc.load_state_dict(ckpt["model"][1], strict=False)  # their position_ids note
  return opt, img_enc, txt_enc


def _inputs(images, image_lengths, captions, lengths):
  return (torch.from_numpy(np.asarray(images)).float(), torch.tensor(np.asarray(image_lengths)),
          torch.from_numpy(np.asarray(captions)).long(), torch.tensor(np.asarray(lengths)))


def sims(path, images, image_lengths, captions, lengths, bert):
  """Their evalrank: encoders in eval mode, encode_data, compute_sim (img @ cap.T)."""
  _, img_enc, txt_enc = _load(path, bert)
  img_enc.eval()
  txt_enc.eval()
  im, il, cap, cl = _inputs(images, image_lengths, captions, lengths)
  with torch.no_grad():
    return np.matmul(img_enc(im, il).numpy(), txt_enc(cap, cl).numpy().T)


def train_loss(path, images, image_lengths, captions, lengths, img_ids, bert, iter_count,
               opt=None, graph_seed=0):
  """One train_emb's loss: encoders and GraphLoss in train mode, GraphLoss built with
  torch.manual_seed(graph_seed) and its parameters redrawn, at `iter_count`. Returns
  {"loss", "parts", "draws": [(name, (3, P) anchor/pos/neg ids or None)], "graph":
  GraphLoss's state dict (numpy), "running_mean"/"running_var" of the MLP's bns.0}."""
  opt_, img_enc, txt_enc = _load(path, bert, opt)
  torch.manual_seed(graph_seed)
  criterion = GraphLoss(opt_)
  _perturb(criterion, 0.4)
  criterion.iter_count = iter_count
  for m in (img_enc, txt_enc, criterion):
    m.train()
  im, il, cap, cl = _inputs(images, image_lengths, captions, lengths)
  img_out = img_enc(im, il, graph=True)
  cap_out = txt_enc(cap, cl, graph=True)
  loss, parts = criterion(img_out, cap_out, img_ids=torch.tensor(np.asarray(img_ids)))
  draws = [d for loss in (criterion.base_loss, criterion.gnn_loss)
           for d in getattr(loss, "draws", [])]
  bn = img_enc.fc.mlp.bns[0]
  return {"loss": float(loss), "parts": parts, "draws": draws,
          "graph": {k: v.detach().numpy().copy() for k, v in criterion.state_dict().items()},
          "running_mean": bn.running_mean.numpy().copy(),
          "running_var": bn.running_var.numpy().copy()}


def adamw_groups(params, grads, lr, weight_decay, bert_factor, graph_factor, clip, decay_at):
  """vse.py's optimiser on one tensor per group: AdamW([{text without BERT, lr}, {bert,
  lr * 0.1}, {image, lr}, {criterion, lr * graph_lr_factor}], weight_decay), after
  clip_grad_norm_(all params, clip); a criterion gradient given as None stays None (the
  relation module before the warm-up), which AdamW skips. The lr of every group x0.1 at
  the steps of `decay_at` (adjust_learning_rate). `params`: {"text", "bert", "image",
  "graph"} arrays; `grads`: one such dict per step. Returns the final params."""
  ps = {k: nn.Parameter(torch.from_numpy(np.array(v, copy=True))) for k, v in params.items()}
  opt = torch.optim.AdamW([{"params": [ps["text"]], "lr": lr},
                           {"params": [ps["bert"]], "lr": lr * bert_factor},
                           {"params": [ps["image"]], "lr": lr},
                           {"params": [ps["graph"]], "lr": lr * graph_factor}],
                          lr=lr, weight_decay=weight_decay)
  for step, g in enumerate(grads):
    if step in decay_at:
      for group in opt.param_groups:
        group["lr"] *= 0.1
    opt.zero_grad()
    for k, p in ps.items():
      p.grad = None if g[k] is None else torch.from_numpy(np.array(g[k], copy=True))
    torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)
    opt.step()
  return {k: p.detach().numpy().copy() for k, p in ps.items()}

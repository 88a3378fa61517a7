"""VSE∞'s PyTorch modules, written from the authors' code (woodfrog/vse_infty: `master`
lib/encoders.py, lib/modules/aggr/gpo.py, lib/modules/mlp.py, lib/loss.py, lib/vse.py,
train.py, lib/evaluation.py; branch `bigru` for the BiGRU text encoder), the reference
for dsran_jax's vse_infty family. Module level: torch, transformers, numpy, stdlib only.
"""
import math
import os

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from torchref import common

# Their arguments.py defaults (the options these modules read).
DEFAULTS = dict(data_name="f30k", margin=0.2, num_epochs=30, batch_size=128, word_dim=300,
                embed_size=1024, grad_clip=2.0, learning_rate=0.0002, lr_update=15,
                optim="adam", max_violation=False, img_dim=2048, no_imgnorm=False,
                no_txtnorm=False, precomp_enc_type="basic", vse_mean_warmup_epochs=0,
                num_layers=1)


def l2norm(x, dim, eps=1e-8):
  return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def positional_encoding_1d(d_model, length):
  pe = torch.zeros(length, d_model)
  position = torch.arange(0, length).unsqueeze(1)
  div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float)
                       * -(math.log(10000.0) / d_model))
  pe[:, 0::2] = torch.sin(position.float() * div_term)
  pe[:, 1::2] = torch.cos(position.float() * div_term)
  return pe


class GPO(nn.Module):
  def __init__(self, d_pe, d_hidden):
    super().__init__()
    self.d_pe, self.d_hidden = d_pe, d_hidden
    self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
    self.linear = nn.Linear(d_hidden, 1, bias=False)

  def compute_pool_weights(self, lengths):
    max_len = int(lengths.max())
    pes = positional_encoding_1d(self.d_pe, max_len).unsqueeze(0).repeat(lengths.size(0), 1, 1)
    mask = torch.arange(max_len).expand(lengths.size(0), max_len)
    mask = (mask < lengths.long().unsqueeze(1)).unsqueeze(-1)
    pes = pes.masked_fill(mask == 0, 0)
    packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = self.gru(packed)
    out_emb, _ = pad_packed_sequence(out, batch_first=True)
    half = out_emb.size(2) // 2
    out_emb = (out_emb[:, :, :half] + out_emb[:, :, half:]) / 2
    scores = self.linear(out_emb)
    scores[torch.where(mask == 0)] = -10000
    return torch.softmax(scores / 0.1, 1), mask

  def forward(self, features, lengths):
    weights, mask = self.compute_pool_weights(lengths)
    features = features[:, :int(lengths.max()), :]
    ordered = features.masked_fill(mask == 0, -10000).sort(dim=1, descending=True)[0]
    ordered = ordered.masked_fill(mask == 0, 0)
    return (ordered * weights).sum(1), weights


class MLP(nn.Module):
  def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
    super().__init__()
    self.output_dim, self.num_layers = output_dim, num_layers
    h = [hidden_dim] * (num_layers - 1)
    self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
    self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in h + [output_dim])

  def forward(self, x):
    b, n, d = x.size()
    x = x.reshape(b * n, d)
    for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
      x = torch.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
    return x.view(b, n, self.output_dim)


class EncoderImageAggr(nn.Module):
  def __init__(self, img_dim, embed_size, precomp_enc_type="basic", no_imgnorm=False):
    super().__init__()
    self.no_imgnorm, self.precomp_enc_type = no_imgnorm, precomp_enc_type
    self.fc = nn.Linear(img_dim, embed_size)
    if precomp_enc_type == "basic":
      self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2)
    self.gpool = GPO(32, 32)
    r = np.sqrt(6.) / np.sqrt(self.fc.in_features + self.fc.out_features)
    self.fc.weight.data.uniform_(-r, r)
    self.fc.bias.data.fill_(0)

  def forward(self, images, image_lengths):
    features = self.fc(images)
    if self.precomp_enc_type == "basic":
      features = self.mlp(images) + features
    features, _ = self.gpool(features, image_lengths)
    return features if self.no_imgnorm else l2norm(features, dim=-1)


class EncoderTextBert(nn.Module):
  """master's EncoderText, with a BertModel built from `bert_config` (theirs loads
  bert-base-uncased; the weights are random here either way). `pool=False`: no GPO
  (CHAN's, torchref/chan.py, which scores the words)."""

  def __init__(self, embed_size, bert_config, no_txtnorm=False, pool=True):
    super().__init__()
    self.no_txtnorm = no_txtnorm
    self.bert = transformers.BertModel(bert_config, add_pooling_layer=True)
    self.linear = nn.Linear(bert_config.hidden_size, embed_size)
    if pool:
      self.gpool = GPO(32, 32)

  def words(self, x):
    """BERT (attention mask `x != 0`) -> Linear, per token."""
    bert_emb = self.bert(x, (x != 0).float())[0]
    return self.linear(bert_emb)

  def forward(self, x, lengths):
    pooled, _ = self.gpool(self.words(x), lengths)
    return pooled if self.no_txtnorm else l2norm(pooled, dim=-1)


def bigru_words(embed, rnn, x, lengths):
  """Their BiGRU text path before any pooling: embed -> packed bidirectional GRU, the
  two halves averaged; `(words (B, max_len, E), lengths)`."""
  packed = pack_padded_sequence(embed(x), lengths.cpu(), batch_first=True)
  out, _ = rnn(packed)
  cap_emb, cap_len = pad_packed_sequence(out, batch_first=True)
  half = cap_emb.size(2) // 2
  return (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2, cap_len


class EncoderTextBiGRU(nn.Module):
  """branch bigru's EncoderText (captions sorted by length, as their collate does)."""

  def __init__(self, vocab_size, embed_size, word_dim, num_layers, no_txtnorm=False):
    super().__init__()
    self.no_txtnorm = no_txtnorm
    self.embed = nn.Embedding(vocab_size, word_dim)
    self.gpool = GPO(32, 32)
    self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)
    self.embed.weight.data.uniform_(-0.1, 0.1)

  def forward(self, x, lengths):
    cap_emb, cap_len = bigru_words(self.embed, self.rnn, x, lengths)
    pooled, _ = self.gpool(cap_emb, cap_len)
    return pooled if self.no_txtnorm else l2norm(pooled, dim=-1)


class ContrastiveLoss(nn.Module):
  def __init__(self, margin=0.0, max_violation=False):
    super().__init__()
    self.margin, self.max_violation = margin, max_violation

  def forward(self, im, s):
    return self.hinge(im.mm(s.t()))

  def hinge(self, scores):
    """The loss of a (B, B) score matrix (CHAN's ContrastiveLoss takes one)."""
    diagonal = scores.diag().view(scores.size(0), 1)
    cost_s = (self.margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (self.margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(scores.size(0)) > .5
    cost_s, cost_im = cost_s.masked_fill_(eye, 0), cost_im.masked_fill_(eye, 0)
    if self.max_violation:
      cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


def _bert_config(bert: dict):
  return transformers.BertConfig(**bert, attn_implementation="eager")


def _encoders(opt, bert: dict):
  img_enc = EncoderImageAggr(opt.img_dim, opt.embed_size, opt.precomp_enc_type, opt.no_imgnorm)
  if bert:
    txt_enc = EncoderTextBert(opt.embed_size, _bert_config(bert), opt.no_txtnorm)
  else:
    txt_enc = EncoderTextBiGRU(opt.vocab_size, opt.embed_size, opt.word_dim, opt.num_layers,
                               opt.no_txtnorm)
  return img_enc, txt_enc


def save_checkpoint(path, opt, bert=None, vocab_size=0, seed=0):
  """Random-weight VSE∞ saved as their train.py saves it (BERT build: both encoders in
  nn.DataParallel, so every key has `module.`). Every parameter and BatchNorm statistic
  is redrawn (their inits leave BN at (1, 0) and zero biases, which hide mis-mappings).

  Args:
    opt: train.py options over `DEFAULTS`; bert: `transformers.BertConfig` kwargs for
      the BERT build, None for the BiGRU build; vocab_size: BiGRU rows (words + <mask>).
  """
  torch.manual_seed(seed)
  opt = common.make_opt(DEFAULTS, opt, vocab_size, "VSE∞ train.py")
  img_enc, txt_enc = _encoders(opt, bert)
  with torch.no_grad():
    for module in (img_enc, txt_enc):
      for name, p in module.named_parameters():
        p.normal_(0.0, 0.3 if "bert" in name else 0.5)
      for name, b in module.named_buffers():
        if name.endswith("running_mean"):
          b.normal_(0.0, 0.5)
        elif name.endswith("running_var"):
          b.uniform_(0.5, 2.0)
  if bert:
    img_enc, txt_enc = nn.DataParallel(img_enc), nn.DataParallel(txt_enc)
  common.save_checkpoint(path, [img_enc.state_dict(), txt_enc.state_dict()], opt, epoch=3,
                         best_rsum=412.5, eiters=900)


def _load(path, bert):
  ckpt = common.load_checkpoint(path)
  opt = ckpt["opt"]
  img_enc, txt_enc = _encoders(opt, bert)
  if bert:
    img_enc, txt_enc = nn.DataParallel(img_enc), nn.DataParallel(txt_enc)
  img_enc.load_state_dict(ckpt["model"][0])
  txt_enc.load_state_dict(ckpt["model"][1])
  return opt, img_enc, txt_enc


def _forward(img_enc, txt_enc, images, image_lengths, captions, lengths):
  """Their forward_emb; captions sorted by length (their BiGRU collate), then unsorted."""
  order = np.argsort(-np.asarray(lengths), kind="stable")
  inverse = np.argsort(order)
  img_emb = img_enc(torch.from_numpy(images).float(), torch.tensor(image_lengths).float())
  cap = torch.from_numpy(np.asarray(captions)[order]).long()
  cap_emb = txt_enc(cap, torch.tensor(np.asarray(lengths)[order]).float())
  return img_emb, cap_emb[torch.from_numpy(inverse)]


def sims(path, images, image_lengths, captions, lengths, bert=None):
  """Their evalrank: model in eval mode, encode_data, compute_sim (img @ cap.T)."""
  _, img_enc, txt_enc = _load(path, bert)
  img_enc.eval()
  txt_enc.eval()
  with torch.no_grad():
    img_emb, cap_emb = _forward(img_enc, txt_enc, images, image_lengths, captions, lengths)
  return np.matmul(img_emb.numpy(), cap_emb.numpy().T)


def train_loss(path, images, image_lengths, captions, lengths, max_violation, bert=None):
  """One train_emb's loss (train mode: BatchNorm on the batch) and the BatchNorm running
  stats after it: {"loss", "running_mean", "running_var"}."""
  opt, img_enc, txt_enc = _load(path, bert)
  img_enc.train()
  txt_enc.train()
  criterion = ContrastiveLoss(opt.margin, max_violation)
  img_emb, cap_emb = _forward(img_enc, txt_enc, images, image_lengths, captions, lengths)
  loss = criterion(img_emb, cap_emb)
  enc = img_enc.module if isinstance(img_enc, nn.DataParallel) else img_enc
  bn = enc.mlp.bns[0]
  return {"loss": float(loss.item()), "running_mean": bn.running_mean.numpy().copy(),
          "running_var": bn.running_var.numpy().copy()}


def bert_tokenize(bert_dir, texts):
  """Their eval-time process_caption: BasicTokenizer words, WordPiece pieces, [CLS] ...
  [SEP], 0-padded (the Python BertTokenizer of `bert_dir`'s vocab.txt)."""
  # Their transformers 3/4 BertTokenizer is the Python one (basic_tokenizer and
  # wordpiece_tokenizer attributes); transformers 5 keeps it as BertTokenizerLegacy.
  legacy = getattr(transformers, "BertTokenizerLegacy", None)
  if legacy is None:
    from transformers.models.bert import tokenization_bert_legacy  # pylint: disable=g-import-not-at-top
    legacy = tokenization_bert_legacy.BertTokenizerLegacy
  tok = legacy(vocab_file=os.path.join(bert_dir, "vocab.txt"), do_lower_case=True)
  rows = []
  for text in texts:
    pieces = []
    for token in tok.basic_tokenizer.tokenize(text):
      pieces += tok.wordpiece_tokenizer.tokenize(token)
    rows.append(tok.convert_tokens_to_ids(["[CLS]"] + pieces + ["[SEP]"]))
  lengths = np.array([len(r) for r in rows])
  ids = np.zeros((len(rows), lengths.max()), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids, lengths


def adamw_steps(bert, rest, grads, lr, weight_decay, bert_factor, clip):
  """vse.py's optimiser: AdamW([{rest, lr}, {bert, lr * bert_factor}],
  weight_decay) after clip_grad_norm_(all params, clip), one step per gradient pair."""
  tb = nn.Parameter(torch.from_numpy(bert.copy()))
  tr = nn.Parameter(torch.from_numpy(rest.copy()))
  opt = torch.optim.AdamW([{"params": [tr], "lr": lr}, {"params": [tb], "lr": lr * bert_factor}],
                          lr=lr, weight_decay=weight_decay)
  for g_bert, g_rest in grads:
    opt.zero_grad()
    tb.grad = torch.from_numpy(np.array(g_bert, copy=True))
    tr.grad = torch.from_numpy(np.array(g_rest, copy=True))
    torch.nn.utils.clip_grad_norm_([tr, tb], clip)
    opt.step()
  return tb.detach().numpy().copy(), tr.detach().numpy().copy()

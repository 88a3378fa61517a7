"""HREM's training objective (`graph_lib.GraphLoss`, `lib/mca.py`, `lib/loss.py` of
CrossmodalGroup/HREM) with its own parameters: the instance-level relation module.

    loss = base(v, t) + [step >= warmup] (gnn(v, t~) + gnn(v~, t) + gnn(v~, t~)
                                          + reg_loss_weight * reg)

v, t: the batch's image and caption embeddings (B, E); v~, t~ = normalize(Transformer
over the 2B embeddings as one sequence, attention bias `mask_weight * relevance`, -inf
where not connected). Connections: the top `threshold` share of each row of i2i = v v^T,
t2t = t t^T (no gradient), t2i and i2t (mean word-region scores). Relevance: i2i, t2t =
exp(-cdist); t2i / i2t = MLP(top-k word-region scores) + mean (AdjacencyLearning, on the
detached pre-pooling features). reg = KL(softmax(learned) || softmax(exp(-cdist(v, t))))
both ways. `base` / `gnn`: the distance-weighted triplet loss ('trip') or the VSE hinge
('vse'). docs/models/hrem.md has every equation and quirk.

`GraphObjective` is the family's training objective (`models/__init__.py`): `init`,
`loss`, `lr_scale` (graph_lr_factor), `active_from` (warmup). Its negative draws
(torch.multinomial in theirs) go through `sampler(key, weights, name)`, which a test can
replace to replay the reference's draws.
"""
import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.layers import Linear
from dsran_jax.models.common.transformer import NEG, TorchEncoder, same_initial_layers

# TripletLoss (lib/loss.py): margin 0.2 (its constructor default; opt.margin is not
# passed), distances clamped at 0.5, the dimension d = 512 of the distance weighting.
TRIPLET_MARGIN, CUT_OFF, DIM = 0.2, 0.5, 512.0
SIGMA, T = 1.0, 1.0  # AdjacencyModel / AdjacencyLearning defaults
CDIST_MM_ROWS = 25  # torch.cdist computes through a matmul when a side has more rows


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """What GraphLoss reads (their opt): `config.model.hrem`'s objective options plus the
  widths and the hinge settings of `config.train` (for 'vse')."""
  embed_size: int
  nhead: int = 16
  dropout: float = 0.1
  base_loss: str = "trip"
  gnn_loss: str = "trip"
  warmup: int = 8000
  num_layers_enc: int = 1
  graph_lr_factor: float = 1.0
  mask_weight: float = 1.0
  threshold: float = 0.5
  topk: int = 10
  reg_loss_weight: float = 10.0
  norm_input: bool = True
  cross_loss: bool = True
  nonzero_loss_cutoff: float = 1.7
  mask_repeat: bool = True
  margin: float = 0.2
  max_violation: bool = True
  sum_violation_steps: int = 0


def objective_config(config) -> ObjectiveConfig:
  """The ObjectiveConfig of a full config."""
  s, t = config.model.hrem, config.train
  names = [f.name for f in dataclasses.fields(ObjectiveConfig)]
  values = {n: type(ObjectiveConfig.__dataclass_fields__[n].default)(s[n])
            for n in names if n in s and n != "embed_size"}
  return ObjectiveConfig(embed_size=int(config.model.embed_size), margin=float(t.margin),
                         max_violation=bool(t.max_violation),
                         sum_violation_steps=int(t.sum_violation_steps),
                         **{k: v for k, v in values.items()
                            if k not in ("margin", "max_violation", "sum_violation_steps")})


# ------------------------------------------------------------------------ small pieces


def normalize(x, axis=-1, eps=1e-12):
  """F.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True)), eps)


def cdist(a, b):
  """torch.cdist(a, b) (p=2): through ||a||^2 + ||b||^2 - 2ab, clamped at 1e-30, when a
  side has more than 25 rows (torch's `use_mm_for_euclid_dist_if_necessary`), else from
  the differences; the gradient is 0 where the distance is 0, as torch's."""
  if a.shape[0] > CDIST_MM_ROWS or b.shape[0] > CDIST_MM_ROWS:
    d2 = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
          - 2.0 * jnp.matmul(a, b.T))
  else:
    d2 = jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), -1)
  return jnp.sqrt(jnp.maximum(d2, 1e-30))


def top_k_or_fewer(x, k: int):
  """The k largest values of the last axis, that axis padded with -inf when it is
  shorter than k (then -inf where theirs, reading fewer than k items, would raise)."""
  short = k - x.shape[-1]
  if short > 0:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, short)], constant_values=-jnp.inf)
  return jax.lax.top_k(x, k)[0]


def connected(x, share: float):
  """Their connection mask: x >= the row's int(n * share)-th largest value."""
  k = int(x.shape[1] * share)
  if k < 1:
    raise ValueError(f"model.hrem.threshold={share} connects no item of a batch of "
                     f"{x.shape[1]} (int(batch * threshold) must be >= 1)")
  # Written as "fewer than k entries of the row are larger", which compares x's entries
  # only with each other. Their x - topk(x)[:, -1:] lets XLA recompute x inside the
  # comparison, where the product and the subtraction may become one fused multiply-add
  # that no longer gives 0 for the k-th entry itself: under full optimisation two rows of
  # a batch lost their k-th connection, and the loss moved by 0.3 %.
  larger = jnp.sum(x[:, None, :] > x[:, :, None], axis=-1)
  return larger < k


def kl_div(a, b):
  """Their kl_div(A, B): F.kl_div(log_softmax(A / T), softmax(B / T), 'batchmean') T^2,
  i.e. KL(softmax(B) || softmax(A)) averaged over rows."""
  log_p_a = jax.nn.log_softmax(a / T, axis=-1)
  log_p_b = jax.nn.log_softmax(b / T, axis=-1)
  return jnp.sum(jnp.exp(log_p_b) * (log_p_b - log_p_a)) / a.shape[0] * T ** 2


# --------------------------------------------------------------------------- losses


def sample_negatives(key, weights, name: str):
  """torch.multinomial(weights[anchor], 1) for every pair: (B, B) ids, entry [a, p]
  drawn from row a of the (B, B) normalised `weights` (`name` unused: a test's sampler
  tells the draws apart by it)."""
  del name
  b = weights.shape[0]
  logits = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-38)), -jnp.inf)
  return jax.random.categorical(key, logits[:, None, :], axis=-1, shape=(b, b))


def triplet_direction(sim, pos, neg, key, name: str, cutoff: float, sampler: Callable):
  """TripletLoss.loss_forward: for each positive pair (a, p), one negative n drawn from
  row a with the distance weights, relu(0.2 + s[a, n] - s[a, p]) summed. When a row has
  no negative to draw (torch.multinomial raises), their except returns 0 for the
  whole direction."""
  w_sim = jax.lax.stop_gradient(sim)
  dist = jnp.maximum(jnp.sqrt(2.0 - 2.0 * w_sim), CUT_OFF)  # NaN stays NaN, as torch's
  log_weight = ((2.0 - DIM) * jnp.log(dist)
                - ((DIM - 3.0) / 2.0) * jnp.log(1.0 - 0.25 * dist * dist))
  bad = ~jnp.isfinite(log_weight)
  log_weight = jnp.where(bad, 0.0, log_weight * neg)
  weight = jnp.exp(log_weight - jnp.max(log_weight, axis=1, keepdims=True))
  weight = weight * (neg & (dist < cutoff))
  weight = weight / (jnp.sum(weight, axis=1, keepdims=True) + 1e-20)
  drawable = jnp.all(jnp.sum(weight, axis=1) > 0)  # every row anchors a pair (i, i)
  neg_idx = sampler(key, weight, name)
  s_an = jnp.take_along_axis(sim, neg_idx, axis=1)
  loss = jnp.sum(jnp.where(pos, jax.nn.relu(TRIPLET_MARGIN + s_an - sim), 0.0))
  return jnp.where(drawable, loss, 0.0)


def triplet_loss(im, s, ids, key, name: str, cutoff: float, sampler: Callable):
  """TripletLoss.forward: both directions on sim = im s^T, positives = same image id."""
  sim = jnp.matmul(im, s.T, preferred_element_type=jnp.float32)
  pos = ids[:, None] == ids[None, :]
  k1, k2 = jax.random.split(key)
  return (triplet_direction(sim, pos, ~pos, k1, f"{name}/i2t", cutoff, sampler)
          + triplet_direction(sim.T, pos.T, ~pos.T, k2, f"{name}/t2i", cutoff, sampler))


def vse_loss(im, s, ids, margin: float, max_violation):
  """ContrastiveLoss (mask_repeat: every pair of one image is masked, not only the
  diagonal): hinge on sim = im s^T, hardest negatives or summed violations."""
  sim = jnp.matmul(im, s.T, preferred_element_type=jnp.float32)
  diag = jnp.diagonal(sim)
  keep = ids[:, None] != ids[None, :]
  cost_s = jnp.where(keep, jax.nn.relu(margin + sim - diag[:, None]), 0.0)
  cost_im = jnp.where(keep, jax.nn.relu(margin + sim - diag[None, :]), 0.0)
  hardest = jnp.sum(jnp.max(cost_s, 1)) + jnp.sum(jnp.max(cost_im, 0))
  return jnp.where(max_violation, hardest, jnp.sum(cost_s) + jnp.sum(cost_im))


# ---------------------------------------------------------------- relation module


class RelevanceMlp(nn.Module):
  """Their `nn.Sequential(Linear(K, K), ReLU, Dropout(0), Linear(K, 1))`."""
  topk: int

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(Linear(self.topk, name="linear_0")(x))
    return Linear(1, name="linear_1")(h)[..., 0]


def word_region_scores(regions, region_mask, words, word_mask, topk: int):
  """AdjacencyLearning's inputs to its MLPs (img_len_use=False, scan=True), all without
  gradient: (t2i top-k (Bt, Bi, K), t2i mean (Bt, Bi), i2t top-k (Bi, Bt, K), i2t mean
  (Bi, Bt)).

  Their batch is padded to its longest image and caption; the padded rows (the features
  of zero regions, BERT's outputs at padding) take part where theirs do: every region
  up to the longest image in the region max / mean / top-k, and for caption i its first
  max(topk, len_i) tokens in the word normalisation and top-k."""
  regions = jax.lax.stop_gradient(regions)
  words = jax.lax.stop_gradient(words)
  r = regions.shape[1]
  length = words.shape[1]
  img_len = jnp.sum(region_mask, axis=1)
  cap_len = jnp.sum(word_mask, axis=1)
  region_ok = jnp.arange(r)[None, :] < jnp.max(img_len)                       # (1, R)
  n_sel = jnp.minimum(jnp.maximum(cap_len, topk), jnp.max(cap_len))
  word_sel = jnp.arange(length)[None, :] < n_sel[:, None]                   # (Bt, L)
  word_real = jnp.arange(length)[None, :] < cap_len[:, None]                # (Bt, L)
  sim = jnp.einsum("twe,ire->tiwr", normalize(words), normalize(regions))
  sim = jnp.where(sim >= 0, sim, 0.1 * sim)                                  # leaky_relu
  sel = word_sel[:, None, :, None] & region_ok[None, :, None, :]
  sim = jnp.where(sel, sim, 0.0)
  # t2i: normalised over the selected words, max over the regions.
  by_word = sim / jnp.maximum(jnp.sqrt(jnp.sum(sim * sim, axis=2, keepdims=True)), 1e-12)
  row = jnp.max(jnp.where(region_ok[None, :, None, :], by_word, -jnp.inf), axis=3)
  row_mean = (jnp.sum(jnp.where(word_real[:, None, :], row, 0.0), axis=2)
              / jnp.maximum(cap_len, 1)[:, None])
  row_topk = top_k_or_fewer(jnp.where(word_sel[:, None, :], row, -jnp.inf), topk)
  # i2t: normalised over the regions, max over the caption's real words.
  by_region = sim / jnp.maximum(jnp.sqrt(jnp.sum(sim * sim, axis=3, keepdims=True)), 1e-12)
  col = jnp.max(jnp.where(word_real[:, None, :, None], by_region, -jnp.inf), axis=2)
  n_regions = jnp.maximum(jnp.max(img_len), 1)
  col_mean = jnp.sum(jnp.where(region_ok[None], col, 0.0), axis=2) / n_regions
  col_topk = top_k_or_fewer(jnp.where(region_ok[None], col, -jnp.inf), topk)
  # Fewer than topk selected words / regions (their topk would raise): zeros there.
  row_topk = jnp.where(jnp.isfinite(row_topk), row_topk, 0.0)
  col_topk = jnp.where(jnp.isfinite(col_topk), col_topk, 0.0)
  return row_topk, row_mean, jnp.swapaxes(col_topk, 0, 1), col_mean.T


class RelationModule(nn.Module):
  """GraphLoss's parameters and its post-warm-up branch: AdjacencyModel (the relevance
  MLPs `adj_learning/mlp_t2i`, `mlp_i2t`) and the batch TransformerEncoder `gnn`.
  Returns (enhanced image embeddings, enhanced caption embeddings, reg loss)."""
  config: ObjectiveConfig

  @nn.compact
  def __call__(self, image, text, train: bool):
    c = self.config
    img, cap = image["embedding"], text["embedding"]
    n = img.shape[0]
    # Connection relation (no gradient).
    i2i_c = connected(jax.lax.stop_gradient(img @ img.T), c.threshold)
    t2t_c = connected(jax.lax.stop_gradient(cap @ cap.T), c.threshold)
    # Relevance relation.
    i2i = jnp.exp(-cdist(img, img) / SIGMA)
    t2t = jnp.exp(-cdist(cap, cap) / SIGMA)
    t2i_topk, t2i_mean, i2t_topk, i2t_mean = word_region_scores(
        image["features"], image["mask"], text["features"], text["mask"], c.topk)
    t2i = RelevanceMlp(c.topk, name="mlp_t2i")(t2i_topk) + t2i_mean
    i2t = RelevanceMlp(c.topk, name="mlp_i2t")(i2t_topk) + i2t_mean
    t2i_c = connected(t2i_mean, c.threshold)
    i2t_c = connected(i2t_mean, c.threshold)
    guide = jax.lax.stop_gradient(jnp.exp(-cdist(img, cap) / SIGMA))
    reg = kl_div(guide, i2t) + kl_div(guide.T, t2i)
    connect = jnp.block([[i2i_c, i2t_c], [t2i_c, t2t_c]])
    relevance = jnp.block([[i2i, i2t], [t2i, t2t]])
    bias = jnp.where(connect, c.mask_weight * relevance, NEG)
    if c.norm_input:
      all_embs = jnp.concatenate([img, cap], 0)
    else:
      all_embs = jnp.concatenate([image["pooled"], text["pooled"]], 0)
    out = TorchEncoder(c.num_layers_enc, c.nhead, c.embed_size, c.dropout, name="gnn")(
        all_embs[None], bias[None], train)[0]
    return normalize(out[:n]), normalize(out[n:]), reg


class GraphObjective:
  """The family objective (see `models/__init__.py`): GraphLoss with the relation
  module's variables. `sampler(key, weights, name) -> (B, B) ids` draws the triplet
  negatives (`sample_negatives`); names are "base/i2t", "base/t2i", "gnn_1/..." (image
  x enhanced caption), "gnn_2/..." (enhanced image x caption), "gnn_3/..."."""

  def __init__(self, config: ObjectiveConfig, sampler: Optional[Callable] = None):
    self.config = config
    self.sampler = sampler or sample_negatives
    self.module = RelationModule(config)
    self.lr_scale = float(config.graph_lr_factor)
    self.active_from = int(config.warmup)

  def init(self, rng, outputs) -> dict:
    """Fresh variables, initialised as torch's: the layers of `gnn` copies of one
    layer (`_get_clones`), `mlp_i2t` a copy of `mlp_t2i` (`copy.deepcopy`)."""
    p_rng, d_rng = jax.random.split(rng)
    params = self.module.init({"params": p_rng, "dropout": d_rng}, outputs["image"],
                              outputs["text"], train=False)["params"]
    params = dict(params)
    params["gnn"] = same_initial_layers(params["gnn"])
    # Copies, not the same arrays: the train step donates every buffer of its state.
    params["mlp_i2t"] = jax.tree_util.tree_map(jnp.copy, params["mlp_t2i"])
    return {"params": params}

  def _loss(self, kind: str, im, s, ids, step, key, name: str):
    c = self.config
    if kind == "trip":
      return triplet_loss(im, s, ids, key, name, c.nonzero_loss_cutoff, self.sampler)
    # Their ContrastiveLoss masks the pairs of one image only with --mask_repeat 1
    # (TripletLoss always reads the ids).
    ids = ids if c.mask_repeat else jnp.arange(im.shape[0], dtype=jnp.int32)
    max_violation = c.max_violation & (step >= c.sum_violation_steps)
    return vse_loss(im, s, ids, c.margin, max_violation)

  def loss(self, variables, outputs, batch, step, rng):
    """GraphLoss.forward at iteration `step` (see the module docstring)."""
    c = self.config
    image, text = outputs["image"], outputs["text"]
    img, cap = image["embedding"], text["embedding"]
    ids = batch["image_index"]
    keys = jax.random.split(rng, 5)
    base = self._loss(c.base_loss, img, cap, ids, step, keys[0], "base")

    def relation(_):
      img_g, cap_g, reg = self.module.apply(variables, image, text, train=True,
                                            rngs={"dropout": keys[4]})
      gnn = self._loss(c.gnn_loss, img_g, cap_g, ids, step, keys[3], "gnn_3")
      if c.cross_loss:
        gnn = (self._loss(c.gnn_loss, img, cap_g, ids, step, keys[1], "gnn_1")
               + self._loss(c.gnn_loss, img_g, cap, ids, step, keys[2], "gnn_2") + gnn)
      return gnn + c.reg_loss_weight * reg

    extra = jax.lax.cond(step >= c.warmup, relation,
                         lambda _: jnp.zeros((), jnp.float32), None)
    return base + extra

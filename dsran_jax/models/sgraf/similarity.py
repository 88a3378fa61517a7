"""SGRAF's blocks (Diao et al., AAAI 2021; Paranioar/SGRAF model.py): the per-item
self-attention globals, similarity vectors, graph reasoning and attention filtration,
and the fused per-pair head over a tile. KIDRR, built on SGRAF, imports them from here.

Per item (computed once, in `encode_*`):

    VisualSA(V, mean V):  l = Drop(tanh(BN_slots(W_l V)))   g = Drop(tanh(BN_d(W_g v_mean)))
                          w = softmax_r(W_c (l_r * g)),      v* = l2n(sum_r w_r v_r)
    TextSA(E, mean E):    the same without the BatchNorms, giving e*

`BN_slots` is their `nn.BatchNorm1d(36)` applied to a (B, 36, d) tensor: its channels are
the region *slots*, so the statistics are per slot over (batch x feature)
(`SlotBatchNorm`). `reference_bn=False` swaps in a per-feature BatchNorm over the real
regions (`layers.MaskedBatchNorm`), which is what the layer was presumably meant to be.

Per pair (i, j) (`tile_scores`, every pair of a tile at once):

    a_t  = l2n(SCAN_attention(query e_t, context V_i, lambda=9))     clipped-l2 over words
    n_t  = l2n(W_loc (a_t - e_t)^2)   t = 1..L    n_0 = l2n(W_glo (v*_i - e*_j)^2)
    SGR: 3 x  N <- ReLU(W_r (softmax_row((N W_q + b_q)(N W_k + b_k)^T) N) + b_r);  read N_0
    SAF: alpha = l1n(sigmoid(BN_1(w_a . N))), z = l2n(alpha N)
    score = sigmoid(w_e . (N_0 | z) + b_e)

The KIDRR extensions (docs/models/kidrr.md, `Extensions`, all off by default) add
nodes (i2t local, global-local) and change the reasoning step (edge blending, top-k,
residual); with all of them off the code path is SGRAF's, operation for operation.

How the tile is computed (exact algebra, not approximations):
- SGR edges: `(N W_q + b_q)(N W_k + b_k)^T = (N M + u) N^T + (terms constant along each
  row)`, with `M = W_q W_k^T` and `u = W_k b_q`; the row constants cancel in the
  softmax, so one s x s product per node replaces two. `W_r (A N) = A (N W_r)`, so
  `N [M | W_r]` is one (s x 2s) matmul per step.
- SGR reads only node 0 after the last step, so the last step updates node 0 alone
  (its keys and values are still every node).
- Captions are sorted by length inside the tile and scored in chunks; each chunk runs
  at the smallest multiple of `length_bucket` that holds its longest caption
  (`lax.switch` between a few static lengths). Padded words are masked everywhere, so
  cutting trailing padding changes no score: this only removes wasted work.

Memory: one chunk of `C` captions against the tile's `I` images holds about
`3 I C L d` floats of attended contexts ((I, C, L, d): context, squared difference and
its projection input) plus `~8 I C (L+1) s` floats of nodes (`+ 3 I C k d` with the i2t
nodes). `C = max_block_elements // (I (L [+ k]) d)`, so `max_block_elements` bounds the
largest intermediate.
"""
import dataclasses
import functools
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.cross_attention import masked_softmax
from dsran_jax.models.common.layers import Dropout, Linear, MaskedBatchNorm, dense, l2norm

EPS = 1e-8          # SGRAF's l2norm / l1norm / SCAN_attention eps
LEAKY_SLOPE = 0.1   # SCAN_attention's nn.LeakyReLU(0.1)
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
HIGHEST = jax.lax.Precision.HIGHEST
HEADS = ("SGR", "SAF")
BLENDS = ("none", "scalar", "node")


def l2n(x, axis: int = -1):
  """SGRAF's l2norm: x / (||x|| + 1e-8), finite gradient at 0."""
  return l2norm(x, axis=axis, eps=EPS)


def _sqrt(x):
  return jnp.sqrt(jnp.maximum(x, 1e-30))


# ------------------------------------------------------------------ per-item globals


class SlotBatchNorm(nn.Module):
  """Their `nn.BatchNorm1d(num_regions)` on (B, R, d): one channel per region slot.

  Train mode normalises slot r with the mean and biased variance over the batch's real
  regions in that slot times every feature (count = #images with slot r real x d), and
  updates the running stats with momentum 0.1 and the unbiased variance, as PyTorch
  does; a slot no image fills keeps its running stats. Eval mode uses the running
  stats. Parameters: scale/bias (R,), batch_stats mean/var (R,).
  """
  num_slots: int
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x, mask, train: bool):
    if x.ndim != 3 or x.shape[1] != self.num_slots:
      raise ValueError(f"SlotBatchNorm({self.num_slots}): expected (B, {self.num_slots}, d), "
                       f"got {tuple(x.shape)}")
    r = self.num_slots
    scale = self.param("scale", nn.initializers.ones, (r,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (r,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((r,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((r,), jnp.float32))
    x = x.astype(jnp.float32)
    if train:
      m = mask.astype(jnp.float32)[..., None]                       # (B, R, 1)
      count = jnp.sum(m, axis=(0, 2)) * x.shape[2]                  # (R,)
      n = jnp.maximum(count, 1.0)
      mean = jnp.sum(x * m, axis=(0, 2)) / n
      var = jnp.sum(jnp.square(x - mean[:, None]) * m, axis=(0, 2)) / n
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        seen = count > 0
        ra_mean.value = jnp.where(seen, (1 - self.momentum) * ra_mean.value
                                  + self.momentum * mean, ra_mean.value)
        ra_var.value = jnp.where(seen, (1 - self.momentum) * ra_var.value
                                 + self.momentum * unbiased, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return (x - mean[:, None]) * inv[:, None] + bias[:, None]


def _attention_pool(local, mask, l_emb, g_emb, common: nn.Module):
  """softmax_r(W_c (l_r * g)) over the real positions, then l2n(sum_r w_r local_r)."""
  logits = common(l_emb * g_emb[:, None, :])[..., 0]
  weights = masked_softmax(logits, mask.astype(bool), axis=-1)
  return l2n(jnp.einsum("bn,bnd->bd", weights, local.astype(jnp.float32), precision=HIGHEST))


class VisualSA(nn.Module):
  """SGRAF's VisualSA: the image global `v*` from its regions (module docstring).

  Attributes:
    embed_dim: d. dropout_rate: their 0.4. num_regions: the slot BatchNorm's size (36).
    reference_bn: their per-slot BatchNorm1d(num_regions) (True) or a per-feature one
      over the real regions (False).
  Parameter paths: local_fc, local_bn, global_fc, global_bn, common_fc.
  """
  embed_dim: int
  dropout_rate: float = 0.4
  num_regions: int = 36
  reference_bn: bool = True

  @nn.compact
  def __call__(self, local, mask, raw_global, train: bool):
    d = self.embed_dim
    l_emb = Linear(d, init="xavier", name="local_fc")(local)
    if self.reference_bn:
      l_emb = SlotBatchNorm(self.num_regions, name="local_bn")(l_emb, mask, train)
    else:
      l_emb = MaskedBatchNorm(name="local_bn")(l_emb, mask, train)
    l_emb = Dropout(self.dropout_rate, deterministic=not train)(jnp.tanh(l_emb))
    g_emb = Linear(d, init="xavier", name="global_fc")(raw_global)
    g_emb = MaskedBatchNorm(name="global_bn")(g_emb[:, None, :], None, train)[:, 0]
    g_emb = Dropout(self.dropout_rate, deterministic=not train)(jnp.tanh(g_emb))
    return _attention_pool(local, mask, l_emb, g_emb,
                           Linear(1, init="xavier", name="common_fc"))


class TextSA(nn.Module):
  """SGRAF's TextSA: the caption global `e*` from its words (no BatchNorm).

  Padded words take no part: the mean that seeds it and the softmax run over the
  caption's real words only, as their per-caption slice `cap_emb[i, :n_word]` does.
  Parameter paths: local_fc, global_fc, common_fc.
  """
  embed_dim: int
  dropout_rate: float = 0.4

  @nn.compact
  def __call__(self, local, mask, raw_global, train: bool):
    d = self.embed_dim
    l_emb = Linear(d, init="xavier", name="local_fc")(local)
    l_emb = Dropout(self.dropout_rate, deterministic=not train)(jnp.tanh(l_emb))
    g_emb = Linear(d, init="xavier", name="global_fc")(raw_global)
    g_emb = Dropout(self.dropout_rate, deterministic=not train)(jnp.tanh(g_emb))
    return _attention_pool(local, mask, l_emb, g_emb,
                           Linear(1, init="xavier", name="common_fc"))


# --------------------------------------------------------- parameter holders (per pair)
# The per-pair head is a pure function of parameter arrays (it runs inside lax.map over
# caption chunks, where Flax modules cannot be called); these modules only own the
# arrays, under the parameter paths the converter maps their checkpoints onto.


class DenseParams(nn.Module):
  """kernel (in, out) Xavier-uniform and bias (out,) zero: their init_weights()."""
  in_features: int
  features: int

  def setup(self):
    self.kernel = self.param("kernel", nn.initializers.xavier_uniform(),
                             (self.in_features, self.features), jnp.float32)
    self.bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)

  def arrays(self) -> Dict[str, jnp.ndarray]:
    return {"kernel": self.kernel, "bias": self.bias}


class GraphParams(nn.Module):
  """One GraphReasoning step: graph_query_w, graph_key_w, sim_graph_w (s -> s), plus
  the KIDRR edge-blend gate when `blend` is not "none" (`beta`: a scalar logit, or
  `beta_w`: s -> 1 per node)."""
  sim_dim: int
  blend: str = "none"

  def setup(self):
    s = self.sim_dim
    self.graph_query_w = DenseParams(s, s)
    self.graph_key_w = DenseParams(s, s)
    self.sim_graph_w = DenseParams(s, s)
    if self.blend == "scalar":
      self.beta = self.param("beta", nn.initializers.zeros, (), jnp.float32)
    elif self.blend == "node":
      self.beta_w = DenseParams(s, 1)

  def arrays(self) -> Dict[str, Any]:
    out = {"q": self.graph_query_w.arrays(), "k": self.graph_key_w.arrays(),
           "r": self.sim_graph_w.arrays()}
    if self.blend == "scalar":
      out["beta"] = self.beta
    elif self.blend == "node":
      out["beta_w"] = self.beta_w.arrays()
    return out


class BatchNormParams(nn.Module):
  """A BatchNorm1d's scale/bias (params) and running mean/var (batch_stats)."""
  features: int

  def setup(self):
    c = self.features
    self.scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    self.bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    self.mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    self.var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

  def arrays(self) -> Dict[str, jnp.ndarray]:
    return {"scale": self.scale, "bias": self.bias, "mean": self.mean.value,
            "var": self.var.value}


class FiltrationParams(nn.Module):
  """AttentionFiltration: attn_sim_w (s -> 1) and bn (BatchNorm1d(1))."""
  sim_dim: int

  def setup(self):
    self.attn_sim_w = DenseParams(self.sim_dim, 1)
    self.bn = BatchNormParams(1)

  def arrays(self) -> Dict[str, Any]:
    return {"w": self.attn_sim_w.arrays(), "bn": self.bn.arrays()}


# ----------------------------------------------------------------------- pair options


@dataclasses.dataclass(frozen=True)
class Extensions:
  """KIDRR's per-pair modules on the SGRAF core (docs/models/kidrr.md); all off is SGRAF.

  Attributes:
    i2t: add one i2t local node per region, `l2n(W_i2t (b_r - v_r)^2)` with
      `b_r = l2n(SCAN_attention(v_r | words, lambda_i2t))`.
    lambda_i2t: i2t softmax temperature (SCAN's 4).
    global_local: add two global-local nodes: the caption global attending over the
      regions and the image global attending over the words (`tile_scores`).
    blend: "none" | "scalar" | "node": from the second reasoning step on, the edges are
      `beta A_prev + (1 - beta) A_new`, beta = sigmoid(a learned scalar) or
      sigmoid(w . N_i + b) per node.
    topk: keep each row's top-k edges and renormalise (0: dense, SGRAF).
    residual: N <- ReLU(...) + N.
    saf_steps: reasoning steps run before the SAF readout (SGRAF's SAF has none).
  """
  i2t: bool = False
  lambda_i2t: float = 4.0
  global_local: bool = False
  blend: str = "none"
  topk: int = 0
  residual: bool = False
  saf_steps: int = 0

  def __post_init__(self):
    if self.blend not in BLENDS:
      raise ValueError(f"Extensions.blend={self.blend!r}: expected one of {BLENDS}")
    if self.topk < 0 or self.saf_steps < 0:
      raise ValueError(f"Extensions.topk={self.topk} / saf_steps={self.saf_steps}: must "
                       f"be >= 0")


@dataclasses.dataclass(frozen=True)
class PairOptions:
  """Static options of `tile_scores` (see SgrafConfig for their meaning)."""
  head: str = "SGR"
  lambda_softmax: float = 9.0
  max_block_elements: int = 1 << 24
  length_bucket: int = 8
  dtype: str = "float32"
  ext: Extensions = Extensions()


# ------------------------------------------------------------------ per-pair functions


def _project(x, p, dtype):
  """x @ kernel + bias in `dtype` (fp32 params and output)."""
  return dense(x, p["kernel"], p["bias"], dtype).astype(jnp.float32)


def similarity_vector(a, b, p, dtype=jnp.float32):
  """SGRAF's similarity representation l2n(W (a - b)^2) over the last axis."""
  return l2n(_project(jnp.square(a - b), p, dtype))


def _blend_gate(n_query, gp):
  if "beta" in gp:
    return jax.nn.sigmoid(gp["beta"])
  return jax.nn.sigmoid(_project(n_query, gp["beta_w"], jnp.float32))   # (..., q, 1)


def _sparsify(a, k: int):
  """Keeps each row's entries >= its k-th largest (ties kept), renormalised."""
  if k <= 0 or k >= a.shape[-1]:
    return a
  values, chosen = jax.lax.top_k(jax.lax.stop_gradient(a), k)
  # The k entries top_k chose are kept whatever `a >= thr` says: XLA may compute `a` again
  # for the comparison, rounded differently, and drop the k-th entry (HREM's threshold
  # did under full optimisation, docs/models/hrem.md).
  kept = jnp.any(chosen[..., None] == jnp.arange(a.shape[-1]), axis=-2)
  a = jnp.where(kept | (a >= values[..., -1:]), a, 0.0)
  return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-30)


def graph_step(nodes, key_mask, gp, ext: Extensions, prev_edges=None,
               rows_only: bool = False, dtype=jnp.float32):
  """One SGRAF GraphReasoning step (with KIDRR's RGR options) on (..., n, s) nodes.

  Args:
    nodes: (..., n, s); key_mask: bool broadcastable to (..., n): real nodes (padded
      words never receive attention; their own rows are computed and never read).
    gp: GraphParams.arrays(). prev_edges: the previous step's edges (blend), or None.
    rows_only: update node 0 only (the last step before SGR's node-0 readout).

  Returns (new nodes (..., n or 1, s), edges (..., n or 1, n)).
  """
  q, k, r = gp["q"], gp["k"], gp["r"]
  m = jnp.dot(q["kernel"], k["kernel"].T, precision=HIGHEST)          # (s, s)
  u = jnp.dot(k["kernel"], q["bias"], precision=HIGHEST)              # (s,)
  km = jnp.broadcast_to(key_mask, nodes.shape[:-1])[..., None, :]
  queries = nodes[..., :1, :] if rows_only else nodes
  if rows_only:
    p = _project(queries, {"kernel": m, "bias": u}, dtype)
  else:
    both = _project(nodes, {"kernel": jnp.concatenate([m, r["kernel"]], 1),
                            "bias": jnp.concatenate([u, jnp.zeros_like(u)])}, dtype)
    p, values = both[..., :m.shape[1]], both[..., m.shape[1]:]
  logits = jnp.einsum("...qs,...ns->...qn", p, nodes, precision=HIGHEST)
  edges = masked_softmax(logits, km, axis=-1)
  if ext.blend != "none" and prev_edges is not None:
    beta = _blend_gate(queries, gp)
    prev = prev_edges[..., :1, :] if rows_only else prev_edges
    edges = beta * prev + (1.0 - beta) * edges
  edges = _sparsify(edges, ext.topk)
  if rows_only:
    out = _project(jnp.einsum("...qn,...ns->...qs", edges, nodes, precision=HIGHEST), r, dtype)
  else:
    out = jnp.einsum("...qn,...ns->...qs", edges, values, precision=HIGHEST) + r["bias"]
  out = jax.nn.relu(out)
  if ext.residual:
    out = out + queries
  return out, edges


def graph_reasoning(nodes, key_mask, steps: Sequence[Dict[str, Any]], ext: Extensions,
                    node0_only: bool, dtype=jnp.float32):
  """`len(steps)` graph steps; `node0_only`: the caller reads node 0 only."""
  edges = None
  for t, gp in enumerate(steps):
    last = t == len(steps) - 1
    nodes, edges = graph_step(nodes, key_mask, gp, ext, edges,
                              rows_only=node0_only and last, dtype=dtype)
  return nodes


def filtration_logits(nodes, fp, dtype=jnp.float32):
  """w_a . N + b_a per node: (..., n)."""
  return _project(nodes, fp["w"], dtype)[..., 0]


def per_caption_stats(x, mask):
  """BatchNorm1d(1) statistics of their per-caption call: for each caption (axis 1) the
  mean and biased variance of x (I, C, n) over the tile's images and the caption's real
  nodes, and the element count. Returns (C, 3): mean, var, count."""
  m = mask.astype(jnp.float32)
  count = jnp.sum(m, axis=(0, 2))
  n = jnp.maximum(count, 1.0)
  mean = jnp.sum(x * m, axis=(0, 2)) / n
  var = jnp.sum(jnp.square(x - mean[None, :, None]) * m, axis=(0, 2)) / n
  return jnp.stack([mean, var, count], -1)


def attention_filtration(nodes, node_mask, fp, train: bool, dtype=jnp.float32):
  """SGRAF's AttentionFiltration on (I, C, n, s) nodes.

  The BatchNorm1d(1) uses the running stats in eval mode. In train mode it normalises
  with the statistics their per-caption loop gives it: one call per caption over that
  caption's (images x real nodes). Returns (z (I, C, s), per-caption stats (C, 3)).
  """
  mask = jnp.broadcast_to(node_mask, nodes.shape[:-1])
  x = filtration_logits(nodes, fp, dtype)
  bn = fp["bn"]
  stats = per_caption_stats(x, mask)
  if train:
    mean, var = stats[None, :, None, 0], stats[None, :, None, 1]
  else:
    mean, var = bn["mean"][0], bn["var"][0]
  y = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * bn["scale"][0] + bn["bias"][0]
  att = jnp.where(mask, jax.nn.sigmoid(y), 0.0)
  att = att / (jnp.sum(att, axis=-1, keepdims=True) + EPS)
  z = l2n(jnp.einsum("icn,icns->ics", att, nodes, precision=HIGHEST))
  return z, stats


def running_stats_after_captions(mean, var, stats, momentum: float = BN_MOMENTUM):
  """Running (mean, var) after their loop's one BatchNorm call per caption, in caption
  order: r <- (1 - m) r + m s_j with the unbiased variance of each call."""
  n = stats[:, 2]
  unbiased = stats[:, 1] * n / jnp.maximum(n - 1.0, 1.0)
  c = stats.shape[0]
  w = momentum * (1 - momentum) ** jnp.arange(c - 1, -1, -1, dtype=jnp.float32)
  decay = (1 - momentum) ** c
  return decay * mean + jnp.sum(w * stats[:, 0]), decay * var + jnp.sum(w * unbiased)


def _leaky(x):
  return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def _chunk_scores(p, img, words, word_mask, word_glob, opts: PairOptions, train: bool):
  """(I, C) scores of the tile's images against one chunk of captions, and the SAF
  per-caption BatchNorm stats (C, 3) (zeros for SGR)."""
  ext = opts.ext
  dtype = jnp.dtype(opts.dtype)
  lam = opts.lambda_softmax
  v, vm, vg = img["regions"], img["region_mask"], img["global"]
  e, em, eg = words, word_mask, word_glob
  n_img, n_cap = v.shape[0], e.shape[0]
  s = jnp.einsum("cld,ikd->iclk", e, v, precision=HIGHEST)              # (I, C, L, k)
  wm = em[None, :, :, None]
  rm = vm[:, None, None, :]
  # t2i (SCAN_attention, their hard-coded smooth=9): clipped l2 over the words.
  sl = jnp.where(wm, _leaky(s), 0.0)
  sq_words = jnp.sum(jnp.square(sl), axis=2, keepdims=True)            # (I, C, 1, k)
  att = masked_softmax(lam * sl / (_sqrt(sq_words) + EPS), rm, axis=-1, bound=lam)
  ctx = l2n(jnp.einsum("iclk,ikd->icld", att, v, precision=HIGHEST))
  nodes = [similarity_vector(vg[:, None, :], eg[None, :, :], p["glo"], dtype)[:, :, None]]
  masks = [jnp.ones((1, n_cap, 1), bool)]
  if ext.global_local:
    lam2 = ext.lambda_i2t
    # Caption global -> regions. The query-axis normaliser includes the caption's words
    # (a lone query would make the clipped l2 normalisation a sign function).
    sg = _leaky(jnp.einsum("ikd,cd->ick", v, eg, precision=HIGHEST))
    sn = sg / (_sqrt(sq_words[:, :, 0] + jnp.square(sg)) + EPS)
    a = masked_softmax(lam * sn, vm[:, None, :], axis=-1, bound=lam)
    g_v = l2n(jnp.einsum("ick,ikd->icd", a, v, precision=HIGHEST))
    # Image global -> words, normalised together with the image's regions.
    sq_regions = jnp.sum(jnp.square(jnp.where(rm, _leaky(s), 0.0)), axis=-1)   # (I, C, L)
    sg2 = _leaky(jnp.einsum("id,cld->icl", vg, e, precision=HIGHEST))
    sn2 = sg2 / (_sqrt(sq_regions + jnp.square(sg2)) + EPS)
    a2 = masked_softmax(lam2 * sn2, em[None], axis=-1, bound=lam2)
    g_t = l2n(jnp.einsum("icl,cld->icd", a2, e, precision=HIGHEST))
    nodes.append(similarity_vector(g_v, eg[None], p["glv"], dtype)[:, :, None])
    nodes.append(similarity_vector(g_t, vg[:, None], p["glt"], dtype)[:, :, None])
    masks.append(jnp.ones((1, n_cap, 2), bool))
  nodes.append(similarity_vector(ctx, e[None], p["loc"], dtype))       # (I, C, L, s)
  masks.append(em[None])
  if ext.i2t:
    lam2 = ext.lambda_i2t
    sr = jnp.where(rm, _leaky(s), 0.0)
    sq = jnp.sum(jnp.square(sr), axis=-1, keepdims=True)               # over the regions
    a = masked_softmax(lam2 * sr / (_sqrt(sq) + EPS), wm, axis=2, bound=lam2)
    ctx_r = l2n(jnp.einsum("iclk,cld->ickd", a, e, precision=HIGHEST))
    nodes.append(similarity_vector(ctx_r, v[:, None], p["i2t"], dtype))   # (I, C, k, s)
    masks.append(vm[:, None, :])
  graph = jnp.concatenate(nodes, axis=2)
  mask = jnp.concatenate([jnp.broadcast_to(m, (n_img, n_cap, m.shape[2])) for m in masks], 2)
  stats = jnp.zeros((n_cap, 3), jnp.float32)
  if opts.head == "SGR":
    vec = graph_reasoning(graph, mask, p["sgr"], ext, node0_only=True, dtype=dtype)[:, :, 0]
  else:
    if ext.saf_steps:
      graph = graph_reasoning(graph, mask, p["sgr"], ext, node0_only=False, dtype=dtype)
    vec, stats = attention_filtration(graph, mask, p["saf"], train, dtype)
  score = jax.nn.sigmoid(_project(vec, p["eval"], dtype)[..., 0])
  return score, stats


def bucket_lengths(max_len: int, width: int) -> Tuple[int, ...]:
  """The static caption lengths chunks run at: multiples of `width` up to max_len."""
  if width <= 0 or width >= max_len:
    return (max_len,)
  return tuple(sorted({min(max_len, w) for w in range(width, max_len + width, width)}))


def caption_chunk(n_img: int, n_regions: int, max_len: int, dim: int, max_elements: int,
                  i2t: bool = False) -> int:
  """Captions per chunk so one (I, C, L [+ k], d) intermediate holds <= max_elements."""
  if max_elements <= 0:
    return 1 << 30
  per_caption = max(n_img * (max_len + (n_regions if i2t else 0)) * dim, 1)
  return max(int(max_elements) // per_caption, 1)


def tile_scores(p, img, txt, opts: PairOptions, train: bool = False):
  """(I, J) scores of every image of a tile with every caption of it, and the SAF
  per-caption BatchNorm stats (J, 3) in caption order (zeros for SGR).

  Args:
    p: the head's parameter arrays (SimEncoder.head_arrays()).
    img: {"regions" (I, k, d), "region_mask" (I, k), "global" (I, d)}.
    txt: {"words" (J, L, d), "word_mask" (J, L), "global" (J, d)}.
  """
  v = img["regions"].astype(jnp.float32)
  vm = img["region_mask"].astype(bool)
  img = {"regions": jnp.where(vm[..., None], v, 0.0), "region_mask": vm,
         "global": img["global"].astype(jnp.float32)}
  e = txt["words"].astype(jnp.float32)
  em = txt["word_mask"].astype(bool)
  e = jnp.where(em[..., None], e, 0.0)
  eg = txt["global"].astype(jnp.float32)
  n_img, n_reg, dim = img["regions"].shape
  n_cap, max_len = em.shape
  chunk = min(caption_chunk(n_img, n_reg, max_len, dim, opts.max_block_elements,
                            opts.ext.i2t), n_cap)
  buckets = bucket_lengths(max_len, opts.length_bucket)
  lengths = jnp.sum(em, axis=-1)
  order = jnp.argsort(-lengths, stable=True) if len(buckets) > 1 else jnp.arange(n_cap)
  n_chunks = -(-n_cap // chunk)
  pad = n_chunks * chunk - n_cap

  def prep(x):
    x = jnp.take(x, order, axis=0)
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n_chunks, chunk) + x.shape[1:])

  def run(length, ew, mw, gw):
    return _chunk_scores(p, img, ew[:, :length], mw[:, :length], gw, opts, train)

  def body(args):
    ew, mw, gw = args
    if len(buckets) == 1:
      return run(buckets[0], ew, mw, gw)
    longest = jnp.max(jnp.sum(mw, axis=-1))
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets), longest, side="left"),
                        len(buckets) - 1)
    return jax.lax.switch(index, [functools.partial(run, b) for b in buckets], ew, mw, gw)

  args = (prep(e), prep(em), prep(eg))
  if n_chunks == 1:
    scores, stats = body(jax.tree.map(lambda x: x[0], args))
    scores, stats = scores[None], stats[None]
  else:
    scores, stats = jax.lax.map(body, args)
  scores = jnp.moveaxis(scores, 0, 1).reshape(n_img, n_chunks * chunk)[:, :n_cap]
  stats = stats.reshape(n_chunks * chunk, 3)[:n_cap]
  inverse = jnp.argsort(order)
  return jnp.take(scores, inverse, axis=1), jnp.take(stats, inverse, axis=0)


def flops_per_pair(num_regions: int, num_words: int, dim: int, sim_dim: int,
                   head: str = "SGR", sgr_steps: int = 3, ext: Extensions = Extensions()) -> int:
  """Multiply-adds x2 of one pair in this implementation (matmuls only; per-item work
  and elementwise ops left out): attention 4 k L d, similarity vectors 2 n_sim d s,
  reasoning 4 n s^2 + 4 n^2 s per full step and ~2 s^2 + 4 n s for SGR's last one."""
  k, length, d, s = num_regions, num_words, dim, sim_dim
  flops = 4 * k * length * d
  n_sim = 1 + length + (2 if ext.global_local else 0) + (k if ext.i2t else 0)
  flops += 2 * n_sim * d * s
  if ext.global_local:
    flops += 4 * k * d + 4 * length * d
  if ext.i2t:
    flops += 2 * k * length * d
  n = n_sim
  steps = sgr_steps if head == "SGR" else ext.saf_steps
  full = steps - 1 if head == "SGR" else steps
  flops += full * (4 * n * s * s + 4 * n * n * s)
  if head == "SGR" and steps:
    flops += 4 * s * s + 4 * n * s
  if head == "SAF":
    flops += 4 * n * s
  return int(flops + 2 * s)


__all__ = ["BLENDS", "EPS", "HEADS", "BatchNormParams", "DenseParams", "Extensions",
           "FiltrationParams", "GraphParams", "PairOptions", "SlotBatchNorm", "TextSA",
           "VisualSA", "attention_filtration", "bucket_lengths", "caption_chunk",
           "filtration_logits", "flops_per_pair", "graph_reasoning", "graph_step", "l2n",
           "per_caption_stats", "running_stats_after_captions", "similarity_vector",
           "tile_scores"]

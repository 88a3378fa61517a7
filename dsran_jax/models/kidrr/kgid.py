"""KIDRR's knowledge graph iterative dissemination (KGID), a reconstruction
(docs/models/kidrr.md, KGID, [INFERRED]: only the abstract of the paper is public).

Per item and modality, on the local nodes X (n x d: the regions or the real words) and
the item's global vector g0 (SGRAF's VisualSA / TextSA output):

    for tau = 1..T_k:
       A   = softmax_row((X W_q)(X W_k)^T / sqrt(d))        over the real nodes
       M   = (A X) W_m                                       association of relevant nodes
       gam = sigmoid(W_gam [X ; 1 g^T])                      one gate per node
       X   = l2n(X + M + gam * (1 (W_b g)^T))                broadcast the global knowledge
       g   = SA(X, g)                                        re-read it from the new nodes
    -> X', g'

Every projection is a Linear with Xavier-uniform weights and zero bias (SGRAF's
init_weights). Padded words are masked out of the softmax and stay exactly zero. The
SA of the loop is a VisualSA / TextSA of its own (SGRAF's, which gives g0, is left
unchanged), shared across tau unless `share_steps=False`. T_k = 0 returns (X, g0).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.common.cross_attention import masked_softmax
from dsran_jax.models.common.layers import Linear
from dsran_jax.models.sgraf.similarity import HIGHEST, TextSA, VisualSA, l2n

MODALITIES = ("image", "text")


class KnowledgeDissemination(nn.Module):
  """KGID over one modality (module docstring).

  Attributes:
    embed_dim: d. steps: T_k. share_steps: one set of weights for every step.
    modality: "image" (the loop's SA is a VisualSA) or "text" (a TextSA).
    dropout_rate, num_regions, reference_bn: the loop SA's (as SGRAF's).
  Parameter paths: {query, key, message, gate, broadcast, sa}[_<tau>].
  """
  embed_dim: int
  steps: int
  share_steps: bool = True
  modality: str = "image"
  dropout_rate: float = 0.4
  num_regions: int = 36
  reference_bn: bool = True

  def _step_modules(self, tau: int):
    d = self.embed_dim
    suffix = "" if self.share_steps else f"_{tau}"
    lin = lambda n, name: Linear(n, init="xavier", name=f"{name}{suffix}")
    if self.modality == "image":
      sa = VisualSA(d, self.dropout_rate, self.num_regions, self.reference_bn,
                    name=f"sa{suffix}")
    else:
      sa = TextSA(d, self.dropout_rate, name=f"sa{suffix}")
    return (lin(d, "query"), lin(d, "key"), lin(d, "message"), lin(1, "gate"),
            lin(d, "broadcast"), sa)

  @nn.compact
  def __call__(self, x, mask, g, train: bool):
    if self.modality not in MODALITIES:
      raise ValueError(f"KGID modality={self.modality!r}: expected one of {MODALITIES}")
    mask = mask.astype(bool)
    x = x.astype(jnp.float32)
    shared = self._step_modules(0) if self.share_steps and self.steps else None
    for tau in range(self.steps):
      query, key, message, gate, broadcast, sa = shared or self._step_modules(tau)
      logits = jnp.einsum("bnd,bmd->bnm", query(x), key(x), precision=HIGHEST)
      a = masked_softmax(logits / jnp.sqrt(float(self.embed_dim)), mask[:, None, :], axis=-1)
      msg = message(jnp.einsum("bnm,bmd->bnd", a, x, precision=HIGHEST))
      g_nodes = jnp.broadcast_to(g[:, None, :], x.shape)
      gam = jax.nn.sigmoid(gate(jnp.concatenate([x, g_nodes], axis=-1)))     # (B, n, 1)
      x = l2n(x + msg + gam * broadcast(g)[:, None, :])
      x = jnp.where(mask[..., None], x, 0.0)
      g = sa(x, mask, g, train)
    return x, g

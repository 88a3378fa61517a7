"""The VSE++ hinge (triplet) loss every model of the zoo trains with.

A model's training call returns the (B, B) score matrix s of every image with every
caption of the batch (for an embedding model, the cosines img @ txt.T); pair i (image i,
caption i) is the positive:

    cost_s[i, j]  = relu(margin + s[i, j] - s[i, i])   caption retrieval, anchor image i
    cost_im[i, j] = relu(margin + s[i, j] - s[j, j])   image retrieval, anchor caption j

with the diagonal zeroed. `max_violation=True` (VSE++, the DSRAN recipe) keeps only the
hardest negative per anchor: sum_i max_j cost_s + sum_j max_i cost_im. Otherwise every
violation is summed (the VSE0 loss, used as a warm-up).

Written on global arrays, so under `jax.jit` with the batch sharded over a mesh the
hardest negatives are searched in the whole global batch, as in the authors' single-GPU
training.
"""
from typing import Optional

import jax
import jax.numpy as jnp


def hinge_from_scores(scores: jax.Array, margin: float = 0.2, max_violation: bool = True,
                      valid: Optional[jax.Array] = None) -> jax.Array:
  """Returns the scalar VSE++ hinge loss of a (B, B) score matrix, any model's.

  Args:
    scores: (B, B) scores; row i is image i, column j caption j, (i, i) the positive.
    margin: hinge margin (0.2 in every recipe of the zoo).
    max_violation: hardest negative only (True) or the sum over all negatives.
    valid: optional (B,) bool; False rows are padding and count neither as anchors nor
      as negatives. None: every row is real.
  Returns:
    The float32 loss, summed (not averaged) over anchors, as the authors do.
  """
  if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
    raise ValueError(f"expected a square (B, B) score matrix, got shape {scores.shape}")
  b = scores.shape[0]
  scores = scores.astype(jnp.float32)
  diag = jnp.diagonal(scores)
  cost_s = jax.nn.relu(margin + scores - diag[:, None])    # anchor image i (row)
  cost_im = jax.nn.relu(margin + scores - diag[None, :])   # anchor caption j (column)
  keep = ~jnp.eye(b, dtype=bool)
  if valid is not None:
    valid = jnp.asarray(valid, dtype=bool)
    keep = keep & valid[:, None] & valid[None, :]
  cost_s = jnp.where(keep, cost_s, 0.0)
  cost_im = jnp.where(keep, cost_im, 0.0)
  if max_violation:
    # Costs are >= 0, so masked entries (0) never beat a real violation.
    return jnp.sum(jnp.max(cost_s, axis=1)) + jnp.sum(jnp.max(cost_im, axis=0))
  return jnp.sum(cost_s) + jnp.sum(cost_im)


def contrastive_loss(img_emb: jax.Array, txt_emb: jax.Array, margin: float = 0.2,
                     max_violation: bool = True,
                     valid: Optional[jax.Array] = None) -> jax.Array:
  """`hinge_from_scores` of the cosine matrix of (B, E) L2-normalised embeddings."""
  if img_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
    raise ValueError(f"expected two (B, E) arrays of one shape, got {img_emb.shape} "
                     f"and {txt_emb.shape}")
  scores = jnp.matmul(img_emb, txt_emb.T, preferred_element_type=jnp.float32)
  return hinge_from_scores(scores, margin, max_violation, valid)


def training_loss(scores: jax.Array, train_config, step) -> jax.Array:
  """The loss a step minimises: hardest negatives, or the sum of violations for the
  first `sum_violation_steps` steps (VSE++ warm-up) or throughout (`max_violation=False`)."""
  t = train_config
  if not t.max_violation:
    return hinge_from_scores(scores, t.margin, max_violation=False)
  max_v = hinge_from_scores(scores, t.margin, max_violation=True)
  if t.sum_violation_steps > 0:
    sum_v = hinge_from_scores(scores, t.margin, max_violation=False)
    return jnp.where(step < t.sum_violation_steps, sum_v, max_v)
  return max_v

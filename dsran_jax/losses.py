"""The VSE++ hinge (triplet) loss used to train DSRAN.

With L2-normalised embeddings, s = img @ txt.T is the cosine score of every image with
every caption of the batch, and pair i (image i, caption i) is the positive:

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


def contrastive_loss(img_emb: jax.Array, txt_emb: jax.Array, margin: float = 0.2,
                     max_violation: bool = True,
                     valid: Optional[jax.Array] = None) -> jax.Array:
  """Returns the scalar VSE++ loss of a batch of (B, E) image and caption embeddings.

  Args:
    img_emb: (B, E) image embeddings (L2-normalised).
    txt_emb: (B, E) caption embeddings; row i is the positive of image i.
    margin: hinge margin (0.2 in DSRAN).
    max_violation: hardest negative only (True) or the sum over all negatives.
    valid: optional (B,) bool; False rows are padding and count neither as anchors nor
      as negatives. None: every row is real.
  Returns:
    The float32 loss, summed (not averaged) over anchors, as the authors do.
  """
  if img_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
    raise ValueError(f"expected two (B, E) arrays of one shape, got {img_emb.shape} "
                     f"and {txt_emb.shape}")
  b = img_emb.shape[0]
  scores = jnp.matmul(img_emb, txt_emb.T, preferred_element_type=jnp.float32)
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

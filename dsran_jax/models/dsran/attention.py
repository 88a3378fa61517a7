"""Where DSRAN's first JSR graph-attention block looks, over the 7x7 grid cells and the
regions: the model side of the attention figure (pure Flax / jax; the drawing is
`dsran_jax.figures.attention`). `jsr_attention` is the family's `attention_maps` hook."""
from typing import Any, Dict, Optional

import jax
import numpy as np

from dsran_jax.models.dsran.model import DSRAN

TITLE = "first JSR graph-attention block: attention averaged over heads and nodes"


def jsr_attention(model: DSRAN, variables: Dict[str, Any],
                  images: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """Attention of the first JSR GAT (`jsr/gat_0`, first layer), per image.

  The weights are read from the `intermediates` the attention layer sows, in eval mode;
  params and outputs are unchanged. They are averaged over heads and over the real query
  nodes: the weight each node gets in the block's mean-pooled output.

  Args:
    model: a DSRAN module.
    variables: its variables ({"params", "batch_stats"}).
    images: image-side arrays of B images (`grid` or, online grid, `image`,
      `regions`, `region_pos`, `region_mask`), e.g. `split.images(indices)`.

  Returns:
    {"grid": (B, 49) or None, "regions": (B, R), "region_mask": (B, R), "title": what
    the weights are}; each image's weights over all its nodes sum to 1.
  """
  # The grid's cells come from `grid`, or (online grid) from the CNN on `image`.
  keys = ["regions", "region_pos", "region_mask"] + [
      k for k in ("grid", "image") if k in model.image_keys]
  batch = {k: np.asarray(images[k]) for k in keys if k in images}
  regions = batch["regions"]
  b, r = regions.shape[:2]
  mask = batch.get("region_mask")
  mask = np.ones((b, r), bool) if mask is None else mask.astype(bool)
  batch["region_mask"] = mask
  if "region_pos" not in batch:
    batch["region_pos"] = np.zeros((b, r, model.config.pos_dim), np.float32)

  def run(variables, batch):
    _, state = model.apply(variables, **batch, train=False, method=DSRAN.embed_images,
                           mutable=["intermediates"])
    probs = state["intermediates"]["jsr"]["gat_0"]["layer_0"]["mha"]["attention"][0]
    return probs.mean(axis=1)  # over heads: (B, N_query, N_key)

  probs = np.asarray(jax.jit(run)(variables, batch), np.float64)
  n_grid = probs.shape[-1] - r
  # Reference padding attends from (and to) every region; masked mode only real ones.
  if model.config.text_padding == "reference":
    query_mask = np.ones((b, probs.shape[1]), bool)
  else:
    query_mask = np.concatenate([np.ones((b, n_grid), bool), mask], axis=1)
  w = (probs * query_mask[:, :, None]).sum(1) / query_mask.sum(1, keepdims=True)
  grid: Optional[np.ndarray] = w[:, :n_grid] if n_grid else None
  return {"grid": grid, "regions": w[:, n_grid:], "region_mask": mask, "title": TITLE}

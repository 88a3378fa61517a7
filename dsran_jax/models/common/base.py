"""The contract every matching-model family's Flax module implements.

    reps_i = model.apply(v, batch, method="encode_images")   # pytree, leading dim B_i
    reps_t = model.apply(v, batch, method="encode_texts")    # pytree, leading dim B_t
    s      = model.apply(v, reps_i, reps_t, method="score")  # (B_i, B_t) float32
    s      = model.apply(v, batch, train=True, ...)          # (B, B) training scores

Reps are opaque to the framework: an embedding model returns one vector per item and
scores with a dot product; a cross-attention model returns token features and masks and
does its work in `score`. `score` must be a pure function of the two reps (the score of
pair (i, j) depends on image i and caption j alone), so evaluation can cut a gallery into
tiles, pad them and spread them over devices; a padded row holds zeros (masks False)
and its scores are discarded, so it only has to stay finite.
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

PyTree = Any


class MatchingModel(nn.Module):
  """Base class of the families' modules (see the module docstring).

  Subclasses set `spec`, their family's jax-free config module (`models/<family>/
  config.py`): its `image_keys(model_config)` / `text_keys(model_config)` hooks declare
  the batch keys once, for the config side (`models.image_keys(config)`) and for the
  Module, whose `image_keys` / `text_keys` call them with its own `config` (which holds
  the same options, so the hooks read attributes both have). Subclasses also define
  `input_dims` (`{"img_dim": ..., "pos_dim": ..., "global_dim": ...}` as needed, for
  example batches and input checks), and the three methods below.
  """
  spec = None  # the family's config module (a class attribute, not a Module field)

  @property
  def image_keys(self) -> Tuple[str, ...]:
    """The image-side batch keys this module reads (`spec.image_keys`)."""
    return tuple(self.spec.image_keys(self.config))

  @property
  def text_keys(self) -> Tuple[str, ...]:
    """The caption-side batch keys this module reads (`spec.text_keys`)."""
    return tuple(self.spec.text_keys(self.config))

  @property
  def input_dims(self) -> Dict[str, int]:
    raise NotImplementedError

  def encode_images(self, batch: Dict[str, Any], train: bool = False) -> PyTree:
    """Image-side reps of a batch dict, every leaf with leading dim B."""
    raise NotImplementedError

  def encode_texts(self, batch: Dict[str, Any], train: bool = False) -> PyTree:
    """Caption-side reps of a batch dict, every leaf with leading dim B."""
    raise NotImplementedError

  def score(self, image_reps: PyTree, text_reps: PyTree, train: bool = False) -> jnp.ndarray:
    """(n_img, n_txt) float32 scores of every image against every caption."""
    raise NotImplementedError

  def __call__(self, batch: Dict[str, Any], train: bool = False) -> jnp.ndarray:
    """(B, B) scores of a training batch; pair (i, i) is the positive."""
    return self.score(self.encode_images(batch, train), self.encode_texts(batch, train),
                      train)


class RegionWordModel(MatchingModel):
  """A family that reads detector regions and word ids (SCAN and the models built like
  it); its `config` has `img_dim`."""

  @property
  def input_dims(self) -> Dict[str, int]:
    return {"img_dim": self.config.img_dim}


def region_inputs(batch: Dict[str, Any], img_dim: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """`batch["regions"]` (B, R, img_dim), checked, and its bool (B, R) `region_mask`
  (every region real when the batch has none)."""
  regions = batch["regions"]
  if regions.ndim != 3 or regions.shape[-1] != img_dim:
    raise ValueError(f"regions: expected (B, R, {img_dim}), got {tuple(regions.shape)}")
  mask = batch.get("region_mask")
  mask = jnp.ones(regions.shape[:2], bool) if mask is None else mask.astype(bool)
  return regions, mask


def text_inputs(batch: Dict[str, Any]) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """`batch["input_ids"]` (B, L) and its bool (B, L) `attention_mask` (`ids != 0` when
  the batch has none)."""
  ids = batch["input_ids"]
  mask = batch.get("attention_mask")
  return ids, (ids != 0) if mask is None else mask.astype(bool)


def embedding_scores(image_reps: Dict[str, Any], text_reps: Dict[str, Any]) -> jnp.ndarray:
  """(n_img, n_txt) float32 dot products of an embedding model's `{"embedding": (B,
  E)}` reps."""
  return jnp.matmul(image_reps["embedding"], text_reps["embedding"].T,
                    preferred_element_type=jnp.float32)


def select(batch: Dict[str, Any], keys) -> Dict[str, Any]:
  """The entries of `batch` named in `keys` (absent ones skipped)."""
  return {k: batch[k] for k in keys if k in batch}

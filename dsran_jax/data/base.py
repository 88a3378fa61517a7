"""The in-memory view of one dataset split that every reader returns."""
import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class Split:
  """One split of a dataset: captions tokenised once, image features read on demand.

  Attributes:
    name: split name ("train", "dev", "test", "testall", ...).
    image_ids: one id per image (file stem, COCO id, ...), used for messages and search.
    texts: raw captions, `captions_per_image` consecutive lines per image.
    input_ids: int32 (num_captions, W), 0-padded; W is the longest caption after the
      cut (`models.caption_cap`), so no caption is cut where the authors keep it whole.
    attention_mask: int32 (num_captions, W), 1 for tokens.
    captions_per_image: 5 for the standard releases, 1 when #images == #captions.
    read_images: `indices -> dict` of image-side arrays (see docs/architecture.md), the
      only way features are read, so a reader can memory-map or open files lazily.
    caption_lengths: what tokenising did to the captions' lengths
      (`data.tokenize.CaptionLengths`: how many the cut shortened, the longest), or None.
    read_train_images: `(indices, keys) -> dict`, the training pipeline's reader when
      it differs (random views of raw images, `data.images`); None: `read_images`.
  """
  name: str
  image_ids: Sequence[str]
  texts: Sequence[str]
  input_ids: np.ndarray
  attention_mask: np.ndarray
  captions_per_image: int
  read_images: Callable[[np.ndarray], dict]
  caption_lengths: Optional[Any] = None
  read_train_images: Optional[Callable[[np.ndarray, np.ndarray], dict]] = None

  def __post_init__(self):
    n_cap = len(self.texts)
    if n_cap != len(self.image_ids) * self.captions_per_image:
      raise ValueError(
          f"split {self.name!r}: {n_cap} captions for {len(self.image_ids)} images at "
          f"{self.captions_per_image} captions per image")
    if self.input_ids.shape[0] != n_cap or self.attention_mask.shape != self.input_ids.shape:
      raise ValueError(
          f"split {self.name!r}: token arrays {self.input_ids.shape} / "
          f"{self.attention_mask.shape} do not match {n_cap} captions")

  @property
  def num_images(self) -> int:
    return len(self.image_ids)

  @property
  def num_captions(self) -> int:
    return len(self.texts)

  @property
  def token_counts(self) -> np.ndarray:
    """int64 (num_captions,): tokens of each caption (after the cut), computed once."""
    counts = self.__dict__.get("_token_counts")
    if counts is None:
      counts = np.asarray(self.attention_mask).sum(axis=1, dtype=np.int64)
      self.__dict__["_token_counts"] = counts
    return counts

  def caption_image(self, caption_index):
    """Index of the image a caption belongs to."""
    return np.asarray(caption_index) // self.captions_per_image

  def images(self, indices) -> dict:
    """Image-side arrays for `indices` (any int array), batch dimension first."""
    return self.read_images(np.asarray(indices, dtype=np.int64))

  def train_images(self, indices, keys) -> dict:
    """Image-side arrays for training: `read_train_images(indices, keys)` (`keys`: int64
    (B, k), the rng entropy of each row's random view), else `images(indices)`."""
    indices = np.asarray(indices, dtype=np.int64)
    if self.read_train_images is None:
      return self.read_images(indices)
    return self.read_train_images(indices, np.asarray(keys, dtype=np.int64))

  def captions(self, indices, width: Optional[int] = None) -> dict:
    """Text-side arrays for `indices`, `width` columns wide (default: the split's); a
    narrower width must hold every selected caption (a batch is never cut here)."""
    indices = np.asarray(indices, dtype=np.int64)
    out = {"input_ids": self.input_ids[indices], "attention_mask": self.attention_mask[indices]}
    if width is None or width == self.input_ids.shape[1]:
      return out
    longest = int(self.token_counts[indices].max(initial=0))
    if not longest <= width <= self.input_ids.shape[1]:
      raise ValueError(f"split {self.name!r}: captions of up to {longest} tokens cannot be "
                       f"given {width} columns (the split has {self.input_ids.shape[1]})")
    return {k: v[:, :width] for k, v in out.items()}

  def subset_images(self, num_images: int) -> "Split":
    """The first `num_images` images and their captions (`data.load_dev_split`: the
    1000-image dev of SCAN/SGRAF and of COCO)."""
    if num_images < 1:
      raise ValueError(f"subset_images({num_images}): expected at least 1 image")
    if num_images >= self.num_images:
      return self
    n_cap = num_images * self.captions_per_image
    return dataclasses.replace(
        self, image_ids=self.image_ids[:num_images], texts=self.texts[:n_cap],
        input_ids=self.input_ids[:n_cap], attention_mask=self.attention_mask[:n_cap])

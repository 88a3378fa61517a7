"""The in-memory view of one dataset split that every reader returns."""
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

@dataclasses.dataclass
class Split:
  """One split of a dataset: captions tokenised once, image features read on demand.

  Attributes:
    name: split name ("train", "dev", "test", "testall", ...).
    image_ids: one id per image (file stem, COCO id, ...), used for messages and search.
    texts: raw captions, `captions_per_image` consecutive lines per image.
    input_ids: int32 (num_captions, max_len), 0-padded.
    attention_mask: int32 (num_captions, max_len), 1 for tokens.
    captions_per_image: 5 for the standard releases, 1 when #images == #captions.
    read_images: `indices -> dict` of image-side arrays (see docs/architecture.md), the
      only way features are read, so a reader can memory-map or open files lazily.
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

  def captions(self, indices) -> dict:
    """Text-side arrays for `indices`."""
    indices = np.asarray(indices, dtype=np.int64)
    return {"input_ids": self.input_ids[indices], "attention_mask": self.attention_mask[indices]}

  def subset_images(self, num_images: int) -> "Split":
    """The first `num_images` images and their captions (COCO dev uses the first 1000)."""
    if num_images >= self.num_images:
      return self
    n_cap = num_images * self.captions_per_image
    return dataclasses.replace(
        self, image_ids=self.image_ids[:num_images], texts=self.texts[:n_cap],
        input_ids=self.input_ids[:n_cap], attention_mask=self.attention_mask[:n_cap])

"""The batch contract: every key a model may read, with its shape and dtype.

One table, so data readers, inference, search and the families' modules check and build
batches the same way. Image side: one row per image; text side: one row per caption.
"""
import numpy as np

IMAGE_KEYS = ("grid", "regions", "region_pos", "region_mask", "global_feat", "image")
TEXT_KEYS = ("input_ids", "attention_mask")
GRID_CELLS = 49

# Every batch key a model can read: its shape after the batch dim ("R" regions, "L"
# tokens, other names from the model's `input_dims`) and dtype. One table, so data,
# inference and search check and build batches the same way for every family.
KEY_SPECS = {
    "grid": ((GRID_CELLS, "img_dim"), np.float32),
    "regions": (("R", "img_dim"), np.float32),
    "region_pos": (("R", "pos_dim"), np.float32),
    "region_mask": (("R",), np.bool_),
    "global_feat": (("global_dim",), np.float32),
    # Raw RGB pixels of an image, cropped to the CNN's input (HWC, 0..255), for models
    # that run their CNN in the step (DSRAN's online grid); the model normalises them.
    "image": (("image_size", "image_size", 3), np.uint8),
    "input_ids": (("L",), np.int32),
    "attention_mask": (("L",), np.int32),
}


def key_shape(key: str, dims: dict, num_regions=None, max_len=None) -> tuple:
  """Trailing shape of batch key `key` (None where R or L is not given)."""
  if key not in KEY_SPECS:
    raise KeyError(f"unknown batch key {key!r}; known: {', '.join(KEY_SPECS)}")
  sizes = {"R": num_regions, "L": max_len, **dims}
  return tuple(d if isinstance(d, int) else sizes.get(d) for d in KEY_SPECS[key][0])


def example_arrays(keys, dims: dict, batch_size: int = 2, num_regions: int = 4,
                   max_len: int = 8) -> dict:
  """Zero (ones for ids and masks) arrays of every key in `keys`, for init."""
  out = {}
  for key in keys:
    shape = (batch_size,) + key_shape(key, dims, num_regions, max_len)
    dtype = KEY_SPECS[key][1]
    fill = 1 if key in ("input_ids", "attention_mask", "region_mask") else 0
    out[key] = np.full(shape, fill, dtype)
  return out

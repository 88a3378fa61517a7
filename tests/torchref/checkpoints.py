"""Checkpoint files written by real `torch.save`, for `dsran_jax.convert.torch_pickle`.

Every function writes a file and returns, as numpy, what torch itself says is in it, so
the jax-side test compares the torch-free reader with torch.
"""
import argparse
import collections
import pickle
import struct

import numpy as np
import torch
from torch import nn

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c


class Sneaky:
  """A class a safe loader must not construct (pickled as torchref.checkpoints.Sneaky)."""

  def __init__(self):
    self.x = 1


def to_torch(obj):
  """numpy arrays -> tensors (same dtype), recursively through dicts, lists and tuples."""
  if isinstance(obj, np.ndarray):
    return torch.from_numpy(obj.copy())
  if isinstance(obj, dict):
    return {k: to_torch(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_torch(v) for v in obj)
  return obj


def to_numpy(obj):
  """Tensors -> numpy (bfloat16 -> float32), recursively; OrderedDict -> dict."""
  if isinstance(obj, torch.Tensor):
    t = obj.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
  if isinstance(obj, dict):
    return {k: to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_numpy(v) for v in obj)
  return obj


def _torch_load(path: str):
  """torch.load, allowing just the non-tensor globals these files hold."""
  scalar = np.float64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
  allowed = [argparse.Namespace, scalar, np.dtype, type(np.dtype(np.float64))]
  with torch.serialization.safe_globals(allowed):
    return torch.load(path, map_location="cpu", weights_only=True)


def save(path: str, content, zip_format: bool = True, sneaky_key: str = "") -> None:
  """torch.save(content with arrays as tensors); `sneaky_key` adds a `Sneaky()` entry."""
  obj = to_torch(content)
  if sneaky_key:
    obj[sneaky_key] = Sneaky()
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)


def _authors_content():
  """The shape of SCAN / SGRAF / DSRAN checkpoints plus every tensor layout we read."""
  g = torch.Generator().manual_seed(0)
  img_enc = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
  img_enc.train()
  img_enc(torch.randn(5, 6, generator=g))  # running stats and num_batches_tracked move
  txt_enc = nn.ModuleDict({"embed": nn.Embedding(7, 3), "rnn": nn.GRU(3, 4, batch_first=True)})
  opt = argparse.Namespace(data_name="f30k_precomp", margin=0.2, num_epochs=30, batch_size=128,
                           learning_rate=2e-4, lr_update=15, max_violation=True, img_dim=2048,
                           vocab_path="./vocab/", grad_clip=2.0, raw_feature_norm="clipped_l2norm")
  base = torch.randn(5, 4, generator=g, dtype=torch.float64)
  tensors = {
      "float32": torch.randn(3, 2, generator=g),
      "float64": torch.randn(4, generator=g, dtype=torch.float64),
      "float16": torch.randn(2, 3, generator=g).half(),
      "bfloat16": torch.randn(5, generator=g).bfloat16(),
      "int64": torch.tensor([-(2 ** 62), -1, 0, 7, 2 ** 62 + 5]),
      "int32": torch.tensor([[-7, 2 ** 31 - 1]], dtype=torch.int32),
      "int16": torch.tensor([-300, 300], dtype=torch.int16),
      "int8": torch.tensor([-128, 127], dtype=torch.int8),
      "uint8": torch.tensor([0, 255], dtype=torch.uint8),
      "bool": torch.tensor([[True, False, True]]),
      "complex64": torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
      "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 3),
      "transposed": torch.randn(3, 4, generator=g).t(),
      "sliced": torch.randn(6, 5, generator=g)[1:5:2, 1::2],
      "expanded": torch.randn(3, generator=g).expand(4, 3),  # stride 0
      "parameter": nn.Parameter(torch.randn(2, 2, generator=g)),
      # One storage, four tensors: the whole, a row (storage offset), a transposed slice.
      "shared_base": base,
      "shared_row": base[2],
      "shared_view": base[1:4].t(),
      "shared_again": [base[4], base[0:2]],
  }
  content = {"model": [img_enc.state_dict(), txt_enc.state_dict()], "opt": opt, "epoch": 3,
             "best_rsum": 401.2, "Eiters": 1234, "tensors": tensors,
             "rsum_numpy": np.float64(388.75), "tags": ("a", 1, None), "ids": {3, 1, 2}}
  return content


def save_authors_layout(path: str, zip_format: bool) -> dict:
  """Writes `_authors_content()`; returns {"content": torch.load's reading of it as numpy,
  without "opt", "opt": vars(opt), "shared": [(name, name), ...] pairs of tensors that
  share a storage in the file, "bfloat16_bits": the stored bfloat16 bits as int16}."""
  content = _authors_content()
  torch.save(content, path, _use_new_zipfile_serialization=zip_format)
  loaded = _torch_load(path)  # the reference reading of the same file
  flat = {f"tensors/{k}": v for k, v in loaded["tensors"].items() if k != "shared_again"}
  flat["tensors/shared_again/0"], flat["tensors/shared_again/1"] = loaded["tensors"]["shared_again"]
  ptr = lambda t: t.untyped_storage().data_ptr()
  names = sorted(flat)
  shared = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if ptr(flat[a]) == ptr(flat[b])]
  return {"content": to_numpy({k: v for k, v in loaded.items() if k != "opt"}),
          "opt": vars(loaded["opt"]), "shared": shared,
          "bfloat16_bits": loaded["tensors"]["bfloat16"].view(torch.int16).numpy()}


class _StorageMarker:
  """A storage (or a view of one) as torch < 1.0's legacy writer named it."""

  def __init__(self, root_key, numel, view=None):
    self.root_key, self.numel, self.view = root_key, numel, view


class _TensorMarker:

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride)

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2,
            (*self.args, False, collections.OrderedDict()))


class _LegacyViewPickler(pickle.Pickler):

  def persistent_id(self, obj):
    if isinstance(obj, _StorageMarker):
      return ("storage", torch.FloatStorage, obj.root_key, "cuda:0", obj.numel, obj.view)
    return None


def save_legacy_storage_views(path: str) -> dict:
  """A legacy file as torch 0.4 wrote storage views (`view_metadata`, which today's
  torch.save no longer emits): float32 root '1' of 10 elements, views '2' = [2, 8) and
  '3' = [5, 10), tensors on both; location 'cuda:0' as on the authors' GPUs. Returns
  torch.load's reading of it as numpy."""
  data = np.arange(10, dtype=np.float32) * 1.5
  root = _StorageMarker("1", 10)
  view_a = _StorageMarker("1", 10, ("2", 2, 6))
  view_b = _StorageMarker("1", 10, ("3", 5, 5))
  obj = {"root": _TensorMarker(root, 0, (10,), (1,)),
         "a": _TensorMarker(view_a, 1, (2, 2), (1, 3)),  # elements 3, 6 / 4, 7 of root
         "b": _TensorMarker(view_b, 0, (5,), (1,)),
         "a_again": _TensorMarker(view_a, 0, (6,), (1,))}
  with open(path, "wb") as f:
    for header in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True,
                                        "type_sizes": {"short": 2, "int": 4, "long": 8}}):
      pickle.dump(header, f, protocol=2)
    _LegacyViewPickler(f, protocol=2).dump(obj)
    pickle.dump(["1"], f, protocol=2)
    f.write(struct.pack("<q", data.size))
    f.write(data.tobytes())
  return to_numpy(_torch_load(path))

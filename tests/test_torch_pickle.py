"""The torch-free checkpoint reader against files written by real `torch.save`.

The files come from the reference process (tests/torchref/checkpoints.py), which also
reads them back with torch.load: arrays must be equal exactly, dtype and shape included.
Malicious and damaged files are written here with plain pickle / zipfile.
"""
import argparse
import io
import os
import pickle
import re
import struct
import tarfile
import zipfile

import numpy as np
import pytest

from dsran_jax.convert import torch_pickle

TORCH_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER
FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def assert_same(ours, ref, where="ckpt"):
  """Same structure, types, dtypes, shapes and values (exactly)."""
  if isinstance(ref, np.ndarray):
    assert isinstance(ours, np.ndarray), (where, type(ours))
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (where, ours.dtype, ours.shape,
                                                               ref.dtype, ref.shape)
    np.testing.assert_array_equal(ours, ref, err_msg=where)
  elif isinstance(ref, dict):
    assert type(ours) is dict, (where, type(ours))  # OrderedDict / state dicts: plain dicts
    assert list(ours) == list(ref), (where, list(ours), list(ref))
    for k in ref:
      assert_same(ours[k], ref[k], f"{where}/{k}")
  elif isinstance(ref, (list, tuple)):
    assert type(ours) is type(ref) and len(ours) == len(ref), (where, ours)
    for i, (a, b) in enumerate(zip(ours, ref)):
      assert_same(a, b, f"{where}/{i}")
  else:
    assert type(ours) is type(ref) and ours == ref, (where, ours, ref)


def _flat_tensors(tensors):
  flat = {f"tensors/{k}": v for k, v in tensors.items() if k != "shared_again"}
  flat["tensors/shared_again/0"], flat["tensors/shared_again/1"] = tensors["shared_again"]
  return flat


@FORMATS
def test_real_torch_save_authors_layout(tmp_path, torch_ref, zip_format):
  path = tmp_path / "model_best.pth.tar"
  ref = torch_ref("checkpoints.save_authors_layout", path=str(path), zip_format=zip_format)
  ckpt = torch_pickle.load(path)
  want = ref["content"]

  assert isinstance(ckpt["opt"], argparse.Namespace) and vars(ckpt["opt"]) == ref["opt"]
  assert ckpt["epoch"] == 3 and ckpt["Eiters"] == 1234 and ckpt["best_rsum"] == 401.2
  assert type(ckpt["rsum_numpy"]) is np.float64 and ckpt["rsum_numpy"] == 388.75
  assert ckpt["tags"] == ("a", 1, None) and ckpt["ids"] == {1, 2, 3}
  assert_same({k: v for k, v in ckpt.items() if k != "opt"}, want)

  img_sd, txt_sd = ckpt["model"]
  assert img_sd["1.num_batches_tracked"].dtype == np.int64
  assert img_sd["1.num_batches_tracked"].shape == () and img_sd["1.num_batches_tracked"] == 1
  assert txt_sd["rnn.weight_hh_l0"].shape == (12, 4)
  t = ckpt["tensors"]
  assert t["parameter"].dtype == np.float32 and t["bfloat16"].dtype == np.float32
  # bfloat16 -> float32 is exact: the float32's top 16 bits are the stored bits.
  np.testing.assert_array_equal((t["bfloat16"].view(np.uint32) >> 16).astype(np.uint16),
                                ref["bfloat16_bits"].view(np.uint16))
  assert t["expanded"].strides[0] == 0 and t["transposed"].strides == (4, 16)  # (3, 4).t()

  # Tensors sharing a storage in the file share memory here, and only those.
  flat = _flat_tensors(t)
  group = {name for pair in ref["shared"] for name in pair}
  assert group == {"tensors/shared_base", "tensors/shared_row", "tensors/shared_view",
                   "tensors/shared_again/0", "tensors/shared_again/1"}
  base = flat["tensors/shared_base"]
  for name, array in flat.items():
    assert np.shares_memory(array, base) == (name in group), name
  base[4, 0] = base[2, 1] = base[1, 3] = -7.0  # writes show through the views, as in torch
  assert t["shared_again"][0][0] == t["shared_row"][1] == t["shared_view"][3, 0] == -7.0


def test_legacy_storage_views_like_torch_0_4(tmp_path, torch_ref):
  path = tmp_path / "old.pth.tar"
  want = torch_ref("checkpoints.save_legacy_storage_views", path=str(path))
  got = torch_pickle.load(path)
  assert_same(got, want)
  assert np.shares_memory(got["a"], got["root"]) and np.shares_memory(got["b"], got["a_again"])


@FORMATS
def test_class_saved_by_torch_is_refused(tmp_path, torch_ref, zip_format):
  path = tmp_path / "evil.pth.tar"
  torch_ref("checkpoints.save", path=str(path), zip_format=zip_format, sneaky_key="extra",
            content={"epoch": 1, "model": [{"w": np.ones(3, np.float32)}]})
  with pytest.raises(torch_pickle.UnsafeCheckpointError,
                     match=re.escape(f"{path}: refusing to load the global "
                                     "torchref.checkpoints.Sneaky")):
    torch_pickle.load(path)


# --------------------------------------------------------------- hand-written files


def _global(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
  return b"J" + struct.pack("<i", i)


def _ints(values):
  return b"(" + b"".join(_int(v) for v in values) + b"t"


def tensor_pickle(numel, offset, size, stride, legacy=False, storage="FloatStorage"):
  """Protocol-2 opcodes of {"t": one tensor} the way torch.save writes them."""
  pid = (b"(" + _str("storage") + _global("torch", storage) + _str("0") + _str("cpu")
         + _int(numel) + (b"N" if legacy else b"") + b"t")
  tensor = (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + _int(offset)
            + _ints(size) + _ints(stride) + b"\x89" + _global("collections", "OrderedDict")
            + b")R" + b"tR")
  return b"\x80\x02}" + _str("t") + tensor + b"s."


def write_zip(path, data_pkl, records=None, prefix="archive", byteorder="little"):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{prefix}/data.pkl", data_pkl)
    if byteorder:
      z.writestr(f"{prefix}/byteorder", byteorder)
    for key, data in (records or {}).items():
      z.writestr(f"{prefix}/data/{key}", data)
    z.writestr(f"{prefix}/version", "3\n")


def write_legacy(path, obj_pkl, storages=None):
  """storages: {key: (numel, raw bytes)}."""
  with open(path, "wb") as f:
    for header in (TORCH_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                       "type_sizes": {"short": 2, "int": 4, "long": 8}}):
      pickle.dump(header, f, protocol=2)
    f.write(obj_pkl)
    pickle.dump(sorted(storages or {}), f, protocol=2)
    for key in sorted(storages or {}):
      numel, data = storages[key]
      f.write(struct.pack("<q", numel) + data)


def test_hand_written_files_prefix_byteorder_and_bounds(tmp_path):
  data = np.arange(6, dtype=np.float32)
  ok = tensor_pickle(6, 1, (2, 2), (1, 3))  # [[1, 4], [2, 5]]
  want = np.array([[1, 4], [2, 5]], np.float32)
  path = tmp_path / "ok.pt"
  write_zip(path, ok, {"0": data.tobytes()}, prefix="model_best.pth")  # any prefix
  np.testing.assert_array_equal(torch_pickle.load(path)["t"], want)
  write_zip(path, ok, {"0": data.astype(">f4").tobytes()}, byteorder="big")
  got = torch_pickle.load(path)["t"]
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32 and got.dtype.isnative
  write_legacy(path, tensor_pickle(6, 1, (2, 2), (1, 3), legacy=True),
               {"0": (6, data.tobytes())})
  np.testing.assert_array_equal(torch_pickle.load(path)["t"], want)

  # A tensor reaching past its storage is an error, never an out-of-bounds read.
  write_zip(path, tensor_pickle(6, 1, (2, 2), (1, 4)), {"0": data.tobytes()})
  with pytest.raises(torch_pickle.CheckpointError, match=f"{re.escape(str(path))}: tensor of "
                     r"size \(2, 2\), stride \(1, 4\) at offset 1 reaches element 6"):
    torch_pickle.load(path)
  write_legacy(path, tensor_pickle(6, 5, (2,), (1,), legacy=True), {"0": (6, data.tobytes())})
  with pytest.raises(torch_pickle.CheckpointError, match="reaches element 6"):
    torch_pickle.load(path)
  # Records whose size disagrees with the pickle.
  write_zip(path, ok, {"0": data[:5].tobytes()})
  with pytest.raises(torch_pickle.CheckpointError,
                     match=r"archive/data/0 has 20 bytes; 6 x torch.FloatStorage need 24"):
    torch_pickle.load(path)
  write_zip(path, ok, {})
  with pytest.raises(torch_pickle.CheckpointError, match="record archive/data/0 is missing"):
    torch_pickle.load(path)
  write_legacy(path, tensor_pickle(6, 1, (2, 2), (1, 3), legacy=True), {"0": (5, data.tobytes())})
  with pytest.raises(torch_pickle.CheckpointError, match="5 elements in the file, 6 in the pickle"):
    torch_pickle.load(path)
  write_zip(path, tensor_pickle(6, 0, (2,), (1,), storage="QInt8Storage"), {"0": b"\0" * 6})
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="torch.QInt8Storage"):
    torch_pickle.load(path)


class _Evil:
  """Unpickling calls `fn(arg)`."""

  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return (self.fn, (self.arg,))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("fn", ["system", "eval"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, layout, protocol, fn):
  marker = tmp_path / "pwned"
  if fn == "system":
    evil, name = _Evil(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
  else:
    evil, name = _Evil(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"
  obj = {"epoch": 3, "opt": argparse.Namespace(lr=0.1), "model": [{}], "x": evil}
  path = tmp_path / "model_best.pth.tar"
  if layout == "zip":
    write_zip(path, pickle.dumps(obj, protocol=protocol))
  else:
    write_legacy(path, pickle.dumps(obj, protocol=protocol))
  with pytest.raises(torch_pickle.UnsafeCheckpointError,
                     match=re.escape(f"{path}: refusing to load the global {name}")):
    torch_pickle.load(path)
  assert not marker.exists()


@FORMATS
def test_truncated_files_name_the_path(tmp_path, torch_ref, zip_format):
  full = tmp_path / "full.pth.tar"
  torch_ref("checkpoints.save_authors_layout", path=str(full), zip_format=zip_format)
  raw = full.read_bytes()
  cuts = {"half": len(raw) // 2, "end": len(raw) - 10}
  if not zip_format:
    cuts["pickle"] = 120  # inside the object pickle
  for what, n in cuts.items():
    path = tmp_path / f"cut_{what}.pth.tar"
    path.write_bytes(raw[:n])
    with pytest.raises(torch_pickle.CheckpointError) as e:
      torch_pickle.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert "truncated" in msg, (what, msg)


def test_garbage_and_unsupported_files_name_the_path(tmp_path):
  cases = {}
  cases["empty"] = (b"", "empty file")
  cases["text"] = (b"hello, not a checkpoint\n", "not a PyTorch checkpoint")
  cases["random"] = (np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint")
  cases["pickle"] = (pickle.dumps({"model": [1, 2]}, protocol=2),
                     "not torch.save's magic number|no torch magic number")
  cases["protocol"] = (pickle.dumps(TORCH_MAGIC, protocol=2) + pickle.dumps(1000, protocol=2),
                       "legacy torch.save protocol 1000 is not supported")
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("stuff/notes.txt", "x")
  cases["zip"] = (buf.getvalue(), "without exactly one <archive>/data.pkl")
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:  # torch < 0.4's format
    for name in ("sys_info", "pickle", "storages", "tensors"):
      info = tarfile.TarInfo(name)
      info.size = 1
      tar.addfile(info, io.BytesIO(b"\x80"))
  cases["tar"] = (buf.getvalue(), "a tar archive, the torch.save format of torch before 0.4")
  for what, (content, message) in cases.items():
    path = tmp_path / f"{what}.pth"
    path.write_bytes(content)
    with pytest.raises(torch_pickle.CheckpointError, match=message) as e:
      torch_pickle.load(path)
    assert str(e.value).startswith(f"{path}: "), (what, str(e.value))
  for missing in (tmp_path / "nope.pth.tar", tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
      torch_pickle.load(missing)

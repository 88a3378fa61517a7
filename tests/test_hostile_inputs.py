"""Hostile and hand-made inputs end quickly, in one line naming the file, key or value
(issue 26): bounded pickle reading, image modes and sizes, hand-edited workdir files,
shortlist and search misuse, float16 sums, over-long queries."""
import os
import struct
import subprocess
import sys
import time
import zipfile

import pytest
from test_torch_pickle import TORCH_MAGIC, _str, tensor_pickle, write_zip

from dsran_jax.convert import torch_pickle

BIG = (1 << 31) - 1  # the largest int the hand-written pickles hold (BININT)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module, *args, timeout=120):
  """`python -m module args` with this checkout first on the path; (rc, stdout, stderr,
  seconds)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, env=env, timeout=timeout, check=False)
  return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start


def error_lines(stderr):
  """The `error:` lines of a CLI's stderr (absl may log other lines before them)."""
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ bounded pickles


def nested_shared_list(levels, memo=1_000_000):
  """Pickle opcodes (protocol 2) pushing x, where x = [] and then `levels` times
  x = [x, x]: `levels` lists in the file, 2**(levels+1) - 1 nodes to a tree walk. Memo
  slots from `memo` on, clear of the ones torch.save's pickler uses."""
  out = b"]r" + struct.pack("<I", memo)
  for i in range(1, levels + 1):
    get = b"j" + struct.pack("<I", memo + i - 1)
    out += b"0(" + get + get + b"lr" + struct.pack("<I", memo + i)
  return out


def with_entry(src, dst, key, value_ops):
  """Copies the torch.save zip `src` to `dst` with `key` of its top-level dict set to the
  object `value_ops` push (a SETITEM appended to the dict's last SETITEMS batch: a later
  key wins in a dict, so the entry replaces the saved one)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith("/data.pkl"):
        assert data.endswith(b"u."), data[-20:]
        data = data[:-2] + _str(key) + value_ops + b"u."
      zout.writestr(info, data)


@pytest.fixture(scope="module")
def scan_checkpoint(tmp_path_factory, torch_ref):
  """A tiny valid SCAN checkpoint in the authors' layout (torch.save, zip format)."""
  path = str(tmp_path_factory.mktemp("scan") / "model_best.pth.tar")
  opt = {"embed_size": 16, "word_dim": 8, "img_dim": 12, "cross_attn": "t2i",
         "agg_func": "Mean", "bi_gru": False, "lambda_softmax": 9.0, "lambda_lse": 6.0,
         "data_name": "f30k_precomp"}
  torch_ref("scan.save_checkpoint", path=path, opt=opt, vocab_size=20, seed=0)
  return path


def test_shared_reference_epoch_is_refused_within_seconds_leaving_no_workdir(
    scan_checkpoint, tmp_path):
  """Issue 26 #3: `epoch` = 40 nested levels of x = [x, x] in an 11 KB file ran > 150 s
  and 2 GB (convert_torch's metadata walked 2**41 nodes) and left config.json behind."""
  bomb = str(tmp_path / "bomb.pth.tar")
  with_entry(scan_checkpoint, bomb, "epoch", nested_shared_list(40))
  assert os.path.getsize(bomb) < 16_000
  workdir = str(tmp_path / "workdir")
  rc, out, err, seconds = run_cli("dsran_jax.tools.convert_torch", f"--checkpoint={bomb}",
                                  f"--workdir={workdir}", timeout=120)
  lines = error_lines(err)
  assert rc == 2 and not out, (rc, out, err)
  assert len(lines) == 1 and "Traceback" not in err, err
  assert bomb in lines[0] and "shared references" in lines[0] and "['epoch']" in lines[0]
  assert seconds < 10, seconds  # the process, jax import included (under load)
  assert not os.path.exists(workdir)


def test_non_number_epoch_is_refused_before_the_workdir_is_made(scan_checkpoint, tmp_path):
  """Within the bounds (a 2**13-node list) but not a number: refused naming the key,
  nothing written."""
  odd = str(tmp_path / "odd.pth.tar")
  with_entry(scan_checkpoint, odd, "Eiters", nested_shared_list(12))
  from dsran_jax.convert.engine import ConversionError  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "workdir")
  with pytest.raises(ConversionError, match=r"odd.pth.tar: 'Eiters' is a list, expected"):
    convert_torch.convert_checkpoint(odd, workdir)
  assert not os.path.exists(workdir)


def _bounded_load(tmp_path, obj_ops, name="bounded.pt", **limits):
  path = tmp_path / name
  write_zip(path, b"\x80\x02" + obj_ops + b".")
  start = time.perf_counter()
  try:
    return torch_pickle.load(path, torch_pickle.Limits(**limits))
  finally:
    assert time.perf_counter() - start < 5


def test_depth_alone_is_bounded(tmp_path):
  """100,000 nested lists, no sharing: today a RecursionError called 'corrupt'."""
  ops = b"]" * 100_000 + b"a" * 99_999
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"bounded.pt: containers nest deeper than 100 levels .* at "
                           r"\[0\]\[0\]\[0\]\.\.\.; refusing it"):
    _bounded_load(tmp_path, ops)
  # 99 levels are fine: the bound is on depth, not on lists.
  assert _bounded_load(tmp_path, b"]" * 99 + b"a" * 98, "ok.pt") is not None


def test_object_count_is_bounded(tmp_path):
  """A flat list of 1,100,000 ints (2.2 MB of pickle): more objects than any checkpoint."""
  ops = b"](" + b"K\x07" * 1_100_000 + b"e"
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"holds more than 1000000 objects \(the limit, max_objects"):
    _bounded_load(tmp_path, ops)
  assert len(_bounded_load(tmp_path, b"](" + b"K\x07" * 900_000 + b"e", "ok.pt")) == 900_000


def test_shared_references_are_bounded_and_cycles_refused(tmp_path):
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"shared references expand a list to more than 1000 objects"):
    _bounded_load(tmp_path, nested_shared_list(10), max_objects=1000)
  small = _bounded_load(tmp_path, nested_shared_list(8), "ok.pt", max_objects=1000)
  assert small[0] is small[1]  # shared stays shared
  # x = [x]: a tree walk never ends
  with pytest.raises(torch_pickle.CheckpointError, match=r"a list that contains itself"):
    _bounded_load(tmp_path, b"]q\x00h\x00a", "cycle.pt")


def test_huge_declared_storage_is_refused_before_allocating(tmp_path):
  """A storage of 2**31 - 1 doubles (16 GiB) declared by a few bytes of pickle."""
  path = tmp_path / "huge.pt"
  write_zip(path, tensor_pickle(BIG, 0, [4], [1], storage="DoubleStorage"),
            {"0": b"\0" * 32})
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"huge.pt: storage '0' declares 2147483647 x torch.DoubleStorage "
                           r"\(16.0 GiB\).*more than the limit of 8.0 GiB \(max_bytes\)"):
    torch_pickle.load(path)
  # A zip record whose header claims more bytes than the archive stores (a stored record
  # cannot): declared 1 GiB of floats, 16 bytes present.
  lying = tmp_path / "lying.pt"
  numel = 1 << 28
  write_zip(lying, tensor_pickle(numel, 0, [4], [1]), {"0": b"\0" * 16})
  data = bytearray(lying.read_bytes())
  for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local, central
    at = data.find(signature)
    while at >= 0:
      name_len = struct.unpack_from("<H", data, at + (26 if size_at == 22 else 28))[0]
      name = bytes(data[at + (30 if size_at == 22 else 46):][:name_len])
      if name.endswith(b"/data/0"):
        struct.pack_into("<I", data, at + size_at, numel * 4)
      at = data.find(signature, at + 4)
  lying.write_bytes(bytes(data))
  with pytest.raises(torch_pickle.CheckpointError,
                     match=r"lying.pt: storage record archive/data/0 declares 1073741824 "
                           r"bytes but holds 16 in the archive"):
    torch_pickle.load(lying)


def test_stride_zero_tensor_and_pickle_size_are_bounded(tmp_path):
  # 2**31 - 1 elements viewing one double (stride 0): a view costs nothing, a copy 16 GiB.
  path = tmp_path / "expanded.pt"
  write_zip(path, tensor_pickle(1, 0, [BIG], [0], storage="DoubleStorage"), {"0": b"\0" * 8})
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"expanded.pt: a tensor of shape \(2147483647,\) \(16.0 GiB\) "
                           r"exceeds the limit .* at \['t'\]"):
    torch_pickle.load(path)
  with pytest.raises(torch_pickle.CheckpointTooLargeError,
                     match=r"big.pt: archive/data.pkl is 1.0 MiB, more than the limit of "
                           r"512.0 KiB \(max_pickle_bytes\)"):
    _bounded_load(tmp_path, _str("x" * (1 << 20)), "big.pt", max_pickle_bytes=512 << 10)


def test_legacy_format_shares_the_bounds(tmp_path):
  """The legacy (torch < 1.6) reader counts declared storages against max_bytes too."""
  import pickle  # pylint: disable=g-import-not-at-top
  path = tmp_path / "legacy.pt"
  with open(path, "wb") as f:
    for header in (TORCH_MAGIC, 1001, {"protocol_version": 1001}):
      pickle.dump(header, f, protocol=2)
    f.write(tensor_pickle(BIG, 0, [4], [1], legacy=True, storage="DoubleStorage"))
    pickle.dump(["0"], f, protocol=2)
  with pytest.raises(torch_pickle.CheckpointTooLargeError, match=r"legacy.pt: storage '0' "
                     r"declares 2147483647 x torch.DoubleStorage"):
    torch_pickle.load(path)

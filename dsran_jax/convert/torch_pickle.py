"""Reads PyTorch checkpoint files (`torch.save`) with numpy only, allowing nothing but data.

    from dsran_jax.convert import torch_pickle
    ckpt = torch_pickle.load("model_best.pth.tar")  # {"model": {...: np.ndarray}, ...}

Why not `torch.load`: importing torch next to jax and TensorFlow can crash the process
(the registry's CUDA build segfaults in triton's import), and a pickle may name any
callable, which `torch.load(weights_only=False)` would call. This reader never imports
torch and builds only what the checkpoints of SCAN, SGRAF, DSRAN and MLASM hold.

Formats (facts from torch/serialization.py):
- zip (torch >= 1.6, the default since): `<archive>/data.pkl` is the object pickle, its
  persistent ids `("storage", <X>Storage, key, location, numel)` name the raw storage
  records `<archive>/data/<key>`; `<archive>/byteorder` ("little" / "big", absent in
  old files, which are little-endian) gives their byte order. Any archive prefix.
- legacy (torch 0.4 - 1.5, and `_use_new_zipfile_serialization=False`): five pickles in
  a row (the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a sys-info
  dict, the object pickle with persistent ids `("storage", <X>Storage, root_key,
  location, numel, view_metadata)`, the sorted list of storage keys), then each storage
  as an int64 element count and its raw bytes, both little-endian.
The tar format of the earliest torch releases (before 0.4) is refused with a clear error.

What comes back: the pickled object with
- every tensor (and nn.Parameter) as a numpy array viewing its storage with the saved
  offset, size and stride (so non-contiguous tensors and tensors sharing a storage are
  views of one buffer, as in torch), dtypes float64/32/16, int64/32/16/8, uint8, bool,
  complex128/64; bfloat16 tensors are converted (exactly) to new float32 arrays; a bare
  storage becomes its 1-D array. Parameter attributes other than the data are dropped;
- `collections.OrderedDict` (every `state_dict()`) as a plain `dict` (its `_metadata`
  module versions are dropped);
- `argparse.Namespace` (the authors' `opt`) as an `argparse.Namespace`;
- numpy scalars (should a training script have stored one) as numpy scalars; other values (dicts,
  lists, tuples, sets, numbers, strings, bytes, None) as they are. Python 2 byte strings
  are decoded as UTF-8; bytes that are not valid UTF-8 are kept via "surrogateescape".

Any other global in the pickle is refused before it is built: `UnsafeCheckpointError`
names it (`module.name`). All errors name the file.

Bounds (any input ends in seconds, `CheckpointTooLargeError` says which bound and where):
the object pickle is at most `max_pickle_bytes` (64 MiB; a state dict of 100,000 tensors
takes about 20 MB); the storages it declares, and the tensors it builds from them, at most
`max_bytes` (8 GiB) together, checked before anything is allocated; a stored zip record
must hold the bytes it declares; containers nest at most `max_depth` (100) levels; and
the object, read as a tree (a shared list counted once per reference, as `json.dumps` or
a pytree walk would visit it), has at most `max_objects` (1,000,000) nodes. The last
bound is the one shared references need: `x = [x, x]` nested 40 times is 40 lists in
an 11 KB file but 2**41 nodes to anything that walks it. A reference cycle is refused.
"""
import argparse
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, NamedTuple, Optional, Union

import numpy as np

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# Defaults of `load`'s bounds (see the module docstring).
MAX_PICKLE_BYTES = 64 << 20
MAX_BYTES = 8 << 30
MAX_DEPTH = 100
MAX_OBJECTS = 1_000_000

__all__ = ["load", "CheckpointError", "UnsafeCheckpointError", "CheckpointTooLargeError",
           "Limits"]


class CheckpointError(ValueError):
  """The file is not a readable PyTorch checkpoint (truncated, corrupt, unsupported)."""


class UnsafeCheckpointError(CheckpointError):
  """The pickle names a global outside the allowed data types; nothing was built."""


class CheckpointTooLargeError(CheckpointError):
  """The file exceeds a bound of `load` (size, depth, objects, shared references)."""


class Limits(NamedTuple):
  """`load`'s bounds; the defaults are far above what any training checkpoint holds."""
  max_pickle_bytes: int = MAX_PICKLE_BYTES
  max_bytes: int = MAX_BYTES
  max_depth: int = MAX_DEPTH
  max_objects: int = MAX_OBJECTS


def _size_str(nbytes: int) -> str:
  for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
    if nbytes >= 1 << shift:
      return f"{nbytes / (1 << shift):.1f} {unit}"
  return f"{nbytes} bytes"


# ------------------------------------------------------------------ pickled objects


class _Frozen:
  """Base of the reader's placeholders: a pickle may not BUILD (set state on) them."""
  __slots__ = ()

  def __setstate__(self, state):
    raise CheckpointError(f"the pickle sets state on a {type(self).__name__}")


class _StorageType(_Frozen):
  """A `torch.<X>Storage` class named in a pickle: only its element type is used."""
  __slots__ = ("name", "dtype", "bfloat16")

  def __init__(self, name: str, dtype: str, bfloat16: bool = False):
    self.name = name
    self.dtype = np.dtype(dtype)  # little-endian; bfloat16 read as its uint16 bits
    self.bfloat16 = bfloat16

  def __repr__(self):
    return f"torch.{self.name}"


_STORAGE_TYPES = {name: _StorageType(name, dtype, name == "BFloat16Storage") for name, dtype in (
    ("DoubleStorage", "<f8"), ("FloatStorage", "<f4"), ("HalfStorage", "<f2"),
    ("BFloat16Storage", "<u2"), ("LongStorage", "<i8"), ("IntStorage", "<i4"),
    ("ShortStorage", "<i2"), ("CharStorage", "i1"), ("ByteStorage", "u1"),
    ("BoolStorage", "?"), ("ComplexFloatStorage", "<c8"), ("ComplexDoubleStorage", "<c16"),
    ("UntypedStorage", "u1"))}


class _Storage(_Frozen):
  """One storage: a root (its elements read from the file) or, in legacy files, a view of
  `numel` elements of a root from element `offset`."""
  __slots__ = ("key", "stype", "numel", "root", "offset", "data")

  def __init__(self, key: str, stype: _StorageType, numel: int,
               root: Optional["_Storage"] = None, offset: int = 0):
    self.key, self.stype, self.numel = key, stype, numel
    self.root, self.offset = root, offset
    self.data: Optional[np.ndarray] = None  # roots: the 1-D elements, once read

  def elements(self) -> np.ndarray:
    root = self.root or self
    if root.data is None:
      raise CheckpointError(f"storage {root.key!r} is used by the pickle but its data is "
                            "not in the file")
    return root.data[self.offset:self.offset + self.numel]


class _TensorRef(_Frozen):
  """A tensor seen in the pickle: becomes an array once the storages are read (legacy
  files store them after the pickle)."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a "
                            "storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
      raise CheckpointError(f"tensor size {size} and stride {stride} differ in rank")
    self.storage, self.offset = storage, _int_tuple((offset,), "storage offset")[0]
    self.size, self.stride = size, stride


def _int_tuple(values, what: str) -> tuple:
  if not isinstance(values, (tuple, list)) or not all(
      type(v) is int and v >= 0 for v in values):  # bool is not a size
    raise CheckpointError(f"tensor {what} {values!r} is not a sequence of ints >= 0")
  return tuple(values)


def _rebuild_tensor(storage, storage_offset, size, stride):
  """torch._utils._rebuild_tensor (torch < 0.4)."""
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2: requires_grad and the (always empty, since torch
  1.0) hooks do not matter for an array; metadata holds the conj / neg view bits."""
  del requires_grad, backward_hooks
  if metadata:
    raise CheckpointError(f"tensor with metadata {metadata!r} (a lazily conjugated or "
                          "negated view) is not supported")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
  """torch._utils._rebuild_parameter: an nn.Parameter is its data."""
  del requires_grad, backward_hooks
  if not isinstance(data, _TensorRef):
    raise CheckpointError(f"nn.Parameter data is a {type(data).__name__}, not a tensor")
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  """torch._utils._rebuild_parameter_with_state: the Python attributes are dropped."""
  del state
  return _rebuild_parameter(data, requires_grad, backward_hooks)


class _PickledOrderedDict(dict):
  """collections.OrderedDict while unpickling: a state_dict's `_metadata` attribute
  arrives as BUILD state, which a plain dict cannot take; replaced by a dict after."""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise CheckpointError(f"OrderedDict state is a {type(state).__name__}")


class _NumpyDtype(_Frozen):
  """numpy.dtype(name, align, copy) + its BUILD state, for numpy scalars only (numeric
  kinds, no fields): building the real dtype from a pickle could alter numpy's cached
  dtypes (copy=False) or make object arrays."""
  __slots__ = ("dtype",)

  def __init__(self, name, align=False, copy=True):
    del align, copy
    try:
      dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
      dtype = None
    if dtype is None or dtype.kind not in "biufc" or dtype.fields is not None:
      raise CheckpointError(f"numpy dtype {name!r} is not a plain number type")
    self.dtype = dtype

  def __setstate__(self, state):
    # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
    if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in "<>|="
        or any(s is not None for s in state[2:5])):
      raise CheckpointError(f"numpy dtype state {state!r} is not a plain number type's")
    if state[1] in "<>":
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data):
  """numpy.core.multiarray.scalar(dtype, raw bytes) -> the numpy scalar."""
  if not isinstance(dtype, _NumpyDtype):
    raise CheckpointError(f"numpy scalar of dtype {dtype!r}")
  if isinstance(data, str):  # a Python 2 str (see `_unpickler`'s encoding)
    data = data.encode("utf-8", "surrogateescape")
  if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
    raise CheckpointError(f"numpy scalar of dtype {dtype.dtype} from {data!r}")
  return np.frombuffer(data, dtype.dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
  """_codecs.encode: how pickle protocol 2 writes Python 3 bytes (as latin-1 text)."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise CheckpointError(f"_codecs.encode({text!r:.40}, {encoding!r}) is not protocol 2's "
                          "bytes encoding")
  return text.encode("latin1")


def _set(items=()):
  return set(items)


def _frozenset(items=()):
  return frozenset(items)


def _complex(real=0.0, imag=0.0):
  if not all(isinstance(v, (int, float)) for v in (real, imag)):
    raise CheckpointError(f"complex({real!r}, {imag!r})")
  return complex(real, imag)


def _size(dims=()):
  """torch.Size is a tuple."""
  return tuple(dims)


# (module, name) -> what the pickle gets instead. Nothing here runs code the file chooses.
_SAFE_GLOBALS: Dict[tuple, Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): _PickledOrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,  # NEWOBJ + BUILD: fills its __dict__
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "complex"): _complex,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,   # numpy 1.x
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x
}
# Python 2 module names; pickle's own mapping lives in the find_class this one replaces.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
# Old CUDA checkpoints name torch.cuda.<X>Storage; the bytes are the same.
_STORAGE_MODULES = ("torch", "torch.cuda")


class _Unpickler(pickle.Unpickler):
  """Resolves only `_SAFE_GLOBALS` and storage types; storages via `persistent_load`."""

  def __init__(self, file: BinaryIO, path: str,
               storage: Optional[Callable[[tuple], _Storage]] = None):
    # Python 2 pickles hold byte strings: UTF-8 like torch.load, losslessly for the rest.
    super().__init__(file, encoding="utf-8", errors="surrogateescape")
    self._path, self._storage = path, storage

  def find_class(self, module, name):
    module = _PY2_MODULES.get(module, module)
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module in _STORAGE_MODULES and name in _STORAGE_TYPES:
      return _STORAGE_TYPES[name]
    raise UnsafeCheckpointError(
        f"{self._path}: refusing to load the global {module}.{name}: a checkpoint holds "
        "tensors, dicts, lists, numbers, strings and argparse.Namespace, and building "
        "anything else from a pickle can run code; nothing was built")

  def persistent_load(self, pid):
    if self._storage is None:
      raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r:.80} outside "
                            "the object pickle")
    if not isinstance(pid, tuple) or not pid:
      raise CheckpointError(f"{self._path}: persistent id {pid!r:.80} is not a tuple")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename == "module":  # legacy: a pickled nn.Module class with its source
      raise UnsafeCheckpointError(f"{self._path}: refusing to load a pickled nn.Module "
                                  f"class ({pid[1]!r}); save its state_dict() instead")
    if typename != "storage":
      raise CheckpointError(f"{self._path}: unknown persistent id type {typename!r}")
    if not isinstance(pid[1], _StorageType):
      raise CheckpointError(f"{self._path}: storage type {pid[1]!r} in {pid!r:.80}")
    return self._storage(pid[1:])


def _int(value, what: str, path: str) -> int:
  if type(value) is not int or value < 0:
    raise CheckpointError(f"{path}: {what} {value!r} is not an int >= 0")
  return value


def _key(value, path: str) -> str:
  value = value.decode("ascii") if isinstance(value, bytes) else value
  if not isinstance(value, str):
    raise CheckpointError(f"{path}: storage key {value!r} is not a string")
  return value


class _Storages:
  """persistent_load's storages by key; their declared bytes are counted against
  `max_bytes` as the pickle names them, before any is allocated."""

  def __init__(self, path: str, max_bytes: int):
    self.path, self.max_bytes, self.declared = path, max_bytes, 0
    self.storages: Dict[str, _Storage] = {}

  def _root(self, key: str, stype: _StorageType, numel: int) -> _Storage:
    if key not in self.storages:
      nbytes = numel * stype.dtype.itemsize
      self.declared += nbytes
      if self.declared > self.max_bytes:
        raise CheckpointTooLargeError(
            f"{self.path}: storage {key!r} declares {numel} x {stype} "
            f"({_size_str(nbytes)}), {_size_str(self.declared)} with the storages before "
            f"it: more than the limit of {_size_str(self.max_bytes)} (max_bytes)")
      self.storages[key] = _Storage(key, stype, numel)
    st = self.storages[key]
    if st.stype is not stype or st.numel != numel:
      # torch.save refuses to write this; torch.load would reinterpret silently.
      raise CheckpointError(f"{self.path}: storage {key!r} is used as {st.numel} x "
                            f"{st.stype} and as {numel} x {stype}")
    return st


class _ZipStorages(_Storages):
  """persistent_load of the zip format: one `_Storage` per key."""

  def __call__(self, data: tuple) -> _Storage:
    if len(data) != 4:
      raise CheckpointError(f"{self.path}: storage id {data!r:.80} has {len(data)} fields; "
                            "the zip format has 4")
    stype, key, _, numel = data  # the location ('cpu', 'cuda:0') does not matter here
    key, numel = _key(key, self.path), _int(numel, "storage size", self.path)
    return self._root(key, stype, numel)


class _LegacyStorages(_Storages):
  """persistent_load of the legacy format: roots by key, plus the storage views of
  torch < 1.0 (`view_metadata = (view_key, offset, numel)`, in elements of the root)."""

  def __init__(self, path: str, max_bytes: int):
    super().__init__(path, max_bytes)
    self.views: Dict[str, _Storage] = {}

  def __call__(self, data: tuple) -> _Storage:
    if len(data) != 5:
      raise CheckpointError(f"{self.path}: storage id {data!r:.80} has {len(data)} fields; "
                            "the legacy format has 5")
    stype, key, _, numel, view = data
    key, numel = _key(key, self.path), _int(numel, "storage size", self.path)
    root = self._root(key, stype, numel)
    if view is None:
      return root
    if not isinstance(view, tuple) or len(view) != 3:
      raise CheckpointError(f"{self.path}: storage view {view!r:.80} is not "
                            "(key, offset, size)")
    view_key = _key(view[0], self.path)
    offset = _int(view[1], "storage view offset", self.path)
    size = _int(view[2], "storage view size", self.path)
    if offset + size > root.numel:
      raise CheckpointError(f"{self.path}: storage view {view_key!r} of elements "
                            f"[{offset}, {offset + size}) exceeds storage {key!r} of "
                            f"{root.numel}")
    if view_key not in self.views:
      self.views[view_key] = _Storage(view_key, root.stype, size, root, offset)
    return self.views[view_key]


# -------------------------------------------------------------------------- reading


def load(path: Union[str, os.PathLike], limits: Optional[Limits] = None) -> Any:
  """Reads a `torch.save` file (zip or legacy format) without torch, within `limits`.

  Args:
    path: the checkpoint, e.g. an authors' `model_best.pth.tar` or a `pytorch_model.bin`.
    limits: the bounds on what the file may make this process build (default `Limits()`,
      see the module docstring).

  Returns:
    The saved object, tensors as numpy arrays, OrderedDicts as dicts, argparse.Namespace
    kept (see the module docstring for every conversion).

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle names a global that is not plain data (named in the
      message; nothing was built).
    CheckpointTooLargeError: the file exceeds one of `limits` (named in the message).
    CheckpointError: truncated, corrupt, not a checkpoint, or an unsupported format.
  """
  path, limits = os.fspath(path), limits or Limits()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found (no such file): {path}")
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(0)
    if not head:
      raise CheckpointError(f"{path}: empty file")
    try:
      if head == _ZIP_MAGIC:
        obj = _read_zip(f, path, limits)
      elif head[:1] == b"\x80":  # pickle's PROTO opcode: the legacy format's magic pickle
        obj = _read_legacy(f, path, limits)
      else:
        raise _not_a_checkpoint(path, head)
      return _resolve(obj, path, limits)
    except CheckpointError:
      raise
    except _PICKLE_ERRORS as e:
      raise CheckpointError(f"{path}: truncated or corrupt checkpoint: "
                            f"{type(e).__name__}: {e}") from e


# What a damaged pickle or archive raises while being read (a pickle can call the allowed
# functions with any arguments, hence TypeError and the like).
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                  IndexError, KeyError, struct.error, OverflowError, RecursionError,
                  zipfile.BadZipFile)


def _not_a_checkpoint(path: str, head: bytes) -> CheckpointError:
  if _is_tar(path):
    return CheckpointError(
        f"{path}: a tar archive, the torch.save format of torch before 0.4, which is not "
        "supported (readable: the legacy pickle format of torch 0.4 - 1.5 and the zip "
        "format of torch >= 1.6)")
  return CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip "
                         f"format nor its legacy pickle format); it starts with {head!r}")


def _is_tar(path: str) -> bool:
  try:
    return tarfile.is_tarfile(path)
  except OSError:
    return False


def _read_zip(f: BinaryIO, path: str, limits: Limits):
  try:
    zf = zipfile.ZipFile(f)
  except zipfile.BadZipFile as e:
    raise CheckpointError(f"{path}: truncated or corrupt zip checkpoint (torch >= 1.6 "
                          f"format): {e}") from e
  with zf:
    names = zf.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: a zip archive without exactly one "
                            f"<archive>/data.pkl record, so not a torch.save checkpoint "
                            f"(records: {names[:6]})")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "constants.pkl" in names:
      raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a "
                            "torch.save checkpoint")
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace")
      if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: {prefix}byteorder is {byteorder!r}")
    pickle_size = zf.getinfo(pickles[0]).file_size
    if pickle_size > limits.max_pickle_bytes:  # before inflating what it declares
      raise CheckpointTooLargeError(
          f"{path}: {pickles[0]} is {_size_str(pickle_size)}, more than the limit of "
          f"{_size_str(limits.max_pickle_bytes)} (max_pickle_bytes); the object pickle "
          "of a checkpoint holds names and shapes, not data")
    storages = _ZipStorages(path, limits.max_bytes)
    obj = _Unpickler(io.BytesIO(zf.read(pickles[0])), path, storages).load()
    for key, st in storages.storages.items():
      record = f"{prefix}data/{key}"
      try:
        info = zf.getinfo(record)
      except KeyError:
        raise CheckpointError(f"{path}: storage record {record} is missing") from None
      nbytes = st.numel * st.stype.dtype.itemsize
      if info.file_size != nbytes:
        raise CheckpointError(f"{path}: storage record {record} has {info.file_size} "
                              f"bytes; {st.numel} x {st.stype} need {nbytes}")
      if info.compress_type == zipfile.ZIP_STORED and info.compress_size != nbytes:
        # (torch.save stores records uncompressed) a size the archive cannot hold
        raise CheckpointError(f"{path}: storage record {record} declares {nbytes} bytes "
                              f"but holds {info.compress_size} in the archive")
      buf = np.empty(nbytes, np.uint8)
      with zf.open(info) as rf:
        _read_exactly(rf, buf, path, f"storage record {record}")
      st.data = _elements(buf, st.stype, byteorder)
  return obj


def _read_legacy(f: BinaryIO, path: str, limits: Limits):
  try:
    magic = _Unpickler(f, path).load()
  except UnsafeCheckpointError:
    raise
  except (CheckpointError,) + _PICKLE_ERRORS as e:
    raise CheckpointError(f"{path}: not a PyTorch checkpoint: its first pickle is not "
                          f"torch.save's magic number ({type(e).__name__}: {e})") from e
  if magic != MAGIC_NUMBER:
    raise CheckpointError(f"{path}: a pickle, but not a torch.save file (no torch magic "
                          f"number; first value {type(magic).__name__})")
  protocol = _Unpickler(f, path).load()
  if protocol != PROTOCOL_VERSION:
    raise CheckpointError(f"{path}: legacy torch.save protocol {protocol!r} is not "
                          f"supported (only {PROTOCOL_VERSION})")
  sys_info = _Unpickler(f, path).load()
  if not isinstance(sys_info, dict):
    raise CheckpointError(f"{path}: legacy sys info is a {type(sys_info).__name__}")
  storages = _LegacyStorages(path, limits.max_bytes)
  obj = _Unpickler(f, path, storages).load()
  keys = _Unpickler(f, path).load()
  if not isinstance(keys, list):
    raise CheckpointError(f"{path}: legacy storage key list is a {type(keys).__name__}")
  # The C writer (THPStorage_writeFileRaw) stores the count and the data little-endian.
  file_size = os.fstat(f.fileno()).st_size
  for key in keys:
    key = _key(key, path)
    if key not in storages.storages:
      raise CheckpointError(f"{path}: storage {key!r} is in the file but not in the pickle")
    st = storages.storages[key]
    header = f.read(8)
    if len(header) < 8:
      raise CheckpointError(f"{path}: truncated: the file ends before storage {key!r}")
    (numel,) = struct.unpack("<q", header)
    if numel != st.numel:
      raise CheckpointError(f"{path}: storage {key!r} has {numel} elements in the file, "
                            f"{st.numel} in the pickle")
    nbytes = numel * st.stype.dtype.itemsize
    if nbytes > file_size - f.tell():  # before allocating what a damaged count asks for
      raise CheckpointError(f"{path}: truncated: storage {key!r} needs {nbytes} bytes, the "
                            f"file has {file_size - f.tell()} left")
    buf = np.empty(nbytes, np.uint8)
    _read_exactly(f, buf, path, f"storage {key!r}")
    st.data = _elements(buf, st.stype, "little")
  return obj


def _read_exactly(f, buf: np.ndarray, path: str, what: str) -> None:
  view, done = memoryview(buf), 0
  while done < len(view):
    n = f.readinto(view[done:])
    if not n:
      raise CheckpointError(f"{path}: truncated: {what} needs {len(view)} bytes, the file "
                            f"has {done}")
    done += n


def _elements(buf: np.ndarray, stype: _StorageType, byteorder: str) -> np.ndarray:
  """The storage's 1-D elements in native byte order (a view of `buf` when possible)."""
  dtype = stype.dtype
  if dtype.itemsize > 1 and byteorder != sys.byteorder:
    return buf.view(dtype.newbyteorder("<" if byteorder == "little" else ">")).astype(
        dtype.newbyteorder("="))
  return buf.view(dtype.newbyteorder("="))


def _tensor(ref: _TensorRef, path: str) -> np.ndarray:
  elements = ref.storage.elements()
  if 0 in ref.size:
    array = np.empty(ref.size, elements.dtype)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= elements.shape[0]:
      raise CheckpointError(f"{path}: tensor of size {ref.size}, stride {ref.stride} at "
                            f"offset {ref.offset} reaches element {last} of storage "
                            f"{ref.storage.key!r}, which has {elements.shape[0]}")
    # Bounds checked above: as_strided itself does not check them.
    array = np.lib.stride_tricks.as_strided(
        elements[ref.offset:], shape=ref.size,
        strides=tuple(s * elements.itemsize for s in ref.stride))
  if ref.storage.stype.bfloat16:  # bfloat16 is the top half of a float32
    array = (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _resolve(obj: Any, path: str, limits: Limits) -> Any:
  """Replaces tensors and bare storages by arrays and OrderedDicts by dicts, keeping
  shared references shared, within `limits` (depth, nodes as a tree walk sees them, bytes
  of the tensors)."""
  memo: Dict[int, tuple] = {}  # id -> (converted, tree nodes, tree bytes)
  in_progress: set = set()
  seen = [0]  # distinct containers and leaves visited so far

  def where(trail: List[Any]) -> str:
    shown = "".join(f"[{k!r:.40}]" for k in trail[:3])
    return f"at {shown}{'...' if len(trail) > 3 else ''}" if trail else "at the top level"

  def too_large(what: str, trail: List[Any]) -> CheckpointTooLargeError:
    return CheckpointTooLargeError(f"{path}: {what} {where(trail)}; refusing it")

  def walk(x, trail: List[Any]):
    """(converted x, its node count as a tree, its tensor bytes as a tree)."""
    seen[0] += 1
    if seen[0] > limits.max_objects:
      raise too_large(f"the pickle holds more than {limits.max_objects} objects (the limit, "
                      "max_objects; a checkpoint holds a few thousand)", trail)
    if isinstance(x, (str, bytes, int, float, complex, bool, type(None), np.generic)):
      return x, 1, 0
    if id(x) in memo:
      return memo[id(x)]
    if id(x) in in_progress:
      raise CheckpointError(f"{path}: a {type(x).__name__} that contains itself (a reference "
                            f"cycle) {where(trail)}")
    if len(trail) >= limits.max_depth:
      raise too_large(f"containers nest deeper than {limits.max_depth} levels (the limit, "
                      "max_depth; a checkpoint nests a few)", trail)
    nodes, nbytes = 1, 0
    if isinstance(x, (_TensorRef, _Storage)):
      shape = x.size if isinstance(x, _TensorRef) else (x.numel,)
      stype = x.storage.stype if isinstance(x, _TensorRef) else x.stype
      nbytes = int(np.prod(shape, dtype=object)) * (4 if stype.bfloat16 else
                                                     stype.dtype.itemsize)
      if nbytes > limits.max_bytes:  # before a stride-0 view is made real
        raise too_large(f"a tensor of shape {tuple(shape)} ({_size_str(nbytes)}) exceeds the "
                        f"limit of {_size_str(limits.max_bytes)} (max_bytes)", trail)
      if isinstance(x, _TensorRef):
        out = _tensor(x, path)
      else:
        out = x.elements()
        if x.stype.bfloat16:
          out = (out.astype(np.uint32) << 16).view(np.float32)
    else:
      in_progress.add(id(x))
      if isinstance(x, dict):
        out, items = {}, x.items()
      elif isinstance(x, list):
        out, items = [], enumerate(x)
      elif isinstance(x, argparse.Namespace):
        out, items = argparse.Namespace(), vars(x).items()
      elif isinstance(x, (tuple, set, frozenset)):
        out, items = [], enumerate(x)
      else:
        raise CheckpointError(f"{path}: unexpected {type(x).__name__} in the pickle "
                              f"{where(trail)}")
      for k, v in items:
        if isinstance(x, dict):
          k, k_nodes, _ = walk(k, trail + [k])
          nodes += k_nodes
        v, v_nodes, v_bytes = walk(v, trail + [k])
        nodes, nbytes = nodes + v_nodes, nbytes + v_bytes
        if nodes > limits.max_objects:
          raise too_large(
              f"shared references expand a {type(x).__name__} to more than "
              f"{limits.max_objects} objects when followed (the limit, max_objects; "
              "e.g. x = [x, x] nested 20 times)", trail)
        if nbytes > limits.max_bytes:
          raise too_large(f"tensors of more than {_size_str(limits.max_bytes)} together "
                          "(the limit, max_bytes), counting each reference", trail)
        if isinstance(out, dict):
          out[k] = v
        elif isinstance(out, argparse.Namespace):
          setattr(out, k, v)
        else:
          out.append(v)
      if isinstance(x, (tuple, set, frozenset)):
        out = type(x)(out)
      in_progress.discard(id(x))
    memo[id(x)] = (out, nodes, nbytes)
    return memo[id(x)]

  return walk(obj, [])[0]

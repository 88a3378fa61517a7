"""Atomic file writes: a kill at any instant leaves the old file or the new one, never a
torn one.

Every file the project writes for a user (results, ranks, sims, configs, figures,
caches, extracted features, converted workdirs) goes through this module: the content
is written under a unique temporary name in the same directory (`.{name}.XXXXXXXX.tmp`,
hidden, so a listing or a glob for results never picks it up), fsynced, then renamed
over the final name (a rename within one file system is atomic on POSIX), and the
directory is fsynced so the rename survives a power loss.

- `replacing(path, mode)`: a file object to write (json, np.savez, savefig(format=...));
- `replacing_path(path)`: a temporary name, for writers that want a name (faiss,
  safetensors); `temporary_path` / `install` are its two halves, for a writer whose
  life spans more than one block (a memory-mapped sims matrix filled tile by tile);
- `write_bytes`, `write_text`, `write_json`, `save_npz`, `save_npy`: whole files;
- `new_directory(path)`: a directory that appears complete or not at all.

A kill leaves at most a temporary file (or directory) beside the target, never a torn
target. Append logs (`metrics.jsonl`) and lock files are not replace-style and do not
use this module (see `tests/test_atomic_writes.py`, which holds the rule).
"""
import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Iterator

import numpy as np


def fsync_dir(path: str) -> None:
  """fsyncs directory `path`, so a rename inside it is durable."""
  try:
    fd = os.open(path or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some file systems (FUSE mounts) refuse fsync on directories
    pass
  finally:
    os.close(fd)


def fsync_file(path: str) -> None:
  """fsyncs the file at `path` (written by someone else: a memory map, a library)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(path: str) -> None:
  """fsyncs every file and directory under `path` (durability across power loss)."""
  for root, _, files in os.walk(path):
    for name in files:
      fsync_file(os.path.join(root, name))
    fsync_dir(root)


def _beside(path: str, make):
  """`make(name)` for a new unique hidden name `.{basename}.XXXXXXXX.tmp` beside `path`;
  returns (its result, name). Not `tempfile.mkstemp`: that makes files only the owner may
  read, and the file written here becomes the user's file, with the usual umask rights."""
  directory, base = os.path.split(os.path.abspath(path))
  for _ in range(100):
    name = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
      return make(name), name
    except FileExistsError:
      continue
  raise FileExistsError(f"{path}: no free temporary name beside it")


def _create_file(name: str) -> int:
  return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)


def temporary_path(path: str) -> str:
  """Creates an empty file beside `path` under a unique hidden temporary name and returns
  that name; `install(tmp, path)` puts it in place, `discard(tmp)` removes it."""
  fd, tmp = _beside(path, _create_file)
  os.close(fd)
  return tmp


def install(tmp: str, path: str) -> str:
  """fsyncs the finished temporary file `tmp`, renames it over `path` (atomic) and
  fsyncs the directory; returns `path`."""
  fsync_file(tmp)
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(os.path.abspath(path)))
  return path


def discard(tmp: str) -> None:
  """Removes temporary file `tmp` if it is still there (a write that did not finish)."""
  with contextlib.suppress(OSError):
    os.remove(tmp)


@contextlib.contextmanager
def replacing_path(path: str) -> Iterator[str]:
  """Yields a temporary name beside `path` for a writer that takes a file name; on a
  clean exit the file there is fsynced and renamed over `path`, on an exception it is
  removed and `path` is left as it was."""
  tmp = temporary_path(path)
  try:
    yield tmp
    install(tmp, path)
  except BaseException:
    discard(tmp)
    raise


@contextlib.contextmanager
def replacing(path: str, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file beside `path` for writing (`mode`: "w" or "wb"); on a clean
  exit it is fsynced and renamed over `path`, on an exception it is removed and `path`
  is left as it was."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic.replacing({path!r}, mode={mode!r}): expected 'w' or 'wb' "
                     "(a replaced file is written whole)")
  fd, tmp = _beside(path, _create_file)
  try:
    with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    discard(tmp)
    raise
  fsync_dir(os.path.dirname(tmp))


@contextlib.contextmanager
def new_directory(path: str) -> Iterator[str]:
  """Yields a new temporary directory beside `path` to fill; on a clean exit everything
  in it is fsynced and it is renamed to `path`, on an exception it is removed. `path`
  must not exist (FileExistsError before any work); a non-empty directory made at
  `path` meanwhile by someone else is not replaced (FileExistsError)."""
  path = os.path.abspath(path)
  if os.path.lexists(path):
    raise FileExistsError(f"{path}: already exists")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  _, tmp = _beside(path, lambda name: os.mkdir(name, 0o777))
  try:
    yield tmp
    fsync_tree(tmp)
    try:
      os.rename(tmp, path)  # over an empty directory at most: never over content
    except OSError as e:
      if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path}: made by someone else while this one was being "
                              f"written; left as it is") from e
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  fsync_dir(parent)


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` atomically; returns `path`."""
  with replacing(path, "wb") as f:
    f.write(data)
  return path


def write_text(path: str, text: str) -> str:
  """Writes `text` (UTF-8) to `path` atomically; returns `path`."""
  with replacing(path, "w") as f:
    f.write(text)
  return path


def write_json(path: str, obj, **kwargs) -> str:
  """Writes `obj` as JSON (indented by 2 unless `indent` is given; other `json.dump`
  options as keywords) to `path` atomically; returns `path`."""
  kwargs.setdefault("indent", 2)
  with replacing(path, "w") as f:
    json.dump(obj, f, **kwargs)
  return path


def save_npz(path: str, **arrays) -> str:
  """`np.savez` to `path` atomically (through a file object: given a bare name, numpy
  would append ".npz" to the temporary one); returns `path`."""
  with replacing(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def save_npy(path: str, array) -> str:
  """`np.save` to `path` atomically; returns `path`."""
  with replacing(path, "wb") as f:
    np.save(f, np.asarray(array), allow_pickle=False)
  return path


def publish(src: str, dst: str) -> str:
  """Makes `dst` name the same content as `src`, atomically: a hard link (no copy, and a
  later replacement of either name leaves the other intact), or a copy where the file
  system refuses links; returns `dst`."""
  try:
    _, tmp = _beside(dst, lambda name: os.link(src, name))
  except FileExistsError:
    raise
  except OSError:
    with open(src, "rb") as f, replacing(dst, "wb") as out:
      while chunk := f.read(1 << 24):
        out.write(chunk)
    return dst
  os.replace(tmp, dst)
  fsync_dir(os.path.dirname(os.path.abspath(dst)))
  return dst

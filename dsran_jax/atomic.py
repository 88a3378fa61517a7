"""Atomic file writes: a kill at any instant leaves the old file or the new one, never a
torn one.

Every file the project writes for a user (results, ranks, sims, configs, figures,
caches, extracted features) goes through `replacing(path)`: the content is written
under a unique temporary name in the same directory, fsynced, then renamed over `path`
(a rename within one file system is atomic on POSIX), and the directory is fsynced so
the rename survives a power loss.
"""
import contextlib
import json
import os
import tempfile
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


@contextlib.contextmanager
def replacing(path: str, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file beside `path` for writing; on a clean exit it is fsynced
  and renamed over `path`, on an exception it is removed and `path` is left as it was."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  fsync_dir(directory)


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
  """Writes `obj` as indented JSON to `path` atomically; returns `path`."""
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
  directory = os.path.dirname(os.path.abspath(dst))
  tmp = os.path.join(directory, f".{os.path.basename(dst)}.{os.getpid()}.link")
  with contextlib.suppress(FileNotFoundError):
    os.remove(tmp)
  try:
    os.link(src, tmp)
  except OSError:
    with open(src, "rb") as f, replacing(dst, "wb") as out:
      while chunk := f.read(1 << 24):
        out.write(chunk)
    return dst
  os.replace(tmp, dst)
  fsync_dir(directory)
  return dst

"""The lock that keeps a second run out of a workdir.

`WorkdirLock`: one run per workdir. Each process of a run locks `{workdir}/.lock.{i}`
(i = its process index) with `flock`, which the kernel drops when the process ends in
any way (exception, SIGTERM, SIGKILL, power loss), so a dead run never blocks the next
one. The file holds the owner's pid, host and start time, so a second run exits at once
naming them. On file systems without `flock` (some FUSE mounts) the lock is the file's
exclusive creation instead, with a heartbeat: a lock whose process is gone (same host)
or whose heartbeat stopped (another host) is stale and taken over with a warning.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Optional, Tuple

import jax
from absl import logging

LOCK_NAME = ".lock.{}"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0   # a heartbeat-mode lock not refreshed for this long is stale


def _still_named(fd: int, path: str) -> bool:
  """Whether `path` still names the open file `fd` (not unlinked or replaced)."""
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _proc_start_time(pid: int) -> Optional[str]:
  """The kernel's start time of `pid` (Linux), to tell a live pid from a reused one."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int, start_time: Optional[str]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  now = _proc_start_time(pid)
  return start_time is None or now is None or now == start_time


def _describe(info: dict, path: str) -> str:
  started = info.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  cmd = " ".join(info.get("argv", []))[:200]
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {when}"
          + (f": {cmd}" if cmd else "") + f"; lock file {path})")


def _read_info(path: str) -> dict:
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return {}
  try:
    info = json.loads(text) if text.strip() else {}
  except json.JSONDecodeError:
    return {"unreadable": text[:100]}
  return info if isinstance(info, dict) else {}


class WorkdirLock:
  """Exclusive use of a workdir by one run, as a context manager.

      with WorkdirLock(workdir):
        ...train...

  Raises WorkdirLockedError on entry if another live run holds it. Every process of a
  multi-host run takes its own lock file, so a second run fails on every host at once.
  """

  def __init__(self, workdir: str, process_index: Optional[int] = None,
               use_flock: bool = True):
    if process_index is None:
      process_index = jax.process_index()
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME.format(int(process_index)))
    self.use_flock = use_flock
    self._fd = None
    self._mode = None
    self._stop = threading.Event()
    self._thread = None

  def _info(self) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.time(),
            "proc_start": _proc_start_time(pid), "argv": list(sys.argv)}

  def _write_info(self, fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._info()).encode(), 0)
    os.fsync(fd)

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming the run that holds it."""
    if self._fd is not None:
      raise RuntimeError(f"{self.path}: already held by this object")
    os.makedirs(self.workdir, exist_ok=True)
    if self.use_flock:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _still_named(fd, self.path):
          # The holder released (and unlinked) the file between our open and flock:
          # lock the file that now carries the name instead.
          os.close(fd)
          return self.acquire()
      except BlockingIOError:
        os.close(fd)
        info = _read_info(self.path)
        for _ in range(20):  # the holder may not have written its details yet
          if info.get("pid") is not None:
            break
          time.sleep(0.05)
          info = _read_info(self.path)
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by another run: "
            f"{_describe(info, self.path)}; wait for it to finish or "
            f"use another --workdir") from None
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise
        logging.warning("%s: the file system does not support flock (%s); using an "
                        "exclusive lock file with a heartbeat instead", self.path, e)
        self.use_flock = False
        return self.acquire()
      previous = _read_info(self.path)
      if previous.get("pid") is not None:
        # The file names a run, yet nobody holds the flock: that run died.
        logging.warning("workdir %s: taking over a stale lock of a run that is no longer "
                        "running (%s)", self.workdir, _describe(previous, self.path))
      self._write_info(fd)
      self._fd, self._mode = fd, "flock"
      return self
    return self._acquire_exclusive()

  def _acquire_exclusive(self) -> "WorkdirLock":
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        try:
          seen = os.stat(self.path).st_ino
        except FileNotFoundError:
          continue
        info = _read_info(self.path)
        stale, why = self._is_stale(info)
        if not stale:
          raise WorkdirLockedError(
              f"workdir {self.workdir} is in use by another run: "
              f"{_describe(info, self.path)}; wait for it to finish or use another "
              f"--workdir (if that run is dead, its lock expires {STALE_AFTER_S:.0f}s "
              f"after its last heartbeat, or remove {self.path})") from None
        try:
          if os.stat(self.path).st_ino != seen:
            continue  # another run replaced the stale file meanwhile: look again
          logging.warning("workdir %s: taking over a stale lock (%s): %s", self.workdir,
                          why, _describe(info, self.path))
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        continue
      self._write_info(fd)
      self._fd, self._mode = fd, "exclusive"
      self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="workdir-lock-heartbeat")
      self._thread.start()
      return self
    raise WorkdirLockedError(f"{self.path}: could not take the lock (contended)")

  def _is_stale(self, info: dict) -> Tuple[bool, str]:
    try:
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return True, "removed meanwhile"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
      if not _pid_alive(info["pid"], info.get("proc_start")):
        return True, f"pid {info['pid']} is not running"
      return False, ""
    if age > STALE_AFTER_S:
      return True, f"no heartbeat for {age:.0f}s"
    return False, ""

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError as e:
        logging.warning("%s: lock heartbeat failed: %s", self.path, e)

  def release(self) -> None:
    """Releases the lock (idempotent) and removes its file. The file is unlinked while
    still locked, and `acquire` checks after its flock that the name still leads to the
    file it locked, so two later runs never hold two different files."""
    if self._fd is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    if self._mode != "exclusive":
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def __del__(self):
    try:
      self.release()
    except Exception:  # pylint: disable=broad-except
      pass  # interpreter shutdown

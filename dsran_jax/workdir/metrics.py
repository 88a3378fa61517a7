"""A run's `metrics.jsonl` (plus TensorBoard scalars).

`MetricsLog`: one JSON object per line. Rows are appended with one `write` each and a
failed append is cut back, so a row is never half there while the run goes on; a torn
last line left by a SIGKILL or a full disk is dropped with a warning naming the file and
line when the run resumes, as are the rows after the resumed step.
"""
import errno
import json
import os
import signal
from typing import Iterator, List, Optional

import jax
from absl import logging

from dsran_jax import atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# `DSRAN_CRASH_AT=metrics:STEP:torn`: write half of step STEP's row, then SIGKILL (tests).
CRASH_ENV = "DSRAN_CRASH_AT"


def iter_metrics(path: str, warn: bool = True) -> Iterator[dict]:
  """The rows of a metrics.jsonl file; unreadable lines (a torn write) are skipped, each
  with a warning naming the file and line."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
          raise ValueError("not a row with an integer 'step'")
      except (UnicodeDecodeError, ValueError) as e:
        if warn:
          shown = raw[:80].decode("utf-8", "replace").rstrip("\n")
          logging.warning("%s line %d: dropping an unreadable row (a write cut short by a "
                          "crash or a full disk?): %r (%s)", path, number, shown, e)
        continue
      yield row


def read_metrics(path: str, warn: bool = True) -> List[dict]:
  """All readable rows of a metrics.jsonl file (see `iter_metrics`)."""
  return list(iter_metrics(path, warn))


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard scalars.

  Only process 0 writes. Opening it for a run resuming at `start_step` drops the rows
  after that step (the run logs them again) and any torn line, rewriting the file
  atomically.
  """

  def __init__(self, workdir: str, start_step: int, process_index: Optional[int] = None,
               tensorboard: bool = True):
    if process_index is None:
      process_index = jax.process_index()
    self.path = os.path.join(workdir, METRICS_FILE)
    self.writer = process_index == 0
    self._tb = None
    if not self.writer:
      return
    self._drop_after(start_step)
    if not tensorboard:
      return
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))
    except Exception as e:  # pylint: disable=broad-except
      # TensorBoard is a convenience; metrics.jsonl is the record.
      logging.warning("TensorBoard writer unavailable: %s", e)

  def _drop_after(self, step: int) -> None:
    # A resumed run rewrites the steps after its checkpoint, so the log has no duplicates.
    if not os.path.exists(self.path):
      return
    rows = [r for r in iter_metrics(self.path) if r.get("step", 0) <= step]
    atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

  def write(self, step: int, values: dict) -> None:
    """Appends `{"step": step, **values}` (floats) and the TensorBoard scalars."""
    if not self.writer:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      if os.environ.get(CRASH_ENV) == f"metrics:{int(step)}:torn":
        os.write(fd, line[:len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
      try:
        written = os.write(fd, line)
        if written != len(line):
          raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
      except OSError as e:
        try:  # never leave half a row for the next append to run into
          os.ftruncate(fd, size)
        except OSError:
          pass
        raise OSError(e.errno, f"{self.path}: cannot append the metrics of step {step}: "
                      f"{e.strerror or e}") from None
    finally:
      os.close(fd)
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        with self._tb.as_default(step=int(step)):
          for k, v in values.items():
            tf.summary.scalar(k, float(v))
        self._tb.flush()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard summaries disabled: %s", e)
        self._tb = None

  def sync(self) -> None:
    """fsyncs metrics.jsonl: call before a checkpoint, so that after a power loss the
    log holds every row up to the step the run resumes from."""
    if not self.writer or not os.path.exists(self.path):
      return
    fd = os.open(self.path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

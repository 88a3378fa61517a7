"""Progress that shows wherever a run is watched: a tqdm bar on a terminal and in
notebooks, and periodic log lines (count, rate, ETA) otherwise, so a job writing to a log
file is never silent for minutes."""
import logging as std_logging
import os
import sys
import time
from typing import Optional

from absl import logging
from tqdm.auto import tqdm


def _in_notebook() -> bool:
  shell = sys.modules.get("IPython")
  if shell is None:
    return False
  try:
    ip = shell.get_ipython()
  except Exception:  # pylint: disable=broad-except
    return False
  return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _terminal_width() -> int:
  try:
    return os.get_terminal_size(sys.stderr.fileno()).columns
  except (OSError, ValueError, AttributeError):
    return 0


def interactive() -> bool:
  """True in a Jupyter/Colab kernel, or on a terminal that reports its width, where a
  bar redraws in place. A terminal without a window size (some containers, `script`)
  gets log lines: tqdm would draw an empty bar there."""
  return _in_notebook() or (sys.stderr.isatty() and _terminal_width() > 0)


class _AboveTheBar:
  """Stands for stderr while a bar is drawn: each complete line written to it (absl's
  log lines, warnings) is printed above the bar through `tqdm.write`, not glued onto it."""

  def __init__(self, stream):
    self.stream = stream
    self._pending = ""

  def write(self, text: str) -> int:
    self._pending += text
    *lines, self._pending = self._pending.split("\n")
    for line in lines:
      tqdm.write(line, file=self.stream)
    return len(text)

  def flush(self) -> None:
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def fileno(self) -> int:
    return self.stream.fileno()


_bars_open = 0
_rerouted = []   # (object, attribute, its own value) while a bar is open


def _route_logs_above_bars(opening: bool) -> None:
  """While any bar is open, sys.stderr and the log handlers that print to it (absl's,
  and the root logger's) write through one `_AboveTheBar`."""
  global _bars_open
  if opening:
    if _bars_open == 0 and not isinstance(sys.stderr, _AboveTheBar):
      above = _AboveTheBar(sys.stderr)
      handlers = [logging.get_absl_handler().python_handler]
      handlers += [h for h in std_logging.getLogger().handlers
                   if isinstance(h, std_logging.StreamHandler)]
      for handler in handlers:
        if getattr(handler, "stream", None) is above.stream:
          _rerouted.append((handler, "stream", handler.stream))
          handler.stream = above
      _rerouted.append((sys, "stderr", sys.stderr))
      sys.stderr = above
    _bars_open += 1
  else:
    _bars_open = max(_bars_open - 1, 0)
    if _bars_open == 0:
      while _rerouted:
        owner, attribute, value = _rerouted.pop()
        setattr(owner, attribute, value)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """`update(n)` / `set_postfix(**kv)` / `close()`, as tqdm, with a log-line fallback.

  Args:
    total: expected count (None: unknown).
    desc: what is counted ("train", "score", ...).
    unit: the unit shown in rates ("step", "pair", ...).
    initial: count already done (a resumed run).
    log_every_s: seconds between log lines when no bar can be drawn.
    leave: keep the bar after `close`.
  """

  def __init__(self, total: Optional[int], desc: str, unit: str = "it", initial: int = 0,
               log_every_s: float = 30.0, leave: bool = True, unit_scale: bool = False):
    self.total, self.desc, self.unit = total, desc, unit
    self.n = initial
    # The rate counts from the first update on: what comes before it (a compilation,
    # say) would make the first ETAs meaningless.
    self._start_n = None
    self._t0 = self._last_log = time.time()
    self._log_every_s = log_every_s
    self._postfix = {}
    self._bar = None
    if interactive():
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                       dynamic_ncols=True, unit_scale=unit_scale)
      _route_logs_above_bars(opening=True)

  def rate(self) -> float:
    """Units per second since the first update (0 until a second one)."""
    if self._start_n is None or self.n == self._start_n:
      return 0.0
    return (self.n - self._start_n) / max(time.time() - self._t0, 1e-9)

  def update(self, n: int = 1) -> None:
    self.n += n
    if self._start_n is None:
      self._start_n, self._t0 = self.n, time.time()
    if self._bar is not None:
      self._bar.update(n)
      return
    now = time.time()
    if now - self._last_log >= self._log_every_s:
      self._last_log = now
      self._log()

  def set_postfix(self, **values) -> None:
    self._postfix = values
    if self._bar is not None:
      self._bar.set_postfix(**values)

  def _log(self) -> None:
    rate = self.rate()
    parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")
             + f" {self.unit}s", f"{rate:,.2f} {self.unit}s/s" if rate else "rate pending"]
    if self.total and rate > 0:
      parts.append(f"ETA {_fmt_time((self.total - self.n) / rate)}")
    parts += [f"{k} {v}" for k, v in self._postfix.items()]
    logging.info("  ".join(parts))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
      _route_logs_above_bars(opening=False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

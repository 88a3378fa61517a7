"""Progress on a terminal: a bar with log lines above it, or log lines where no bar fits."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = r"""
import time
from absl import logging
from dsran_jax.progress import Progress
logging.use_absl_handler()   # as app.run does
logging.set_verbosity(logging.INFO)
with Progress(total=3, desc="work", unit="step", log_every_s=0.0) as p:
  for i in range(3):
    p.update(1)
    logging.info("log-line-%d", i)
    time.sleep(0.05)
"""


def _run_on_a_terminal(columns: int) -> str:
  """Runs RUN with its stderr on a pseudo-terminal of `columns` columns (0: a terminal
  that reports no window size); returns what the terminal received."""
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
  proc = subprocess.Popen([sys.executable, "-c", RUN], cwd=REPO, stderr=follower,
                          stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=REPO))
  os.close(follower)
  chunks = []
  while True:
    try:
      data = os.read(leader, 4096)
    except OSError:   # EIO: the child closed the terminal
      break
    if not data:
      break
    chunks.append(data)
  os.close(leader)
  assert proc.wait(timeout=120) == 0
  return b"".join(chunks).decode(errors="replace")


def _segments(text: str):
  return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def test_log_lines_print_above_the_bar_not_glued_onto_it():
  out = _run_on_a_terminal(100)
  assert "work:" in out and "3/3" in out   # a bar was drawn
  logged = [s for s in _segments(out) if "log-line-" in s]
  assert len(logged) == 3, out
  for line in logged:   # each log line starts a line of its own (absl's "I1207 ..." prefix)
    assert re.match(r"^I\d{4} ", line.lstrip("\x1b[A ")), repr(line)


def test_a_terminal_without_a_window_size_gets_log_lines_not_an_empty_bar():
  out = _run_on_a_terminal(0)
  assert "|" not in out, out   # no bar
  assert re.search(r"work: \d/3 steps", out), out

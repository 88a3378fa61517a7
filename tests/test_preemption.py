"""SIGTERM (a preempted VM) is honoured within one train step, also in the middle of a dev
evaluation, and the run resumes to the same result, the abandoned evaluation redone."""
import json
import os
import signal
import time

import pytest

from conftest import tiny_train_config
from dsran_jax import checkpointing, evaluation, train


def _signal_on(monkeypatch, target, name, when):
  """Wraps `target.name` so that its call number `when` (1-based) first sends this
  process a SIGTERM; returns a dict with the call count and the signal time."""
  real = getattr(target, name)
  state = {"calls": 0, "t": None}

  def wrapped(*args, **kwargs):
    state["calls"] += 1
    if state["calls"] == when:
      state["t"] = time.time()
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(target, name, wrapped)
  return state


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["step"] for l in f if l.strip() and "loss" in json.loads(l)]


def test_sigterm_during_dev_evaluation_stops_within_the_evaluation(minilm_dir, tmp_path,
                                                                   monkeypatch):
  config = tiny_train_config(minilm_dir)
  config.data.synthetic.num_dev_images = 40  # 5 image batches, 25 caption batches
  workdir = str(tmp_path)
  # Batch 2 of the first dev evaluation (at step 6) raises the signal.
  state = _signal_on(monkeypatch, evaluation.ModelScorer, "encode_images", 2)
  out = train.train_and_evaluate(config, workdir)
  delay = time.time() - state["t"]
  print(f"SIGTERM during dev evaluation: stopped {delay:.2f}s after the signal")
  assert out == {"stopped_at": 6}
  # The evaluation stopped at once: no further image batch, no caption batch, no score.
  assert state["calls"] == 2
  meta = checkpointing.restore(workdir, checkpointing.LATEST)[1]
  assert meta["step"] == 6 and meta["pending_validation"] == 6
  assert checkpointing.latest_step(workdir, checkpointing.BEST) is None
  monkeypatch.undo()

  # Resuming first redoes the abandoned evaluation, then trains on to the end.
  results = train.train_and_evaluate(config, workdir)
  assert "1k" in results and checkpointing.latest_step(workdir, checkpointing.LATEST) == 12
  history = checkpointing.restore(workdir, checkpointing.LATEST)[1]["history"]
  assert [h["step"] for h in history] == [6, 12]
  assert _logged_steps(workdir) == list(range(1, 13))


def test_sigterm_between_steps_stops_after_the_current_step(minilm_dir, tmp_path,
                                                            monkeypatch):
  config = tiny_train_config(minilm_dir)
  workdir = str(tmp_path)
  # The signal arrives while step 3's batch is being put on the devices.
  state = _signal_on(monkeypatch, train, "global_batch", 3)
  out = train.train_and_evaluate(config, workdir)
  print(f"SIGTERM between steps: stopped {time.time() - state['t']:.2f}s after the signal")
  assert out == {"stopped_at": 3}
  assert checkpointing.latest_step(workdir, checkpointing.LATEST) == 3
  assert _logged_steps(workdir) == [1, 2, 3]


def test_time_based_checkpoint_comes_early(minilm_dir, tmp_path, monkeypatch):
  # The 12-step schedule of `trained_workdir` (stopped at 2): its train step, compiled
  # once for the session, comes from the compilation cache.
  config = tiny_train_config(minilm_dir)
  config.train.checkpoint_every = 1000
  config.train.eval_every = 1000
  config.train.checkpoint_every_s = 0.0  # every step is "late enough"
  saved = []
  real = checkpointing.save
  monkeypatch.setattr(checkpointing, "save",
                      lambda workdir, kind, step, *a, **k: (saved.append((kind, step)),
                                                            real(workdir, kind, step, *a, **k)))
  train.train_and_evaluate(config, str(tmp_path), stop_at=2)
  # The latest state is saved from step 1 on, long before checkpoint_every steps.
  assert [s for k, s in saved if k == checkpointing.LATEST] == [1, 2]


# slow: the default suite has the case, a NaN in train_ims.npy
# (test_reliability.py::test_nan_feature_stops_training_at_that_step_naming_the_images).
@pytest.mark.slow
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_names_the_images(minilm_dir, tmp_path, monkeypatch, bad):
  config = tiny_train_config(minilm_dir)
  workdir = str(tmp_path)
  real = train.global_batch

  def poisoned(batch, mesh):
    batch = dict(batch)
    if batch["image_index"][0] >= 0 and _poison["n"] == 2:
      batch["regions"] = batch["regions"].copy()
      batch["regions"][0] = bad
    _poison["n"] += 1
    return real(batch, mesh)

  _poison = {"n": 0}
  monkeypatch.setattr(train, "global_batch", poisoned)
  with pytest.raises(FloatingPointError, match=r"step 3: non-finite .* images synthetic-train"):
    train.train_and_evaluate(config, workdir)
  # No checkpoint was written after the bad step (none at all here: the first is at 6).
  assert checkpointing.latest_step(workdir, checkpointing.LATEST) is None

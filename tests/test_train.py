"""`train_and_evaluate` end to end on a tiny synthetic config with 8 fake CPU devices."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsran_jax import checkpointing, train
from conftest import tiny_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture
def run8(trained_workdir):
  return trained_workdir


def test_end_to_end_outputs(run8):
  workdir, results = run8
  assert jax.device_count() == 8
  for name in ("config.json", "metrics.jsonl", "eval_results.json", "ranks_test.npz"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with np.load(os.path.join(workdir, "ranks_test.npz")) as r:  # what figures are drawn from
    assert r["i2t"].shape == (10,) and r["t2i"].shape == (50,)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 13))
  assert all(np.isfinite(r["loss"]) and r["lr"] >= 0 for r in logged)
  assert logged[0]["lr"] == 0 and logged[5]["lr"] > 0  # BertAdam warmup starts at 0
  with open(os.path.join(workdir, "eval_results.json")) as f:
    saved = json.load(f)
  assert saved["num_images"] == 10 and saved["num_captions"] == 50
  assert 0 <= saved["1k"]["rsum"] <= 600 and saved == json.loads(json.dumps(results))
  assert checkpointing.latest_step(workdir, checkpointing.BEST) in (6, 12)


def test_one_device_gives_the_same_losses(run8, minilm_dir, tmp_path):
  workdir8, _ = run8
  mesh1 = train.make_mesh(jax.devices()[:1])
  # The first 4 steps of the same run, without its dev evaluations and checkpoints.
  config = tiny_train_config(minilm_dir)
  config.train.eval_every = config.train.checkpoint_every = 1000
  train.train_and_evaluate(config, str(tmp_path), mesh=mesh1, stop_at=4)
  l1 = losses(str(tmp_path))
  l8 = {k: v for k, v in losses(workdir8).items() if k in l1}
  assert sorted(l1) == [1, 2, 3, 4]
  # Step 1 sees identical parameters: the sharded step must agree to float precision.
  np.testing.assert_allclose(l1[1], l8[1], rtol=1e-6)
  # Later steps differ only through the order of cross-device sums, which BertAdam's
  # un-bias-corrected first updates amplify a little.
  np.testing.assert_allclose([l1[k] for k in sorted(l1)], [l8[k] for k in sorted(l8)],
                             rtol=2e-3)


def test_resume_replays_the_uninterrupted_run(run8, minilm_dir, tmp_path):
  workdir8, _ = run8
  workdir = str(tmp_path)
  assert train.train_and_evaluate(tiny_train_config(minilm_dir), workdir, stop_at=6) == {"stopped_at": 6}
  first_best = checkpointing.restore(workdir, checkpointing.BEST)[1]
  train.train_and_evaluate(tiny_train_config(minilm_dir), workdir)
  straight, resumed = losses(workdir8), losses(workdir)
  assert sorted(resumed) == sorted(straight)
  np.testing.assert_allclose([resumed[k] for k in sorted(resumed)],
                             [straight[k] for k in sorted(straight)], rtol=1e-5, atol=1e-6)
  # The best checkpoint and its score survived the restart; it moves only on improvement.
  best = checkpointing.restore(workdir, checkpointing.BEST)[1]
  assert best["rsum"] >= first_best["rsum"]
  if best["step"] == first_best["step"]:
    assert best == first_best


def test_mistyped_config_key_is_an_error():
  proc = subprocess.run(
      [sys.executable, "-m", "dsran_jax.main", "--config=configs/demo.py",
       "--workdir=/tmp/unused", "--config.train.batchsize=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "batchsize" in proc.stderr


@pytest.mark.parametrize("name,batch,epochs,lr_update,K,optimizer", [
    ("f30k", 128, 12, 6, 2, "bertadam"), ("coco", 320, 18, 9, 4, "bertadam"),
    ("f30k_gru", 128, 16, 8, 2, "adam"), ("coco_gru", 300, 18, 9, 2, "adam")])
def test_configs_hold_the_authors_recipes(name, batch, epochs, lr_update, K, optimizer):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert (c.train.batch_size, c.train.num_epochs, c.train.lr_update, c.model.dsran.K,
          c.train.optimizer, c.train.margin) == (batch, epochs, lr_update, K, optimizer, 0.2)
  assert c.eval.protocol == ("coco" if name.startswith("coco") else "1k")
  assert f"configs/{name}.py" in module.__doc__

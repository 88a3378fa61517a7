"""`Workdir`: the one owner of a run directory's files, its config.json and its model."""
import json
import os

import numpy as np
import pytest

from dsran_jax import evaluation, workdir as workdir_lib
from dsran_jax.default_config import get_base_config
from dsran_jax.evaluation import registry
from dsran_jax.workdir import ConfigFileError, Workdir


def test_config_round_trip_overrides_and_unknown_keys(tmp_path):
  wd = Workdir(tmp_path / "run")
  c = get_base_config()
  c.train.batch_size = 7
  wd.save_config(c)
  assert not [p for p in os.listdir(wd.path) if ".tmp" in p]  # written through a rename
  back = wd.load_config({"eval.batch_size": 3})
  assert back.train.batch_size == 7 and back.eval.batch_size == 3
  assert back.to_dict() == {**c.to_dict(), "eval": {**c.eval.to_dict(), "batch_size": 3}}
  with pytest.raises(ConfigFileError, match="unknown config key eval.nope"):
    wd.load_config({"eval.nope": 1})
  saved = json.loads(open(wd.config_file).read())
  saved["train"]["typo"] = 1
  open(wd.config_file, "w").write(json.dumps(saved))
  with pytest.raises(ConfigFileError, match=r"config\.json: unknown config key train\.typo"):
    wd.load_config()
  open(wd.config_file, "w").write("{not json")
  with pytest.raises(ConfigFileError, match="not a JSON config"):
    wd.load_config()
  with pytest.raises(FileNotFoundError, match="is .* a dsran_jax workdir"):
    Workdir(tmp_path / "empty").load_config()


def test_migrations_run_on_the_saved_dict(tmp_path, monkeypatch):
  wd = Workdir(tmp_path)
  c = get_base_config()
  wd.save_config(c)
  saved = json.loads(open(wd.config_file).read())
  saved["train"]["old_name"] = saved["train"].pop("margin")
  open(wd.config_file, "w").write(json.dumps(saved))

  def rename(d):
    if "old_name" in d["train"]:
      d["train"]["margin"] = d["train"].pop("old_name")
    return d

  monkeypatch.setattr(workdir_lib, "MIGRATIONS", [rename])
  assert wd.load_config().train.margin == c.train.margin


def test_every_file_name_comes_from_the_workdir(tmp_path):
  wd = Workdir(tmp_path)
  assert wd.ranks_file("test") == os.path.join(tmp_path, "ranks_test.npz")
  assert wd.sims_file("testall") == os.path.join(tmp_path, "sims_testall.npy")
  assert wd.gallery_file("test") == os.path.join(tmp_path, "gallery_test.npz")
  assert wd.index_file("test", "images", "ivf").endswith("gallery_test.images.ivf.faiss")
  c = get_base_config()
  assert wd.vocab_file(c) == os.path.join(tmp_path, "vocab.json")
  c.data.vocab_file = "~/v.json"
  assert wd.vocab_file(c) == os.path.expanduser("~/v.json")


def test_restore_and_a_registered_evaluator(trained_workdir, monkeypatch):
  """The one restore gives the trained model; an evaluator registered by a test runs in
  `evaluate_workdir` beside the retrieval protocol and writes its own section."""
  workdir, results = trained_workdir
  wd = Workdir(workdir)
  restored = wd.restore()
  assert restored.config.model.name == "dsran" and restored.meta["step"] > 0
  seen = {}

  def count_pairs(task):
    seen["split"] = task.split.name
    return registry.Outcome({}, sections={"pairs": task.split.num_images
                                          * task.split.num_captions})

  monkeypatch.setitem(registry._EVALUATORS, "pairs",  # pylint: disable=protected-access
                      (count_pairs, lambda config: True))
  out = evaluation.evaluate_workdir(workdir)
  assert seen["split"] == out["split"]
  assert out["pairs"] == out["num_images"] * out["num_captions"]
  written = json.loads(open(wd.eval_results_file).read())
  assert written["pairs"] == out["pairs"]
  # The retrieval evaluator ran too, and gives the same numbers as training's evaluation.
  for key in ("1k",):
    np.testing.assert_allclose(written[key]["rsum"], results[key]["rsum"], atol=1e-4)


def test_restore_names_every_mismatch(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  wd = Workdir(workdir)
  config = wd.load_config()
  config.model.embed_size = config.model.embed_size * 2
  with pytest.raises(ValueError, match="does not fit the model"):
    wd.restore(config)
  with pytest.raises(FileNotFoundError):
    Workdir(tmp_path).restore(config)

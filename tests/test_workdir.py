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


# ------------------------------------------------- config.json of an older layout


def _old_dsran_layout(saved: dict) -> dict:
  """`saved` as written before `model.dsran` existed: DSRAN's options were top-level
  `model.*` keys (`model.K`, `model.text_encoder`, `model.bert.*`, ...)."""
  model = dict(saved["model"])
  model.update(model.pop("dsran"))
  return {**saved, "model": model}


def test_an_old_layout_config_loads_with_dsran_s_keys_under_model_dsran(tmp_path):
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  from dsran_jax.models.dsran import config as dsran_config  # pylint: disable=g-import-not-at-top
  base = get_base_config()
  wd = Workdir(tmp_path)
  # Today's defaults, then non-default values, in the old layout.
  os.makedirs(wd.path, exist_ok=True)
  old = _old_dsran_layout(base.to_dict())
  assert "dsran" not in old["model"] and old["model"]["K"] == 2
  open(wd.config_file, "w").write(json.dumps(old))
  assert wd.load_config().to_dict() == base.to_dict()
  old["model"].update(K=4, text_encoder="gru", gat_heads=4)
  # (a BERT section load_config's rules accept: 64 wide with 4 heads)
  old["model"]["bert"] = {**old["model"]["bert"], "hidden_size": 64, "num_heads": 4}
  open(wd.config_file, "w").write(json.dumps(old))
  loaded = wd.load_config({"model.dsran.gat_layers": 2})
  d = loaded.model.dsran
  assert (d.K, d.text_encoder, d.gat_heads, d.gat_layers, d.bert.hidden_size) == (
      4, "gru", 4, 2, 64)
  assert "K" not in loaded.model and "text_encoder" not in loaded.model
  assert models.tokenizer_kind(loaded) == "vocab" and models.bert_path(loaded) == ""
  # The migration is the family's, listed by the registry, and idempotent.
  assert dsran_config.migrate in models.migrations()
  once = dsran_config.migrate(old)
  assert dsran_config.migrate(once) == once and once["model"]["dsran"]["K"] == 4
  assert dsran_config.migrate(base.to_dict()) == base.to_dict()
  # Another family never read them: defaults are dropped, nothing else is lost.
  scan = _old_dsran_layout(base.to_dict())
  scan["model"]["name"] = "scan"
  assert dsran_config.migrate(scan)["model"] == {
      k: v for k, v in base.to_dict()["model"].items() if k != "dsran"} | {"name": "scan"}
  scan["model"]["K"] = 4
  assert dsran_config.migrate(scan)["model"]["dsran"] == {"K": 4}


def test_an_old_layout_trained_workdir_restores_and_evaluates(trained_workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, results = trained_workdir
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  wd = Workdir(old)
  saved = json.loads(open(wd.config_file).read())
  open(wd.config_file, "w").write(json.dumps(_old_dsran_layout(saved)))
  config = wd.load_config()
  assert config.to_dict() == Workdir(workdir).load_config().to_dict()
  assert config.model.dsran.bert_random_init and config.model.dsran.bert.hidden_size == 16
  restored = wd.restore()
  assert restored.meta["step"] > 0
  out = evaluation.evaluate_workdir(str(old))
  np.testing.assert_allclose(out["1k"]["rsum"], results["1k"]["rsum"], atol=1e-4)


def test_every_evaluation_is_kept_and_the_latest_is_at_the_top(trained_workdir):
  """Two evaluations with other settings keep both results; the same settings again
  replace their own entry; the top-level files are the latest."""
  workdir, _ = trained_workdir
  wd = Workdir(workdir)
  before = {e["id"] for e in wd.read_evaluations()}
  first = evaluation.evaluate_workdir(workdir, save_sims=True)
  second = evaluation.evaluate_workdir(workdir, overrides={"data.max_len": 12})
  assert first["evaluation_id"] != second["evaluation_id"]
  for out in (first, second):
    kept = wd.evaluation_dir(out["evaluation_id"])
    with open(os.path.join(kept, "eval_results.json")) as f:
      assert json.load(f) == json.loads(json.dumps(out))
    assert os.path.exists(os.path.join(kept, f"ranks_{out['split']}.npz"))
  assert os.path.exists(os.path.join(wd.evaluation_dir(first["evaluation_id"]),
                                     f"sims_{first['split']}.npy"))
  with open(wd.eval_results_file) as f:
    assert json.load(f)["evaluation_id"] == second["evaluation_id"]
  ids = [e["id"] for e in wd.read_evaluations()]
  assert {first["evaluation_id"], second["evaluation_id"]} <= set(ids)
  again = evaluation.evaluate_workdir(workdir, save_sims=True)
  assert again["evaluation_id"] == first["evaluation_id"]
  assert sorted(e["id"] for e in wd.read_evaluations()) == sorted(set(ids) | before)
  with open(wd.eval_results_file) as f:
    assert json.load(f)["evaluation_id"] == first["evaluation_id"]

"""A bad config value, a mistyped key or a bad path given to `python -m dsran_jax.main`
fails within seconds with one `error:` line naming the key (no traceback, nothing run);
every key is declared once (`default_config.KEYS`), a second declaration is an error."""
import concurrent.futures
import os
import subprocess
import sys
import time

import pytest
from _xla_flags import subprocess_env

from dsran_jax import cli, default_config, models, validation
from dsran_jax import workdir as workdir_lib
from dsran_jax.workdir import Workdir
from dsran_jax.data import raw
from dsran_jax.default_config import ConfigError, Int, Key, Str

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each case fails before any data is read or anything compiled: seconds, even on a slow
# loaded machine (the bound leaves room for importing jax and TensorFlow there).
MAX_SECONDS = 60


def _main(args):
  """Runs `python -m dsran_jax.main ARGS`; returns (process, wall seconds)."""
  t = time.time()
  proc = subprocess.run([sys.executable, "-m", "dsran_jax.main", *args], cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300,
                        check=False)
  return proc, time.time() - t


def _eval_workdir(path) -> str:
  """A workdir holding only the config.json of the demo (as training writes it)."""
  config = default_config.get_base_config()
  config.data.format = "synthetic"
  Workdir(str(path)).save_config(config)
  return str(path)


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
  """{case: (args, expected text, process, seconds, workdir)}, run 3 at a time."""
  tmp = tmp_path_factory.mktemp("config_errors")
  evaluated = _eval_workdir(tmp / "evaluated")
  cases = {
      "log_every": (["--config.train.log_every=0"],
                    "config.train.log_every=0: must be an integer >= 1"),
      "checkpoint_every": (["--config.train.checkpoint_every=0"],
                           "config.train.checkpoint_every=0: must be an integer >= 1"),
      "batch_size": (["--config.train.batch_size=0"],
                     "config.train.batch_size=0: must be an integer >= 1"),
      "family_key": (["--config=configs/demo.py:scan", "--config.model.scan.cross_attn=bad"],
                     "config.model.scan.cross_attn='bad': expected one of"),
      "mistyped_key": (["--config.train.log_evry=3"],
                       "config.train.log_evry=3: unknown key (did you mean "
                       "config.train.log_every?)"),
      "missing_config_file": (["--config=configs/no_such_recipe.py"],
                              "configs/no_such_recipe.py"),
      "eval": (["--mode=eval", f"--workdir={evaluated}", "--config.eval.batch_size=0"],
               "config.eval.batch_size=0: must be an integer >= 1"),
      "eval_mistyped_key": (["--mode=eval", f"--workdir={evaluated}",
                             "--config.eval.bach_size=8"],
                            "config.eval.bach_size=8: unknown key (did you mean "
                            "config.eval.batch_size?)"),
  }

  def run(name):
    args, expected = cases[name]
    workdir = next((a.split("=", 1)[1] for a in args if a.startswith("--workdir=")), None)
    if workdir is None:  # train mode: a workdir that must not be created
      workdir = str(tmp / name)
      args = ([] if any(a.startswith("--config=") for a in args)
              else ["--config=configs/demo.py"]) + args + [f"--workdir={workdir}"]
    proc, seconds = _main(args)
    return name, (args, expected, proc, seconds, workdir)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return dict(pool.map(run, cases))


@pytest.mark.parametrize("case", ["log_every", "checkpoint_every", "batch_size",
                                  "family_key", "mistyped_key", "missing_config_file",
                                  "eval", "eval_mistyped_key"])
def test_main_reports_one_line_naming_the_key(failures, case):
  args, expected, proc, seconds, workdir = failures[case]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, (args, proc.stderr[-3000:])
  assert lines[0].startswith("error: ") and expected in lines[0], (expected, lines[0])
  assert seconds < MAX_SECONDS, f"{args} took {seconds:.0f} s to fail"
  assert proc.stdout == ""
  if "--mode=eval" not in args:
    assert not os.path.exists(workdir), "nothing may be written before the config is valid"


# ------------------------------------------------------------------ declarations


def test_a_key_declared_twice_is_refused():
  with pytest.raises(ValueError, match=r"config key 'train.log_every' is declared twice"):
    default_config.declare([Key("train.log_every", 100, Int(1), "steps between logs"),
                            Key("train.seed", 0, Int(0), "seed"),
                            Key("train.log_every", 10, Int(1), "again")])


def test_a_key_that_is_also_a_section_or_breaks_its_rule_is_refused():
  with pytest.raises(ValueError, match=r"'data.root.x' is inside 'data.root'"):
    default_config.declare([Key("data.root", "", Str(), "dir"),
                            Key("data.root.x", 1, Int(), "x")])
  with pytest.raises(ValueError, match=r"'data.root' is declared as a key but is already"):
    default_config.declare([Key("data.root.x", 1, Int(), "x"),
                            Key("data.root", "", Str(), "dir")])
  with pytest.raises(ValueError, match=r"'train.log_every': its default 0 breaks its own "
                                       r"rule \(must be an integer >= 1\)"):
    default_config.declare([Key("train.log_every", 0, Int(1), "steps between logs")])


def test_every_key_is_declared_once_with_its_default_rule_and_doc():
  c = default_config.get_base_config()
  families = set(c.model) - {k.split(".")[1] for k in default_config.KEYS
                             if k.startswith("model.")}
  leaves = dict(validation.flat_items(c))
  declared = {k for k in leaves if not (k.startswith("model.") and
                                        k.split(".")[1] in families)}
  assert declared == set(default_config.KEYS)
  for name, key in default_config.KEYS.items():
    assert key.name == name and key.doc.strip(), name
    assert leaves[name] == key.default and type(leaves[name]) is type(key.default), name
    assert key.rule(key.default) is None, name
  assert validation.RULES == {n: k.rule for n, k in default_config.KEYS.items()}
  assert not validation.unchecked_keys()


def test_family_options_live_in_their_own_section_only():
  """Every family with options declares them under `config.model.<family>` (DSRAN
  included); the table's top-level `model.*` keys are the shared ones, none of which a
  family declares again."""
  shared = {k.split(".")[1] for k in default_config.KEYS if k.startswith("model.")}
  assert shared == {"name", "dtype", "bf16_on_cpu", "embed_size", "img_dim", "word_dim",
                    "vocab_size", "glove_path"}
  for name in models.names():
    options = getattr(models.family_config(name), "OPTIONS", None)
    if options is None:
      continue
    assert options.section == name, name
    assert not set(options.keys) & shared, (name, set(options.keys) & shared)


# ------------------------------------------------------------------ messages


def test_config_error_on_one_line_lists_every_problem():
  c = default_config.get_base_config()
  c.data.format = "synthetic"
  c.train.log_every, c.eval.batch_size = 0, -1
  with pytest.raises(ConfigError) as e:
    validation.validate_config(c)
  assert e.value.problems == ["config.train.log_every=0: must be an integer >= 1",
                              "config.eval.batch_size=-1: must be an integer >= 1"]
  assert e.value.one_line() == "; ".join(e.value.problems)
  assert cli.error_message(e.value) == e.value.one_line()


def test_unknown_key_names_the_closest_key_or_the_section():
  assert validation.unknown_key("train.log_evry") == (
      "config.train.log_evry: unknown key (did you mean config.train.log_every?)")
  assert "did you mean config.train.log_every?" in validation.unknown_key("trian.log_every")
  text = validation.unknown_key("model.scan.zzz")
  assert text.startswith("config.model.scan.zzz: unknown key (config.model.scan has ")
  assert "cross_attn" in text


def test_user_errors_are_the_package_s_own_and_path_errors():
  assert cli.is_user_error(ConfigError("config.a=1: bad"))
  assert cli.is_user_error(raw.DataError("x.npy: truncated"))
  assert cli.is_user_error(FileNotFoundError("no such file: x"))
  for bug in (KeyError("x"), TypeError("x"), ValueError("x"), AttributeError("x")):
    assert not cli.is_user_error(bug), bug

  class Interrupted(Exception):  # control flow, not an error
    pass
  Interrupted.__module__ = "dsran_jax.evaluation.scorer"
  assert not cli.is_user_error(Interrupted())


def test_workdir_config_with_an_unknown_key_is_a_config_error(tmp_path):
  path = _eval_workdir(tmp_path)
  config_json = os.path.join(path, workdir_lib.CONFIG_FILE)
  with open(config_json) as f:
    text = f.read()
  with open(config_json, "w") as f:
    f.write(text.replace('"log_every"', '"log_evry"'))
  with pytest.raises(ConfigError, match=r"config.json: unknown config key train.log_evry"):
    Workdir(path).load_config()
  with pytest.raises(FileNotFoundError, match=r"is '.*nowhere' a dsran_jax workdir"):
    Workdir(str(tmp_path / "nowhere")).load_config()

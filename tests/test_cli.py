"""The CLIs: importable together (flags are defined only when run as a program), each
one's `--help` works, and each reports a user error as one line without a traceback."""
import concurrent.futures
import os
import subprocess
import sys

import pytest
from _xla_flags import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Module -> one of its flags.
CLIS = {
    "dsran_jax.extract": "--images",
    "dsran_jax.search": "--query",
    "dsran_jax.data.check": "--verify_manifest",
    "dsran_jax.data.tfds_builder": "--out_dir",
    "dsran_jax.tools.rank": "--sims",
    "dsran_jax.tools.convert_torch": "--checkpoint",
    "dsran_jax.tools.bench_two_stage": "--shortlist_workdir",
    "dsran_jax.main": "--workdir",
}


def _python(args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        env=subprocess_env(), cwd=REPO, timeout=300, check=False)


def test_all_clis_import_in_one_process():
  """No DuplicateFlagError (e.g. --workdir, --batch_size), and torch stays out."""
  code = "\n".join([f"import {m}" for m in CLIS] + [
      "import sys",
      "torch = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton'))",
      "assert not torch, torch",
      "print('ok')"])
  r = _python(["-c", code])
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("module", sorted(CLIS))
def test_cli_help(module):
  r = _python(["-m", module, "--help"])
  assert r.returncode == 0, r.stderr[-3000:]   # every tool alike (absl alone exits 1)
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert CLIS[module] in r.stdout, r.stdout[-3000:]


@pytest.mark.parametrize("workdir,what", [("/nonexistent/w", "no such directory"),
                                          ("EMPTY", "no config.json and no checkpoints")])
def test_eval_of_a_directory_that_is_no_workdir_says_how_to_make_one(tmp_path, workdir,
                                                                      what):
  workdir = str(tmp_path) if workdir == "EMPTY" else workdir
  r = _python(["-m", "dsran_jax.main", "--mode=eval", f"--workdir={workdir}",
               "--config=configs/demo.py"])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f"error: --workdir={workdir}: {what}"), lines[0]
  assert "convert_torch" in lines[0]


# Module -> (arguments that are a user's mistake, text the one error line must hold,
# exit status): a bad path, a bad config value or a mistyped key.
USER_ERRORS = {
    "dsran_jax.main": (["--config=configs/demo.py", "--config.data.mx_len=3",
                        "--workdir=/nonexistent/w"],
                       "config.data.mx_len=3: unknown key (did you mean "
                       "config.data.max_len?)", 2),
    "dsran_jax.extract": (["--images=/nonexistent/images", "--weights=/nonexistent/w.pth",
                           "--out=/nonexistent/out"], "/nonexistent/images", 2),
    "dsran_jax.search": (["--workdir=/nonexistent/w", "--query=a dog"],
                         "/nonexistent/w/config.json", 2),
    "dsran_jax.data.check": (["--config=configs/demo.py", "--config.data.max_len=2"],
                             "config.data.max_len=2: must be -1 (the family's rule), 0", 2),
    "dsran_jax.data.tfds_builder": (["--config=configs/demo.py", "--config.data.max_len=2",
                                     "--split=train", "--out_dir=/nonexistent/tfds"],
                                    "config.data.max_len=2: must be -1", 2),
    "dsran_jax.tools.rank": (["--sims=/nonexistent/sims.npy"], "/nonexistent/sims.npy", 1),
    "dsran_jax.tools.convert_torch": (["--checkpoint=/nonexistent/model_best.pth.tar",
                                       "--workdir=/nonexistent/w"],
                                      "/nonexistent/model_best.pth.tar", 2),
    "dsran_jax.tools.bench_two_stage": (["--workdir=/nonexistent/w",
                                         "--shortlist_workdir=/nonexistent/s"],
                                        "/nonexistent/w/config.json", 2),
    "dsran_jax.benchmark": (["--batch_size=0"],
                            "config.train.batch_size=0: must be an integer >= 1", 2),
}


@pytest.fixture(scope="module")
def user_error_runs():
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    runs = pool.map(lambda m: (m, _python(["-m", m, *USER_ERRORS[m][0]])), USER_ERRORS)
    return dict(runs)


@pytest.mark.parametrize("module", sorted(USER_ERRORS))
def test_cli_user_error_is_one_line(user_error_runs, module):
  """Every CLI reports a user error as one `error:` line naming the key or file, with
  no traceback (cli.run_cli)."""
  _, expected, code = USER_ERRORS[module]
  r = user_error_runs[module]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.returncode == code and len(lines) == 1, (r.returncode, r.stderr[-3000:])
  assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
  assert r.stdout == ""

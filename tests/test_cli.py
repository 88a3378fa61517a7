"""The absl CLIs: importable together (flags are defined only when run as a program) and
each one's `--help` works."""
import os
import subprocess
import sys

import pytest

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
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300, check=False)


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
  assert r.returncode in (0, 1), r.stderr[-3000:]  # absl exits 1 after --help
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert CLIS[module] in r.stdout, r.stdout[-3000:]

"""The Colab notebooks run top to bottom, headless on CPU, in smoke mode (DSRAN_SMOKE=1)."""
import os

import pytest
from _xla_flags import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")


def execute(name: str):
  """Runs colab/<name> in a fresh kernel; returns the executed notebook."""
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": COLAB}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on an error
  return nb


def errors(nb):
  return [(cell.source[:200], out.get("ename"), out.get("evalue"))
          for cell in nb.cells if cell.cell_type == "code"
          for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def text_of(nb):
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebooks_run_in_smoke_mode(tmp_path, monkeypatch, minilm_dir):
  del minilm_dir  # the demo config's tokenizer: skip where its package is missing
  workdir = str(tmp_path / "wd")
  monkeypatch.setenv("DSRAN_SMOKE", "1")
  # The second notebook restores what the first trained instead of training again.
  monkeypatch.setenv("DSRAN_WORKDIR", workdir)
  # One CPU device is enough for the kernel (the tests' 8 fake devices only slow it).
  monkeypatch.setenv("XLA_FLAGS", xla_flags())

  nb = execute("train_tpu.ipynb")
  assert not errors(nb)
  for name in ("eval_results.json", "metrics.jsonl", "training_curves.png",
               "recall_curves.png", "attention_map.png", "sims_test.npy"):
    assert os.path.exists(os.path.join(workdir, name)), name

  nb = execute("evaluate_and_search.ipynb")
  assert not errors(nb)
  out = text_of(nb)
  assert "10 images, 50 captions" in out  # the gallery of the smoke test split
  assert "ground truth:" in out and "synthetic-test-" in out


def test_notebooks_are_committed_clean():
  for name in ("train_tpu.ipynb", "evaluate_and_search.ipynb"):
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (name, cell.source[:80])


def test_a_wrong_repo_url_stops_at_the_clone_naming_it(tmp_path):
  """Outside a checkout the install cell clones REPO_URL; a wrong one is an error there,
  not a ModuleNotFoundError cells later."""
  nb = nbformat.read(os.path.join(COLAB, "train_tpu.ipynb"), as_version=4)
  cell = next(c for c in nb.cells
              if c.cell_type == "code" and c.source.startswith("REPO_URL"))
  cell.source = cell.source.replace(
      '"https://github.com/dsran-jax/dsran_jax.git"', repr(str(tmp_path / "no_repo.git"))
  ).replace('"/content/dsran_jax"', repr(str(tmp_path / "clone")))
  nb.cells = [nbformat.v4.new_code_cell("import os"), cell]
  client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="check REPO_URL"):
    client.execute()
  assert not (tmp_path / "clone").exists()

"""Issue 26, checksums: what is read back is what was written (docs/reliability.md).

One bit flipped (`^= 0x01`) in the middle of a file, or a file cut short: a checkpoint
is refused by evaluation, inference and resume (one line naming the step and the file),
and a resume falls back to the newest intact step; a damaged first-stage index or
gallery cache is rebuilt with a warning and searches as before, while an index or a
vocabulary the caller saved is refused naming it.
"""
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_train_config

from dsran_jax import checkpointing, cli, index, inference, integrity, search, train
from dsran_jax.core.vocab import Vocabulary
from dsran_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def absl_warnings(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


def flip_bit(path: str, offset=None) -> int:
  """`^= 0x01` on the middle byte of `path` (or at `offset`); returns the offset."""
  with open(path, "r+b") as f:
    size = f.seek(0, os.SEEK_END)
    offset = size // 2 if offset is None else offset
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x01]))
  return offset


def read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def largest_file(step_dir: str) -> str:
  files = [os.path.join(r, n) for r, _, names in os.walk(step_dir) for n in names]
  return max(files, key=os.path.getsize)


@pytest.fixture
def workdir(trained_workdir, tmp_path):
  """A private copy of the session's 12-step DSRAN run (latest 6 and 12 kept)."""
  path = str(tmp_path / "w")
  shutil.copytree(trained_workdir[0], path)
  return path


def run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dsran_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def error_lines(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------ checkpoints


def _state(seed, n=64):
  return {"params": {"w": jax.random.normal(jax.random.PRNGKey(seed), (n, n))},
          "batch_stats": {}}


def test_every_step_lists_its_files_and_a_flipped_bit_is_refused(tmp_path):
  w = str(tmp_path)
  checkpointing.save(w, "best", 2, _state(2), {"step": 2})
  d = checkpointing.step_dir(w, "best", 2)
  listing = integrity.read_sealed_json(os.path.join(d, checkpointing.CHECKSUMS_FILE), True)
  assert listing["algorithm"] == "sha256"
  big = largest_file(os.path.join(d, "state"))
  assert os.path.relpath(big, d) in listing["files"]
  assert checkpointing.verify_step(w, "best", 2)
  flip_bit(big)
  with pytest.raises(checkpointing.CheckpointIntegrityError) as e:
    checkpointing.load_variables(w)
  msg = str(e.value)
  assert "\n" not in msg and "'best' step 2" in msg and big in msg and "sha256" in msg


def test_flipped_bit_in_best_is_refused_by_eval_and_by_inference(workdir):
  best = checkpointing.latest_step(workdir, "best")
  big = largest_file(checkpointing.step_dir(workdir, "best", best))
  flip_bit(big)
  with pytest.raises(checkpointing.CheckpointIntegrityError, match=f"step {best}"):
    inference.load(workdir)
  results = read_text(Workdir(workdir).eval_results_file)
  lines = error_lines(run_main(f"--workdir={workdir}", "--mode=eval", "--nofigures"))
  assert len(lines) == 1, lines
  assert f"checkpoint 'best' step {best} is damaged: {big}: sha256 differs" in lines[0]
  assert read_text(Workdir(workdir).eval_results_file) == results  # nothing evaluated


def test_truncated_checkpoint_file_is_one_line(workdir):
  # The CLI prints a user error's message as its one `error:` line (the eval test above).
  best = checkpointing.latest_step(workdir, "best")
  big = largest_file(checkpointing.step_dir(workdir, "best", best))
  size = os.path.getsize(big)
  os.truncate(big, size // 2)
  with pytest.raises(checkpointing.CheckpointIntegrityError) as e:
    Workdir(workdir).restore()
  assert cli.is_user_error(e.value)
  assert cli.error_message(e.value) == (
      f"checkpoint 'best' step {best} is damaged: {big}: truncated: {size // 2} of the "
      f"{size} bytes written")
  os.remove(big)
  with pytest.raises(checkpointing.CheckpointIntegrityError, match=f"{big}: missing$"):
    Workdir(workdir).restore()


def test_damaged_step_without_checksums_is_one_line_too(tmp_path):
  # A step written before checksums were: orbax's error, cut to one line naming the step.
  w = str(tmp_path)
  checkpointing.save(w, "best", 3, _state(3, 512), {"step": 3})
  d = checkpointing.step_dir(w, "best", 3)
  os.remove(os.path.join(d, checkpointing.CHECKSUMS_FILE))
  big = largest_file(os.path.join(d, "state"))
  os.truncate(big, os.path.getsize(big) // 2)
  with pytest.raises(checkpointing.CheckpointReadError) as e:
    checkpointing.load_variables(w)
  assert "\n" not in str(e.value) and str(e.value).startswith(
      f"cannot read checkpoint 'best' step 3 in {d}: ")
  os.remove(big)
  with pytest.raises(checkpointing.CheckpointReadError, match="step 3"):
    checkpointing.load_variables(w)


def test_resume_falls_back_to_the_previous_intact_latest_step(workdir, minilm_dir,
                                                             absl_warnings):
  assert checkpointing.all_steps(workdir, "latest") == [6, 12]
  big = largest_file(checkpointing.step_dir(workdir, "latest", 12))
  flip_bit(big)
  config = tiny_train_config(minilm_dir)
  # Stopping at step 7 is only possible when the run resumed before it.
  out = train.train_and_evaluate(config, workdir, stop_at=7)
  assert out == {"stopped_at": 7}
  fallback = [r.getMessage() for r in absl_warnings.records if "resuming from" in
              r.getMessage()]
  assert len(fallback) == 1 and "\n" not in fallback[0]
  assert (f"checkpoint 'latest' step 12 is damaged: {big}: sha256 differs" in fallback[0]
          and "resuming from step 6, the newest intact step" in fallback[0])
  assert checkpointing.all_steps(workdir, "latest") == [6, 7]


def test_resume_refuses_a_damaged_best_and_falls_back_past_it(tmp_path, absl_warnings):
  w = str(tmp_path)
  template = _state(0)
  checkpointing.save(w, "best", 2, _state(2), {"step": 2})
  checkpointing.save(w, "latest", 2, _state(20), {"step": 2, "best": {"step": 2}})
  checkpointing.save(w, "best", 4, _state(4), {"step": 4})
  checkpointing.save(w, "latest", 4, _state(40), {"step": 4, "best": {"step": 4}})
  checkpointing.save(w, "latest", 6, _state(60), {"step": 6, "best": {"step": 4}})
  assert checkpointing.all_steps(w, "latest") == [4, 6]
  assert checkpointing.all_steps(w, "best") == [4]   # what latest 4 and 6 record
  checkpointing.save(w, "best", 8, _state(8), {"step": 8})
  checkpointing.save(w, "latest", 8, _state(80), {"step": 8, "best": {"step": 8}})
  assert checkpointing.all_steps(w, "best") == [4, 8]  # latest 6 records best 4
  big = largest_file(checkpointing.step_dir(w, "best", 8))
  flip_bit(big)
  state, meta = checkpointing.restore_for_resume(w, template)
  assert meta["step"] == 6
  np.testing.assert_array_equal(state["params"]["w"], _state(60)["params"]["w"])
  assert f"checkpoint 'best' step 8 is damaged: {big}" in absl_warnings.text
  assert "resuming from step 6" in absl_warnings.text
  # With no intact step left, the resume stops with one line naming the damage.
  flip_bit(largest_file(checkpointing.step_dir(w, "latest", 6)))
  with pytest.raises(checkpointing.CheckpointIntegrityError) as e:
    checkpointing.restore_for_resume(w, template)
  assert "\n" not in str(e.value) and "no intact checkpoint to resume from" in str(e.value)
  assert "'latest' step 6 is damaged" in str(e.value)


# ------------------------------------------------------------ indexes, caches, vocab


class _DotMatcher:
  """Scores by inner product, as an embedding model does (no jax needed)."""

  def score(self, image_reps, text_reps):
    return np.asarray(image_reps) @ np.asarray(text_reps).T


def _gallery(tmp_path, seed=0, n=40, dim=16):
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((n, dim)).astype(np.float32)
  txt = rng.standard_normal((2 * n, dim)).astype(np.float32)
  return search.Gallery("test", [str(i) for i in range(n)], [f"c{i}" for i in range(2 * n)],
                        2, img, txt, encoder=_DotMatcher(), workdir=str(tmp_path),
                        fingerprint={"step": 1})


def test_flipped_bit_in_a_saved_index_rebuilds_the_cache_and_refuses_a_user_file(
    tmp_path, absl_warnings):
  pytest.importorskip("faiss")
  gallery = _gallery(tmp_path)
  queries = gallery.text_reps[:10]
  want = gallery.index("images").search(queries, 5)
  path = search.index_path(str(tmp_path), "test", "images", "exact")
  assert os.path.exists(path)
  # An exponent bit of a stored embedding, as in the issue.
  flip_bit(path, os.path.getsize(path) - 4 * gallery.num_images + 3)
  with pytest.raises(index.DamagedIndexError, match=f"index {path}: sha256 differs"):
    index.load(path)   # an index the caller saved and loads itself: refused
  again = _gallery(tmp_path).index("images")   # search's cache: rebuilt, with a warning
  assert f"index {path}: sha256 differs" in absl_warnings.text
  assert "rebuilding it" in absl_warnings.text
  for got, exp in zip(again.search(queries, 5), want):
    np.testing.assert_array_equal(got, exp)
  assert index.load(path).search(queries, 5)[1].tolist() == want[1].tolist()  # rewritten


def test_flipped_bit_in_an_index_description_is_caught(tmp_path):
  items = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
  built = index.build(items, "exact", backend="numpy", verbose=False)
  path = str(tmp_path / "x.faiss")
  built.save(path)
  text = read_text(path + ".json")
  at = text.index('"num_items": 30') + len('"num_items": 3')   # 30 -> 31
  flip_bit(path + ".json", at)
  with pytest.raises(index.DamagedIndexError, match=r"x\.faiss\.json: its content differs"):
    index.load(path, items=items)


def test_flipped_bit_in_the_gallery_cache_is_rebuilt_with_a_warning(tmp_path,
                                                                   absl_warnings):
  gallery = _gallery(tmp_path)
  path = str(tmp_path / "gallery_test.npz")
  search._write_cache(path, gallery.image_reps, gallery.text_reps, {"step": 1})
  got = search._read_cache(path, {"step": 1})
  np.testing.assert_array_equal(got[0], gallery.image_reps)
  flip_bit(path)
  assert search._read_cache(path, {"step": 1}) is None
  assert f"gallery cache {path} is damaged" in absl_warnings.text


def test_flipped_bit_in_vocab_json_is_refused_naming_it(tmp_path):
  path = str(tmp_path / "vocab.json")
  Vocabulary.build(["a dog runs", "a cat sits", "a dog sits"] * 4).save(path)
  assert len(Vocabulary.load(path)) == 9
  text = read_text(path)
  flip_bit(path, text.index('"dog"') + 1)   # "dog" -> "eog"
  with pytest.raises(integrity.IntegrityError, match=f"{path}: its content differs"):
    Vocabulary.load(path)


def test_flipped_bit_in_a_data_manifest_blames_the_manifest(tmp_path):
  from dsran_jax.data import check  # pylint: disable=g-import-not-at-top
  root = tmp_path / "data"
  root.mkdir()
  np.save(root / "train_ims.npy", np.zeros((2, 3), np.float32))
  path = str(tmp_path / "manifest.json")
  check.write_manifest(str(root), path)
  assert check.verify_manifest(str(root), path) == []
  text = read_text(path)
  flip_bit(path, text.index('"sha256": "') + len('"sha256": "') + 5)
  # Not "train_ims.npy: sha256 differs": the data is intact, the manifest is not.
  with pytest.raises(integrity.IntegrityError, match=f"{path}: its content differs"):
    check.verify_manifest(str(root), path)

"""Gallery search (`dsran_jax.search`) and the evaluation figures on a tiny trained workdir."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsran_jax import figures, inference, search
from dsran_jax.models.dsran import attention as dsran_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(trained_workdir):
  return trained_workdir[0]


@pytest.fixture(scope="module")
def encoder(workdir):
  return inference.load(workdir)


def run_cli(workdir, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "dsran_jax.search", f"--workdir={workdir}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def hits_of(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines()]


def test_cli_text_to_image_and_cache(workdir):
  cache = search.cache_path(workdir, "test")
  if os.path.exists(cache):  # drawn by a hook after training: start from scratch
    os.remove(cache)
  hits = hits_of(run_cli(workdir, "--query=a red dog on the beach", "--top_k=3"))
  assert len(hits) == 3
  assert [h["rank"] for h in hits] == [1, 2, 3]
  scores = [h["score"] for h in hits]
  assert scores == sorted(scores, reverse=True)
  for h in hits:
    assert set(h) >= {"rank", "image_id", "score", "captions"}
    assert h["image_id"].startswith("synthetic-test-") and len(h["captions"]) == 5
  assert os.path.exists(cache)
  mtime = os.stat(cache).st_mtime_ns

  # Image -> text reuses the cache (not rewritten) and says so.
  proc = run_cli(workdir, "--image_id=synthetic-test-000003", "--top_k=4")
  hits = hits_of(proc)
  assert "cached" in proc.stderr
  assert os.stat(cache).st_mtime_ns == mtime
  assert len(hits) == 4
  assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
  for h in hits:
    assert set(h) >= {"rank", "caption", "score", "image_id"}


def test_cli_unknown_image_id(workdir):
  proc = run_cli(workdir, "--image_id=no-such-image")
  assert proc.returncode != 0
  assert proc.stdout == ""
  assert "no-such-image" in proc.stderr and "synthetic-test-000000" in proc.stderr


def test_gallery_api_matches_evaluation_and_rebuilds_stale_cache(workdir, encoder):
  enc = encoder
  gallery = search.Gallery.load(workdir, encoder=enc)
  assert gallery.num_images == 10 and gallery.num_captions == 50
  # The gallery's sims are the evaluation's: the same recall as eval_results.json.
  with open(os.path.join(workdir, "eval_results.json")) as f:
    want = json.load(f)["1k"]
  from dsran_jax import ranking
  got = ranking.recall_metrics(*ranking.ranks(gallery.sims(), 5))
  assert got["rsum"] == pytest.approx(want["rsum"], abs=1e-3)

  # Text -> image ranks images by the query's dot product with them.
  hits = search.search_text(gallery, "a red dog on the beach", top_k=10)
  q = enc.encode_texts(["a red dog on the beach"])[0]
  want_order = np.argsort(-(gallery.image_reps @ q), kind="stable")
  assert [h["image_id"] for h in hits] == [gallery.image_ids[i] for i in want_order]
  # Image -> text: a caption's image_id is its own image's.
  hits = search.search_image(gallery, gallery.image_ids[2], top_k=50)
  assert len(hits) == 50
  assert sorted(h["caption"] for h in hits) == sorted(gallery.texts)
  assert all(h["caption"] in gallery.captions_of(gallery.index_of(h["image_id"]))
             for h in hits)
  with pytest.raises(search.UnknownImageError, match="nope"):
    search.search_image(gallery, "nope")
  assert hits[0]["caption"] in search.format_hits(hits[:2])

  # A cache written for another checkpoint is stale: rebuilt, not served.
  path = search.cache_path(workdir, "test")
  with np.load(path) as f:
    arrays = dict(f)
  fp = json.loads(str(arrays["fingerprint"]))
  fp["checkpoint_step"] = -1
  np.savez(path, image=arrays["image"] * 0, text=arrays["text"] * 0,
           fingerprint=np.asarray(json.dumps(fp)))
  again = search.Gallery.load(workdir, encoder=enc)
  assert not again.from_cache
  np.testing.assert_allclose(again.image_reps, gallery.image_reps, atol=1e-6)
  assert search.Gallery.load(workdir, encoder=enc).from_cache


def test_evaluation_figures(workdir, encoder):
  paths = figures.evaluation_figures(workdir, encoder=encoder)
  assert set(paths) == {"training_curves", "recall_curves", "attention_map"}
  for p in paths.values():
    assert os.path.getsize(p) > 10_000 and p.startswith(workdir)
  from dsran_jax import data
  split = data.load_split(encoder.config, "test", workdir)
  att = dsran_attention.jsr_attention(encoder.model, encoder.variables, split.images(np.arange(3)))
  total = att["grid"].sum(1) + att["regions"].sum(1)
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  assert att["grid"].shape == (3, 49) and att["regions"].shape == (3, 4)

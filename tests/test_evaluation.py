"""The scorer-based evaluation engine against `ranking.evaluate_sims` on full matrices."""
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax import evaluation, ranking


def _batches(x, batch_size, index_key):
  """Eval batches as the data pipeline makes them: the last one padded, with `valid`."""
  n = x.shape[0]
  for o in range(0, n, batch_size):
    chunk = x[o:o + batch_size]
    pad = batch_size - chunk.shape[0]
    valid = np.arange(batch_size) < chunk.shape[0]
    idx = np.arange(o, o + batch_size, dtype=np.int32)
    yield {"feat": np.concatenate([chunk, np.full((pad,) + x.shape[1:], 7.0, x.dtype)]),
           "valid": valid, index_key: np.where(valid, idx, 0)}


def _normed(rng, n, e):
  x = rng.standard_normal((n, e)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _world(seed, n_img, e=16):
  rng = np.random.default_rng(seed)
  img = _normed(rng, n_img, e)
  cap = np.repeat(img, 5, axis=0) + 0.9 * rng.standard_normal((5 * n_img, e)).astype(
      np.float32)
  cap /= np.linalg.norm(cap, axis=1, keepdims=True)
  return img, cap


def _scorer():
  f = lambda b: jnp.asarray(b["feat"]) * 1.0   # a jax "model": identity embedding
  return evaluation.EmbeddingScorer(f, f)


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_evaluate_1k_matches_evaluate_sims(tmp_path, chunk_size):
  img, cap = _world(0, 23)
  path = tmp_path / "sims.npy"
  res = evaluation.evaluate(_scorer(), _batches(img, 4, "image_index"),
                            _batches(cap, 16, "caption_index"), protocol="1k",
                            chunk_size=chunk_size, sims_path=str(path))
  assert list(res) == ["1k"]
  saved = np.load(path)
  assert saved.dtype == np.float32 and saved.shape == (23, 115)
  assert not list(tmp_path.glob("*partial*"))
  np.testing.assert_allclose(saved, img @ cap.T, atol=1e-5)
  assert res["1k"] == ranking.evaluate_sims(saved)
  # Same ranking as the directly computed matrix (no near-ties in this draw).
  assert res["1k"] == ranking.evaluate_sims(img @ cap.T)
  assert 0 < res["1k"]["rsum"] <= 600


def test_evaluate_coco_protocol_without_saving():
  img, cap = _world(1, 40)
  res = evaluation.evaluate(_scorer(), _batches(img, 6, "image_index"),
                            _batches(cap, 32, "caption_index"), protocol="coco",
                            chunk_size=3)
  sims = img @ cap.T
  assert list(res) == ["coco5k", "coco1k"]
  assert res["coco5k"] == ranking.evaluate_sims(sims)
  want = ranking.evaluate_sims(sims, fold5=True)
  for k in ranking.METRIC_KEYS:
    assert res["coco1k"][k] == pytest.approx(want[k])
  table = evaluation.format_table(res)
  assert "COCO 5K" in table and "COCO 1K" in table and "rsum" in table
  assert "20 img" in evaluation.format_table({"1k": res["coco5k"]}, num_images=20)
  assert f"{res['coco5k']['rsum']:.1f}" in table


class _IntScorer(evaluation.Scorer):
  """Token-level reps and a max-over-tokens score with exact small-integer values (many
  exact ties), standing in for a cross-attention scorer."""

  def encode_images(self, batch):
    return {"tok": batch["feat"], "n": batch["feat"].sum(axis=(1, 2))}

  def encode_texts(self, batch):
    return batch["feat"]

  def score(self, image_reps, text_reps):
    s = np.einsum("itd,jsd->ijts", image_reps["tok"], text_reps).max(axis=(2, 3))
    return s + 0 * image_reps["n"][:, None]


def test_pytree_scorer_with_exact_ties(tmp_path):
  rng = np.random.default_rng(2)
  img = rng.integers(-1, 2, size=(15, 3, 4)).astype(np.float32)
  cap = rng.integers(-1, 2, size=(75, 2, 4)).astype(np.float32)
  sims = np.einsum("itd,jsd->ijts", img, cap).max(axis=(2, 3))
  assert len(np.unique(sims)) < 10   # heavy ties: index tie-breaking is exercised
  path = tmp_path / "int_sims"
  res = evaluation.evaluate(_IntScorer(), _batches(img, 4, "image_index"),
                            _batches(cap, 8, "caption_index"), protocol="coco",
                            chunk_size=4, sims_path=str(path))
  np.testing.assert_array_equal(np.load(str(path) + ".npy"), sims)
  assert res["coco5k"] == ranking.evaluate_sims(sims)
  want = ranking.evaluate_sims(sims, fold5=True)
  for k in ranking.METRIC_KEYS:
    assert res["coco1k"][k] == pytest.approx(want[k])


def test_encode_all_drops_padding_and_keeps_pytrees():
  x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
  out = evaluation.encode_all(lambda b: {"a": b["feat"], "b": b["feat"][:, 0]},
                              _batches(x, 4, "image_index"), desc="test")
  np.testing.assert_array_equal(out["a"], x)
  np.testing.assert_array_equal(out["b"], x[:, 0])
  with pytest.raises(ValueError, match="no batches"):
    evaluation.encode_all(lambda b: b, iter([]))


def test_compute_sims_blocks_cover_matrix():
  img, cap = _world(3, 10)
  blocks = list(evaluation.compute_sims_blocks(_scorer(), img, cap, chunk_size=4))
  assert [o for o, _ in blocks] == [0, 4, 8]
  assert [b.shape for _, b in blocks] == [(4, 50), (4, 50), (2, 50)]
  np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), img @ cap.T,
                             atol=1e-5)


def test_evaluate_errors():
  img, cap = _world(4, 12)
  with pytest.raises(ValueError, match="5 captions per image"):
    evaluation.evaluate(_scorer(), _batches(img, 4, "i"), _batches(cap[:-5], 8, "c"))
  with pytest.raises(ValueError, match="divisible by 5"):
    evaluation.evaluate(_scorer(), _batches(img, 4, "i"), _batches(cap, 8, "c"),
                        protocol="coco")
  with pytest.raises(ValueError, match="protocol"):
    evaluation.evaluate(_scorer(), [], [], protocol="5k")


def test_failed_evaluation_leaves_no_sims_file(tmp_path):
  class Broken(_IntScorer):
    calls = 0

    def score(self, image_reps, text_reps):
      Broken.calls += 1
      if Broken.calls == 2:
        raise RuntimeError("scorer failed")
      return super().score(image_reps, text_reps)

  img = np.ones((10, 2, 3), np.float32)
  cap = np.ones((50, 2, 3), np.float32)
  with pytest.raises(RuntimeError, match="scorer failed"):
    evaluation.evaluate(Broken(), _batches(img, 4, "i"), _batches(cap, 8, "c"),
                        chunk_size=4, sims_path=str(tmp_path / "s.npy"))
  assert list(tmp_path.iterdir()) == []

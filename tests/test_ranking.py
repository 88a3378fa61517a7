"""The numpy retrieval protocol against brute-force stable argsorts."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dsran_jax import ranking


# ---- brute-force references (a stable descending argsort per row / column) ----

def _order(x):
  return np.argsort(-np.asarray(x, np.float64), kind="stable")


def _brute_i2t(sims, cpi=5):
  out = []
  for i, row in enumerate(sims):
    pos = np.empty(row.shape[0], int)
    pos[_order(row)] = np.arange(row.shape[0])
    out.append(pos[i * cpi:(i + 1) * cpi].min())
  return np.array(out)


def _brute_t2i(sims, cpi=5):
  out = []
  for c in range(sims.shape[1]):
    out.append(int(np.flatnonzero(_order(sims[:, c]) == c // cpi)[0]))
  return np.array(out)


def _brute_rerank(sims, k1=15):
  """The authors' `i2t_rerank` with stable sorts: the full re-ranked lists (N, N_cap)."""
  n_img, n_cap = sims.shape
  sort_i2t = np.stack([_order(r) for r in sims])
  sort_t2i = np.stack([_order(c) for c in sims.T], axis=1)
  for i in range(n_img):
    top = sort_i2t[i, :k1].copy()
    address = [int(np.flatnonzero(sort_t2i[:, t] == i)[0]) for t in top]
    sort_i2t[i, :k1] = top[np.argsort(address, kind="stable")]
  return sort_i2t


def _brute_rerank_i2t(sims, cpi=5, k1=15):
  """The authors' `i2t_rerank` + `acc_i2t2` (best positive position), stable sorts."""
  full = _brute_rerank(sims, k1)
  return np.array([min(int(np.flatnonzero(row == c)[0]) for c in range(i * cpi, (i + 1) * cpi))
                   for i, row in enumerate(full)])


def _tied_sims(rng, n_img, cpi=5, levels=7):
  """Scores from a few levels (many exact ties), plus a bias towards positives."""
  s = rng.integers(0, levels, size=(n_img, cpi * n_img)).astype(np.float32)
  s[np.arange(cpi * n_img) // cpi, np.arange(cpi * n_img)] += rng.integers(
      0, 3, size=cpi * n_img)
  return s


def _gauss_sims(rng, n_img, cpi=5):
  s = rng.standard_normal((n_img, cpi * n_img)).astype(np.float32)
  s[np.arange(cpi * n_img) // cpi, np.arange(cpi * n_img)] += 1.5
  return s


@pytest.mark.parametrize("make", [_tied_sims, _gauss_sims])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_ranks_match_stable_argsort(make, chunk):
  rng = np.random.default_rng(chunk)
  sims = make(rng, 37)
  want_i2t, want_t2i = _brute_i2t(sims), _brute_t2i(sims)
  np.testing.assert_array_equal(ranking.i2t_ranks(sims, chunk_size=chunk), want_i2t)
  np.testing.assert_array_equal(ranking.t2i_ranks(sims, chunk_size=chunk), want_t2i)
  r_i2t, r_t2i = ranking.ranks(sims, chunk_size=chunk)
  np.testing.assert_array_equal(r_i2t, want_i2t)
  np.testing.assert_array_equal(r_t2i, want_t2i)


def test_all_equal_scores_rank_by_index():
  sims = np.zeros((6, 30), np.float32)
  # Row i: captions 0..5i-1 come first -> best positive rank 5i.
  np.testing.assert_array_equal(ranking.i2t_ranks(sims), 5 * np.arange(6))
  np.testing.assert_array_equal(ranking.t2i_ranks(sims), np.arange(30) // 5)


def test_other_captions_per_image():
  rng = np.random.default_rng(3)
  sims = _tied_sims(rng, 11, cpi=3, levels=4)
  np.testing.assert_array_equal(ranking.i2t_ranks(sims, 3, chunk_size=4),
                                _brute_i2t(sims, 3))
  np.testing.assert_array_equal(ranking.t2i_ranks(sims, 3, chunk_size=4),
                                _brute_t2i(sims, 3))


def test_integer_sims():
  rng = np.random.default_rng(11)
  sims = _tied_sims(rng, 20)
  as_int = sims.astype(np.uint8)
  assert ranking.evaluate_sims(as_int, rerank=True) == ranking.evaluate_sims(sims, rerank=True)


def test_nan_or_inf_anywhere_is_an_error_saying_how_many_and_where():
  # A NaN negative used to rank below every number, inflating the recalls silently.
  rng = np.random.default_rng(4)
  sims = _gauss_sims(rng, 8)
  sims[0, 7] = np.nan
  sims[3, 0] = np.inf
  for fn in (ranking.i2t_ranks, ranking.t2i_ranks, ranking.ranks, ranking.evaluate_sims,
             lambda s: ranking.evaluate_sims(s, rerank=True)):
    with pytest.raises(ranking.NonFiniteScoresError,
                       match=r"2 non-finite scores \(1 NaN, 1 \+Inf\) in 2 of 8 image rows, "
                             r"first at image 0 caption 7 \(nan\); image 3 caption 0 \(inf\)"):
      fn(sims)
  sims[2, 11] = np.nan   # a positive pair
  with pytest.raises(ValueError, match="NaN"):
    ranking.i2t_ranks(sims)


def test_shape_errors():
  with pytest.raises(ValueError, match="5 \\* 4 = 20"):
    ranking.i2t_ranks(np.zeros((4, 19)))
  with pytest.raises(ValueError, match="2-D"):
    ranking.t2i_ranks(np.zeros((4, 20, 1)))


@pytest.mark.parametrize("make", [_tied_sims, _gauss_sims])
def test_accumulator_two_passes_any_order(make, monkeypatch):
  monkeypatch.setattr(ranking, "KERNEL_ROWS", 3)   # blocks are cut into kernel pieces
  rng = np.random.default_rng(5)
  sims = make(rng, 29)
  want = (_brute_i2t(sims), _brute_t2i(sims))
  edges = [0, 3, 4, 11, 20, 29]
  blocks = [(a, sims[a:b]) for a, b in zip(edges[:-1], edges[1:])]
  acc = ranking.RankAccumulator(29)
  for i in rng.permutation(len(blocks)):
    acc.add(*blocks[i])
  assert acc.positives_known and not acc.complete
  with pytest.raises(ValueError, match="second pass"):
    acc.ranks()
  for i in rng.permutation(len(blocks)):
    acc.add(*blocks[i])
  assert acc.complete
  for got, w in zip(acc.ranks(), want):
    np.testing.assert_array_equal(got, w)
  # Re-adding is a no-op (rows are never counted twice).
  acc.add(*blocks[0])
  np.testing.assert_array_equal(acc.ranks()[1], want[1])
  # Overlapping blocks in the second pass count each row once.
  acc = ranking.RankAccumulator(29)
  for o in (0, 10, 20):
    acc.add(o, sims[o:o + 10])
  acc.add(5, sims[5:25])
  assert not acc.complete and not acc.needs_rows(20, 9) and acc.needs_rows(0, 1)
  acc.add(0, sims)
  for got, w in zip(acc.ranks(), want):
    np.testing.assert_array_equal(got, w)


def test_accumulator_one_pass_cases():
  rng = np.random.default_rng(6)
  sims = _tied_sims(rng, 13)
  want = (_brute_i2t(sims), _brute_t2i(sims))
  whole = ranking.RankAccumulator(13)      # one block = the whole matrix
  whole.add(0, sims)
  known = ranking.RankAccumulator(13, positive_scores=ranking.positive_scores(sims))
  for o in (10, 0, 5):
    known.add(o, sims[o:o + 5])
  for acc in (whole, known):
    assert acc.complete
    for got, w in zip(acc.ranks(), want):
      np.testing.assert_array_equal(got, w)
  with pytest.raises(ValueError, match="outside"):
    known.add(12, sims[:2])
  with pytest.raises(ValueError, match="never added"):
    ranking.RankAccumulator(13).ranks()


def test_recall_metrics_values():
  i2t = np.array([0, 1, 4, 5, 9, 10, 100, 0])
  t2i = np.array([0, 0, 2, 3])
  m = ranking.recall_metrics(i2t, t2i)
  assert list(m) == list(ranking.METRIC_KEYS)
  assert all(type(v) is float for v in m.values())
  assert m["r1_i2t"] == 25.0 and m["r5_i2t"] == 50.0 and m["r10_i2t"] == 75.0
  assert m["medr_i2t"] == np.floor(np.median(i2t)) + 1 == 5.0
  assert m["meanr_i2t"] == pytest.approx(i2t.mean() + 1)
  assert m["r1_t2i"] == 50.0 and m["r5_t2i"] == 100.0 and m["medr_t2i"] == 2.0
  assert m["rsum"] == pytest.approx(25 + 50 + 75 + 50 + 100 + 100)


def test_fold5_is_mean_over_sequential_folds():
  rng = np.random.default_rng(7)
  sims = _gauss_sims(rng, 40)
  got = ranking.evaluate_sims(sims, fold5=True, chunk_size=3)
  folds = []
  for f in range(5):
    sub = sims[8 * f:8 * (f + 1), 40 * f:40 * (f + 1)]
    folds.append(ranking.recall_metrics(_brute_i2t(sub), _brute_t2i(sub)))
  for k in ranking.METRIC_KEYS:
    assert got[k] == pytest.approx(np.mean([m[k] for m in folds]))
  full = ranking.evaluate_sims(sims)
  assert full == ranking.recall_metrics(_brute_i2t(sims), _brute_t2i(sims))
  with pytest.raises(ValueError, match="divisible by 5"):
    ranking.evaluate_sims(sims[:39, :195], fold5=True)


@pytest.mark.parametrize("make", [_tied_sims, _gauss_sims])
def test_rerank_matches_authors_procedure(make):
  rng = np.random.default_rng(8)
  sims = make(rng, 30)
  want_i2t = _brute_rerank_i2t(sims)
  got = ranking.rerank_i2t_ranks(sims, ranking.i2t_ranks(sims), chunk_size=7)
  np.testing.assert_array_equal(got, want_i2t)
  m = ranking.evaluate_sims(sims, rerank=True)
  assert m == ranking.recall_metrics(want_i2t, _brute_t2i(sims))
  folds = ranking.evaluate_sims(sims, fold5=True, rerank=True)
  per = [ranking.recall_metrics(_brute_rerank_i2t(sims[6 * f:6 * f + 6, 30 * f:30 * f + 30]),
                                _brute_t2i(sims[6 * f:6 * f + 6, 30 * f:30 * f + 30]))
         for f in range(5)]
  assert folds["rsum"] == pytest.approx(np.mean([p["rsum"] for p in per]))


@pytest.mark.parametrize("width,levels", [(None, 4), (1, 4), (7, 4), (None, 40), (5, 40)])
def test_rerank_topk_lists(width, levels):
  rng = np.random.default_rng(10)
  sims = _tied_sims(rng, 24, levels=levels)
  got = ranking.rerank_i2t_topk(sims, 15, chunk_size=5, column_width=width)
  np.testing.assert_array_equal(got, _brute_rerank(sims)[:, :15])
  np.testing.assert_array_equal(ranking.rerank_i2t_topk(sims[:, :8], 15),
                                _brute_rerank(sims[:, :8])[:, :8])   # k > N_cap


def test_rerank_changes_order_as_intended():
  # Image 0's best caption (5) is image 1's; caption 0 (its own) ranks image 0 first.
  sims = np.full((2, 10), 0.0, np.float32)
  sims[0, 5], sims[0, 0] = 0.9, 0.8
  sims[1, 5] = 0.95
  assert ranking.i2t_ranks(sims)[0] == 1
  assert ranking.rerank_i2t_ranks(sims, ranking.i2t_ranks(sims))[0] == 0


def test_sum_sims_and_errors():
  a = np.ones((2, 10), np.float32)
  b = np.full((2, 10), 2.0, np.float32)
  s = ranking.sum_sims([a, b])
  assert s.dtype == np.float32 and np.all(s == 3.0) and np.all(a == 1.0)
  assert ranking.sum_sims([a]) is a or np.shares_memory(ranking.sum_sims([a]), a)
  with pytest.raises(ValueError, match=r"b\.npy has shape \(2, 9\), but a\.npy has shape"):
    ranking.sum_sims([a, np.ones((2, 9))], names=["a.npy", "b.npy"])
  with pytest.raises(ValueError, match=r"sims\[1\]"):
    ranking.sum_sims([a, np.ones((3, 10))])
  with pytest.raises(ValueError, match="no sims"):
    ranking.sum_sims([])


def _rank_cli(*args):
  return subprocess.run([sys.executable, "-m", "dsran_jax.tools.rank", *args],
                        capture_output=True, text=True,
                        cwd=pathlib.Path(__file__).resolve().parents[1])


def test_rank_cli(tmp_path):
  rng = np.random.default_rng(9)
  s1, s2 = _gauss_sims(rng, 20), _gauss_sims(rng, 20)
  p1, p2 = tmp_path / "a.npy", tmp_path / "b.npy"
  np.save(p1, s1)
  np.save(p2, s2)
  r = _rank_cli(f"--sims={p1}", f"--sims={p2}", "--fold5", "--rerank")
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout)
  assert list(got) == list(ranking.METRIC_KEYS) + ["protocol"]
  protocol = got.pop("protocol")
  assert got == ranking.evaluate_sims(s1 + s2, fold5=True, rerank=True)
  assert protocol == ranking.protocol_info(20, 5, fold5=True, rerank=True,
                                           ensemble=[str(p1), str(p2)])
  # Not COCO's 5000 test images: 5 folds all the same, and said so.
  assert "--fold5 on 20 images: 5 folds of 4 images, not the COCO 1K" in r.stderr

  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((20, 99), np.float32))
  flat = tmp_path / "flat.npy"
  np.save(flat, np.zeros(100, np.float32))
  for args, msg in [((f"--sims={tmp_path / 'nope.npy'}",), "nope.npy"),
                    ((f"--sims={p1}", f"--sims={bad}"), "bad.npy has shape (20, 99)"),
                    ((f"--sims={flat}",), "flat.npy: sims must be 2-D"),
                    ((f"--sims={bad}",), "5 * 20 = 100 caption columns")]:
    r = _rank_cli(*args)
    assert r.returncode != 0 and r.stdout == ""
    assert msg in r.stderr, r.stderr

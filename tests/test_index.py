"""First-stage indexes (dsran_jax/index.py) and two-stage search (dsran_jax/search.py):
numpy's blocked exact search against a literal sort, faiss exact against numpy, the
approximate kinds' measured recall, saving and staleness, the numpy path without faiss,
and search with a shortlist model and a re-ranker (API and CLI)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsran_jax import index, integrity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def literal_top_k(items, queries, k):
  scores = queries.astype(np.float64) @ items.astype(np.float64).T
  ids = [sorted(range(items.shape[0]), key=lambda j: (-row[j], j))[:k] for row in scores]
  return np.array(ids)


def clustered(rng, n, dim=16, clusters=20):
  """Unit vectors around a few centres (as embeddings are), and queries near items."""
  centres = rng.standard_normal((clusters, dim))
  x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_numpy_exact_search_is_the_stable_top_k_across_blocks(monkeypatch):
  monkeypatch.setattr(index, "NUMPY_BLOCK", 7)  # merges across 9 blocks
  rng = np.random.default_rng(0)
  items = rng.integers(-2, 3, size=(60, 5)).astype(np.float32)  # many exact ties
  queries = rng.integers(-2, 3, size=(9, 5)).astype(np.float32)
  for k in (1, 6, 7, 13, 60, 100):
    scores, ids = index.numpy_search(items, queries, k)
    want = literal_top_k(items, queries, min(k, 60))
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(scores, np.take_along_axis(queries @ items.T, want, 1))
  idx = index.build(items, "exact", backend="numpy", verbose=False)
  assert idx.backend == "numpy" and idx.nbytes == 0
  np.testing.assert_array_equal(idx.search(queries, 13)[1], literal_top_k(items, queries, 13))
  with pytest.raises(ValueError, match="queries have width 4, the index 5"):
    idx.search(queries[:, :4], 3)
  with pytest.raises(ValueError, match="needs faiss"):
    index.build(items, "hnsw", backend="numpy")
  with pytest.raises(ValueError, match="index kind 'pq'"):
    index.build(items, "pq")


def test_without_faiss_the_numpy_path_serves_exact_search(monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
  assert not index.have_faiss()
  rng = np.random.default_rng(1)
  items, queries = clustered(rng, 50), clustered(rng, 4)
  idx = index.build(items, verbose=False)
  assert (idx.kind, idx.backend) == ("exact", "numpy")
  np.testing.assert_array_equal(idx.search(queries, 5)[1], literal_top_k(items, queries, 5))
  for kind in ("ivf", "hnsw"):
    with pytest.raises(ValueError, match=r"pip install -e \"\.\[index\]\""):
      index.build(items, kind)


def test_faiss_exact_equals_numpy_and_approximate_recall_is_measured(capsys):
  pytest.importorskip("faiss")
  rng = np.random.default_rng(2)
  items, queries = clustered(rng, 3000, 32), clustered(rng, 200, 32)
  exact = index.build(items, "exact", verbose=False)
  assert exact.backend == "faiss"
  s_np, i_np = index.numpy_search(items, queries, 10)
  s_f, i_f = exact.search(queries, 10)
  np.testing.assert_array_equal(i_f, i_np)
  np.testing.assert_allclose(s_f, s_np, atol=1e-5)
  # IVF probing every cell is exhaustive: recall 1; fewer cells, measured below 1.
  full = index.build(items, "ivf", nlist=16, nprobe=16, recall_queries=queries)
  assert full.recall == {"k": 10, "queries": 200, "recall": 1.0}
  few = index.build(items, "ivf", nlist=64, nprobe=1, recall_queries=queries)
  hnsw = index.build(items, "hnsw", hnsw_m=16, ef_search=128, recall_queries=queries)
  printed = capsys.readouterr().err
  for idx in (few, hnsw):
    assert f"recall@10 vs exact search on 200 queries: {idx.recall['recall']:.4f}" in printed
    _, got = idx.search(queries, 10)
    assert idx.recall["recall"] == index.recall_at_k(got, i_np)
  assert 0.2 < few.recall["recall"] < 1.0   # one cell of 64 misses neighbours
  assert hnsw.recall["recall"] > 0.95
  assert few.nbytes > items.nbytes and hnsw.nbytes > items.nbytes


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_saved_index_loads_and_a_stale_one_is_refused(tmp_path, kind):
  pytest.importorskip("faiss")
  rng = np.random.default_rng(3)
  items, queries = clustered(rng, 400), clustered(rng, 20)
  built = index.build(items, kind, fingerprint={"gallery": {"step": 5}}, verbose=False)
  path = str(tmp_path / "i.faiss")
  built.save(path)
  want = index.expected_fingerprint(items, kind, {"gallery": {"step": 5}})
  assert want == built.fingerprint
  loaded = index.load(path, expect=want)
  assert loaded.kind == kind and loaded.build_s is None
  np.testing.assert_array_equal(loaded.search(queries, 7)[1], built.search(queries, 7)[1])
  with pytest.raises(index.StaleIndexError, match=r"gallery: index \{'step': 5\}, gallery "
                                                  r"\{'step': 6\}"):
    index.load(path, expect=index.expected_fingerprint(items, kind, {"gallery": {"step": 6}}))
  changed = items.copy()
  changed[17, 0] += 0.5
  with pytest.raises(index.StaleIndexError, match="crc32"):
    index.load(path, expect=index.expected_fingerprint(changed, kind, {"gallery": {"step": 5}}))


# ------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def galleries(trained_workdir, tmp_path_factory):
  """(re-ranking SCAN gallery, first-stage DSRAN gallery) of one 10-image split."""
  from dsran_jax import search  # pylint: disable=g-import-not-at-top
  from test_two_stage import make_scan_workdir  # pylint: disable=g-import-not-at-top
  dsran_dir, _ = trained_workdir
  scan_dir = make_scan_workdir(dsran_dir, str(tmp_path_factory.mktemp("scan_search")))
  return search.Gallery.load(scan_dir), search.Gallery.load(dsran_dir)


def test_two_stage_search_rescores_the_short_list_only(galleries):
  from dsran_jax import search  # pylint: disable=g-import-not-at-top
  scan, dsran = galleries
  query = "a red dog on the beach"
  # K covering the gallery: exactly the re-ranker's own search.
  every = search.Shortlist(dsran, k=50)
  plain = search.search_text(scan, query, top_k=10)
  two = search.search_text(scan, query, top_k=10, shortlist=every)
  assert [h["image_id"] for h in two] == [h["image_id"] for h in plain]
  np.testing.assert_allclose([h["score"] for h in two], [h["score"] for h in plain],
                             atol=1e-6)
  plain = search.search_image(scan, scan.image_ids[3], top_k=50)
  two = search.search_image(scan, scan.image_ids[3], top_k=50, shortlist=every)
  assert [h["caption"] for h in two] == [h["caption"] for h in plain]
  # K = 4 of 10 images: the first stage's 4 best, ordered by SCAN's scores, then the rest
  # in DSRAN's order.
  short = search.Shortlist(dsran, k=4)
  hits = search.search_text(scan, query, top_k=7, shortlist=short)
  first = dsran.text_scores(query)
  first_order = [dsran.image_ids[i] for i in np.argsort(-first, kind="stable")]
  assert [h["stage"] for h in hits] == [2] * 4 + [1] * 3
  assert {h["image_id"] for h in hits[:4]} == set(first_order[:4])
  assert [h["image_id"] for h in hits[4:]] == first_order[4:7]
  second = scan.text_scores(query)
  got = [second[scan.index_of(h["image_id"])] for h in hits[:4]]
  assert got == sorted(got, reverse=True)
  np.testing.assert_allclose([h["score"] for h in hits[:4]], got, atol=1e-6)
  np.testing.assert_allclose([h["first_stage_score"] for h in hits],
                             [first[dsran.index_of(h["image_id"])] for h in hits], atol=1e-5)
  with pytest.raises(ValueError, match="not one embedding per item"):
    scan.index("images")
  with pytest.raises(ValueError, match="shortlist k must be an integer >= 1"):
    search.Shortlist(dsran, k=0)


def test_gallery_index_is_saved_reused_and_rebuilt_when_stale(galleries, caplog):
  pytest.importorskip("faiss")
  from dsran_jax import search  # pylint: disable=g-import-not-at-top
  _, dsran = galleries
  path = search.index_path(dsran.workdir, "test", "texts", "exact")
  for f in (path, path + ".json"):
    if os.path.exists(f):
      os.remove(f)
  fresh = search.Gallery.load(dsran.workdir, encoder=dsran.encoder)  # no index in memory
  built = fresh.index("texts")
  assert built.build_s is not None and os.path.exists(path)
  assert fresh.index("texts") is built
  again = search.Gallery.load(dsran.workdir, encoder=dsran.encoder)
  loaded = again.index("texts")
  assert loaded.build_s is None  # read back, not rebuilt
  meta = json.load(open(path + ".json"))
  meta["fingerprint"]["gallery"]["checkpoint_step"] = -1  # as if another checkpoint
  json.dump(integrity.seal(meta), open(path + ".json", "w"))  # (a hand edit is damage)
  again = search.Gallery.load(dsran.workdir, encoder=dsran.encoder)
  rebuilt = again.index("texts")
  assert rebuilt.build_s is not None
  assert "is stale" in caplog.text and "checkpoint_step" in caplog.text
  # A description without its index file, or an unreadable file: rebuilt too.
  os.remove(path)
  assert search.Gallery.load(dsran.workdir, encoder=dsran.encoder).index("texts").build_s \
      is not None and os.path.exists(path)
  with open(path, "wb") as f:
    f.write(b"not an index")
  assert search.Gallery.load(dsran.workdir, encoder=dsran.encoder).index("texts").build_s \
      is not None


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "dsran_jax.search", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_cli_two_stage_search_and_its_errors(galleries, tmp_path):
  from dsran_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  scan, dsran = galleries
  proc = _cli(f"--workdir={scan.workdir}", f"--shortlist_workdir={dsran.workdir}",
              "--shortlist_k=3", "--top_k=5", f"--image_id={scan.image_ids[1]}")
  assert proc.returncode == 0, proc.stderr
  hits = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [h["stage"] for h in hits] == [2, 2, 2, 1, 1] and "answered in" in proc.stderr
  proc = _cli(f"--workdir={scan.workdir}", f"--shortlist_workdir={dsran.workdir}",
              "--shortlist_k=0", "--query=a dog")
  assert proc.returncode != 0 and "--shortlist_k must be >= 1" in proc.stderr
  other = str(tmp_path / "other")
  c = Workdir(dsran.workdir).load_config()
  c.data.synthetic.seed = 7
  Workdir(other).save_config(c)
  proc = _cli(f"--workdir={scan.workdir}", f"--shortlist_workdir={other}", "--query=a dog")
  assert proc.returncode == 2 and proc.stdout == ""
  assert "another dataset or split" in proc.stderr and "data.synthetic.seed=7" in proc.stderr

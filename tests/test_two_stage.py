"""Two-stage evaluation (dsran_jax/evaluation/two_stage.py and shortlist.py): the ranking
rule against explicit orderings (ties included), gathered scoring against full scoring,
K = everything against the full evaluation, fusion = 1 against the first stage, and the
errors."""
import json
import os
import types

import jax
import numpy as np
import pytest

from dsran_jax import checkpointing, data, evaluation, models, ranking
from dsran_jax.evaluation import shortlist, two_stage
from dsran_jax import validation
from dsran_jax.models.variables import init_variables
from dsran_jax.workdir import Workdir

CPI = 5


def explicit_ranks(s1, s2, k, cpi=CPI, fusion=0.0):
  """Ranks read off the literal two-stage orderings (lists sorted by Python tuples)."""
  n_img, n_cap = s1.shape

  def rank(first, second, positives, n):
    order1 = sorted(range(n), key=lambda j: (-first[j], j))
    short = order1[:k]
    f = {j: second[j] if fusion == 0 else
         (1 - fusion) * float(second[j]) + fusion * float(first[j]) for j in short}
    final = sorted(short, key=lambda j: (-f[j], j)) + order1[k:]
    return min(final.index(j) for j in positives)

  i2t = [rank(s1[i], s2[i], range(i * cpi, (i + 1) * cpi), n_cap) for i in range(n_img)]
  t2i = [rank(s1[:, c], s2[:, c], [c // cpi], n_img) for c in range(n_cap)]
  return np.array(i2t), np.array(t2i)


def second_scores(sl, s2):
  """The second stage's scores of a short list, read from a full matrix."""
  n_cap = s2.shape[1]
  return (np.take_along_axis(s2, sl.i2t, 1),
          s2.T[np.arange(n_cap)[:, None], sl.t2i])


@pytest.mark.parametrize("k", [1, 4, 7, 12, 30])
@pytest.mark.parametrize("fusion", [0.0, 0.5])
def test_ranks_follow_the_explicit_two_stage_ordering_ties_included(k, fusion):
  rng = np.random.default_rng(k)
  # Small integers: many exact ties in both stages, at the K-th place too.
  s1 = rng.integers(0, 4, size=(6, 30)).astype(np.float32)
  s2 = rng.integers(0, 4, size=(6, 30)).astype(np.float32)
  sl = shortlist.short_lists(s1, k, CPI, chunk_size=4)
  assert sl.i2t.shape == (6, min(k, 30)) and sl.t2i.shape == (30, min(k, 6))
  # Short lists are the stable top K of each row / column.
  for i in range(6):
    assert sl.i2t[i].tolist() == sorted(range(30), key=lambda c: (-s1[i, c], c))[:k]
  for c in range(30):
    assert sl.t2i[c].tolist() == sorted(range(6), key=lambda g: (-s1[g, c], g))[:k]
  got = shortlist.two_stage_ranks(sl, *second_scores(sl, s2), CPI, fusion)
  want = explicit_ranks(s1, s2, k, CPI, fusion)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  # The short list's recall: the ground truth inside the top K.
  r1 = ranking.ranks(s1, CPI)
  assert sl.recall() == {"i2t": 100 * np.mean(r1[0] < min(k, 30)),
                         "t2i": 100 * np.mean(r1[1] < min(k, 6))}


def test_k_covering_the_gallery_is_the_second_models_full_ranking():
  rng = np.random.default_rng(3)
  s1 = rng.normal(size=(8, 40)).astype(np.float32)
  s2 = rng.integers(0, 3, size=(8, 40)).astype(np.float32)  # ties everywhere
  sl = shortlist.short_lists(s1, 40, CPI)
  got = shortlist.two_stage_ranks(sl, *second_scores(sl, s2), CPI)
  want = ranking.ranks(s2, CPI)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  # fusion = 1 orders the short list by the first stage: its own ranks, whatever K.
  for k in (1, 3, 40):
    sl = shortlist.short_lists(s1, k, CPI)
    got = shortlist.two_stage_ranks(sl, *second_scores(sl, s2), CPI, fusion=1.0)
    np.testing.assert_array_equal(got[0], ranking.ranks(s1, CPI)[0])
    np.testing.assert_array_equal(got[1], ranking.ranks(s1, CPI)[1])


class DotScorer:
  """A numpy embedding scorer with the `ModelScorer` methods two-stage evaluation uses."""

  def __init__(self, image_key, text_key):
    self.image_key, self.text_key = image_key, text_key

  def encode_images(self, batch):
    return batch[self.image_key]

  def encode_texts(self, batch):
    return batch[self.text_key]

  def score_into(self, img, txt, out, **unused):
    out[:] = img @ txt.T

  def score_candidates(self, img, txt, cand, queries="images", **unused):
    if queries == "images":
      return np.einsum("qd,qkd->qk", img, txt[cand])
    return np.einsum("qkd,qd->qk", img[cand], txt)


def test_coco_protocol_shortlists_each_fold_within_itself():
  rng = np.random.default_rng(5)
  n = 25  # 5 folds of 5 images
  batch_i = {"a": rng.integers(0, 3, (n, 4)).astype(np.float32),
             "b": rng.normal(size=(n, 4)).astype(np.float32), "valid": np.ones(n, bool)}
  batch_t = {"a": rng.integers(0, 3, (5 * n, 4)).astype(np.float32),
             "b": rng.normal(size=(5 * n, 4)).astype(np.float32),
             "valid": np.ones(5 * n, bool)}
  first, second = DotScorer("a", "a"), DotScorer("b", "b")
  run = lambda k: two_stage.evaluate(second, first, [batch_i], [batch_t], [batch_i],
                                     [batch_t], k=k, protocol="coco")
  full = evaluation.evaluate(second, [batch_i], [batch_t], protocol="coco")
  results, report = run(125)
  assert results == full
  results, report = run(3)
  s1, s2 = batch_i["a"] @ batch_t["a"].T, batch_i["b"] @ batch_t["b"].T
  want = []
  for rs, cs in ranking.fold_slices(n, CPI):
    sl = shortlist.short_lists(s1[rs, cs], 3, CPI)
    want.append(ranking.recall_metrics(*explicit_ranks(s1[rs, cs], s2[rs, cs], 3)))
    assert sl.k_i2t == sl.k_t2i == 3
  assert results["coco1k"] == pytest.approx(ranking.mean_metrics(want), abs=1e-9)
  assert results["coco5k"] == pytest.approx(
      ranking.recall_metrics(*explicit_ranks(s1, s2, 3)), abs=1e-9)
  t = report["targets"]
  assert t["coco5k"]["pairs_scored"] == 25 * 3 + 125 * 3
  assert t["coco1k"]["pairs_scored"] == 5 * (5 * 3 + 25 * 3)
  assert t["coco1k"]["pairs_full"] == 5 * 5 * 25 and t["coco5k"]["pairs_full"] == 25 * 125


def test_first_stage_rejects_bad_input():
  s = np.zeros((2, 10), np.float32)
  for k in (0, -1, 2.5, True):
    with pytest.raises(two_stage.ShortlistError, match="must be an integer >= 1"):
      shortlist.short_lists(s, k, CPI)
  s[1, 3] = np.nan
  with pytest.raises(ranking.NonFiniteScoresError, match="image 1 caption 3"):
    shortlist.short_lists(s, 2, CPI)
  sl = shortlist.short_lists(np.zeros((2, 10), np.float32), 2, CPI)
  with pytest.raises(ValueError, match=r"i2t scores have shape \(2, 3\), expected \(2, 2\)"):
    shortlist.two_stage_ranks(sl, np.zeros((2, 3)), np.zeros((10, 2)), CPI)
  with pytest.raises(two_stage.ShortlistError, match="fusion weight"):
    shortlist.two_stage_ranks(sl, np.zeros((2, 2)), np.zeros((10, 2)), CPI, fusion=1.5)


# ------------------------------------------------------------ gathered scoring


def _tiny(name):
  from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
  c = get_base_config()
  c.model.name = name
  c.model.dsran.text_encoder = "gru"
  c.model.embed_size, c.model.word_dim = 16, 8
  c.model.img_dim = c.data.img_dim = 12
  c.model.dsran.gat_heads = 2
  return c


def _batch(rng, model, n=11, r=4, length=6):
  from dsran_jax.core.batch import KEY_SPECS, key_shape  # pylint: disable=g-import-not-at-top
  batch = {}
  for key in tuple(model.image_keys) + tuple(model.text_keys):
    shape = (n,) + key_shape(key, model.input_dims, r, length)
    if key == "region_mask":
      batch[key] = np.arange(r)[None] < rng.integers(1, r + 1, size=(n, 1))
    elif key == "attention_mask":
      batch[key] = (np.arange(length)[None] < rng.integers(2, length + 1, size=(n, 1))
                    ).astype(np.int32)
    elif key == "input_ids":
      batch[key] = rng.integers(4, 30, size=shape).astype(np.int32)
    else:
      batch[key] = rng.standard_normal(shape).astype(KEY_SPECS[key][1])
  batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
  return batch


@pytest.mark.parametrize("name", ["dsran", "scan"])
def test_score_candidates_equals_full_scores(name):
  """Each query against its own candidates only, in fixed-shape tiles over 8 devices
  (11 queries: the last tile padded), gathered on the devices or on the host: the full
  matrix's numbers, to float reassociation."""
  c = _tiny(name)
  model = models.build_model(c.model, vocab_size=30)
  variables = init_variables(model, jax.random.PRNGKey(0))
  scorer = evaluation.ModelScorer(model, variables, tile=(8, 4), progress=False)
  rng = np.random.default_rng(0)
  batch = _batch(rng, model)
  img = jax.tree.map(np.asarray, scorer.encode_images(batch))
  txt = jax.tree.map(np.asarray, scorer.encode_texts(batch))
  full = scorer.score(img, txt)
  cand = np.stack([rng.permutation(11)[:3] for _ in range(11)])
  assert scorer.candidate_tile(11, 3) == 16   # 8 x 4 pairs / 3, rounded to the 8 devices
  for on_device in (True, False):
    got_i2t = scorer.score_candidates(img, txt, cand, "images", on_device=on_device)
    got_t2i = scorer.score_candidates(img, txt, cand, "texts", on_device=on_device)
    np.testing.assert_allclose(got_i2t, np.take_along_axis(full, cand, 1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_t2i, full.T[np.arange(11)[:, None], cand], rtol=0,
                               atol=1e-6)
  # A subset of queries (search: one query row).
  got = scorer.score_candidates(img, txt, cand[:1], "images", query_rows=np.array([7]),
                                on_device=False)
  np.testing.assert_allclose(got, full[7:8, cand[0]], atol=1e-6)
  with pytest.raises(ValueError, match=r"rows of the 11 captions, got values in \[0, 11\]"):
    scorer.score_candidates(img, txt, np.array([[0, 11]]), "images", query_rows=np.array([0]))
  with pytest.raises(ValueError, match="queries must be 'images' or 'texts'"):
    scorer.score_candidates(img, txt, cand, "captions")


# ------------------------------------------------------------ workdir level


def make_scan_workdir(dsran_dir: str, scan_dir: str) -> str:
  """A SCAN workdir with random weights on the DSRAN workdir's data (a re-ranker that
  costs no training)."""
  c = Workdir(dsran_dir).load_config()
  c.model.name = "scan"
  c.model.embed_size, c.model.word_dim = 32, 16
  model = models.build_model(c.model, vocab_size=data.vocab_size(c, scan_dir))
  variables = init_variables(model, jax.random.PRNGKey(1))
  Workdir(scan_dir).save_config(c)
  checkpointing.save(scan_dir, checkpointing.BEST, 1, variables, {"step": 1})
  return scan_dir


@pytest.fixture(scope="module")
def workdirs(trained_workdir, tmp_path_factory):
  """(DSRAN workdir: the first stage, SCAN workdir: random weights, the re-ranker), on
  the same synthetic split (10 test images, 50 captions)."""
  dsran_dir, _ = trained_workdir
  return dsran_dir, make_scan_workdir(dsran_dir, str(tmp_path_factory.mktemp("scan")))


def _evaluate(scan_dir, **keys):
  c = Workdir(scan_dir).load_config()
  for k, v in keys.items():
    c.eval[k] = v
  return evaluation.evaluate_workdir(scan_dir, c)


def test_two_stage_with_k_all_is_the_full_evaluation_and_carries_its_protocol(workdirs):
  dsran_dir, scan_dir = workdirs
  full = _evaluate(scan_dir)
  assert full["protocol"]["1k"]["tie_rule"] == ranking.TIE_RULE
  assert full["protocol"]["1k"]["num_images"] == 10 and full["protocol"]["1k"]["folds"] == 1
  assert full["protocol"]["1k"]["two_stage"] is None and "two_stage" not in full
  with np.load(os.path.join(scan_dir, "ranks_test.npz")) as r:
    full_ranks = (r["i2t"], r["t2i"])

  out = _evaluate(scan_dir, shortlist_workdir=dsran_dir, shortlist_k=50)
  assert out["1k"] == full["1k"]  # exactly, every metric
  with np.load(os.path.join(scan_dir, "ranks_test.npz")) as r:
    np.testing.assert_array_equal(r["i2t"], full_ranks[0])
    np.testing.assert_array_equal(r["t2i"], full_ranks[1])
  t = out["two_stage"]["targets"]["1k"]
  assert (t["k_i2t"], t["k_t2i"]) == (50, 10)
  assert t["pairs_scored"] == 10 * 50 + 50 * 10 and t["pairs_full"] == 500
  assert t["shortlist_recall_i2t"] == t["shortlist_recall_t2i"] == 100.0
  # The first stage's own metrics are the DSRAN workdir's evaluation.
  with open(os.path.join(dsran_dir, "eval_results.json")) as f:
    dsran = json.load(f)["1k"]
  assert t["first_stage"] == pytest.approx(dsran, abs=1e-9)
  p = out["protocol"]["1k"]["two_stage"]
  assert p["k"] == 50 and p["fusion"] == 0.0 and p["shortlist_model"] == "dsran"
  assert p["shortlist_workdir"] == os.path.abspath(dsran_dir)
  with open(os.path.join(scan_dir, "eval_results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(out))


def test_small_k_keeps_first_stage_ranks_outside_the_short_list(workdirs):
  dsran_dir, scan_dir = workdirs
  with np.load(os.path.join(dsran_dir, "ranks_test.npz")) as r:
    first = (r["i2t"], r["t2i"])
  out = _evaluate(scan_dir, shortlist_workdir=dsran_dir, shortlist_k=3)
  t = out["two_stage"]["targets"]["1k"]
  assert t["pairs_scored_i2t"] == 10 * 3 and t["pairs_scored_t2i"] == 50 * 3
  assert t["shortlist_recall_i2t"] == 100 * np.mean(first[0] < 3)
  assert t["shortlist_recall_t2i"] == 100 * np.mean(first[1] < 3)
  with np.load(os.path.join(scan_dir, "ranks_test.npz")) as r:
    for got, want in zip((r["i2t"], r["t2i"]), first):
      inside = want < 3
      np.testing.assert_array_equal(got[~inside], want[~inside])
      assert (got[inside] < 3).all()
  # fusion = 1: the short list in the first stage's order, the DSRAN's own metrics.
  fused = _evaluate(scan_dir, shortlist_workdir=dsran_dir, shortlist_k=3,
                    shortlist_fusion=1.0)
  assert fused["1k"] == pytest.approx(t["first_stage"], abs=1e-9)
  assert fused["protocol"]["1k"]["two_stage"]["fusion"] == 1.0


def test_bad_shortlist_input_is_a_clear_error(workdirs, tmp_path):
  dsran_dir, scan_dir = workdirs
  with pytest.raises(two_stage.ShortlistError, match="no config.json"):
    _evaluate(scan_dir, shortlist_workdir=str(tmp_path / "nowhere"))
  # Another synthetic world (dataset), another test split: named key, both values.
  for key, value, msg in (("num_test_images", 12, "data.synthetic.num_test_images=12"),
                          ("test_split", "dev", "data.test_split='dev'")):
    other = tmp_path / key
    other.mkdir()
    c = Workdir(dsran_dir).load_config()
    if key == "test_split":
      c.data.test_split = value
    else:
      c.data.synthetic[key] = value
    Workdir(str(other)).save_config(c)
    with pytest.raises(two_stage.ShortlistError, match=msg.replace(".", r"\.")):
      _evaluate(scan_dir, shortlist_workdir=str(other))
  # A config with the right keys whose split holds other captions.
  split = types.SimpleNamespace(name="test", image_ids=["a", "b"], texts=["x"] * 10)
  other = types.SimpleNamespace(name="test", image_ids=["a", "c"], texts=["x"] * 10)
  with pytest.raises(two_stage.ShortlistError, match="differ first at #1"):
    two_stage.check_same_split(split, other, "DIR")
  # K < 1 and an out-of-range fusion weight are config errors naming the key.
  c = Workdir(scan_dir).load_config()
  c.eval.shortlist_workdir, c.eval.shortlist_k, c.eval.shortlist_fusion = dsran_dir, 0, -0.5
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(c)
  assert "config.eval.shortlist_k=0: must be an integer >= 1" in str(e.value)
  assert "config.eval.shortlist_fusion=-0.5" in str(e.value)
  # Saving sims needs every pair.
  with pytest.raises(ValueError, match="save_sims needs every pair"):
    _evaluate(scan_dir, shortlist_workdir=dsran_dir, save_sims=True)
  assert not os.path.exists(os.path.join(scan_dir, "sims_test.npy"))

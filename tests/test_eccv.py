"""ECCV Caption / CxC / COCO 1K-5K evaluation against the eccv-caption package itself, on
its real ids and ground truths, with seeded sims that are neither random nor perfect."""
import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings

import ml_collections
import numpy as np
import pytest

from dsran_jax import coco_benchmarks as eccv
from dsran_jax import ranking
from dsran_jax.tools import rank

pytest.importorskip("eccv_caption")

STEP = 20      # sims are multiples of 1/20: many exact ties, broken by the smaller index
DEPTH = 200    # reference lists handed to the package (enough for every metric; checked)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_metrics():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # "failed to import ujson"
    import eccv_caption  # pylint: disable=import-outside-toplevel
  return eccv_caption


@pytest.fixture(scope="module")
def layout():
  return eccv.package_layout()


@pytest.fixture(scope="module")
def sims(layout):
  """(5000, 25000) float32, seeded: random 16-d embeddings' products + the COCO pair + a
  smaller boost for CxC and ECCV positives, in steps of 1/STEP (ties everywhere)."""
  rng = np.random.default_rng(0)
  n_img, n_cap = layout.image_ids.size, layout.caption_ids.size
  u = rng.standard_normal((n_img, 16), dtype=np.float32)
  v = rng.standard_normal((n_cap, 16), dtype=np.float32)
  q = np.rint(2 * u @ v.T).astype(np.int16)     # std ~8 steps
  q[np.arange(n_cap) // 5, np.arange(n_cap)] += 14
  col = {int(c): j for j, c in enumerate(layout.caption_ids)}
  row = {int(i): r for r, i in enumerate(layout.image_ids)}
  for name in ("cxc", "eccv"):
    pairs = [(row[i], col[c]) for i, caps in eccv.load_ground_truth(name).i2t.items()
             for c in caps.tolist() if c in col]
    r, c = np.array(pairs).T
    q[r, c] += 7
  return q.astype(np.float32) / STEP


def _lists(mat, query_ids, item_ids):
  """{query id: its best DEPTH item ids}: an int16 stable argsort of -score per query
  (radix sort), independent of `ranking.topk_stable`."""
  q = np.rint(np.asarray(mat) * STEP).astype(np.int16)
  order = np.argsort(-q, axis=1, kind="stable")[:, :DEPTH]
  return {int(query_ids[i]): item_ids[order[i]].tolist() for i in range(len(query_ids))}


@pytest.fixture(scope="module")
def reference(sims, layout):
  i2t = _lists(sims, layout.image_ids, layout.caption_ids)
  t2i = _lists(sims.T, layout.caption_ids, layout.image_ids)
  return i2t, t2i


@pytest.fixture(scope="module")
def ours(sims, layout):
  return eccv.evaluate_benchmarks(sims, layout, ("eccv", "cxc", "coco_5k", "coco_1k"))


def _compare(ours, ref, benchmarks):
  worst = 0.0
  for b in benchmarks:
    if b == "eccv":
      keys = {"map@r": "eccv_map_at_r", "r-precision": "eccv_rprecision", "r@1": "eccv_r1"}
      for ok, pk in keys.items():
        for way in ("i2t", "t2i"):
          worst = max(worst, abs(ours["eccv"][way][ok] / 100 - ref[pk][way]))
    else:
      for k in (1, 5, 10):
        for way in ("i2t", "t2i"):
          worst = max(worst, abs(ours[b][way][f"r@{k}"] / 100 - ref[f"{b}_r{k}"][way]))
  return worst


def test_every_metric_equals_the_package_and_ranking(sims, layout, reference, ours):
  i2t, t2i = reference
  # COCO 1K filters each list to its fold: every fold keeps >= 10 items of its lists.
  per = 5000
  for f in range(5):
    fold = set(layout.caption_ids[f * per:(f + 1) * per].tolist())
    assert min(sum(c in fold for c in i2t[int(i)])
               for i in layout.image_ids[f * 1000:(f + 1) * 1000]) >= 10
  metrics = _package_metrics().Metrics()
  ref = metrics.compute_all_metrics(
      i2t, t2i, target_metrics=("coco_1k_recalls", "coco_5k_recalls", "cxc_recalls",
                                "eccv_map_at_r", "eccv_rprecision", "eccv_r1"),
      Ks=(1, 5, 10), verbose=False)
  assert _compare(ours, ref, ("eccv", "cxc", "coco_5k", "coco_1k")) < 1e-6
  # neither random nor perfect
  assert 20 < ours["eccv"]["i2t"]["r@1"] < 95 and 5 < ours["eccv"]["t2i"]["map@r"] < 60
  # COCO 5K / 1K equal the project's ranking.py
  for name, fold5 in (("coco_5k", False), ("coco_1k", True)):
    m = ranking.evaluate_sims(sims, 5, fold5=fold5)
    for k in (1, 5, 10):
      for way in ("i2t", "t2i"):
        assert ours[name][way][f"r@{k}"] == pytest.approx(m[f"r{k}_{way}"], abs=1e-9)
  # R counts the ECCV positives outside the 5K ids, as the package does
  counts = ours["protocol"]["benchmarks"]["eccv"]["counts"]
  assert counts["i2t"]["positives_outside_matrix"] == 2
  assert counts["i2t"]["queries"] == 1261 and counts["t2i"]["queries"] == 1332


def test_rerank_composes(sims, layout, reference, ours):
  top = ranking.rerank_i2t_topk(sims)
  head = layout.caption_ids[top]
  k = head.shape[1]
  # The re-rank reorders each image's top 15 only: the reference lists keep their tail.
  i2t = {i: head[r].tolist() + reference[0][i][k:]
         for r, i in enumerate(layout.image_ids.tolist())}
  ref = _package_metrics().Metrics().compute_all_metrics(
      i2t, reference[1], target_metrics=("cxc_recalls", "eccv_map_at_r", "eccv_rprecision",
                                         "eccv_r1"), verbose=False)
  reranked = eccv.evaluate_benchmarks(sims, layout, ("eccv", "cxc"), rerank=True,
                                      i2t_head=top)
  assert _compare(reranked, ref, ("eccv", "cxc")) < 1e-6
  assert reranked["cxc"]["i2t"] != ours["cxc"]["i2t"]   # the re-rank changed something


def test_pmrp_equals_the_package(sims, layout, reference, tmp_path):
  # Stand-in plausible-match files (the real ones are a 140 MB download): CxC's
  # positives plus every 7th caption of the query's fold as extra matches.
  cxc = eccv.load_ground_truth("cxc")
  caps = layout.caption_ids
  pm_i2t = {str(i): sorted(set(v.tolist()) | set(caps[k::997][:20].tolist()))
            for k, (i, v) in enumerate(cxc.i2t.items()) if k % 3 == 0}
  pm_t2i = {str(c): v.tolist() for c, v in cxc.t2i.items()}
  for name, obj in (("pm_image_to_caption.json", pm_i2t), ("pm_caption_to_image.json", pm_t2i)):
    (tmp_path / name).write_text(json.dumps(obj))
  ref = _package_metrics().Metrics(extra_file_dir=str(tmp_path)).pmrp(
      {"i2t": reference[0], "t2i": reference[1]}, "all")
  ours = eccv.evaluate_benchmarks(sims, layout, ("pmrp",), pm_dir=str(tmp_path))
  for way in ("i2t", "t2i"):
    assert abs(ours["pmrp"][way]["r-precision"] / 100 - ref[way]) < 1e-6


def test_bad_ids_and_shapes_are_refused(sims, layout, ours):
  ids = layout.caption_ids.copy()
  with pytest.raises(eccv.LayoutError, match=r"shape \(5000, 24995\)"):
    eccv.evaluate_benchmarks(sims[:, 5:], layout)
  bad = ids.copy()
  bad[7] = 1
  with pytest.raises(eccv.LayoutError, match=r"1 of 25000 ids are not caption annotation ids"
                                             r".*1 \(column 7\)"):
    eccv.layout_from_caption_ids(bad)
  dup = ids.copy()
  dup[5] = dup[0]
  with pytest.raises(eccv.LayoutError, match=f"more than once: {dup[0]}"):
    eccv.layout_from_caption_ids(dup)
  swapped = ids.copy()
  swapped[[4, 5]] = swapped[[5, 4]]
  with pytest.raises(eccv.LayoutError, match=r"sit on another image's row: caption "
                                             rf"{ids[5]} \(column 4\)"):
    eccv.layout_from_caption_ids(swapped)
  wrong_images = layout.image_ids.copy()
  wrong_images[[0, 1]] = wrong_images[[1, 0]]
  with pytest.raises(eccv.LayoutError, match="image ids contradict the captions at 2 rows"):
    eccv.layout_from_caption_ids(ids, image_ids=wrong_images)
  # a 1000-image matrix does not cover ECCV's queries
  sub = eccv.layout_from_caption_ids(ids[:5000], source="first fold")
  with pytest.raises(eccv.LayoutError, match=r"eccv: \d+ of its 1261 i2t query images are "
                                             r"not in the matrix \(first fold\)"):
    eccv.evaluate_benchmarks(sims[:1000, :5000], sub)
  # a permuted order is evaluated on the same ids: the same numbers
  perm = np.random.default_rng(1).permutation(5000)
  cols = (perm[:, None] * 5 + np.arange(5)).ravel()
  moved = eccv.layout_from_caption_ids(ids[cols], source="permuted")
  a = eccv.evaluate_benchmarks(sims[perm][:, cols], moved, ("eccv",))
  b = ours
  assert not moved.package_order and layout.package_order
  # ties are broken by index, which the permutation moves: equal to within ties' effect
  assert abs(a["eccv"]["t2i"]["map@r"] - b["eccv"]["t2i"]["map@r"]) < 1.0


def test_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "eccv_caption" else real(name, *a))
  with pytest.raises(eccv.MissingExtraError, match=r'pip install "dsran_jax\[eccv\]"'):
    eccv.package_dir()
  np.save(tmp_path / "s.npy", np.zeros((10, 50), np.float32))
  code = ("import importlib.util as u, runpy, sys; f = u.find_spec; "
          "u.find_spec = lambda n, *a: None if n == 'eccv_caption' else f(n, *a); "
          f"sys.argv = ['rank', '--sims={tmp_path / 's.npy'}', '--eccv']; "
          "runpy.run_module('dsran_jax.tools.rank', run_name='__main__')")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": ROOT}, check=False)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1] == (
      'error: ECCV Caption / CxC evaluation needs the eccv-caption package: '
      'pip install "dsran_jax[eccv]"')


def _rank_cli(*args):
  return subprocess.run([sys.executable, "-m", "dsran_jax.tools.rank", *map(str, args)],
                        capture_output=True, text=True, check=False,
                        env={**os.environ, "PYTHONPATH": ROOT})


def test_rank_cli_ensemble(sims, layout, ours, tmp_path):
  # Halves of the matrix (multiples of 1/40: exact) summed by the ensemble give it back.
  half = (sims * 0.5).astype(np.float32)
  paths = [tmp_path / "a.npy", tmp_path / "b.npy"]
  for path in paths:
    np.save(path, half)
  try:
    out = rank.eccv_block([str(path) for path in paths])
    usual = rank.rank_files([str(path) for path in paths])
  finally:
    for path in paths:
      path.unlink()
  assert out["eccv"] == ours["eccv"] and out["cxc"] == ours["cxc"]
  assert set(out["eccv"]["i2t"]) == {"map@r", "r-precision", "r@1"}
  assert set(out["cxc"]["t2i"]) == {"r@1", "r@5", "r@10"}
  assert "pmrp" not in out and out["protocol"]["rerank"] is None
  files = out["protocol"]["benchmarks"]["eccv"]["ground_truth"]
  assert files["eccv_image_to_caption.json"] == eccv.sha256(os.path.join(
      eccv.package_dir(), "data", "eccv_image_to_caption.json"))
  assert usual["r1_i2t"] == ours["coco_5k"]["i2t"]["r@1"]


def test_rank_cli_refuses_bad_ids_and_pm_dir(layout, tmp_path):
  np.save(tmp_path / "s.npy", np.zeros((1000, 5000), np.float32))
  ids = tmp_path / "ids.txt"
  ids.write_text("\n".join(map(str, np.roll(layout.caption_ids[:5000], 1).tolist())))
  p = _rank_cli(f"--sims={tmp_path / 's.npy'}", "--eccv", f"--eccv_ids={ids}")
  assert p.returncode == 1 and "sit on another image's row" in p.stderr.splitlines()[-1]
  p = _rank_cli(f"--sims={tmp_path / 's.npy'}", "--eccv", f"--pm_dir={tmp_path}")
  assert p.returncode == 1
  assert p.stderr.splitlines()[-1] == (f"error: {tmp_path}: no pm_image_to_caption.json and "
                                       "pm_caption_to_image.json (--pm_dir: the "
                                       "plausible-match files of ECCV Caption)")


def _config(**eval_keys):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"format": "precomp", "root": "", "name": "coco"})
  c.eval = ml_collections.ConfigDict({"eccv": True, "eccv_ids": "", "eccv_pm_dir": "",
                                      "shortlist_workdir": "", **eval_keys})
  return c


def test_workdir_evaluator(sims, layout, ours, tmp_path):
  from dsran_jax.evaluation import eccv as evaluator, registry  # pylint: disable=import-outside-toplevel
  path = tmp_path / "sims.npy"
  np.save(path, sims)
  split = types.SimpleNamespace(name="testall", num_images=5000, num_captions=25000,
                                captions_per_image=5)
  with pytest.raises(FileNotFoundError, match="testall_ids.txt: missing; .*eval.eccv_ids"):
    evaluator.eccv_evaluator(registry.Task(None, {}, _config(), split, str(tmp_path),
                                      str(path)))
  ids = tmp_path / "ids.npy"
  np.save(ids, layout.caption_ids)
  outcome = evaluator.eccv_evaluator(registry.Task(None, {}, _config(eccv_ids=str(ids)), split,
                                              str(tmp_path), str(path)))
  path.unlink()
  assert outcome.sections == {"eccv": ours["eccv"], "cxc": ours["cxc"]}
  assert outcome.results == {}
  record = outcome.protocol["eccv"]
  assert record["split"] == "testall" and record["ids_in_package_order"]
  assert record["benchmarks"]["cxc"]["counts"]["t2i"]["queries"] == 24972
  assert outcome.lines[2].startswith("ECCV") and "mAP@R" in outcome.lines[2]
  # the runner gives it a sims file and runs it after the retrieval evaluator
  config = _config(eccv_ids=str(ids))
  assert registry.needs_sims(config)
  names = [n for n, _ in registry.selected(config)]
  assert names.index("retrieval") < names.index("eccv")


def _run_results(seed):
  rng = np.random.default_rng(seed)
  return {"split": "testall", "model": "dsran", "checkpoint_step": 100 + seed,
          "num_images": 5000, "num_captions": 25000,
          "coco5k": {"r1_i2t": float(rng.uniform(40, 60)), "rsum": float(rng.uniform(400, 500))},
          "eccv": {"i2t": {"map@r": float(rng.uniform(30, 40))}},
          "protocol": {"coco5k": {"folds": 1}, "eccv": {"ids": "x"}}}


def test_results_over_seeds(tmp_path):
  from dsran_jax.tools import seeds  # pylint: disable=import-outside-toplevel
  runs = []
  for s in range(3):
    d = tmp_path / f"run{s}"
    d.mkdir()
    (d / "eval_results.json").write_text(json.dumps(_run_results(s)))
    runs.append(str(d))
  summary = seeds.aggregate([(r, seeds.read_results(r)) for r in runs])
  values = [_run_results(s)["eccv"]["i2t"]["map@r"] for s in range(3)]
  m = summary["metrics"]["eccv.i2t.map@r"]
  assert m["n"] == 3 and m["mean"] == pytest.approx(np.mean(values))
  assert m["std"] == pytest.approx(np.std(values, ddof=1))
  assert set(summary["metrics"]) == {"coco5k.r1_i2t", "coco5k.rsum", "eccv.i2t.map@r"}
  other = _run_results(3)
  other["protocol"]["coco5k"]["folds"] = 5
  with pytest.raises(ValueError, match=r"protocol differs .* at protocol.coco5k.folds "
                                       r"\(1 vs 5\)"):
    seeds.aggregate([("a", _run_results(0)), ("b", other)])
  with pytest.raises(ValueError, match="at least 2 runs"):
    seeds.aggregate([("a", _run_results(0))])
  p = subprocess.run([sys.executable, "-m", "dsran_jax.tools.seeds",
                      *(f"--results={r}" for r in runs)], capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": ROOT}, check=False)
  assert p.returncode == 0, p.stderr
  line = next(ln for ln in p.stdout.splitlines() if ln.startswith("eccv.i2t.map@r"))
  assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in line and line.endswith("3")


def test_eccv_query_figure(sims, layout, tmp_path):
  from dsran_jax.figures import eccv_queries  # pylint: disable=import-outside-toplevel
  texts = [f"a caption number {j}" for j in range(layout.caption_ids.size)]
  out = eccv_queries(sims, str(tmp_path / "q.png"), layout, texts, num_queries=2, top=4)
  assert os.path.getsize(out["path"]) > 10_000
  eccv_gt, coco_gt = eccv.load_ground_truth("eccv"), eccv.load_ground_truth("coco_5k")
  for q in out["i2t"]:
    assert q["query"] in eccv_gt.i2t and len(q["items"]) == 4
    top = eccv.top_items(sims, "i2t", [q["index"]], 4)[0]
    assert [j for _, j, _ in q["items"]] == top.tolist()
    for cid, _, mark in q["items"]:
      assert mark == ("coco" if cid in coco_gt.i2t[q["query"]] else
                      "eccv" if cid in eccv_gt.i2t[q["query"]] else "none")
  # the queries shown are those where COCO misses the most ECCV positives
  assert out["i2t"][0]["eccv_only"] >= out["i2t"][1]["eccv_only"] >= 1
  assert {m for q in out["t2i"] for _, _, m in q["items"]} <= {"coco", "eccv", "none"}


@pytest.mark.slow
def test_runner_gives_needs_sims_evaluators_the_matrix(trained_workdir, monkeypatch):
  """evaluate_workdir hands an evaluator registered with needs_sims the matrix the
  retrieval evaluator scored (a temporary file, removed afterwards), after retrieval."""
  from dsran_jax import evaluation  # pylint: disable=import-outside-toplevel
  from dsran_jax.evaluation import registry  # pylint: disable=import-outside-toplevel
  workdir, _ = trained_workdir
  seen = {}

  def read_sims(task):
    seen["path"] = task.sims_path
    sims = np.load(task.sims_path)
    seen["r1"] = ranking.evaluate_sims(sims, task.split.captions_per_image)["r1_i2t"]
    return registry.Outcome({}, protocol={"sims_reader": {}}, sections={"rows": len(sims)},
                            lines=["sims read"])

  monkeypatch.setitem(registry._EVALUATORS, "sims_reader",  # pylint: disable=protected-access
                      (read_sims, lambda config: True))
  monkeypatch.setattr(registry, "_NEEDS_SIMS", {"sims_reader"})
  out = evaluation.evaluate_workdir(workdir)
  assert out["rows"] == out["num_images"] and seen["r1"] == out["1k"]["r1_i2t"]
  assert not os.path.exists(seen["path"])   # the temporary matrix is gone


def test_config_rules():
  from dsran_jax import validation  # pylint: disable=import-outside-toplevel
  from dsran_jax.default_config import get_base_config  # pylint: disable=import-outside-toplevel
  c = get_base_config()
  assert not c.eval.eccv and c.eval.eccv_ids == "" and c.eval.eccv_pm_dir == ""
  c.eval.eccv, c.eval.shortlist_workdir = True, "/elsewhere"
  c.data.format, c.data.name = "coco_vsepp", "f30k"
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(c)
  msg = e.value.one_line()
  assert "eval.eccv=True with config.eval.shortlist_workdir" in msg
  assert "data.format='coco_vsepp' is MS-COCO" in msg and "data.root=''" in msg


def test_figure_thumbnails(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dsran_jax.figures import eccv as fig  # pylint: disable=import-outside-toplevel
  Image.new("RGB", (640, 480), (200, 30, 30)).save(tmp_path / "COCO_val2014_000000391895.jpg")
  thumb = fig._thumbnail(str(tmp_path), 391895, None)  # pylint: disable=protected-access
  assert thumb.shape == (192, 256, 3)   # 256 on the long side
  assert np.abs(thumb[0, 0].astype(int) - (200, 30, 30)).max() <= 4   # JPEG
  assert fig._thumbnail(str(tmp_path), 60623, None) is None  # pylint: disable=protected-access
  assert fig._thumbnail(None, 391895, None) is None  # pylint: disable=protected-access

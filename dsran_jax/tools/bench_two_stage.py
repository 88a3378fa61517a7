"""Measurements of two-stage retrieval, printed as markdown tables (docs/benchmarks.md).

    # Two-stage evaluation against the full one (nothing is written to the workdirs):
    python -m dsran_jax.tools.bench_two_stage --mode=eval --workdir=SCAN_DIR \\
        --shortlist_workdir=DSRAN_DIR --k=10,20,50
    # Two-stage search latency (text -> images, image -> captions) on the test gallery:
    python -m dsran_jax.tools.bench_two_stage --mode=search --workdir=SCAN_DIR \\
        --shortlist_workdir=DSRAN_DIR --k=50
    # First-stage indexes on a large synthetic gallery embedded by a DSRAN workdir:
    python -m dsran_jax.tools.bench_two_stage --mode=index --shortlist_workdir=DSRAN_DIR \\
        --num_items=100000 --queries=1000

`--mode=index` encodes `num_items` images of the synthetic world's test split (features
generated on demand, a pure function of the image index) with the DSRAN image encoder,
and `queries` captions of its first images with its text encoder (a text -> image query
set whose ground truth is known); then builds each index kind and reports build time,
the index's bytes, the process's resident-memory growth, single-query latency (median,
p99) and recall@10 / recall@100 against exact search, plus each query's ground-truth
image found within the top 100 (R@100 of the first stage) for exact search.
"""
import json
import os
import resource
import sys
import time
import types

import numpy as np
from absl import app, flags, logging

from dsran_jax import atomic, cli, data, evaluation, index, inference, search
from dsran_jax.evaluation import two_stage
from dsran_jax.workdir import Workdir


def _rss_mb() -> float:
  """The process's current resident memory in MiB (Linux /proc)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _ks():
  return [int(k) for k in _FLAGS.k.value.split(",") if k.strip()]


def bench_eval() -> None:
  """Full and two-stage evaluations of --workdir's model; one markdown table."""
  workdir, sl_dir = _FLAGS.workdir.value, _FLAGS.shortlist_workdir.value
  restored = Workdir(workdir).restore()
  config, model, variables = restored.config, restored.model, restored.variables
  split = data.load_split(config, config.data.test_split, workdir)
  n_img, n_cap = split.num_images, split.num_captions
  rows = []
  if _FLAGS.full.value:
    t0 = time.time()
    full = evaluation.evaluate_split(model, variables, split, config, config.eval.protocol)
    rows.append(("full", full, None, time.time() - t0))
  for w in [float(x) for x in _FLAGS.fusion.value.split(",") if x.strip()]:
    for k in _ks():
      config.eval.shortlist_workdir = sl_dir
      config.eval.shortlist_k = k
      config.eval.shortlist_fusion = w
      t0 = time.time()
      outcome = two_stage.two_stage(evaluation.Task(model, variables, config, split, workdir))
      results, info = outcome.results, outcome.sections["two_stage"]
      rows.append((f"K={k}" + (f", fusion {w}" if w else ""), results, info,
                   time.time() - t0))
  name = next(iter(rows[0][1]))
  first = next((r[2]["targets"][name]["first_stage"] for r in rows if r[2]), None)
  head = ("| run | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | shortlist recall "
          "i2t / t2i | pairs scored (2nd stage) | wall s |")
  print(f"{n_img} images, {n_cap} captions, split {split.name!r}, protocol {name}; "
        f"re-ranker {config.model.name} ({workdir}), first stage ({sl_dir})\n")
  print(head)
  print("|" + "---|" * (head.count("|") - 1))

  def line(label, m, recall, pairs, wall):
    cells = [m[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {m['rsum']:.1f} | "
          f"{recall} | {pairs} | {wall} |")

  if first is not None:
    line("first stage alone", first, "-", f"{n_img * n_cap:,}", "-")
  for label, results, info, wall in rows:
    m = results[name]
    if info is None:
      line(f"{label} ({config.model.name})", m, "-", f"{n_img * n_cap:,}", f"{wall:.1f}")
    else:
      t = info["targets"][name]
      line(label, m, f"{t['shortlist_recall_i2t']:.1f} / {t['shortlist_recall_t2i']:.1f}",
           f"{t['pairs_scored']:,} ({100 * t['pairs_scored'] / t['pairs_full']:.1f}%)",
           f"{wall:.1f} (1st stage {info['seconds']['first_stage_s']:.1f}, 2nd stage "
           f"{info['seconds']['second_stage_s']:.1f})")


def _latency(fn, items) -> dict:
  times = []
  for x in items:
    t0 = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - t0)
  ms = 1000 * np.asarray(times)
  return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
          "max_ms": float(ms.max()), "n": len(ms)}


def bench_search() -> None:
  """Per-query latency of two-stage search (both directions) on the test gallery."""
  sl_dir = _FLAGS.shortlist_workdir.value
  gallery = search.Gallery.load(_FLAGS.workdir.value)
  config = gallery.encoder.config
  sl_config = Workdir(sl_dir).load_config()
  two_stage.check_shortlist_config(config, gallery.split_name, sl_config, sl_dir)
  first = search.Gallery.load(sl_dir, encoder=inference.load(sl_dir),
                              config=two_stage.shortlist_data_config(config, sl_config))
  n = min(_FLAGS.queries.value, gallery.num_images)
  texts = gallery.texts[:n * gallery.captions_per_image:gallery.captions_per_image]
  ids = gallery.image_ids[:n]
  print(f"gallery {gallery.split_name}: {gallery.num_images} images, "
        f"{gallery.num_captions} captions; re-ranker {config.model.name}, first stage "
        f"{sl_config.model.name} (exact index, {first.index('images').backend})\n")
  print("| K | direction | first query (compiles) ms | median ms | p99 ms | queries |")
  print("|---|---|---|---|---|---|")
  for k in _ks():
    sl = search.Shortlist(first, k=k)
    for label, fn, items in (
        ("text -> images", lambda q: search.search_text(gallery, q, 10, shortlist=sl), texts),
        ("image -> captions", lambda i: search.search_image(gallery, i, 10, shortlist=sl),
         ids)):
      t0 = time.perf_counter()
      fn(items[0])
      warm = 1000 * (time.perf_counter() - t0)
      lat = _latency(fn, items[1:])
      print(f"| {k} | {label} | {warm:.0f} | {lat['median_ms']:.1f} | {lat['p99_ms']:.1f} | "
            f"{lat['n']} |")
      sys.stdout.flush()


def _index_gallery(path: str):
  """(image embeddings (N, E), query caption embeddings (Q, E), query ground-truth
  images (Q,)) of the synthetic world's test split, encoded by the DSRAN workdir."""
  if os.path.exists(path):
    with np.load(path) as f:
      return f["images"], f["queries"], f["truth"]
  sl_dir, num_items = _FLAGS.shortlist_workdir.value, _FLAGS.num_items.value
  config = Workdir(sl_dir).load_config()
  if config.data.format != "synthetic":
    raise app.UsageError("--mode=index embeds the synthetic world: give a workdir trained "
                         "on data.format='synthetic'")
  config.data.synthetic.num_test_images = num_items
  matcher = inference.load(sl_dir)
  raw = data.read_raw_split(config, "test")
  keys = matcher.model.image_keys
  out = []
  t0 = time.time()
  for start in range(0, num_items, 1000):
    arrays = raw.read_images(np.arange(start, min(start + 1000, num_items)))
    out.append(matcher.encode_images(**{k: arrays[k] for k in keys if k in arrays}))
    logging.info("encoded %d/%d images (%.0fs)", start + len(out[-1]), num_items,
                 time.time() - t0)
  images = np.concatenate(out).astype(np.float32)
  q = min(_FLAGS.queries.value, num_items)
  # One caption per image, of images spread over the gallery.
  truth = np.linspace(0, num_items - 1, q).astype(np.int64)
  cpi = raw.captions_per_image
  queries = matcher.encode_texts([raw.texts[i * cpi] for i in truth]).astype(np.float32)
  atomic.save_npz(path, images=images, queries=queries, truth=truth)
  return images, queries, truth


def _clustered_gallery():
  """Unit vectors around random centres (a stand-in for embeddings of a large
  collection), and queries that are gallery items plus noise."""
  num_items, clusters, dim = _FLAGS.num_items.value, _FLAGS.clusters.value, _FLAGS.dim.value
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((clusters, dim)).astype(np.float32)
  x = centres[rng.integers(0, clusters, num_items)]
  x += 0.5 * rng.standard_normal(x.shape).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  truth = np.linspace(0, num_items - 1, min(_FLAGS.queries.value, num_items)).astype(np.int64)
  q = x[truth] + 0.05 * rng.standard_normal((len(truth), dim)).astype(np.float32)
  return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), truth


def bench_index() -> None:
  """Build time, bytes, memory, latency and recall of each index kind on a large gallery."""
  if _FLAGS.source.value == "model":
    path = _FLAGS.cache.value or os.path.join(_FLAGS.shortlist_workdir.value,
                                              f"bench_gallery_{_FLAGS.num_items.value}.npz")
    images, queries, truth = _index_gallery(path)
    what = "synthetic-world images embedded by DSRAN"
  else:
    images, queries, truth = _clustered_gallery()
    what = (f"clustered unit vectors ({_FLAGS.clusters.value} centres, noise 0.5; queries: "
            f"items + noise 0.05)")
  n, d = images.shape
  print(f"gallery: {n} x {d} {what} ({images.nbytes / 2**20:.0f} MiB), {len(queries)} "
        f"queries; faiss {__import__('faiss').__version__ if index.have_faiss() else 'absent'}"
        f", {os.cpu_count()} CPUs\n")
  _, exact_ids = index.numpy_search(images, queries, 100)
  gt_at_100 = float(np.mean([t in row for t, row in zip(truth, exact_ids)]))
  print("| index | build s | index MiB | RSS growth MiB | query median ms | p99 ms | "
        "recall@10 vs exact | recall@100 vs exact |")
  print("|---|---|---|---|---|---|---|---|")
  for kind in [k for k in _FLAGS.kinds.value.split(",") if k]:
    backends = ("numpy", "faiss") if kind == "exact" else ("faiss",)
    for backend in [b for b in backends if b == "numpy" or index.have_faiss()]:
      rss0 = _rss_mb()
      idx = index.build(images, kind, backend=backend, recall_queries=queries, recall_k=10)
      grown = _rss_mb() - rss0
      lat = _latency(lambda q, idx=idx: idx.search(q[None], 100), queries)
      _, got = idx.search(queries, 100)
      r10 = index.recall_at_k(got[:, :10], exact_ids[:, :10])
      r100 = index.recall_at_k(got, exact_ids)
      print(f"| {kind} ({backend}{', ' + json.dumps(idx.params) if idx.params else ''}) | "
            f"{idx.build_s:.2f} | {idx.nbytes / 2**20:.0f} | {grown:.0f} | "
            f"{lat['median_ms']:.2f} | {lat['p99_ms']:.2f} | {r10:.4f} | {r100:.4f} |")
      sys.stdout.flush()
      del idx
  print(f"\nground truth in the exact top 100 (first-stage R@100): {100 * gt_at_100:.1f}%;"
        f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  return types.SimpleNamespace(
      mode=flags.DEFINE_enum("mode", "eval", ["eval", "search", "index"], "What to measure."),
      workdir=flags.DEFINE_string("workdir", "", "The re-ranking workdir (eval, search)."),
      shortlist_workdir=flags.DEFINE_string(
          "shortlist_workdir", "", "The first stage's (embedding model) workdir."),
      k=flags.DEFINE_string("k", "10,20,50",
                            "Comma-separated shortlist sizes (eval, search)."),
      fusion=flags.DEFINE_string("fusion", "0",
                                 "Comma-separated eval.shortlist_fusion weights (eval)."),
      full=flags.DEFINE_bool("full", True, "Also run the full evaluation (eval)."),
      num_items=flags.DEFINE_integer("num_items", 100_000, "Gallery size (index)."),
      queries=flags.DEFINE_integer("queries", 1000, "Queries (index: latency and recall; "
                                   "search: per direction)."),
      kinds=flags.DEFINE_string("kinds", "exact,ivf,hnsw", "Index kinds (index)."),
      source=flags.DEFINE_enum(
          "source", "model", ["model", "clustered"], "Index mode's gallery: 'model': "
          "synthetic-world images embedded by --shortlist_workdir's DSRAN; 'clustered': unit "
          "vectors around --clusters random centres (queries: gallery items plus noise, "
          "their own item the ground truth)."),
      dim=flags.DEFINE_integer("dim", 256, "Embedding width of --source=clustered."),
      clusters=flags.DEFINE_integer("clusters", 1000, "Centres of --source=clustered."),
      cache=flags.DEFINE_string("cache", "", "Where to keep the index mode's embeddings "
                                "(.npz); default: "
                                "{shortlist_workdir}/bench_gallery_{num_items}.npz."),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mode = _FLAGS.mode.value
  if not _FLAGS.shortlist_workdir.value and not (mode == "index" and
                                                 _FLAGS.source.value == "clustered"):
    raise app.UsageError("--shortlist_workdir is required")
  if mode in ("eval", "search") and not _FLAGS.workdir.value:
    raise app.UsageError(f"--mode={mode} needs --workdir (the re-ranker)")
  {"eval": bench_eval, "search": bench_search, "index": bench_index}[mode]()


if __name__ == "__main__":
  _FLAGS = _define_flags()
  cli.run_cli(main)  # user errors: one `error:` line, exit 2

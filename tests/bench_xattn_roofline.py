"""SCAN gallery scoring against the fp32 matmul roofline, today's code beside a baseline.

    python tests/bench_xattn_roofline.py --baseline=ac28886 [--direction=i2t]

Scores random l2-normalised regions (I x 36 x 1024) against captions padded to
`--max_len` words with lengths uniform in `--min_len`..`--max_len` (zero past the length),
in tiles of 128 images x 256 captions through `pairwise_xattn_scores` at SCAN's defaults
(what `SCAN.score` runs under `evaluation.ModelScorer`), one tile dispatched ahead of the
one fetched. With `--baseline=COMMIT` the same gallery is also scored by that commit's
`common/cross_attention.py` (read with `git show`), the two sides alternating in every
repeat so both see the same load, and their largest score difference is printed.

The counted work is SCAN's per pair over the caption's real words n (what its loop
computes, padding excluded): logits 2 k n d, attended contexts 2 k n d and the cosines
6 n d. The share is that work over the median wall time and the best fp32 (n x n) matmul
timed in this process (before and after the scoring, the better of the two). Prints one
JSON line.
"""
import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top

from dsran_jax import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top
from dsran_jax.models.common import cross_attention  # noqa: E402

TILE = (128, 256)
LAMBDAS = {"t2i": 9.0, "i2t": 4.0}


def _load() -> float:
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def baseline_module(commit: str):
  """`common/cross_attention.py` as of `commit`, imported as a standalone module."""
  src = subprocess.run(
      ["git", "-C", ROOT, "show", f"{commit}:dsran_jax/models/common/cross_attention.py"],
      check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "xattn_baseline.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("xattn_baseline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def gallery(args):
  rng = np.random.default_rng(args.seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  regions = unit(rng.standard_normal((args.images, args.regions, args.embed), np.float32))
  lengths = rng.integers(args.min_len, args.max_len + 1, args.captions)
  word_mask = np.arange(args.max_len)[None] < lengths[:, None]
  words = unit(rng.standard_normal((args.captions, args.max_len, args.embed), np.float32))
  words = words * word_mask[..., None]
  return regions, np.ones(regions.shape[:2], bool), words, word_mask, lengths


def score_gallery(fn, regions, region_mask, words, word_mask) -> np.ndarray:
  """Every tile once, the next tile dispatched before the last one is fetched."""
  n_img, n_cap = regions.shape[0], words.shape[0]
  ti, tj = TILE
  out = np.empty((n_img, n_cap), np.float32)
  pending = None
  text = [(jnp.asarray(words[j:j + tj]), jnp.asarray(word_mask[j:j + tj]))
          for j in range(0, n_cap, tj)]
  for i in range(0, n_img, ti):
    r, m = jnp.asarray(regions[i:i + ti]), jnp.asarray(region_mask[i:i + ti])
    for k, j in enumerate(range(0, n_cap, tj)):
      block = fn(r, m, *text[k])
      if pending is not None:
        pi, pj, pb = pending
        out[pi:pi + ti, pj:pj + tj] = np.asarray(pb)
      pending = (i, j, block)
  pi, pj, pb = pending
  out[pi:pi + ti, pj:pj + tj] = np.asarray(pb)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--captions", type=int, default=1280)
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--embed", type=int, default=1024)
  p.add_argument("--min_len", type=int, default=12)
  p.add_argument("--max_len", type=int, default=20)
  p.add_argument("--direction", choices=("t2i", "i2t"), default="t2i")
  p.add_argument("--agg_func", default="LogSumExp")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--baseline", default="", help="a commit to compare with")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  if args.images % TILE[0] or args.captions % TILE[1]:
    raise SystemExit(f"--images and --captions must be multiples of the tile {TILE}")
  regions, region_mask, words, word_mask, lengths = gallery(args)
  k, d = args.regions, args.embed
  counted = float(np.sum(lengths)) * args.images * (4 * k * d + 6 * d)
  kw = dict(direction=args.direction, lambda_softmax=LAMBDAS[args.direction],
            agg_func=args.agg_func, lambda_lse=6.0, norm="clipped_l2norm",
            max_elements=1 << 25)
  sides = {"today": jax.jit(functools.partial(cross_attention.pairwise_xattn_scores, **kw))}
  if args.baseline:
    old = baseline_module(args.baseline)
    sides[args.baseline] = jax.jit(functools.partial(old.pairwise_xattn_scores, **kw))
  load0 = _load()
  peak0 = benchmark.matmul_peak_gflops((2048, 4096))["matmul_peak_gflops"]
  scores = {}
  for name, fn in sides.items():  # compiles
    scores[name] = score_gallery(fn, regions, region_mask, words, word_mask)
  walls = {name: [] for name in sides}
  cpus = {name: [] for name in sides}
  for _ in range(args.repeats):
    for name, fn in sides.items():
      t, c = time.perf_counter(), sum(os.times()[:2])
      score_gallery(fn, regions, region_mask, words, word_mask)
      walls[name].append(time.perf_counter() - t)
      cpus[name].append(sum(os.times()[:2]) - c)
  peak1 = benchmark.matmul_peak_gflops((2048, 4096))["matmul_peak_gflops"]
  peak = max(peak0, peak1)
  result = {"direction": args.direction, "images": args.images, "captions": args.captions,
            "lengths": [args.min_len, args.max_len], "counted_tflop": counted / 1e12,
            "matmul_peak_gflops": [round(peak0, 1), round(peak1, 1)],
            "load": [load0, _load()], "cpu_model": benchmark._device_info()["cpu_model"]}
  for name in sides:
    wall = statistics.median(walls[name])
    result[name] = {"score_s": round(wall, 3), "score_s_min": round(min(walls[name]), 3),
                    "cpu_s": round(statistics.median(cpus[name]), 2),
                    "gflops": round(counted / wall / 1e9, 1),
                    "roofline_share": round(counted / wall / 1e9 / peak, 3),
                    "max_abs_diff_vs_today": float(np.abs(scores[name] - scores["today"]).max())}
  print(json.dumps(result))


if __name__ == "__main__":
  main()

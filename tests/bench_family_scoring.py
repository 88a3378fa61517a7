"""A family's `score` today beside a baseline commit's, in one process.

    python tests/bench_family_scoring.py --model=mlasm --baseline=9df9fdb [--repeats=5]
        [--set model.mlasm.ratio=1.0]

Builds the family at the benchmark's scoring shape (`dsran_jax.benchmark` flags:
`--score_images`, `--score_captions`, `--regions`, `--embed_size`, `--seq_len`, default
128 x 256, 36, 1024, 20), encodes random inputs once, and times the jitted `score` of one
tile with today's model class and with the same class from the baseline commit's
`dsran_jax/models/<family>/model.py` (read with `git show`; it must work with today's
`models/common`), the two alternating in every repeat so both see the same load. Prints
one JSON line: per side the median wall and CPU seconds, XLA's flops per pair (a 1 x 64
tile) and the share of the best fp32 matmul timed before and after; the largest score
difference between the sides; the load average before and after.
"""
import argparse
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

from dsran_jax import benchmark, models  # noqa: E402  pylint: disable=g-import-not-at-top
from dsran_jax.models.variables import init_variables  # noqa: E402


def _load() -> float:
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def baseline_model_module(commit: str, family: str):
  """`dsran_jax/models/<family>/model.py` as of `commit`, imported standalone."""
  src = subprocess.run(
      ["git", "-C", ROOT, "show", f"{commit}:dsran_jax/models/{family}/model.py"],
      check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f"{family}_baseline.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location(f"{family}_baseline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--baseline", required=True, help="a commit to compare with")
  p.add_argument("--repeats", type=int, default=5)
  own, rest = p.parse_known_args()
  shape = ["--score_images=128", "--score_captions=256", "--regions=36",
           "--embed_size=1024", "--seq_len=20"]
  args = benchmark.parse_args(shape + rest)
  config = benchmark.make_config(args)
  model = models.build_model(config.model, vocab_size=args.vocab_size)
  old = baseline_model_module(own.baseline, args.model)
  sides = {"today": model,
           own.baseline: getattr(old, type(model).__name__)(config=model.config)}
  variables = init_variables(model, jax.random.PRNGKey(args.seed))
  rng = np.random.default_rng(args.seed)
  n_img, n_cap = args.score_images, args.score_captions
  images = benchmark.random_batch(rng, n_img, args, model=model, wordpiece=False,
                                  with_text=False)
  texts = benchmark.random_batch(rng, n_cap, args, model=model, wordpiece=False,
                                 with_images=False)
  img = jax.jit(lambda v, b: model.apply(v, b, method="encode_images"))(variables, images)
  txt = jax.jit(lambda v, b: model.apply(v, b, method="encode_texts"))(variables, texts)
  fns = {n: jax.jit(lambda v, i, t, m=m: m.apply(v, i, t, method="score"))
         for n, m in sides.items()}
  first = lambda tree, n: jax.tree.map(lambda a: a[:n], tree)
  flops = {n: benchmark._flops(f.lower(variables, first(img, 1), first(txt, 64)).compile())
           / 64 for n, f in fns.items()}
  scores = {n: np.asarray(f(variables, img, txt)) for n, f in fns.items()}  # compiles
  load0 = _load()
  peak0 = benchmark.matmul_peak_gflops((2048, 4096))["matmul_peak_gflops"]
  walls = {n: [] for n in fns}
  cpus = {n: [] for n in fns}
  for _ in range(own.repeats):
    for n, f in fns.items():
      t, c = time.perf_counter(), sum(os.times()[:2])
      f(variables, img, txt).block_until_ready()
      walls[n].append(time.perf_counter() - t)
      cpus[n].append(sum(os.times()[:2]) - c)
  peak1 = benchmark.matmul_peak_gflops((2048, 4096))["matmul_peak_gflops"]
  peak = max(peak0, peak1)
  result = {"model": args.model, "tile": [n_img, n_cap], "load": [load0, _load()],
            "matmul_peak_gflops": [round(peak0, 1), round(peak1, 1)],
            "max_abs_diff": float(np.abs(scores["today"] - scores[own.baseline]).max())}
  for n in fns:
    wall = statistics.median(walls[n])
    gflops = flops[n] * n_img * n_cap / wall / 1e9
    result[n] = {"score_s": round(wall, 3), "score_s_min": round(min(walls[n]), 3),
                 "cpu_s": round(statistics.median(cpus[n]), 3), "flops_per_pair": flops[n],
                 "gflops": round(gflops, 1), "roofline_share": round(gflops / peak, 3)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()

"""DSRAN's online grid against precomputed grids: the train step's cost, side by side in
one process (`dsran_jax.benchmark`'s timed step: median of `--steps` after compilation),
plus the input pipeline's cost per training view (decode + RandomResizedCrop + flip).

    PYTHONPATH=. python tests/bench_online_grid.py --batch_size=8 --steps=3 \
        [--bert_layers=12 --bert_hidden=768] [--cnn=resnet152|tiny] [--crop=224]

Prints one JSON line per path and one for the pipeline; the ratio line compares the two
steps timed in this process (the machine's other load is in each line's
`other_load_cores` / `loadavg_1m`).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from dsran_jax import benchmark
from dsran_jax.data import images as images_lib

CNNS = {"resnet152": ("(3, 8, 36, 3)", "(64, 128, 256, 512)", 2048),
        "tiny": ("(1, 1, 1, 1)", "(8, 16, 32, 64)", 256)}


def pipeline_cost(crop: int, n: int = 32) -> dict:
  """Seconds per training view of a 500x375 JPEG (decode + crop + resize + flip), one
  thread, median of `n`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "x.jpg")
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC).save(path, quality=90)
    times = []
    for k in range(n):
      t = time.perf_counter()
      with Image.open(path) as im:
        images_lib.train_view(im.convert("RGB"), crop, images_lib.view_rng((0, k, 0)))
      times.append(time.perf_counter() - t)
  return {"mode": "pipeline", "view_s": statistics.median(times), "crop": crop,
          "source": "500x375 JPEG"}


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--cnn", choices=sorted(CNNS), default="resnet152")
  p.add_argument("--crop", type=int, default=224)
  args, rest = p.parse_known_args(argv)
  depths, widths, channels = CNNS[args.cnn]
  common = [f"--img_dim={channels}", *rest]
  online = ["--set", "model.dsran.image_inputs=image+regions",
            "--set", f"model.dsran.cnn_depths={depths}",
            "--set", f"model.dsran.cnn_widths={widths}",
            "--set", f"model.dsran.crop_size={args.crop}",
            "--set", f"model.dsran.resize_size={args.crop * 8 // 7}",
            "--set", "model.dsran.cnn_random_init=True"]
  out = {}
  for name, extra in (("precomputed", []), ("online", online)):
    r = benchmark.benchmark_train(benchmark.parse_args(common + extra))
    r["path"] = name
    out[name] = r
    print(json.dumps({k: r[k] for k in ("path", "batch_size", "step_s", "step_s_min",
                                         "step_s_max", "flops_per_step", "compile_s",
                                         "other_load_cores", "loadavg_1m")
                      if k in r}), flush=True)
  print(json.dumps({"online_over_precomputed_step": out["online"]["step_s"]
                    / out["precomputed"]["step_s"],
                    "online_over_precomputed_flops": out["online"]["flops_per_step"]
                    / out["precomputed"]["flops_per_step"]}), flush=True)
  print(json.dumps(pipeline_cost(args.crop)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

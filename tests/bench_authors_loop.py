"""Side-by-side gallery scoring: dsran_jax's tiled `score` vs the authors' shard loop.

    python tests/bench_authors_loop.py --model=scan --images=256 --captions=1280
    python tests/bench_authors_loop.py --model=sgraf --images=256 --captions=1280

Runs, on the same CPU and one after the other (so both see the same load), the
benchmark's score mode (`python -m dsran_jax.benchmark --model=M --score_images=I
--score_captions=J`, its own process) and the authors' evaluation loop written from
their code (SCAN: `shard_xattn_t2i`; SGRAF: `shard_attn_scores` with a random
`EncoderSimilarity`), in the torch reference process of tests/torchref. Both score
random l2-normalised regions (36 x 1024) and captions padded to 32 words with lengths
uniform in 8..32. Prints each side's wall and CPU seconds, the load seen, and the
speed-up as one JSON line. Needs torch (the test install).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

EMBED, REGIONS, SEQ_LEN = 1024, 36, 32
# What each family's side runs: benchmark overrides and the reference function.
SETUPS = {
    "scan": {"set": ["model.scan.cross_attn=t2i", "model.scan.agg_func=LogSumExp",
                     "model.scan.raw_feature_norm=clipped_l2norm"],
             "ref": "scan.time_shard_xattn",
             "ref_kwargs": {"opt": {"cross_attn": "t2i", "agg_func": "LogSumExp",
                                    "raw_feature_norm": "clipped_l2norm",
                                    "lambda_softmax": 9.0, "lambda_lse": 6.0}}},
    "sgraf": {"set": ["model.sgraf.module=SGR", "model.sgraf.sim_dim=256"],
              "ref": "sgraf.time_shard_attn",
              "ref_kwargs": {"module_name": "SGR", "sim_dim": 256}},
}


def _load() -> float:
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def ours(model: str, images: int, captions: int, repeats: int) -> dict:
  cmd = [sys.executable, "-m", "dsran_jax.benchmark", f"--model={model}",
         f"--score_images={images}", f"--score_captions={captions}",
         f"--score_repeats={repeats}", f"--embed_size={EMBED}", f"--regions={REGIONS}",
         f"--seq_len={SEQ_LEN}"]
  for kv in SETUPS[model]["set"]:
    cmd += ["--set", kv]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def authors(model: str, images: int, captions: int, threads: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from torchref import TorchRef  # pylint: disable=g-import-not-at-top
  setup = SETUPS[model]
  lengths = np.random.default_rng(0).integers(8, SEQ_LEN + 1, captions)
  ref = TorchRef()
  try:
    return ref(setup["ref"], n_images=images, n_captions=captions, n_regions=REGIONS,
               embed_size=EMBED, lengths=lengths, threads=threads, repeats=1,
               **setup["ref_kwargs"])
  finally:
    ref.close()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=sorted(SETUPS), required=True)
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--captions", type=int, default=1280)
  p.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median)")
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch intra-op threads of the authors' loop")
  args = p.parse_args()
  load0 = _load()
  t = time.perf_counter()
  mine = ours(args.model, args.images, args.captions, args.repeats)
  theirs = authors(args.model, args.images, args.captions, args.threads)
  result = {
      "model": args.model, "images": args.images, "captions": args.captions,
      "ours_s": mine["score_s"], "ours_cpu_s": mine["score_cpu_s"],
      "ours_pairs_per_s": mine["pairs_per_s"], "ours_tile": mine["tile"],
      "authors_s": theirs["median_s"], "authors_cpu_s": theirs["median_cpu_s"],
      "authors_threads": theirs["threads"], "torch": theirs["torch"],
      "speedup_wall": theirs["median_s"] / mine["score_s"],
      "speedup_cpu": theirs["median_cpu_s"] / mine["score_cpu_s"],
      "load_start": load0, "load_end": _load(), "total_s": time.perf_counter() - t,
      "cpu_model": mine.get("cpu_model"), "cpu_count": mine.get("cpu_count"),
      "date": mine.get("date")}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()

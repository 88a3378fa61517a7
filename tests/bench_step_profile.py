"""Where a train step's time goes on CPU: one traced step of `dsran_jax.benchmark`'s step.

    PYTHONPATH=. python tests/bench_step_profile.py [benchmark flags, e.g. --bf16]

Defaults to the shape of docs/benchmarks.md (batch 32, embed 1024, BERT 6x384, K=2, 100
regions, 32 tokens). Times the step (median of 3 after 2 warm-ups), times every dot of
the compiled step alone (`benchmark.dot_mix_seconds`), then traces one step with
`jax.profiler` and sums XLA:CPU's thunk events per kind: matmuls (YNNPACK fusions and
dots) and everything else (elementwise fusions, transposes, reductions, the optimiser),
and the time inside the executor's span in which no event is open (dots that XLA hands
to Eigen run asynchronously and are not traced as events, so most of it is theirs).
Prints one JSON line. The trace stays in `--trace_dir` for TensorBoard or Perfetto.
"""
import argparse
import collections
import glob
import json
import os
import re
import shutil
import statistics
import sys
import time

import jax
from jax._src import profiler as jax_profiler  # ProfileData: the trace's events

from dsran_jax import benchmark

DEFAULT_SHAPE = ["--batch_size=32", "--embed_size=1024", "--bert_layers=6",
                 "--bert_hidden=384", "--K=2", "--regions=100", "--seq_len=32"]


def _events(trace_dir: str) -> list:
  """(start_ns, end_ns, name) of every thunk event on XLA's worker threads."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  skip = ("end:", "Threadpool", "Slinky", "ThunkExecutor")
  out = []
  for plane in jax_profiler.ProfileData.from_file(path).planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      out += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
              if not e.name.startswith(skip)]
  return out


def _untraced_ns(events: list) -> int:
  """Time inside the events' span in which no event is open."""
  events = sorted(events)
  idle, end = 0, events[0][1]
  for start, stop, _ in events[1:]:
    idle += max(0, start - end)
    end = max(end, stop)
  return idle


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--trace_dir", default="/tmp/dsran_step_trace")
  own, rest = p.parse_known_args()
  args = benchmark.parse_args(DEFAULT_SHAPE + rest)
  compiled, state, batches, _, _ = benchmark.compile_train_step(args)
  for i in range(2):
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
  times = []
  for i in range(3):
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  shutil.rmtree(own.trace_dir, ignore_errors=True)
  jax.profiler.start_trace(own.trace_dir)
  state, metrics = compiled(state, batches[0])
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  events = _events(own.trace_dir)
  is_dot = lambda name: name.startswith("ynn_fusion") or re.fullmatch(r"dot(\.\d+)?", name)
  kinds = collections.Counter()
  for start, stop, name in events:
    if not is_dot(name):
      kinds[re.sub(r"[.\d]+$", "", name)] += stop - start
  dots = benchmark.hlo_dots(compiled.as_text())
  flops = benchmark._flops(compiled)  # pylint: disable=protected-access
  dot_mix_s = benchmark.dot_mix_seconds(dots)
  peak = benchmark.matmul_peak_gflops((2048,))["matmul_peak_gflops"]
  step_s = statistics.median(times)
  span = max(e[1] for e in events) - min(e[0] for e in events)
  print(json.dumps({
      "step_s": round(step_s, 3), "flops_per_step": flops, "matmul_peak_gflops": round(peak, 1),
      "mfu": round(flops / step_s / 1e9 / peak, 3),
      "dot_mix_s": round(dot_mix_s, 3), "dot_mix_bound": round(flops / dot_mix_s / 1e9 / peak, 3),
      "dot_gflops": round(sum(d[-1] for d in dots) / 1e9, 1),
      "traced_span_s": round(span / 1e9, 3),
      "traced_dot_events_s": round(sum(b - a for a, b, n in events if is_dot(n)) / 1e9, 3),
      "untraced_in_span_s": round(_untraced_ns(events) / 1e9, 3),
      "non_dot_thread_s": round(sum(kinds.values()) / 1e9, 3),
      "non_dot_top_ms": {k: round(v / 1e6, 1) for k, v in kinds.most_common(12)},
      "loadavg_1m": os.getloadavg()[0], "cpu_model": benchmark._device_info()["cpu_model"],  # pylint: disable=protected-access
  }))


if __name__ == "__main__":
  sys.exit(main())

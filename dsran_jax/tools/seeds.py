"""Results over seeds: every metric of several runs as mean ± standard deviation.

    python -m dsran_jax.tools.seeds --results=run1 --results=run2 --results=run3 [--json]

Each `--results` is a run's `eval_results.json` (or its workdir), or a `tools.rank` JSON
output. Every number outside `protocol` (COCO 5K / 1K recalls, `eccv`, `cxc`, `pmrp`, ...;
sizes and steps excepted) is reported as mean ± sample standard deviation (ddof 1) with
the run count. Runs are only comparable under one protocol: their `protocol` records,
split and sizes must agree (an error names the first difference), and every run must hold
the same metrics. Prints a table, or with `--json` one JSON object (`runs`, `files`,
`metrics`: {name: {mean, std, n, values}}, `protocol`); `--out=FILE` also writes the JSON.
"""
import json
import math
import os
import types
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from dsran_jax import atomic, cli

RESULTS_FILE = "eval_results.json"
# Entries of eval_results.json that describe the run, not a metric of it.
NOT_METRICS = ("protocol", "split", "model", "checkpoint_step", "num_images",
               "num_captions", "two_stage")
SAME = ("split", "model", "num_images", "num_captions")


def read_results(path: str) -> dict:
  """A run's results: `path` itself, or `path/eval_results.json` for a directory."""
  if os.path.isdir(path):
    path = os.path.join(path, RESULTS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (a run's {RESULTS_FILE} or tools.rank output)")
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a JSON results file: {e}") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object of results")
  return obj


def flatten(results: dict) -> Dict[str, float]:
  """{dotted name: value} of every number outside the run's description
  (`coco5k.r1_i2t`, `eccv.i2t.map@r`, `r1_i2t` for tools.rank output)."""
  out = {}

  def walk(prefix: str, node):
    if isinstance(node, bool):
      return
    if isinstance(node, (int, float)):
      out[prefix] = float(node)
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)

  for key, value in results.items():
    if key not in NOT_METRICS:
      walk(key, value)
  return out


def _first_difference(a, b, where: str = "") -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b), key=str):
      if k not in a or k not in b:
        return f"{where}{k} (in one run only)"
      d = _first_difference(a[k], b[k], f"{where}{k}.")
      if d:
        return d
    return ""
  return "" if a == b else f"{where.rstrip('.')} ({a!r} vs {b!r})"


def aggregate(runs: Sequence[Tuple[str, dict]]) -> dict:
  """Mean ± std of every metric of `runs` ([(name, results)]), checked comparable."""
  if len(runs) < 2:
    raise ValueError(f"results over seeds need at least 2 runs, got {len(runs)}")
  first_name, first = runs[0]
  names = flatten(first)
  if not names:
    raise ValueError(f"{first_name}: no metrics found")
  for name, res in runs[1:]:
    for key in SAME:
      if res.get(key) != first.get(key):
        raise ValueError(f"{name}: {key} {res.get(key)!r}, but {first_name} has "
                         f"{first.get(key)!r}: runs over seeds must be evaluated alike")
    diff = _first_difference(first.get("protocol"), res.get("protocol"), "protocol.")
    if diff:
      raise ValueError(f"{name}: its protocol differs from {first_name}'s at {diff}")
    got = flatten(res)
    if set(got) != set(names):
      extra = sorted(set(got) ^ set(names))
      raise ValueError(f"{name}: its metrics differ from {first_name}'s: "
                       f"{', '.join(extra[:5])}")
  metrics = {}
  for key in names:
    values = [flatten(res)[key] for _, res in runs]
    metrics[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)),
                    "n": len(values), "values": values}
  return {"runs": len(runs), "files": [n for n, _ in runs], "metrics": metrics,
          "protocol": first.get("protocol"),
          "std": "sample standard deviation (ddof 1) over the runs"}


def format_table(summary: dict) -> str:
  """`metric  mean ± std  (n runs)`, one line a metric."""
  width = max(len(k) for k in summary["metrics"])
  lines = [f"{'metric':<{width}}  {'mean ± std':>17}  runs"]
  for key, m in summary["metrics"].items():
    std = "nan" if math.isnan(m["std"]) else f"{m['std']:.2f}"
    lines.append(f"{key:<{width}}  {m['mean']:9.2f} ± {std:<5}  {m['n']}")
  return "\n".join(lines)


def _define_flags() -> types.SimpleNamespace:
  return types.SimpleNamespace(
      results=flags.DEFINE_multi_string(
          "results", None, "A run's eval_results.json (or its workdir) or a tools.rank "
          "JSON; repeat, one per seed."),
      json=flags.DEFINE_bool("json", False, "Print one JSON object instead of a table."),
      out=flags.DEFINE_string("out", "", "Also write the JSON summary to this file."),
  )


def main(argv: List[str]):
  f = _FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.results.value:
    raise app.UsageError("give --results=RUN for each run (at least 2)")
  summary = aggregate([(p, read_results(p)) for p in f.results.value])
  if f.out.value:
    if os.path.exists(f.out.value):
      raise FileExistsError(f"{f.out.value}: exists; not overwritten (--out)")
    atomic.write_json(f.out.value, summary, indent=1)
  print(json.dumps(summary) if f.json.value else format_table(summary))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  cli.run_cli(main, errors=(OSError, ValueError), exit_code=1)

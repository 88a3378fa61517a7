"""Throughput of the real train step of any model family, of gallery scoring, and of
DSRAN's COCO 5K encoding + ranking.

    python -m dsran_jax.benchmark --batch_size=32 --embed_size=1024 --bert_layers=6 \
        --bert_hidden=384 --K=2 --regions=100 --seq_len=32 --steps=10 [--bf16]
    python -m dsran_jax.benchmark --model=scan --batch_size=128 --regions=36 --steps=5
    python -m dsran_jax.benchmark --model=scan --score_images=256 --score_captions=1280 \
        --regions=36 --embed_size=1024
    python -m dsran_jax.benchmark --eval --eval_images=500 [same model flags]
    python -m dsran_jax.benchmark --suite=device --out_dir=DIR   # on a GPU or TPU

The device suite (`--suite=device`) runs the three modes below at fixed shapes in one
call (minutes on one accelerator; tiny shapes on CPU, `--suite_size`): the DSRAN
BERT-base bf16 train step at batch 128 with its MFU against the card's datasheet bf16
peak, scoring of SCAN, SGRAF (and CHAN when registered) with their share of the fp32
matmul peak timed in the same process, COCO 5K encoding and ranking, and peak memory;
it prints one JSON line and writes `device_suite.json` and `device_suite.md`.

Train mode builds the model at the given shape (BERT with random weights), random
inputs, and the step `dsran_jax.train` trains with (`make_train_step` + `jit_train_step`
over a mesh of every device, donated state, BertAdam with the recipe's schedule). It
times `--steps` steps after compilation, each waited for with `block_until_ready`, and
prints one JSON line:

  pairs_per_s         batch_size / step_s
  step_s              median step time (s); step_s_min / step_s_max beside it
  compile_s           lowering + XLA compilation of the step
  flops_per_step      XLA cost analysis of the compiled step (forward, backward, update)
  matmul_peak_gflops  best rate of a large fp32 matmul timed in this process
  mfu                 flops_per_step / step_s / matmul peak
  matmul_peak_bf16_gflops, mfu_bf16
                      with --bf16: the same against a bf16 matmul (fp32 sums) timed here
  matmul_flops_per_step, matmul_mfu
                      the same with only the compiled step's dot products counted
                      (cost analysis also counts elementwise work, e.g. dropout hashing)
  dot_mix_s, dot_mix_gflops, dot_mix_bound
                      with --dot_mix: the step's dots each timed alone, summed
                      (`dot_mix_seconds`), their rate, and the mfu the step would have if
                      it took only that long: what its matmul shapes allow at best
  step_cpu_s          median process CPU time (all threads) per step
  other_load_cores    CPU used by other processes during the timed steps, in cores:
                      on a shared machine, timings are only comparable when it is ~0
  peak_memory_bytes   device memory_stats()["peak_bytes_in_use"] where the backend keeps
                      it, else the process's max RSS (`peak_memory_source` says which)

`--model=NAME` picks the family (default dsran, whose BERT has random weights at the
`--bert_*` shape; families with a word vocabulary get `--vocab_size` words), with the
family's defaults for everything the flags do not set; `--set KEY=VALUE` (repeatable)
overrides any config key after the flags (`--set model.bssan.w2r=coupled`,
`--set model.dsran.image_inputs=regions`). DSRAN's flags (`--K`, `--pos_dim`,
`--text_padding`, `--bert_*`) are `--set model.dsran.*` defaults (`dsran_overrides`).

Scoring mode (`--score_images=I --score_captions=J`) encodes I random images and J random
captions (not timed), then times `evaluation.ModelScorer.score_into` over the whole
I x J gallery, the tiled scoring evaluation uses (tile `--tile_images` x
`--tile_captions`, default the family's; on every device), and prints `score_s` (median
of `--score_repeats` runs), `pairs_per_s`, `flops_per_pair` (XLA's cost analysis of a
small tile of (devices x 64) pairs, which no family splits into blocks, divided by its
pairs), the tile and `first_run_s` (compilation included), the fp32 matmul peak timed
in the same process afterwards (`matmul_peak_gflops`, `--peak_size`) and
`roofline_share` = flops_per_pair x pairs / score_s / that peak.

Eval mode (`--eval`) encodes `--eval_images` images and 5x as many captions with the
jitted eval-mode `embed_images` / `embed_texts` (batches of `--eval_batch_size`), reports
items/s and the time extrapolated to COCO 5K (5000 images, 25000 captions), then scores
and ranks a full 5000 x 25000 matrix with `dsran_jax.ranking` (i2t and t2i ranks, R@K).
"""
import argparse
import collections
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from dsran_jax import atomic, cli, evaluation, models, optim, ranking, train, validation
from dsran_jax.core import precision
from dsran_jax.core.batch import KEY_SPECS, key_shape
from dsran_jax.default_config import ConfigError, get_base_config
from dsran_jax.models.variables import init_variables

COCO5K_IMAGES = 5000
CAPTIONS_PER_IMAGE = 5


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Command-line flags (see the module docstring)."""
  p = argparse.ArgumentParser(prog="python -m dsran_jax.benchmark", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--embed_size", type=int, default=1024)
  p.add_argument("--bert_layers", type=int, default=6)
  p.add_argument("--bert_hidden", type=int, default=384)
  p.add_argument("--bert_heads", type=int, default=0, help="0: bert_hidden // 64")
  p.add_argument("--bert_intermediate", type=int, default=0, help="0: 4 * bert_hidden")
  p.add_argument("--K", type=int, default=2)
  p.add_argument("--regions", type=int, default=100)
  p.add_argument("--seq_len", type=int, default=32)
  p.add_argument("--img_dim", type=int, default=2048)
  p.add_argument("--pos_dim", type=int, default=1607)
  p.add_argument("--text_padding", default="masked", choices=("masked", "reference"))
  p.add_argument("--steps", type=int, default=10, help="timed steps (after 1 warm-up step)")
  p.add_argument("--warmup_steps", type=int, default=1)
  p.add_argument("--bf16", action="store_true",
                 help="model.dtype='bfloat16' (float32 on a CPU without native bf16 unless "
                      "--set model.bf16_on_cpu=always; the output's compute_dtype says which)")
  p.add_argument("--dot_mix", action="store_true",
                 help="train mode: also time every dot of the step alone (dot_mix_s)")
  p.add_argument("--peak_size", type=int, default=0,
                 help="matmul size for the peak; 0: best of 2048 and 4096")
  p.add_argument("--peak_min_time", type=float, default=1.0,
                 help="seconds each size of the peak matmul is timed for (3 calls at least)")
  p.add_argument("--eval", action="store_true", help="time encoding + COCO 5K ranking")
  p.add_argument("--eval_images", type=int, default=COCO5K_IMAGES)
  p.add_argument("--eval_batch_size", type=int, default=128)
  p.add_argument("--rank_images", type=int, default=COCO5K_IMAGES,
                 help="images of the ranked sims matrix (captions: 5x)")
  p.add_argument("--model", default="dsran", help="model family (dsran_jax.models)")
  p.add_argument("--vocab_size", type=int, default=10000,
                 help="word vocabulary of families that use one")
  p.add_argument("--score_images", type=int, default=0,
                 help="time scoring an I x J gallery (with --score_captions)")
  p.add_argument("--score_captions", type=int, default=0)
  p.add_argument("--score_repeats", type=int, default=3)
  p.add_argument("--tile_images", type=int, default=0, help="0: the family's default")
  p.add_argument("--tile_captions", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--suite", default="", choices=("", "device"),
                 help="device: the accelerator suite (train step, scoring, COCO 5K "
                      "encoding and ranking), one JSON and a markdown table")
  p.add_argument("--suite_size", default="auto", choices=("auto", "full", "tiny"),
                 help="auto: full shapes on an accelerator, tiny ones on CPU")
  p.add_argument("--out_dir", default="", help="--suite: where the JSON and table go")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override applied after the flags, e.g. "
                      "model.bssan.w2r=coupled (repeatable; parsed as the key's type)")
  return p.parse_args(argv)


# DSRAN's shape flags are `--set` defaults, applied before the user's `--set` items: BERT
# with random weights at the `--bert_*` shape. Another family never reads that section.
def dsran_overrides(args: argparse.Namespace) -> list:
  """The `--set KEY=VALUE` items DSRAN's flags (`--K`, `--pos_dim`, `--text_padding`,
  `--bert_*`) stand for."""
  shape = {"K": args.K, "pos_dim": args.pos_dim, "text_padding": args.text_padding,
           "bert_random_init": True,
           "bert.hidden_size": args.bert_hidden, "bert.num_layers": args.bert_layers,
           "bert.num_heads": args.bert_heads or max(1, args.bert_hidden // 64),
           "bert.intermediate_size": args.bert_intermediate or 4 * args.bert_hidden,
           "bert.max_position": max(512, args.seq_len)}
  return [f"model.dsran.{key}={value}" for key, value in shape.items()]


def make_config(args: argparse.Namespace):
  """The full config (DSRAN: the authors' F30K BERT recipe) at the benchmark's shape."""
  c = get_base_config()
  m = c.model
  m.name = args.model
  m.vocab_size = args.vocab_size
  m.embed_size = args.embed_size
  m.img_dim = args.img_dim
  m.dtype = "bfloat16" if args.bf16 else "float32"
  c.data.num_regions = args.regions
  c.data.max_len = args.seq_len
  c.train.batch_size = args.batch_size
  c.train.seed = args.seed
  c.train.optimizer = "bertadam"
  for item in dsran_overrides(args) + args.set:
    _override(c, item)
  # The benchmark reads no dataset: the data keys are the synthetic world's, whose
  # captions give a word-vocabulary family its vocabulary. Every value is checked before
  # anything is built.
  c.data.format = "synthetic"
  validation.validate_config(c)
  return c


def _unknown(key: str) -> str:
  """"unknown key (did you mean config.a.b?)" for a key no declaration knows."""
  return validation.unknown_key(key).split(": ", 1)[1]


def _override(c, item: str) -> None:
  """Applies one `--set KEY=VALUE` to config `c`, the value cast to the key's type."""
  key, sep, value = item.partition("=")
  if not sep:
    raise ConfigError(f"--set {item!r}: expected KEY=VALUE", header="")
  *parents, leaf = key.split(".")
  node = c
  for name in parents:
    if name not in node or not hasattr(node[name], "items"):
      raise ConfigError(f"--set {item}: {_unknown(key)}", header="")
    node = node[name]
  if leaf not in node:
    raise ConfigError(f"--set {item}: {_unknown(key)}", header="")
  old = node[leaf]
  if hasattr(old, "items"):
    raise ConfigError(f"--set {item}: config.{key} is a section; set one of its keys "
                      f"({', '.join(sorted(old))})", header="")
  if isinstance(old, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"--set {key}={value}: expected true or false", header="")
    node[leaf] = value.lower() in ("true", "1")
  elif isinstance(old, tuple):  # "(3, 8, 36, 3)" or "3,8,36,3": a tuple of integers
    try:
      node[leaf] = tuple(int(v) for v in value.strip("()[] ").split(",") if v.strip())
    except ValueError:
      raise ConfigError(f"--set {key}={value}: expected integers, e.g. 1,2,3", header="") \
          from None
  else:
    try:
      node[leaf] = type(old)(value)
    except ValueError:
      kind = {"int": "an integer", "float": "a number"}.get(type(old).__name__,
                                                            type(old).__name__)
      raise ConfigError(f"--set {key}={value}: expected {kind}", header="") from None


def random_batch(rng: np.random.Generator, batch_size: int, args, with_text=True,
                 with_images=True, model=None, wordpiece=True) -> dict:
  """Random inputs of the model's keys and shapes (DSRAN's when no model is given);
  captions of random length (>= 8 tokens): WordPiece ids of common words for a BERT
  tokenizer (`wordpiece`), else ids of the `--vocab_size` word vocabulary."""
  dims = model.input_dims if model is not None else {"img_dim": args.img_dim,
                                                     "pos_dim": args.pos_dim}
  image_keys = model.image_keys if model is not None else (
      "grid", "regions", "region_pos", "region_mask")
  b = {}
  if with_images:
    for key in image_keys:
      shape = (batch_size,) + key_shape(key, dims, args.regions)
      if KEY_SPECS[key][1] == np.bool_:
        b[key] = np.ones(shape, bool)
      elif KEY_SPECS[key][1] == np.uint8:  # raw pixels (`image`)
        b[key] = rng.integers(0, 256, shape, dtype=np.uint8)
      elif key == "region_pos":
        b[key] = rng.standard_normal(shape, np.float32)
      else:
        b[key] = rng.random(shape, np.float32)
  if with_text:
    lengths = rng.integers(min(8, args.seq_len), args.seq_len + 1, size=batch_size)
    mask = (np.arange(args.seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    low, high = (1000, 30000) if wordpiece else (4, args.vocab_size)
    ids = rng.integers(low, high, size=(batch_size, args.seq_len), dtype=np.int32)
    b["input_ids"] = ids * mask
    b["attention_mask"] = mask
  return b


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


_SHAPE_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_DOT_RE = re.compile(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)")
_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


def _dims(line: str, key: str) -> tuple:
  m = re.search(key + r"=\{([\d,]*)\}", line)
  return tuple(int(i) for i in m.group(1).split(",") if i) if m else ()


def hlo_dots(hlo_text: str) -> list:
  """Every `dot` of an (optimised) HLO module's text, fused ones included, as
  (lhs_shape, rhs_shape, dimension_numbers, lhs dtype name, flops) tuples."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = _SHAPE_RE.match(line)
    if m:
      shapes[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
  dots = []
  for line in hlo_text.splitlines():
    m, dot = _SHAPE_RE.match(line), _DOT_RE.search(line)
    if not (m and dot) or dot.group(1) not in shapes or dot.group(2) not in shapes:
      continue
    (ltype, lhs), (_, rhs) = shapes[dot.group(1)], shapes[dot.group(2)]
    numbers = ((_dims(line, "lhs_contracting_dims"), _dims(line, "rhs_contracting_dims")),
               (_dims(line, "lhs_batch_dims"), _dims(line, "rhs_batch_dims")))
    out = math.prod(int(d) for d in m.group(3).split(",") if d)
    flops = 2.0 * out * math.prod(lhs[i] for i in numbers[0][0])
    dots.append((lhs, rhs, numbers, _HLO_DTYPES.get(ltype, ltype), flops))
  return dots


def dot_mix_seconds(dots: Sequence[tuple], min_time_s: float = 0.05) -> float:
  """The time `dots` (from `hlo_dots`) take when each runs alone on the whole device:
  every distinct dot is jitted by itself and timed (median of repeats covering
  `min_time_s`), times how often it occurs.

  Why: a step's dots are smaller and differently laid out than the square matmul of the
  peak, so flops / this time is the rate its matmul mix can reach at best, and
  flops / (this time x peak) the share of the roofline the step would reach if every
  dot ran as fast as alone and nothing else took time.
  """
  total = 0.0
  for (lhs, rhs, numbers, dtype), n in collections.Counter(d[:4] for d in dots).items():
    a, b = jnp.ones(lhs, dtype), jnp.ones(rhs, dtype)
    fn = jax.jit(lambda a, b, numbers=numbers: jax.lax.dot_general(
        a, b, numbers, preferred_element_type=jnp.float32))
    fn(a, b).block_until_ready()
    t = time.perf_counter()
    fn(a, b).block_until_ready()
    reps = max(3, min(50, int(min_time_s / max(time.perf_counter() - t, 1e-6))))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      fn(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    total += n * statistics.median(times)
  return total


class _CpuMeter:
  """Wall time, this process's CPU time and the machine's busy time over a region."""

  @staticmethod
  def _machine_busy_s():
    try:
      with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
      return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

  def __enter__(self):
    self.wall0, self.cpu0 = time.perf_counter(), sum(os.times()[:2])
    self.busy0 = self._machine_busy_s()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall0
    self.cpu = sum(os.times()[:2]) - self.cpu0
    busy1 = self._machine_busy_s()
    self.other_cores = (None if busy1 is None or self.busy0 is None else
                        max(0.0, (busy1 - self.busy0 - self.cpu) / max(self.wall, 1e-9)))


def matmul_peak_gflops(sizes: Sequence[int] = (2048, 4096), min_time_s: float = 1.0,
                       dtype="float32") -> dict:
  """Best GFLOP/s of an (n, n) @ (n, n) jitted matmul over `sizes` (the roofline).

  fp32 by default. With dtype=bfloat16 the operands are bf16 and the products are summed
  in fp32 (the mixed-precision matmul the bf16 model runs), and the keys are
  `matmul_peak_bf16_gflops` / `matmul_bf16_gflops_by_size`. Each size is timed for at
  least `min_time_s` after a warm-up call; the best single call counts, as a roofline
  should.
  """
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  best = {}
  for n in sizes:
    key = jax.random.key(n)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
    f(a, b).block_until_ready()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time_s:
      t = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    best[n] = 2.0 * n ** 3 / min(times) / 1e9
  tag = {"float32": "", "bfloat16": "_bf16"}[jnp.dtype(dtype).name]
  return {f"matmul_peak{tag}_gflops": max(best.values()),
          f"matmul{tag}_gflops_by_size": {str(n): round(g, 1) for n, g in best.items()}}


def peak_memory() -> dict:
  """Peak device memory where the backend tracks it, else the process's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]),
            "peak_memory_source": "device.memory_stats"}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"peak_memory_bytes": int(rss_kb) * 1024, "peak_memory_source": "process_max_rss"}


def _device_info() -> dict:
  d = jax.devices()[0]
  cpu = ""
  if d.platform == "cpu":
    try:
      with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
      pass
  info = {"device_kind": d.device_kind, "platform": d.platform,
          "num_devices": jax.device_count(), "cpu_model": cpu, "cpu_count": os.cpu_count()}
  if d.platform == "cpu":
    info["cpu_bf16_native"], info["cpu_bf16_units"] = precision.cpu_bf16_native()
  return info


def _shape_info(args) -> dict:
  keys = ("batch_size", "embed_size", "bert_layers", "bert_hidden", "K", "regions",
          "seq_len", "bf16")
  return {k: getattr(args, k) for k in keys}


def compile_train_step(args: argparse.Namespace):
  """The jitted train step at `args`' shape, compiled: (compiled, state, batches, config,
  compile_s), with two random batches placed over a mesh of every device."""
  config = make_config(args)
  wordpiece = models.tokenizer_kind(config) == "bert"
  model = models.build_model(config.model, vocab_size=args.vocab_size)
  mesh = train.make_mesh()
  train.check_batch_size(config, mesh)
  # A realistic schedule (F30K: ~1133 steps per epoch, 12 epochs); its value is irrelevant
  # to speed, but it is computed inside the step as in training.
  steps_per_epoch = 1133
  schedule = optim.learning_rate_schedule(config.train, steps_per_epoch,
                                          config.train.num_epochs * steps_per_epoch)
  model_frozen = models.frozen_paths(config.model)
  objective = models.training_objective(config)
  tx = optim.make_optimizer(config.train, schedule, model_frozen, objective)
  frozen = optim.frozen_patterns(config.train, model_frozen)
  replicated = NamedSharding(mesh, P())
  state = train.create_state(model, tx, config, jax.random.PRNGKey(args.seed), replicated,
                             objective=objective)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_fn = train.jit_train_step(
      train.make_train_step(model, tx, config, schedule, frozen, objective), mesh,
      state_sharding)
  rng = np.random.default_rng(args.seed)
  # A family objective reads the images' ids (pairs of one image are positives).
  index = {"image_index": np.arange(args.batch_size, dtype=np.int32)} if objective else {}
  batches = [train.global_batch(
      {**random_batch(rng, args.batch_size, args, model=model, wordpiece=wordpiece), **index},
      mesh) for _ in range(2)]
  t = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  return compiled, state, batches, config, time.perf_counter() - t


def benchmark_train(args: argparse.Namespace) -> dict:
  """Times the jitted train step at `args`' shape; returns the result dict."""
  compiled, state, batches, config, compile_s = compile_train_step(args)
  flops = _flops(compiled)

  for i in range(args.warmup_steps):
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
  times, cpu_times = [], []
  load0 = os.getloadavg()[0]
  with _CpuMeter() as total:
    for i in range(args.steps):
      with _CpuMeter() as one:
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
      times.append(one.wall)
      cpu_times.append(one.cpu)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} in the benchmark step")
  step_s = statistics.median(times)
  del state, batches

  sizes = (args.peak_size,) if args.peak_size else (2048, 4096)
  peak = matmul_peak_gflops(sizes, args.peak_min_time)
  achieved = flops / step_s / 1e9
  dots = hlo_dots(compiled.as_text())
  mm_flops = sum(d[-1] for d in dots)
  if args.dot_mix:
    mix_s = dot_mix_seconds(dots)
    peak.update(dot_mix_s=mix_s, dot_mix_gflops=mm_flops / mix_s / 1e9,
                dot_mix_bound=flops / mix_s / 1e9 / peak["matmul_peak_gflops"])
  if args.bf16:
    peak.update(matmul_peak_gflops(sizes, args.peak_min_time, dtype="bfloat16"))
    peak["mfu_bf16"] = achieved / peak["matmul_peak_bf16_gflops"]
  return {
      "mode": "train",
      **_shape_info(args),
      "pairs_per_s": args.batch_size / step_s,
      "step_s": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "steps_timed": len(times),
      "compile_s": compile_s,
      "flops_per_step": flops,
      "achieved_gflops": achieved,
      **peak,
      "mfu": achieved / peak["matmul_peak_gflops"],
      "matmul_flops_per_step": mm_flops,
      "matmul_mfu": mm_flops / step_s / 1e9 / peak["matmul_peak_gflops"],
      "step_cpu_s": statistics.median(cpu_times),
      "other_load_cores": total.other_cores,
      "loadavg_1m": [load0, os.getloadavg()[0]],
      "loss": loss,
      "compute_dtype": models.compute_dtype(config.model, jax.default_backend())[0],
      **_device_info(),
      **peak_memory(),
  }


def _timed_encode(fn, variables, batches) -> float:
  """Seconds to encode `batches` (host arrays -> host embeddings), after one warm-up."""
  np.asarray(fn(variables, batches[0]))
  t = time.perf_counter()
  for b in batches:
    np.asarray(fn(variables, b))
  return time.perf_counter() - t


def benchmark_eval(args: argparse.Namespace) -> dict:
  """Times eval-mode encoding (extrapolated to COCO 5K) and full COCO 5K ranking."""
  config = make_config(args)
  wordpiece = models.tokenizer_kind(config) == "bert"
  model = models.build_model(config.model, vocab_size=args.vocab_size)
  variables = init_variables(model, jax.random.PRNGKey(args.seed))

  image_fn = jax.jit(lambda v, b: model.apply(v, b, method="encode_images"))
  text_fn = jax.jit(lambda v, b: model.apply(v, b, method="encode_texts"))

  rng = np.random.default_rng(args.seed)
  bs = args.eval_batch_size
  n_img = args.eval_images
  n_cap = CAPTIONS_PER_IMAGE * n_img
  batch = lambda **kw: random_batch(rng, bs, args, model=model, wordpiece=wordpiece, **kw)
  img_batches = [batch(with_text=False) for _ in range(-(-n_img // bs))]
  cap_batches = [batch(with_images=False) for _ in range(-(-n_cap // bs))]
  t = time.perf_counter()
  image_fn.lower(variables, img_batches[0]).compile()
  text_fn.lower(variables, cap_batches[0]).compile()
  compile_s = time.perf_counter() - t
  img_s = _timed_encode(image_fn, variables, img_batches)
  cap_s = _timed_encode(text_fn, variables, cap_batches)
  img_per_s = len(img_batches) * bs / img_s
  cap_per_s = len(cap_batches) * bs / cap_s

  # Ranking on a realistic full-size matrix: captions near their image's embedding.
  n = args.rank_images
  e = args.embed_size
  key = jax.random.key(args.seed)
  img = jax.random.normal(key, (n, e), jnp.float32)
  txt = jnp.repeat(img, CAPTIONS_PER_IMAGE, axis=0) + 8.0 * jax.random.normal(
      jax.random.fold_in(key, 1), (n * CAPTIONS_PER_IMAGE, e), jnp.float32)
  norm = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  img, txt = norm(img), norm(txt)
  score = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
  np.asarray(score(img[:8], txt[:8]))
  t = time.perf_counter()
  sims = np.asarray(score(img, txt))
  score_s = time.perf_counter() - t
  t = time.perf_counter()
  i2t, t2i = ranking.ranks(sims, CAPTIONS_PER_IMAGE)
  metrics = ranking.recall_metrics(i2t, t2i)
  rank_s = time.perf_counter() - t

  extrapolated = (COCO5K_IMAGES / img_per_s + CAPTIONS_PER_IMAGE * COCO5K_IMAGES / cap_per_s)
  return {
      "mode": "eval",
      **_shape_info(args),
      "eval_batch_size": bs,
      "encoded_images": len(img_batches) * bs,
      "encoded_captions": len(cap_batches) * bs,
      "compile_s": compile_s,
      "images_per_s": img_per_s,
      "captions_per_s": cap_per_s,
      "encode_images_s": img_s,
      "encode_captions_s": cap_s,
      "coco5k_encode_s_extrapolated": extrapolated,
      "rank_images": n,
      "rank_captions": n * CAPTIONS_PER_IMAGE,
      "score_s": score_s,
      "rank_s": rank_s,
      "rsum_synthetic": metrics["rsum"],
      **_device_info(),
      **peak_memory(),
  }


def benchmark_score(args: argparse.Namespace) -> dict:
  """Times tiled scoring of an `score_images x score_captions` gallery."""
  if args.score_images < 1 or args.score_captions < 1:
    raise ValueError("--score_images and --score_captions must both be >= 1")
  config = make_config(args)
  config.eval.tile_images, config.eval.tile_captions = args.tile_images, args.tile_captions
  wordpiece = models.tokenizer_kind(config) == "bert"
  model = models.build_model(config.model, vocab_size=args.vocab_size)
  variables = init_variables(model, jax.random.PRNGKey(args.seed))
  scorer = evaluation.ModelScorer(model, variables, tile=models.eval_tile(config),
                                  progress=False)
  rng = np.random.default_rng(args.seed)
  bs = args.eval_batch_size
  encode = lambda fn, n, **kw: evaluation.encode_all(
      fn, [random_batch(rng, min(bs, n - o), args, model=model, wordpiece=wordpiece, **kw)
           for o in range(0, n, bs)])
  image_reps = encode(scorer.encode_images, args.score_images, with_text=False)
  text_reps = encode(scorer.encode_texts, args.score_captions, with_images=False)
  ti, tj = scorer.tile_shape(args.score_images, args.score_captions)
  out = np.empty((args.score_images, args.score_captions), np.float32)
  # The first run compiles; the tile's cost analysis gives the flops of one tile.
  t = time.perf_counter()
  scorer.score_into(image_reps, text_reps, out)
  first_s = time.perf_counter() - t
  # XLA's cost analysis counts a loop's body once, and a family may loop over blocks of
  # a large tile; a small tile (one block) gives the true flops per pair.
  small = evaluation.ModelScorer(model, variables, tile=(1, min(tj, 64)), progress=False)
  si, sj = small.tile_shape(args.score_images, args.score_captions)
  flops_per_pair = _flops(small.compile_tile(image_reps, text_reps)) / (si * sj)
  times, cpu_times = [], []
  with _CpuMeter() as total:
    for _ in range(max(1, args.score_repeats)):
      with _CpuMeter() as one:
        scorer.score_into(image_reps, text_reps, out)
      times.append(one.wall)
      cpu_times.append(one.cpu)
  score_s = statistics.median(times)
  pairs = args.score_images * args.score_captions
  achieved = flops_per_pair * pairs / score_s / 1e9
  peak = matmul_peak_gflops((args.peak_size,) if args.peak_size else (2048, 4096),
                            args.peak_min_time)
  return {
      "mode": "score", "model": args.model, "embed_size": args.embed_size,
      "regions": args.regions, "seq_len": args.seq_len,
      "score_images": args.score_images, "score_captions": args.score_captions,
      "tile": [ti, tj], "score_s": score_s, "score_s_min": min(times),
      "pairs_per_s": pairs / score_s, "flops_per_pair": flops_per_pair,
      "achieved_gflops": achieved, **peak,
      "roofline_share": achieved / peak["matmul_peak_gflops"],
      "first_run_s": first_s, "score_cpu_s": statistics.median(cpu_times),
      "other_load_cores": total.other_cores, "finite": bool(np.isfinite(out).all()),
      **_device_info(), **peak_memory(),
  }


# Dense bf16 peaks from the vendors' datasheets (TFLOP/s per JAX device, no sparsity),
# matched against `device_kind` in this order (the PCIe H100 before the SXM one).
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
    ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)

# The suite's shapes. Full: the DSRAN BERT-base recipe's step (batch 128, BERT 12x768,
# 100 regions, K=2, bf16), scoring a Flickr30K-size test gallery (1000 x 5000), COCO 5K
# encoding at the same shape. Tiny: the same code paths in seconds, for CPU and the tests.
_SUITE_SHAPES = {
    "full": {"train": ["--batch_size=128", "--embed_size=1024", "--bert_layers=12",
                       "--bert_hidden=768", "--K=2", "--regions=100", "--seq_len=32",
                       "--steps=10", "--bf16"],
             "score": ["--score_images=1000", "--score_captions=5000", "--regions=36",
                       "--embed_size=1024", "--seq_len=20", "--score_repeats=3",
                       "--peak_size=2048"],
             "eval": ["--eval", "--embed_size=1024", "--bert_layers=12", "--bert_hidden=768",
                      "--regions=100", "--seq_len=32", "--eval_images=5000",
                      "--eval_batch_size=256"]},
    "tiny": {"train": ["--batch_size=8", "--embed_size=32", "--bert_layers=1",
                       "--bert_hidden=32", "--bert_heads=2", "--K=1", "--regions=4",
                       "--seq_len=8", "--steps=2", "--peak_size=256",
                       "--peak_min_time=0.05", "--bf16"],
             "score": ["--score_images=8", "--score_captions=16", "--regions=4",
                       "--embed_size=32", "--seq_len=8", "--score_repeats=1",
                       "--peak_size=256", "--peak_min_time=0.05"],
             "eval": ["--eval", "--embed_size=32", "--bert_layers=1", "--bert_hidden=32",
                      "--bert_heads=2", "--regions=4", "--seq_len=8", "--eval_images=8",
                      "--eval_batch_size=8", "--rank_images=40"]},
}
SUITE_SCORERS = ("scan", "sgraf", "chan")


def datasheet_peak_tflops(device_kind: str) -> Optional[float]:
  """The datasheet's dense bf16 peak of an accelerator (None for a CPU or one unknown)."""
  return next((tflops for name, tflops in DATASHEET_BF16_TFLOPS if name in device_kind),
              None)


def device_suite(args: argparse.Namespace) -> dict:
  """The accelerator suite: the DSRAN BERT-base bf16 train step (step time, MFU against
  the datasheet and against a matmul timed here), scoring pairs/s and roofline share of
  every cross-attention family of `SUITE_SCORERS` registered, COCO 5K encoding and
  ranking, peak memory; returns {"device": ..., "train": ..., "score": {...}, "eval": ...}
  and writes `device_suite.json` and `device_suite.md` into `args.out_dir` if given."""
  size = args.suite_size
  if size == "auto":
    size = "tiny" if jax.default_backend() == "cpu" else "full"
  shapes = _SUITE_SHAPES[size]
  device = _device_info()
  peak = datasheet_peak_tflops(device["device_kind"])
  t0 = time.perf_counter()
  out = {"suite": "device", "size": size, "device": device,
         "datasheet_bf16_tflops": peak}
  train_result = benchmark_train(parse_args(shapes["train"]))
  if peak:
    train_result["mfu_datasheet"] = train_result["achieved_gflops"] / (peak * 1e3)
  out["train"] = train_result
  out["score"] = {}
  for family in SUITE_SCORERS:
    if family in models.names():
      out["score"][family] = benchmark_score(
          parse_args(shapes["score"] + [f"--model={family}"]))
  out["eval"] = benchmark_eval(parse_args(shapes["eval"]))
  out["total_s"] = time.perf_counter() - t0
  out.update(jax_version=jax.__version__, date=time.strftime("%Y-%m-%d"))
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    atomic.write_json(os.path.join(args.out_dir, "device_suite.json"), out)
    atomic.write_text(os.path.join(args.out_dir, "device_suite.md"), suite_table(out))
  return out


def suite_table(out: dict) -> str:
  """The device suite's figures as a markdown table for docs/benchmarks.md."""
  d, t, e = out["device"], out["train"], out["eval"]
  rows = [("device", f"{d['device_kind']} x{d['num_devices']} ({d['platform']}), "
                     f"jax {out['jax_version']}, {out['date']}, shapes: {out['size']}"),
          ("DSRAN train step (bf16, batch {}, BERT {}x{})".format(
              t["batch_size"], t["bert_layers"], t["bert_hidden"]),
           f"{t['step_s'] * 1e3:.1f} ms median, {t['pairs_per_s']:.0f} pairs/s"),
          ("MFU vs datasheet bf16 peak",
           f"{100 * t['mfu_datasheet']:.1f}% of {out['datasheet_bf16_tflops']} TFLOP/s"
           if "mfu_datasheet" in t else "no datasheet peak for this device"),
          ("MFU vs bf16 matmul timed here", f"{100 * t['mfu_bf16']:.1f}%"),
          ("train peak memory", f"{t['peak_memory_bytes'] / 2**30:.2f} GiB "
                                f"({t['peak_memory_source']})")]
  for family, r in out["score"].items():
    rows.append((f"{family} scoring {r['score_images']} x {r['score_captions']}",
                 f"{r['pairs_per_s']:.3g} pairs/s, {r['score_s']:.3f} s, "
                 f"{100 * r['roofline_share']:.1f}% of the fp32 matmul peak timed here"))
  rows.append((f"encode {e['encoded_images']} images + {e['encoded_captions']} captions",
               f"{e['encode_images_s'] + e['encode_captions_s']:.2f} s "
               f"(COCO 5K extrapolated {e['coco5k_encode_s_extrapolated']:.2f} s)"))
  rows.append((f"rank {e['rank_images']} x {e['rank_captions']}",
               f"score {e['score_s']:.2f} s + rank {e['rank_s']:.2f} s"))
  rows.append(("suite wall time", f"{out['total_s']:.0f} s"))
  return "| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the benchmark `argv` asks for, prints one JSON line and returns the dict."""
  args = parse_args(argv)
  if args.suite == "device":
    result = device_suite(args)
    print(json.dumps(result), flush=True)
    return result
  if args.score_images or args.score_captions:
    result = benchmark_score(args)
  else:
    result = benchmark_eval(args) if args.eval else benchmark_train(args)
  result["jax_version"] = jax.__version__
  result["date"] = time.strftime("%Y-%m-%d")
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  with cli.user_errors():  # a bad flag value or config key: one `error:` line, exit 2
    main(sys.argv[1:])

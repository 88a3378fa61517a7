"""The benchmark CLI on tiny shapes (no speed assertions), and the performance rewrites
in dsran_jax.models.common.layers giving the same numbers as the code they replace."""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax import benchmark
from dsran_jax.models.common import layers

TINY = ["--batch_size=8", "--embed_size=64", "--bert_layers=1", "--bert_hidden=32",
        "--bert_heads=2", "--K=1", "--regions=4", "--seq_len=8", "--peak_size=256",
        "--peak_min_time=0.05"]

TRAIN_KEYS = ("pairs_per_s", "step_s", "compile_s", "flops_per_step", "matmul_peak_gflops",
              "mfu", "matmul_flops_per_step", "matmul_mfu", "step_cpu_s", "device_kind",
              "peak_memory_bytes", "loss")


def _last_json_line(capsys):
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  return json.loads(lines[-1])


@pytest.mark.parametrize("precision", [[], pytest.param(["--bf16"], marks=pytest.mark.slow)])
def test_train_benchmark_prints_one_json_line(capsys, precision):
  # Runs the real sharded step over the 8 fake devices (bf16: through layers.lowp_dense).
  result = benchmark.main(TINY + ["--steps=2", "--dot_mix"] + precision)
  printed = _last_json_line(capsys)
  assert printed == json.loads(json.dumps(result))
  for key in TRAIN_KEYS:
    assert key in printed, key
  for key in ("pairs_per_s", "step_s", "compile_s", "flops_per_step", "matmul_peak_gflops",
              "mfu", "matmul_flops_per_step", "peak_memory_bytes"):
    assert printed[key] > 0, key
  assert printed["matmul_flops_per_step"] <= printed["flops_per_step"]
  assert printed["steps_timed"] == 2 and np.isfinite(printed["loss"])
  assert printed["num_devices"] == jax.device_count()
  assert printed["pairs_per_s"] == pytest.approx(8 / printed["step_s"])
  assert printed["bf16"] == bool(precision)
  assert ("mfu_bf16" in printed) == bool(precision)
  assert printed["dot_mix_s"] > 0
  assert printed["dot_mix_bound"] == pytest.approx(
      printed["flops_per_step"] / printed["dot_mix_s"] / 1e9 / printed["matmul_peak_gflops"])
  if precision:
    assert printed["matmul_peak_bf16_gflops"] > 0
    assert printed["mfu_bf16"] == pytest.approx(
        printed["achieved_gflops"] / printed["matmul_peak_bf16_gflops"])


@pytest.mark.parametrize("family", [["--set", "model.dsran.text_encoder=gru"],
                                    ["--model=scan"]])
def test_train_benchmark_of_word_vocabulary_models(capsys, family):
  # Ids come from the model's own vocabulary (DSRAN's GRU build read WordPiece ids past its
  # 40 rows: a NaN loss) and a word-vocabulary family gets one without a dataset.
  benchmark.main(TINY + ["--steps=1", "--vocab_size=40", "--set", "model.word_dim=16"] + family)
  printed = _last_json_line(capsys)
  assert np.isfinite(printed["loss"]) and printed["compute_dtype"] == "float32"


def test_eval_benchmark(capsys):
  benchmark.main(TINY + ["--eval", "--eval_images=8", "--eval_batch_size=8",
                         "--rank_images=40"])
  out = _last_json_line(capsys)
  assert out["mode"] == "eval" and out["encoded_captions"] == 40
  for key in ("images_per_s", "captions_per_s", "coco5k_encode_s_extrapolated", "rank_s"):
    assert out[key] > 0, key
  assert 0 <= out["rsum_synthetic"] <= 600


def test_dot_flops_counts_matmuls():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b)
  a, b = jnp.ones((16, 32)), jnp.ones((32, 32))
  dots = benchmark.hlo_dots(f.lower(a, b).compile().as_text())
  assert sum(d[-1] for d in dots) == 2 * (2 * 16 * 32 * 32)


def test_hlo_dots_keep_layouts_and_batches_and_time_alone():
  # A weight gradient (contracting the rows of both) and a batched attention product.
  f = jax.jit(lambda x, g, q: (jnp.tanh(x).T @ g, jnp.einsum("bqd,bkd->bqk", q, q)))
  x, g, q = jnp.ones((48, 16)), jnp.ones((48, 8)), jnp.ones((3, 5, 4))
  dots = benchmark.hlo_dots(f.lower(x, g, q).compile().as_text())
  flops = sorted(d[-1] for d in dots)
  assert flops == [2 * 3 * 5 * 5 * 4, 2 * 16 * 8 * 48]
  wgrad = next(d for d in dots if d[-1] == 2 * 16 * 8 * 48)
  contract = wgrad[2][0]
  assert [wgrad[0][i] for i in contract[0]] == [48] == [wgrad[1][i] for i in contract[1]]
  batched = next(d for d in dots if d[-1] == 2 * 3 * 5 * 5 * 4)
  assert [batched[0][i] for i in batched[2][1][0]] == [3] and batched[3] == "float32"
  one = benchmark.dot_mix_seconds(dots[:1], min_time_s=0.01)
  assert 0 < one < 1


@pytest.mark.parametrize("key", [jax.random.PRNGKey(3), jax.random.key(7)])
@pytest.mark.parametrize("shape,p", [((3, 37, 64), 0.8), ((5, 7), 0.9), ((3,), 0.5),
                                     ((2, 4, 9, 9), 0.8)])
def test_fast_bernoulli_is_bit_identical(key, shape, p):
  expected = jax.random.bernoulli(key, p, shape)
  got = jax.jit(layers.bernoulli, static_argnums=(1, 2))(key, p, shape)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_matches_flax(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 10, 16)).astype(dtype)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  ours = layers.Dropout(0.2).apply({}, x, deterministic=False, rngs=rngs)
  flax_ = nn.Dropout(0.2).apply({}, x, deterministic=False, rngs=rngs)
  assert ours.dtype == flax_.dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(flax_, np.float32))
  np.testing.assert_array_equal(layers.Dropout(0.2).apply({}, x, deterministic=True), x)


def test_flat_dense_matches_dot():
  # layers.dense merges the leading axes into one 2-D matmul: same values and gradients
  # as contracting the 3-D input directly.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
  b = jnp.zeros((6,))
  dims = (((2,), (0,)), ((), ()))
  flat = lambda x, w: layers.dense(x, w, b, jnp.float32)
  plain = lambda x, w: jax.lax.dot_general(x, w, dims)
  np.testing.assert_allclose(flat(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
  grads = [jax.grad(lambda w, f=f: jnp.sum(jnp.sin(f(x, w))))(w) for f in (flat, plain)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_batchnorm_custom_vjp_matches_autodiff():
  def plain(x, m, s, b, eps=1e-5):
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m, axis=(0, 1)) / n
    var = jnp.sum(jnp.square(x - mean) * m, axis=(0, 1)) / n
    return (x - mean) * jax.lax.rsqrt(var + eps) * s + b, mean, var

  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (4, 7, 5)) * 3 + 1
  lengths = jnp.array([7, 3, 5, 1])
  m = (jnp.arange(7)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]
  s, b = jax.random.normal(keys[1], (5,)), jax.random.normal(keys[2], (5,))
  cots = [jax.random.normal(k, sh) for k, sh in zip(keys[3:], [(4, 7, 5), (5,), (5,)])]
  outs = []
  for f in (plain, lambda *a: layers._bn_train(*a, 1e-5)):
    loss = lambda x, s, b, f=f: sum(jnp.sum(o * c) for o, c in zip(f(x, m, s, b), cots))
    outs.append((f(x, m, s, b), jax.grad(loss, argnums=(0, 1, 2))(x, s, b)))
  for want, got in zip(outs[0][0], outs[1][0]):  # forward: bit-identical
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for want, got in zip(outs[0][1], outs[1][1]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _lowp_reference(x, kernel, bias):
  # Autodiff through the plain formulation: bf16 operands, fp32 products and sums, and
  # an fp32 kernel gradient (the kernel's bf16 rounding is kept out of the backward).
  rounded = kernel.astype(jnp.bfloat16).astype(jnp.float32)
  y = jnp.dot(x.astype(jnp.float32), kernel + jax.lax.stop_gradient(rounded - kernel))
  return (y + bias).astype(jnp.bfloat16)


def test_lowp_dense_matches_plain_mixed_precision():
  kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (48, 40)).astype(jnp.bfloat16)
  kernel, bias = jax.random.normal(kk, (40, 24)), jax.random.normal(kb, (24,))
  cot = jax.random.normal(kg, (48, 24)).astype(jnp.bfloat16)
  outs = []
  for f in (layers.lowp_dense, _lowp_reference):
    y, vjp = jax.vjp(f, x, kernel, bias)
    outs.append((y,) + vjp(cot))
  for name, got, want in zip(("y", "dx", "dkernel", "dbias"), *outs):
    assert got.dtype == want.dtype, name
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # bf16 results may differ by one rounding step (fp32 sums in another order);
    # the fp32 parameter gradients only by summation order.
    tol = 1e-2 if name in ("y", "dx") else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)


def test_bf16_dense_backward_keeps_every_matmul_in_bf16():
  # XLA:CPU upcasts a bf16 dot to fp32 unless both operands are row-major and canonical;
  # layers.dense's backward must not trigger that (it is what makes --bf16 fast on CPU).
  x = jnp.ones((64, 48), jnp.bfloat16)
  kernel, bias = jnp.ones((48, 32)), jnp.ones((32,))
  loss = lambda x, k, b: jnp.sum(jnp.sin(layers.dense(x, k, b, jnp.bfloat16)
                                         .astype(jnp.float32)))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kernel, bias).compile().as_text()
  shapes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
  dots = re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
  assert len(dots) == 3, hlo
  for lhs, rhs in dots:
    assert shapes[lhs] == shapes[rhs] == "bf16", (lhs, rhs)


def test_device_suite_runs_on_cpu_with_tiny_shapes(capsys, tmp_path):
  # The command that is run the first time a GPU is lent: every part of it, here.
  result = benchmark.main(["--suite=device", f"--out_dir={tmp_path}"])
  assert result["size"] == "tiny" and result["device"]["platform"] == "cpu"
  assert result["train"]["bf16"] and result["train"]["step_s"] > 0
  assert "mfu_datasheet" not in result["train"]   # no datasheet peak for a CPU
  assert set(result["score"]) == {"scan", "sgraf"} | (
      {"chan"} if "chan" in benchmark.models.names() else set())
  for r in result["score"].values():
    assert r["finite"] and 0 < r["roofline_share"] == pytest.approx(
        r["achieved_gflops"] / r["matmul_peak_gflops"])
  assert result["eval"]["rank_s"] > 0
  saved = json.loads((tmp_path / "device_suite.json").read_text())
  assert saved["train"]["step_s"] == result["train"]["step_s"]
  table = (tmp_path / "device_suite.md").read_text()
  assert table.startswith("| measure | value |") and "scan scoring 8 x 16" in table


def test_datasheet_peaks_match_device_kinds():
  assert benchmark.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert benchmark.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert benchmark.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert benchmark.datasheet_peak_tflops("TPU v5 lite") == 197.0
  assert benchmark.datasheet_peak_tflops("cpu") is None

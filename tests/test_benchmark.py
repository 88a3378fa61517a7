"""The benchmark CLI on tiny shapes (no speed assertions), and the performance rewrites
in dsran_jax.models.layers giving the same numbers as the code they replace."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax import benchmark
from dsran_jax.models import layers

TINY = ["--batch_size=8", "--embed_size=64", "--bert_layers=1", "--bert_hidden=32",
        "--bert_heads=2", "--K=1", "--regions=4", "--seq_len=8", "--peak_size=256"]

TRAIN_KEYS = ("pairs_per_s", "step_s", "compile_s", "flops_per_step", "matmul_peak_gflops",
              "mfu", "matmul_flops_per_step", "matmul_mfu", "step_cpu_s", "device_kind",
              "peak_memory_bytes", "loss")


def _last_json_line(capsys):
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  return json.loads(lines[-1])


def test_train_benchmark_prints_one_json_line(capsys):
  result = benchmark.main(TINY + ["--steps=2"])
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
  assert benchmark.dot_flops(f.lower(a, b).compile().as_text()) == 2 * (2 * 16 * 32 * 32)


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


def test_flat_dot_general_matches_dot():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
  dims = (((2,), (0,)), ((), ()))
  np.testing.assert_allclose(layers.flat_dot_general(x, w, dims),
                             jax.lax.dot_general(x, w, dims), rtol=1e-6, atol=1e-6)
  grads = [jax.grad(lambda w, f=f: jnp.sum(jnp.sin(f(x, w, dims))))(w)
           for f in (layers.flat_dot_general, jax.lax.dot_general)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)

"""Optimisers against the authors' PyTorch ones (BertAdam re-derived, torch Adam).

torch.optim.Adam runs in the jax-free reference process (tests/torchref/optim.py).
"""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsran_jax import optim


def train_config(**kw):
  c = ml_collections.ConfigDict(dict(
      optimizer="bertadam", learning_rate=1e-2, lr_update=2, warmup=0.25, grad_clip=0.0,
      bert_lr_scale=1.0, freeze_bert=False))
  c.update(kw)
  return c


def warmup_linear(x, warmup):
  return x / warmup if x < warmup else max((x - 1.0) / (warmup - 1.0), 0.0)


def test_schedule_is_step_decay_times_warmup_linear():
  cfg = train_config()
  sched = optim.learning_rate_schedule(cfg, steps_per_epoch=5, total_steps=20)
  for step in range(20):
    expect = 1e-2 * 0.1 ** (step // 10) * warmup_linear(step / 20, 0.25)
    assert math.isclose(float(sched(step)), expect, rel_tol=1e-5, abs_tol=1e-12), step


def test_bertadam_matches_reference_update_rule():
  """BertAdam: per-tensor clip to norm 1, no bias correction, eps 1e-6."""
  cfg = train_config()
  sched = optim.learning_rate_schedule(cfg, steps_per_epoch=5, total_steps=20)
  tx = optim.make_optimizer(cfg, sched)
  rng = np.random.default_rng(0)
  params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
  ref = {k: v.astype(np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  state = tx.init(params)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  for step in range(6):
    grads = {k: (3.0 * rng.standard_normal(val.shape)).astype(np.float32) for k, val in params.items()}
    upd, state = tx.update({k: jnp.asarray(g) for k, g in grads.items()}, state, p)
    p = optax.apply_updates(p, upd)
    lr = 1e-2 * 0.1 ** (step // 10) * warmup_linear(step / 20, 0.25)
    for k, g in grads.items():
      g = g.astype(np.float64)
      norm = np.sqrt((g ** 2).sum())
      if 1.0 / (norm + 1e-6) < 1:
        g = g / (norm + 1e-6)
      m[k] = 0.9 * m[k] + 0.1 * g
      v2[k] = 0.999 * v2[k] + 0.001 * g * g
      ref[k] -= lr * m[k] / (np.sqrt(v2[k]) + 1e-6)
  for k in ref:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_adam_with_global_clip_matches_torch(torch_ref):
  cfg = train_config(optimizer="adam", learning_rate=2e-3, warmup=0.0, grad_clip=2.0)
  tx = optim.make_optimizer(cfg, optim.learning_rate_schedule(cfg, 5, 20))
  rng = np.random.default_rng(1)
  w = rng.standard_normal((4, 3)).astype(np.float32)
  grads = [(4.0 * rng.standard_normal(w.shape)).astype(np.float32) for _ in range(12)]
  lrs = [2e-3 * 0.1 ** (step // 10) for step in range(12)]  # step decay every 10 steps
  want = torch_ref("optim.adam_clipped", w=w, grads=grads, lrs=lrs, clip=2.0)
  p, state = {"w": jnp.asarray(w)}, tx.init({"w": jnp.asarray(w)})
  for g in grads:
    upd, state = tx.update({"w": jnp.asarray(g)}, state, p)
    p = optax.apply_updates(p, upd)
  np.testing.assert_allclose(np.asarray(p["w"]), want, rtol=1e-4, atol=1e-6)


def test_bert_lr_scale_and_freeze():
  params = {"text_enc": {"bert": {"w": jnp.ones(3)}, "fc": {"w": jnp.ones(3)}}}
  grads = {"text_enc": {"bert": {"w": jnp.ones(3)}, "fc": {"w": jnp.ones(3)}}}
  for kw, ratio in ((dict(bert_lr_scale=0.5), 0.5), (dict(freeze_bert=True), 0.0)):
    cfg = train_config(optimizer="adam", warmup=0.0, **kw)
    tx = optim.make_optimizer(cfg, optim.learning_rate_schedule(cfg, 5, 20))
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["text_enc"]["bert"]["w"], ratio * upd["text_enc"]["fc"]["w"], atol=1e-9)

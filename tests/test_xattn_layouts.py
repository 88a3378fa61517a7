"""MLASM's and BSSAN's tile scoring in the blocked (row, n, m, column) layout of
common/cross_attention.py: equal to the per-pair formulas on materialised contexts, in
one block and in several (the last padded), values and gradients, and unchanged when
the tile's images are sharded over devices as ModelScorer shards them."""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from dsran_jax.models.bssan import model as bssan_model
from dsran_jax.models.common import cross_attention as xa
from dsran_jax.models.mlasm import model as mlasm_model
from dsran_jax.models.mlasm.config import LAMBDA_I2T, LAMBDA_T2I

N_IMG, K, N_CAP, L, D = 5, 4, 6, 16, 12


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _tile(rng):
  """Regions and words with padding: image 1 has 2 real regions, image 4 none (a padded
  tile row, zero reps); captions of 1 to 16 words, the last one empty."""
  region_mask = np.ones((N_IMG, K), bool)
  region_mask[1, 2:] = False
  region_mask[4] = False
  regions = (_unit(rng.standard_normal((N_IMG, K, D))) * region_mask[..., None])
  lengths = np.array([16, 3, 1, 5, 12, 0])
  word_mask = np.arange(L)[None] < lengths[:, None]
  words = _unit(rng.standard_normal((N_CAP, L, D))) * word_mask[..., None]
  return (regions.astype(np.float32), region_mask, words.astype(np.float32), word_mask)


def _wide(x, axis):
  """(I, ...) or (J, ...) broadcast to (I, J, ...)."""
  return jnp.broadcast_to(jnp.expand_dims(x, axis), (N_IMG, N_CAP) + x.shape[1:])


def _mlasm_reps(rng, regions, region_mask, words, word_mask):
  proj = lambda *shape: rng.standard_normal(shape).astype(np.float32) / 3
  images = {"regions": regions, "region_mask": region_mask, "global": proj(N_IMG, D),
            "attn_proj": proj(N_IMG, K, D), "gate_proj": proj(N_IMG, K, D),
            "gate_base": proj(N_IMG, D)}
  return images, {"words": words, "word_mask": word_mask, "text_proj": proj(N_CAP, L, D)}


def _mlasm_explicit(images, texts):
  """0.8 S_local + 0.2 S_global from attend -> contexts -> cosines per pair, and the
  global branch from the explicit averaged weights."""
  r, rm = _wide(images["regions"], 1), _wide(images["region_mask"], 1)
  w, wm = _wide(texts["words"], 0), _wide(texts["word_mask"], 0)
  a = xa.attend(w, r, wm, rm, lam=LAMBDA_T2I, norm="clipped_l2norm")      # (I, J, L, k)
  s_t2i = xa.aggregate(xa.cosine(w, xa.attended_context(a, r)), wm, "Mean")
  b = xa.attend(r, w, rm, wm, lam=LAMBDA_I2T, norm="clipped_l2norm")      # (I, J, k, L)
  s_i2t = xa.aggregate(xa.cosine(r, xa.attended_context(b, w)), rm, "Mean")
  nonempty = xa.nonempty_pairs(images["region_mask"], texts["word_mask"])
  local = jnp.where(nonempty, 0.5 * s_t2i + 0.5 * s_i2t, 0.0)
  mean = lambda x, m, axis: (jnp.sum(jnp.where(m, x, 0.0), axis)
                             / jnp.maximum(jnp.sum(m, axis), 1))
  abar = jnp.moveaxis(mean(a, wm[..., None], 2), 1, 2)                   # (I, k, J)
  bbar = mean(b, rm[..., None], 2)                                        # (I, J, L)
  return 0.8 * local + 0.2 * mlasm_model.pairwise_global(abar, bbar, images, texts)


def test_mlasm_blocked_tile_equals_per_pair_formulas():
  """Both directions from one S (t2i over its rows, i2t over its columns), the averaged
  weights of the global branch, in one block and in blocks of 2 images (the last padded
  with a masked one): values and gradients as the explicit per-pair computation."""
  rng = np.random.default_rng(0)
  images, texts = _mlasm_reps(rng, *_tile(rng))
  two = 2 * K * L * N_CAP
  assert xa.context_block(K, L, N_CAP, two) == 2
  score = lambda block: lambda i, t: mlasm_model.tile_scores(
      i, t, ratio=0.8, pairwise=True, block_elements=block)
  forms = (score(xa.BLOCK_ELEMENTS), score(two), _mlasm_explicit)

  @jax.jit
  def run(images, texts):
    def grads(f):
      loss = lambda r, w: jnp.sum(f({**images, "regions": r}, {**texts, "words": w}) ** 2)
      return jax.grad(loss, argnums=(0, 1))(images["regions"], texts["words"])
    return [f(images, texts) for f in forms], [grads(f) for f in forms]

  (one, blocked, want), grads = run(images, texts)
  want = np.asarray(want)
  assert np.ptp(want[:4, :5]) > 1e-2 and not want[4].any() and not want[:, 5].any()
  np.testing.assert_allclose(one, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(blocked, want, atol=1e-5, rtol=0)
  for got_one, got_blocked, g_want in zip(*grads):
    assert np.abs(np.asarray(g_want)).max() > 1e-3
    np.testing.assert_allclose(got_one, g_want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_blocked, g_want, atol=1e-5, rtol=0)
  # The global branch in blocks of 3 captions equals it over the whole tile.
  abar = rng.random((N_IMG, K, N_CAP)).astype(np.float32)
  bbar = rng.random((N_IMG, N_CAP, L)).astype(np.float32)
  glob = lambda block: np.asarray(mlasm_model.pairwise_global(
      abar, bbar, images, texts, block_elements=block))
  np.testing.assert_allclose(glob(3 * N_IMG * D), glob(1 << 30), atol=1e-6, rtol=0)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (host) devices")
def test_mlasm_tile_sharded_over_images_is_unchanged():
  """ModelScorer shards a tile's images over the devices. The i2t Gram product over the
  columns was once a broadcast product that XLA CPU got wrong when sharded; this pins
  the sharded tile to the unsharded one."""
  rng = np.random.default_rng(1)
  regions, region_mask, words, word_mask = _tile(rng)
  n = jax.device_count()
  pad = lambda x: np.concatenate([x] * (-(-n // N_IMG)))[:max(n, N_IMG)]
  images, texts = _mlasm_reps(rng, pad(regions), pad(region_mask), words, word_mask)
  images = {k: pad(v) if v.shape[0] == N_IMG else v for k, v in images.items()}
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  fn = functools.partial(mlasm_model.tile_scores, ratio=0.8, pairwise=True)
  plain = np.asarray(jax.jit(fn)(images, texts))
  sharded = np.asarray(jax.jit(fn, in_shardings=(NamedSharding(mesh, P("data")),
                                                 NamedSharding(mesh, P())))(images, texts))
  assert np.ptp(plain) > 1e-2
  np.testing.assert_allclose(sharded, plain, atol=1e-6, rtol=0)


def test_bssan_blocked_directions_equal_per_pair_formulas():
  """Decoupled W2R (images as the rows) and O2W (captions as the rows), with projected
  cosines and the pooled weights, in one block and in several, against the bilinear
  attention written per pair."""
  rng = np.random.default_rng(2)
  regions, region_mask, words, word_mask = _tile(rng)
  mat = lambda: jnp.asarray(rng.standard_normal((D, D)).astype(np.float32) / 2)
  w_b, p_c, p_h = mat(), mat(), mat()
  kw = dict(lam=4.0, agg="LogSumExp", lambda_lse=6.0, pooled=True)
  n_block = 3 * K * L * N_CAP  # blocks of 1 image (two products per block)

  def ours(block):
    def f(r, w):
      return (bssan_model.w2r_decoupled(r, region_mask, r @ p_c, w @ w_b, w @ p_h,
                                        word_mask, block_elements=block, **kw),
              bssan_model.o2w(r, region_mask, r @ p_c, w @ w_b, w @ p_h, word_mask,
                              block_elements=block, **kw))
    return f

  def explicit(r, w):
    rw, rmw = _wide(r, 1), _wide(region_mask, 1)
    ww, wmw = _wide(w, 0), _wide(word_mask, 0)
    nonempty = xa.nonempty_pairs(region_mask, word_mask)
    # W2R: each word attends over the regions; O2W: each region over the words.
    alpha = xa.masked_softmax(4.0 * (ww @ w_b) @ jnp.swapaxes(rw, -1, -2), rmw[:, :, None])
    r_w2r = xa.cosine(ww @ p_h, alpha @ (rw @ p_c))
    beta = xa.masked_softmax(4.0 * rw @ jnp.swapaxes(ww @ w_b, -1, -2), wmw[:, :, None])
    r_o2w = xa.cosine(rw @ p_c, beta @ (ww @ p_h))
    mean = lambda x, m: jnp.sum(jnp.where(m, x, 0.0), 2) / jnp.maximum(jnp.sum(m, 2), 1)
    return ((jnp.where(nonempty, xa.aggregate(r_w2r, wmw, "LogSumExp", 6.0), 0.0),
             mean(alpha, wmw[..., None])),
            (jnp.where(nonempty, xa.aggregate(r_o2w, rmw, "LogSumExp", 6.0), 0.0),
             mean(beta, rmw[..., None])))

  run = jax.jit(lambda r, w: [f(r, w) for f in (ours(1 << 20), ours(n_block), explicit)])
  one, blocked, want = run(jnp.asarray(regions), jnp.asarray(words))
  for (s_want, pool_want), (s_one, pool_one), (s_blk, pool_blk) in zip(want, one, blocked):
    assert np.ptp(np.asarray(s_want)[:4, :5]) > 1e-2
    for got in (s_one, s_blk):
      np.testing.assert_allclose(got, s_want, atol=1e-5, rtol=0)
    for got in (pool_one, pool_blk):
      np.testing.assert_allclose(got, pool_want, atol=1e-6, rtol=0)

"""The VSE++ hinge loss against a brute-force double loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsran_jax.losses import contrastive_loss


def _brute(img, txt, margin, max_violation, valid):
  img = np.asarray(img, np.float64)
  txt = np.asarray(txt, np.float64)
  b = img.shape[0]
  valid = np.ones(b, bool) if valid is None else np.asarray(valid)
  s = img @ txt.T
  total = 0.0
  for i in range(b):           # anchor image i: negatives are captions j
    if not valid[i]:
      continue
    costs = [max(0.0, margin + s[i, j] - s[i, i]) for j in range(b) if j != i and valid[j]]
    total += (max(costs, default=0.0) if max_violation else sum(costs))
  for j in range(b):           # anchor caption j: negatives are images i
    if not valid[j]:
      continue
    costs = [max(0.0, margin + s[i, j] - s[j, j]) for i in range(b) if i != j and valid[i]]
    total += (max(costs, default=0.0) if max_violation else sum(costs))
  return total


def _embs(seed, b=8, e=16):
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((b, e)).astype(np.float32)
  txt = (img + 2.0 * rng.standard_normal((b, e))).astype(np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  return img, txt


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("use_valid", [False, True])
def test_matches_double_loop(max_violation, use_valid):
  img, txt = _embs(0)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool) if use_valid else None
  if use_valid:   # padded rows hold garbage that must not matter
    img[~valid] = 5.0
    txt[~valid] = -3.0
  got = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 0.2, max_violation,
                         None if valid is None else jnp.asarray(valid))
  want = _brute(img, txt, 0.2, max_violation, valid)
  assert want > 0
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_gradients_finite_and_jit():
  img, txt = _embs(1)
  valid = jnp.array([True] * 6 + [False] * 2)
  for mv in (True, False):
    f = jax.jit(jax.value_and_grad(
        lambda a, b: contrastive_loss(a, b, 0.2, mv, valid), argnums=(0, 1)))
    val, (gi, gt) = f(jnp.asarray(img), jnp.asarray(txt))
    assert np.isfinite(float(val))
    assert np.all(np.isfinite(gi)) and np.all(np.isfinite(gt))
    np.testing.assert_array_equal(np.asarray(gi)[6:], 0.0)   # padding gets no gradient
  # No violation at all (identical, orthogonal pairs): zero loss, finite zero grads.
  eye = jnp.eye(4, 8)
  val, g = jax.value_and_grad(contrastive_loss)(eye, eye, 0.2)
  assert float(val) == 0.0 and np.all(np.asarray(g) == 0.0)


def test_sharded_batch_same_as_single_device():
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip("needs several (fake) devices")
  n = devices.size
  mesh = Mesh(devices, ("data",))
  img, txt = _embs(2, b=2 * n)
  valid = np.arange(2 * n) < 2 * n - 3
  sh = NamedSharding(mesh, P("data"))
  put = lambda x: jax.device_put(jnp.asarray(x), sh)
  f = jax.jit(lambda a, b, v: contrastive_loss(a, b, 0.2, True, v))
  got = f(put(img), put(txt), put(valid))
  np.testing.assert_allclose(float(got), _brute(img, txt, 0.2, True, valid),
                             rtol=1e-5, atol=1e-5)


def test_shape_error():
  with pytest.raises(ValueError, match="one shape"):
    contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((3, 8)))

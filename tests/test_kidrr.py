"""KIDRR family (a reconstruction on the SGRAF core, docs/models/kidrr.md): with every
switch off it is SGRAF bit for bit (also from an SGRAF checkpoint through the
converter), each module alone changes the scores, and each equation matches a small
numpy version written from docs/models/kidrr.md (float64, per pair on the real words
and regions only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import jitted_matching
from dsran_jax import models
from dsran_jax.models.variables import init_variables, variable_shapes
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.kidrr import config as kidrr_config
from dsran_jax.models.kidrr import params as kidrr_params
from dsran_jax.models.sgraf import params as sgraf_params
from dsran_jax.convert.engine import ConversionError, load_checkpoint

VOCAB, IMG_DIM, K, D, S = 30, 12, 5, 16, 8


def _config(family="kidrr", module="SGR", **kidrr):
  c = get_base_config()
  c.model.name = family
  c.model.vocab_size = VOCAB
  c.model.embed_size, c.model.word_dim, c.model.img_dim = D, 8, IMG_DIM
  s = c.model.sgraf
  s.sim_dim, s.num_regions, s.module = S, K, module
  s.max_block_elements = 4 * 8 * D * 3   # chunks of 3 captions against 4 images
  if family == "kidrr":
    kidrr_config.switch_off(c)
    for key, value in kidrr.items():
      c.model.kidrr[key] = value
  return c


def _data(seed=0, n_img=4, n_cap=6, max_len=8):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n_img, K, IMG_DIM)).astype(np.float32)
  rmask = np.ones((n_img, K), bool)
  rmask[1, 3:] = False
  lens = rng.integers(2, max_len + 1, n_cap)
  lens[0] = max_len
  ids = np.zeros((n_cap, max_len), np.int32)
  for j, n in enumerate(lens):
    ids[j, :n] = rng.integers(1, VOCAB, n)
  batch = {"regions": images, "region_mask": rmask, "input_ids": ids,
           "attention_mask": (ids > 0).astype(np.int32)}
  return batch, lens


def _reps_and_scores(model, v, batch):
  enc_i, enc_t, score = jitted_matching(model)
  img = enc_i(v, {k: batch[k] for k in ("regions", "region_mask")})
  txt = enc_t(v, {k: batch[k] for k in ("input_ids", "attention_mask")})
  return img, txt, np.asarray(score(v, img, txt))


def _perturbed(variables, seed=1):
  """Init variables with every leaf perturbed (BatchNorm stats moved off 0 / 1)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  out = {}
  for path, x in flat.items():
    x = np.asarray(x, np.float32)
    if path.endswith("/var"):
      out[path] = (0.5 + rng.random(x.shape)).astype(np.float32)
    else:
      out[path] = (x + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


def _subset(variables, model):
  """`variables` restricted to the tree `model` has."""
  want = variable_shapes(model)
  flat = traverse_util.flatten_dict(variables, sep="/")
  return traverse_util.unflatten_dict({k: flat[k] for k in want}, sep="/")


def _model(c):
  return models.build_model(c.model, VOCAB)


# --------------------------------------------------------------- all off == SGRAF


@pytest.mark.parametrize("module", ["SGR", pytest.param("SAF", marks=pytest.mark.slow)])
def test_all_off_is_sgraf_bit_for_bit(module):
  """Same variables, same eval scores and same train-mode scores and BatchNorm updates."""
  sgraf = _model(_config("sgraf", module))
  kidrr = _model(_config("kidrr", module))
  assert variable_shapes(kidrr) == variable_shapes(sgraf)
  v = _perturbed(init_variables(sgraf, jax.random.key(0)))
  batch, _ = _data()
  np.testing.assert_array_equal(_reps_and_scores(kidrr, v, batch)[2],
                                _reps_and_scores(sgraf, v, batch)[2])
  train = {k: x[:4] for k, x in batch.items()}

  def step(model):
    return jax.jit(lambda v: model.apply(v, train, train=True, rngs={"dropout": jax.random.key(3)},
                                         mutable=["batch_stats"]))(v)
  (s1, u1), (s2, u2) = step(kidrr), step(sgraf)
  np.testing.assert_array_equal(s1, s2)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(a, b)


def test_all_off_from_an_sgraf_checkpoint(torch_ref, tmp_path):
  """`--model=kidrr` on an SGRAF checkpoint: every module off, SGRAF's scores exactly,
  which are the authors' to 1e-4."""
  path = str(tmp_path / "m.pth.tar")
  torch_ref("sgraf.save_checkpoint", path=path, vocab_size=VOCAB, seed=4,
            opt=dict(embed_size=D, word_dim=8, img_dim=IMG_DIM, sim_dim=S, module_name="SAF"))
  ckpt = load_checkpoint(path)
  assert not kidrr_params.detect(ckpt) and sgraf_params.detect(ckpt)
  as_kidrr = kidrr_params.convert(ckpt, {"path": path}, config=get_base_config())
  as_sgraf = sgraf_params.convert(ckpt, {"path": path}, config=get_base_config())
  assert as_kidrr.config.model.name == "kidrr"
  for key, value in kidrr_config.OFF.items():
    assert as_kidrr.config.model.kidrr[key] == value, key
  rng = np.random.default_rng(2)
  images = rng.standard_normal((3, 36, IMG_DIM)).astype(np.float32)
  batch, lens = _data(3, n_cap=5)
  batch = {**batch, "regions": images, "region_mask": np.ones((3, 36), bool)}
  km = models.build_model(as_kidrr.config.model, VOCAB)
  sm = models.build_model(as_sgraf.config.model, VOCAB)
  got = _reps_and_scores(km, as_kidrr.variables, batch)[2]
  np.testing.assert_array_equal(got, _reps_and_scores(sm, as_sgraf.variables, batch)[2])
  want = torch_ref("sgraf.sims", path=path, images=images, captions=batch["input_ids"],
                   lengths=lens, shard_size=2)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  with pytest.raises(ConversionError, match="KIDRR has no released checkpoints"):
    kidrr_params.convert({"model": [ckpt["model"][0], ckpt["model"][1]]},
                         config=get_base_config())


# ------------------------------------------------------------ each module matters


SWITCHES = [("SGR", dict(kgid_steps=2)), ("SGR", dict(kgid_steps=1, kgid_share_steps=False)),
            ("SGR", dict(i2t=True)), ("SGR", dict(global_local=True)),
            ("SGR", dict(rgr_blend="scalar")), ("SGR", dict(rgr_blend="node")),
            ("SGR", dict(rgr_topk=3)), ("SGR", dict(rgr_residual=True)),
            ("SAF", dict(saf_steps=2))]


@pytest.mark.parametrize("module,switch", SWITCHES,
                         ids=[f"{m}-" + "-".join(f"{k}={v}" for k, v in s.items())
                              for m, s in SWITCHES])
def test_each_module_alone_changes_the_scores(module, switch):
  on = _model(_config("kidrr", module, **switch))
  off = _model(_config("kidrr", module))
  v = _perturbed(init_variables(on, jax.random.key(5)))
  batch, _ = _data(1)
  s_on = _reps_and_scores(on, v, batch)[2]
  s_off = _reps_and_scores(off, _subset(v, off), batch)[2]
  assert np.isfinite(s_on).all()
  assert np.abs(s_on - s_off).max() > 1e-4, switch


# ---------------------------------------------- numpy versions of docs/models/kidrr.md


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _l2n(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _lin(p, x):
  return x @ p["kernel"] + p["bias"]


def _bn(p, s, x, slot=None):
  mean, var = s["mean"], s["var"]
  scale, bias = p["scale"], p["bias"]
  if slot is not None:
    mean, var, scale, bias = mean[slot, None], var[slot, None], scale[slot, None], bias[slot, None]
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_sa(p, s, x, raw, slots=None):
  """VisualSA (slots given: the per-slot BatchNorm, eval) or TextSA on real rows x."""
  l = _lin(p["local_fc"], x)
  g = _lin(p["global_fc"], raw)
  if slots is not None:
    l = _bn(p["local_bn"], s["local_bn"], l, slots)
    g = _bn(p["global_bn"], s["global_bn"], g)
  w = _softmax(_lin(p["common_fc"], np.tanh(l) * np.tanh(g))[:, 0])
  return _l2n(w @ x)


def _np_kgid(p, s, x, g, steps, share, slots=None):
  """docs/models/kidrr.md (KGID), literally, on one item's real nodes x (n, d)."""
  d = x.shape[1]
  for tau in range(steps):
    sfx = "" if share else f"_{tau}"
    q, k = _lin(p[f"query{sfx}"], x), _lin(p[f"key{sfx}"], x)
    a = _softmax(q @ k.T / np.sqrt(d))
    m = _lin(p[f"message{sfx}"], a @ x)
    gam = _sigmoid(_lin(p[f"gate{sfx}"], np.concatenate([x, np.repeat(g[None], len(x), 0)], 1)))
    x = _l2n(x + m + gam * _lin(p[f"broadcast{sfx}"], g)[None])
    g = _np_sa(p[f"sa{sfx}"], s.get(f"sa{sfx}", {}), x, g, slots)
  return x, g


def _leaky(x):
  return np.where(x > 0, x, 0.1 * x)


def _attend(queries, context, lam):
  """SCAN_attention: clipped l2 over the queries, softmax over the context, l2n."""
  sims = _leaky(context @ queries.T)                       # (n_c, n_q)
  sims = sims / (np.linalg.norm(sims, axis=1, keepdims=True) + 1e-8)
  return _l2n(_softmax(lam * sims.T) @ context)


def _np_pair(p, v, e, vg, eg, ext, module):
  """docs/models/kidrr.md (nodes, RGR and readouts) for one pair's real v, e. The
  global-local queries are normalised together with the other side's local queries
  (the documented reading; a lone query makes the clipped l2 norm a sign)."""
  sim = lambda w, a, b: _l2n(_lin(p[w], np.square(a - b)))
  nodes = [sim("sim_tranglo_w", vg, eg)[None]]
  if ext.get("global_local"):
    g_v = _attend(np.vstack([eg, e]), v, 9.0)[0]
    g_t = _attend(np.vstack([vg, v]), e, 4.0)[0]
    nodes += [sim("sim_glo_v_w", g_v, eg)[None], sim("sim_glo_t_w", g_t, vg)[None]]
  nodes.append(sim("sim_tranloc_w", _attend(e, v, 9.0), e))
  if ext.get("i2t"):
    nodes.append(sim("sim_tranloc_i2t_w", _attend(v, e, 4.0), v))
  n = np.concatenate(nodes)
  steps = sorted(k for k in p if k.startswith("SGR_module_"))
  prev = None
  for t, name in enumerate(steps):
    gp = p[name]
    a = _softmax(_lin(gp["graph_query_w"], n) @ _lin(gp["graph_key_w"], n).T)
    if t and ext.get("rgr_blend", "none") != "none":
      beta = _sigmoid(gp["beta"]) if "beta" in gp else _sigmoid(_lin(gp["beta_w"], n))
      a = beta * prev + (1 - beta) * a
    kk = ext.get("rgr_topk", 0)
    if 0 < kk < a.shape[1]:
      thr = np.sort(a, axis=1)[:, -kk][:, None]
      a = np.where(a >= thr, a, 0)
      a = a / a.sum(1, keepdims=True)
    new = np.maximum(_lin(gp["sim_graph_w"], a @ n), 0)
    n = new + n if ext.get("rgr_residual") else new
    prev = a
  if module == "SGR":
    vec = n[0]
  else:
    x = _lin(p["SAF_module"]["attn_sim_w"], n)[:, 0]
    att = _sigmoid(_bn(p["SAF_module"]["bn"], p["_saf_stats"], x))
    vec = _l2n((att / (att.sum() + 1e-8)) @ n)
  return _sigmoid(_lin(p["sim_eval_w"], vec))[0]


HEAD_CASES = [("SGR", dict(i2t=True, global_local=True, rgr_blend="scalar", rgr_topk=4,
                           rgr_residual=True)),
              ("SAF", dict(i2t=True, global_local=True, rgr_blend="node", saf_steps=2)),
              ("SGR", dict(global_local=True, rgr_blend="node"))]


@pytest.mark.parametrize("module,ext", HEAD_CASES, ids=["SGR-full", "SAF-full", "SGR-gl-node"])
def test_head_matches_numpy_models_md(module, ext):
  """The tiled head (sorted captions, chunks, length buckets, masks, fused SGR) equals
  the per-pair numpy version on the reps our encoders give."""
  model = _model(_config("kidrr", module, **ext))
  v = _perturbed(init_variables(model, jax.random.key(6)))
  batch, lens = _data(4)
  img, txt, got = _reps_and_scores(model, v, batch)
  p = _np(v["params"]["sim_enc"])
  if module == "SAF":
    p["_saf_stats"] = _np(v["batch_stats"]["sim_enc"]["SAF_module"]["bn"])
  img, txt = _np(img), _np(txt)
  for i in range(got.shape[0]):
    real = batch["region_mask"][i]
    for j in range(got.shape[1]):
      want = _np_pair(p, img["regions"][i][real], txt["words"][j][:lens[j]],
                      img["global"][i], txt["global"][j], ext, module)
      np.testing.assert_allclose(got[i, j], want, atol=2e-5, rtol=0, err_msg=f"pair {i},{j}")


@pytest.mark.parametrize("share", [True, False])
def test_kgid_matches_numpy_models_md(share):
  """KGID on regions (VisualSA with the slot BatchNorm, one image with padded slots)
  and words (TextSA, padded words), eval mode."""
  model = _model(_config("kidrr", kgid_steps=2, kgid_share_steps=share))
  plain = _model(_config("kidrr"))
  v = _perturbed(init_variables(model, jax.random.key(7)))
  batch, lens = _data(5)
  img, txt, _ = _reps_and_scores(model, v, batch)
  img0, txt0, _ = _reps_and_scores(plain, _subset(v, plain), batch)   # before KGID
  p, s = _np(v["params"]), _np(v["batch_stats"])
  img, txt, img0, txt0 = _np(img), _np(txt), _np(img0), _np(txt0)
  for i, real in enumerate(batch["region_mask"]):
    slots = np.nonzero(real)[0]
    x, g = _np_kgid(p["img_kgid"], s["img_kgid"], img0["regions"][i][real],
                    img0["global"][i], 2, share, slots)
    np.testing.assert_allclose(img["regions"][i][real], x, atol=1e-5)
    np.testing.assert_array_equal(img["regions"][i][~real], 0.0)
    np.testing.assert_allclose(img["global"][i], g, atol=1e-5)
  for j, n in enumerate(lens):
    x, g = _np_kgid(p["txt_kgid"], {}, txt0["words"][j][:n], txt0["global"][j], 2, share)
    np.testing.assert_allclose(txt["words"][j][:n], x, atol=1e-5)
    np.testing.assert_array_equal(txt["words"][j][n:], 0.0)
    np.testing.assert_allclose(txt["global"][j], g, atol=1e-5)


@pytest.mark.slow  # padding invariance of the full model is also in test_zoo.py
def test_full_kidrr_padding_invariance_and_training_step():
  """Full KIDRR: padded words and region features do not change scores; one train-mode
  step gives finite gradients for every module."""
  c = _config("kidrr")
  for key, value in kidrr_config.defaults().items():
    c.model.kidrr[key] = value
  model = _model(c)
  v = _perturbed(init_variables(model, jax.random.key(8)))
  batch, _ = _data(6)
  base = _reps_and_scores(model, v, batch)[2]
  noisy = dict(batch)
  noisy["regions"] = np.where(batch["region_mask"][..., None], batch["regions"], 50.0)
  noisy["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, 9)))
  noisy["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (0, 9)))
  np.testing.assert_allclose(_reps_and_scores(model, v, noisy)[2], base, atol=1e-6)
  train = {k: x[:4] for k, x in batch.items()}

  def loss(params):
    s, _ = model.apply({**v, "params": params}, train, train=True,
                       rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    return jnp.sum(s * (1 - 2 * jnp.eye(4)))
  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(v["params"]), sep="/")
  assert all(np.isfinite(g).all() for g in grads.values())
  for prefix in ("img_kgid", "txt_kgid", "sim_enc/sim_tranloc_i2t_w", "sim_enc/sim_glo_v_w",
                 "sim_enc/SGR_module_1/beta"):
    assert any(np.abs(g).max() > 0 for k, g in grads.items() if k.startswith(prefix)), prefix


def test_config_recipe_and_validation():
  c = recipe_config("f30k", "kidrr")
  assert c.model.kidrr.kgid_steps == 2 and c.model.kidrr.i2t and c.model.kidrr.rgr_residual
  assert (c.train.num_epochs, c.train.lr_update, c.model.sgraf.module) == (40, 30, "SGR")
  kidrr_config.validate(c)
  c.model.kidrr.rgr_blend = "gate"
  with pytest.raises(ValueError, match="config.model.kidrr.rgr_blend='gate'"):
    kidrr_config.validate(c)
  c.model.kidrr.rgr_blend = "none"
  c.model.kidrr.kgid_steps = -1
  with pytest.raises(ValueError, match="config.model.kidrr.kgid_steps=-1"):
    kidrr_config.validate(c)

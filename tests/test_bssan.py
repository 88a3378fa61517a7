"""BSSAN-R (docs/models/bssan.md): every attention and fusion against a float64 numpy
implementation written from the equations (model.py's docstring), one pair at a time on
the valid positions only; padding invariance; the coupled recurrence over a tile equals a
per-pair loop; the PyTorch-layout LSTM against torch.nn.LSTM on packed sequences; config
hooks."""
import os
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jitted_matching
from dsran_jax import models
from dsran_jax.models.variables import init_variables
from dsran_jax.default_config import ConfigError, recipe_config
from dsran_jax.models.bssan import config as bssan_config
from dsran_jax.models.common.text import LSTM, recurrent_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, D, WORD_DIM, IMG_DIM = 30, 8, 6, 10
EPS = 1e-8
ATOL = 1e-6  # measured max |err| 1.4e-7 (float32 vs float64)


def make_config(**bssan):
  c = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]("bssan")
  c.model.embed_size, c.model.word_dim = D, WORD_DIM
  c.model.img_dim = c.data.img_dim = IMG_DIM
  c.model.bssan.mlp_hidden = 5
  for key, value in bssan.items():
    c.model.bssan[key] = value
  bssan_config.validate(c)
  return c


def build(seed=0, **bssan):
  """Model and variables, every parameter moved off its init (identity bilinear maps,
  zero biases) so that a transposed or dropped term shows."""
  c = make_config(**bssan)
  model = models.build_model(c.model, vocab_size=VOCAB)
  variables = init_variables(model, jax.random.PRNGKey(seed))
  leaves, tree = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x)).astype(np.float32)
            for x in leaves]
  return model, {"params": jax.tree.unflatten(tree, leaves)}


def ragged_batch(rng, n, k=5, max_len=7, grid=False, garbage=9.0):
  """n images with 2..k real regions (garbage behind the mask) and n captions of
  1..max_len words (the first caption uses all of them)."""
  n_reg = rng.integers(2, k + 1, n)
  lens = rng.integers(1, max_len + 1, n)
  lens[0] = max_len
  region_mask = np.arange(k)[None] < n_reg[:, None]
  regions = rng.standard_normal((n, k, IMG_DIM)).astype(np.float32)
  regions = np.where(region_mask[..., None], regions, np.float32(garbage))
  attention_mask = (np.arange(max_len)[None] < lens[:, None]).astype(np.int32)
  ids = rng.integers(1, VOCAB, (n, max_len)).astype(np.int32) * attention_mask
  batch = {"regions": regions, "region_mask": region_mask, "input_ids": ids,
           "attention_mask": attention_mask}
  if grid:
    batch["grid"] = rng.standard_normal((n, 49, IMG_DIM)).astype(np.float32)
  return batch


_JITTED = {}  # one compiled scorer per (model, train): compiles dominate this file


def jax_scores(model, variables, images, captions, train=False, rng=None):
  if (model, train) not in _JITTED:
    _JITTED[model, train] = jax.jit(lambda v, a, b, r: model.apply(
        v, model.apply(v, a, method="encode_images"),
        model.apply(v, b, train=train, method="encode_texts", rngs={"dropout": r}),
        method="score"))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return np.asarray(_JITTED[model, train](variables, images, captions, rng))


# ------------------------------------------------------------------ numpy reference


def _p(params, *path):
  out = params
  for key in path:
    out = out[key]
  return np.asarray(out, np.float64)


def np_l2n(x):
  return x / (np.sqrt(np.sum(x * x, -1, keepdims=True)) + EPS)


def np_cos(a, b):
  return np.sum(a * b, -1) / np.maximum(
      np.sqrt(np.sum(a * a, -1)) * np.sqrt(np.sum(b * b, -1)), EPS)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_agg(r, agg, lam):
  if agg == "Mean":
    return r.mean()
  return np.log(np.sum(np.exp(lam * r))) / lam


def np_lstm_step(x, h, c, w_ih, b_ih, w_hh, b_hh):
  """torch.nn.LSTM's cell, gates (i, f, g, o)."""
  g = x @ w_ih + b_ih + h @ w_hh + b_hh
  i, f, gg, o = np.split(g, 4)
  c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(gg)
  return np_sigmoid(o) * np.tanh(c), c


def np_lstm(x, p, reverse=False):
  h = c = np.zeros(p["w_hh"].shape[0])
  out = []
  for xt in (x[::-1] if reverse else x):
    h, c = np_lstm_step(xt, h, c, p["w_ih"], p["b_ih"], p["w_hh"], p["b_hh"])
    out.append(h)
  out = np.array(out)
  return out[::-1] if reverse else out


def np_linear(x, params, name):
  return x @ _p(params, name, "kernel") + _p(params, name, "bias")


def np_reference(params, s, images, captions, i, j):
  """The score of image i with caption j from the equations, on the valid positions."""
  grid = s.w2r_visual == "grid" and s.directions != "o2w"
  if s.directions != "w2r" or not grid:
    k = int(images["region_mask"][i].sum())
    o = np_l2n(np_linear(images["regions"][i, :k].astype(np.float64), params, "img_fc"))
  ctx = np_l2n(np_linear(images["grid"][i].astype(np.float64), params, "grid_fc")) if grid else o
  n = int(captions["attention_mask"][j].sum())
  te = params["txt_enc"]
  x = _p(te, "embed", "embedding")[captions["input_ids"][j, :n]]
  lstm = lambda name: {w: _p(te, name, w) for w in ("w_ih", "b_ih", "w_hh", "b_hh")}
  proj = lambda a, name: np_linear(a, params, name) if s.cosine_proj else a
  out = {}
  if s.directions != "w2r" or s.w2r == "decoupled":  # the text-only LSTM
    h = np_lstm(x, lstm("lstm"))
    if s.bi_lstm:
      h = (h + np_lstm(x, lstm("lstm_reverse"), reverse=True)) / 2
    if s.txt_norm:
      h = np_l2n(h)
  if s.directions in ("both", "w2r"):
    w_b = _p(params, "w2r_bilinear", "kernel")
    if s.w2r == "decoupled":
      alpha = np_softmax(s.lambda_w2r * (h @ w_b) @ ctx.T)            # (L, n)
      c_t = alpha @ ctx
      h_w2r = h
    else:
      p = {w: _p(params, "w2r_lstm", w) for w in ("w_ih", "b_ih", "w_hh", "b_hh")}
      hs, cs = [], []
      state, cell = np.zeros(D), np.zeros(D)
      for t in range(n):
        q = (np_l2n(state) if s.txt_norm else state) @ w_b
        a = np_softmax(s.lambda_w2r * ctx @ q)
        cs.append(a @ ctx)
        state, cell = np_lstm_step(np.concatenate([x[t], cs[-1]]), state, cell, **p)
        hs.append(np_l2n(state) if s.txt_norm else state)
      c_t, h_w2r = np.array(cs), np.array(hs)
    r = np_cos(proj(h_w2r, "w2r_proj_h"), proj(c_t, "w2r_proj_c"))
    out["w2r"] = np_agg(r, s.w2r_agg, s.lambda_lse)
  if s.directions in ("both", "o2w"):
    beta = np_softmax(s.lambda_o2w * o @ (h @ _p(params, "o2w_bilinear", "kernel")).T)
    u = beta @ h                                                        # (k, d)
    r = np_cos(proj(o, "o2w_proj_o"), proj(u, "o2w_proj_u"))
    out["o2w"] = np_agg(r, s.o2w_agg, s.lambda_lse)
  if s.directions != "both":
    return out[s.directions]
  if s.fuse == "fixed":
    return s.fuse_weight * out["w2r"] + (1 - s.fuse_weight) * out["o2w"]
  if s.fuse == "learned":
    w = np_sigmoid(_p(params, "fuse_logit"))
    return w * out["w2r"] + (1 - w) * out["o2w"]
  pooled = np.concatenate([c_t.mean(0), h_w2r.mean(0), u.mean(0), o.mean(0),
                           [out["w2r"], out["o2w"]]])
  hidden = np.maximum(np_linear(pooled, params, "mlp_1"), 0.0)
  return np_sigmoid(np_linear(hidden, params, "mlp_2"))[0]


# Each attention, fusion and switch is in at least one variant (8 compiles, not 20).
VARIANTS = {
    "default": {},  # both directions, decoupled W2R over regions, fixed w = 0.5
    "w2r-alone-lse-xavier": dict(directions="w2r", w2r_agg="LogSumExp",
                                 bilinear_init="xavier"),
    "o2w-alone-lse-bi": dict(directions="o2w", o2w_agg="LogSumExp", bi_lstm=True),
    "coupled-learned": dict(w2r="coupled", fuse="learned", fuse_weight=0.3,
                            lambda_w2r=5.0, lambda_o2w=2.0),
    "mlp": dict(fuse="mlp"),
    "mlp-coupled": dict(fuse="mlp", w2r="coupled"),
    "grid-coupled-w2r-alone": dict(w2r_visual="grid", w2r="coupled", directions="w2r"),
    "grid-noproj-bi-raw": dict(w2r_visual="grid", cosine_proj=False, bi_lstm=True,
                               txt_norm=False, fuse_weight=0.8),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_scores_match_numpy_equations(name):
  options = VARIANTS[name]
  model, variables = build(seed=len(name), **options)
  s = make_config(**options).model.bssan
  rng = np.random.default_rng(len(name))
  images = ragged_batch(rng, 3, grid=True)
  captions = ragged_batch(rng, 4, grid=True)
  got = jax_scores(model, variables, images, captions)
  want = np.array([[np_reference(variables["params"], s, images, captions, i, j)
                    for j in range(4)] for i in range(3)])
  assert np.abs(want).max() > 1e-2  # the numbers are not trivially 0
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL, err_msg=name)


# Decoupled W2R over regions is the zoo contract test's padding case (tests/test_zoo.py).
@pytest.mark.parametrize("name", ["mlp-coupled", "grid-noproj-bi-raw"])
def test_padding_never_changes_scores_and_padded_rows_stay_finite(name):
  options = VARIANTS[name]
  model, variables = build(**options)
  rng = np.random.default_rng(7)
  images, captions = ragged_batch(rng, 3, grid=True), ragged_batch(rng, 4, grid=True)
  want = jax_scores(model, variables, images, captions)
  wide_i = ragged_batch(np.random.default_rng(8), 3, k=9, grid=True, garbage=-40.0)
  wide_c = ragged_batch(np.random.default_rng(9), 4, max_len=12, grid=True)
  for key, src in (("regions", images), ("region_mask", images), ("grid", images)):
    wide_i[key][:, :src[key].shape[1]] = src[key]
    if key == "region_mask":
      wide_i[key][:, src[key].shape[1]:] = False
  for key in ("input_ids", "attention_mask"):
    wide_c[key][:] = 0
    wide_c[key][:, :captions[key].shape[1]] = captions[key]
  wide_c["input_ids"][:, 7:] = 5  # ids behind the mask are never read
  got = jax_scores(model, variables, wide_i, wide_c)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)

  # A tile's padded rows (all masks False, zero reps) score finitely and leave the real
  # pairs alone; an item with nothing to attend to scores 0 in each branch (a grid row
  # has no mask: its W2R half stays real). Gradients stay finite too (checked on the
  # decoupled variant; the coupled one's backward compile costs 10 s).
  images["region_mask"][2] = False
  captions["attention_mask"][3] = 0
  captions["input_ids"][3] = 0
  scores = jax_scores(model, variables, images, captions)
  assert np.isfinite(scores).all()
  if "mlp" not in name:
    assert (scores[:, 3] == 0).all()
  if "grid" not in name and "mlp" not in name:
    assert (scores[2] == 0).all()
  if "coupled" not in name:
    def total(v):
      img = model.apply(v, images, method="encode_images")
      txt = model.apply(v, captions, method="encode_texts")
      return jnp.sum(model.apply(v, img, txt, method="score"))
    grads = jax.jit(jax.grad(total))(variables)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(scores[:2, :3], want[:2, :3], atol=1e-5, rtol=1e-5)


def test_coupled_tile_equals_a_loop_over_pairs_and_caption_blocks():
  """The coupled recurrence of a 3 x 5 tile at once equals scoring each pair alone
  (a 1 x 1 tile: its own LSTM run); neither the lax.map over caption blocks nor
  unrolling the scan changes a number."""
  model, variables = build(w2r="coupled")
  rng = np.random.default_rng(11)
  images, captions = ragged_batch(rng, 3), ragged_batch(rng, 5)
  enc_i, enc_t, score = jitted_matching(model)
  img, txt = enc_i(variables, images), enc_t(variables, captions)
  tile = np.asarray(score(variables, img, txt))
  take = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
  loop = np.array([[float(score(variables, take(img, i), take(txt, j))[0, 0])
                    for j in range(5)] for i in range(3)])
  np.testing.assert_allclose(tile, loop, atol=1e-6, rtol=1e-6)
  # 3 images x 8 * D gate floats per caption: blocks of 2 captions, the last padded.
  blocked_model = models.build_model(
      make_config(w2r="coupled", max_block_elements=3 * 8 * D * 2).model, VOCAB)
  blocked = np.asarray(jax.jit(lambda v, a, b: blocked_model.apply(v, a, b, method="score"))(
      variables, img, txt))
  np.testing.assert_allclose(blocked, tile, atol=1e-6, rtol=1e-6)
  unrolled_model = models.build_model(make_config(w2r="coupled", scan_unroll=7).model, VOCAB)
  unrolled = np.asarray(jax.jit(
      lambda v, a, b: unrolled_model.apply(v, a, b, method="score"))(variables, img, txt))
  np.testing.assert_allclose(unrolled, tile, atol=1e-6, rtol=1e-6)


def test_lstm_dropout_only_in_training():
  model, variables = build()
  rng = np.random.default_rng(12)
  images, captions = ragged_batch(rng, 3), ragged_batch(rng, 3)
  a = jax_scores(model, variables, images, captions, train=True, rng=jax.random.PRNGKey(0))
  b = jax_scores(model, variables, images, captions, train=True, rng=jax.random.PRNGKey(1))
  assert np.abs(a - b).max() > 1e-4
  np.testing.assert_array_equal(jax_scores(model, variables, images, captions),
                                jax_scores(model, variables, images, captions))


# ---------------------------------------------------------------------------- LSTM


def test_lstm_matches_pytorch_packed_sequences(torch_ref):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((4, 6, 5)).astype(np.float32)
  lengths = np.array([3, 6, 1, 4])  # unsorted: pack_padded_sequence(enforce_sorted=False)
  mask = np.arange(6)[None] < lengths[:, None]
  ref = torch_ref("bssan.lstm_packed", x=x, lengths=lengths, hidden=7, seed=0,
                  bidirectional=True)
  fwd = np.asarray(LSTM(7).apply({"params": ref["params"]["lstm"]}, x, mask))
  bwd = np.asarray(LSTM(7, reverse=True).apply({"params": ref["params"]["lstm_reverse"]},
                                               x, mask))
  np.testing.assert_allclose(fwd, ref["out"][..., :7], atol=1e-5)
  np.testing.assert_allclose(bwd, ref["out"][..., 7:], atol=1e-5)
  # Final states: the forward's at each caption's last token, the backward's at its first.
  np.testing.assert_allclose(fwd[np.arange(4), lengths - 1], ref["h_n"][0], atol=1e-5)
  np.testing.assert_allclose(bwd[:, 0], ref["h_n"][1], atol=1e-5)
  assert (fwd[~mask] == 0).all() and (bwd[~mask] == 0).all()

  uni = torch_ref("bssan.lstm_packed", x=x, lengths=lengths, hidden=7, seed=1)
  ours = LSTM(7).apply({"params": uni["params"]["lstm"]}, x, mask)
  np.testing.assert_allclose(np.asarray(ours), uni["out"], atol=1e-5)

  # recurrent_tokens(cell="lstm"): parameter paths embed / lstm / lstm_reverse and the
  # average of the two halves, as for the GRU.
  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, ids, attention_mask):
      return recurrent_tokens(ids, attention_mask, False, vocab_size=9, word_dim=5,
                              hidden_size=7, bidirectional=True, embed_dropout=0.0,
                              cell="lstm")
  ids = (rng.integers(1, 9, (4, 6)) * mask).astype(np.int32)
  table = rng.standard_normal((9, 5)).astype(np.float32)
  embedded = table[ids]
  ref = torch_ref("bssan.lstm_packed", x=embedded, lengths=lengths, hidden=7, seed=2,
                  bidirectional=True)
  params = {"embed": {"embedding": table}, **ref["params"]}
  out = Encoder().apply({"params": params}, ids, mask.astype(np.int32))
  want = (ref["out"][..., :7] + ref["out"][..., 7:]) / 2
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
  with pytest.raises(ValueError, match="cell='rnn'"):
    recurrent_tokens(ids, mask, False, vocab_size=9, word_dim=5, hidden_size=7, cell="rnn")


# -------------------------------------------------------------------------- config


def test_recipes_demo_and_switches():
  for dataset, epochs, decay in (("f30k", 30, 15), ("coco", 20, 10)):
    c = recipe_config(dataset, "bssan")
    bssan_config.validate(c)
    t = c.train
    assert (t.optimizer, t.learning_rate, t.batch_size, t.grad_clip) == ("adam", 2e-4, 128, 2.0)
    assert (t.num_epochs, t.lr_update, t.margin, t.max_violation) == (epochs, decay, 0.2, True)
    assert c.data.format == "precomp" and c.data.num_regions == 36
    assert c.model.embed_size == 1024 and c.model.word_dim == 300
    s = c.model.bssan
    assert (s.w2r, s.w2r_visual, s.directions, s.fuse, s.lstm_dropout) == (
        "decoupled", "regions36", "both", "fixed", 0.2)
  demo = make_config()
  assert demo.data.format == "synthetic"
  m = demo.model
  keys = lambda **kw: bssan_config.image_keys(make_config(**kw).model)
  assert keys() == ("regions", "region_mask")
  assert keys(w2r_visual="grid") == ("regions", "region_mask", "grid")
  assert keys(w2r_visual="grid", directions="w2r") == ("grid",)
  assert keys(w2r_visual="grid", directions="o2w") == ("regions", "region_mask")
  assert bssan_config.eval_tile(m) == (128, 256)
  assert bssan_config.eval_tile(make_config(w2r="coupled").model) == (32, 128)
  bad = [(dict(w2r="sm-lstm"), "bssan.w2r="), (dict(fuse="gated"), "bssan.fuse="),
         (dict(w2r="coupled", bi_lstm=True), "bi_lstm"),
         (dict(fuse="mlp", directions="w2r"), "fuse='mlp'"),
         (dict(fuse="learned", fuse_weight=1.0), "fuse_weight"),
         (dict(lambda_w2r=0.0), "lambda_w2r"), (dict(lstm_dropout=1.0), "lstm_dropout")]
  for options, message in bad:
    with pytest.raises(ValueError, match=message):
      make_config(**options)


def test_grid_comes_from_the_synthetic_world():
  from dsran_jax import data  # pylint: disable=g-import-not-at-top
  c = make_config(w2r_visual="grid")
  c.data.synthetic.num_train_images = 4
  split = data.load_split(c, "train")
  arrays = split.images(np.arange(2))
  assert arrays["grid"].shape == (2, 49, IMG_DIM)
  model, variables = build(w2r_visual="grid")
  captions = split.captions(np.arange(3))
  scores = jax_scores(model, variables, {k: arrays[k] for k in model.image_keys}, captions)
  assert scores.shape == (2, 3) and np.isfinite(scores).all()


def test_benchmark_set_flag_reaches_the_family_options():
  from dsran_jax import benchmark  # pylint: disable=g-import-not-at-top
  args = benchmark.parse_args(["--model=bssan", "--set", "model.bssan.w2r=coupled", "--set",
                               "model.bssan.scan_unroll=32", "--set",
                               "model.bssan.txt_norm=false"])
  c = benchmark.make_config(args)
  assert (c.model.bssan.w2r, c.model.bssan.scan_unroll, c.model.bssan.txt_norm) == (
      "coupled", 32, False)
  for item, error in (("model.bssan.nope=1", ConfigError), ("model.bssan.w2r", ValueError),
                      ("model.bssan.txt_norm=maybe", ValueError)):
    with pytest.raises(error, match="--set"):
      benchmark.make_config(benchmark.parse_args(["--model=bssan", "--set", item]))

"""SCAN family: parity with the authors' code (kuanghuei/SCAN, run from tests/torchref/scan.py
in a torch-only process), masking, the cross-attention block, config and converter rules."""
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax import models
from dsran_jax.models.variables import init_variables
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.common import cross_attention as xa
from dsran_jax.models.scan import config as scan_config
from dsran_jax.models.scan import params as scan_params
from dsran_jax.convert import authors_vocab
from dsran_jax.convert.engine import ConversionError, load_checkpoint

TOL = 1e-4
VOCAB = 30
IMG_DIM = 12
LAMBDAS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}  # README (lambda_softmax, lambda_lse)


def _captions(rng, n, max_len, vocab=VOCAB):
  """Ids with varied lengths 2..max_len (the first caption uses the full width)."""
  lens = rng.integers(2, max_len + 1, n)
  lens[0] = max_len
  ids = np.zeros((n, max_len), np.int32)
  for j, length in enumerate(lens):
    ids[j, :length] = rng.integers(1, vocab, length)
  return ids, lens


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _opt(cross_attn, agg_func, bi_gru, **extra):
  lam, lse = LAMBDAS[cross_attn]
  return dict(embed_size=16, word_dim=8, img_dim=IMG_DIM, cross_attn=cross_attn,
              agg_func=agg_func, bi_gru=bi_gru, lambda_softmax=lam, lambda_lse=lse, **extra)


def _our_sims(variables, config, images, ids, lens):
  model = models.build_model(config.model, config.model.vocab_size)
  img = {"regions": images, "region_mask": np.ones(images.shape[:2], bool)}
  txt = {"input_ids": ids,
         "attention_mask": (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)}
  @jax.jit  # one compile: these tiny shapes are compile-bound
  def sims(v, img, txt):
    return model.apply(v, model.apply(v, img, method="encode_images"),
                       model.apply(v, txt, method="encode_texts"), method="score")

  return np.asarray(sims(variables, img, txt))


# ------------------------------------------------------------ parity with the authors


CASES = [(ca, agg, bi, {}) for ca in ("t2i", "i2t") for agg in ("Mean", "LogSumExp")
         for bi in (False, True)]
CASES += [("t2i", "Mean", True, dict(num_layers=2, precomp_enc_type="weight_norm")),
          ("i2t", "LogSumExp", False, dict(num_layers=2, no_imgnorm=True, no_txtnorm=True,
                                           raw_feature_norm="softmax"))]


@pytest.mark.parametrize("cross_attn,agg_func,bi_gru,extra", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'bigru' if c[2] else 'gru'}"
                              + ("-" + "-".join(c[3]) if c[3] else "") for c in CASES])
def test_authors_similarity_matrix(torch_ref, tmp_path, cross_attn, agg_func, bi_gru, extra):
  """Their checkpoint layout -> our converter -> our encoders + score equals their
  evalrank similarity matrix (their shard loops on 4 x 4 shards, the last ones partial)."""
  rng = np.random.default_rng(17)
  images = rng.standard_normal((6, 5, IMG_DIM)).astype(np.float32)
  ids, lens = _captions(rng, 9, 8)
  path = str(tmp_path / "model_best.pth.tar")
  torch_ref("scan.save_checkpoint", path=path, opt=_opt(cross_attn, agg_func, bi_gru, **extra),
            vocab_size=VOCAB, seed=3)
  want = torch_ref("scan.sims", path=path, images=images, captions=ids, lengths=lens,
                   shard_size=4)
  ckpt = load_checkpoint(path)  # numpy-only reader: no torch in this process
  assert scan_params.detect(ckpt)
  converted = scan_params.convert(ckpt, {"path": path}, config=get_base_config())
  variables, config = converted.variables, converted.config
  assert converted.vocab is None
  s = config.model.scan
  assert (s.cross_attn, s.agg_func, s.bi_gru) == (cross_attn, agg_func, bi_gru)
  for key, value in extra.items():
    assert s[key] == value, key
  got = _our_sims(variables, config, images, ids, lens)
  assert got.shape == want.shape == (6, 9)
  assert np.abs(want).max() > 1e-3  # non-degenerate scores
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_converted_workdir_matches_their_evaluation(torch_ref, tmp_path):
  """tools.convert_torch on their checkpoint and vocabulary JSON (ids in dict order, not
  sorted) -> inference.load -> encode_images / encode_texts(texts) / score equals their
  evalrank sims for the same captions, tokenised their way; the workdir says SCAN."""
  from dsran_jax import inference  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  words = [f"w{i}" for i in range(VOCAB - 4)]
  ids_of = dict(zip(["<pad>", "<start>", "<end>", "<unk>"], range(4)))
  ids_of.update(zip(words, 4 + rng.permutation(len(words))))
  ids_of = {w: int(i) for w, i in ids_of.items()}
  vocab_path = tmp_path / "f30k_precomp_vocab.json"
  vocab_path.write_text(json.dumps({"word2idx": ids_of, "idx": len(ids_of),
                                    "idx2word": {str(i): w for w, i in ids_of.items()}}))
  # 40 words: longer than data.max_len (32), and SCAN never cuts a caption.
  texts = [" ".join(rng.choice(words, n)) for n in (6, 1, 3, 40, 4, 2)]
  texts[2] += " zebra"  # an unknown word: <unk>
  rows = [[1] + [ids_of.get(w, 3) for w in t.split()] + [2] for t in texts]
  lens = np.array([len(r) for r in rows])
  their_ids = np.zeros((len(rows), lens.max()), np.int64)
  for j, row in enumerate(rows):
    their_ids[j, :len(row)] = row
  images = rng.standard_normal((4, 5, IMG_DIM)).astype(np.float32)
  path = str(tmp_path / "model_best.pth.tar")
  torch_ref("scan.save_checkpoint", path=path, vocab_size=VOCAB, seed=2,
            opt=dict(_opt("i2t", "LogSumExp", True), data_name="f30k_precomp"))
  want = torch_ref("scan.sims", path=path, images=images, captions=their_ids, lengths=lens,
                   shard_size=128)
  workdir = str(tmp_path / "workdir")
  summary = convert_torch.convert_checkpoint(path, workdir, vocab=str(vocab_path))
  assert summary["model"] == "scan" and summary["vocab_json"]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["name"] == "scan" and saved["model"]["scan"]["cross_attn"] == "i2t"
  assert set(saved["model"]["scan"]) == set(scan_config.defaults())
  matcher = inference.load(workdir)
  np.testing.assert_array_equal(matcher.tokenize(texts)[0][:, :lens.max()], their_ids)
  got = matcher.score(matcher.encode_images(regions=images), matcher.encode_texts(texts))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_authors_embeddings(torch_ref, tmp_path):
  """Region and word embeddings alone (BiGRU, two layers), zero past each length."""
  rng = np.random.default_rng(1)
  images = rng.standard_normal((4, 5, IMG_DIM)).astype(np.float32)
  ids, lens = _captions(rng, 5, 7)
  path = str(tmp_path / "m.pth.tar")
  torch_ref("scan.save_checkpoint", path=path, opt=_opt("t2i", "Mean", True, num_layers=2),
            vocab_size=VOCAB, seed=5)
  want = torch_ref("scan.embeddings", path=path, images=images, captions=ids, lengths=lens)
  converted = scan_params.convert(load_checkpoint(path), config=get_base_config())
  variables, config = converted.variables, converted.config
  model = models.build_model(config.model, config.model.vocab_size)
  img, txt = jax.jit(lambda v, a, b: (model.apply(v, a, method="encode_images"),
                                      model.apply(v, b, method="encode_texts")))(
      variables, {"regions": images}, {"input_ids": ids})
  np.testing.assert_allclose(img["regions"], want["images"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt["words"], want["captions"], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(txt["word_mask"].sum(1), lens)


# Every norm with LogSumExp (the aggregation most sensitive to per-word errors), and the
# default norm with every other aggregation: each option checked, few compiles.
NORM_CASES = tuple([(norm, "LogSumExp") for norm in scan_config.RAW_FEATURE_NORMS] + [
    ("clipped_l2norm", agg) for agg in xa.AGGS if agg != "LogSumExp"])


@functools.lru_cache(maxsize=None)
def _option_scores(cases, direction, lam, lse):
  """One jitted function giving {"norm/agg": (I, J) scores} for `cases` (one compile for
  all of them, cached across tests: compiles dominate these tiny shapes)."""

  @jax.jit
  def scores(regions, region_mask, words, word_mask):
    return {f"{norm}/{agg}": xa.xattn_scores(
        regions, region_mask, words, word_mask, direction=direction, lambda_softmax=lam,
        agg_func=agg, lambda_lse=lse, norm=norm) for norm, agg in cases}

  return scores


@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_every_raw_feature_norm_and_aggregation(torch_ref, direction):
  """The block against their xattn_score_t2i / _i2t on given embeddings, for every
  --raw_feature_norm their code runs and every --agg_func."""
  rng = np.random.default_rng(2)
  regions = _unit(rng.standard_normal((6, 5, 16)))
  ids, lens = _captions(rng, 7, 9)
  words = _unit(rng.standard_normal((7, 9, 16))) * (ids != 0)[..., None]
  lam, lse = LAMBDAS[direction]
  got = _option_scores(NORM_CASES, direction, lam, lse)(regions, np.ones((6, 5), bool),
                                                        words, ids != 0)
  for norm, agg in NORM_CASES:
    want = torch_ref("scan.xattn_scores", images=regions, captions=words, lengths=lens,
                     opt=dict(cross_attn=direction, raw_feature_norm=norm, agg_func=agg,
                              lambda_softmax=lam, lambda_lse=lse), shard_size=4)
    err = float(np.abs(np.asarray(got[f"{norm}/{agg}"]) - want).max())
    assert err < TOL, (norm, agg, err)


def test_unsupported_norms_match_their_failures(torch_ref):
  """Their func_attention raises for l1norm (undefined l1norm_d) and for names it does
  not know; our config refuses both, naming the key."""
  rng = np.random.default_rng(0)
  regions = _unit(rng.standard_normal((2, 3, 4)))
  words = _unit(rng.standard_normal((2, 3, 4)))
  for norm, error in (("l1norm", NameError), ("clipped_leaky_l2norm", ValueError)):
    with pytest.raises(error):
      torch_ref("scan.xattn_scores", images=regions, captions=words, lengths=[3, 3],
                opt=dict(raw_feature_norm=norm))
    c = get_base_config()
    c.model.name = "scan"
    c.model.scan.raw_feature_norm = norm
    with pytest.raises(ValueError, match="config.model.scan.raw_feature_norm"):
      scan_config.validate(c)


def test_clipped_leaky_l2norm_alias():
  """The block's clipped_leaky_l2norm (the name SCAN-derived codes use) is SCAN's
  clipped_l2norm (LeakyReLU(0.1), not ReLU: a negative dot product keeps 0.1 of itself)."""
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  mask = jnp.ones((1, 1, 5), bool)
  a = xa.normalize_over_queries(s, mask, "clipped_l2norm")
  b = xa.normalize_over_queries(s, mask, "clipped_leaky_l2norm")
  np.testing.assert_array_equal(a, b)
  leaky = np.where(s > 0, s, 0.1 * s)
  np.testing.assert_allclose(a, leaky / (np.sqrt((leaky ** 2).sum(-1, keepdims=True)) + 1e-8),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="raw_feature_norm"):
    xa.normalize_over_queries(s, mask, "relu_l2norm")


# ------------------------------------------------------------------ masking and tiling


def _tile(rng, n_img=4, k=5, n_cap=5, length=6, d=16):
  regions = _unit(rng.standard_normal((n_img, k, d)))
  words = _unit(rng.standard_normal((n_cap, length, d)))
  region_mask = np.ones((n_img, k), bool)
  region_mask[1, 3:] = False
  region_mask[2, 0] = False
  lens = np.array([length, 2, 4, 3, 5][:n_cap])
  word_mask = np.arange(length)[None] < lens[:, None]
  return regions, region_mask, words * word_mask[..., None], word_mask


def _insert_padding(rng, x, mask, extra):
  """Adds `extra` masked positions holding random garbage at random places."""
  n, length = mask.shape
  out_x = np.zeros((n, length + extra, x.shape[-1]), np.float32)
  out_m = np.zeros((n, length + extra), bool)
  for i in range(n):
    slots = np.sort(rng.choice(length + extra, length, replace=False))
    out_x[i] = rng.standard_normal(out_x[i].shape)  # garbage everywhere, masked below
    out_x[i, slots] = x[i]
    out_m[i, slots] = mask[i]
  return out_x, out_m


# Each of our norms paired with an aggregation, every aggregation used at least once.
COVER = tuple((norm, xa.AGGS[i % len(xa.AGGS)]) for i, norm in enumerate(xa.NORMS))


@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_padding_never_changes_scores(direction):
  """Extra masked regions / words, holding random non-zero vectors at random positions,
  leave every score unchanged, for every norm and aggregation."""
  rng = np.random.default_rng(4)
  regions, region_mask, words, word_mask = _tile(rng)
  regions_p, region_mask_p = _insert_padding(rng, regions, region_mask, 3)
  words_p, word_mask_p = _insert_padding(rng, words, word_mask, 4)
  scores = _option_scores(COVER, direction, *LAMBDAS[direction])
  base = scores(regions, region_mask, words, word_mask)
  padded = scores(regions_p, region_mask_p, words_p, word_mask_p)
  assert len(base) == len(xa.NORMS)
  for key in base:
    np.testing.assert_allclose(padded[key], base[key], atol=1e-5, rtol=0, err_msg=key)


def test_padding_matches_sliced_reference(torch_ref):
  """A region mask with holes scores like their code on the image cut to its real regions."""
  rng = np.random.default_rng(5)
  regions, region_mask, words, word_mask = _tile(rng)
  lens = word_mask.sum(1)
  for direction in xa.DIRECTIONS:
    lam, lse = LAMBDAS[direction]
    got = np.asarray(_option_scores((("clipped_l2norm", "LogSumExp"),), direction, lam, lse)(
        regions, region_mask, words, word_mask)["clipped_l2norm/LogSumExp"])
    for i in range(regions.shape[0]):
      real = regions[i][region_mask[i]][None]
      # Their shard needs 2+ images (a 1-image shard hits their .squeeze() quirk).
      want = torch_ref("scan.xattn_scores", images=np.concatenate([real, real]),
                       captions=words, lengths=lens,
                       opt=dict(cross_attn=direction, agg_func="LogSumExp",
                                lambda_softmax=lam, lambda_lse=lse))[0]
      np.testing.assert_allclose(got[i], want, atol=TOL, rtol=0, err_msg=f"{direction} {i}")


@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_fully_padded_rows_are_finite(direction):
  """Padded tile rows (zero reps, masks all False) score 0 with finite gradients, for every
  norm and aggregation."""
  rng = np.random.default_rng(6)
  regions, region_mask, words, word_mask = _tile(rng)
  regions[3], region_mask[3] = 0.0, False
  words[4], word_mask[4] = 0.0, False
  out = _option_scores(COVER, direction, *LAMBDAS[direction])(regions, region_mask, words,
                                                             word_mask)
  for key, s in out.items():
    s = np.asarray(s)
    assert np.isfinite(s).all(), key
    assert (s[3] == 0).all() and (s[:, 4] == 0).all(), key
    assert np.abs(s[:3, :4]).min() > 0, key  # real pairs are not zeroed
  # Gradients through the masked softmaxes, the l2 normaliser and the LogSumExp / Max.
  grad_cases = (("clipped_l2norm", "LogSumExp"), ("softmax", "Max"))
  scores = _option_scores(grad_cases, direction, *LAMBDAS[direction])
  total = lambda r, w: sum(jnp.sum(v) for v in scores(r, region_mask, w, word_mask).values())
  grads = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(regions), jnp.asarray(words))
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_fused_equals_explicit_contexts(direction):
  """The Gram-matrix form, in one block and in blocks of context items, equals attend ->
  attended_context -> cosine -> aggregate on materialised (I, J, n_q, d) contexts,
  values and gradients."""
  rng = np.random.default_rng(7)
  regions, region_mask, words, word_mask = _tile(rng)
  lam, lse = LAMBDAS[direction]

  def explicit(r, w):
    n_img, n_cap = r.shape[0], w.shape[0]
    wide = lambda x, axis: jnp.broadcast_to(jnp.expand_dims(x, axis),
                                            (n_img, n_cap) + x.shape[1:])
    r4, w4 = wide(r, 1), wide(w, 0)                      # (I, J, k, d), (I, J, L, d)
    rm, wm = wide(region_mask, 1), wide(word_mask, 0)
    q, c, qm, cm = (w4, r4, wm, rm) if direction == "t2i" else (r4, w4, rm, wm)
    a = xa.attend(q, c, qm, cm, lam=lam, norm="clipped_l2norm")
    ctx = xa.attended_context(a, c)                      # (I, J, n_q, d)
    return xa.aggregate(xa.cosine(q, ctx), qm, "LogSumExp", lse)

  # Context items (images for t2i, captions for i2t) in blocks of 2: several blocks
  # through lax.map, and for i2t's 5 captions a last block padded with a masked one.
  n_pos, m_pos = (regions.shape[1], words.shape[1])[::1 if direction == "t2i" else -1]
  n_query = (words if direction == "t2i" else regions).shape[0]
  assert xa.context_block(n_pos, m_pos, n_query, 2 * n_pos * m_pos * n_query) == 2

  def fused(r, w, block_elements=xa.BLOCK_ELEMENTS):
    return xa.xattn_scores(r, region_mask, w, word_mask, direction=direction,
                           lambda_softmax=lam, agg_func="LogSumExp", lambda_lse=lse,
                           block_elements=block_elements)

  blocked = functools.partial(fused, block_elements=2 * n_pos * m_pos * n_query)

  @jax.jit
  def run(r, w):  # one compile for all forms, values and gradients
    loss = lambda f: lambda r, w: jnp.sum(f(r, w) ** 2)
    grads = lambda f: jax.grad(loss(f), argnums=(0, 1))(r, w)
    return ([f(r, w) for f in (fused, blocked, explicit)],
            [grads(f) for f in (fused, blocked, explicit)])

  (s_f, s_b, s_e), (g_f, g_b, g_e) = run(jnp.asarray(regions), jnp.asarray(words))
  np.testing.assert_allclose(s_f, s_e, atol=1e-5, rtol=0)
  np.testing.assert_allclose(s_b, s_e, atol=1e-5, rtol=0)
  assert np.ptp(np.asarray(s_f)) > 1e-3
  for a, b, c in zip(g_f, g_b, g_e):
    assert np.abs(np.asarray(c)).max() > 1e-4
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b, c, atol=1e-5, rtol=0)


def test_blocked_scoring_equals_one_block():
  """pairwise_xattn_scores cuts captions into blocks (last one padded) with no change."""
  rng = np.random.default_rng(8)
  regions, region_mask, words, word_mask = _tile(rng, n_cap=5)
  per = regions.shape[0] * regions.shape[1] * words.shape[1]
  assert xa.caption_chunk(regions.shape[0], regions.shape[1], words.shape[1], 2 * per) == 2

  @jax.jit
  def both(regions, region_mask, words, word_mask):
    kw = dict(direction="t2i", lambda_softmax=9.0, agg_func="Mean")
    return (xa.pairwise_xattn_scores(regions, region_mask, words, word_mask,
                                     max_elements=None, **kw),
            xa.pairwise_xattn_scores(regions, region_mask, words, word_mask,
                                     max_elements=2 * per, **kw))

  one, blocked = (np.asarray(x) for x in both(regions, region_mask, words, word_mask))
  np.testing.assert_allclose(blocked, one, atol=1e-6, rtol=0)
  assert blocked.shape == (4, 5)


def _tiny_model(**scan):
  c = get_base_config()
  c.model.name = "scan"
  c.model.embed_size, c.model.word_dim, c.model.img_dim = 16, 8, IMG_DIM
  for key, value in scan.items():
    c.model.scan[key] = value
  scan_config.validate(c)
  model = models.build_model(c.model, VOCAB)
  return model, init_variables(model, jax.random.PRNGKey(0))


def _batch(rng, b=4, r=5, length=7):
  ids, lens = _captions(rng, b, length)
  mask = np.ones((b, r), bool)
  mask[1, 3:] = False
  return {"regions": rng.standard_normal((b, r, IMG_DIM)).astype(np.float32),
          "region_mask": mask, "input_ids": ids,
          "attention_mask": (ids != 0).astype(np.int32)}


def test_score_of_reps_equals_training_matrix():
  """`score(encode_images, encode_texts)` is the (B, B) matrix of the training call, and
  garbage in the masked regions / words of the batch does not change it."""
  rng = np.random.default_rng(9)
  model, variables = _tiny_model(cross_attn="i2t", agg_func="LogSumExp", bi_gru=True,
                                 max_block_elements=5 * 7)
  assert model.config.max_block_elements == 35  # scoring runs in 1-caption blocks
  batch = _batch(rng)
  noisy = dict(batch)
  noisy["regions"] = np.where(batch["region_mask"][..., None], batch["regions"],
                              rng.standard_normal(batch["regions"].shape)).astype(np.float32)
  noisy["input_ids"] = np.where(batch["attention_mask"] == 1, batch["input_ids"],
                                rng.integers(1, VOCAB, batch["input_ids"].shape)).astype(np.int32)

  @jax.jit
  def run(v, batch, noisy):
    reps_i = model.apply(v, batch, method="encode_images")
    reps_t = model.apply(v, batch, method="encode_texts")
    return model.apply(v, reps_i, reps_t, method="score"), model.apply(v, noisy, train=True)

  score, train = (np.asarray(x) for x in run(variables, batch, noisy))
  reps = jax.eval_shape(lambda v: (model.apply(v, batch, method="encode_images"),
                                   model.apply(v, batch, method="encode_texts")), variables)
  assert set(reps[0]) == {"regions", "region_mask"} and set(reps[1]) == {"words", "word_mask"}
  assert reps[0]["regions"].shape == (4, 5, 16) and reps[1]["words"].shape == (4, 7, 16)
  assert train.shape == (4, 4) and np.isfinite(train).all() and np.ptp(train) > 1e-3
  np.testing.assert_allclose(score, train, atol=1e-6, rtol=0)


def test_training_gradients_reach_every_parameter():
  """The hinge on SCAN's (B, B) scores trains both encoders (every leaf gets a gradient)."""
  rng = np.random.default_rng(10)
  model, variables = _tiny_model(cross_attn="t2i", agg_func="Mean")
  batch = _batch(rng)

  def loss(params):
    s = model.apply({"params": params}, batch, train=True)
    d = jnp.diag(s)
    cost = jnp.maximum(0.2 + s - d[:, None], 0) + jnp.maximum(0.2 + s - d[None], 0)
    return jnp.sum(cost * (1 - jnp.eye(4)))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, path


# --------------------------------------------------------------------- config + params


def test_recipes_follow_the_readme():
  f30k = recipe_config("f30k", "scan", cross_attn="i2t", agg_func="LogSumExp")
  coco = recipe_config("coco", "scan", cross_attn="i2t", agg_func="LogSumExp")
  assert (f30k.model.scan.lambda_lse, coco.model.scan.lambda_lse) == (5.0, 20.0)
  assert f30k.model.scan.lambda_softmax == coco.model.scan.lambda_softmax == 4.0
  t2i = recipe_config("f30k", "scan")
  assert (t2i.model.scan.cross_attn, t2i.model.scan.agg_func) == ("t2i", "Mean")
  assert t2i.model.scan.lambda_softmax == 9.0 and t2i.model.scan.bi_gru
  assert (t2i.data.format, t2i.data.num_regions, t2i.train.batch_size) == ("precomp", 36, 128)
  assert (t2i.train.learning_rate, t2i.train.num_epochs, t2i.train.lr_update) == (2e-4, 30, 15)
  assert (coco.train.learning_rate, coco.train.num_epochs, coco.train.lr_update) == (5e-4, 20, 10)
  assert t2i.train.grad_clip == 2.0 and t2i.train.max_violation and t2i.train.margin == 0.2
  assert (t2i.model.embed_size, t2i.model.word_dim) == (1024, 300)
  for c in (f30k, coco, t2i):
    scan_config.validate(c)
  with pytest.raises(ValueError, match="README"):
    recipe_config("f30k", "scan", cross_attn="i2t", agg_func="Max")


@pytest.mark.parametrize("key,value", [("cross_attn", "both"), ("agg_func", "mean"),
                                       ("lambda_softmax", 0.0), ("num_layers", 0),
                                       ("precomp_enc_type", "bn")])
def test_validate_names_the_key(key, value):
  c = get_base_config()
  c.model.name = "scan"
  c.model.scan[key] = value
  with pytest.raises(ValueError, match=f"config.model.scan.{key}"):
    scan_config.validate(c)


def test_family_hooks():
  m = get_base_config().model
  assert scan_config.image_keys(m) == ("regions", "region_mask")
  assert scan_config.text_keys(m) == ("input_ids", "attention_mask")
  assert scan_config.tokenizer(m) == "vocab" and scan_config.frozen_paths(m) == ()
  images, captions = scan_config.eval_tile(m)
  assert images > 0 and captions > 0
  spec = importlib.util.spec_from_file_location(
      "demo_config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                  "demo.py"))
  demo_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo_module)
  demo = demo_module.get_config("scan")
  assert demo.model.name == "scan" and demo.data.format == "synthetic"
  scan_config.validate(demo)


def test_vocab_json_keeps_their_ids(tmp_path):
  words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "a", "runs"]
  order = [0, 1, 2, 3, 6, 4, 5]  # their ids follow dict order, not frequency
  word2idx = {w: i for w, i in zip(words, order)}
  path = tmp_path / "f30k_precomp_vocab.json"
  path.write_text(json.dumps({"word2idx": word2idx,
                              "idx2word": {str(i): w for w, i in word2idx.items()},
                              "idx": len(words)}))
  vocab = authors_vocab.load_vocab(str(path))
  assert len(vocab) == 7
  for w, i in word2idx.items():
    assert vocab(w) == i
  assert vocab("zebra") == 3
  vocab.save(str(tmp_path / "vocab.json"))  # ours, read by the same reader
  again = authors_vocab.load_vocab(str(tmp_path / "vocab.json"))
  assert again.idx2word == vocab.idx2word
  bad = dict(word2idx, runs=4)
  path.write_text(json.dumps({"word2idx": bad, "idx2word": {}, "idx": 7}))
  with pytest.raises(ValueError, match="each once"):
    authors_vocab.load_vocab(str(path))


def test_converter_names_bad_keys_and_shapes(torch_ref, tmp_path):
  """Unexpected keys, shape mismatches, missing keys and an opt that disagrees with the
  weights are errors naming the checkpoint key; a good one gives SCAN's precomp config."""
  path = str(tmp_path / "m.pth.tar")
  torch_ref("scan.save_checkpoint", path=path, opt=_opt("t2i", "Mean", True),
            vocab_size=VOCAB, seed=0)
  ckpt = load_checkpoint(path)
  assert not scan_params.detect({"model": {"img_enc.fc.weight": 0}, "opt": {"K": 2}})
  extra = {**ckpt, "model": [dict(ckpt["model"][0], **{"fc.extra": np.zeros(2)}),
                             ckpt["model"][1]]}
  with pytest.raises(ConversionError, match=r"img_enc\.fc\.extra"):
    scan_params.convert(extra, config=get_base_config())
  txt = dict(ckpt["model"][1])
  txt["rnn.weight_hh_l0_reverse"] = txt["rnn.weight_hh_l0_reverse"][:, :-1]
  with pytest.raises(ConversionError, match=r"txt_enc\.rnn\.weight_hh_l0_reverse.*expects"):
    scan_params.convert({**ckpt, "model": [ckpt["model"][0], txt]}, config=get_base_config())
  with pytest.raises(ConversionError, match="opt.embed_size"):
    scan_params.convert({**ckpt, "opt": dict(ckpt["opt"], embed_size=32)}, config=get_base_config())
  txt = {k: v for k, v in ckpt["model"][1].items() if k != "rnn.bias_ih_l0"}
  missing = r"txt_enc/gru/b_ih \(checkpoint key txt_enc\.rnn\.bias_ih_l0\)"
  with pytest.raises(ConversionError, match=missing):
    scan_params.convert({**ckpt, "model": [ckpt["model"][0], txt]}, config=get_base_config())
  converted = scan_params.convert(ckpt, config=get_base_config())
  config = converted.config
  assert config.train.grad_clip == 2.0 and config.model.vocab_size == VOCAB
  assert config.data.format == "precomp" and config.model.name == "scan"
  assert set(converted.variables["params"]["txt_enc"]) == {"embed", "gru", "gru_reverse"}

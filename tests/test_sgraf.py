"""SGRAF family: parity with the authors' code (Paranioar/SGRAF, run from
tests/torchref/sgraf.py in a torch-only process) through their checkpoint layout and our
converter, train-mode BatchNorm semantics, exact masking, the fused head's algebra, the
converter's errors, the recipes and the SGRAF* ensemble through tools.rank."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jitted_matching
from dsran_jax import models, ranking
from dsran_jax.models.variables import init_variables
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.sgraf import similarity as sim
from dsran_jax.models.sgraf import config as sgraf_config
from dsran_jax.models.sgraf import params as sgraf_params
from dsran_jax.convert.engine import ConversionError, load_checkpoint

TOL = 1e-4
VOCAB = 30
IMG_DIM = 12
REGIONS = 36  # their EncoderSimilarity hard-codes VisualSA(..., 36)


def _captions(rng, n, max_len, vocab=VOCAB, sort=False):
  """Ids with varied lengths 2..max_len (the first caption uses the full width)."""
  lens = rng.integers(2, max_len + 1, n)
  lens[0] = max_len
  if sort:
    lens = np.sort(lens)[::-1].copy()
  ids = np.zeros((n, max_len), np.int32)
  for j, length in enumerate(lens):
    ids[j, :length] = rng.integers(1, vocab, length)
  return ids, lens


def _opt(module, **extra):
  return dict(embed_size=16, word_dim=8, img_dim=IMG_DIM, sim_dim=8, module_name=module,
              **extra)


def _mask(ids, lens):
  return (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)


def _our_sims(variables, model, images, ids, lens, region_mask=None):
  enc_i, enc_t, score = jitted_matching(model)
  if region_mask is None:
    region_mask = np.ones(images.shape[:2], bool)
  img = enc_i(variables, {"regions": images, "region_mask": region_mask})
  txt = enc_t(variables, {"input_ids": ids, "attention_mask": _mask(ids, lens)})
  return np.asarray(score(variables, img, txt))


@pytest.fixture(scope="module")
def checkpoints(torch_ref, tmp_path_factory):
  """Their checkpoints with random weights (BatchNorm stats included): SGR (BiGRU),
  SAF (BiGRU) and SGR with a forward GRU, 2 steps and no text l2norm."""
  root = tmp_path_factory.mktemp("sgraf_ckpt")
  cases = {"SGR": _opt("SGR"), "SAF": _opt("SAF"),
           "SGR-gru": _opt("SGR", bi_gru=False, sgr_step=2, no_txtnorm=True)}
  out = {}
  for i, (name, opt) in enumerate(cases.items()):
    path = str(root / f"{name}.pth.tar")
    torch_ref("sgraf.save_checkpoint", path=path, opt=opt, vocab_size=VOCAB, seed=11 + i)
    out[name] = (path, opt)
  return out


# ------------------------------------------------------------ parity with the authors


@pytest.mark.parametrize("name", ["SGR", "SAF", "SGR-gru"])
def test_authors_similarity_matrix(torch_ref, checkpoints, name):
  """Their checkpoint -> our converter -> our encoders + tiled score equals their
  evalrank matrix (encode_data + shard_attn_scores with 4 x 4 shards)."""
  path, opt = checkpoints[name]
  rng = np.random.default_rng(7)
  images = rng.standard_normal((7, REGIONS, IMG_DIM)).astype(np.float32)
  ids, lens = _captions(rng, 11, 9)
  want = torch_ref("sgraf.sims", path=path, images=images, captions=ids, lengths=lens,
                   shard_size=4)
  ckpt = load_checkpoint(path)
  assert sgraf_params.detect(ckpt)
  converted = sgraf_params.convert(ckpt, {"path": path}, config=get_base_config())
  config = converted.config
  s = config.model.sgraf
  assert (s.module, s.sim_dim, s.bi_gru, s.no_txtnorm) == (
      opt["module_name"], 8, opt.get("bi_gru", True), opt.get("no_txtnorm", False))
  assert s.sgr_step == opt.get("sgr_step", 3) and s.num_regions == REGIONS
  # Chunks of 3 captions and buckets of 8 tokens: the tile crosses both boundaries.
  config.model.sgraf.max_block_elements = 7 * 9 * 16 * 3
  model = models.build_model(config.model, config.model.vocab_size)
  got = _our_sims(converted.variables, model, images, ids, lens)
  assert got.shape == want.shape == (7, 11)
  assert want.std() > 2e-3  # scores that differ between pairs
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_authors_embeddings_and_globals(torch_ref, checkpoints):
  """Encoders and the VisualSA / TextSA globals alone, eval mode."""
  path, _ = checkpoints["SAF"]
  rng = np.random.default_rng(3)
  images = rng.standard_normal((4, REGIONS, IMG_DIM)).astype(np.float32)
  ids, lens = _captions(rng, 5, 7)
  want = torch_ref("sgraf.embeddings", path=path, images=images, captions=ids, lengths=lens)
  converted = sgraf_params.convert(load_checkpoint(path), config=get_base_config())
  model = models.build_model(converted.config.model, VOCAB)
  enc_i, enc_t, _ = jitted_matching(model)
  img = enc_i(converted.variables, {"regions": images})
  txt = enc_t(converted.variables, {"input_ids": ids, "attention_mask": _mask(ids, lens)})
  np.testing.assert_allclose(img["regions"], want["images"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt["words"][:, :want["captions"].shape[1]], want["captions"],
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(img["global"], want["image_global"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt["global"], want["caption_global"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["SGR", "SAF"])
def test_train_mode_matches_authors(torch_ref, checkpoints, name):
  """One train-mode forward (dropout 0): the (B, B) scores and every BatchNorm's running
  stats after it: VisualSA's per-slot BatchNorm1d(36) and BatchNorm1d(d) over the batch,
  and (SAF) the BatchNorm1d(1) their per-caption loop calls once per caption."""
  path, _ = checkpoints[name]
  rng = np.random.default_rng(5)
  images = rng.standard_normal((6, REGIONS, IMG_DIM)).astype(np.float32)
  ids, lens = _captions(rng, 6, 8, sort=True)
  want = torch_ref("sgraf.train_forward", path=path, images=images, captions=ids,
                   lengths=lens)
  converted = sgraf_params.convert(load_checkpoint(path), config=get_base_config())
  config = converted.config
  config.model.sgraf.embed_dropout = config.model.sgraf.sa_dropout = 0.0
  model = models.build_model(config.model, VOCAB)
  batch = {"regions": images, "region_mask": np.ones(images.shape[:2], bool),
           "input_ids": ids, "attention_mask": _mask(ids, lens)}
  scores, updates = jax.jit(lambda v, b: model.apply(
      v, b, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]))(
          converted.variables, batch)
  np.testing.assert_allclose(scores, want["scores"], atol=TOL, rtol=0)
  stats = updates["batch_stats"]["sim_enc"]
  paths = {"sim_enc.v_global_w.embedding_local.1": stats["v_global_w"]["local_bn"],
           "sim_enc.v_global_w.embedding_global.1": stats["v_global_w"]["global_bn"]}
  if name == "SAF":
    paths["sim_enc.SAF_module.bn"] = stats["SAF_module"]["bn"]
  assert len(want["stats"]) == 2 * len(paths)
  for key, value in want["stats"].items():
    module, leaf = key.rsplit(".", 1)
    ours = paths[module]["mean" if leaf == "running_mean" else "var"]
    before = converted.variables["batch_stats"]
    assert np.abs(value - _get(before, module, leaf)).max() > 1e-4  # the stats moved
    np.testing.assert_allclose(ours, value, atol=1e-5, rtol=0, err_msg=key)


def _get(batch_stats, module, leaf):
  names = {"sim_enc.v_global_w.embedding_local.1": ("v_global_w", "local_bn"),
           "sim_enc.v_global_w.embedding_global.1": ("v_global_w", "global_bn"),
           "sim_enc.SAF_module.bn": ("SAF_module", "bn")}
  a, b = names[module]
  return np.asarray(batch_stats["sim_enc"][a][b]["mean" if leaf == "running_mean" else "var"])


def test_convert_cli_workdir_vocab_and_matcher(torch_ref, checkpoints, tmp_path):
  """`tools.convert_torch` recognises the family, writes config + checkpoint + their
  vocabulary, and `inference.load` scores like their code."""
  from dsran_jax import inference  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  path, _ = checkpoints["SGR"]
  words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
  vocab = tmp_path / "f30k_precomp_vocab.json"
  vocab.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                               "idx2word": {str(i): w for i, w in enumerate(words)},
                               "idx": VOCAB}))
  workdir = str(tmp_path / "wd")
  summary = convert_torch.convert_checkpoint(path, workdir, vocab=str(vocab))
  assert summary["model"] == "sgraf" and summary["vocab_json"] and summary["step"] == 890
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["sgraf"]["module"] == "SGR" and saved["data"]["format"] == "precomp"
  rng = np.random.default_rng(9)
  images = rng.standard_normal((3, REGIONS, IMG_DIM)).astype(np.float32)
  texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10"]
  matcher = inference.load(workdir)
  ids, mask = matcher.tokenize(texts)
  got = matcher.score(matcher.encode_images(regions=images), matcher.encode_texts(texts))
  lens = mask.sum(1)
  want = torch_ref("sgraf.sims", path=path, images=images, captions=ids, lengths=lens)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# ------------------------------------------------------------------ masking, tiling


def _random_model(module="SGR", **sgraf):
  c = get_base_config()
  c.model.name = "sgraf"
  c.model.vocab_size = VOCAB
  c.model.embed_size, c.model.word_dim, c.model.img_dim = 16, 8, IMG_DIM
  c.model.sgraf.sim_dim, c.model.sgraf.num_regions, c.model.sgraf.module = 8, 6, module
  for key, value in sgraf.items():
    c.model.sgraf[key] = value
  model = models.build_model(c.model)
  return c, model, init_variables(model, jax.random.key(1))


@pytest.mark.parametrize("module", ["SGR", pytest.param("SAF", marks=pytest.mark.slow)])
def test_padding_and_tiling_do_not_change_scores(module):
  """Padded words (extra columns), padded region slots (any feature values), the chunk
  size, the length buckets and the caption order leave every real pair's score as it is."""
  _, model, v = _random_model(module)
  rng = np.random.default_rng(2)
  images = rng.standard_normal((5, 6, IMG_DIM)).astype(np.float32)
  rmask = np.ones((5, 6), bool)
  rmask[1, 4:] = rmask[3, 2:] = False
  ids, lens = _captions(rng, 9, 10)
  base = _our_sims(v, model, images, ids, lens, rmask)
  noisy = images.copy()
  noisy[~rmask] = 1e3 * rng.standard_normal((int((~rmask).sum()), IMG_DIM))
  np.testing.assert_allclose(_our_sims(v, model, noisy, ids, lens, rmask), base, atol=1e-6)
  wide = np.pad(ids, ((0, 0), (0, 13)))
  np.testing.assert_allclose(_our_sims(v, model, images, wide, lens, rmask), base, atol=1e-6)
  perm = rng.permutation(9)
  np.testing.assert_allclose(_our_sims(v, model, images, ids[perm], lens[perm], rmask),
                             base[:, perm], atol=1e-6)
  for opts in (dict(max_block_elements=0, length_bucket=0),
               dict(max_block_elements=1, length_bucket=3)):
    _, other, _ = _random_model(module, **opts)
    np.testing.assert_allclose(_our_sims(v, other, images, ids, lens, rmask), base,
                               atol=1e-6, err_msg=str(opts))
  # Fewer regions than the slot BatchNorm's 6: padded with masked slots.
  np.testing.assert_allclose(_our_sims(v, model, images[3:4, :2], ids, lens),
                             base[3:4], atol=1e-6)
  with pytest.raises(ValueError, match="num_regions=6"):
    _our_sims(v, model, np.zeros((1, 7, IMG_DIM), np.float32), ids, lens)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_fused_graph_step_equals_their_formula():
  """The fused step (N [M | W_r], node 0 alone on the last step) equals their
  GraphReasoning on each pair's real nodes (numpy, float64)."""
  rng = np.random.default_rng(4)
  s, n = 8, 6
  lin = lambda: {"kernel": rng.standard_normal((s, s)).astype(np.float32) * 0.5,
                 "bias": rng.standard_normal(s).astype(np.float32) * 0.5}
  steps = [{"q": lin(), "k": lin(), "r": lin()} for _ in range(3)]
  nodes = rng.standard_normal((3, 2, n, s)).astype(np.float32)
  real = np.array([6, 3])  # nodes per caption (pair axis 1)
  mask = np.arange(n)[None, None] < real[None, :, None]
  got = np.asarray(sim.graph_reasoning(jnp.asarray(nodes), jnp.asarray(mask), steps,
                                       sim.Extensions(), node0_only=True))[:, :, 0]
  for i in range(3):
    for j in range(2):
      x = nodes[i, j, :real[j]].astype(np.float64)
      for st in steps:
        q = x @ st["q"]["kernel"] + st["q"]["bias"]
        k = x @ st["k"]["kernel"] + st["k"]["bias"]
        x = np.maximum((_np_softmax(q @ k.T) @ x) @ st["r"]["kernel"] + st["r"]["bias"], 0)
      np.testing.assert_allclose(got[i, j], x[0], atol=1e-5, rtol=1e-5)


def test_bf16_head_stays_close_to_fp32():
  """model.dtype=bfloat16 runs the head's projections in bf16 (fp32 sums): scores
  within 1e-2 of fp32 and ranking nearly unchanged."""
  c, model, v = _random_model("SGR")
  c.model.dtype = "bfloat16"
  low = models.build_model(c.model)
  rng = np.random.default_rng(6)
  images = rng.standard_normal((6, 6, IMG_DIM)).astype(np.float32)
  ids, lens = _captions(rng, 12, 8)
  full = _our_sims(v, model, images, ids, lens)
  half = _our_sims(v, low, images, ids, lens)
  assert np.abs(half - full).max() < 1e-2
  assert np.abs(half - full).max() > 0  # bf16 did run


# ----------------------------------------------------------------- converter errors


def test_converter_names_bad_keys_and_shapes(torch_ref, checkpoints):
  path, _ = checkpoints["SGR"]
  ckpt = load_checkpoint(path)
  sim_sd = dict(ckpt["model"][2])
  sim_sd["sim_tranloc_w.weight"] = sim_sd["sim_tranloc_w.weight"][:, :-1]
  sim_sd["SGR_module.0.extra.weight"] = np.zeros((2, 2), np.float32)
  bad = {**ckpt, "model": [ckpt["model"][0], ckpt["model"][1], sim_sd]}
  with pytest.raises(ConversionError) as e:
    sgraf_params.convert(bad, config=get_base_config())
  assert "sim_enc.sim_tranloc_w.weight -> params/sim_enc/sim_tranloc_w/kernel" in str(e.value)
  assert "sim_enc.SGR_module.0.extra.weight" in str(e.value)
  missing = dict(ckpt["model"][2])
  del missing["v_global_w.embedding_local.1.running_var"]
  with pytest.raises(ConversionError, match="sim_enc.v_global_w.embedding_local.1.running_var"):
    sgraf_params.convert({**ckpt, "model": [ckpt["model"][0], ckpt["model"][1], missing]},
                         config=get_base_config())
  with pytest.raises(ConversionError, match="opt.sim_dim=9"):
    sgraf_params.convert({**ckpt, "opt": {**ckpt["opt"], "sim_dim": 9}}, config=get_base_config())
  assert not sgraf_params.detect({"model": ckpt["model"][:2], "opt": ckpt["opt"]})
  from dsran_jax.tools.convert_torch import detect_family  # pylint: disable=g-import-not-at-top
  assert detect_family(ckpt, path) == "sgraf"


# ------------------------------------------------------------ recipes and ensemble


def test_recipes_and_validation():
  c = recipe_config("f30k", "sgraf")
  assert (c.model.sgraf.module, c.train.num_epochs, c.train.lr_update) == ("SGR", 40, 30)
  assert (c.train.learning_rate, c.train.batch_size, c.train.grad_clip) == (2e-4, 128, 2.0)
  assert c.train.max_violation and c.train.margin == 0.2 and c.data.num_regions == 36
  c = recipe_config("f30k", "sgraf", module="SAF")
  assert (c.model.sgraf.module, c.train.num_epochs, c.train.lr_update) == ("SAF", 30, 20)
  c = recipe_config("coco", "sgraf")
  assert (c.train.num_epochs, c.train.lr_update, c.data.test_split) == (20, 10, "testall")
  sgraf_config.validate(c)
  c.model.sgraf.module = "AVE"
  with pytest.raises(ValueError, match="config.model.sgraf.module='AVE'"):
    sgraf_config.validate(c)
  c = recipe_config("f30k", "sgraf")
  c.data.num_regions = 50
  with pytest.raises(ValueError, match="config.data.num_regions=50"):
    sgraf_config.validate(c)


def test_sgraf_star_is_the_summed_sims_through_tools_rank(tmp_path):
  """SGRAF* = SGR sims + SAF sims: `tools.rank` with two --sims files ranks their sum."""
  from dsran_jax.tools import rank  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  n = 20
  truth = np.kron(np.eye(n), np.ones((1, 5)))
  sgr = (truth * 0.3 + rng.random((n, 5 * n))).astype(np.float32)
  saf = (truth * 0.3 + rng.random((n, 5 * n))).astype(np.float32)
  paths = []
  for name, a in (("sgr", sgr), ("saf", saf)):
    paths.append(str(tmp_path / f"{name}.npy"))
    np.save(paths[-1], a)
  both = rank.rank_files(paths)
  assert both == ranking.evaluate_sims(sgr + saf, cpi=5)
  assert both != rank.rank_files(paths[:1])

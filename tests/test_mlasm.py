"""MLASM: parity with the authors' evaluation (their code as a PyTorch reference, random
weights, a checkpoint in their layout through our converter and the extractor), the two
global modes (pairwise scores do not depend on the gallery; reference scores do, and
say so when misused), the frozen layers through a real train step, and the data wiring
of `global_feat`."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from dsran_jax import evaluation, inference, losses, models, optim, train
from dsran_jax.models.variables import init_variables
from dsran_jax.default_config import get_base_config
from dsran_jax.workdir import Workdir
from dsran_jax.models.mlasm import MlasmConfig, build
from dsran_jax.models.mlasm import model as mlasm_model

VOCAB = 30
E, WORD_DIM, IMG_DIM, REGIONS = 32, 16, 20, 6
N_IMG, CPI = 4, 5


def _captions(rng, n, width=10, vocab=VOCAB):
  """`<start> words <end>` ids (1 ... 2), 3 to 9 tokens, 0-padded to `width`."""
  lengths = rng.integers(3, width, size=n)
  ids = np.zeros((n, width), np.int32)
  for i, n_tok in enumerate(lengths):
    ids[i, 0], ids[i, n_tok - 1] = 1, 2
    ids[i, 1:n_tok - 1] = rng.integers(4, vocab, size=n_tok - 2)
  return ids, (ids != 0).astype(np.int32), lengths


def _edit_config(workdir, **mlasm):
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    c = json.load(f)
  c["model"]["mlasm"].update(mlasm)
  with open(path, "w") as f:
    json.dump(c, f)


# ----------------------------------------------------------------- parity (torch)


@pytest.fixture(scope="module")
def converted(torch_ref, tmp_path_factory):
  """Their model with a small random ResNet, saved in their checkpoint layout, converted
  by convert_torch; its CNN's weights file then run by the extractor over real PNGs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dsran_jax import extract  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("mlasm")
  rng = np.random.default_rng(0)
  ckpt = torch_ref(
      "mlasm.save_checkpoint", path=str(root / "checkpoint_14_rsum=501.66.pth.tar"),
      opt={"embed_size": E, "word_dim": WORD_DIM, "img_dim": IMG_DIM, "data_name": "f30k"},
      vocab_size=VOCAB, cnn_dir=str(root / "cnn"),
      drift_pixels=rng.standard_normal((3, 3, 64, 64)).astype(np.float32))
  workdir = str(root / "workdir")
  summary = convert_torch.convert_checkpoint(ckpt["path"], workdir)
  image_dir = root / "images"
  image_dir.mkdir()
  for i, size in enumerate([(120, 90), (90, 130), (256, 256), (300, 200)]):
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_dir / f"im{i}.png")
  extracted = extract.run(str(image_dir), summary["files"][0], str(root / "data"),
                          split="test", batch_size=4, show_progress=False)
  names = sorted(os.listdir(image_dir))
  pixels = np.stack([extract.decode_image(str(image_dir / n)) for n in names])
  captions, mask, lengths = _captions(rng, N_IMG * CPI)
  inputs = {"pixels_nchw": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)),
            "regions": rng.standard_normal((N_IMG, REGIONS, IMG_DIM)).astype(np.float32),
            "input_ids": captions, "attention_mask": mask, "lengths": lengths,
            "global_feat": np.load(extracted["global"])}
  return {"root": root, "ckpt": ckpt, "workdir": workdir, "summary": summary,
          "inputs": inputs}


@pytest.fixture(scope="module")
def authors(converted, torch_ref):
  x = converted["inputs"]
  return torch_ref("mlasm.evalrank_sims", path=converted["ckpt"]["path"],
                   pixels=x["pixels_nchw"], regions=x["regions"], captions=x["input_ids"],
                   lengths=x["lengths"], batch_size=8, shard_size=8)


def test_converter_writes_config_and_the_checkpoints_cnn(converted):
  s = converted["summary"]
  assert s["model"] == "mlasm" and s["embed_size"] == E and s["img_dim"] == IMG_DIM
  assert s["global_dim"] == converted["ckpt"]["global_dim"] == 64
  assert s["ratio"] == 0.8 and s["global_mode"] == "pairwise"
  assert s["files"] == [os.path.join(converted["workdir"], "resnet.safetensors")]
  config = Workdir(converted["workdir"]).load_config()
  assert config.model.name == "mlasm" and config.data.num_regions == 36
  assert config.train.learning_rate == 5e-4 and config.train.lr_update == 10
  assert config.train.grad_clip == 2.0 and config.train.max_violation
  # Every checkpoint key is accounted for: mapped, or one of the documented drops.
  keys = converted["ckpt"]["keys"]
  assert any(k.startswith("sa.") for k in keys["cap_enc"])
  assert any(k.startswith("fusion.fusion0.") for k in keys["img_enc"])
  assert any(k.startswith("cnn.module.layer4.0.downsample.1.running_var")
             for k in keys["img_enc"])


def test_extracted_global_feat_equals_their_cnn(converted, authors):
  """The workdir's CNN file through the extractor (decode, jitted Flax ResNet) gives the
  pooled features their `cnn` gives on the same decoded pixels, drifted BN stats
  included."""
  got, want = converted["inputs"]["global_feat"], authors["global_feat"]
  assert got.shape == want.shape == (N_IMG, 64)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel < 1e-4, rel


def _matcher_sims(converted, **mlasm):
  _edit_config(converted["workdir"], **mlasm)
  m = inference.load(converted["workdir"])
  x = converted["inputs"]
  img = m.encode_images(regions=x["regions"], global_feat=x["global_feat"])
  txt = m.encode_texts(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
  return m, img, txt, m.score(img, txt)


def test_local_score_equals_their_sims_local(converted, authors):
  _, _, _, sims = _matcher_sims(converted, ratio=1.0, global_mode="pairwise")
  err = np.abs(sims - authors["sims_local"]).max()
  assert sims.shape == (N_IMG, N_IMG * CPI) and err < 1e-4, err


def test_reference_mode_equals_their_evaluation_matrix(converted, authors):
  """Their evalrank's `d = 0.8 sims_local + 0.2 sims_global`, the global embeddings
  conditioned on the ground-truth partners of the evaluation layout."""
  m, img, txt, sims = _matcher_sims(converted, ratio=0.8, global_mode="reference")
  assert m.model.partner_conditioning
  err = np.abs(sims - authors["sims"]).max()
  assert err < 1e-4, err
  # The global part is what makes it differ from the local score.
  assert np.abs(authors["sims"] - authors["sims_local"]).max() > 1e-2
  # Pairwise mode on the same weights gives other numbers off the ground-truth pairs.
  _, _, _, pairwise = _matcher_sims(converted, ratio=0.8, global_mode="pairwise")
  assert np.abs(pairwise - authors["sims"]).max() > 1e-3
  # A gallery outside the evaluation layout is refused by the reference matcher.
  _edit_config(converted["workdir"], global_mode="reference")
  m = inference.load(converted["workdir"])
  with pytest.raises(ValueError, match="evaluation layout"):
    m.score(jax.tree.map(lambda a: a[:2], img), txt)


def test_training_matrix_and_loss_equal_their_contrastive_loss(converted, torch_ref):
  """Reference mode's training call on a batch of B pairs is their ContrastiveLoss's
  score matrix (diagonal partners), and the hinge is theirs (hardest negatives)."""
  x = converted["inputs"]
  owners = np.array([0, 1, 2, 3, 1, 0])
  caps = np.array([0, 6, 11, 15, 7, 3])
  want = torch_ref("mlasm.train_scores", path=converted["ckpt"]["path"],
                   pixels=x["pixels_nchw"][owners], regions=x["regions"][owners],
                   captions=x["input_ids"][caps], lengths=x["lengths"][caps])
  _edit_config(converted["workdir"], ratio=0.8, global_mode="reference")
  m = inference.load(converted["workdir"])
  batch = {"regions": x["regions"][owners], "region_mask": np.ones((6, REGIONS), bool),
           "global_feat": x["global_feat"][owners], "input_ids": x["input_ids"][caps],
           "attention_mask": x["attention_mask"][caps]}
  scores = np.asarray(jax.jit(lambda v, b: m.model.apply(v, b))(m.variables, batch))
  assert np.abs(scores - want["scores"]).max() < 1e-4
  loss = float(losses.hinge_from_scores(scores, 0.2, max_violation=True))
  assert abs(loss - want["loss"]) < 1e-4 * max(1.0, abs(want["loss"]))


def test_converter_names_bad_keys(converted):
  from dsran_jax.models.mlasm import params  # pylint: disable=g-import-not-at-top
  from dsran_jax.convert.engine import ConversionError, load_checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = load_checkpoint(converted["ckpt"]["path"])
  assert params.detect(ckpt)
  bad = dict(ckpt, model=[dict(sd) for sd in ckpt["model"]])
  del bad["model"][0]["cnn.module.layer1.0.conv2.weight"]
  bad["model"][3]["rnn.weight_ih_l1"] = bad["model"][3]["rnn.weight_ih_l0"]
  with pytest.raises(ConversionError, match=r"word_enc\.rnn\.weight_ih_l1"):
    params.convert(bad, config=get_base_config())
  del bad["model"][3]["rnn.weight_ih_l1"]
  with pytest.raises(ConversionError, match=r"img_enc\.cnn\.module\.layer1\.0\.conv2\.weight"):
    params.convert(bad, config=get_base_config())
  opt_t2i = dict(ckpt, opt={**ckpt["opt"], "cross_attn": "t2i"})
  with pytest.raises(ConversionError, match="cross_attn"):
    params.convert(opt_t2i, config=get_base_config())


# --------------------------------------------------------- the two global modes


@functools.lru_cache(maxsize=1)
def _model_pair():
  """Pairwise and reference models over the same random variables (one param tree)."""
  cfg = dict(vocab_size=VOCAB, embed_size=E, word_dim=WORD_DIM, img_dim=IMG_DIM,
             global_dim=24, max_block_elements=2000)  # blocking on: several blocks
  pairwise = build(MlasmConfig(global_mode="pairwise", **cfg))
  reference = build(MlasmConfig(global_mode="reference", **cfg))
  variables = init_variables(pairwise, jax.random.PRNGKey(1))
  rng = np.random.default_rng(2)  # no trivial weights (zero biases) anywhere
  variables = jax.tree.map(
      lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
      variables)
  return pairwise, reference, variables


def _gallery(rng, n_img=6):
  ids, mask, _ = _captions(rng, n_img * CPI, width=9)
  region_mask = np.arange(REGIONS)[None] < rng.integers(2, REGIONS + 1, size=(n_img, 1))
  return ({"regions": rng.standard_normal((n_img, REGIONS, IMG_DIM)).astype(np.float32)
           * region_mask[..., None], "region_mask": region_mask,
           "global_feat": rng.standard_normal((n_img, 24)).astype(np.float32)},
          {"input_ids": ids, "attention_mask": mask})


def _encode(scorer, images, captions):
  return (evaluation.encode_all(scorer.encode_images, [images]),
          evaluation.encode_all(scorer.encode_texts, [captions]))


def test_paired_batch_diagonal_is_the_same_in_both_modes():
  """The pairwise global vectors (linearity trick) of pair (i, i) are the authors'
  literal pair-conditioned ones: the two training matrices share their diagonal."""
  pairwise, reference, variables = _model_pair()
  images, captions = _gallery(np.random.default_rng(3), n_img=5)
  batch = {**images, **jax.tree.map(lambda a: a[::CPI], captions)}
  sp = np.asarray(jax.jit(lambda v, b: pairwise.apply(v, b))(variables, batch))
  sr = np.asarray(jax.jit(lambda v, b: reference.apply(v, b))(variables, batch))
  np.testing.assert_allclose(np.diag(sp), np.diag(sr), rtol=1e-5, atol=1e-6)
  assert np.abs(sp - sr).max() > 1e-3  # off the diagonal the conditioning differs


def _gallery_gap(scorer, img, txt):
  """Largest change of a pair's score when the gallery around it changes: every image
  and caption permuted (same sizes, so a layout check cannot tell)."""
  full = scorer.score(img, txt)
  pi = np.array([3, 0, 5, 1, 4, 2])
  pt = np.random.default_rng(7).permutation(len(txt["words"]))
  moved = scorer.score(jax.tree.map(lambda a: a[pi], img), jax.tree.map(lambda a: a[pt], txt))
  return np.abs(moved - full[pi][:, pt]).max(), full


def test_pairwise_score_does_not_depend_on_the_gallery_reference_does():
  pairwise, reference, variables = _model_pair()
  images, captions = _gallery(np.random.default_rng(4))
  gaps = {}
  for name, model in (("pairwise", pairwise), ("reference", reference)):
    scorer = evaluation.ModelScorer(model, variables, tile=(8, 8), progress=False)
    img, txt = _encode(scorer, images, captions)
    gaps[name], full = _gallery_gap(scorer, img, txt)
    if name == "pairwise":
      # Any sub-gallery, in no particular layout, gives the same numbers too.
      sub = scorer.score(jax.tree.map(lambda a: a[[4, 1]], img),
                         jax.tree.map(lambda a: a[[0, 17, 9]], txt))
      np.testing.assert_allclose(sub, full[[4, 1]][:, [0, 17, 9]], rtol=1e-5, atol=1e-6)
      # Tiles (8 x 8 over 8 fake devices, captions blocked inside) change nothing.
      direct = jax.jit(lambda v, i, t: model.apply(v, i, t, method="score"))(
          variables, img, txt)
      np.testing.assert_allclose(full, np.asarray(direct), rtol=1e-5, atol=1e-6)
  assert gaps["pairwise"] < 1e-5, gaps
  assert gaps["reference"] > 1e-3, gaps  # the same check fails for the authors' mode


def test_reference_mode_misuse_is_a_clear_error(tmp_path):
  _, reference, variables = _model_pair()
  images, captions = _gallery(np.random.default_rng(5))
  scorer = evaluation.ModelScorer(reference, variables, tile=(8, 8), progress=False)
  img, txt = _encode(scorer, images, captions)
  # The evaluation path runs the paired pre-pass itself (evaluate -> the scorer's
  # condition_on_partners) and scores what Matcher.score scores.
  sims_path = str(tmp_path / "sims.npy")
  evaluation.evaluate(scorer, [{**images, "valid": np.ones(6, bool)}],
                      [{**captions, "valid": np.ones(30, bool)}], cpi=CPI,
                      sims_path=sims_path)
  np.testing.assert_allclose(np.load(sims_path), scorer.score(img, txt), rtol=1e-6,
                             atol=1e-7)
  # score() straight on encoded reps: no ground-truth conditioning was done.
  with pytest.raises(ValueError, match="global_mode='reference'.*pairwise"):
    reference.apply(variables, img, txt, method="score")
  with pytest.raises(ValueError, match="global_mode='reference'.*pairwise"):
    scorer.score_into(img, txt, np.empty((6, 30), np.float32))
  # One query against a gallery (search): not the evaluation layout.
  with pytest.raises(ValueError, match=r"evaluation layout.*6 images and 1 captions"):
    scorer.score(img, jax.tree.map(lambda a: a[:1], txt))
  # The layout check uses the split's captions per image when evaluate passes it.
  with pytest.raises(ValueError, match="3 captions per image"):
    scorer.condition_on_partners(img, txt, captions_per_image=3)
  # Ratio 1 has no global term: nothing to condition, any gallery is fine.
  local = build(MlasmConfig(vocab_size=VOCAB, embed_size=E, word_dim=WORD_DIM,
                            img_dim=IMG_DIM, global_dim=24, global_mode="reference",
                            ratio=1.0))
  assert local.partner_conditioning is None
  s = evaluation.ModelScorer(local, variables, tile=(8, 8), progress=False)
  i1, t1 = _encode(s, images, captions)
  assert s.score(i1, jax.tree.map(lambda a: a[:1], t1)).shape == (6, 1)


# ------------------------------------------------------------ training, frozen layers


def _tiny_train_config(global_mode="pairwise"):
  import runpy  # pylint: disable=g-import-not-at-top
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "demo.py"))["get_config"]("mlasm")
  c.model.embed_size, c.model.word_dim = E, WORD_DIM
  c.model.img_dim = c.data.img_dim = IMG_DIM
  c.model.mlasm.global_dim = 24  # the random galleries' width (no synthetic run here)
  c.model.mlasm.global_mode = global_mode
  c.train.sum_violation_steps = 0
  return c


def test_frozen_layers_get_no_update_and_the_layers_before_them_do():
  config = _tiny_train_config("pairwise")  # the same parameter tree in both modes
  model = models.build_model(config.model, vocab_size=VOCAB)
  model_frozen = models.frozen_paths(config.model)
  schedule = optim.learning_rate_schedule(config.train, 10, 100)
  tx = optim.make_optimizer(config.train, schedule, model_frozen)
  frozen = optim.frozen_patterns(config.train, model_frozen)
  variables = _model_pair()[2]  # the same widths, so the same parameter tree
  state = train.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                           params=variables["params"], batch_stats={},
                           opt_state=tx.init(variables["params"]))
  images, captions = _gallery(np.random.default_rng(6), n_img=8)
  batch = {**images, **jax.tree.map(lambda a: a[::CPI], captions)}
  step = jax.jit(train.make_train_step(model, tx, config, schedule, frozen))
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  before = {optim.path_str(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(state.params)}
  after = {optim.path_str(p): np.asarray(v) for p, v in
           jax.tree_util.tree_leaves_with_path(new.params)}
  frozen_paths = [k for k in before if k.startswith(("img_enc/fc_attn_i/", "img_enc/fusion/"))]
  assert sorted(frozen_paths) == ["img_enc/fc_attn_i/bias", "img_enc/fc_attn_i/kernel",
                                  "img_enc/fusion/gate0/bias", "img_enc/fusion/gate0/kernel"]
  for k in frozen_paths:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  # The layers feeding them train: the regions (into fc_attn_i), the CNN projection
  # `fc` (reaching the loss only through the frozen fusion gate), the words, fc_text.
  for k in ("region_enc/fc_region/kernel", "img_enc/fc/kernel", "img_enc/fc/bias",
            "word_enc/embed/embedding", "word_enc/gru/w_ih", "cap_enc/fc_text/kernel"):
    assert np.abs(after[k] - before[k]).max() > 0, k


def test_configs_and_frozen_paths():
  from dsran_jax.default_config import recipe_config  # pylint: disable=g-import-not-at-top
  from dsran_jax import validation  # pylint: disable=g-import-not-at-top
  demo = _tiny_train_config()
  assert demo.model.mlasm.global_mode == "pairwise" and demo.data.format == "synthetic"
  for dataset in ("f30k", "coco"):
    c = recipe_config(dataset, "mlasm")
    c.data.root = "/data/" + dataset
    validation.validate_config(c)
    assert (c.data.format, c.data.num_regions, c.model.embed_size) == ("vlp", 36, 1024)
    assert (c.train.learning_rate, c.train.num_epochs, c.train.lr_update) == (5e-4, 20, 10)
    assert (c.train.batch_size, c.train.grad_clip, c.model.mlasm.ratio) == (128, 2.0, 0.8)
    assert c.model.mlasm.embed_dropout == 0.1 and "global_feat" in models.image_keys(c)
  bad = recipe_config("f30k", "mlasm")
  bad.data.root = "/data/f30k"
  bad.model.mlasm.global_mode = "diagonal"
  with pytest.raises(validation.ConfigError, match="global_mode"):
    validation.validate_config(bad)


# ------------------------------------------------------------------ data wiring


def test_synthetic_global_feat_is_the_grid_mean():
  from dsran_jax import data  # pylint: disable=g-import-not-at-top
  c = _tiny_train_config()
  c.data.synthetic.num_train_images = 8
  raw = data.read_raw_split(c, "train")
  arrays = raw.read_images(np.array([0, 3]))
  np.testing.assert_allclose(arrays["global_feat"], arrays["grid"].mean(1), rtol=1e-6)
  assert arrays["global_feat"].shape == (2, IMG_DIM)
  c.model.name = "scan"  # a family that does not read it gets no such key
  assert "global_feat" not in data.read_raw_split(c, "train").read_images(np.array([0]))


def test_precomp_reader_gives_global_feat_and_names_a_missing_file(tmp_path):
  from dsran_jax import data  # pylint: disable=g-import-not-at-top
  from dsran_jax.data import raw  # pylint: disable=g-import-not-at-top
  from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
  c = get_base_config()
  c.model.name = "mlasm"
  c.data.format, c.data.root = "precomp", str(tmp_path)
  c.data.img_dim = 8
  rng = np.random.default_rng(0)
  np.save(tmp_path / "test_ims.npy", rng.standard_normal((3, 4, 8)).astype(np.float32))
  (tmp_path / "test_caps.txt").write_text("".join(f"a dog number {i}\n" for i in range(15)))
  with pytest.raises(raw.MissingDataError, match=r"test_global\.npy.*dsran_jax\.extract"):
    data.read_raw_split(c, "test")
  glob = rng.standard_normal((3, 2048)).astype(np.float32)
  np.save(tmp_path / "test_global.npy", glob)
  arrays = data.read_raw_split(c, "test").read_images(np.array([2, 0]))
  np.testing.assert_array_equal(arrays["global_feat"], glob[[2, 0]])
  assert arrays["regions"].shape == (2, 4, 8)


def test_glove_rows_initialise_the_word_embeddings(tmp_path):
  from dsran_jax import data  # pylint: disable=g-import-not-at-top
  c = _tiny_train_config()
  c.data.synthetic.num_train_images = 8
  vocab = data.gru_vocabulary(c, str(tmp_path))
  words = [w for w in ("dog", "cat", "red") if w in vocab.word2idx]
  assert words
  glove = tmp_path / "glove.txt"
  vectors = {w: np.arange(WORD_DIM, dtype=np.float32) * (i + 1) for i, w in enumerate(words)}
  glove.write_text("".join(f"{w} {' '.join(str(x) for x in v)}\n" for w, v in vectors.items()))
  c.model.glove_path = str(glove)
  model = models.build_model(c.model, vocab_size=len(vocab))
  variables = models.load_pretrained(init_variables(model, jax.random.PRNGKey(0)),
                                     c, vocab)
  table = np.asarray(variables["params"]["word_enc"]["embed"]["embedding"])
  for w, v in vectors.items():
    np.testing.assert_array_equal(table[vocab.word2idx[w]], v)


def test_pairwise_scores_equal_the_literal_formula_per_pair():
  """`pairwise_global` (weighted sums of per-region projections) against the authors'
  formula applied to one pair at a time (contexts, means, the layers themselves)."""
  pairwise, reference, variables = _model_pair()
  images, captions = _gallery(np.random.default_rng(8), n_img=3)
  captions = jax.tree.map(lambda a: a[:4], captions)
  got = np.asarray(jax.jit(lambda v: pairwise.apply(
      v, pairwise.apply(v, images, method="encode_images"),
      pairwise.apply(v, captions, method="encode_texts"), method="score"))(variables))

  @jax.jit
  def literal(v):
    ri = reference.apply(v, images, method="encode_images")
    rt = reference.apply(v, captions, method="encode_texts")
    local = reference.apply(v, ri, rt, method="_local")
    # Every (i, j) as one of 12 row-aligned pairs.
    ii, jj = np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3)
    gi, gt = reference.apply(v, jax.tree.map(lambda a: a[ii], ri),
                             jax.tree.map(lambda a: a[jj], rt), method="condition_on_partners")
    glob = jax.numpy.sum(gi["global_emb"] * gt["global_emb"], -1).reshape(3, 4)
    return 0.8 * local + 0.2 * glob

  np.testing.assert_allclose(got, np.asarray(literal(variables)), rtol=1e-5, atol=1e-6)
  assert mlasm_model.caption_block(6, 100, 2000) == 3

"""DSRAN's online grid (`model.dsran.image_inputs="image+regions"`): the frozen ResNet run
in the training step on raw-image views, as the authors train (kywen1119/DSRAN).

- one jitted train step (`train.make_train_step`, the real one) equals the authors'
  `train_emb` on the same crops: loss, gradient norm, and every BatchNorm running
  statistic after the step (the frozen CNN's, which their `model.train()` moves, and
  the GATs'); the CNN's weights get no update and no optimiser state. The PyTorch side
  (tests/torchref/dsran_online.py) runs in the jax-free reference process;
- the views: the evaluation view is the extractor's decode (so precomputed grids and
  the online evaluation see the same pixels), training views are torchvision's
  RandomResizedCrop + flip, keyed by (seed, step, row);
- a short run of the demo variant through `python -m dsran_jax.main`: training, the
  drifted statistics checkpointed and used at evaluation.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from PIL import Image
from _xla_flags import subprocess_env

from dsran_jax import extract, models, optim, train
from dsran_jax.data import images as images_lib
from dsran_jax.default_config import get_base_config
from dsran_jax.models.common import resnet
from dsran_jax.models.dsran import params as dsran_params
from dsran_jax.models.variables import init_variables
from dsran_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, R, E, L = 4, 5, 32, 9
CROP, RESIZE = 64, 73
WIDTHS, DEPTHS = (8, 16, 32, 64), (1, 2, 1, 1)  # every kind of block, 256 grid channels
IMG = 4 * WIDTHS[-1]
POS = 1607
BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=40, max_position_embeddings=40, type_vocab_size=2)
REL_TOL = 1e-4


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def write_images(directory, n, seed=0) -> list:
  """Smooth random JPEGs of several shapes (the crops come from real decoded files)."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    size = [(160, 120), (97, 140), (200, 90), (120, 120)][i % 4]
    coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    path = os.path.join(directory, f"img{i:03d}.jpg")
    im.save(path, quality=90)
    paths.append(path)
  return paths


def online_config(cnn_weights):
  c = get_base_config()
  d = c.model.dsran
  d.text_encoder, d.bert_random_init, d.K = "bert", True, 2
  d.bert.vocab_size, d.bert.hidden_size, d.bert.num_layers = 60, 32, 1
  d.bert.num_heads, d.bert.intermediate_size, d.bert.max_position = 2, 40, 40
  d.image_inputs, d.cnn_depths, d.cnn_widths = "image+regions", DEPTHS, WIDTHS
  d.crop_size, d.resize_size, d.cnn_weights = CROP, RESIZE, cnn_weights
  c.model.embed_size, c.model.img_dim = E, IMG
  c.data.format, c.data.img_dim = "synthetic", IMG
  c.train.batch_size = B
  c.train.warmup = 0.0  # BertAdam's warmup would give step 0 a zero learning rate
  return c


def no_dropout(next_fun, args, kwargs, context):
  """Skips every Dropout module (the reference sets p = 0)."""
  if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
    return args[0]
  return next_fun(*args, **kwargs)


def size_of(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def test_train_step_matches_authors_train_emb(tmp_path, torch_ref):
  """Their train_emb vs our jitted step on the same crops, random weights everywhere."""
  rng = np.random.default_rng(0)
  paths = write_images(tmp_path, B)
  crops = np.stack([images_lib.train_view(Image.open(p).convert("RGB"), CROP,
                                          images_lib.view_rng((0, 5, row)))
                    for row, p in enumerate(paths)])
  calib = ((crops / np.float32(255) - 0.45) / 0.25).astype(np.float32)
  ref = torch_ref("dsran_online.make", model_dir=str(tmp_path / "ref"), K=2, bert=BERT,
                  dims={"embed": E, "img": IMG, "pos": POS},
                  cnn=dict(depths=DEPTHS, hidden_sizes=tuple(4 * w for w in WIDTHS),
                           embedding_size=WIDTHS[0]),
                  torch_seed=1, init_seed=2, calib_pixels=calib)
  regions = rng.standard_normal((B, R, IMG)).astype(np.float32)
  pos = rng.standard_normal((B, R, POS)).astype(np.float32)
  ids = np.concatenate([np.ones((B, 1)), rng.integers(3, 60, (B, L - 2)), 2 * np.ones((B, 1))],
                       1).astype(np.int64)  # no padding: their BERT call has no mask
  want = torch_ref("dsran_online.train_emb", model_dir=str(tmp_path / "ref"), pixels=crops,
                   regions=regions, pos=pos, ids=ids, margin=0.2)

  c = online_config(ref["cnn_weights"])
  model = models.build_model(c.model)
  fresh = init_variables(model, jax.random.PRNGKey(0))
  loaded = models.load_pretrained(fresh, c)  # the CNN from its torchvision file
  converted, _ = dsran_params.convert_state_dict(ref["state"], "bert", bert_heads=2)
  variables = {col: {**converted[col], "cnn": loaded[col]["cnn"]}
               for col in ("params", "batch_stats")}
  assert (jax.tree_util.tree_structure(variables["params"])
          == jax.tree_util.tree_structure(fresh["params"]))

  schedule = optim.learning_rate_schedule(c.train, 10, 10)
  frozen = optim.frozen_patterns(c.train, models.frozen_paths(c.model))
  assert frozen == (r"^cnn/",)
  tx = optim.make_optimizer(c.train, schedule, models.frozen_paths(c.model))
  state = train.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                           params=variables["params"], batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  # No optimiser state for the frozen CNN: BertAdam keeps two moments of the rest only
  # (plus the schedule's step count).
  trained = size_of(variables["params"]) - size_of(variables["params"]["cnn"])
  assert size_of(state.opt_state) == 2 * trained + 1
  batch = {"image": crops, "regions": regions, "region_pos": pos,
           "region_mask": np.ones((B, R), bool), "input_ids": ids.astype(np.int32),
           "attention_mask": np.ones((B, L), np.int32)}
  step = jax.jit(train.make_train_step(model, tx, c, schedule, frozen))
  with nn.intercept_methods(no_dropout):
    new, metrics = step(state, batch)

  print(f"loss {float(metrics['loss']):.6f} vs {want['loss']:.6f}; grad norm "
        f"{float(metrics['grad_norm']):.6f} vs {want['grad_norm']:.6f}")
  assert rel_err(metrics["loss"], want["loss"]) < REL_TOL
  assert rel_err(metrics["grad_norm"], want["grad_norm"]) < REL_TOL
  grid = jax.jit(lambda v, x: model.apply(v, x, method="cnn_grid", train=True,
                                          mutable=["batch_stats"])[0])(variables, crops)
  assert rel_err(grid, want["grid"]) < REL_TOL

  # Every running statistic after the step, the CNN's (drifted by train-mode BN) and
  # the GATs', against theirs mapped by the same converters.
  after, _ = dsran_params.convert_state_dict(want["state"], "bert", bert_heads=2)
  cnn_after = resnet.state_dict_to_variables(
      {k: v for k, v in want["state"].items() if k.startswith("img_enc.cnn.")},
      prefix="img_enc.cnn.")
  want_stats = {**after["batch_stats"], "cnn": cnn_after["batch_stats"]}
  flat_got = dict(jax.tree_util.tree_leaves_with_path(new.batch_stats))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_stats))
  assert set(flat_got) == set(flat_want)
  worst = max(rel_err(flat_got[k], flat_want[k]) for k in flat_want)
  print(f"{len(flat_want)} running statistics, worst relative error {worst:.2e}")
  assert worst < REL_TOL
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                 new.batch_stats["cnn"], variables["batch_stats"]["cnn"])
  assert min(jax.tree_util.tree_leaves(moved)) > 0  # every CNN statistic drifted
  # The frozen CNN's weights are untouched; the rest moved.
  same = jax.tree_util.tree_map(np.array_equal, new.params["cnn"], variables["params"]["cnn"])
  assert all(jax.tree_util.tree_leaves(same))
  assert not np.array_equal(new.params["grid_enc"]["fc"]["kernel"],
                            variables["params"]["grid_enc"]["fc"]["kernel"])
  assert np.isfinite(float(optax.tree.norm(new.params)))


def test_views_match_torchvision_geometry_and_the_extractor(tmp_path):
  paths = write_images(tmp_path, 4, seed=1)
  for path in paths:
    im = Image.open(path).convert("RGB")
    # Evaluation: exactly the extractor's decode (precomputed grids see these pixels).
    view = images_lib.eval_view(im, 224, 256)
    want = extract.decode_image(path)
    got = (view / np.float32(255.0) - extract.MEAN) / extract.STD
    assert view.dtype == np.uint8 and view.shape == (224, 224, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Training: torchvision's RandomResizedCrop box rules, a pure function of the key.
    for k in range(50):
      left, top, right, bottom = images_lib.random_resized_crop_box(
          *im.size, images_lib.view_rng((3, k, 0)))
      w, h = right - left, bottom - top
      assert 0 <= left and 0 <= top and right <= im.size[0] and bottom <= im.size[1]
      assert 0.08 * im.size[0] * im.size[1] * 0.8 <= w * h
      assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (w, h) == im.size
    a = images_lib.train_view(im, CROP, images_lib.view_rng((0, 7, 1)))
    b = images_lib.train_view(im, CROP, images_lib.view_rng((0, 7, 1)))
    c = images_lib.train_view(im, CROP, images_lib.view_rng((0, 7, 2)))
    assert a.shape == (CROP, CROP, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
  # A view is the box's crop resized (bilinear), mirrored on the next draw < 0.5.
  im = Image.open(paths[0]).convert("RGB")
  seen = set()
  for k in range(20):
    r = images_lib.view_rng((1, k, 0))
    box = images_lib.random_resized_crop_box(*im.size, r)
    flip = r.random() < 0.5
    want = im.crop(box).resize((CROP, CROP), Image.Resampling.BILINEAR)
    want = np.asarray(want)[:, ::-1] if flip else np.asarray(want)
    assert np.array_equal(images_lib.train_view(im, CROP, images_lib.view_rng((1, k, 0))), want)
    seen.add(flip)
  assert seen == {True, False}


def test_directory_images_found_by_stem_and_errors(tmp_path):
  os.makedirs(tmp_path / "a" / "b")
  for name in ("a/x1.jpg", "a/b/x2.png"):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / name)
  load = images_lib.directory_pixels(str(tmp_path), ["x2", "x1"], "test")
  assert load(0).size == (40, 30)
  with pytest.raises(images_lib.raw.MissingDataError, match=r"1 of the 2 images.*nope"):
    images_lib.directory_pixels(str(tmp_path), ["x1", "nope"], "test")
  images_lib.index_directory.cache_clear()
  Image.new("RGB", (8, 8)).save(tmp_path / "a" / "b" / "x1.png")
  with pytest.raises(images_lib.raw.DataError, match=r"stems found twice.*x1"):
    images_lib.index_directory(str(tmp_path))
  images_lib.index_directory.cache_clear()


@pytest.mark.slow
def test_online_demo_trains_and_evaluates_through_main(tmp_path):
  """`configs/demo.py:dsran,grid=online`, cut to a few steps with a tiny random BERT:
  the CNN's drifted statistics are checkpointed and evaluation reads them (about 4
  minutes on 2 loaded cores: a separate process compiles training and evaluation)."""
  workdir = tmp_path / "wd"
  args = ["--config=configs/demo.py:dsran,grid=online", f"--workdir={workdir}",
          "--config.model.dsran.bert_random_init=True",
          "--config.model.dsran.bert.num_layers=1", "--config.model.dsran.bert.hidden_size=16",
          "--config.model.dsran.bert.num_heads=2",
          "--config.model.dsran.bert.intermediate_size=32", "--config.model.embed_size=32",
          "--config.train.freeze_bert=False",
          "--config.data.synthetic.num_train_images=16",
          "--config.data.synthetic.num_dev_images=8",
          "--config.data.synthetic.num_test_images=8",
          "--config.train.batch_size=8", "--config.train.num_steps=4",
          "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
          "--config.eval.batch_size=8"]
  r = subprocess.run([sys.executable, "-m", "dsran_jax.main", *args], capture_output=True,
                     text=True, env=subprocess_env(), cwd=REPO, timeout=900, check=False)
  assert r.returncode == 0, r.stderr[-4000:]
  results = json.loads((workdir / "eval_results.json").read_text())
  assert "rsum" in json.dumps(results)
  wd = Workdir(str(workdir))
  config = wd.load_config()
  assert config.model.dsran.image_inputs == "image+regions"
  restored = wd.restore(config)
  model, variables = restored.model, restored.variables
  stats = variables["batch_stats"]["cnn"]["bn1"]
  # Random init starts at mean 0 / var 1: train-mode BN moved them, and they were saved.
  assert float(np.max(np.abs(np.asarray(stats["mean"])))) > 0
  assert "image" in model.image_keys


def test_online_config_errors_name_the_key():
  from dsran_jax import validation  # pylint: disable=g-import-not-at-top
  c = online_config("")
  c.data.format = "vlp"
  with pytest.raises(validation.ConfigError, match=r"model\.dsran\.cnn_weights=''"):
    validation.validate_config(c)
  c.model.dsran.cnn_weights = "/somewhere/resnet152.pth"
  with pytest.raises(validation.ConfigError, match=r"data\.image_dir=''"):
    validation.validate_config(c)
  c.data.format = "synthetic"
  c.model.img_dim = 2048
  with pytest.raises(validation.ConfigError, match=r"model\.img_dim=2048.*gives 256"):
    validation.validate_config(c)
  c.model.img_dim = IMG
  c.model.dsran.cnn_depths = (1, 1)
  with pytest.raises(validation.ConfigError, match=r"cnn_depths=\(1, 1\)"):
    validation.validate_config(c)
  c.model.dsran.cnn_depths = DEPTHS
  validation.validate_config(c)
  assert models.image_views(c) == (CROP, RESIZE)
  assert models.frozen_paths(c.model) == (r"^cnn/",)
  c.model.dsran.image_inputs = "grid+regions"
  assert models.image_views(c) is None and models.frozen_paths(c.model) == ()

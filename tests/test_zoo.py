"""The family contract, checked for every registered model family alike: init, encode and
score shapes, `score` of encoded items equals the training call's matrix, padding
invariance, tiled scoring over 8 devices equals one call, the loss falls on a fixed batch,
and every config of the family validates and round-trips through a workdir."""
import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest

from dsran_jax import evaluation, losses, models, optim
from dsran_jax.models.variables import init_variables
from dsran_jax.core.batch import KEY_SPECS, key_shape
from dsran_jax.default_config import get_base_config
from dsran_jax.workdir import Workdir

FAMILIES = models.names()
VOCAB = 40
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name: str):
  """A family's demo settings shrunk to test size (widths the contract does not care
  about)."""
  import runpy  # pylint: disable=g-import-not-at-top
  c = get_base_config()
  c.model.name = name
  if name == "dsran":  # the demo's BERT is the MiniLM package; a tiny random one here
    c.model.dsran.text_encoder = "gru"
  else:
    c = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"](name)
  c.model.embed_size = 32
  c.model.img_dim = c.data.img_dim = 24
  c.model.word_dim = 16
  c.model.dsran.gat_heads = 4
  c.model.dtype = "float32"
  return c


def random_batch(rng, model, b=4, r=5, l=7):
  """Real items with different numbers of real regions and words."""
  batch = {}
  for key in tuple(model.image_keys) + tuple(model.text_keys):
    shape = (b,) + key_shape(key, model.input_dims, r, l)
    if key == "region_mask":
      batch[key] = np.arange(r)[None, :] < rng.integers(2, r + 1, size=(b, 1))
    elif key == "attention_mask":
      batch[key] = (np.arange(l)[None, :] < rng.integers(3, l + 1, size=(b, 1))).astype(np.int32)
    elif key == "input_ids":
      batch[key] = rng.integers(4, VOCAB, size=shape).astype(np.int32)
    else:
      batch[key] = rng.standard_normal(shape).astype(KEY_SPECS[key][1])
  if "attention_mask" in batch:
    batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
  if "region_mask" in batch:
    batch["regions"] = batch["regions"] * batch["region_mask"][..., None]
  return batch


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  name = request.param
  config = tiny_config(name)
  model = models.build_model(config.model, vocab_size=VOCAB)
  variables = init_variables(model, jax.random.PRNGKey(0))
  return name, config, model, variables


def _encode(model, variables, batch):
  fn = jax.jit(lambda v, b: (model.apply(v, b, method="encode_images"),
                             model.apply(v, b, method="encode_texts")))
  return fn(variables, batch)


def test_shapes_and_training_call_equals_score_of_encoded(family):
  name, _, model, variables = family
  batch = random_batch(np.random.default_rng(0), model)
  img, txt = _encode(model, variables, batch)
  for side, reps in (("image", img), ("text", txt)):
    assert {x.shape[0] for x in jax.tree.leaves(reps)} == {4}, (name, side)
  s = jax.jit(lambda v, i, t: model.apply(v, i, t, method="score"))(variables, img, txt)
  assert s.shape == (4, 4) and s.dtype == np.float32
  assert np.isfinite(np.asarray(s)).all()
  train_scores = jax.jit(lambda v, b: model.apply(v, b))(variables, batch)
  np.testing.assert_allclose(np.asarray(train_scores), np.asarray(s), rtol=1e-5, atol=1e-5)
  # Pair (i, j) depends on image i and caption j only: scoring a sub-gallery gives the
  # same numbers.
  sub = jax.jit(lambda v, i, t: model.apply(v, i, t, method="score"))(
      variables, jax.tree.map(lambda x: x[1:3], img), jax.tree.map(lambda x: x[2:], txt))
  np.testing.assert_allclose(np.asarray(sub), np.asarray(s)[1:3, 2:], rtol=1e-5, atol=1e-6)


def test_padding_never_changes_scores(family):
  name, _, model, variables = family
  rng = np.random.default_rng(1)
  batch = random_batch(rng, model)
  score = jax.jit(lambda v, b: model.apply(v, b))
  want = np.asarray(score(variables, batch))
  padded = dict(batch)
  grow = {"regions": 3, "region_pos": 3, "region_mask": 3, "input_ids": 4,
          "attention_mask": 4}
  for key, extra in grow.items():
    if key in padded:
      x = padded[key]
      pad = [(0, 0)] * x.ndim
      pad[1] = (0, extra)
      fill = 9.0 if key in ("regions", "region_pos") else 0  # garbage behind the mask
      padded[key] = np.pad(x, pad, constant_values=fill)
  got = np.asarray(score(variables, padded))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_tiled_scoring_over_devices_equals_one_call(family):
  name, _, model, variables = family
  rng = np.random.default_rng(2)
  images, captions = random_batch(rng, model, b=13), random_batch(rng, model, b=11)
  scorer = evaluation.ModelScorer(model, variables, tile=(8, 4))  # 8 fake devices
  assert scorer.n_dev == 8
  img = evaluation.encode_all(scorer.encode_images, [images])
  txt = evaluation.encode_all(scorer.encode_texts, [captions])
  tiled = scorer.score(img, txt)  # 2 x 3 tiles, both axes padded
  direct = jax.jit(lambda v, i, t: model.apply(v, i, t, method="score"))(variables, img, txt)
  assert tiled.shape == (13, 11)
  np.testing.assert_allclose(tiled, np.asarray(direct), rtol=1e-5, atol=1e-5, err_msg=name)


def test_loss_falls_on_a_fixed_batch(family):
  name, config, model, variables = family
  batch = random_batch(np.random.default_rng(3), model, b=8)
  tx = optax.adam(3e-3)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  frozen = optim.frozen_patterns(config.train, models.frozen_paths(config.model))

  def objective(p, stats, rng):
    p = optim.stop_frozen_gradients(p, frozen)
    scores, upd = model.apply({"params": p, "batch_stats": stats}, batch, train=True,
                              rngs={"dropout": rng}, mutable=["batch_stats"])
    return losses.hinge_from_scores(scores, 0.2, max_violation=False), upd

  @jax.jit
  def step(params, stats, opt_state, rng):
    (loss, upd), grads = jax.value_and_grad(objective, has_aux=True)(params, stats, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd.get("batch_stats", {}), opt_state, loss

  # Measured with one fixed dropout key, so the comparison sees training, not dropout noise:
  # the loss `step` returns is the objective at the parameters it was given (before its
  # update, which is dropped here), so one compile serves training and measuring.
  measure = lambda p, s: float(step(p, s, opt_state, jax.random.PRNGKey(99))[3])
  before = measure(params, stats)
  seen = []
  for i in range(12):
    params, stats, opt_state, loss = step(params, stats, opt_state, jax.random.PRNGKey(i))
    seen.append(float(loss))
  after = measure(params, stats)
  assert np.isfinite(seen).all(), (name, seen)
  assert after < 0.8 * before, (name, before, after, seen)


@pytest.mark.parametrize("name", FAMILIES)
def test_configs_validate_and_round_trip(name, tmp_path):
  from dsran_jax.default_config import recipe_config  # pylint: disable=g-import-not-at-top
  spec = models.family_config(name)
  for dataset in ("f30k", "coco"):
    c = recipe_config(dataset, name)
    assert c.model.name == name
    spec.validate(c)
    Workdir(str(tmp_path)).save_config(c)
    back = Workdir(str(tmp_path)).load_config()
    assert back.to_dict() == c.to_dict()
    with open(tmp_path / "config.json") as f:
      saved = json.load(f)
    if spec.defaults() is not None:  # every family key is written out, defaults included
      assert set(saved["model"][name]) == set(spec.defaults().to_dict())


def _variants(name):
  """Configs of family `name` whose batch keys may differ: its test size, its recipes,
  and the options that change which inputs it reads."""
  from dsran_jax.default_config import recipe_config  # pylint: disable=g-import-not-at-top
  out = [tiny_config(name)]
  # A recipe with BERT (DSRAN's, VSE∞'s) needs the BERT files to build; the options
  # that change inputs vary below.
  out += [c for c in (recipe_config(dataset, name) for dataset in ("f30k", "coco"))
          if not models.bert_path(c)]
  options = {"dsran": [{"dsran.image_inputs": "regions"},
                       {"dsran.image_inputs": "grid+regions"}],
             "bssan": [{"bssan.directions": d, "bssan.w2r_visual": v}
                       for d in ("both", "w2r", "o2w") for v in ("regions36", "grid")]}
  for overrides in options.get(name, ()):
    c = tiny_config(name)
    for key, value in overrides.items():
      section, _, leaf = key.rpartition(".")
      (c.model[section] if section else c.model)[leaf] = value
    out.append(c)
  return out


@pytest.mark.parametrize("name", FAMILIES)
def test_module_reads_the_batch_keys_its_config_declares(name):
  """The config hooks (`models.image_keys(config)`, jax-free, used by data and
  inference) and the built Module's `image_keys` / `text_keys` agree for every
  variant."""
  for c in _variants(name):
    model = models.build_model(c.model, vocab_size=VOCAB)
    assert tuple(model.image_keys) == models.image_keys(c), (name, c.model)
    assert tuple(model.text_keys) == models.text_keys(c), (name, c.model)
    assert set(model.image_keys) <= set(KEY_SPECS) and set(model.text_keys) <= set(KEY_SPECS)


@pytest.mark.parametrize("name", FAMILIES)
def test_options_are_declared_once(name):
  """A family's option table gives its config section, its checks and its Module's
  config: the section's keys and defaults are the table's, the Module config carries
  every option with the config's value, and a value out of range is refused by both
  sides with the same message naming the key."""
  spec = models.family_config(name)
  table = spec.OPTIONS
  base = get_base_config()
  section = base.model[name] if table.section else base.model
  for option in table.options:
    assert section[option.name] == option.default, (name, option.name)
  if table.section:
    assert list(spec.defaults().keys()) == sorted(table.keys)
  c = tiny_config(name)
  model = models.build_model(c.model, vocab_size=VOCAB)
  # The Module field built from the table (KIDRR: `kidrr`, beside SGRAF's `config`).
  holder = next(getattr(model, f.name) for f in dataclasses.fields(model)
                if getattr(getattr(model, f.name), "OPTIONS", None) is table)
  # (Config-only options, e.g. DSRAN's bert_path and bert.*, are not Module fields.)
  for option in table.fields:
    if option.name != "vocab_size":
      assert getattr(holder, option.name) == table.section_of(c.model)[option.name]
  choice = next(o for o in table.options
                if hasattr(o.rule, "values") and isinstance(o.default, str))
  bad = tiny_config(name)
  table.section_of(bad.model)[choice.name] = "nonsense"
  with pytest.raises(ValueError, match=f"{table.key(choice.name)}='nonsense': expected"):
    spec.validate(bad)
  with pytest.raises(ValueError, match=f"{table.key(choice.name)}='nonsense': expected"):
    models.build_model(bad.model, vocab_size=VOCAB)

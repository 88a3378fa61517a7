"""HREM family: parity with the authors' code (CrossmodalGroup/HREM, run from
tests/torchref/hrem.py in a torch-only process) through their checkpoint layout and the
converter CLI; one training step's GraphLoss (before and after the warm-up, on their
draws of negatives); the objective's parameters in the train state and its checkpoints
and out of what inference reads; the optimiser groups; recipes."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _vse_lineage import (IMG_DIM, NO_DROPOUT, TINY_BERT, bad_image_keys_named, bert_cli_scores,
                          images, random_ids)
from _xla_flags import user_compile
from jax.sharding import NamedSharding, PartitionSpec as P

from dsran_jax import checkpointing, models, optim, train
from dsran_jax.convert.engine import flatten, load_checkpoint
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.hrem import config as hrem_config
from dsran_jax.models.hrem import objective as obj_lib
from dsran_jax.models.hrem import params as hrem_params
from dsran_jax.models.vse_infty import params as vse_params

TOL = 1e-4
OPT = dict(embed_size=16, img_dim=IMG_DIM, nhead=2, dataset="f30k")


def _batch(feats, img_lens, ids, lens, image_ids, width=None, regions=None):
  """Our batch of their inputs, optionally padded wider (`width` tokens, `regions`)."""
  width = width or ids.shape[1]
  regions = regions or feats.shape[1]
  x = np.zeros((feats.shape[0], regions, IMG_DIM), np.float32)
  x[:, :feats.shape[1]] = feats
  w = np.zeros((ids.shape[0], width), np.int32)
  w[:, :ids.shape[1]] = ids
  return {"regions": x, "region_mask": np.arange(regions)[None] < img_lens[:, None],
          "input_ids": w,
          "attention_mask": (np.arange(width)[None] < lens[:, None]).astype(np.int32),
          "image_index": np.asarray(image_ids, np.int32)}


# ------------------------------------------------------------ parity with the authors


def test_cli_workdir_gives_their_similarity_matrix(torch_ref, minilm_dir, tmp_path):
  """Their model_best.pth (random weights, tiny BERT, the transformers-4 position_ids
  buffer) -> the converter CLI, family detected, with --bert_path -> inference.load:
  encode_images (images of 2..5 regions) / encode_texts(texts) / score equal their
  evalrank sims; their tokenisation equals ours."""
  ckpt = str(tmp_path / "model_best.pth")
  torch_ref("hrem.save_checkpoint", path=ckpt, opt=OPT, bert=TINY_BERT, seed=2)
  raw = load_checkpoint(ckpt)
  assert "bert.embeddings.position_ids" in raw["model"][1]
  assert hrem_params.detect(raw) and not vse_params.detect(raw)
  summary, matcher, want, got = bert_cli_scores(torch_ref, "hrem", ckpt, tmp_path, minilm_dir,
                                                [5, 2, 4])
  assert summary["model"] == "hrem" and summary["nhead"] == 2
  assert summary["bert"]["num_heads"] == 2 and summary["step"] == 7000
  assert matcher.config.model.hrem.nhead == 2
  t = matcher.config.train
  assert (t.optimizer, t.weight_decay, t.bert_lr_scale, t.lr_milestones) == (
      "adamw", 1e-4, 0.1, "15,25")
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _replay(draws, b):
  """A sampler giving their torch.multinomial draws: {name: (B, B) ids} with entry
  [a, p] = their negative of positive pair (a, p). Names they never drew (the relation
  branch before the warm-up, which jax traces but does not run) get zeros."""
  table = {}
  for name, d in draws:
    assert d is not None, f"{name}: their draw failed (no negative): pick other inputs"
    ids = np.zeros((b, b), np.int32)
    ids[d[0], d[1]] = d[2]
    table[name] = jnp.asarray(ids)
  return lambda key, weights, name: table.get(name, jnp.zeros((b, b), jnp.int32))


def _converted(torch_ref, tmp_path):
  ckpt = str(tmp_path / "model_best.pth")
  torch_ref("hrem.save_checkpoint", path=ckpt, opt=OPT, bert=NO_DROPOUT, seed=6)
  converted = hrem_params.convert(load_checkpoint(ckpt), {"bert_heads": 2},
                                  config=get_base_config())
  cfg = models.build_model(converted.config.model).config
  model = type(models.build_model(converted.config.model))(dataclasses.replace(
      cfg, dropout=0.0, bert=dataclasses.replace(cfg.bert, dropout=0.0)))
  return ckpt, converted, model


@pytest.mark.parametrize("after_warmup,loss", [(False, "trip"), (True, "trip"), (True, "vse")])
def test_training_step_loss_equals_theirs(torch_ref, tmp_path, after_warmup, loss):
  """Train mode on a batch with a repeated image (ids 0, 0, ...: pairs of one image are
  positives), images of 2..6 regions and captions of 2..7 tokens (shorter than topk=4:
  their relevance reads padding there): our GraphLoss equals theirs on the same weights
  (their relation module's random parameters converted) and the same drawn negatives,
  before the warm-up (base triplet loss only) and after it (relation module, three gnn
  losses, reg KL; our batch padded wider than theirs), with the triplet losses and with
  their ContrastiveLoss ('vse', summed violations as their opt.max_violation=False,
  pairs of one image masked). Dropout 0 on both sides. The loss is compiled with all of
  XLA's optimisations, as in a user's run."""
  rng = np.random.default_rng(8)
  ckpt, converted, model = _converted(torch_ref, tmp_path)
  b = 6
  regions, img_lens = images(rng, b, 6, [6, 2, 4, 5, 3, 6])
  regions[1] = regions[0]  # captions 0 and 1 describe one image
  img_lens[1] = img_lens[0]
  image_ids = np.array([0, 0, 1, 2, 3, 4])
  lens = np.array([7, 3, 5, 6, 4, 2])
  ids = random_ids(rng, lens, 30000, low=1000)
  opt = {"dropout": 0.0, "warmup": 3, "topk": 4, "base_loss": loss, "gnn_loss": loss}
  step = 3 if after_warmup else 2
  want = torch_ref("hrem.train_loss", path=ckpt, images=regions, image_lengths=img_lens,
                   captions=ids, lengths=lens, img_ids=image_ids, bert=NO_DROPOUT,
                   iter_count=step, opt=opt, graph_seed=1)
  assert ("gnn" in want["parts"]) == after_warmup
  c = converted.config
  c.model.hrem.dropout, c.model.hrem.warmup, c.model.hrem.topk = 0.0, 3, 4
  c.model.hrem.base_loss = c.model.hrem.gnn_loss = loss
  assert not c.train.max_violation  # their saved opt's
  objective = models.family("hrem").training_objective(c, sampler=_replay(want["draws"], b))
  variables = dict(converted.variables)
  # After the warm-up our batch is padded wider than theirs (10 tokens, 9 regions).
  batch = _batch(regions, img_lens, ids, lens, image_ids, *((10, 9) if after_warmup else ()))
  outputs, upd = jax.jit(lambda v, b: model.apply(
      v, b, train=True, method="training_outputs", mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(0)}))(variables, batch)
  shapes = {f"params/{k}": tuple(v.shape) for k, v in flatten(
      jax.eval_shape(objective.init, jax.random.key(0), outputs)["params"]).items()}
  graph = hrem_params.convert_objective(want["graph"], shapes)
  # Compiled as a user's run compiles it: XLA once fused their connection threshold into a
  # multiply-add there, and the loss moved 0.3 % (docs/models/hrem.md).
  got = float(jax.jit(objective.loss, compiler_options=user_compile())(
      graph, outputs, batch, jnp.int32(step), jax.random.key(1)))
  assert want["loss"] > 0.1
  np.testing.assert_allclose(got, want["loss"], rtol=1e-5, atol=TOL)
  bn = upd["batch_stats"]["img_enc"]["fc"]["mlp"]["bn_0"]
  np.testing.assert_allclose(bn["mean"], want["running_mean"], atol=1e-5)
  np.testing.assert_allclose(bn["var"], want["running_var"], rtol=1e-5, atol=1e-5)


def test_converter_names_bad_layouts(torch_ref, tmp_path):
  """A renamed and a reshaped key are refused naming both the key and our path."""
  bad_image_keys_named(
      torch_ref, tmp_path, "hrem", "aggr.layers.0.linear1.weight",
      ("aggr.layers.0.norm1.weight", "aggr.layers.0.norm_1.weight"),
      ("aggr.layers.0.norm_1.weight", "img_enc/pool/aggr/layers_0/norm1/scale",
       "img_enc.aggr.layers.0.linear1.weight"), {"bert_heads": 2}, opt=OPT, bert=TINY_BERT)


# ----------------------------------------------------- the objective in the train state


def _tiny_config(warmup=0):
  c = get_base_config()
  c.model.name = "hrem"
  s = c.model.hrem
  s.bert_random_init = True
  s.bert.hidden_size, s.bert.num_layers, s.bert.num_heads, s.bert.intermediate_size = 16, 1, 2, 16
  s.bert.vocab_size = 50
  s.nhead, s.topk, s.warmup = 2, 2, warmup
  c.model.embed_size, c.model.img_dim = 8, IMG_DIM
  c.train.optimizer, c.train.weight_decay, c.train.grad_clip = "adamw", 1e-4, 2.0
  c.train.bert_lr_scale, c.train.learning_rate = 0.1, 1e-2
  return c


def _random_batch(rng, b=4):
  lens = np.array([5, 3, 4, 6][:b])
  ids = rng.integers(1, 50, (b, 6)) * (np.arange(6)[None] < lens[:, None])
  return _batch(rng.standard_normal((b, 4, IMG_DIM)).astype(np.float32), np.full(b, 4),
                ids, lens, np.arange(b))


def test_objective_params_are_trained_checkpointed_restored_and_kept_from_inference(tmp_path):
  """The objective's parameters sit under params["objective"]: untouched (no weight
  decay either) before `warmup`, trained from it; the `latest` checkpoint holds them
  and their optimiser state and a resume restores them; `state.variables`, the `best`
  checkpoint and `checkpointing.load_variables` (inference's reader) do not have them."""
  c = _tiny_config(warmup=2)
  model = models.build_model(c.model)
  objective = models.training_objective(c)
  schedule = optim.learning_rate_schedule(c.train, 10, 100)
  tx = optim.make_optimizer(c.train, schedule, (), objective)
  replicated = NamedSharding(train.make_mesh(), P())
  state = train.create_state(model, tx, c, jax.random.PRNGKey(0), replicated,
                             objective=objective)
  first = state.params["objective"]
  assert "objective" not in state.variables["params"]
  step = jax.jit(train.make_train_step(model, tx, c, schedule, (), objective))
  batch = _random_batch(np.random.default_rng(0))
  objective_leaves = lambda s: jax.tree_util.tree_leaves(s.params["objective"])
  for _ in range(2):  # steps 0, 1: before the warm-up
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree_util.tree_leaves(first), objective_leaves(state)):
    np.testing.assert_array_equal(a, b)
  state, _ = step(state, batch)  # step 2: the relation module joins
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(first), objective_leaves(state))]
  assert all(changed)
  wd = str(tmp_path)
  checkpointing.save(wd, checkpointing.LATEST, 3, state, {"step": 3})
  template = jax.tree_util.tree_map(jnp.zeros_like, state)
  restored, _ = checkpointing.restore_for_resume(wd, template)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
  variables, _ = checkpointing.load_variables(wd)  # no best yet: the latest, model only
  assert set(variables["params"]) == {"img_enc", "txt_enc"}
  checkpointing.save(wd, checkpointing.BEST, 3, state.variables, {"step": 3})
  variables, _ = checkpointing.load_variables(wd)
  assert set(variables["params"]) == {"img_enc", "txt_enc"}


def test_a_family_without_objective_keeps_its_state_tree():
  """Families without the hook: no objective, the same TrainState tree as the model's
  variables (the layout their checkpoints have)."""
  c = recipe_config("f30k", "vse_infty")
  assert models.training_objective(c) is None
  c.model.embed_size, c.model.img_dim = 8, IMG_DIM
  s = c.model.vse_infty
  s.bert_random_init = True
  s.bert.hidden_size, s.bert.num_layers, s.bert.num_heads, s.bert.intermediate_size = 8, 1, 2, 8
  s.bert.vocab_size = 50
  model = models.build_model(c.model)
  tx = optim.make_optimizer(c.train, optim.learning_rate_schedule(c.train, 10, 100))
  state = train.create_state(model, tx, c, jax.random.PRNGKey(0),
                             NamedSharding(train.make_mesh(), P()))
  assert set(state.params) == {"img_enc", "txt_enc"}
  assert state.variables["params"] is state.params


def test_adamw_groups_equal_theirs(torch_ref):
  """make_optimizer with an objective (HREM's recipe: AdamW 1e-4, BERT x 0.1, relation
  module x graph_lr_factor, one clip over all, x0.1 at the milestone) equals torch's
  AdamW with their four groups, the relation module without gradients (skipped) for the
  first two steps."""
  c = _tiny_config(warmup=2)
  c.model.hrem.graph_lr_factor = 0.5
  c.train.lr_milestones = "1"
  objective = models.training_objective(c)
  schedule = optim.learning_rate_schedule(c.train, 3, 12)  # x0.1 from step 3 on
  tx = optim.make_optimizer(c.train, schedule, (), objective)
  rng = np.random.default_rng(0)
  shapes = {"text": (4,), "bert": (3, 2), "image": (5,), "graph": (2, 2)}
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  ours = {"txt_enc": {"linear": params["text"], "bert": {"w": params["bert"]}},
          "img_enc": {"fc": params["image"]}, "objective": {"mlp": params["graph"]}}
  grads = [{k: 2 * rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(5)]
  state, p = tx.init(ours), ours
  for i, g in enumerate(grads):
    zero = np.zeros(shapes["graph"], np.float32)
    gt = {"txt_enc": {"linear": g["text"], "bert": {"w": g["bert"]}},
          "img_enc": {"fc": g["image"]}, "objective": {"mlp": g["graph"] if i >= 2 else zero}}
    u, state = tx.update(gt, state, p)
    p = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
  want = torch_ref("hrem.adamw_groups", params=params,
                   grads=[{**g, "graph": g["graph"] if i >= 2 else None}
                          for i, g in enumerate(grads)],
                   lr=1e-2, weight_decay=1e-4, bert_factor=0.1, graph_factor=0.5, clip=2.0,
                   decay_at=[3])
  np.testing.assert_allclose(p["txt_enc"]["linear"], want["text"], atol=1e-6)
  np.testing.assert_allclose(p["txt_enc"]["bert"]["w"], want["bert"], atol=1e-6)
  np.testing.assert_allclose(p["img_enc"]["fc"], want["image"], atol=1e-6)
  np.testing.assert_allclose(p["objective"]["mlp"], want["graph"], atol=1e-6)


# ------------------------------------------------------------------ pieces and recipes


def test_sampler_draws_from_the_weighted_negatives():
  """The default sampler draws [a, p] from row a only where it has weight."""
  w = jnp.array([[0.0, 0.7, 0.3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
  draws = np.stack([np.asarray(obj_lib.sample_negatives(jax.random.key(i), w, "x"))
                    for i in range(200)])
  assert draws.shape == (200, 3, 3)
  assert set(np.unique(draws[:, 0])) == {1, 2} and set(np.unique(draws[:, 1])) == {0}
  assert set(np.unique(draws[:, 2])) == {0, 1}
  assert 0.6 < (draws[:, 0] == 1).mean() < 0.8


def test_recipes_follow_their_readme():
  for dataset, batch, mask_weight, cutoff in (("f30k", 128, 1.0, 1.7), ("coco", 256, 1.5, 1.9)):
    c = recipe_config(dataset, "hrem")
    t, s = c.train, c.model.hrem
    assert (t.optimizer, t.learning_rate, t.num_epochs, t.lr_milestones) == (
        "adamw", 5e-4, 30, "15,25")
    assert (t.batch_size, t.grad_clip, t.weight_decay, t.bert_lr_scale) == (
        batch, 2.0, 1e-4, 0.1)
    assert (s.mask_weight, s.nonzero_loss_cutoff, s.warmup, s.nhead) == (
        mask_weight, cutoff, 8000, 16)
    assert (s.base_loss, s.gnn_loss, s.threshold, s.topk, s.reg_loss_weight) == (
        "trip", "trip", 0.5, 10, 10.0)
    assert c.model.embed_size == 1024 and models.tokenizer_kind(c) == "bert"
    schedule = optim.learning_rate_schedule(t, 100, 3000)
    np.testing.assert_allclose([schedule(s) for s in (1499, 1500, 2499, 2500)],
                               [5e-4, 5e-5, 5e-5, 5e-6], rtol=1e-6)
  assert os.path.exists(os.path.join(os.path.dirname(__file__), "torchref", "hrem.py"))


@pytest.mark.parametrize("key,value", [("nhead", 5), ("threshold", 1.5), ("base_loss", "ce"),
                                       ("region_drop", 1.0)])
def test_validate_names_the_key(key, value):
  c = recipe_config("f30k", "hrem")
  c.model.hrem[key] = value
  with pytest.raises(ValueError, match=f"hrem.{key}"):
    hrem_config.validate(c)

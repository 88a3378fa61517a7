"""DSRAN model behaviour: masking, train vs eval mode, BatchNorm and GRU against PyTorch.

The PyTorch layers run in the jax-free reference process (tests/torchref/layers.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax import models
from dsran_jax.models.variables import init_variables
from dsran_jax.default_config import get_base_config
from dsran_jax.models.common.glove import load_glove
from dsran_jax.models.common.layers import MaskedBatchNorm
from dsran_jax.models.common.text import GRU


def tiny_config(text_encoder="bert", K=2, padding="masked", image_inputs="grid+regions"):
  c = get_base_config()
  m, d = c.model, c.model.dsran
  d.text_encoder, d.K, d.text_padding, d.image_inputs = text_encoder, K, padding, image_inputs
  m.embed_size, m.img_dim, d.pos_dim = 32, 24, 1607
  d.bert_random_init = True
  d.bert.vocab_size, d.bert.hidden_size, d.bert.num_layers = 50, 16, 1
  d.bert.num_heads, d.bert.intermediate_size = 2, 32
  m.word_dim = 12
  return m


def random_batch(rng, b=3, r=5, l=7, img_dim=24, vocab=50, grid=True):
  batch = {
      "regions": rng.standard_normal((b, r, img_dim)).astype(np.float32),
      "region_pos": rng.standard_normal((b, r, 1607)).astype(np.float32),
      "region_mask": np.ones((b, r), bool),
      "input_ids": rng.integers(1, vocab, (b, l)).astype(np.int32),
      "attention_mask": np.ones((b, l), np.int32),
  }
  if grid:
    batch["grid"] = rng.standard_normal((b, 49, img_dim)).astype(np.float32)
  return batch


def init(model_cfg, vocab_size=50):
  model = models.build_model(model_cfg, vocab_size=vocab_size)
  variables = init_variables(model, jax.random.PRNGKey(0))
  # Non-trivial running statistics so eval mode is a real test of using them.
  stats = jax.tree_util.tree_map(
      lambda x: x + 0.3 * jnp.abs(jax.random.normal(jax.random.PRNGKey(1), x.shape)),
      variables["batch_stats"])
  return model, {**variables, "batch_stats": stats}


def embed_images(model, variables, batch):
  keys = ("grid", "regions", "region_pos", "region_mask")
  fn = jax.jit(lambda v, b: model.apply(v, **b, method=model.embed_images))
  return np.asarray(fn(variables, {k: batch[k] for k in keys if k in batch}))


def embed_texts(model, variables, batch):
  fn = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=model.embed_texts))
  return np.asarray(fn(variables, batch["input_ids"], batch["attention_mask"]))


def apply(model, variables, batch):
  """Jitted eval-mode (image, text) embeddings (one compile instead of op-by-op dispatch)."""
  return jax.jit(lambda v, b: (model.apply(v, b, method="encode_images"),
                               model.apply(v, b, method="encode_texts")))(variables, batch)


@pytest.mark.parametrize("K", [pytest.param(1, marks=pytest.mark.slow), 2,
                               pytest.param(4, marks=pytest.mark.slow)])
def test_embeddings_are_unit_norm_and_keys(K):
  model, variables = init(tiny_config(K=K))
  img, txt = apply(model, variables, random_batch(np.random.default_rng(0)))
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
  jsr = set(variables["params"]["jsr"])
  assert {f"gat_{k}" for k in range(K)} <= jsr
  assert ("fusion" in jsr) == (K > 1) and ("fusion_a" in jsr) == (K == 4)


@pytest.mark.parametrize("text_encoder", ["bert", "gru"])
def test_padding_does_not_change_embeddings_in_masked_mode(text_encoder):
  rng = np.random.default_rng(1)
  model, variables = init(tiny_config(text_encoder))
  batch = random_batch(rng)
  batch["attention_mask"][2, 4:] = 0  # one shorter caption inside the batch
  padded = dict(batch)
  # Three extra regions and five extra tokens of garbage, masked out.
  padded["regions"] = np.concatenate([batch["regions"], rng.standard_normal((3, 3, 24))], 1).astype(np.float32)
  padded["region_pos"] = np.concatenate([batch["region_pos"], rng.standard_normal((3, 3, 1607))], 1).astype(np.float32)
  padded["region_mask"] = np.concatenate([batch["region_mask"], np.zeros((3, 3), bool)], 1)
  padded["input_ids"] = np.concatenate([batch["input_ids"], rng.integers(1, 50, (3, 5))], 1).astype(np.int32)
  padded["attention_mask"] = np.concatenate([batch["attention_mask"], np.zeros((3, 5), np.int32)], 1)
  np.testing.assert_allclose(embed_images(model, variables, padded),
                             embed_images(model, variables, batch), atol=1e-5)
  np.testing.assert_allclose(embed_texts(model, variables, padded),
                             embed_texts(model, variables, batch), atol=1e-5)
  # The authors' reference mode lets the short caption's padding in, so the mask is what
  # hides it.
  ref_model = models.build_model(tiny_config(text_encoder, padding="reference"), vocab_size=50)
  diff = np.abs(embed_texts(ref_model, variables, batch) - embed_texts(model, variables, batch))
  assert diff[2].max() > 1e-3


def test_masked_batchnorm_statistics_skip_padding_in_train_mode():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  bn = MaskedBatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, mask, False)
  y, upd = bn.apply(v, x, mask, True, mutable=["batch_stats"])
  real = x[mask]
  np.testing.assert_allclose(np.asarray(y)[mask], (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5),
                             atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * real.var(0, ddof=1), atol=1e-6)


def test_batchnorm_and_dropout_modes_match_pytorch(torch_ref):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 5, 8)).astype(np.float32)
  bn = MaskedBatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, None, False)
  # A fresh torch.nn.BatchNorm1d(8): 3 train-mode calls, then eval mode.
  ref = torch_ref("layers.batchnorm1d", x=x, train_steps=3)
  stats = variables["batch_stats"]
  for ty in ref["train"]:  # running stats accumulate the same way (momentum 0.1, unbiased var)
    y, upd = bn.apply({**variables, "batch_stats": stats}, x, None, True, mutable=["batch_stats"])
    stats = upd["batch_stats"]
    np.testing.assert_allclose(np.asarray(y), ty, atol=1e-5)
  np.testing.assert_allclose(stats["mean"], ref["running_mean"], atol=1e-6)
  np.testing.assert_allclose(stats["var"], ref["running_var"], atol=1e-6)
  y_eval = bn.apply({**variables, "batch_stats": stats}, x, None, False)
  np.testing.assert_allclose(np.asarray(y_eval), ref["eval"], atol=1e-5)

  model, variables = init(tiny_config())
  batch = random_batch(rng)
  train_fn = jax.jit(lambda r: model.apply(variables, batch, train=True, rngs={"dropout": r},
                                           mutable=["batch_stats"])[0][0])
  run = lambda seed: train_fn(jax.random.PRNGKey(seed))
  assert np.abs(np.asarray(run(0)) - np.asarray(run(1))).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(run(0)), np.asarray(run(0)))
  eval_img = lambda: np.asarray(apply(model, variables, batch)[0])
  np.testing.assert_array_equal(eval_img(), eval_img())


def test_gru_matches_pytorch_packed_sequences(torch_ref):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 6, 5)).astype(np.float32)
  lengths = np.array([6, 4, 2])
  mask = np.arange(6)[None] < lengths[:, None]
  # torch.nn.GRU(5, 8, batch_first=True) over the packed sequences, and its weights.
  ref = torch_ref("layers.gru_packed", x=x, lengths=lengths, hidden=8, seed=0)
  ours = GRU(8).apply({"params": ref["params"]}, x, mask)
  np.testing.assert_allclose(np.asarray(ours), ref["out"], atol=1e-5)


def test_regions_only_build_and_bad_config():
  model, variables = init(tiny_config(image_inputs="regions"))
  batch = random_batch(np.random.default_rng(5), grid=False)
  img, _ = apply(model, variables, batch)
  assert img.shape == (3, 32) and "grid_enc" not in variables["params"]
  with pytest.raises(ValueError, match="model.dsran.K"):
    models.build_model(tiny_config(K=3))
  full, full_vars = init(tiny_config())
  with pytest.raises(ValueError, match="grid"):
    full.apply(full_vars, batch)


def test_glove_initialisation_from_a_local_file(tmp_path):
  model, variables = init(tiny_config("gru"), vocab_size=6)
  path = tmp_path / "glove.txt"
  vecs = np.arange(2 * 12, dtype=np.float32).reshape(2, 12) / 10
  path.write_text("dog " + " ".join(map(str, vecs[0])) + "\n"
                  "t-shirt " + " ".join(map(str, vecs[1])) + "\n", encoding="utf-8")
  word2idx = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4, "t-shirt": 5}
  before = np.asarray(variables["params"]["text_enc"]["embed"]["embedding"])
  after = np.asarray(load_glove(variables, str(path), word2idx)
                     ["params"]["text_enc"]["embed"]["embedding"])
  np.testing.assert_allclose(after[4], vecs[0], rtol=1e-6)
  np.testing.assert_allclose(after[5], vecs[1], rtol=1e-6)
  np.testing.assert_array_equal(after[:4], before[:4])  # words GloVe lacks keep their init
  path.write_text("dog 1 2 3\n", encoding="utf-8")
  with pytest.raises(ValueError, match="glove.txt:1"):
    load_glove(variables, str(path), word2idx)

"""BertEncoder and its HF weight map: parity with transformers' PyTorch BertModel.

transformers' BertModel runs in the jax-free reference process (tests/torchref/bert.py);
torch and transformers are never imported here.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsran_jax.models.common import bert

SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a red ball in the snow.",
    "a child in a pink dress is climbing up a set of stairs in an entry way .",
    "Several people sit at a long wooden table outside a restaurant at night while waiters "
    "carry plates of food, drinks and desserts between the crowded tables.",  # truncated
]
MAX_LEN = 32

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=40, type_vocab_size=2,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1)


def _apply(config, params, ids, mask=None, dtype=jnp.float32, **kw):
  model = bert.BertEncoder(config, dtype=dtype)
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                None if mask is None else jnp.asarray(mask), **kw),
                    dtype=np.float32)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  config, params = bert.load_hf_bert(minilm_dir)
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))
  tok.enable_truncation(MAX_LEN)
  tok.enable_padding(length=MAX_LEN, pad_id=0)
  enc = tok.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  assert mask[:, -1].sum() == 1 and (mask == 0).any()  # one truncated, the rest padded
  return config, params, ids, mask, str(minilm_dir)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
def test_minilm_parity(minilm, masked, torch_ref):
  config, params, ids, mask, minilm_dir = minilm
  mask = mask if masked else None
  ours = _apply(config, params, ids, mask)
  ref = torch_ref("bert.pretrained_last_hidden", model_dir=minilm_dir, ids=ids, mask=mask)
  assert ours.shape == ref.shape == (len(SENTENCES), MAX_LEN, 384)
  diff = np.abs(ours - ref).max()
  print(f"MiniLM {'masked' if masked else 'unmasked'} max|diff| = {diff:.2e}")
  assert diff <= 1e-4


def test_minilm_config_and_tree(minilm):
  config, params, *_ = minilm
  assert config == bert.BertConfig(vocab_size=30522, hidden_size=384, num_layers=6,
                                   num_heads=12, intermediate_size=1536, max_position=512,
                                   type_vocab_size=2)
  assert set(params) == {"embeddings"} | {f"layer_{i}" for i in range(6)}
  assert params["layer_0"]["attention"]["query"]["kernel"].shape == (384, 384)
  assert params["layer_0"]["intermediate"]["kernel"].shape == (384, 1536)
  assert params["layer_5"]["output_LayerNorm"]["scale"].dtype == np.float32


def test_minilm_bf16_close_to_fp32(minilm):
  config, params, ids, mask, _ = minilm
  ref = _apply(config, params, ids, mask)
  out = _apply(config, params, ids, mask, dtype=jnp.bfloat16)
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  print(f"MiniLM bf16 relative error = {rel:.2e}")
  assert np.isfinite(out).all() and rel <= 5e-2


def _rename_gamma_beta(state):
  out = {}
  for k, v in state.items():
    if ".LayerNorm." in k:
      k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
    out[k] = v
  return out


@pytest.fixture(scope="module")
def tiny_inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, TINY["vocab_size"], (3, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  return ids, mask


@pytest.mark.parametrize("variant", ["plain", "bert_prefix_heads", "gamma_beta"])
def test_tiny_random_parity(variant, tiny_inputs, torch_ref):
  ids, mask = tiny_inputs
  # Every parameter ~ N(0, 0.3): the default init (LayerNorm = (1, 0), zero biases) would
  # hide a mis-mapping. bert_prefix_heads: a BertForPreTraining's state dict, outputs of
  # its .bert.
  ref = torch_ref("bert.tiny_random", config=TINY, variant=variant, ids=ids, masks=[mask, None])
  state = ref["state"]
  if variant == "bert_prefix_heads":
    # `bert.` prefix plus pooler and cls.* pretraining heads, which must be skipped.
    assert any(k.startswith("cls.") for k in state)
    assert any(k.startswith("bert.pooler.") for k in state)
  if variant == "gamma_beta":
    state = _rename_gamma_beta(state)
  config = bert.BertConfig.from_hf_json(TINY)
  params = bert.hf_state_dict_to_params(state, config)
  for m, want in zip((mask, None), ref["outputs"]):
    diff = np.abs(_apply(config, params, ids, m) - want).max()
    assert diff <= 1e-4, (variant, m is None, diff)


@pytest.fixture(scope="module")
def tiny_state(torch_ref):
  """The tiny random BertModel's state dict (numpy), from the reference process."""
  return torch_ref("bert.tiny_random_state", config=TINY)


def test_unexpected_and_missing_keys_are_named(tiny_state):
  state = dict(tiny_state)
  del state["encoder.layer.1.intermediate.dense.bias"]
  state["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
  state["encoder.layer.2.output.dense.bias"] = np.zeros(32, np.float32)  # config has 2 layers
  with pytest.raises(ValueError) as e:
    bert.hf_state_dict_to_params(state, bert.BertConfig.from_hf_json(TINY))
  msg = str(e.value)
  assert "encoder.layer.0.attention.self.rotary.weight" in msg
  assert "encoder.layer.2.output.dense.bias" in msg
  assert "layer_1/intermediate/bias" in msg


def test_wrong_shape_is_named(tiny_state):
  config = bert.BertConfig.from_hf_json(dict(TINY, vocab_size=101))
  shapes = r"embeddings\.word_embeddings\.weight.*\(100, 32\).*\(101, 32\)"
  with pytest.raises(ValueError, match=shapes):
    bert.hf_state_dict_to_params(tiny_state, config)


def test_duplicate_keys_rejected(tiny_state):
  state = dict(tiny_state, **{"bert.pooler.dense.bias": np.zeros(32, np.float32),
                              "bert.embeddings.LayerNorm.gamma": np.ones(32, np.float32)})
  with pytest.raises(ValueError, match="same param"):
    bert.hf_state_dict_to_params(state, bert.BertConfig.from_hf_json(TINY))


def test_config_rejects_unsupported():
  with pytest.raises(ValueError, match="hidden_act"):
    bert.BertConfig.from_hf_json(dict(TINY, hidden_act="gelu_new"))
  with pytest.raises(ValueError, match="position_embedding_type"):
    bert.BertConfig.from_hf_json(dict(TINY, position_embedding_type="relative_key"))


def test_load_state_dict_files(tmp_path, tiny_state, torch_ref):
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
    bert.load_hf_state_dict(tmp_path)
  torch_ref("checkpoints.save", path=str(tmp_path / "pytorch_model.bin"), content=tiny_state)
  loaded = bert.load_hf_state_dict(tmp_path)
  assert loaded.keys() == tiny_state.keys()
  np.testing.assert_array_equal(loaded["embeddings.word_embeddings.weight"],
                                tiny_state["embeddings.word_embeddings.weight"])


def test_dropout_only_in_train(tiny_state, tiny_inputs):
  ids, mask = tiny_inputs
  config = bert.BertConfig.from_hf_json(TINY)
  params = bert.hf_state_dict_to_params(tiny_state, config)
  run = lambda seed: _apply(config, params, ids, mask, train=True,
                            rngs={"dropout": jax.random.key(seed)})
  a, b = run(0), run(1)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, run(0))
  eval_a = _apply(config, params, ids, mask)
  np.testing.assert_array_equal(eval_a, _apply(config, params, ids, mask, train=False,
                                               rngs={"dropout": jax.random.key(1)}))
  assert not np.allclose(a, eval_a)


def test_too_long_input_is_an_error(tiny_state):
  config = bert.BertConfig.from_hf_json(TINY)
  params = bert.hf_state_dict_to_params(tiny_state, config)
  with pytest.raises(ValueError, match="max_position"):
    _apply(config, params, np.ones((1, 41), np.int32))

"""DSRAN model: build from a config, initialise, load pretrained BERT weights."""
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsran_jax.models.dsran import DSRAN, GRID_NODES, DSRANConfig
from dsran_jax.models.glove import load_glove


def bert_config_from(model_config):
  """The BertConfig a config asks for: model.bert.* if random init, else config.json."""
  from dsran_jax.models.bert import BertConfig
  if model_config.bert_random_init:
    b = model_config.bert
    return BertConfig(vocab_size=b.vocab_size, hidden_size=b.hidden_size,
                      num_layers=b.num_layers, num_heads=b.num_heads,
                      intermediate_size=b.intermediate_size, max_position=b.max_position,
                      type_vocab_size=b.type_vocab_size)
  from dsran_jax.hub import resolve_pretrained_dir
  return BertConfig.from_hf_json(resolve_pretrained_dir(model_config.bert_path) / "config.json")


def model_config_from(model_config, vocab_size: Optional[int] = None) -> DSRANConfig:
  """Turns `config.model` (ml_collections) into the hashable DSRANConfig."""
  m = model_config
  bert = bert_config_from(m) if m.text_encoder == "bert" else None
  return DSRANConfig(
      embed_size=m.embed_size, K=m.K, text_encoder=m.text_encoder,
      image_inputs=m.image_inputs, img_dim=m.img_dim, pos_dim=m.pos_dim,
      use_region_pos=m.use_region_pos, gat_heads=m.gat_heads, gat_dropout=m.gat_dropout,
      gat_layers=m.gat_layers, text_padding=m.text_padding, dtype=m.dtype, bert=bert,
      vocab_size=vocab_size or m.vocab_size, word_dim=m.word_dim)


def build_model(model_config, vocab_size: Optional[int] = None) -> DSRAN:
  """The DSRAN module for `config.model` (GRU build: `vocab_size` from the vocabulary)."""
  cfg = model_config if isinstance(model_config, DSRANConfig) else model_config_from(
      model_config, vocab_size)
  return DSRAN(cfg)


def dummy_batch(cfg: DSRANConfig, batch_size: int = 2, num_regions: int = 4,
                max_len: int = 8) -> dict:
  """A zero batch with every key and shape the model takes (for init and shape checks)."""
  batch = {
      "regions": np.zeros((batch_size, num_regions, cfg.img_dim), np.float32),
      "region_pos": np.zeros((batch_size, num_regions, cfg.pos_dim), np.float32),
      "region_mask": np.ones((batch_size, num_regions), bool),
      "input_ids": np.ones((batch_size, max_len), np.int32),
      "attention_mask": np.ones((batch_size, max_len), np.int32),
  }
  if cfg.image_inputs == "grid+regions":
    batch["grid"] = np.zeros((batch_size, GRID_NODES, cfg.img_dim), np.float32)
  return batch


def init_variables(model: DSRAN, rng) -> dict:
  """Randomly initialised {'params', 'batch_stats'}."""
  params_rng, dropout_rng = jax.random.split(rng)
  return jax.jit(lambda r1, r2: model.init({"params": r1, "dropout": r2},
                                           dummy_batch(model.config), train=False))(
                                               params_rng, dropout_rng)


def load_pretrained_bert(variables: dict, model_config) -> dict:
  """Replaces the BERT weights in `variables` with the pretrained ones at model.bert_path."""
  from dsran_jax.models.bert import load_hf_bert
  _, bert_params = load_hf_bert(model_config.bert_path)
  params = dict(variables["params"])
  text = dict(params["text_enc"])
  expected = jax.tree_util.tree_map(jnp.shape, text["bert"])
  got = jax.tree_util.tree_map(np.shape, bert_params)
  if expected != got:
    raise ValueError(f"pretrained BERT at {model_config.bert_path!r} does not match the "
                     f"model's BERT shapes:\nexpected {json.dumps(expected, default=str)[:500]}"
                     f"\ngot {json.dumps(got, default=str)[:500]}")
  text["bert"] = jax.tree_util.tree_map(jnp.asarray, bert_params)
  params["text_enc"] = text
  return {**variables, "params": params}


def jitted_embedders(model: DSRAN):
  """Jitted eval-mode `(image_fn, text_fn)`, each `(variables, batch dict) -> (B, E)`."""
  image_fn = jax.jit(lambda v, b: model.apply(v, **b, train=False, method=model.embed_images))
  text_fn = jax.jit(lambda v, b: model.apply(v, **b, train=False, method=model.embed_texts))
  return image_fn, text_fn


__all__ = ["DSRAN", "DSRANConfig", "build_model", "model_config_from", "dummy_batch",
           "init_variables", "load_pretrained_bert", "load_glove", "jitted_embedders", "GRID_NODES"]

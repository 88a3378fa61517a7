"""DSRAN (Wen, Gu & Cheng, TCSVT 2021): the family's module builder and weight hooks."""
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsran_jax.models.dsran.model import DSRAN, GRID_NODES, DSRANConfig
from dsran_jax.core.text_policy import TextPolicy


def bert_config_from(model_config):
  """The BertConfig a config asks for: model.bert.* if random init, else config.json."""
  from dsran_jax.models.common.bert import BertConfig  # pylint: disable=g-import-not-at-top
  if model_config.bert_random_init:
    b = model_config.bert
    return BertConfig(vocab_size=b.vocab_size, hidden_size=b.hidden_size,
                      num_layers=b.num_layers, num_heads=b.num_heads,
                      intermediate_size=b.intermediate_size, max_position=b.max_position,
                      type_vocab_size=b.type_vocab_size)
  from dsran_jax.hub import resolve_pretrained_dir  # pylint: disable=g-import-not-at-top
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


def build(model_config, vocab_size: Optional[int] = None) -> DSRAN:
  """The DSRAN module for `config.model` (GRU build: `vocab_size` from the vocabulary)."""
  cfg = model_config if isinstance(model_config, DSRANConfig) else model_config_from(
      model_config, vocab_size)
  return DSRAN(cfg)


def load_pretrained_bert(variables: dict, model_config) -> dict:
  """Replaces the BERT weights in `variables` with the pretrained ones at model.bert_path."""
  from dsran_jax.models.common.bert import load_hf_bert  # pylint: disable=g-import-not-at-top
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


def load_pretrained(variables: dict, config, workdir: Optional[str] = None) -> dict:
  """BERT build: the pretrained BERT at model.bert_path (unless bert_random_init);
  GRU build: GloVe rows for the vocabulary when model.glove_path is set."""
  m = config.model
  if m.text_encoder == "bert" and not m.bert_random_init:
    return load_pretrained_bert(variables, m)
  if m.text_encoder == "gru":
    from dsran_jax.models.common.glove import load_configured_glove  # pylint: disable=g-import-not-at-top
    return load_configured_glove(variables, config, workdir)
  return variables


def text_policy(model: DSRAN, config):
  """How inference batches captions (see `core.text_policy.TextPolicy`). Reference padding
  (converted checkpoints) reproduces the authors' batching exactly:
  - BERT build: ids are zero-padded to `data.max_len` (32) and every position is
    attended to and averaged; longer `input_ids` are an error.
  - GRU build: each eval batch is padded to its longest caption and the text graph spans
    that length, so a caption's embedding depends on its batch; captions are cut, in the
    order given, into groups of `eval.batch_size` (the converter sets it to their
    `opt.batch_size`), exactly as their unshuffled eval loader does, and not truncated.
  """
  c = model.config
  reference = c.text_padding == "reference"
  if c.bert_build:
    return TextPolicy(max_width=int(config.data.max_len) if reference else None,
                      max_positions=c.bert.max_position)
  if reference:
    return TextPolicy(group=int(config.eval.batch_size), untruncated=True)
  return TextPolicy()


def figures(workdir: str, config, encoder=None) -> dict:
  """The family's figure hook (see `dsran_jax.plots.evaluation_figures`)."""
  from dsran_jax.models.dsran import attention  # pylint: disable=g-import-not-at-top
  return attention.figures(workdir, config, encoder=encoder)


__all__ = ["DSRAN", "DSRANConfig", "GRID_NODES", "build", "load_pretrained",
           "load_pretrained_bert", "model_config_from", "bert_config_from"]

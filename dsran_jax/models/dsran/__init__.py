"""DSRAN (Wen, Gu & Cheng, TCSVT 2021): the family's module builder and weight hooks."""
from typing import Optional

import jax
import jax.numpy as jnp

from dsran_jax import models
from dsran_jax.core.text_policy import TextPolicy
from dsran_jax.models.common.bert import BertConfig, bert_config_of, with_pretrained_bert
from dsran_jax.models.common import layers, resnet
from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.dsran.attention import jsr_attention
from dsran_jax.models.dsran.config import ONLINE, OPTIONS
from dsran_jax.models.dsran.model import DSRAN, GRID_NODES, DSRANConfig


def bert_config_from(model_config) -> BertConfig:
  """The BertConfig of the BERT build (`common.bert.bert_config_of` of model.dsran)."""
  return bert_config_of(model_config.dsran, "dsran")


def model_config_from(model_config, vocab_size: Optional[int] = None) -> DSRANConfig:
  """Turns `config.model` (ml_collections) into the hashable DSRANConfig."""
  m = model_config
  bert = bert_config_from(m) if m.dsran.text_encoder == "bert" else None
  return OPTIONS.module_config(DSRANConfig, m, vocab_size, dtype=layers.compute_dtype(m), bert=bert)


def build(model_config, vocab_size: Optional[int] = None) -> DSRAN:
  """The DSRAN module for `config.model` (GRU build: `vocab_size` from the vocabulary)."""
  cfg = model_config if isinstance(model_config, DSRANConfig) else model_config_from(
      model_config, vocab_size)
  return DSRAN(cfg)


def load_pretrained_bert(variables: dict, model_config) -> dict:
  """Replaces the BERT weights in `variables` with the pretrained ones at
  model.dsran.bert_path."""
  return with_pretrained_bert(variables, model_config.dsran.bert_path, "text_enc")


def load_pretrained_cnn(variables: dict, model_config) -> dict:
  """Replaces the online grid's ResNet (`params/cnn`, `batch_stats/cnn`) in `variables`
  with the torchvision state dict at model.dsran.cnn_weights (`.safetensors` or a
  `torch.save` file; any `module.` prefix; `fc.*` and step counters ignored), running
  statistics included. Raises ValueError naming the file and every key or shape that
  does not fit the configured ResNet."""
  path = model_config.dsran.cnn_weights
  expected = model_config_from(model_config).resnet
  _, cnn = resnet.load_weights(path, config=expected)
  out = dict(variables)
  for collection in ("params", "batch_stats"):
    tree = dict(out[collection])
    tree["cnn"] = jax.tree_util.tree_map(jnp.asarray, cnn[collection])
    out[collection] = tree
  return out


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """BERT build: the pretrained BERT at model.dsran.bert_path (unless
  bert_random_init); GRU build: GloVe rows for the word vocabulary `vocab` when
  model.glove_path is set; online grid: the ResNet at model.dsran.cnn_weights (unless
  cnn_random_init)."""
  d = config.model.dsran
  if d.text_encoder == "bert" and not d.bert_random_init:
    variables = load_pretrained_bert(variables, config.model)
  if d.text_encoder == "gru":
    variables = load_configured_glove(variables, config, vocab)
  if d.image_inputs == ONLINE and not d.cnn_random_init:
    variables = load_pretrained_cnn(variables, config.model)
  return variables


def text_policy(model: DSRAN, config):
  """How inference batches captions (see `core.text_policy.TextPolicy`). Reference padding
  (converted checkpoints) reproduces the authors' batching exactly:
  - BERT build: ids are zero-padded to exactly the cut (`models.caption_cap`: their 32)
    and every position is attended to and averaged; longer `input_ids` are an error.
  - GRU build: each eval batch is padded to its longest caption and the text graph spans
    that length, so a caption's embedding depends on its batch; captions are cut, in the
    order given, into groups of `eval.batch_size` (the converter sets it to their
    `opt.batch_size`), exactly as their unshuffled eval loader does, and not truncated.
  """
  c = model.config
  reference = c.text_padding == "reference"
  if c.bert_build:
    fixed = models.caption_cap(config) if models.pads_to_cap(config) else None
    return TextPolicy(fixed_width=fixed, max_positions=c.bert.max_position)
  if reference:
    return TextPolicy(group=int(config.eval.batch_size))
  return TextPolicy()


# The attention-figure hook (`dsran_jax.figures.attention`): the first JSR block's
# attention over the grid cells and regions of some images.
attention_maps = jsr_attention


__all__ = ["DSRAN", "DSRANConfig", "GRID_NODES", "attention_maps", "bert_config_from", "build",
           "load_pretrained", "load_pretrained_bert", "load_pretrained_cnn", "model_config_from"]

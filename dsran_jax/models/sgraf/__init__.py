"""SGRAF (Diao et al., AAAI 2021; Paranioar/SGRAF): the family's module builder and
weight hooks. Options: `config.model.sgraf` (see config.py)."""
from typing import Optional

from dsran_jax.models.common import layers
from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.sgraf.similarity import Extensions
from dsran_jax.models.sgraf.config import OPTIONS
from dsran_jax.models.sgraf.model import SGRAF, SgrafConfig


def model_config_from(model_config, vocab_size: Optional[int] = None,
                      ext: Extensions = Extensions()) -> SgrafConfig:
  """Turns `config.model` (ml_collections) into the hashable SgrafConfig (`ext`: the
  KIDRR per-pair modules, off for SGRAF)."""
  return OPTIONS.module_config(SgrafConfig, model_config, vocab_size,
                               dtype=layers.compute_dtype(model_config), ext=ext)


def build(model_config, vocab_size: Optional[int] = None) -> SGRAF:
  """The SGRAF module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, SgrafConfig) else model_config_from(
      model_config, vocab_size)
  return SGRAF(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """SGRAF trains its word embeddings from U(-0.1, 0.1); with `model.glove_path` set,
  the vocabulary's GloVe rows replace them (an option beyond the authors' recipe)."""
  return load_configured_glove(variables, config, vocab, module="txt_enc")


__all__ = ["SGRAF", "SgrafConfig", "build", "load_pretrained", "model_config_from"]

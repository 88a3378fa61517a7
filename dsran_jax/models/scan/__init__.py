"""SCAN (Lee et al., ECCV 2018; kuanghuei/SCAN): the family's module builder and weight
hooks. Options: `config.model.scan` (see config.py)."""
from typing import Optional

from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.scan.config import OPTIONS
from dsran_jax.models.scan.model import SCAN, ScanConfig


def model_config_from(model_config, vocab_size: Optional[int] = None) -> ScanConfig:
  """Turns `config.model` (ml_collections) into the hashable ScanConfig."""
  return OPTIONS.module_config(ScanConfig, model_config, vocab_size)


def build(model_config, vocab_size: Optional[int] = None) -> SCAN:
  """The SCAN module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, ScanConfig) else model_config_from(
      model_config, vocab_size)
  return SCAN(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """SCAN trains its word embeddings from U(-0.1, 0.1); with `model.glove_path` set, the
  vocabulary's GloVe rows replace them (an option beyond the authors' recipe)."""
  return load_configured_glove(variables, config, vocab, module="txt_enc")


__all__ = ["SCAN", "ScanConfig", "build", "load_pretrained", "model_config_from"]

"""BSSAN-R (the reconstruction of Huang et al., IEEE TIP 2019, in docs/models/bssan.md):
the family's module builder and weight hooks. Options: `config.model.bssan`
(see config.py). No checkpoints of the authors exist, so there is no converter."""
from typing import Optional

from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.bssan.config import OPTIONS
from dsran_jax.models.bssan.model import BSSAN, BssanConfig


def model_config_from(model_config, vocab_size: Optional[int] = None) -> BssanConfig:
  """Turns `config.model` (ml_collections) into the hashable BssanConfig."""
  return OPTIONS.module_config(BssanConfig, model_config, vocab_size)


def build(model_config, vocab_size: Optional[int] = None) -> BSSAN:
  """The BSSAN module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, BssanConfig) else model_config_from(
      model_config, vocab_size)
  return BSSAN(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """Word embeddings start from U(-0.1, 0.1); with `model.glove_path` set, the
  vocabulary's GloVe rows replace them (optional: docs/models/bssan.md, "Encoders")."""
  return load_configured_glove(variables, config, vocab, module="txt_enc")


__all__ = ["BSSAN", "BssanConfig", "build", "load_pretrained", "model_config_from"]

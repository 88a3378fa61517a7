"""MLASM (ICANN 2022; xiaohu306/MLASM): the family's module builder and weight hooks.
Options: `config.model.mlasm` (see config.py); the model and its two global modes:
model.py; the converter of the authors' checkpoints (ResNet weights included): params.py.
"""
from typing import Optional

from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.mlasm.config import OPTIONS
from dsran_jax.models.mlasm.model import MLASM, MlasmConfig


def model_config_from(model_config, vocab_size: Optional[int] = None) -> MlasmConfig:
  """Turns `config.model` (ml_collections) into the hashable MlasmConfig."""
  return OPTIONS.module_config(MlasmConfig, model_config, vocab_size)


def build(model_config, vocab_size: Optional[int] = None) -> MLASM:
  """The MLASM module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, MlasmConfig) else model_config_from(
      model_config, vocab_size)
  return MLASM(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """The authors initialise the word embeddings from GloVe (torchtext's glove.840B.300d,
  with their word-hit trick; rows not found keep PyTorch's N(0, 1)): with
  `model.glove_path` set to that text file, the vocabulary's rows are copied in.
  Without it the embeddings start from N(0, 1) alone (a deviation; say so in results)."""
  return load_configured_glove(variables, config, vocab, module="word_enc")


__all__ = ["MLASM", "MlasmConfig", "build", "load_pretrained", "model_config_from"]

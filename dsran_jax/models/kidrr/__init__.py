"""KIDRR (Xie et al., IPM 2023), reconstructed on the SGRAF core (docs/models/kidrr.md):
the family's module builder and weight hooks. Options: `config.model.sgraf` (the core)
and `config.model.kidrr` (the KIDRR switches; see config.py)."""
from typing import Optional

from dsran_jax.models import sgraf
from dsran_jax.models.kidrr.config import OPTIONS
from dsran_jax.models.kidrr.model import KIDRR, KidrrConfig


def kidrr_config_from(model_config) -> KidrrConfig:
  """The KIDRR switches of `config.model.kidrr`."""
  return KidrrConfig(**OPTIONS.values(model_config))


def build(model_config, vocab_size: Optional[int] = None) -> KIDRR:
  """The KIDRR module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  k = kidrr_config_from(model_config)
  core = sgraf.model_config_from(model_config, vocab_size, ext=k.extensions)
  return KIDRR(core, k)


load_pretrained = sgraf.load_pretrained

__all__ = ["KIDRR", "KidrrConfig", "build", "kidrr_config_from", "load_pretrained"]

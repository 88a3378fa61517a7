"""KIDRR (Xie et al., IPM 2023), reconstructed on the SGRAF core (MODELS.md section 4):
the family's module builder and weight hooks. Options: `config.model.sgraf` (the core)
and `config.model.kidrr` (the KIDRR switches; see config.py)."""
from typing import Optional

from dsran_jax.models import sgraf
from dsran_jax.models.common.similarity import Extensions
from dsran_jax.models.kidrr.model import KIDRR, KgidConfig


def extensions_from(model_config) -> Extensions:
  """The per-pair KIDRR modules `config.model.kidrr` switches on."""
  k = model_config.kidrr
  return Extensions(i2t=bool(k.i2t), lambda_i2t=float(k.lambda_i2t),
                    global_local=bool(k.global_local), blend=str(k.rgr_blend),
                    topk=int(k.rgr_topk), residual=bool(k.rgr_residual),
                    saf_steps=int(k.saf_steps))


def build(model_config, vocab_size: Optional[int] = None) -> KIDRR:
  """The KIDRR module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  core = sgraf.model_config_from(model_config, vocab_size, ext=extensions_from(model_config))
  k = model_config.kidrr
  return KIDRR(core, KgidConfig(steps=int(k.kgid_steps), share_steps=bool(k.kgid_share_steps)))


load_pretrained = sgraf.load_pretrained
text_policy = sgraf.text_policy

__all__ = ["KIDRR", "KgidConfig", "build", "extensions_from", "load_pretrained",
           "text_policy"]

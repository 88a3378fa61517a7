"""KIDRR's checkpoint hook for `tools.convert_torch`. The authors released no code or
weights, so no checkpoint is recognised as KIDRR (`detect` is always False). With
`--model=kidrr`, an SGRAF checkpoint (Paranioar/SGRAF layout, see sgraf/params.py)
becomes a KIDRR workdir with every KIDRR module off: the same variables as SGRAF, the
same scores, and a starting point for fine-tuning with modules switched on."""
from typing import Any, Mapping, Optional

from dsran_jax.models.kidrr import config as kidrr_config
from dsran_jax.models.sgraf import params as sgraf_params
from dsran_jax.convert.engine import ConversionError, Converted

FAMILY = "kidrr"


def detect(ckpt: Mapping[str, Any]) -> bool:
  """Always False: no KIDRR checkpoint layout exists (pass --model=kidrr)."""
  del ckpt
  return False


def convert(ckpt: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None, *,
            config) -> Converted:
  """An SGRAF checkpoint as a KIDRR workdir with every module off (module docstring);
  `config` is the base config to fill in (see `sgraf.params.convert`)."""
  if not sgraf_params.detect(ckpt):
    raise ConversionError("KIDRR has no released checkpoints; --model=kidrr converts an "
                          "SGRAF checkpoint (model = [img_enc, txt_enc, sim_enc]) into "
                          "KIDRR with every module off, and this file is not one")
  converted = sgraf_params.convert(ckpt, options, family=FAMILY,
                                   configure=kidrr_config.switch_off, config=config)
  converted.summary["kidrr"] = "every module off (SGRAF's variables and scores)"
  return converted

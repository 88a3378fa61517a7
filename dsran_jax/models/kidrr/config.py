"""KIDRR's config hooks (jax-free). KIDRR is a reconstruction on the SGRAF core
(docs/models/kidrr.md): the core's options are SGRAF's, under `config.model.sgraf`
(`module` = "SGR" | "SAF" picks the SGR-like or SAF-like readout, `sim_dim`, `sgr_step`
= T_r, ...), and every inferred KIDRR module is a switch under `config.model.kidrr`,
declared once in `OPTIONS` below.

The defaults are the full model; with every switch at its `OFF` value it is SGRAF
exactly (the same parameters and scores). KIDRR* is the SGR-like and SAF-like models'
summed sims (`tools.rank --sims=a.npy --sims=b.npy`), as SGRAF*.
"""
from dsran_jax.models.common.options import (Option, Options, greater_than,
                                              integer_at_least, one_of)
from dsran_jax.models.sgraf import config as sgraf_config

BLENDS = ("none", "scalar", "node")
# Every switch's "off" value: KIDRR with these is SGRAF.
OFF = {"kgid_steps": 0, "i2t": False, "global_local": False, "rgr_blend": "none",
       "rgr_topk": 0, "rgr_residual": False, "saf_steps": 0}


OPTIONS = Options("kidrr", [
    Option("kgid_steps", 2, integer_at_least(0),
           "knowledge dissemination steps T_k over regions and words (0: off)"),
    Option("kgid_share_steps", True, None, "one set of KGID weights for every step"),
    Option("i2t", True, None, "i2t local similarity nodes, one per region"),
    Option("lambda_i2t", 4.0, greater_than(0), "their softmax temperature (SCAN's 4)"),
    Option("global_local", True, None, "two global-local nodes"),
    Option("rgr_blend", "scalar", one_of(*BLENDS),
           'relation-graph reconstruction: "scalar" | "node" edge blending across '
           'steps; "none" off'),
    Option("rgr_topk", 0, integer_at_least(0),
           "keep each node's top-k edges (0: dense; optional sparsification)"),
    Option("rgr_residual", True, None, "N <- ReLU(...) + N in every reasoning step"),
    Option("saf_steps", 3, integer_at_least(0),
           "reasoning steps before the SAF-like readout (SGRAF's SAF has 0)"),
])
defaults = OPTIONS.defaults


def _set(c, values):
  for key, value in values.items():
    c.model.kidrr[key] = value
  return c


def switch_off(c):
  """Turns every KIDRR module off (the model is then SGRAF)."""
  return _set(c, OFF)


image_keys = sgraf_config.image_keys
text_keys = sgraf_config.text_keys
tokenizer = sgraf_config.tokenizer
frozen_paths = sgraf_config.frozen_paths


def eval_tile(model_config):
  """(images, captions) per scoring tile: SGRAF's 128 x 128; with the i2t nodes the
  head's chunks shrink to keep (I, C, L + k, d) under max_block_elements."""
  return sgraf_config.eval_tile(model_config)


def recipe(c, dataset: str, module: str = "SGR"):
  """SGRAF's recipe for `dataset` and `module` (docs/models/kidrr.md: unknown, so SGRAF's)
  with the full KIDRR (this module's defaults)."""
  sgraf_config.apply_recipe(c, dataset, module)
  return _set(c, defaults().to_dict())


def demo(c):
  """The full KIDRR (SGR-like readout) on SGRAF's synthetic-world demo settings, with
  batch 32 and 3 epochs: its per-pair head (region nodes, global-local nodes, edge
  blending) costs about 3x SGRAF's per pair, 6.4 CPU-s per batch-64 step on 2 cores, so
  the SGRAF sizes would take over 20 minutes. Dev evaluation on the first 100 images."""
  sgraf_config.apply_demo(c)
  c.train.batch_size = 32
  c.train.num_epochs = 3
  c.train.lr_update = 2
  c.eval.max_dev_images = 100
  return _set(c, defaults().to_dict())


def validate(c):
  """Raises ValueError naming the first SGRAF or KIDRR key out of range."""
  sgraf_config.validate(c)
  OPTIONS.validate(c.model)

"""SCAN's config hooks (jax-free). Its options live under `config.model.scan`, declared
once in `OPTIONS` below, and mirror the authors' train.py flags that change the model
(kuanghuei/SCAN); the defaults are train.py's argparse defaults, so a released `opt`
maps onto them one to one; `recipe` sets a README row. The temperatures do not follow
`cross_attn`: switching direction on the command line needs the README's lambdas too
(`--config.model.scan.cross_attn=i2t --config.model.scan.lambda_softmax=4`).
Shared widths are the top-level `model.embed_size`, `model.word_dim`, `model.img_dim`
and `model.vocab_size`. The model's specification: docs/models/scan.md.
"""
from dsran_jax.models.common import recipes
from dsran_jax.models.common.options import (Option, Options, greater_than,
                                              integer_at_least, one_of)

CROSS_ATTN = ("t2i", "i2t")
AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")
# The --raw_feature_norm values their func_attention runs. Their help text also lists
# l1norm / clipped_l1norm, which call an undefined `l1norm_d` (NameError).
RAW_FEATURE_NORMS = ("clipped_l2norm", "l2norm", "softmax", "clipped", "no_norm")
PRECOMP_ENC_TYPES = ("basic", "weight_norm")

# README "Arguments used to train" rows: (cross_attn, agg_func) -> (lambda_softmax,
# lambda_lse per dataset); every row adds --max_violation --bi_gru.
README_ROWS = {
    ("t2i", "LogSumExp"): (9.0, {"f30k": 6.0, "coco": 6.0}),
    ("t2i", "Mean"): (9.0, {"f30k": 6.0, "coco": 6.0}),
    ("i2t", "LogSumExp"): (4.0, {"f30k": 5.0, "coco": 20.0}),
    ("i2t", "Mean"): (4.0, {"f30k": 6.0, "coco": 6.0}),
}
# (learning_rate, num_epochs, lr_update) per dataset: train.py defaults for F30K, the
# README's --learning_rate=.0005 --num_epochs=20 --lr_update=10 for COCO.
SCHEDULES = {"f30k": (2e-4, 30, 15), "coco": (5e-4, 20, 10)}




def _raw_feature_norm(value):
  problem = one_of(*RAW_FEATURE_NORMS)(value)
  if problem and value in ("l1norm", "clipped_l1norm"):
    problem += (" (listed in SCAN's --help, but their func_attention calls an undefined "
                "l1norm_d for it)")
  return problem


OPTIONS = Options("scan", [
    Option("cross_attn", "t2i", one_of(*CROSS_ATTN),
           '"t2i" (words attend to regions) | "i2t" (regions attend to words)'),
    Option("agg_func", "LogSumExp", one_of(*AGG_FUNCS),
           "aggregation over the attended items (train.py default LogSumExp)"),
    Option("lambda_softmax", 9.0, greater_than(0),
           "attention softmax temperature (9; the README uses 4 for i2t)"),
    Option("lambda_lse", 6.0, greater_than(0),
           "LogSumExp temperature (6; README i2t: 5 F30K, 20 COCO)"),
    Option("raw_feature_norm", "clipped_l2norm", _raw_feature_norm,
           '"clipped_l2norm" (LeakyReLU(0.1), l2 over the query axis) | "l2norm" | '
           '"softmax" | "clipped" | "no_norm"'),
    Option("bi_gru", False, None,
           "bidirectional GRU, halves averaged (every README recipe sets it)"),
    Option("num_layers", 1, integer_at_least(1), "GRU layers"),
    Option("no_imgnorm", False, None, "no l2norm of the region embeddings"),
    Option("no_txtnorm", False, None, "no l2norm of the word embeddings"),
    Option("precomp_enc_type", "basic", one_of(*PRECOMP_ENC_TYPES),
           '"basic" (Linear) | "weight_norm" (weight_norm(Linear, dim=None))'),
    # Scoring memory bound: captions per block so that one (images, captions, k, L)
    # intermediate holds at most this many floats (0: no blocking inside `score`).
    Option("max_block_elements", 1 << 25, recipes.block_elements_rule,
           "floats in the largest (images, captions, k, L) scoring intermediate "
           "(0: no blocking)"),
])
defaults = OPTIONS.defaults

image_keys = recipes.region_keys
text_keys = recipes.word_keys
tokenizer = recipes.word_vocab
frozen_paths = recipes.nothing_frozen


def eval_tile(model_config):
  """(images, captions) per scoring tile: 128 x 256 pairs. At 36 regions and 32 tokens
  `score` runs it as two 128 x 128 blocks (model.scan.max_block_elements = 2^25 floats,
  128 MB per (I, J, k, L) intermediate), so a tile stays well under a GB."""
  del model_config
  return (128, 256)


def recipe(c, dataset: str, cross_attn: str = "t2i", agg_func: str = "Mean"):
  """The authors' README recipe for `dataset` ("f30k" | "coco") and one row of its
  table (default SCAN t-i AVG): BUTD precomp features (36 regions), BiGRU, Adam with
  global-norm clip 2.0, batch 128, word_dim 300, embed 1024, margin 0.2, hardest
  negatives; F30K lr 2e-4 for 30 epochs (x0.1 at 15), COCO lr 5e-4 for 20 (x0.1 at 10).
  """
  if dataset not in SCHEDULES:
    raise ValueError(f"dataset {dataset!r}: expected one of {tuple(SCHEDULES)}")
  if (cross_attn, agg_func) not in README_ROWS:
    raise ValueError(f"SCAN recipe ({cross_attn!r}, {agg_func!r}): the README has rows "
                     f"{sorted(README_ROWS)}")
  lambda_softmax, lambda_lse = README_ROWS[(cross_attn, agg_func)]
  s = c.model.scan
  s.cross_attn, s.agg_func = cross_attn, agg_func
  s.lambda_softmax, s.lambda_lse = lambda_softmax, lambda_lse[dataset]
  s.raw_feature_norm = "clipped_l2norm"
  s.bi_gru = True
  lr, epochs, lr_update = SCHEDULES[dataset]
  return recipes.authors_gru_recipe(c, lr, epochs, lr_update)


def demo(c):
  """SCAN t-i AVG (BiGRU) on the synthetic world: 3 epochs of 1000 images, 256-wide, a
  few minutes on 2 cores.

  Hardest-negative training from scratch sits at the collapsed loss (2 B margin) for
  epochs before it takes off; one epoch of summed violations first (VSE++'s warm-up)
  gets there in one. Regions carry objects and colours only, so SCAN cannot separate a
  hard-negative family's members (scene and layout are not in the regions): R@1 stays
  well below DSRAN's while R@5 / R@10 get close.
  """
  s = c.model.scan
  s.cross_attn, s.agg_func = "t2i", "Mean"
  s.lambda_softmax, s.lambda_lse = 9.0, 6.0
  s.bi_gru = True
  recipes.joint_space(c, embed_size=256, word_dim=128)
  recipes.demo_training(c)
  return recipes.warmed_up_hardest_negatives(c)


def validate(c):
  """Raises ValueError naming the first SCAN key out of range."""
  OPTIONS.validate(c.model)
  recipes.validate_widths(c)

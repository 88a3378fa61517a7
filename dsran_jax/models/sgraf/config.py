"""SGRAF's config hooks (jax-free). Its options live under `config.model.sgraf`, declared
once in `OPTIONS` below: the authors' opts.py flags that change the model
(Paranioar/SGRAF; `--module_name`, `--sim_dim`, `--sgr_step`, `--bi_gru`, ...) and the
implementation's own knobs (dropouts, the reference BatchNorm, the scoring memory bound).

The compute dtype of the pair head's projections is the shared `model.dtype` ("float32"
default; "bfloat16" runs W_loc / W_glo / the SGR projections in bf16 with fp32 sums).
Shared widths: `model.embed_size`, `model.word_dim`, `model.img_dim`, `model.vocab_size`.
The model's specification: docs/models/sgraf.md.

SGRAF* (the paper's ensemble row) is two trained models, SGR and SAF, whose saved
similarity matrices are summed: `python -m dsran_jax.tools.rank --sims=sgr.npy
--sims=saf.npy` (each from `--config.eval.save_sims=True`).
"""
from dsran_jax.models.common import recipes
from dsran_jax.models.common.options import (Option, Options, at_least, exactly,
                                              greater_than, integer_at_least, one_of,
                                              within)

MODULES = ("SGR", "SAF")
# README "Training new models from scratch": (num_epochs, lr_update) per dataset/module.
SCHEDULES = {("f30k", "SGR"): (40, 30), ("f30k", "SAF"): (30, 20),
             ("coco", "SGR"): (20, 10), ("coco", "SAF"): (20, 10)}


OPTIONS = Options("sgraf", [
    Option("module", "SGR", one_of(*MODULES), '"SGR" | "SAF" (--module_name, default SGR)'),
    Option("sim_dim", 256, integer_at_least(1), "similarity-vector width (--sim_dim)"),
    Option("sgr_step", 3, integer_at_least(1), "graph reasoning steps (--sgr_step)"),
    Option("bi_gru", True, None, "BiGRU, halves averaged (--bi_gru is store_false)"),
    Option("num_layers", 1, exactly(1, "only 1 is supported (every SGRAF recipe and "
                                       "release uses one GRU layer)"),
           "GRU layers (1; the only value supported)"),
    Option("no_imgnorm", False, None, "skip the l2norm of the regions"),
    Option("no_txtnorm", False, None, "skip the l2norm of the words"),
    Option("num_regions", 36, integer_at_least(1),
           "region slots of VisualSA's BatchNorm1d(36) (their hard-coded 36)"),
    Option("embed_dropout", 0.4, within(0.0, 1.0, high_open=True),
           "dropout on the word embeddings (their 0.4)"),
    Option("sa_dropout", 0.4, within(0.0, 1.0, high_open=True),
           "dropout inside VisualSA / TextSA (their 0.4)"),
    Option("reference_bn", True, None,
           "VisualSA's BatchNorm over region *slots*, as theirs (True), or a per-feature "
           "BatchNorm over the real regions (False)"),
    Option("lambda_softmax", 9.0, greater_than(0),
           "SCAN_attention's smooth (their hard-coded 9)"),
    Option("max_block_elements", 1 << 24, at_least(0, " (0: off)"),
           "floats in the largest per-chunk intermediate (I, C, L, d) of the pair head "
           "(memory bound; 0: one chunk per tile)"),
    Option("length_bucket", 8, at_least(0, " (0: off)"),
           "captions run at the smallest multiple of this holding the chunk's longest "
           "caption (0: always at the tile's caption width)"),
])
defaults = OPTIONS.defaults


image_keys = recipes.region_keys
text_keys = recipes.word_keys
tokenizer = recipes.word_vocab
frozen_paths = recipes.nothing_frozen


def eval_tile(model_config):
  """(images, captions) per scoring tile: 128 x 128 pairs. The head runs over caption
  chunks of C = max_block_elements / (128 L d) (4 at L = 32, d = 1024 and the default
  2^24), so a tile's largest intermediate is 64 MB and its peak about 0.5 GB whatever
  the tile's caption count."""
  del model_config
  return (128, 128)


def apply_recipe(c, dataset: str, module: str):
  """The authors' recipe (README + opts.py) shared by SGRAF and KIDRR."""
  if (dataset, module) not in SCHEDULES:
    raise ValueError(f"SGRAF recipe ({dataset!r}, {module!r}): expected dataset in "
                     f"('f30k', 'coco') and module in {MODULES}")
  s = c.model.sgraf
  s.module = module
  s.sim_dim, s.sgr_step, s.bi_gru, s.num_layers = 256, 3, True, 1
  s.num_regions = 36
  epochs, lr_update = SCHEDULES[(dataset, module)]
  recipes.authors_gru_recipe(c, 2e-4, epochs, lr_update)
  # Their collate pads to the batch's longest caption and never truncates: so does
  # data.max_len=-1 (the default; length bucketing keeps the padding free in the pair head).
  return c


def recipe(c, dataset: str, module: str = "SGR"):
  """The authors' recipe for `dataset` ("f30k" | "coco") and `module`: BUTD precomp
  features (36 regions), BiGRU, Adam 2e-4 with global-norm clip 2.0, batch 128, margin
  0.2 with hardest negatives, sim_dim 256, 3 SGR steps; F30K SGR 40 epochs (x0.1 at
  30), F30K SAF 30 (x0.1 at 20), COCO 20 (x0.1 at 10). Their validation keeps the first
  5000 dev captions (1000 images): `eval.max_dev_images` = 1000, for both datasets."""
  return apply_recipe(c, dataset, module)


def apply_demo(c):
  """The synthetic-world settings shared by the SGRAF and KIDRR demos."""
  s = c.model.sgraf
  s.module = "SGR"
  s.num_regions = c.data.num_regions
  s.sim_dim = 32
  s.sgr_step = 3
  recipes.joint_space(c, embed_size=128, word_dim=64)
  recipes.demo_training(c, num_epochs=5, lr_update=4)
  # The sum of violations, not the recipe's hardest negatives: from scratch on the
  # synthetic world hardest negatives trained worse in every run we made (5 epochs: test
  # rsum 438.6 with a 3-epoch sum warm-up, 449.6 with the sum throughout; a 1-epoch
  # warm-up at lr 2e-4 sat at dev rsum 21; docs/kidrr_ablation.md).
  recipes.hinge_loss(c, max_violation=False)
  # Two tiles of 100 images cover the 200-image dev/test splits without padding.
  c.eval.tile_images = 100
  return c


def demo(c):
  """SGRAF-SGR on the synthetic world, sized for a few minutes on 2 cores."""
  return apply_demo(c)


def validate(c):
  """Raises ValueError naming the first SGRAF key out of range."""
  OPTIONS.validate(c.model)
  s = c.model.sgraf
  if s.reference_bn and c.data.num_regions > s.num_regions:
    raise ValueError(f"config.data.num_regions={c.data.num_regions} exceeds "
                     f"config.model.sgraf.num_regions={s.num_regions}, the slots of "
                     f"VisualSA's reference BatchNorm (set them equal, or reference_bn=False)")
  recipes.validate_widths(c)

"""BSSAN's config hooks (jax-free). BSSAN (Huang et al., IEEE TIP 28(4), 2019,
"Bi-Directional Spatial-Semantic Attention Networks for Image-Text Matching") has only its
abstract public, so this family is a reconstruction ("BSSAN-R", specified in
docs/models/bssan.md); every choice the abstract does not fix is an option here, declared
once in `OPTIONS` below with the default the specification proposes (tags: [INFERRED] a
design choice, [UNKNOWN] nothing found, a default borrowed from SCAN).

The loss is the framework's (`train.margin` 0.2, `train.max_violation` True: hardest
negatives; False sums the violations as DAN / sm-LSTM did [UNKNOWN]). Shared widths:
`model.embed_size` (d, also the LSTM width), `model.word_dim`, `model.img_dim`,
`model.vocab_size`.
"""
from dsran_jax.models.common import recipes
from dsran_jax.models.common.options import (Option, Options, at_least, greater_than,
                                              one_of, within)

DIRECTIONS = ("both", "w2r", "o2w")
W2R = ("decoupled", "coupled")
W2R_VISUAL = ("regions36", "grid")
AGGS = ("Mean", "LogSumExp")
BILINEAR_INITS = ("identity", "xavier")
FUSE = ("fixed", "learned", "mlp")
# docs/models/bssan.md, recipe (SCAN's, [UNKNOWN] for BSSAN): (epochs, lr decay epoch).
SCHEDULES = {"f30k": (30, 15), "coco": (20, 10)}


OPTIONS = Options("bssan", [
    Option("directions", "both", one_of(*DIRECTIONS),
           "which attention networks score a pair (the paper unifies both; one alone is "
           "the ablation)"),
    Option("w2r", "decoupled", one_of(*W2R),
           '"decoupled" (a text-only LSTM; W_b^T h_t precomputed per caption) | "coupled" '
           "(the LSTM input at step t is [x_t; c_t], c_t attended with h_{t-1}, so the "
           "states depend on the pair) [INFERRED]"),
    Option("w2r_visual", "regions36", one_of(*W2R_VISUAL),
           '"regions36" (the detector regions) | "grid" (the 7x7 CNN grid, '
           "`{split}_grid.npy`) as W2R's context; O2W always reads the regions "
           '("regions36" names the BUTD release; any data.num_regions works) [INFERRED]'),
    Option("bi_lstm", False, None,
           "text LSTM bidirectional, halves averaged. The coupled recurrence runs "
           'forward only, so w2r="coupled" needs False [UNKNOWN]'),
    Option("lstm_dropout", 0.2, within(0.0, 1.0, high_open=True),
           "dropout on the LSTM inputs (the word embeddings) [UNKNOWN]"),
    Option("txt_norm", True, None,
           "l2-normalise each LSTM state before it is used (SCAN) [INFERRED]"),
    Option("lambda_w2r", 9.0, greater_than(0),
           "softmax temperature of W2R's bilinear logits (SCAN t2i) [UNKNOWN]"),
    Option("lambda_o2w", 4.0, greater_than(0),
           "softmax temperature of O2W's bilinear logits (SCAN i2t) [UNKNOWN]"),
    Option("w2r_agg", "Mean", one_of(*AGGS), '"Mean" | "LogSumExp" over words [INFERRED]'),
    Option("o2w_agg", "Mean", one_of(*AGGS), '"Mean" | "LogSumExp" over regions [INFERRED]'),
    Option("lambda_lse", 6.0, greater_than(0), "LogSumExp temperature (SCAN) [UNKNOWN]"),
    Option("cosine_proj", True, None,
           "score R = cos(P a, P' b) with learned d->d projections (True) or the plain "
           "cosine of the two vectors (False) [INFERRED]"),
    Option("bilinear_init", "identity", one_of(*BILINEAR_INITS),
           '"identity" (W_b, W_o start as I: the logits start as SCAN\'s cosines) | '
           '"xavier" [UNKNOWN]'),
    Option("fuse", "fixed", one_of(*FUSE),
           '"fixed" (S = w S_W2R + (1-w) S_O2W) | "learned" (w = sigmoid(theta), theta '
           'starts at logit(fuse_weight)) | "mlp" (an MLP and a sigmoid over the pooled '
           "[mean_t c_t; mean_t h_t; mean_r u_r; mean_r o_r] and the two branch scores "
           "S_W2R, S_O2W) [INFERRED]"),
    Option("fuse_weight", 0.5, within(0.0, 1.0), "w [INFERRED]"),
    Option("mlp_hidden", 256, at_least(1), 'hidden width of fuse="mlp" [UNKNOWN]'),
    Option("scan_unroll", 1, at_least(1),
           "steps of the coupled recurrence unrolled per loop iteration (a value >= "
           "the caption width unrolls it fully, so XLA's cost analysis, which counts a loop "
           "body once, sees every step)"),
    Option("max_block_elements", 1 << 25, recipes.block_elements_rule,
           "memory bound of `score`: captions per block so that one (images, captions, "
           "positions, positions) or (images, captions, 4H) intermediate holds at most "
           "this many floats (0: no blocking)"),
])
defaults = OPTIONS.defaults


def uses_w2r(model_config) -> bool:
  return model_config.bssan.directions in ("both", "w2r")


def uses_o2w(model_config) -> bool:
  return model_config.bssan.directions in ("both", "o2w")


def image_keys(model_config):
  """Regions for O2W and for W2R over regions; the grid for W2R over the grid.
  `model_config`: `config.model`, or the Module's BssanConfig (the same options)."""
  s = getattr(model_config, "bssan", model_config)
  keys = ()
  if s.directions in ("both", "o2w") or s.w2r_visual == "regions36":
    keys += ("regions", "region_mask")
  if s.directions in ("both", "w2r") and s.w2r_visual == "grid":
    keys += ("grid",)
  return keys


text_keys = recipes.word_keys
tokenizer = recipes.word_vocab
frozen_paths = recipes.nothing_frozen


def eval_tile(model_config):
  """(images, captions) per scoring tile. Decoupled: 128 x 256 like SCAN (the blocked
  (I, k, J, L) intermediates stay under `max_block_elements`). Coupled: every pair runs
  an LSTM, whose (I, J, 4H) step intermediates are the bound: 32 x 128 pairs is 67 MB a
  gate array at H = 1024."""
  if model_config.bssan.w2r == "coupled" and uses_w2r(model_config):
    return (32, 128)
  return (128, 256)


def recipe(c, dataset: str):
  """Recipe of docs/models/bssan.md, `dataset` "f30k" | "coco": precomp regions (36), embed
  1024, word_dim 300, Adam lr 2e-4 with global-norm clip 2.0, batch 128, hinge margin 0.2
  with hardest negatives; F30K 30 epochs, COCO 20, x0.1 at the midpoint (SCAN's schedule;
  every number [UNKNOWN] for BSSAN). `w2r_visual="grid"` also reads `{split}_grid.npy`."""
  if dataset not in SCHEDULES:
    raise ValueError(f"dataset {dataset!r}: expected one of {tuple(SCHEDULES)}")
  epochs, lr_update = SCHEDULES[dataset]
  return recipes.authors_gru_recipe(c, 2e-4, epochs, lr_update)


def demo(c):
  """BSSAN-R (both directions, decoupled W2R over regions, fixed fusion) on the synthetic
  world: 3 epochs of 1000 images, 256-wide, a few minutes on 2 cores.

  As for SCAN's demo: lr 1e-3 (not the recipe's 2e-4, for a 3-epoch budget) and one
  epoch of summed violations before the hardest negatives, without which training from
  scratch sits at the collapsed loss for epochs.
  """
  recipes.joint_space(c, embed_size=256, word_dim=128)
  recipes.demo_training(c)
  return recipes.warmed_up_hardest_negatives(c)


def validate(c):
  """Raises ValueError naming the first BSSAN key out of range."""
  OPTIONS.validate(c.model)
  s = c.model.bssan
  if s.fuse == "learned" and not 0.0 < s.fuse_weight < 1.0:
    raise ValueError(f"config.model.bssan.fuse_weight={s.fuse_weight}: fuse='learned' "
                     f"starts at logit(w), so w must be in (0, 1)")
  if s.w2r == "coupled" and s.bi_lstm and uses_w2r(c.model):
    raise ValueError("config.model.bssan.bi_lstm=True with w2r='coupled': the coupled "
                     "recurrence runs forward only (set bi_lstm=False)")
  if s.fuse == "mlp" and s.directions != "both":
    raise ValueError(f"config.model.bssan.fuse='mlp' needs directions='both' (got "
                     f"{s.directions!r}): its pooled input has a W2R and an O2W half")
  recipes.validate_widths(c)

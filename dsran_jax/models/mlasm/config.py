"""MLASM's config hooks (jax-free). Its options live under `config.model.mlasm`
(xiaohu306/MLASM @ 77e6f58; the specification is docs/models/mlasm.md), declared once
in `OPTIONS` below. `global_mode`:

    "pairwise" (default): the global vectors of every candidate pair (i, j) are computed
        inside `score` from the pair's own attention, so pair (i, j) depends on image i
        and caption j only;
    "reference": the authors' code, which conditions image i's global vector on its
        *ground-truth* caption and caption j's on its ground-truth image (valid only on
        paired inputs; see model.py and docs/models/mlasm.md for the protocol problem).

The attention temperatures are the authors' hard-coded 9 (t2i) and 4 (i2t), with SCAN's
clipped_l2norm and mean aggregation in both directions. Shared widths are the top-level
`model.embed_size`, `model.word_dim`, `model.img_dim` (regions), `model.vocab_size`,
and `model.glove_path` (GloVe init of the word embeddings, as the authors'
`torchtext.vocab.GloVe()`: glove.840B.300d).
"""
from dsran_jax.models.common import recipes
from dsran_jax.models.common.options import (Option, Options, integer_at_least, one_of,
                                              within)

GLOBAL_MODES = ("pairwise", "reference")
LAMBDA_T2I = 9.0  # model.py: func_attention(..., smooth=9.) in xattn_score_t2i
LAMBDA_I2T = 4.0  # model.py: func_attention(..., smooth=4.) in xattn_score_i2t


OPTIONS = Options("mlasm", [
    Option("ratio", 0.8, within(0.0, 1.0),
           "S = ratio * S_local + (1 - ratio) * S_global (opts.py --ratio); 1.0 is the "
           "local alignment alone (the global branch is skipped)"),
    Option("global_mode", "pairwise", one_of(*GLOBAL_MODES),
           '"pairwise" | "reference" (module docstring)'),
    Option("global_dim", 2048, integer_at_least(1),
           "width of `global_feat`, the average-pooled ResNet feature"),
    Option("embed_dropout", 0.1, within(0.0, 1.0, high_open=True),
           "dropout on the word embeddings (their 0.1)"),
    Option("max_block_elements", 1 << 25, recipes.block_elements_rule,
           "scoring memory bound: captions per block inside `score` so that one (images, "
           "captions, k, L) or (images, captions, embed) intermediate holds at most this "
           "many floats (0: no blocking)"),
])
defaults = OPTIONS.defaults


def image_keys(model_config):
  del model_config
  return ("regions", "region_mask", "global_feat")


text_keys = recipes.word_keys
tokenizer = recipes.word_vocab  # <start> words <end>, both specials counted in the lengths


def frozen_paths(model_config):
  """`fc_attn_i` and the fusion gate are absent from the authors' optimizer parameter
  list (model.py JZK.__init__), so they stay at their random init for the whole run."""
  del model_config
  return (r"^img_enc/fc_attn_i/", r"^img_enc/fusion/")


def eval_tile(model_config):
  """(images, captions) per scoring tile: 128 x 256 pairs, as SCAN; `score` works through
  caption blocks of at most `max_block_elements` floats per intermediate (both attention
  directions and the per-pair global vectors), so a tile stays around a GB."""
  del model_config
  return (128, 256)


def recipe(c, dataset: str):
  """The authors' recipe (opts.py, train.py; the same for F30K and COCO): the DSRAN/VLP
  region features cut to their first 36 detections, a ResNet-152 pooled feature per
  image (`{split}_global.npy`, from `python -m dsran_jax.extract`), GloVe-initialised
  unidirectional GRU (set `model.glove_path` to glove.840B.300d.txt), embed 1024,
  word_dim 300, Adam lr 5e-4 x0.1 every 10 epochs for 20 epochs, batch 128, global-norm
  clip 2.0 over the trained parameters only, margin 0.2 with hardest negatives; DSRAN's
  (VSE++'s) data pipeline: model selection on all 1014 Flickr30K val images (COCO: the
  first 1000 dev images) and VSE++'s vocabulary of every caption (`<data_name>_vocab.pkl`)."""
  if dataset not in ("f30k", "coco"):
    raise ValueError(f"dataset {dataset!r}: expected 'f30k' or 'coco'")
  s = c.model.mlasm
  s.ratio = 0.8
  s.global_dim = 2048
  s.embed_dropout = 0.1
  return recipes.authors_gru_recipe(c, 5e-4, num_epochs=20, lr_update=10,
                                    data_format="vlp",
                                    dev_images=recipes.vsepp_dev_images(dataset),
                                    vocab_splits="all")


def departures(c):
  """Where a run of `c` departs from the authors' recipe (`models.departures`): word
  embeddings without GloVe (their EncoderText loads glove.840B.300d)."""
  return recipes.glove_departure(c, "N(0, 1)")


def demo(c):
  """MLASM (pairwise global branch) on the synthetic world: 3 epochs of 1000 images,
  192-wide, a few minutes on 2 cores. `global_feat` there is the mean of the image's
  grid cells, as the real one is the mean of ResNet-152's 7x7 map: it carries the
  scene, which the regions never do (data/synthetic.py).

  As for SCAN's demo, one epoch of summed violations (VSE++'s warm-up) first gets the
  hardest-negative loss off its collapsed start.
  """
  s = c.model.mlasm
  s.ratio = 0.8
  s.global_mode = "pairwise"
  s.global_dim = c.data.img_dim
  c.model.img_dim = c.data.img_dim
  recipes.joint_space(c, embed_size=192, word_dim=96)
  recipes.demo_training(c)
  return recipes.warmed_up_hardest_negatives(c)


def validate(c):
  """Raises ValueError naming the first MLASM key out of range."""
  OPTIONS.validate(c.model)
  recipes.validate_widths(c)
  s = c.model.mlasm
  if c.data.format == "synthetic" and s.global_dim != c.data.img_dim:
    raise ValueError(f"config.model.mlasm.global_dim={s.global_dim}: the synthetic world's "
                     f"global_feat (its grid's mean) has data.img_dim={c.data.img_dim} values")

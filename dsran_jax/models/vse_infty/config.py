"""VSE∞'s config hooks (jax-free). Its options live under `config.model.vse_infty`,
declared once in `OPTIONS` below; they mirror the flags of the authors' train.py
(woodfrog/vse_infty: `master` is the BERT build, branch `bigru` the BiGRU build) that
change the model or its training-time augmentation. Shared widths are the top-level
`model.embed_size`, `model.img_dim`, `model.word_dim` and `model.vocab_size` (BiGRU: the
words of the vocabulary; the embedding has one more row, their appended `<mask>`).
The model's specification: docs/models/vse_infty.md.
"""
from dsran_jax.models.common import recipes, vse_config
from dsran_jax.models.common.options import Option, Options, bert_options, one_of
# Their optimiser per build (vse.py) and the precomp releases' training captions: the
# lineage's (`common.vse_config`).
from dsran_jax.models.common.vse_config import TEXT_ENCODERS, TRAIN_CAPTIONS
# "basic": fc + a 2-layer MLP residual (their precomputed-region build); "backbone": fc
# alone (their grid build's head, here on precomputed features; the CNN is not ported).
PRECOMP_ENC_TYPES = ("basic", "backbone")

# train_region.sh (the same on both branches): --num_epochs=25 --lr_update=15
# --learning_rate=.0005 --vse_mean_warmup_epochs 1 --embed_size 1024; arguments.py
# defaults: batch 128, margin 0.2, grad_clip 2.0, AdamW.
EPOCHS, LR_UPDATE, LEARNING_RATE, BATCH = 25, 15, 5e-4, 128

OPTIONS = Options("vse_infty", [
    Option("text_encoder", "bert", one_of(*TEXT_ENCODERS),
           '"bert" (master: BERT + Linear + GPO) | "bigru" (branch bigru: BiGRU + GPO)'),
    Option("precomp_enc_type", "basic", one_of(*PRECOMP_ENC_TYPES),
           '"basic" (fc + MLP residual, regions) | "backbone" (fc only)'),
    *vse_config.norm_options("pooled image embedding", "pooled caption embedding"),
    vse_config.bigru_layers_option(),
    *vse_config.augmentation_options("their loader: 0.2"),
] + bert_options())
defaults = OPTIONS.defaults
image_keys, text_keys, frozen_paths, tokenizer, bert_path = vse_config.config_hooks("vse_infty")


def eval_tile(model_config):
  """An embedding model scores with one dot product: the whole F30K test in one tile."""
  del model_config
  return (1000, 5000)


def recipe(c, dataset: str, text_encoder: str = "bert"):
  """train_region.sh for `dataset` ("f30k" | "coco"): 36 BUTD regions x 2048, embed
  1024, AdamW lr 5e-4 for 25 epochs (x0.1 at 15), batch 128, clip 2.0, one epoch of
  summed violations (--vse_mean_warmup_epochs 1) then hardest negatives; BERT-base
  (`text_encoder="bert"`, BERT at lr x 0.1, weight decay 1e-4) or the BiGRU of branch
  `bigru` (word_dim 300, weight decay 0.01)."""
  if dataset not in TRAIN_CAPTIONS:
    raise ValueError(f"dataset {dataset!r}: expected one of {tuple(TRAIN_CAPTIONS)}")
  vse_config.check_text_encoder(text_encoder)
  s = c.model.vse_infty
  s.text_encoder = text_encoder
  s.precomp_enc_type = "basic"
  if text_encoder == "bert":
    s.bert_path = "bert-base-uncased"
  recipes.region_features(c, "precomp")
  recipes.joint_space(c, embed_size=1024, word_dim=300)
  # Their captions are never cut: data.max_len=-1 (the default) keeps them whole.
  c.eval.batch_size = 128
  return vse_config.hinge_adamw(c, text_encoder, LEARNING_RATE, EPOCHS, LR_UPDATE, BATCH,
                                TRAIN_CAPTIONS[dataset] // BATCH)


def demo(c, text_encoder: str = "bigru"):
  """VSE∞ on the synthetic world, 256-wide, 3 epochs at batch 64: the BiGRU build by
  default (a few minutes on 2 cores); `configs/demo.py:vse_infty,text_encoder=bert`
  trains the BERT build on the MiniLM-L6 weights (BERT at lr x 0.1, as theirs).
  Their augmentation (region dropout, token masking) and one epoch of summed violations
  before hardest negatives, as their recipe."""
  vse_config.check_text_encoder(text_encoder)
  c.model.vse_infty.text_encoder = text_encoder
  return vse_config.demo(c, "vse_infty", text_encoder)


def validate(c):
  """Raises ValueError naming the first VSE∞ key out of range."""
  OPTIONS.validate(c.model)
  recipes.validate_widths(c)
  vse_config.check_bert_heads(c, "vse_infty", c.model.vse_infty.text_encoder == "bert")

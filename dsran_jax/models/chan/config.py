"""CHAN's config hooks (jax-free). Its options live under `config.model.chan`, declared
once in `OPTIONS` below; they mirror the flags of the authors' train.py (ppanzx/CHAN
lib/arguments.py) that change the model, its similarity or its training-time
augmentation. The defaults are the GRU row of their scripts/train.sh (their argparse
default text encoder is `bigru`; coding and pooling have no argparse default). Shared
widths are the top-level `model.embed_size`, `model.img_dim`, `model.word_dim` and
`model.vocab_size` (BiGRU: the words of the vocabulary; the embedding has one more row,
their appended `<mask>`). The model's specification: docs/models/chan.md.
"""
from dsran_jax.models.common import recipes, vse_config
from dsran_jax.models.common.options import Option, Options, bert_options, greater_than, one_of
# Their optimiser per build (lib/model.py: VSE∞'s) and the precomp releases' training
# captions: the lineage's (`common.vse_config`).
from dsran_jax.models.common.vse_config import TEXT_ENCODERS, TRAIN_CAPTIONS
# "basic": fc alone (nn.Identity feed-forward); "selfattention": fc + a pre-LN residual
# nn.MultiheadAttention(E, 8) over the regions. Their "transformer" builds
# nn.MultiheadAttention without batch_first and feeds it (B, R, E), so it attends across
# the batch, not the regions; no script of theirs uses it and it is not ported.
PRECOMP_ENC_TYPES = ("basic", "selfattention")
CODING_TYPES = ("VHACoding", "THACoding", "VSACoding")
POOLING_TYPES = ("MeanPooling", "LSEPooling", "MaxPooling", "SumPooling", "SoftmaxPooling")
SELF_ATTENTION_HEADS = 8  # their SelfAttention(d_model, n_head=8)

# scripts/train.sh, per text encoder (the same for f30k and coco): --num_epochs=25
# --lr_update=15 --learning_rate=5e-4 --vse_mean_warmup_epochs=1 --embed_size=1024
# --coding_type=VHACoding --alpha=0.1 --belta=0.1 --drop --criterion=ContrastiveLoss
# --margin=0.05; the GRU rows add --precomp_enc_type=selfattention --wemb_type=glove
# --pooling_type=LSEPooling --batch_size=384, the BERT rows --pooling_type=MeanPooling
# --batch_size=128 (precomp_enc_type: the argparse default, basic).
EPOCHS, LR_UPDATE, LEARNING_RATE, MARGIN = 25, 15, 5e-4, 0.05
BATCH = {"bert": 128, "bigru": 384}
POOLING = {"bert": "MeanPooling", "bigru": "LSEPooling"}
PRECOMP = {"bert": "basic", "bigru": "selfattention"}

OPTIONS = Options("chan", [
    Option("text_encoder", "bigru", one_of(*TEXT_ENCODERS),
           '"bigru" (Embedding + BiGRU, halves averaged) | "bert" (BERT + Linear)'),
    Option("precomp_enc_type", "selfattention", one_of(*PRECOMP_ENC_TYPES),
           '"selfattention" (fc + pre-LN 8-head self-attention residual) | "basic" (fc)'),
    Option("coding_type", "VHACoding", one_of(*CODING_TYPES),
           '"VHACoding" (each word takes its best region) | "THACoding" (each region its '
           'best word) | "VSACoding" (regions attend softly to words, temperature alpha)'),
    Option("pooling_type", "LSEPooling", one_of(*POOLING_TYPES),
           "pooling of the coded similarities (their scripts: LSE for BiGRU, Mean for BERT)"),
    Option("alpha", 0.1, greater_than(0), "VSACoding softmax temperature (their --alpha)"),
    Option("belta", 0.1, greater_than(0),
           "LSEPooling / SoftmaxPooling temperature (their --belta)"),
    *vse_config.norm_options("region embeddings", "word embeddings"),
    vse_config.bigru_layers_option(),
    *vse_config.augmentation_options("their --obj_drop_rate"),
    Option("max_block_elements", 1 << 25, recipes.block_elements_rule,
           "floats in the largest (images, captions, k, L) scoring intermediate "
           "(0: no blocking)"),
] + bert_options())
defaults = OPTIONS.defaults
image_keys, text_keys, frozen_paths, tokenizer, bert_path = vse_config.config_hooks("chan")


def eval_tile(model_config):
  """(images, captions) per scoring tile: 128 x 256 pairs, as SCAN's (one (I, J, k, L)
  similarity tensor per block of model.chan.max_block_elements floats)."""
  del model_config
  return (128, 256)


def departures(config):
  """The BiGRU recipe initialises the word embeddings from GloVe (--wemb_type=glove)."""
  s = config.model.chan
  if s.text_encoder != "bigru":
    return []
  return recipes.glove_departure(config, "Xavier-uniform (their init without GloVe)")


def _build(c, text_encoder: str):
  vse_config.check_text_encoder(text_encoder)
  s = c.model.chan
  s.text_encoder = text_encoder
  s.precomp_enc_type = PRECOMP[text_encoder]
  s.coding_type, s.pooling_type = "VHACoding", POOLING[text_encoder]
  s.alpha, s.belta = 0.1, 0.1
  return s


def recipe(c, dataset: str, text_encoder: str = "bert"):
  """scripts/train.sh for `dataset` ("f30k" | "coco"): 36 BUTD regions x 2048, embed
  1024, VHACoding, AdamW lr 5e-4 for 25 epochs (x0.1 at 15), clip 2.0, margin 0.05, one
  epoch of summed violations then hardest negatives, region dropout and token masking
  0.2. BERT-base (`text_encoder="bert"`, the default: the paper's headline row): fc
  image encoder, MeanPooling, batch 128, BERT at lr x 0.1, weight decay 1e-4; BiGRU:
  fc + self-attention, LSEPooling (belta 0.1), batch 384, weight decay 0.01, GloVe
  word_dim 300 (`model.glove_path`)."""
  if dataset not in TRAIN_CAPTIONS:
    raise ValueError(f"dataset {dataset!r}: expected one of {tuple(TRAIN_CAPTIONS)}")
  s = _build(c, text_encoder)
  if text_encoder == "bert":
    s.bert_path = "bert-base-uncased"
  recipes.region_features(c, "precomp")
  recipes.joint_space(c, embed_size=1024, word_dim=300)
  # Their captions are never cut: data.max_len=-1 (the default) keeps them whole. Model
  # selection reads the first 5000 dev captions (1000 images); the vocabulary is SCAN's
  # {train,dev} one.
  c.eval.batch_size = 128
  c.eval.max_dev_images = 1000
  c.data.vocab_splits = "train+dev"
  batch = BATCH[text_encoder]
  vse_config.hinge_adamw(c, text_encoder, LEARNING_RATE, EPOCHS, LR_UPDATE, batch,
                         TRAIN_CAPTIONS[dataset] // batch)
  c.train.margin = MARGIN  # the hinge at their --margin=0.05
  return c


def demo(c, text_encoder: str = "bigru"):
  """CHAN on the synthetic world, 256-wide, 3 epochs at batch 64: the BiGRU build by
  default (fc + self-attention regions, LSEPooling); `configs/demo.py:chan,
  text_encoder=bert` trains the BERT build (MeanPooling) on the MiniLM-L6 weights.
  Their augmentation, margin 0.05 and one epoch of summed violations before hardest
  negatives, as their recipe."""
  _build(c, text_encoder)
  vse_config.demo(c, "chan", text_encoder)
  c.train.margin = MARGIN
  return c


def validate(c):
  """Raises ValueError naming the first CHAN key out of range."""
  OPTIONS.validate(c.model)
  recipes.validate_widths(c)
  s = c.model.chan
  if s.precomp_enc_type == "selfattention" and c.model.embed_size % SELF_ATTENTION_HEADS:
    raise ValueError(f"config.model.embed_size={c.model.embed_size} must be divisible by "
                     f"the {SELF_ATTENTION_HEADS} heads of "
                     f"config.model.chan.precomp_enc_type='selfattention'")
  vse_config.check_bert_heads(c, "chan", s.text_encoder == "bert")

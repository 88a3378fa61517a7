"""HREM's config hooks (jax-free). Its options live under `config.model.hrem`, declared
once in `OPTIONS` below; they mirror the flags of the authors' arguments.py and
graph_lib.py (CrossmodalGroup/HREM) that change the model, its training objective
(`graph_lib.GraphLoss`) or its training-time augmentation. Shared widths are the
top-level `model.embed_size` and `model.img_dim`. The model's specification:
docs/models/hrem.md.
"""
from dsran_jax.hub import minilm_dir
from dsran_jax.models.common import recipes, vse_config
from dsran_jax.models.common.options import (Option, Options, bert_options, greater_than,
                                              integer_at_least, one_of, within)
from dsran_jax.models.common.vse_config import TRAIN_CAPTIONS

LOSSES = ("trip", "vse")
# arguments.py and the README's commands: 30 epochs, lr 5e-4 x0.1 at epochs 15 and 25
# (--lr_schedules 15 25, --decay_rate 0.1), batch 128 (F30K) / 256 (COCO), clip 2.0,
# AdamW(weight_decay=1e-4) with BERT at lr x 0.1 (lib/vse.py), --mask_weight 1.0 / 1.5.
EPOCHS, MILESTONES, LEARNING_RATE, WEIGHT_DECAY, BERT_LR_FACTOR = 30, "15,25", 5e-4, 1e-4, 0.1
BATCH = {"f30k": 128, "coco": 256}
MASK_WEIGHT = {"f30k": 1.0, "coco": 1.5}
# lib/loss.py TripletLoss: `nonzero_loss_cutoff` 1.9 when opt.dataset == 'coco', else 1.7.
NONZERO_LOSS_CUTOFF = {"f30k": 1.7, "coco": 1.9}

OPTIONS = Options("hrem", [
    Option("nhead", 16, integer_at_least(1),
           "heads of every TransformerEncoderLayer (their --nhead)"),
    Option("dropout", 0.1, within(0.0, 1.0, high_open=True),
           "dropout of every TransformerEncoderLayer (their --dropout)"),
    Option("residual_weight", 0.8, within(0.0, 1.0),
           "pooled = w * max-2 pool + (1 - w) * mean of the encoder layer (their "
           "--residual_weight)"),
    *vse_config.norm_options("image embedding", "caption embedding"),
    *vse_config.augmentation_options("their --size_augment 1", "their process_caption_bert",
                                     field=False),
    # graph_lib.extra_parameters: the training objective (GraphLoss), not the Module.
    Option("base_loss", "trip", one_of(*LOSSES),
           "loss of the embeddings: 'trip' (distance-weighted triplet) | 'vse' (hinge)",
           field=False),
    Option("gnn_loss", "trip", one_of(*LOSSES), "loss of the relation-enhanced embeddings",
           field=False),
    Option("warmup", 8000, integer_at_least(0),
           "steps before the instance-level relation module joins (their --warmup)",
           field=False),
    Option("num_layers_enc", 1, integer_at_least(1),
           "layers of the instance-level TransformerEncoder", field=False),
    Option("graph_lr_factor", 1.0, greater_than(0.0),
           "lr factor of the relation module's parameters", field=False),
    Option("mask_weight", 1.0, greater_than(0.0),
           "scale of the relevance in the attention mask (F30K 1.0, COCO 1.5)", field=False),
    Option("threshold", 0.5, within(0.0, 1.0),
           "share of each row of a relation matrix that is connected", field=False),
    Option("topk", 10, integer_at_least(1),
           "word-region scores per pair fed to the relevance MLPs", field=False),
    Option("reg_loss_weight", 10.0, within(0.0, 1e9), "weight of the relevance KL",
           field=False),
    Option("norm_input", True, None,
           "the relation module reads the l2-normalised embeddings", field=False),
    Option("cross_loss", True, None,
           "also the losses of image x enhanced caption and enhanced image x caption",
           field=False),
    Option("nonzero_loss_cutoff", 1.7, greater_than(0.0),
           "triplet sampling: negatives farther than this are never drawn (F30K 1.7, "
           "COCO 1.9)", field=False),
    Option("mask_repeat", True, None,
           "'vse' losses: pairs of one image are not negatives (their --mask_repeat 1; "
           "'trip' always reads the image ids)",
           field=False),
] + bert_options())
defaults = OPTIONS.defaults

image_keys = recipes.region_keys
text_keys = recipes.word_keys
frozen_paths = recipes.nothing_frozen


def tokenizer(model_config):
  """BERT WordPiece from `model.hrem.bert_path` (their only text encoder)."""
  del model_config
  return "bert"


def bert_path(model_config) -> str:
  """The BERT directory (or hub name) of the text encoder."""
  return model_config.hrem.bert_path


def eval_tile(model_config):
  """An embedding model scores with one dot product: the whole F30K test in one tile."""
  del model_config
  return (1000, 5000)


def _training(c, dataset_numbers: str, learning_rate: float, num_epochs: int,
              milestones: str, batch_size: int, warmup_epoch_steps: int):
  """AdamW (weight decay 1e-4, BERT at lr x 0.1, the relation module at lr x
  graph_lr_factor), global-norm clip 2.0 over every group, x0.1 at `milestones`."""
  recipes.adam_clipped(c, learning_rate, num_epochs, lr_update=num_epochs,
                       batch_size=batch_size)
  vse_config.adamw(c, WEIGHT_DECAY, BERT_LR_FACTOR)
  c.train.lr_milestones = milestones
  # Read by the 'vse' losses only (their ContrastiveLoss): summed violations for
  # --vse_mean_warmup_epochs 1, then hardest negatives.
  recipes.hinge_loss(c, max_violation=True, sum_violation_steps=warmup_epoch_steps)
  s = c.model.hrem
  s.mask_weight = MASK_WEIGHT[dataset_numbers]
  s.nonzero_loss_cutoff = NONZERO_LOSS_CUTOFF[dataset_numbers]
  return c


def recipe(c, dataset: str):
  """The README's commands for `dataset` ("f30k" | "coco"): 36 BUTD regions x 2048,
  BERT-base, embed 1024, AdamW lr 5e-4 for 30 epochs (x0.1 at 15 and 25), batch 128 /
  256, clip 2.0, the GraphLoss objective (relation module after 8000 steps, mask weight
  1.0 / 1.5)."""
  if dataset not in TRAIN_CAPTIONS:
    raise ValueError(f"dataset {dataset!r}: expected one of {tuple(TRAIN_CAPTIONS)}")
  c.model.hrem.bert_path = "bert-base-uncased"
  recipes.region_features(c, "precomp")
  recipes.joint_space(c, embed_size=1024, word_dim=300)
  # Their captions are never cut: data.max_len=-1 (the default) keeps them whole.
  c.eval.batch_size = 128
  return _training(c, dataset, LEARNING_RATE, EPOCHS, MILESTONES, BATCH[dataset],
                   TRAIN_CAPTIONS[dataset] // BATCH[dataset])


def demo(c):
  """HREM on the synthetic world, 256-wide (8 heads), 3 epochs at batch 64 on the
  MiniLM-L6 weights (BERT at lr x 0.1, as theirs); the relation module joins after the
  first epoch (their 8000 steps are the first 7 of 30 F30K epochs)."""
  c.model.hrem.bert_path = minilm_dir()
  c.model.hrem.nhead = 8
  recipes.joint_space(c, embed_size=256, word_dim=128)
  recipes.demo_training(c)
  steps = recipes.synthetic_epoch_steps(c)
  c.model.hrem.warmup = steps
  _training(c, "f30k", c.train.learning_rate, c.train.num_epochs, "", c.train.batch_size,
            steps)
  c.train.lr_update = 10  # no decay in 3 epochs
  return c


def validate(c):
  """Raises ValueError naming the first HREM key out of range."""
  OPTIONS.validate(c.model)
  recipes.validate_widths(c)
  s = c.model.hrem
  if c.model.embed_size % s.nhead:
    raise ValueError(f"config.model.embed_size={c.model.embed_size} must be divisible by "
                     f"config.model.hrem.nhead={s.nhead}")
  vse_config.check_bert_heads(c, "hrem", s.bert_random_init)

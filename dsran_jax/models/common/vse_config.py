"""Config pieces shared by the VSE∞ lineage (VSE∞, CHAN, HREM: models trained from
woodfrog/vse_infty's code). Jax-free, as every `config.py`: blocks of options each
family merges into its own table (`Options`), the hooks of a family with a BERT or a
BiGRU text encoder, and their AdamW recipe.
"""
from typing import List

from dsran_jax.hub import minilm_dir
from dsran_jax.models.common import recipes
from dsran_jax.models.common.options import Option, integer_at_least, within

TEXT_ENCODERS = ("bert", "bigru")
# Training captions of the precomp releases (5 per image: F30K 29,000 images, COCO
# 113,287); their loaders drop the last partial batch, so one warm-up epoch is
# captions // batch steps.
TRAIN_CAPTIONS = {"f30k": 145_000, "coco": 566_435}
# Their optimiser per text encoder (VSE∞ vse.py, CHAN lib/model.py): the BERT build
# AdamW(weight_decay=1e-4) with BERT at lr x 0.1; the BiGRU build AdamW(params, lr) with
# torch's default weight_decay 0.01 and one group.
WEIGHT_DECAY = {"bert": 1e-4, "bigru": 0.01}
BERT_LR_FACTOR = {"bert": 0.1, "bigru": 1.0}


def check_text_encoder(text_encoder: str) -> None:
  """Raises ValueError unless `text_encoder` (a recipe's argument) is one of
  `TEXT_ENCODERS`."""
  if text_encoder not in TEXT_ENCODERS:
    raise ValueError(f"text_encoder={text_encoder!r}: expected one of {TEXT_ENCODERS}")


def norm_options(image: str, text: str) -> List[Option]:
  """`no_imgnorm` / `no_txtnorm`: their flags that skip the l2norm of `image` / `text`
  (what each family normalises, e.g. "region embeddings")."""
  return [Option("no_imgnorm", False, None, f"no l2norm of the {image}"),
          Option("no_txtnorm", False, None, f"no l2norm of the {text}")]


def bigru_layers_option() -> Option:
  """`num_layers`: the BiGRU build's layers."""
  return Option("num_layers", 1, integer_at_least(1), "BiGRU layers (their --num_layers)")


def augmentation_options(region_source: str, token_source: str = "their process_caption: 0.2",
                         field: bool = True) -> List[Option]:
  """`region_drop` / `token_mask`: their loader's training augmentation
  (`common.vse_augment`), each at 0.2; `*_source` says where a family's rate comes
  from; `field=False`: config keys only (the family's hooks read them)."""
  rate = within(0.0, 1.0, high_open=True)
  return [
      Option("region_drop", 0.2, rate,
             f"training: each region dropped with this probability ({region_source})",
             field=field),
      Option("token_mask", 0.2, rate,
             "training: share of words masked (1/2), randomised (1/10) or deleted (2/5) "
             f"({token_source})", field=field),
  ]


def config_hooks(section: str):
  """`(image_keys, text_keys, frozen_paths, tokenizer, bert_path)`, the config hooks of
  a family of detector regions and words, nothing frozen, whose
  `config.model.<section>.text_encoder` is "bert" (WordPiece from its `bert_path`) or
  "bigru" (a word vocabulary)."""

  def tokenizer(model_config):
    s = model_config[section] if section in model_config else model_config
    return "bert" if s.text_encoder == "bert" else "vocab"

  def bert_path(model_config) -> str:
    s = model_config[section]
    return s.bert_path if s.text_encoder == "bert" else ""

  tokenizer.__doc__ = (f'"bert" (WordPiece from `model.{section}.bert_path`) or "vocab" '
                       f'(BiGRU).')
  bert_path.__doc__ = 'The BERT directory (or hub name) of the BERT build; "" for BiGRU.'
  return recipes.region_keys, recipes.word_keys, recipes.nothing_frozen, tokenizer, bert_path


def adamw(c, weight_decay: float, bert_lr_scale: float):
  """Their AdamW: `weight_decay`, the BERT parameters at lr x `bert_lr_scale`."""
  c.train.optimizer = "adamw"
  c.train.weight_decay = weight_decay
  c.train.bert_lr_scale = bert_lr_scale
  return c


def text_encoder_adamw(c, text_encoder: str):
  """`adamw` with the weight decay and BERT factor of their `text_encoder` build."""
  return adamw(c, WEIGHT_DECAY[text_encoder], BERT_LR_FACTOR[text_encoder])


def hinge_adamw(c, text_encoder: str, learning_rate: float, num_epochs: int,
                lr_update: int, batch_size: int, warmup_steps: int):
  """Their training: AdamW (`text_encoder_adamw`), global-norm clip 2.0, x0.1 at
  `lr_update`, `batch_size` pairs a step; the hinge with summed violations for
  `warmup_steps` (--vse_mean_warmup_epochs), then hardest negatives."""
  recipes.adam_clipped(c, learning_rate, num_epochs, lr_update, batch_size)
  text_encoder_adamw(c, text_encoder)
  return recipes.hinge_loss(c, max_violation=True, sum_violation_steps=warmup_steps)


def demo(c, section: str, text_encoder: str):
  """The synthetic-world run of a BERT / BiGRU family: the BERT build on the MiniLM-L6
  weights, 256-wide, `recipes.demo_training` with no lr decay in its 3 epochs, their
  `hinge_adamw` with one epoch of summed violations."""
  if text_encoder == "bert":
    c.model[section].bert_path = minilm_dir()
  recipes.joint_space(c, embed_size=256, word_dim=128)
  recipes.demo_training(c)
  c.train.lr_update = 10  # no decay in 3 epochs
  return hinge_adamw(c, text_encoder, c.train.learning_rate, c.train.num_epochs,
                     c.train.lr_update, c.train.batch_size, recipes.synthetic_epoch_steps(c))


def check_bert_heads(c, section: str, active: bool = True) -> None:
  """Raises ValueError when `active` and `config.model.<section>.bert`'s hidden size is
  not a multiple of its heads."""
  b = c.model[section].bert
  if active and b.hidden_size % b.num_heads:
    raise ValueError(f"config.model.{section}.bert.hidden_size={b.hidden_size} must be "
                     f"divisible by config.model.{section}.bert.num_heads={b.num_heads}")

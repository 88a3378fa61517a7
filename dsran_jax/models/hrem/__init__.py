"""HREM (Fu et al., CVPR 2023; CrossmodalGroup/HREM): the family's module builder and
hooks. Options: `config.model.hrem` (see config.py); the training objective with its
relation module: objective.py."""
from typing import Optional

from dsran_jax.core.text_policy import TextPolicy
from dsran_jax.models.common.bert import BertConfig, bert_config_of, with_pretrained_bert
from dsran_jax.models.common.vse_augment import Augmentation, augmentation_of
from dsran_jax.models.hrem.config import OPTIONS
from dsran_jax.models.hrem.model import Hrem, HremConfig
from dsran_jax.models.hrem.objective import GraphObjective, objective_config


def bert_config_from(model_config) -> BertConfig:
  """The BertConfig of the text encoder (`common.bert.bert_config_of` of model.hrem)."""
  return bert_config_of(model_config.hrem, "hrem")


def model_config_from(model_config, vocab_size: Optional[int] = None) -> HremConfig:
  """Turns `config.model` (ml_collections) into the hashable HremConfig; every
  `model.hrem` option is checked, the objective's too (they are not Module fields)."""
  OPTIONS.validate(model_config)
  return OPTIONS.module_config(HremConfig, model_config, vocab_size,
                               bert=bert_config_from(model_config))


def build(model_config, vocab_size: Optional[int] = None) -> Hrem:
  """The HREM module for `config.model`."""
  cfg = model_config if isinstance(model_config, HremConfig) else model_config_from(
      model_config, vocab_size)
  return Hrem(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """The pretrained BERT of model.hrem.bert_path (unless bert_random_init), as their
  `BertModel.from_pretrained('bert-base-uncased')`."""
  del vocab
  s = config.model.hrem
  if s.bert_random_init:
    return variables
  return with_pretrained_bert(variables, s.bert_path, "txt_enc")


def training_objective(config, sampler=None) -> GraphObjective:
  """Their GraphLoss with its relation module (`objective.GraphObjective`); `sampler`
  replaces the draw of the triplet negatives (tests)."""
  return GraphObjective(objective_config(config), sampler)


def train_augmentation(config, vocab_size: Optional[int] = None) -> Optional[Augmentation]:
  """Their loader's region dropout (--size_augment 1) and WordPiece masking
  (process_caption_bert), which are VSE∞'s (`common.vse_augment.Augmentation`), at the
  rates of `model.hrem.region_drop` / `token_mask`; None when both are 0."""
  s = config.model.hrem
  return augmentation_of(s, "bert", s.bert_path, vocab_size or 0, "HREM")


def text_policy(model: Hrem, config):
  """Captions are never cut (their loader never cuts them); BERT attention and the
  pooling are masked. The BERT position table bounds a caption's length."""
  del config
  return TextPolicy(max_positions=model.config.bert.max_position)


__all__ = ["GraphObjective", "Hrem", "HremConfig", "bert_config_from", "build",
           "load_pretrained", "model_config_from", "text_policy", "training_objective",
           "train_augmentation"]

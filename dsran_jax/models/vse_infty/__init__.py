"""VSE∞ (Chen et al., CVPR 2021; woodfrog/vse_infty): the family's module builder and
hooks. Options: `config.model.vse_infty` (see config.py)."""
from typing import Optional

from dsran_jax.core.text_policy import TextPolicy
from dsran_jax.models.common.bert import BertConfig, bert_config_of, with_pretrained_bert
from dsran_jax.models.common.vse_augment import Augmentation, augmentation_of
from dsran_jax.models.vse_infty.config import OPTIONS
from dsran_jax.models.vse_infty.model import VseInfty, VseInftyConfig


def bert_config_from(model_config) -> BertConfig:
  """The BertConfig of the BERT build (`common.bert.bert_config_of` of model.vse_infty)."""
  return bert_config_of(model_config.vse_infty, "vse_infty")


def model_config_from(model_config, vocab_size: Optional[int] = None) -> VseInftyConfig:
  """Turns `config.model` (ml_collections) into the hashable VseInftyConfig."""
  bert = (bert_config_from(model_config)
          if model_config.vse_infty.text_encoder == "bert" else None)
  return OPTIONS.module_config(VseInftyConfig, model_config, vocab_size, bert=bert)


def build(model_config, vocab_size: Optional[int] = None) -> VseInfty:
  """The VSE∞ module for `config.model` (BiGRU: `vocab_size` words, plus `<mask>`)."""
  cfg = model_config if isinstance(model_config, VseInftyConfig) else model_config_from(
      model_config, vocab_size)
  return VseInfty(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """BERT build: the pretrained BERT of model.vse_infty.bert_path (unless
  bert_random_init), as their `BertModel.from_pretrained`; the BiGRU build starts from
  random weights, as theirs."""
  del vocab
  s = config.model.vse_infty
  if s.text_encoder != "bert" or s.bert_random_init:
    return variables
  return with_pretrained_bert(variables, s.bert_path, "txt_enc")


def train_augmentation(config, vocab_size: Optional[int] = None) -> Optional[Augmentation]:
  """Their loader's region dropout and token masking (`common.vse_augment.Augmentation`) at the
  rates of `model.vse_infty.region_drop` / `token_mask`; None when both are 0."""
  s = config.model.vse_infty
  return augmentation_of(s, s.text_encoder, s.bert_path,
                         config.model.vocab_size or vocab_size, "VSE∞")


def text_policy(model: VseInfty, config):
  """Captions are never cut (their loader never cuts them); BERT attention and the GRU
  are masked, so any padded width gives the same embeddings. The BERT build's position
  table bounds a caption's length."""
  del config
  bert = model.config.bert
  return TextPolicy(max_positions=bert.max_position if bert is not None else None)


__all__ = ["VseInfty", "VseInftyConfig", "bert_config_from", "build", "load_pretrained",
           "model_config_from", "text_policy", "train_augmentation"]

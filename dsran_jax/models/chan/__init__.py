"""CHAN (Pan et al., CVPR 2023; ppanzx/CHAN): the family's module builder and hooks.
Options: `config.model.chan` (see config.py)."""
from typing import Optional

from dsran_jax.core.text_policy import TextPolicy
from dsran_jax.models.chan.config import OPTIONS
from dsran_jax.models.chan.model import CHAN, ChanConfig
from dsran_jax.models.common.bert import BertConfig, bert_config_of, with_pretrained_bert
from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.common.vse_augment import Augmentation, augmentation_of


def bert_config_from(model_config) -> BertConfig:
  """The BertConfig of the BERT build (`common.bert.bert_config_of` of model.chan)."""
  return bert_config_of(model_config.chan, "chan")


def model_config_from(model_config, vocab_size: Optional[int] = None) -> ChanConfig:
  """Turns `config.model` (ml_collections) into the hashable ChanConfig."""
  bert = (bert_config_from(model_config)
          if model_config.chan.text_encoder == "bert" else None)
  return OPTIONS.module_config(ChanConfig, model_config, vocab_size, bert=bert)


def build(model_config, vocab_size: Optional[int] = None) -> CHAN:
  """The CHAN module for `config.model` (BiGRU: `vocab_size` words, plus `<mask>`)."""
  cfg = model_config if isinstance(model_config, ChanConfig) else model_config_from(
      model_config, vocab_size)
  return CHAN(cfg)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """BERT build: the pretrained BERT of model.chan.bert_path (unless bert_random_init),
  as their `BertModel.from_pretrained`; BiGRU build: GloVe rows from `model.glove_path`
  when set (their --wemb_type=glove; `<mask>` keeps its Xavier init, GloVe has no such
  word)."""
  s = config.model.chan
  if s.text_encoder == "bert":
    return variables if s.bert_random_init else with_pretrained_bert(
        variables, s.bert_path, "txt_enc")
  return load_configured_glove(variables, config, vocab, module="txt_enc")


def train_augmentation(config, vocab_size: Optional[int] = None) -> Optional[Augmentation]:
  """Their loaders' region dropout and token masking (VSE∞'s,
  `common.vse_augment.Augmentation`) at `model.chan.region_drop` / `token_mask`; None
  when both are 0."""
  s = config.model.chan
  return augmentation_of(s, s.text_encoder, s.bert_path,
                         config.model.vocab_size or vocab_size, "CHAN")


def text_policy(model: CHAN, config):
  """Captions are never cut (their loaders never cut them); BERT attention and the GRU
  are masked, so any padded width gives the same words. The BERT build's position
  table bounds a caption's length."""
  del config
  bert = model.config.bert
  return TextPolicy(max_positions=bert.max_position if bert is not None else None)


__all__ = ["CHAN", "ChanConfig", "bert_config_from", "build", "load_pretrained",
           "model_config_from", "text_policy", "train_augmentation"]

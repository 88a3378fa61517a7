"""The module builder and hooks of a VSE∞-lineage family whose text encoder is BERT or
a BiGRU (`config.model.<section>.text_encoder`: VSE∞, CHAN), written once for both: the
family's `__init__.py` takes them from `hooks` and adds what is its own
(`load_pretrained`).
"""
from typing import Optional

from dsran_jax.core.text_policy import TextPolicy
from dsran_jax.models.common.bert import BertConfig, bert_config_of
from dsran_jax.models.common.vse_augment import Augmentation, augmentation_of


def hooks(section: str, options, config_cls, module_cls, name: str):
  """`(bert_config_from, model_config_from, build, train_augmentation, text_policy)` of
  the family whose options are `options` under `config.model.<section>`, whose Module is
  `module_cls(config_cls)`; `name` names it in messages ("VSE∞")."""

  def bert_config_from(model_config) -> BertConfig:
    """The BertConfig of the BERT build (`common.bert.bert_config_of` of its section)."""
    return bert_config_of(model_config[section], section)

  def model_config_from(model_config, vocab_size: Optional[int] = None):
    """Turns `config.model` (ml_collections) into the family's hashable Module config."""
    bert = (bert_config_from(model_config)
            if model_config[section].text_encoder == "bert" else None)
    return options.module_config(config_cls, model_config, vocab_size, bert=bert)

  def build(model_config, vocab_size: Optional[int] = None):
    """The Module for `config.model` (BiGRU: `vocab_size` words, plus `<mask>`)."""
    cfg = model_config if isinstance(model_config, config_cls) else model_config_from(
        model_config, vocab_size)
    return module_cls(cfg)

  def train_augmentation(config, vocab_size: Optional[int] = None) -> Optional[Augmentation]:
    """Their loader's region dropout and token masking (VSE∞'s,
    `common.vse_augment.Augmentation`) at the section's `region_drop` / `token_mask`;
    None when both are 0."""
    s = config.model[section]
    return augmentation_of(s, s.text_encoder, s.bert_path,
                           config.model.vocab_size or vocab_size, name)

  def text_policy(model, config):
    """Captions are never cut (their loaders never cut them); BERT attention and the GRU
    are masked, so any padded width gives the same outputs. The BERT build's position
    table bounds a caption's length."""
    del config
    bert = model.config.bert
    return TextPolicy(max_positions=bert.max_position if bert is not None else None)

  return bert_config_from, model_config_from, build, train_augmentation, text_policy

"""CHAN (Pan et al., CVPR 2023; ppanzx/CHAN): the family's module builder and hooks.
Options: `config.model.chan` (see config.py); the builder, augmentation (VSE∞'s loader)
and text policy are the lineage's (`common.vse_family`)."""
from dsran_jax.models.chan.config import OPTIONS
from dsran_jax.models.chan.model import CHAN, ChanConfig
from dsran_jax.models.common.bert import with_pretrained_bert
from dsran_jax.models.common.glove import load_configured_glove
from dsran_jax.models.common.vse_family import hooks

(bert_config_from, model_config_from, build, train_augmentation,
 text_policy) = hooks("chan", OPTIONS, ChanConfig, CHAN, "CHAN")


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


__all__ = ["CHAN", "ChanConfig", "bert_config_from", "build", "load_pretrained",
           "model_config_from", "text_policy", "train_augmentation"]

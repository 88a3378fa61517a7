"""VSE∞ (Chen et al., CVPR 2021; woodfrog/vse_infty): the family's module builder and
hooks. Options: `config.model.vse_infty` (see config.py); the builder, augmentation and
text policy are the lineage's (`common.vse_family`)."""
from dsran_jax.models.common.bert import with_pretrained_bert
from dsran_jax.models.common.vse_family import hooks
from dsran_jax.models.vse_infty.config import OPTIONS
from dsran_jax.models.vse_infty.model import VseInfty, VseInftyConfig

(bert_config_from, model_config_from, build, train_augmentation,
 text_policy) = hooks("vse_infty", OPTIONS, VseInftyConfig, VseInfty, "VSE∞")


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """BERT build: the pretrained BERT of model.vse_infty.bert_path (unless
  bert_random_init), as their `BertModel.from_pretrained`; the BiGRU build starts from
  random weights, as theirs."""
  del vocab
  s = config.model.vse_infty
  if s.text_encoder != "bert" or s.bert_random_init:
    return variables
  return with_pretrained_bert(variables, s.bert_path, "txt_enc")


__all__ = ["VseInfty", "VseInftyConfig", "bert_config_from", "build", "load_pretrained",
           "model_config_from", "text_policy", "train_augmentation"]

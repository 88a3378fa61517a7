"""SCAN (Lee et al., ECCV 2018; kuanghuei/SCAN): the family's module builder and weight
hooks. Options: `config.model.scan` (see config.py)."""
from typing import Optional

from dsran_jax.models.scan.model import SCAN, ScanConfig
from dsran_jax.core.text_policy import TextPolicy


def model_config_from(model_config, vocab_size: Optional[int] = None) -> ScanConfig:
  """Turns `config.model` (ml_collections) into the hashable ScanConfig."""
  m = model_config
  s = m.scan
  return ScanConfig(
      vocab_size=int(vocab_size or m.vocab_size), embed_size=int(m.embed_size),
      word_dim=int(m.word_dim), img_dim=int(m.img_dim), cross_attn=s.cross_attn,
      agg_func=s.agg_func, lambda_softmax=float(s.lambda_softmax),
      lambda_lse=float(s.lambda_lse), raw_feature_norm=s.raw_feature_norm,
      bi_gru=bool(s.bi_gru), num_layers=int(s.num_layers), no_imgnorm=bool(s.no_imgnorm),
      no_txtnorm=bool(s.no_txtnorm), precomp_enc_type=s.precomp_enc_type,
      max_block_elements=int(s.max_block_elements))


def build(model_config, vocab_size: Optional[int] = None) -> SCAN:
  """The SCAN module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, ScanConfig) else model_config_from(
      model_config, vocab_size)
  return SCAN(cfg)


def load_pretrained(variables: dict, config, workdir: Optional[str] = None) -> dict:
  """SCAN trains its word embeddings from U(-0.1, 0.1); with `model.glove_path` set, the
  vocabulary's GloVe rows replace them (an option beyond the authors' recipe)."""
  from dsran_jax.models.common.glove import load_configured_glove  # pylint: disable=g-import-not-at-top
  return load_configured_glove(variables, config, workdir, module="txt_enc")


def text_policy(model: SCAN, config):
  """How inference batches captions (`core.text_policy.TextPolicy`): texts are never cut to
  `data.max_len`, as the authors' loader never cuts them. A caption's words depend on
  itself alone (masked GRU, masked attention), so any width gives the same scores."""
  del model, config
  return TextPolicy(untruncated=True)


__all__ = ["SCAN", "ScanConfig", "build", "load_pretrained", "model_config_from",
           "text_policy"]

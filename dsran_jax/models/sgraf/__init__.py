"""SGRAF (Diao et al., AAAI 2021; Paranioar/SGRAF): the family's module builder and
weight hooks. Options: `config.model.sgraf` (see config.py)."""
from typing import Optional

from dsran_jax.models.common.similarity import Extensions
from dsran_jax.models.sgraf.model import SGRAF, SgrafConfig
from dsran_jax.core.text_policy import TextPolicy


def model_config_from(model_config, vocab_size: Optional[int] = None,
                      ext: Extensions = Extensions()) -> SgrafConfig:
  """Turns `config.model` (ml_collections) into the hashable SgrafConfig (`ext`: the
  KIDRR per-pair modules, off for SGRAF)."""
  m = model_config
  s = m.sgraf
  return SgrafConfig(
      vocab_size=int(vocab_size or m.vocab_size), embed_size=int(m.embed_size),
      word_dim=int(m.word_dim), img_dim=int(m.img_dim), num_regions=int(s.num_regions),
      module=s.module, sim_dim=int(s.sim_dim), sgr_step=int(s.sgr_step),
      bi_gru=bool(s.bi_gru), num_layers=int(s.num_layers), no_imgnorm=bool(s.no_imgnorm),
      no_txtnorm=bool(s.no_txtnorm), embed_dropout=float(s.embed_dropout),
      sa_dropout=float(s.sa_dropout), reference_bn=bool(s.reference_bn),
      lambda_softmax=float(s.lambda_softmax), max_block_elements=int(s.max_block_elements),
      length_bucket=int(s.length_bucket), dtype=str(m.dtype), ext=ext)


def build(model_config, vocab_size: Optional[int] = None) -> SGRAF:
  """The SGRAF module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, SgrafConfig) else model_config_from(
      model_config, vocab_size)
  return SGRAF(cfg)


def load_pretrained(variables: dict, config, workdir: Optional[str] = None) -> dict:
  """SGRAF trains its word embeddings from U(-0.1, 0.1); with `model.glove_path` set,
  the vocabulary's GloVe rows replace them (an option beyond the authors' recipe)."""
  from dsran_jax.models.common.glove import load_configured_glove  # pylint: disable=g-import-not-at-top
  return load_configured_glove(variables, config, workdir, module="txt_enc")


def text_policy(model: SGRAF, config):
  """How inference batches captions (`core.text_policy.TextPolicy`): texts are never cut to
  `data.max_len`, as the authors' loader never cuts them. A caption's reps and scores
  depend on its real words alone (masked GRU, SA, attention and graph), so any width
  gives the same scores."""
  del model, config
  return TextPolicy(untruncated=True)


__all__ = ["SGRAF", "SgrafConfig", "build", "load_pretrained", "model_config_from",
           "text_policy"]

"""BSSAN-R (the reconstruction of Huang et al., IEEE TIP 2019, in /work/shared/MODELS.md
section 5): the family's module builder and weight hooks. Options: `config.model.bssan`
(see config.py). No checkpoints of the authors exist, so there is no converter."""
from typing import Optional

from dsran_jax.models.bssan.model import BSSAN, BssanConfig


def model_config_from(model_config, vocab_size: Optional[int] = None) -> BssanConfig:
  """Turns `config.model` (ml_collections) into the hashable BssanConfig."""
  m = model_config
  s = m.bssan
  return BssanConfig(
      vocab_size=int(vocab_size or m.vocab_size), embed_size=int(m.embed_size),
      word_dim=int(m.word_dim), img_dim=int(m.img_dim), directions=s.directions,
      w2r=s.w2r, w2r_visual=s.w2r_visual, bi_lstm=bool(s.bi_lstm),
      lstm_dropout=float(s.lstm_dropout), txt_norm=bool(s.txt_norm),
      lambda_w2r=float(s.lambda_w2r), lambda_o2w=float(s.lambda_o2w), w2r_agg=s.w2r_agg,
      o2w_agg=s.o2w_agg, lambda_lse=float(s.lambda_lse), cosine_proj=bool(s.cosine_proj),
      bilinear_init=s.bilinear_init, fuse=s.fuse, fuse_weight=float(s.fuse_weight),
      mlp_hidden=int(s.mlp_hidden), scan_unroll=int(s.scan_unroll),
      max_block_elements=int(s.max_block_elements))


def build(model_config, vocab_size: Optional[int] = None) -> BSSAN:
  """The BSSAN module for `config.model` (`vocab_size`: the word vocabulary's size)."""
  cfg = model_config if isinstance(model_config, BssanConfig) else model_config_from(
      model_config, vocab_size)
  return BSSAN(cfg)


def load_pretrained(variables: dict, config, workdir: Optional[str] = None) -> dict:
  """Word embeddings start from U(-0.1, 0.1); with `model.glove_path` set, the
  vocabulary's GloVe rows replace them (MODELS.md 5.1: "GloVe optional")."""
  from dsran_jax.models.common.glove import load_configured_glove  # pylint: disable=g-import-not-at-top
  return load_configured_glove(variables, config, workdir, module="txt_enc")


__all__ = ["BSSAN", "BssanConfig", "build", "load_pretrained", "model_config_from"]

"""Flickr30K with the authors' recipe of a model family. No argument is DSRAN's BERT
build (12 epochs, batch 128, lr 2e-5 with BertAdam warmup 0.1, x0.1 at epoch 6, K=2) on
their VLP region features plus grid features; `configs/f30k.py:<family>` (scan, ...)
takes that family's recipe (see dsran_jax/models/<family>/config.py).

    python -m dsran_jax.main --config=configs/f30k.py --workdir=workdirs/f30k \
        --config.data.root=/path/to/f30k --config.model.dsran.bert_path=/path/to/bert-base-uncased
    python -m dsran_jax.main --config=configs/f30k.py:scan --workdir=workdirs/f30k_scan \
        --config.data.root=/path/to/f30k_precomp
"""
from dsran_jax.default_config import recipe_config


def get_config(arg: str = ""):
  """`arg`: family[,key=value...] (`default_config.parse_config_arg`)."""
  return recipe_config("f30k", arg)

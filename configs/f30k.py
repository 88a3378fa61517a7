"""Flickr30K, BERT build: the authors' recipe (12 epochs, batch 128, lr 2e-5 with BertAdam
warmup 0.1, x0.1 at epoch 6, K=2) on their VLP region features plus grid features.

    python -m dsran_jax.main --config=configs/f30k.py --workdir=workdirs/f30k \
        --config.data.root=/path/to/f30k --config.model.bert_path=/path/to/bert-base-uncased
"""
from dsran_jax.default_config import authors_recipe


def get_config():
  return authors_recipe("f30k", "bert")

"""Flickr30K, BERT build: the authors' recipe (12 epochs, batch 128, lr 2e-5 with BertAdam
warmup 0.1, x0.1 at epoch 6, K=2) on their VLP region features plus grid features.

    python -m dsran_jax.main --config=configs/f30k.py --workdir=workdirs/f30k \
        --config.data.root=/path/to/f30k --config.model.bert_path=/path/to/bert-base-uncased
"""
from dsran_jax.default_config import get_base_config


def get_config():
  c = get_base_config()
  c.data.format = "vlp"
  c.data.name = "f30k"
  c.data.num_regions = 100
  c.model.text_encoder = "bert"
  c.model.bert_path = "bert-base-uncased"
  c.model.K = 2
  c.train.batch_size = 128
  c.train.num_epochs = 12
  c.train.lr_update = 6
  c.train.learning_rate = 2e-5
  c.train.optimizer = "bertadam"
  c.train.warmup = 0.1
  c.eval.protocol = "1k"
  return c

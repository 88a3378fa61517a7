"""Flickr30K, GRU build: the authors' recipe (Adam 2e-4, 16 epochs, batch 128, x0.1 at
epoch 8, K=2, gradient clipping 2.0); word embeddings from GloVe if a file is given.

    python -m dsran_jax.main --config=configs/f30k_gru.py --workdir=workdirs/f30k_gru \
        --config.data.root=/path/to/f30k [--config.model.glove_path=glove.840B.300d.txt]
"""
from dsran_jax.default_config import get_base_config


def get_config():
  c = get_base_config()
  c.data.format = "vlp"
  c.data.name = "f30k"
  c.data.num_regions = 100
  c.model.text_encoder = "gru"
  c.model.use_region_pos = False
  c.model.K = 2
  c.train.batch_size = 128
  c.train.num_epochs = 16
  c.train.lr_update = 8
  c.train.learning_rate = 2e-4
  c.train.optimizer = "adam"
  c.train.warmup = 0.0
  c.train.grad_clip = 2.0
  c.eval.protocol = "1k"
  return c

"""MS-COCO, GRU build: the authors' recipe (Adam 2e-4, 18 epochs, batch 300, x0.1 at
epoch 9, K=2, gradient clipping 2.0). Test reports COCO 5K and the 5-fold COCO 1K.

    python -m dsran_jax.main --config=configs/coco_gru.py --workdir=workdirs/coco_gru \
        --config.data.root=/path/to/coco [--config.model.glove_path=glove.840B.300d.txt]

batch 300 needs a device count that divides it (1, 2, 3, 4, 5, 6, 10, 12, ...).
"""
from dsran_jax.default_config import get_base_config


def get_config():
  c = get_base_config()
  c.data.format = "vlp"
  c.data.name = "coco"
  c.data.num_regions = 100
  c.data.test_split = "testall"
  c.model.text_encoder = "gru"
  c.model.use_region_pos = False
  c.model.K = 2
  c.train.batch_size = 300
  c.train.num_epochs = 18
  c.train.lr_update = 9
  c.train.learning_rate = 2e-4
  c.train.optimizer = "adam"
  c.train.warmup = 0.0
  c.train.grad_clip = 2.0
  c.eval.protocol = "coco"
  return c

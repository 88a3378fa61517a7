"""MS-COCO, BERT build: the authors' recipe (18 epochs, batch 320, lr 2e-5 with BertAdam
warmup 0.1, x0.1 at epoch 9, K=4). Dev = first 1000 val images; test reports COCO 5K and
the 5-fold COCO 1K.

    python -m dsran_jax.main --config=configs/coco.py --workdir=workdirs/coco \
        --config.data.root=/path/to/coco --config.model.bert_path=/path/to/bert-base-uncased
"""
from dsran_jax.default_config import get_base_config


def get_config():
  c = get_base_config()
  c.data.format = "vlp"
  c.data.name = "coco"
  c.data.num_regions = 100
  c.data.test_split = "testall"
  c.model.text_encoder = "bert"
  c.model.bert_path = "bert-base-uncased"
  c.model.K = 4
  c.train.batch_size = 320
  c.train.num_epochs = 18
  c.train.lr_update = 9
  c.train.learning_rate = 2e-5
  c.train.optimizer = "bertadam"
  c.train.warmup = 0.1
  c.eval.protocol = "coco"
  return c

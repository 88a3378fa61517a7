"""MS-COCO, BERT build: the authors' recipe (18 epochs, batch 320, lr 2e-5 with BertAdam
warmup 0.1, x0.1 at epoch 9, K=4). Dev = first 1000 val images; test reports COCO 5K and
the 5-fold COCO 1K.

    python -m dsran_jax.main --config=configs/coco.py --workdir=workdirs/coco \
        --config.data.root=/path/to/coco --config.model.bert_path=/path/to/bert-base-uncased
"""
from dsran_jax.default_config import authors_recipe


def get_config():
  return authors_recipe("coco", "bert")

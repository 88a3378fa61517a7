"""MS-COCO, GRU build: the authors' recipe (Adam 2e-4, 18 epochs, batch 300, x0.1 at
epoch 9, K=2, gradient clipping 2.0, dev on the first 1000 images, VSE++'s vocabulary of
every caption, GloVe 840B word embeddings: give the file, else the run says it departs
from their initialisation). Test reports COCO 5K and the 5-fold COCO 1K.

    python -m dsran_jax.main --config=configs/coco_gru.py --workdir=workdirs/coco_gru \
        --config.data.root=/path/to/coco --config.model.glove_path=glove.840B.300d.txt

batch 300 needs a device count that divides it (1, 2, 3, 4, 5, 6, 10, 12, ...).
"""
from dsran_jax.default_config import authors_recipe


def get_config():
  return authors_recipe("coco", "gru")

"""Flickr30K, GRU build: the authors' recipe (Adam 2e-4, 16 epochs, batch 128, x0.1 at
epoch 8, K=2, gradient clipping 2.0, dev on all 1014 val images, VSE++'s vocabulary of
every caption); word embeddings from GloVe 840B as theirs: give the file, else the run
says it departs from their initialisation (docs/fidelity.md).

    python -m dsran_jax.main --config=configs/f30k_gru.py --workdir=workdirs/f30k_gru \
        --config.data.root=/path/to/f30k --config.model.glove_path=glove.840B.300d.txt
"""
from dsran_jax.default_config import authors_recipe


def get_config():
  return authors_recipe("f30k", "gru")

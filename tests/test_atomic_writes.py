"""Files written for a user are atomic (issue 26): a kill at any instant leaves the old
file or the new one, never a torn or empty one, and a failed conversion leaves no
half workdir.

- SIGKILL at the first write and at the fsync of each result file: one worker process
  (`python tests/test_atomic_writes.py DIR`, on a tiny converted SCAN workdir holding
  an old version of every file) saves the config and the vocabulary, evaluates with
  `--save_sims` (sims, eval_results.json, ranks), draws the recall figure and finally
  converts a checkpoint it kills at the checkpoint write. Its `open` and `os.fsync` are
  patched: at the first write (and the first fsync) of a watched file the process
  forks, and the child, the writer as it is at that instant, writes half the bytes
  and SIGKILLs itself; the parent waits for that death, copies what the target path
  holds then, undoes the child's bytes and goes on. The copies must equal the old file
  or the finished new one.
- A static rule: no module of dsran_jax writes a file by itself (open for writing,
  np.save/np.savez, json.dump, savefig, h5py, faiss, shutil.copy, os.replace ...)
  outside `dsran_jax/atomic.py`, but for the few allowed below, each with its reason.
"""
import ast
import errno
import io
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dsran_jax import atomic, checkpointing, extract
from dsran_jax.core.vocab import Vocabulary
from dsran_jax.evaluation import retrieval
from dsran_jax.models.common import resnet
from dsran_jax.tools import convert_torch
from dsran_jax.workdir import Workdir

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PACKAGE = pathlib.Path(REPO) / "dsran_jax"
TIMEOUT_S = 300
STEP = 40  # the checkpoint's Eiters: the converted step


# ------------------------------------------------------------------ a tiny SCAN

def scan_checkpoint(seed: int = 0, vocab_size: int = 12) -> dict:
  """A SCAN train.py checkpoint as `convert.engine.load_checkpoint` returns it (numpy
  tensors, `opt` as a dict): tiny, random, no torch needed."""
  e, d, w = 8, 16, 5
  rng = np.random.default_rng(seed)

  def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  gru = {"rnn.weight_ih_l0": r(3 * e, w), "rnn.weight_hh_l0": r(3 * e, e),
         "rnn.bias_ih_l0": r(3 * e), "rnn.bias_hh_l0": r(3 * e)}
  opt = {"cross_attn": "t2i", "agg_func": "Mean", "lambda_softmax": 9.0, "lambda_lse": 6.0,
         "raw_feature_norm": "clipped_l2norm", "bi_gru": False, "num_layers": 1,
         "no_imgnorm": False, "precomp_enc_type": "basic", "data_name": "f30k_precomp",
         "embed_size": e, "img_dim": d, "word_dim": w, "vocab_size": vocab_size}
  return {"model": [{"fc.weight": r(e, d), "fc.bias": r(e)},
                    {"embed.weight": r(vocab_size, w), **gru}],
          "opt": opt, "epoch": 3, "Eiters": STEP, "best_rsum": 100.0}


def vocab_words(vocab_size: int = 12, shuffle: int = 0):
  words = [f"w{i}" for i in range(vocab_size - 4)]
  if shuffle:
    words = list(np.random.default_rng(shuffle).permutation(words))
  return ["<pad>", "<start>", "<end>", "<unk>"] + words


def convert(monkeypatch_or_none, root: str, workdir: str, seed: int = 0) -> dict:
  """`convert_torch.convert_checkpoint` of `scan_checkpoint(seed)` (its reader patched
  to return the dict) with a vocabulary file, into `workdir`."""
  ckpt = scan_checkpoint(seed)
  if monkeypatch_or_none is None:
    convert_torch.load_checkpoint = lambda path: ckpt
  else:
    monkeypatch_or_none.setattr(convert_torch, "load_checkpoint", lambda path: ckpt)
  vocab = os.path.join(root, f"authors_vocab_{seed}.json")
  Vocabulary(vocab_words()).save(vocab)
  return convert_torch.convert_checkpoint(os.path.join(root, "model_best.pth.tar"),
                                          workdir, vocab=vocab)


# ------------------------------------------------------------------- the worker

# Watched files: name stem -> file name in the workdir. A stem also matches the
# temporary names a writer uses for the file (`.config.json.1a2b3c4d.tmp`, ...).
TARGETS = {"config": "config.json", "vocab": "vocab.json", "sims_test": "sims_test.npy",
           "eval_results": "eval_results.json", "ranks_test": "ranks_test.npz",
           "recall": "recall.png"}
POINTS = ("write", "fsync")
# Extraction (`python -m dsran_jax.extract`) into `features/`: at its first writes the
# whole directory is copied, to be resumed from by the test.
EXTRACTION = ("test_extract", "test_grid")


class _KillInjector:
  """Forks at the first write and the first fsync of each watched file; the child dies
  by SIGKILL there, the parent records what the target path then holds."""

  def __init__(self, root: str):
    self.root, self.snapshots, self.done = root, os.path.join(root, "snapshots"), set()
    self.real_open, self.real_fsync = io.open, os.fsync
    self.paused = False

  def stem_of(self, name) -> str:
    if isinstance(name, int):  # os.fdopen(fd): the file's name from /proc
      name = os.readlink(f"/proc/self/fd/{name}")
    name = os.path.basename(os.fspath(name))
    return next((s for s in (*TARGETS, *EXTRACTION) if s in name), None)

  def kill_point(self, stem: str, point: str, in_child=lambda: None) -> None:
    if (stem, point) in self.done:
      return
    self.done.add((stem, point))
    pid = os.fork()
    if pid == 0:  # the writer at this instant: it does `in_child` and is killed
      try:
        in_child()
      finally:
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    out = os.path.join(self.snapshots, f"{stem}@{point}")
    self.paused = True  # the copies below are not watched writes
    if stem in EXTRACTION:
      shutil.copytree(os.path.join(self.root, "features"), out)
    elif os.path.exists(os.path.join(self.root, "wd", TARGETS[stem])):
      shutil.copyfile(os.path.join(self.root, "wd", TARGETS[stem]), out)
    else:
      self.real_open(out + ".missing", "wb").close()
    self.paused = False

  def open(self, file, mode="r", *args, **kwargs):
    f = self.real_open(file, mode, *args, **kwargs)
    watch = any(c in mode for c in "wax+") and not self.paused
    stem = self.stem_of(file) if watch else None
    return _KillingFile(f, stem, self) if stem else f

  def fsync(self, fd):
    stem = None if self.paused else self.stem_of(fd)
    if stem:
      self.kill_point(stem, "fsync")
    return self.real_fsync(fd)

  def install(self):
    import builtins
    builtins.open = io.open = self.open
    os.fsync = self.fsync


class _KillingFile:
  """A file object whose first write happens half, in a child killed right after."""

  def __init__(self, f, stem, injector):
    self._f, self._stem, self._injector = f, stem, injector

  def write(self, data):
    f = self._f
    if (self._stem, "write") not in self._injector.done and len(data):
      fd = f.fileno()
      pos = os.lseek(fd, 0, os.SEEK_CUR)  # where the kernel's file offset was

      def half():
        f.write(data[:max(1, len(data) // 2)])
        f.flush()

      self._injector.kill_point(self._stem, "write", half)
      # Undo the child's bytes (it shared this open file and its offset).
      os.lseek(fd, pos, os.SEEK_SET)
      os.ftruncate(fd, pos)
    return f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __iter__(self):
    return iter(self._f)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._f.__exit__(*exc)


def _worker(root: str) -> None:
  import conftest  # noqa: F401  the test process's jax settings (8 CPU devices)

  from dsran_jax import evaluation
  from dsran_jax.figures import recall
  wd = Workdir(os.path.join(root, "wd"))
  config = wd.load_config()
  config.eval.batch_size = 5  # the new config differs from the old one
  injector = _KillInjector(root)
  injector.install()
  wd.save_config(config)
  Vocabulary(vocab_words(shuffle=1)).save(os.path.join(wd.path, "vocab.json"))
  evaluation.evaluate_workdir(wd.path, save_sims=True)
  recall.recall_curves(wd.sims_file("test"), os.path.join(wd.path, "recall.png"))
  extract.run(*_extraction_inputs(root), os.path.join(root, "features"), batch_size=2,
              show_progress=False)
  print("WRITTEN", json.dumps(sorted(f"{s}@{p}" for s, p in injector.done)), flush=True)
  # Last: a conversion killed while its checkpoint is written (renamed not yet).
  os.environ[checkpointing.CRASH_ENV] = f"best:{STEP}:written"
  convert(None, root, os.path.join(root, "converted"), seed=1)
  print("NOT KILLED", flush=True)


# --------------------------------------------------------------- kill tests

def _valid(stem: str, data: bytes) -> bool:
  """Whether `data` is a whole file of its kind (parses to the end)."""
  try:
    if stem in ("config", "vocab", "eval_results"):
      json.loads(data.decode("utf-8"))
    elif stem in ("sims_test", "ranks_test"):
      loaded = np.load(io.BytesIO(data), allow_pickle=False)
      if stem == "ranks_test":
        [np.asarray(loaded[k]) for k in loaded.files]
    else:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
    return bool(data)
  except Exception:  # noqa: BLE001  any failure to parse: not a whole file
    return False


def _extraction_inputs(root: str, make: bool = False):
  """(images directory, ResNet weights) of a tiny extraction: three pictures and a small
  random ResNet in torchvision's layout (`make`: written first)."""
  images, weights = os.path.join(root, "images"), os.path.join(root, "resnet.safetensors")
  if make:
    from safetensors.numpy import save_file
    config = resnet.ResNetConfig(depths=(1, 1, 1, 1), widths=(4, 8, 8, 8), stem_width=8)
    rng = np.random.default_rng(0)
    state = {}
    for key, shape in resnet.torch_keys(config, "torchvision").items():
      x = rng.standard_normal(shape).astype(np.float32)
      state[key] = np.abs(x) + 0.5 if key.endswith("running_var") else 0.3 * x
    save_file(state, weights)
    os.makedirs(images)
    for i, size in enumerate([(260, 300), (300, 256), (280, 280)]):
      pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(images, f"im{i}.png"))
  return images, weights


def _old_contents(wd: str) -> dict:
  """Writes an old, valid version of every watched file; returns their bytes."""
  atomic.write_json(os.path.join(wd, "eval_results.json"), {"old": True})
  atomic.save_npz(os.path.join(wd, "ranks_test.npz"), old=np.arange(3))
  atomic.save_npy(os.path.join(wd, "sims_test.npy"), np.ones((2, 10), np.float32))
  with atomic.replacing(os.path.join(wd, "recall.png")) as f:
    Image.new("RGB", (4, 3), (200, 10, 10)).save(f, format="png")
  out = {}
  for stem, name in TARGETS.items():
    with open(os.path.join(wd, name), "rb") as f:
      out[stem] = f.read()
  return out


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
  """Runs the worker once: (root, old bytes per stem, its output)."""
  root = tmp_path_factory.mktemp("atomic")
  mp = pytest.MonkeyPatch()
  try:
    convert(mp, str(root), str(root / "wd"))
  finally:
    mp.undo()
  wd = Workdir(str(root / "wd"))
  c = wd.load_config()  # the converted SCAN, evaluated on a tiny synthetic split
  c.data.format = "synthetic"
  c.data.img_dim = c.model.img_dim
  c.data.num_regions = c.data.synthetic.num_regions = 4
  c.data.synthetic.num_test_images = 10
  c.data.max_len = 16
  c.eval.batch_size = 8
  wd.save_config(c)
  old = _old_contents(wd.path)
  _extraction_inputs(str(root), make=True)
  (root / "snapshots").mkdir()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
  env.pop("DSRAN_CRASH_AT", None)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(root)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                        check=False)
  return str(root), old, proc


@pytest.mark.parametrize("stem", list(TARGETS))
def test_sigkill_at_first_write_and_fsync_leaves_old_or_new_file(killed_run, stem):
  root, old, proc = killed_run
  out = proc.stdout + proc.stderr
  assert "WRITTEN" in proc.stdout, out[-6000:]
  final_path = os.path.join(root, "wd", TARGETS[stem])
  with open(final_path, "rb") as f:
    new = f.read()
  assert new != old[stem] and _valid(stem, new), f"{final_path} was not rewritten"
  snapshots = os.path.join(root, "snapshots")
  seen = sorted(n for n in os.listdir(snapshots) if n.split("@")[0] == stem)
  assert f"{stem}@write" in seen or f"{stem}@write.missing" in seen, (
      f"no write of {TARGETS[stem]} was intercepted: {seen}")
  for name in seen:
    where = f"{TARGETS[stem]} after a SIGKILL at its {name.split('@')[1]}"
    assert not name.endswith(".missing"), f"{where}: gone (the old file was deleted)"
    with open(os.path.join(snapshots, name), "rb") as f:
      data = f.read()
    assert data in (old[stem], new), (
        f"{where}: {len(data)} bytes, neither the old file ({len(old[stem])} bytes) nor "
        f"the new one ({len(new)}): torn (valid: {_valid(stem, data)})")
  # Nothing but the temporary names the killed children left behind.
  names = os.listdir(os.path.join(root, "wd"))
  assert all(n.endswith(".tmp") and n.startswith(".") for n in names
             if n not in set(TARGETS.values()) | {"checkpoints", "evals"}), names


@pytest.mark.parametrize("stem", EXTRACTION)
def test_an_extraction_killed_at_its_first_write_resumes_to_the_same_features(
    killed_run, stem, tmp_path):
  """The extractor's record and its grid file: from what a kill at their first write
  leaves, a re-run ends with the features of the uninterrupted run."""
  root, _, proc = killed_run
  assert "WRITTEN" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
  left = os.path.join(root, "snapshots", f"{stem}@write")
  assert os.path.isdir(left), f"no write of {stem} was intercepted"
  out = str(tmp_path / "features")
  shutil.copytree(left, out)
  extract.run(*_extraction_inputs(root), out, batch_size=2, show_progress=False)
  for name in ("test_grid.npy", "test_global.npy"):
    np.testing.assert_allclose(np.load(os.path.join(out, name)),
                               np.load(os.path.join(root, "features", name)),
                               rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_killed_conversion_leaves_no_workdir(killed_run):
  root, _, proc = killed_run
  assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-3000:],
                                              proc.stderr[-3000:])
  assert "NOT KILLED" not in proc.stdout
  assert not os.path.exists(os.path.join(root, "converted"))


# ----------------------------------------------------------------- conversion

def test_a_failed_conversion_leaves_no_workdir(tmp_path, monkeypatch):
  """A checkpoint write that fails (a full disk) after config.json and vocab.json were
  written: no workdir, nothing left beside it."""

  def full_disk(workdir, kind, step, *args, **kwargs):
    raise checkpointing.CheckpointWriteError(f"cannot write checkpoint {kind!r} step {step} "
                                             f"to {workdir}: No space left on device")

  monkeypatch.setattr(checkpointing, "save", full_disk)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(checkpointing.CheckpointWriteError, match="No space left"):
    convert(monkeypatch, str(tmp_path), str(tmp_path / "out" / "wd"))
  assert not (tmp_path / "out" / "wd").exists()
  assert os.listdir(tmp_path / "out") == []
  assert sorted(os.listdir(tmp_path)) == sorted(before + ["authors_vocab_0.json", "out"])


def test_conversion_into_an_existing_workdir(tmp_path, monkeypatch):
  """Today's behaviour for an existing workdir: its config and vocabulary replaced, the
  step added, its other files kept; a failed conversion leaves them as they were."""
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "config.json").write_text('{"old": true}')
  (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
  Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "old"]).save(str(wd / "vocab.json"))
  old = {n: (wd / n).read_bytes() for n in os.listdir(wd)}
  real_save = checkpointing.save

  def full_disk(*args, **kwargs):
    raise checkpointing.CheckpointWriteError("No space left on device")

  monkeypatch.setattr(checkpointing, "save", full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError):
    convert(monkeypatch, str(tmp_path), str(wd))
  assert {n: (wd / n).read_bytes() for n in os.listdir(wd)} == old

  monkeypatch.setattr(checkpointing, "save", real_save)
  convert(monkeypatch, str(tmp_path), str(wd))
  assert sorted(os.listdir(wd)) == ["checkpoints", "config.json", "metrics.jsonl",
                                    "vocab.json"]
  assert json.loads((wd / "config.json").read_text())["model"]["name"] == "scan"
  assert Vocabulary.load(str(wd / "vocab.json")).idx2word == vocab_words()
  assert (wd / "metrics.jsonl").read_bytes() == old["metrics.jsonl"]
  assert checkpointing.all_steps(str(wd), checkpointing.BEST) == [STEP]


# ---------------------------------------------------------------- atomic itself

def test_replacing_keeps_the_old_file_on_an_error_and_uses_the_umask(tmp_path):
  path = tmp_path / "r.json"
  atomic.write_json(str(path), {"v": 1})
  with pytest.raises(RuntimeError), atomic.replacing(str(path), "w") as f:
    f.write('{"v": 2')
    raise RuntimeError("cut short")
  assert json.loads(path.read_text()) == {"v": 1}
  assert os.listdir(tmp_path) == ["r.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
  with pytest.raises(ValueError, match="expected 'w' or 'wb'"), \
      atomic.replacing(str(path), "a"):
    pass


def test_new_directory_appears_whole_or_not_at_all(tmp_path):
  with pytest.raises(RuntimeError), atomic.new_directory(str(tmp_path / "d")) as d:
    pathlib.Path(d, "half").write_text("x")
    raise RuntimeError("failed")
  assert os.listdir(tmp_path) == []
  with atomic.new_directory(str(tmp_path / "d")) as d:
    pathlib.Path(d, "whole").write_text("x")
  assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == ["whole"]
  with pytest.raises(FileExistsError, match="already exists"), \
      atomic.new_directory(str(tmp_path / "d")):
    pass


def test_a_sims_file_that_cannot_be_made_leaves_nothing(tmp_path, monkeypatch):

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np.lib.format, "open_memmap", full_disk)
  with pytest.raises(OSError, match="No space left"):
    retrieval.SimsStore(2, 10, str(tmp_path / "sims_test.npy"), max_host_bytes=1 << 30)
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- static rule

# Writers, by the name they are called with (`ast.unparse` of the callee): any call of
# these writes a file.
ALWAYS_WRITES = {
    "np.save", "np.savez", "np.savez_compressed", "numpy.save", "numpy.savez",
    "json.dump", "pickle.dump", "torch.save", "faiss.write_index", "save_file",
    "shutil.copy", "shutil.copy2", "shutil.copyfile", "shutil.copytree", "shutil.move",
    "os.replace", "os.rename", "os.link", "tf.io.write_file",
    "tf.summary.create_file_writer",
}
ALWAYS_WRITES_METHODS = {"savefig", "tofile", "write_text", "write_bytes", "imsave"}
# Callees that write when their mode argument says so: (argument index of the mode).
MODE_WRITES = {"open": 1, "io.open": 1, "os.fdopen": 1, "builtins.open": 1, "gzip.open": 1,
               "h5py.File": 1, "tf.io.gfile.GFile": 1, "np.lib.format.open_memmap": 1,
               "np.memmap": 2}
# The argument that names the file written, where it is not the first.
TARGET_ARG = {"json.dump": 1, "pickle.dump": 1, "os.replace": 1, "os.rename": 1,
              "faiss.write_index": 1, "save_file": 1}
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC")

# (module, callee) -> why it may write without `atomic`. Keep it short: a new entry
# needs a reason of this kind.
ALLOWED = {
    ("workdir/metrics.py", "os.open"):
        "metrics.jsonl is an append log: one O_APPEND write per row, a failed append cut "
        "back, a torn last row dropped by the reader (docs/reliability.md case 3)",
    ("workdir/metrics.py", "tf.summary.create_file_writer"):
        "TensorBoard's event files: an append log TensorBoard writes and reads itself",
    ("workdir/lock.py", "os.open"):
        "the run's lock file: created exclusively or flock'ed in place; its content only "
        "names the holder",
    ("checkpointing.py", "os.replace"):
        "a checkpoint step directory is renamed away before it is deleted (orbax writes "
        "each step in a temporary directory, fsynced, then renamed)",
    ("extract.py", "np.lib.format.open_memmap"):
        "feature rows written in place to resume a long extraction: the progress record "
        "(written atomically) counts only rows flushed before it; new files are made "
        "whole under a temporary name first",
}


def _mode(call: ast.Call, index: int):
  """The mode argument's source (None when absent)."""
  for kw in call.keywords:
    if kw.arg in ("mode", "flags"):
      return ast.unparse(kw.value)
  return ast.unparse(call.args[index]) if len(call.args) > index else None


def _is_write(callee: str, call: ast.Call) -> bool:
  if callee.startswith("atomic."):
    return False
  if callee in ALWAYS_WRITES or callee.rsplit(".", 1)[-1] in ALWAYS_WRITES_METHODS:
    return True
  if callee == "os.open":
    flags = _mode(call, 1) or ""
    return any(f in flags for f in _WRITE_FLAGS)
  if callee in MODE_WRITES:
    mode = _mode(call, MODE_WRITES[callee])
    if mode is None:
      return callee == "np.lib.format.open_memmap"  # its default mode is "r+"
    literal = mode.strip("'\"")
    return mode == literal or any(c in literal for c in "wax+")  # a variable: unknown
  return False


def _temporaries(scope: ast.AST) -> set:
  """Expressions (source) assigned `atomic.temporary_path(...)` anywhere in `scope`
  (`tmp = ...`, `self.final, self.partial = p, atomic.temporary_path(p)`)."""
  names = set()
  for node in ast.walk(scope):
    if isinstance(node, ast.Assign):
      pairs = [(t, node.value) for t in node.targets]
      if (len(node.targets) == 1 and isinstance(node.targets[0], ast.Tuple)
          and isinstance(node.value, ast.Tuple)):
        pairs = list(zip(node.targets[0].elts, node.value.elts))
      names.update(ast.unparse(t) for t, v in pairs
                   if isinstance(v, ast.Call)
                   and ast.unparse(v.func) == "atomic.temporary_path")
  return names


def file_writes(source: str):
  """(line, callee) of every file write in `source`, in order, but those to what
  `atomic` handed out: the file or name of `with atomic.replacing(...) as f` /
  `atomic.replacing_path(...) as tmp` inside that block, a name assigned
  `atomic.temporary_path(...)` inside that function (or, `self.x`, that class)."""
  out = []

  def visit(node, handed_out):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      handed_out = handed_out | _temporaries(node)
    if isinstance(node, ast.With):
      bound = {ast.unparse(item.optional_vars) for item in node.items
               if isinstance(item.context_expr, ast.Call) and item.optional_vars is not None
               and ast.unparse(item.context_expr.func).startswith("atomic.")}
      for item in node.items:
        visit(item.context_expr, handed_out)
      for child in node.body:
        visit(child, handed_out | bound)
      return
    if isinstance(node, ast.Call):
      callee = ast.unparse(node.func)
      if _is_write(callee, node):
        i = TARGET_ARG.get(callee, 0)
        target = ast.unparse(node.args[i]) if len(node.args) > i else None
        if target not in handed_out:
          out.append((node.lineno, node.col_offset, callee))
    for child in ast.iter_child_nodes(node):
      visit(child, handed_out)

  visit(ast.parse(source), frozenset())
  return [(line, callee) for line, _, callee in sorted(out)]


def test_the_rule_catches_each_kind_of_write():
  lines = [
      "open(p, 'w')", "open(p, mode='ab')", "io.open(p, 'r+b')", "open(p, m)",
      "np.save(p, a)", "np.savez(p, a=a)", "json.dump(x, f)", "fig.savefig(p)",
      "h5py.File(p, 'w')", "faiss.write_index(i, p)", "shutil.copy(a, b)",
      "os.replace(a, b)", "os.open(p, os.O_WRONLY | os.O_CREAT)", "a.tofile(p)",
      "pathlib.Path(p).write_text(s)", "np.lib.format.open_memmap(p, mode='w+')",
      # not writes:
      "open(p)", "open(p, 'rb')", "os.open(p, os.O_RDONLY)", "json.dumps(x)",
      "np.load(p)", "h5py.File(p, 'r')",
      # written to what atomic hands out
      "with atomic.replacing(p, 'wb') as f:\n  np.savez(f, a=a)\n  fig.savefig(f)",
      "with atomic.replacing_path(p) as tmp:\n  faiss.write_index(i, tmp)",
      "def g(p):\n  tmp = atomic.temporary_path(p)\n  np.save(tmp, a)",
      # ... only there
      "np.savez(f, a=a)", "np.save(tmp, a)",
  ]
  source = "\n".join(lines)
  assert [c for _, c in file_writes(source)] == [
      "open", "open", "io.open", "open", "np.save", "np.savez", "json.dump", "fig.savefig",
      "h5py.File", "faiss.write_index", "shutil.copy", "os.replace", "os.open", "a.tofile",
      "pathlib.Path(p).write_text", "np.lib.format.open_memmap", "np.savez", "np.save"]


def test_no_module_writes_a_file_outside_atomic():
  """Every file dsran_jax writes goes through dsran_jax/atomic.py (temporary name,
  fsync, rename), but for the allowed append logs, locks and in-place resumable rows."""
  found, used = [], set()
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).as_posix()
    if rel == "atomic.py":
      continue
    for line, callee in file_writes(path.read_text()):
      if (rel, callee) in ALLOWED:
        used.add((rel, callee))
      else:
        found.append(f"dsran_jax/{rel}:{line}: {callee}")
  assert not found, ("files written without dsran_jax.atomic (use atomic.replacing, "
                     "write_json, save_npz, ... or say in ALLOWED why not):\n  "
                     + "\n  ".join(found))
  assert used == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - used}"


if __name__ == "__main__":
  _worker(sys.argv[1])

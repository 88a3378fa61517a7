"""`python -m dsran_jax.data.check` for every model family, on a tiny precomp dataset.

Each family's own recipe (`configs/f30k.py:<family>`) with `data.root` on a good copy
passes, without a workdir and without writing into the dataset; a damaged copy (a
truncated or misshapen `{split}_ims.npy`, a caption count that does not match) fails with
messages naming each file; a user error is one message, no traceback. Also: formats are
registered once (`data.formats`), and importing `dsran_jax.data` stays light.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from dsran_jax import data as data_lib
from dsran_jax import models
from dsran_jax.data import check
from dsran_jax.data import formats
from dsran_jax.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F30K = os.path.join(REPO, "configs", "f30k.py")
DIM, GRID, GLOBAL = 2048, 49, 2048
SPLITS = {"train": 3, "dev": 2, "test": 2}
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on",
              "the", "grass", "photo", "."]


def _caps(split, n, k=5):
  return [f"a dog runs on the grass photo {i} {j} ." for i in range(n) for j in range(k)]


@pytest.fixture
def good_root(tmp_path):
  """A precomp copy with every file any family reads: regions (2 per image), grid
  (DSRAN) and global features (MLASM), 5 captions per image."""
  root = tmp_path / "precomp"
  root.mkdir()
  rng = np.random.default_rng(0)
  for split, n in SPLITS.items():
    np.save(root / f"{split}_ims.npy", rng.normal(size=(n, 2, DIM)).astype(np.float32))
    np.save(root / f"{split}_grid.npy", rng.normal(size=(n, GRID, DIM)).astype(np.float32))
    np.save(root / f"{split}_global.npy", rng.normal(size=(n, GLOBAL)).astype(np.float32))
    (root / f"{split}_caps.txt").write_text("\n".join(_caps(split, n)) + "\n")
  return root


@pytest.fixture
def bert_dir(tmp_path):
  """A BERT directory with only a WordPiece vocab.txt (DSRAN's tokenizer)."""
  d = tmp_path / "bert"
  d.mkdir()
  (d / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
  return d


def _overrides(family, root, bert):
  """The command-line overrides that put `configs/f30k.py:<family>` on a precomp copy."""
  out = {"data.root": str(root), "data.format": "precomp"}
  if models.tokenizer_kind(_f30k(family)) == "bert":
    out[f"model.{family}.bert_path"] = str(bert)   # the family's BERT tokenizer
  return out


def _f30k(family):
  spec = importlib.util.spec_from_file_location("f30k_config", F30K)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(family)


def _config(family, root, bert):
  c = _f30k(family)
  for key, value in _overrides(family, root, bert).items():
    *sections, name = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  return c


def _listing(root):
  return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir())


def _run_cli(family, root, bert, *extra):
  flags = [f"--config.{k}={v}" for k, v in _overrides(family, root, bert).items()]
  return subprocess.run(
      [sys.executable, "-m", "dsran_jax.data.check", f"--config={F30K}:{family}", *flags,
       *extra], cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})


def _damage(root):
  """Three damages, one per split; returns the files the report must name."""
  ims = root / "train_ims.npy"
  ims.write_bytes(ims.read_bytes()[:-1000])                 # truncated
  np.save(root / "dev_ims.npy", np.zeros((2, 2, DIM - 1), np.float32))  # wrong width
  caps = _caps("test", 2)[:7]                                 # 7 captions for 2 images
  (root / "test_caps.txt").write_text("\n".join(caps) + "\n")
  return {"train": "train_ims.npy", "dev": "dev_ims.npy", "test": "test_caps.txt"}


def test_every_family_is_covered():
  assert set(models.names()) >= {"dsran", "scan", "sgraf", "kidrr", "bssan", "mlasm"}


@pytest.mark.parametrize("family", models.names())
def test_check_passes_on_a_good_copy(family, good_root, bert_dir, capsys):
  before = _listing(good_root)
  config = _config(family, good_root, bert_dir)
  assert check.run(config, release_mode="off") == 0, capsys.readouterr()
  out = capsys.readouterr().out
  assert "OK: every split is readable and finite" in out, out
  assert f"model={family} tokenizer={models.tokenizer_kind(config)}" in out
  for split, n in SPLITS.items():
    assert any(line.split()[:3] == [split, str(n), str(5 * n)]
               for line in out.splitlines()), out
  # No workdir, and nothing written next to the data (no vocab.json, no cache).
  assert _listing(good_root) == before


@pytest.mark.parametrize("family", models.names())
def test_check_fails_on_a_bad_copy_naming_each_file(family, good_root, bert_dir, capsys):
  named = _damage(good_root)
  reports, text, ok = check.run_check(_config(family, good_root, bert_dir),
                                      release_mode="off")
  assert not ok and "FAILED: cannot train on split(s) train, dev, test" in text, text
  by_split = {r.name: "\n".join(r.fatal + r.malformed + r.missing) for r in reports}
  for split, name in named.items():
    assert str(good_root / name) in by_split[split], (split, by_split[split])
  assert "truncated or corrupt" in by_split["train"]
  assert f"of shape (*, *, {DIM}), got (2, 2, {DIM - 1})" in by_split["dev"]
  assert "7 captions for 2 images" in by_split["test"]


def test_check_fails_on_misshapen_global_features_of_mlasm(good_root, bert_dir):
  np.save(good_root / "dev_global.npy", np.zeros((3, GLOBAL), np.float32))  # 3 rows, 2 images
  reports, text, ok = check.run_check(_config("mlasm", good_root, bert_dir),
                                      release_mode="off")
  dev = next(r for r in reports if r.name == "dev")
  assert not ok and str(good_root / "dev_global.npy") in "\n".join(dev.fatal), text
  assert f"of shape (2, {GLOBAL}), got (3, {GLOBAL})" in "\n".join(dev.fatal)


def test_check_cli_good_bad_and_user_error(good_root, bert_dir):
  """The issue's command line for SCAN, then a damaged copy, then an unknown format."""
  good = _run_cli("scan", good_root, bert_dir)
  assert good.returncode == 0, good.stdout + good.stderr
  assert "OK: every split is readable and finite" in good.stdout
  assert "model.dsran.bert_path" not in good.stdout + good.stderr  # SCAN reads words, not BERT
  # The DSRAN build that does use BERT, with its tokenizer given.
  dsran = _run_cli("dsran", good_root, bert_dir, "--release=off")
  assert dsran.returncode == 0, dsran.stdout + dsran.stderr
  assert "tokenizer=bert" in dsran.stdout
  _damage(good_root)
  bad = _run_cli("scan", good_root, bert_dir)
  assert bad.returncode == 1, bad.stdout + bad.stderr
  assert f"{good_root / 'dev_ims.npy'}: expected precomp region features" in bad.stdout
  assert "Traceback" not in bad.stdout + bad.stderr
  user = _run_cli("scan", good_root, bert_dir, "--config.data.format=precomp_v2")
  assert user.returncode == 2, user.stdout + user.stderr
  assert "Traceback" not in user.stderr and not user.stdout
  assert user.stderr.startswith("error: config.data.format='precomp_v2': expected one of")
  assert len(user.stderr.strip().splitlines()) == 1, user.stderr


def test_a_missing_bert_directory_is_named_in_the_report(good_root, tmp_path):
  missing = tmp_path / "no_bert"
  _, text, ok = check.run_check(_config("dsran", good_root, missing), release_mode="off")
  assert not ok and "cannot build the bert tokenizer of model.name='dsran'" in text
  assert str(missing) in text


def test_gru_vocab_file_is_used_when_given_and_never_written(good_root, tmp_path):
  config = _config("scan", good_root, None)
  config.data.vocab_file = str(tmp_path / "absent_vocab.json")
  _, text, ok = check.run_check(config, release_mode="off")
  assert ok, text
  assert not os.path.exists(config.data.vocab_file)
  bad = tmp_path / "bad_vocab.json"
  bad.write_text("{not json")
  config.data.vocab_file = str(bad)
  _, text, ok = check.run_check(config, release_mode="off")
  assert not ok and f"{bad}: not a JSON vocabulary" in text, text


# ---------------------------------------------------------------------------- registry


def test_formats_are_registered_once():
  assert data_lib.FORMATS == formats.FORMATS == tuple(formats.READERS)
  assert set(formats.FORMATS) == {"synthetic", "precomp", "vlp", "coco_vsepp"}
  for name, module in formats.READERS.items():
    assert callable(module.read_raw_split), name
  config = _f30k("scan")
  assert data_lib.format_module(config) is formats.READERS["precomp"]
  config.data.format = "npz"
  with pytest.raises(ConfigError) as e:
    data_lib.read_raw_split(config, "train")
  assert str(e.value) == ("config.data.format='npz': expected one of "
                          f"{', '.join(formats.FORMATS)}")


def test_importing_the_data_package_stays_light():
  code = ("import sys, dsran_jax.data, dsran_jax.data.check\n"
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'h5py', 'tokenizers', 'tensorflow', 'tensorflow_datasets', 'torch'})\n"
          "print(heavy)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

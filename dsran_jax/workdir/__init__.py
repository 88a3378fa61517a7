"""A run's directory, and the one owner of everything in it: `Workdir(path)`.

Every file a run, an evaluation, the converter, inference, search or a figure reads or
writes in a workdir is named here, and so are the three things done with it:
- its config (`config.json`): `save_config`, and `load_config(overrides)`, which applies
  the migrations of renamed or moved keys (`MIGRATIONS`, then the families'
  `models.migrations()`), lays the saved keys over today's defaults (keys added since
  keep their defaults), and then the caller's `--config.a.b=v` overrides;
- the run's lock (`lock()`, one run per workdir) and its metrics log
  (`metrics_log(start_step)`);
- its model: `restore(config)` rebuilds the family's module from the config and returns
  it with the best checkpoint's variables (else the latest), checked against the
  module's shapes. Training's final evaluation, `--mode=eval`, inference, search and
  the two-stage evaluator all restore a workdir this way.

Layout:
    config.json             the resolved config of the run (or of the converter)
    checkpoints/{latest,best}/   orbax checkpoints (`checkpointing.py`)
    metrics.jsonl, tensorboard/  training log
    vocab.json              the word vocabulary (word-id families)
    eval_results.json, ranks_{split}.npz, sims_{split}.npy   the latest evaluation
    evals/<id>/             every evaluation, kept: its eval_results.json, ranks, sims,
                            figure; evals/index.json lists them (id, step, settings, rsum)
    gallery_{split}.npz, gallery_{split}.{side}.{kind}.faiss search caches
    *.png                   figures
    resnet152.safetensors   a converted MLASM's CNN
    .lock.{process}         the run's lock
"""
import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from dsran_jax import atomic, checkpointing, models, validation
from dsran_jax.default_config import ConfigError, get_base_config
from dsran_jax.models import variables as model_variables
from dsran_jax.workdir.lock import LOCK_NAME, STALE_AFTER_S, WorkdirLock, WorkdirLockedError
from dsran_jax.workdir.metrics import (METRICS_FILE, TENSORBOARD_DIR, MetricsLog,
                                      iter_metrics, read_metrics)

__all__ = ["CONFIG_FILE", "EVAL_RESULTS_FILE", "LOCK_NAME", "METRICS_FILE", "MetricsLog",
           "Restored", "STALE_AFTER_S", "VOCAB_FILE", "Workdir", "WorkdirLock",
           "WorkdirLockedError", "iter_metrics", "read_metrics", "vocab_path"]

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
EVAL_RESULTS_FILE = "eval_results.json"
RANKS_FILE = "ranks_{split}.npz"
SIMS_FILE = "sims_{split}.npy"
GALLERY_FILE = "gallery_{split}.npz"
INDEX_FILE = "gallery_{split}.{side}.{kind}.faiss"
FIGURE_FILE = "{name}.png"
EVALS_DIR = "evals"
EVALS_INDEX_FILE = "index.json"

# Migrations of a saved config's shared keys, oldest first: each maps the dict read from
# config.json to today's keys and is a no-op on a config already migrated. The families'
# own (`models.migrations()`, e.g. DSRAN's options moved into `model.dsran`) run after.
MIGRATIONS: List[Callable[[dict], dict]] = []


def migrate_saved(saved: dict) -> dict:
  """A dict read from config.json in today's layout: `MIGRATIONS`, then every family's."""
  for migrate in (*MIGRATIONS, *models.migrations()):
    saved = migrate(saved)
  return saved


def _whole_captions(config, saved: dict) -> None:
  """A config.json written before the caption-length rule (it has no
  `data.caption_bucket`) holds `data.max_len` as the fixed width every caption was cut
  to (32 by default, 64 in SGRAF's recipe), where the authors of the word-vocabulary
  families never cut: those get -1, their authors' rule (whole captions), and a log
  line says so. A BERT model keeps its saved cut (DSRAN's authors cut at 32)."""
  data_section = saved.get("data")
  if not isinstance(data_section, dict) or "caption_bucket" in data_section:
    return
  if models.tokenizer_kind(config) == "vocab" and config.data.max_len > 0:
    logging.info("config.json predates whole captions: data.max_len=%d (the old fixed "
                 "width) becomes -1, the authors' rule for model %s (captions whole); "
                 "--config.data.max_len=%d cuts as before", config.data.max_len,
                 config.model.name, config.data.max_len)
    config.data.max_len = -1


class ConfigFileError(ConfigError):
  """A workdir's config.json is unreadable, names an unknown key or holds a value its
  rule refuses (`problems`: one line each, naming the file and the key)."""

  def __init__(self, message: Union[str, Sequence[str]]):
    super().__init__([message] if isinstance(message, str) else list(message), header="")


@dataclasses.dataclass
class Restored:
  """A workdir's model: the family's module, its variables, the config it was built
  from and the checkpoint's meta (step, metrics, source)."""
  model: Any
  variables: Dict[str, Any]
  config: ml_collections.ConfigDict
  meta: Dict[str, Any]


def vocab_path(config, workdir: Optional[str]) -> Optional[str]:
  """Where a word-vocabulary model's vocabulary lives: `data.vocab_file` when set, else
  `{workdir}/vocab.json` (None without either)."""
  if config.data.vocab_file:
    return os.path.expanduser(config.data.vocab_file)
  if workdir:
    return os.path.join(workdir, VOCAB_FILE)
  return None


def embedding_rows(variables) -> Optional[int]:
  """Rows of the model's word-embedding table (`.../embed/embedding` or BERT's
  `word_embeddings`), or None: the ids a caption may hold."""
  flat = traverse_util.flatten_dict(dict(variables.get("params", {})), sep="/")
  for path, value in flat.items():
    if path.endswith(("embed/embedding", "word_embeddings/embedding")):
      return int(np.shape(value)[0])
  return None


def _merge(dst, src: Mapping[str, Any], prefix: str, where: str, problems: List[str]
           ) -> None:
  """Lays `src` over `dst`; a value of the wrong type (ml_collections refuses it) is
  added to `problems`, naming the key, and the key keeps its default."""
  for key, value in src.items():
    if key not in dst:
      raise ConfigFileError(f"{where}: unknown config key {prefix}{key}")
    if isinstance(value, dict) and isinstance(dst[key], ml_collections.ConfigDict):
      _merge(dst[key], value, f"{prefix}{key}.", where, problems)
      continue
    try:
      dst[key] = value
    except TypeError:  # e.g. "abc" for a float, 12.5 or a section for an int
      default = dst[key]
      kind = "section" if isinstance(default, ml_collections.ConfigDict) else type(
          default).__name__
      problems.append(f"config.{prefix}{key}={value!r:.60}: expected "
                      f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}, like "
                      f"its default{'' if kind == 'section' else f' {default!r}'}")


def apply_overrides(config, overrides: Mapping[str, Any], where: str = "the command line"):
  """Sets each dotted key of `overrides` ({"eval.batch_size": 64}) in `config`; an
  unknown key is a ConfigFileError naming it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise ConfigFileError(f"{where}: unknown config key {key}")
      node = node[p]
    if leaf not in node:
      raise ConfigFileError(f"{where}: unknown config key {key}")
    node[leaf] = value
  return config


def _source_of(problem: str, overrides: Mapping[str, Any], path: str) -> str:
  """Where the value a problem line ("config.a.b=v: ...") names came from."""
  key = problem.split("=", 1)[0].split(":", 1)[0].removeprefix("config.")
  return "the command line" if key in overrides else path


class Workdir:
  """The files of one run directory (see the module docstring)."""

  def __init__(self, path):
    if isinstance(path, Workdir):
      path = path.path
    self.path = os.fspath(path)

  def __repr__(self) -> str:
    return f"Workdir({self.path!r})"

  def __fspath__(self) -> str:
    return self.path

  def file(self, name: str) -> str:
    """The path of `name` inside the workdir."""
    return os.path.join(self.path, name)

  # ------------------------------------------------------------------ files

  @property
  def config_file(self) -> str:
    return self.file(CONFIG_FILE)

  @property
  def metrics_file(self) -> str:
    return self.file(METRICS_FILE)

  @property
  def tensorboard_dir(self) -> str:
    return self.file(TENSORBOARD_DIR)

  @property
  def eval_results_file(self) -> str:
    return self.file(EVAL_RESULTS_FILE)

  def ranks_file(self, split: str) -> str:
    return self.file(RANKS_FILE.format(split=split))

  def sims_file(self, split: str) -> str:
    return self.file(SIMS_FILE.format(split=split))

  def gallery_file(self, split: str) -> str:
    return self.file(GALLERY_FILE.format(split=split))

  def index_file(self, split: str, side: str, kind: str) -> str:
    return self.file(INDEX_FILE.format(split=split, side=side, kind=kind))

  def figure_file(self, name: str) -> str:
    return self.file(FIGURE_FILE.format(name=name))

  def evaluation_dir(self, eval_id: str) -> str:
    """The directory that keeps evaluation `eval_id`'s files."""
    return self.file(os.path.join(EVALS_DIR, eval_id))

  @property
  def evaluations_index_file(self) -> str:
    return self.file(os.path.join(EVALS_DIR, EVALS_INDEX_FILE))

  def read_evaluations(self) -> List[dict]:
    """The index of every evaluation kept in the workdir, oldest first ([] if none)."""
    try:
      with open(self.evaluations_index_file) as f:
        return json.load(f)
    except FileNotFoundError:
      return []

  def vocab_file(self, config) -> Optional[str]:
    return vocab_path(config, self.path)

  def has_config(self) -> bool:
    return os.path.isfile(self.config_file)

  def has_checkpoints(self) -> bool:
    return os.path.isdir(self.file(checkpointing.CHECKPOINTS_DIR))

  # ----------------------------------------------------------------- config

  def save_config(self, config) -> str:
    """Writes the resolved config to config.json, atomically; returns its path."""
    os.makedirs(self.path, exist_ok=True)
    return atomic.write_json(self.config_file, config.to_dict(), sort_keys=True)

  def load_config(self, overrides: Optional[Mapping[str, Any]] = None
                  ) -> ml_collections.ConfigDict:
    """The saved config laid over today's defaults, migrated, with `overrides`, its
    values checked by the rules the command line's are (`validation.value_problems`: a
    hand-edited config.json is held to them too).

    Raises FileNotFoundError naming the file when the workdir has no config.json, and
    ConfigFileError when it is not JSON, when it (or `overrides`) names a key the
    defaults do not know, or when a value has the wrong type or breaks its rule (every
    problem listed, each naming the file, or the command line, and the key).
    """
    path = self.config_file
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {self.path!r} a dsran_jax workdir?")
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigFileError(f"{path}: not a JSON config (cut short by a crash or a "
                            f"hand edit?): {e}") from None
    if not isinstance(saved, dict):
      raise ConfigFileError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    saved = migrate_saved(saved)
    config = get_base_config()
    problems: List[str] = []
    _merge(config, saved, "", path, problems)
    _whole_captions(config, saved)
    overrides = dict(overrides or {})
    config = apply_overrides(config, overrides)
    problems += validation.value_problems(config)
    if problems:
      raise ConfigFileError([f"{_source_of(p, overrides, path)}: {p}" for p in problems])
    return config

  # -------------------------------------------------------------- run state

  def lock(self, process_index: Optional[int] = None) -> WorkdirLock:
    """The run's lock (a context manager): one run per workdir."""
    return WorkdirLock(self.path, process_index)

  def metrics_log(self, start_step: int, **kwargs) -> MetricsLog:
    """The metrics log of a run resuming at `start_step`."""
    return MetricsLog(self.path, start_step, **kwargs)

  def read_metrics(self) -> List[dict]:
    """The readable rows of metrics.jsonl ([] when there is none)."""
    return read_metrics(self.metrics_file) if os.path.exists(self.metrics_file) else []

  def write_json(self, name: str, obj) -> str:
    """Writes `obj` as `name` inside the workdir, atomically."""
    return atomic.write_json(self.file(name), obj)

  # ------------------------------------------------------------------ model

  def restore(self, config=None) -> Restored:
    """The workdir's model with its best checkpoint (else its latest).

    Args:
      config: the config to build the model from (default: `load_config()`); its
        `model` section must describe the checkpoint's shapes.
    Raises:
      FileNotFoundError: no checkpoint.
      checkpointing.CheckpointIntegrityError: a file of the step differs from the one
        written (its checksum; one line naming the step and the file).
      checkpointing.CheckpointReadError: orbax cannot read the step (one line).
      ValueError: the checkpoint does not fit the model (every mismatch named).
    """
    config = self.load_config() if config is None else config
    variables, meta = checkpointing.load_variables(self.path)
    vocab_size = None
    if models.tokenizer_kind(config) == "vocab":
      # The embedding table knows the vocabulary size even when the config says 0.
      vocab_size = config.model.vocab_size or embedding_rows(variables)
    model = models.build_model(config.model, vocab_size=vocab_size)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    check_variables(model, variables, self.path)
    return Restored(model, variables, config, meta)


def check_variables(model, variables: Dict[str, Any], where: str) -> None:
  """Raises ValueError listing every missing, unexpected or misshapen variable."""
  want = model_variables.variable_shapes(model)
  got = {k: tuple(np.shape(v))
         for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: checkpoint {got[k]}, model {want[k]}" for k in sorted(set(want) & set(got))
               if want[k] != got[k]]
  if problems:
    raise ValueError(f"{where}: the checkpoint does not fit the model its config.json "
                     f"describes ({len(problems)} problems):\n  " + "\n  ".join(problems[:20]))

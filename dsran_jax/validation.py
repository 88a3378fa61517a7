"""Every config value checked before any work: `validate_config(config)`.

A bad value used to fail minutes later (`train.checkpoint_every=0` at the first save,
`train.num_steps=-5` as a FileNotFoundError after training nothing) or never (a mistyped
`model.dtype` computed in float32). Here each `data.*`, `train.*` and `eval.*` key has a
rule (`RULES`), the model keys shared by the families (`model.name`, `model.dtype`,
`model.bert.*`) too, and the family's own `validate(config)` checks the rest of
`config.model`. All problems are reported at once, each naming the key, its value and
the allowed range:

    config.train.checkpoint_every=0: must be an integer >= 1
"""
import math
import numbers
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple


class ConfigError(ValueError):
  """One or more config values are out of range (the message lists each)."""


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def Int(lo: int, hi: Optional[int] = None, note: str = "") -> Callable:
  """An integer in [lo, hi]."""
  rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

  def check(v):
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
      return f"must be an integer {rng}{note}"
  return check


def Real(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
         allow_inf: bool = False, note: str = "") -> Callable:
  """A number in the interval, finite unless `allow_inf`."""
  rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or hi == math.inf else ']'}"

  def check(v):
    ok = _is_real(v) and not math.isnan(v) and (allow_inf or math.isfinite(v))
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      return f"must be a {'' if allow_inf else 'finite '}number in {rng}{note}"
  return check


def Choice(*values) -> Callable:
  def check(v):
    if v not in values:
      return f"expected one of {', '.join(repr(x) for x in values)}"
  return check


def Str(nonempty: bool = False, note: str = "") -> Callable:
  def check(v):
    if not isinstance(v, str) or (nonempty and not v.strip()):
      return f"must be a {'non-empty ' if nonempty else ''}string{note}"
  return check


def Bool() -> Callable:
  def check(v):
    if not isinstance(v, bool):
      return "must be True or False"
  return check


def Regexes() -> Callable:
  def check(v):
    if not isinstance(v, str):
      return "must be a string of comma-separated regular expressions"
    for p in (p.strip() for p in v.split(",")):
      if p:
        try:
          re.compile(p)
        except re.error as e:
          return f"{p!r} is not a regular expression ({e})"
  return check


FORMATS = ("synthetic", "precomp", "vlp")
VLP_SPLITS = ("train", "dev", "test", "testall")

# One rule per data./train./eval. key of dsran_jax/default_config.py (a test holds that
# every key has one), and the model keys every family shares.
RULES: Dict[str, Callable] = {
    "data.format": Choice(*FORMATS),
    "data.name": Str(nonempty=True, note=" (vlp: 'f30k' or 'coco')"),
    "data.root": Str(note=" (required for precomp and vlp)"),
    "data.tfds_dir": Str(),
    "data.train_split": Str(nonempty=True),
    "data.dev_split": Str(nonempty=True),
    "data.test_split": Str(nonempty=True),
    "data.max_len": Int(3, 4096, note=" (tokens per caption, [CLS]/[SEP] or "
                                      "<start>/<end> included)"),
    "data.shuffle_buffer": Int(0, note=" (0: full shuffle)"),
    "data.prefetch": Int(0),
    "data.num_regions": Int(1),
    "data.img_dim": Int(1),
    "data.grid_file": Str(),
    "data.global_file": Str(note=" (default {root}/{split}_global.npy)"),
    "data.vocab_file": Str(),
    "data.synthetic.seed": Int(0, 2**32 - 1),
    "data.synthetic.num_train_images": Int(1),
    "data.synthetic.num_dev_images": Int(1),
    "data.synthetic.num_test_images": Int(1),
    "data.synthetic.num_regions": Int(1),
    "train.batch_size": Int(1),
    "train.num_epochs": Int(0, note=" (used when train.num_steps is 0)"),
    "train.num_steps": Int(0, note=" (0: train.num_epochs epochs)"),
    "train.log_every": Int(1),
    "train.eval_every": Int(0, note=" (0: once per epoch)"),
    "train.checkpoint_every": Int(1),
    "train.checkpoint_every_s": Real(0, allow_inf=True,
                                     note=" (seconds; 0: after every step; inf: by steps "
                                          "only)"),
    "train.seed": Int(0, 2**32 - 1),
    "train.optimizer": Choice("bertadam", "adam"),
    "train.learning_rate": Real(0, lo_open=True),
    "train.lr_update": Int(1, note=" (epochs between x0.1 decays; a large value "
                                   "disables them)"),
    "train.warmup": Real(0, 1, hi_open=True, note=" (fraction of the steps)"),
    "train.grad_clip": Real(0, note=" (0: no clipping)"),
    "train.bert_lr_scale": Real(0),
    "train.freeze_bert": Bool(),
    "train.freeze": Regexes(),
    "train.margin": Real(0),
    "train.max_violation": Bool(),
    "train.sum_violation_steps": Int(0),
    "eval.batch_size": Int(1),
    "eval.protocol": Choice("1k", "coco"),
    "eval.max_dev_images": Int(1),
    "eval.save_sims": Bool(),
    "eval.chunk_size": Int(1),
    "eval.tile_images": Int(0, note=" (0: the family's default)"),
    "eval.tile_captions": Int(0, note=" (0: the family's default)"),
    "eval.shortlist_workdir": Str(note=" ('': every pair scored)"),
    "eval.shortlist_k": Int(1, note=" (candidates re-scored per query)"),
    "eval.shortlist_fusion": Real(0, 1, note=" (weight of the first stage)"),
    "eval.shortlist_workdir": Str(note=" (a workdir of an embedding model; '': full "
                                       "evaluation)"),
    "eval.shortlist_k": Int(1, note=" (candidates re-scored per query)"),
    "eval.shortlist_fusion": Real(0, 1, note=" (weight of the first stage's score)"),
    "model.name": Str(nonempty=True),
    "model.dtype": Choice("float32", "bfloat16"),
    "model.bert.vocab_size": Int(1),
    "model.bert.hidden_size": Int(1),
    "model.bert.num_layers": Int(1),
    "model.bert.num_heads": Int(1),
    "model.bert.intermediate_size": Int(1),
    "model.bert.max_position": Int(1),
    "model.bert.type_vocab_size": Int(1),
}
# The sections whose every key must have a rule here (model keys belong to the families).
CHECKED_SECTIONS = ("data", "train", "eval")


def flat_items(config, prefix: str = "") -> List[Tuple[str, object]]:
  """[("data.root", value), ...] of every leaf of a ConfigDict (or dict)."""
  out = []
  for k, v in config.items():
    if hasattr(v, "items"):
      out += flat_items(v, f"{prefix}{k}.")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _cross_checks(config, num_devices: Optional[int], num_processes: Optional[int]
                  ) -> List[str]:
  """Rules over several keys (run once every key is valid on its own)."""
  d, t = config.data, config.train
  errors = []
  if t.num_steps == 0 and t.num_epochs < 1:
    errors.append(f"config.train.num_epochs={t.num_epochs} with config.train.num_steps=0: "
                  f"nothing to train; set one of them >= 1")
  if d.format in ("precomp", "vlp") and not d.tfds_dir and not d.root.strip():
    errors.append(f"config.data.root='': required for data.format={d.format!r} (the "
                  f"dataset directory)")
  if d.format == "vlp":
    if d.name not in ("f30k", "coco"):
      errors.append(f"config.data.name={d.name!r}: data.format='vlp' expects 'f30k' or "
                    f"'coco'")
    for key in ("train_split", "dev_split", "test_split"):
      if d[key] not in VLP_SPLITS:
        errors.append(f"config.data.{key}={d[key]!r}: data.format='vlp' expects one of "
                      f"{', '.join(repr(s) for s in VLP_SPLITS)}")
  m = config.model
  if "bert" in m and m.bert.hidden_size % m.bert.num_heads:
    errors.append(f"config.model.bert.hidden_size={m.bert.hidden_size} must be divisible "
                  f"by config.model.bert.num_heads={m.bert.num_heads}")
  if "bert" in m and m.get("bert_random_init", False) and d.max_len > m.bert.max_position:
    errors.append(f"config.data.max_len={d.max_len} exceeds config.model.bert.max_position="
                  f"{m.bert.max_position}")
  for n, what in ((num_devices, "devices"), (num_processes, "hosts")):
    if n and t.batch_size % n:
      errors.append(f"config.train.batch_size={t.batch_size} must be divisible by the {n} "
                    f"{what} of the run")
  return errors


def validate_config(config, num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises ConfigError listing every out-of-range value of `config`, each line naming
  the key, its value and the allowed range; returns None when the config is valid.

  Args:
    config: the full config (see dsran_jax/default_config.py).
    num_devices / num_processes: if given, `train.batch_size` must divide by them.
  """
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
  errors = []
  known = {k for k, _ in flat_items(get_base_config())}
  for key, _ in flat_items(config):
    if key not in known:
      errors.append(f"config.{key}: unknown key (not in dsran_jax/default_config.py)")
  for key, check in RULES.items():
    value = _get(config, key)
    if value is _MISSING:  # a rule may come before its key (or a family has no BERT)
      continue
    problem = check(value)
    if problem:
      errors.append(f"config.{key}={value!r}: {problem}")
  if not errors:
    errors += _cross_checks(config, num_devices, num_processes)
  try:
    family = models.family_config(config.model.name)
  except ValueError as e:  # an unknown family: its message names the key and the choices
    errors.append(str(e))
  else:
    try:
      family.validate(config)
    except (ValueError, TypeError, KeyError) as e:
      errors.append(str(e))
  if errors:
    raise ConfigError("invalid config (nothing was run):\n  " + "\n  ".join(errors))


def unchecked_keys(config=None) -> Sequence[str]:
  """The data./train./eval. keys of `config` (default: the base config) with no rule."""
  if config is None:
    from dsran_jax.default_config import get_base_config  # pylint: disable=g-import-not-at-top
    config = get_base_config()
  return [k for k, _ in flat_items(config)
          if k.split(".")[0] in CHECKED_SECTIONS and k not in RULES]

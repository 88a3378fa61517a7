"""Every config value checked before any work: `validate_config(config)`.

A bad value used to fail minutes later (`train.checkpoint_every=0` at the first save,
`train.num_steps=-5` as a FileNotFoundError after training nothing) or never (a mistyped
`model.dtype` computed in float32). Each key's rule is declared with the key itself, in
`default_config.KEYS` (`RULES` here is derived from it): every `data.*`, `train.*` and
`eval.*` key, and the model keys the families share (`model.name`, `model.dtype`, the
types of the shared widths); the family's own `validate(config)` checks the rest of
`config.model` (its section, and its rules over several keys, e.g. DSRAN's
`data.max_len` against its BERT's positions), and `_cross_checks` the shared rules over
several keys. All problems are reported at once (a `ConfigError` whose `problems` name
each key, its value and the allowed range):

    config.train.checkpoint_every=0: must be an integer >= 1

Command lines report these errors as one line (`dsran_jax.cli`).
"""
import difflib
from typing import Dict, List, Optional, Sequence, Tuple

from dsran_jax import models
# The rules and the table live with the keys (default_config.KEYS).
from dsran_jax.default_config import KEYS, VLP_SPLITS, ConfigError, Rule, get_base_config

__all__ = ["CHECKED_SECTIONS", "ConfigError", "RULES", "flat_items", "unchecked_keys",
           "unknown_key", "validate_config", "value_problems"]

# key -> rule, derived from the one declaration of each key (default_config.KEYS).
RULES: Dict[str, Rule] = {name: key.rule for name, key in KEYS.items()}
# The sections whose every key must have a rule (model keys belong to the families).
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
  if d.format in ("precomp", "vlp", "coco_vsepp") and not d.tfds_dir and not d.root.strip():
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
  if d.format == "coco_vsepp" and d.name != "coco":
    errors.append(f"config.data.name={d.name!r}: data.format='coco_vsepp' is MS-COCO; "
                  f"set 'coco'")
  e = config.eval
  if e.eccv and e.shortlist_workdir:
    errors.append("config.eval.eccv=True with config.eval.shortlist_workdir: ECCV Caption "
                  "and CxC rank the full sims matrix, which two-stage evaluation does not "
                  "score; evaluate without the short list")
  for n, what in ((num_devices, "devices"), (num_processes, "hosts")):
    if n and t.batch_size % n:
      errors.append(f"config.train.batch_size={t.batch_size} must be divisible by the {n} "
                    f"{what} of the run")
  return errors


def unknown_key(key: str, known: Optional[Sequence[str]] = None) -> str:
  """The problem of a key no declaration knows: "config.train.log_evry: unknown key (did
  you mean config.train.log_every?)", else the keys its section has. `known`: every
  declared key (default: those of the base config, family sections included)."""
  known = sorted(known if known is not None else (k for k, _ in flat_items(get_base_config())))
  section = key.rpartition(".")[0]
  while section and not any(k.startswith(section + ".") for k in known):
    section = section.rpartition(".")[0]
  prefix = section + "." if section else ""
  rest = [k[len(prefix):] for k in known if k.startswith(prefix)]
  close = difflib.get_close_matches(key[len(prefix):], rest, n=1, cutoff=0.6)
  if close:
    return f"config.{key}: unknown key (did you mean config.{prefix}{close[0]}?)"
  names = sorted({r.split(".")[0] for r in rest})
  return (f"config.{key}: unknown key (config.{section} has {', '.join(names)})" if section
          else f"config.{key}: unknown key (the sections are {', '.join(names)})")


def validate_config(config, num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises ConfigError listing every out-of-range value of `config`, each line naming
  the key, its value and the allowed range; returns None when the config is valid.

  Args:
    config: the full config (see dsran_jax/default_config.py).
    num_devices / num_processes: if given, `train.batch_size` must divide by them.
  """
  known = {k for k, _ in flat_items(get_base_config())}
  errors = [unknown_key(key, known) for key, _ in flat_items(config) if key not in known]
  errors += _rule_problems(config)
  if not errors:
    errors += _cross_checks(config, num_devices, num_processes)
  errors += _family_problems(config)
  if errors:
    raise ConfigError(errors)


def value_problems(config) -> List[str]:
  """The problems of `config`'s values, each a line naming the key, its value and what is
  allowed: every key's rule and the family's checks of its section, as `validate_config`
  runs them, without the rules of a training run over several keys (a data root, the
  batch size against the devices). For a config read back from a workdir (`load_config`),
  which inference and search use without any data."""
  return _rule_problems(config) + _family_problems(config)


def _rule_problems(config) -> List[str]:
  errors = []
  for key, check in RULES.items():
    value = _get(config, key)
    if value is _MISSING:  # a rule may come before its key (or a family has no BERT)
      continue
    problem = check(value)
    if problem:
      errors.append(f"config.{key}={value!r}: {problem}")
  return errors


def _family_problems(config) -> List[str]:
  try:
    family = models.family_config(config.model.name)
  except ValueError as e:  # an unknown family: its message names the key and the choices
    return [str(e)]
  try:
    family.validate(config)
  except (ValueError, TypeError, KeyError) as e:
    return [str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)]
  return []


def unchecked_keys(config=None) -> Sequence[str]:
  """The data./train./eval. keys of `config` (default: the base config) with no rule."""
  if config is None:
    config = get_base_config()
  return [k for k, _ in flat_items(config)
          if k.split(".")[0] in CHECKED_SECTIONS and k not in RULES]

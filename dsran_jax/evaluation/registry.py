"""The evaluator seam: an evaluator is a function `(Task) -> Outcome` registered under a
name with the rule that says when a config asks for it.

    @registry.register("retrieval", when=lambda config: not config.eval.shortlist_workdir)
    def retrieval(task): ...

`runner.evaluate_workdir` restores the model, reads the test split, runs every evaluator
the config selects and writes what they return to `eval_results.json`; nothing there
knows an evaluator or a family by name. Adding an evaluator is one module that
registers itself plus its import in `evaluation/__init__.py` (and the config keys it
reads, declared in `default_config.py`).
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class Task:
  """What an evaluator is given.

  Attributes:
    model / variables: the restored model (any family) and its variables.
    config: the full config of the evaluation (the workdir's, with overrides).
    split: the `data.Split` evaluated (`config.data.test_split`).
    workdir: the workdir path (`dsran_jax.workdir.Workdir` names its files).
    sims_path: where to save the full sims matrix, or None (a temporary file when an
      evaluator the config selects `needs_sims`; the retrieval evaluator writes it).
    format_module: the reader module of `config.data.format` (for ids it knows).
    should_stop: polled between batches and tiles (a preempted run), or None.
  """
  model: Any
  variables: Dict[str, Any]
  config: Any
  split: Any
  workdir: Optional[str] = None
  sims_path: Optional[str] = None
  should_stop: Optional[Callable[[], bool]] = None
  format_module: Any = None


@dataclasses.dataclass
class Outcome:
  """What an evaluator returns.

  Attributes:
    results: {results key ("1k", "coco5k", "coco1k", ...): metrics}, the top-level
      entries of eval_results.json.
    protocol: {results key: the conditions it was measured under}.
    ranks: {"i2t": (n_img,), "t2i": (n_cap,)} 0-based ranks over the whole split, for
      figures ({} if the evaluator has none).
    sections: other entries of eval_results.json ({"two_stage": {...}}).
    lines: text printed after the results table.
  """
  results: Dict[str, Dict[str, float]]
  protocol: Dict[str, Any] = dataclasses.field(default_factory=dict)
  ranks: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  sections: Dict[str, Any] = dataclasses.field(default_factory=dict)
  lines: List[str] = dataclasses.field(default_factory=list)


Evaluator = Callable[[Task], Outcome]
_EVALUATORS: Dict[str, Tuple[Evaluator, Callable[[Any], bool]]] = {}
_NEEDS_SIMS = set()


def register(name: str, when: Callable[[Any], bool], needs_sims: bool = False):
  """Decorator registering an evaluator under `name`, run when `when(config)` holds.
  `needs_sims`: it reads the full sims matrix an earlier evaluator wrote at
  `Task.sims_path` (the runner then always gives one)."""

  def add(fn: Evaluator) -> Evaluator:
    if name in _EVALUATORS:
      raise ValueError(f"evaluator {name!r} is registered twice")
    _EVALUATORS[name] = (fn, when)
    if needs_sims:
      _NEEDS_SIMS.add(name)
    return fn

  return add


def needs_sims(config) -> bool:
  """Whether an evaluator `config` selects reads the full sims matrix."""
  return any(name in _NEEDS_SIMS for name, _ in selected(config))


def names() -> Tuple[str, ...]:
  """Every registered evaluator's name."""
  return tuple(_EVALUATORS)


def get(name: str) -> Evaluator:
  """The evaluator registered as `name` (ValueError naming the known ones if none)."""
  if name not in _EVALUATORS:
    raise ValueError(f"no evaluator {name!r}; registered: {', '.join(_EVALUATORS)}")
  return _EVALUATORS[name][0]


def selected(config) -> List[Tuple[str, Evaluator]]:
  """[(name, evaluator)] of every evaluator `config` asks for, in registration order,
  those that read the sims matrix (`needs_sims`) after the others, which write it."""
  chosen = [(name, fn) for name, (fn, when) in _EVALUATORS.items() if when(config)]
  return sorted(chosen, key=lambda item: item[0] in _NEEDS_SIMS)

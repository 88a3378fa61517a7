"""Contracts of training that the layers below the model zoo read: where a family
objective's parameters live in the trained tree, and the syntax of `train.lr_milestones`.
Plain Python (no jax), so configs, the optimiser and checkpointing share them."""
from typing import Tuple

# `TrainState.params[OBJECTIVE_KEY]`: a family objective's parameters, beside the model's
# (models/__init__.py, "training_objective"); never part of the model's variables.
OBJECTIVE_KEY = "objective"


def model_params(params):
  """The model's part of a trained tree (`TrainState.params`): without the family
  objective's parameters (`OBJECTIVE_KEY`), the tree itself when it has none."""
  if hasattr(params, "keys") and OBJECTIVE_KEY in params:
    return {k: v for k, v in params.items() if k != OBJECTIVE_KEY}
  return params


def parse_milestones(v) -> Tuple[int, ...]:
  """The epochs of a `train.lr_milestones` string ("15,25" -> (15, 25); "" -> ()).
  Raises ValueError saying what a valid value looks like."""
  msg = "must be a string of comma-separated increasing epochs >= 1, e.g. '15,25'"
  if not isinstance(v, str):
    raise ValueError(msg)
  parts = [p.strip() for p in v.split(",") if p.strip()]
  if not all(p.isdigit() for p in parts):
    raise ValueError(msg)
  epochs = tuple(int(p) for p in parts)
  if any(e < 1 for e in epochs) or list(epochs) != sorted(set(epochs)):
    raise ValueError(msg)
  return epochs

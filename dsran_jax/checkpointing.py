"""Orbax checkpoints of a workdir: `checkpoints/latest` (full train state, for resuming)
and `checkpoints/best` (model variables of the best dev rsum, for eval and inference).

Each checkpoint holds a pytree `state` and a JSON `meta` (step, metrics, best rsum), so
the best score is known after a restart without re-evaluating.
"""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

LATEST, BEST = "latest", "best"


def _manager(workdir: str, kind: str) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(workdir), "checkpoints", kind)
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=False))


def save(workdir: str, kind: str, step: int, state: Any, meta: dict) -> None:
  """Writes `state` (any pytree of arrays) and `meta` (JSON-able) as step `step`."""
  mgr = _manager(workdir, kind)
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         meta=ocp.args.JsonSave(meta)), force=True)
  mgr.wait_until_finished()
  mgr.close()


def latest_step(workdir: str, kind: str) -> Optional[int]:
  """Step of the checkpoint of this kind, or None if there is none."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints", kind)):
    return None
  mgr = _manager(workdir, kind)
  step = mgr.latest_step()
  mgr.close()
  return step


def restore(workdir: str, kind: str, template: Any = None) -> tuple[Any, dict]:
  """(state, meta) of the checkpoint of this kind.

  With a `template` (a pytree of arrays, possibly sharded) the state is restored with the
  template's structure, dtypes and shardings; without one, as stored (host arrays).
  """
  step = latest_step(workdir, kind)
  if step is None:
    raise FileNotFoundError(f"no {kind!r} checkpoint under {os.path.join(workdir, 'checkpoints')}")
  mgr = _manager(workdir, kind)
  if template is not None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    state_args = ocp.args.StandardRestore(abstract)
  else:
    state_args = ocp.args.StandardRestore()
  out = mgr.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
  mgr.close()
  return out["state"], out["meta"]


def load_variables(workdir: str) -> tuple[dict, dict]:
  """Model variables {'params', 'batch_stats'} of the best checkpoint (else the latest)."""
  kind = BEST if latest_step(workdir, BEST) is not None else LATEST
  state, meta = restore(workdir, kind)
  return {"params": state["params"], "batch_stats": state["batch_stats"]}, meta

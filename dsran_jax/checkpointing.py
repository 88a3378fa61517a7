"""Orbax checkpoints of a workdir: `checkpoints/latest` (full train state, for resuming)
and `checkpoints/best` (model variables of the best dev rsum, for eval and inference).

Each checkpoint holds a pytree `state` and a JSON `meta` (step, metrics, best rsum), so
the best score is known after a restart without re-evaluating.

Crash safety (SIGKILL or power loss at any instant):
- A step is written into `{step}.orbax-checkpoint-tmp`, its files fsynced, then renamed
  to `{step}` (atomic on a local or network POSIX file system): a step directory is
  either complete or absent. Leftover temporary directories of a crashed save are
  removed by the next `save` (the writer holds the workdir lock, `dsran_jax.workdir`).
- Old steps are removed by this module, not by orbax, and only after the step that
  replaces them is final, by renaming them to a temporary name first: a crash never
  leaves a half-deleted step that looks complete.
- `best` and `latest` are kept consistent: the best step a kept `latest` checkpoint
  records in `meta["best"]["step"]` stays on disk while that `latest` step does.
  A crash after best step N but before latest step N leaves best N "from the future" of
  the resumed run; the resumed run reaches N again and its `save` replaces best N (and
  any later best step) instead of failing with orbax's StepAlreadyExistsError.
- The two newest `latest` steps are kept (and the `best` steps they record), so a
  resume has an intact step to fall back to when the newest one is damaged.
- No checkpoint with a NaN or Inf weight is ever written (`NonFiniteStateError`).
- A failed write (a full disk) raises `CheckpointWriteError` with one line naming the
  checkpoint, the cause and what was kept; the partial step is removed and the previous
  checkpoints stay usable.

Integrity (what is read is what was written):
- Every step carries `checksums.json`: the size and sha256 of each file of its items
  (`state/`, `meta/`; `dsran_jax.integrity`), written before the rename and sealed by
  its own checksum. Orbax's own bookkeeping at the step's top level
  (`_CHECKPOINT_METADATA`, updated by orbax after the list is made) is not in it.
- `restore` verifies every listed file before orbax reads any: a flipped bit, a
  truncated or a missing file is a `CheckpointIntegrityError` naming the step and the
  file (one line); anything else orbax cannot read is a one-line `CheckpointReadError`.
  A step written before checksums were is read with a warning that it is unverified.
- `restore_for_resume` takes the newest `latest` step that is intact together with the
  `best` step it records, and says so in one warning line when that is not the newest.

`DSRAN_CRASH_AT=kind:step:point` makes the process SIGKILL itself at a named point of a
save, so tests can crash a run deterministically (see `CRASH_POINTS`).
"""
import contextlib
import errno
import json
import logging as py_logging
import os
import re
import shutil
import signal
import threading
from typing import Any, Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging

from dsran_jax import atomic, integrity
from dsran_jax.core.training import model_params

LATEST, BEST = "latest", "best"
KINDS = (LATEST, BEST)
CHECKPOINTS_DIR = "checkpoints"
TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
CRASH_ENV = "DSRAN_CRASH_AT"
# begin: nothing written; created: an empty temporary step directory; written: every file
# of the step written, not yet renamed; renamed: the step is final, older steps not yet
# removed; done: `save` is about to return (for `best`: before the `latest` of the step).
CRASH_POINTS = ("begin", "created", "written", "renamed", "done")
CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "dsran_jax.checkpoint_checksums/1"
KEEP_LATEST = 2  # `latest` steps kept: the newest, and one to fall back to


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, permissions, ...)."""


class NonFiniteStateError(FloatingPointError):
  """A state with NaN or Inf values was about to be checkpointed."""


class CheckpointIntegrityError(integrity.IntegrityError):
  """A checkpoint file's bytes differ from those written (flipped, truncated, missing);
  the message names the step and the file."""


class CheckpointReadError(ValueError):
  """Orbax could not read a checkpoint (one line naming the step and the cause)."""


def _crash_point(kind: str, step: int, point: str) -> None:
  """SIGKILLs this process when `DSRAN_CRASH_AT` names this point (for crash tests)."""
  if os.environ.get(CRASH_ENV) == f"{kind}:{step}:{point}":
    os.kill(os.getpid(), signal.SIGKILL)


class _Current:
  """(kind, step) of the save in progress, for the crash-point hooks. Module-wide, not
  thread-local: orbax runs parts of a save on its own threads; saves never overlap."""
  where = None


_current = _Current()


# The one implementation of fsync (`atomic`), under the names the code below uses.
_fsync_tree = atomic.fsync_tree
_fsync_dir = atomic.fsync_dir


def _item_files(step_dir: str) -> list[str]:
  """Paths (relative to `step_dir`) of the files of a step's items: everything below its
  subdirectories. The top level is orbax's step bookkeeping, rewritten at the rename."""
  out = []
  for name in sorted(os.listdir(step_dir)):
    item = os.path.join(step_dir, name)
    if not os.path.isdir(item):
      continue
    for root, dirs, files in os.walk(item):
      dirs.sort()
      out += [os.path.relpath(os.path.join(root, f), step_dir) for f in sorted(files)]
  return out


def write_checksums(step_dir: str) -> str:
  """Writes `step_dir/checksums.json`: size and digest of every item file, sealed."""
  listing = {"format": CHECKSUMS_FORMAT, "algorithm": integrity.ALGORITHM,
             "files": integrity.tree_records(step_dir, _item_files(step_dir))}
  return atomic.write_json(os.path.join(step_dir, CHECKSUMS_FILE), integrity.seal(listing),
                           sort_keys=True)


class _DurableRenamePath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic-rename step directory, with the step's files fsynced before the
  rename and the parent after it, and the crash-test hooks."""

  async def create(self, *args, **kwargs):
    out = await super().create(*args, **kwargs)
    where = getattr(_current, "where", None)
    if where:
      _crash_point(*where, "created")
    return out

  async def finalize(self, *args, **kwargs):
    where = getattr(_current, "where", None)
    tmp = str(self.get())
    if os.path.isdir(tmp):
      if os.path.basename(str(self.get_final())).isdigit():  # a step, not one of its items
        # Every host's files are written (orbax finalizes on the primary host after a
        # barrier) and still in the page cache: hashing them reads from memory.
        write_checksums(tmp)
      _fsync_tree(tmp)
    if where:
      _crash_point(*where, "written")
    await super().finalize(*args, **kwargs)
    _fsync_dir(os.path.dirname(tmp))
    if where:
      _crash_point(*where, "renamed")


def _kind_dir(workdir: str, kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"checkpoint kind {kind!r}: expected one of {KINDS}")
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR, kind)


def _manager(workdir: str, kind: str, create: bool = True) -> ocp.CheckpointManager:
  # max_to_keep=None: old steps are removed by `_remove_steps`, after the new step is
  # final and in an order that keeps best and latest consistent (module docstring).
  return ocp.CheckpointManager(_kind_dir(workdir, kind), options=ocp.CheckpointManagerOptions(
      max_to_keep=None, create=create, enable_async_checkpointing=False,
      temporary_path_class=_DurableRenamePath))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def partial_steps(workdir: str, kind: str) -> List[str]:
  """Paths of temporary (unfinished or half-deleted) step directories of a kind."""
  d = _kind_dir(workdir, kind)
  if not os.path.isdir(d):
    return []
  return sorted(os.path.join(d, n) for n in os.listdir(d) if TMP_SUFFIX in n)


def cleanup_partial(workdir: str, kinds=KINDS) -> List[str]:
  """Removes the temporary step directories a crashed save left; returns their paths.

  Only the run that writes the workdir may call this (it holds the workdir lock): a
  reader (evaluation, inference) must leave a concurrent save's directory alone.
  """
  removed = []
  if jax.process_index() == 0:
    for kind in kinds:
      for path in partial_steps(workdir, kind):
        logging.warning("removing %s, left by a checkpoint save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  _sync("dsran_cleanup_partial")
  return removed


def _remove_steps(workdir: str, kind: str, doomed: Callable[[int], bool],
                  why: Optional[str] = None) -> None:
  """Deletes the final steps of a kind that `doomed` selects.

  Only process 0 lists and deletes, and every process waits at the barrier whether or
  not anything was deleted: hosts that listed before and after process 0's deletion
  would otherwise disagree on whether to wait. Each step is renamed to a temporary name
  first (atomic), so a crash mid-deletion leaves a temporary directory, never a half
  step that looks final. `why`, if given, is logged with the directory and the steps.
  """
  if jax.process_index() == 0:
    d = _kind_dir(workdir, kind)
    steps = [s for s in all_steps(workdir, kind) if doomed(s)]
    if steps and why:
      logging.warning(why, d, steps)
    for s in steps:
      path = os.path.join(d, str(s))
      doomed_path = f"{path}{TMP_SUFFIX}-deleted"
      if os.path.exists(doomed_path):
        shutil.rmtree(doomed_path, ignore_errors=True)
      os.replace(path, doomed_path)
      shutil.rmtree(doomed_path, ignore_errors=True)
    if steps:
      _fsync_dir(d)
  _sync(f"dsran_remove_{kind}")


def all_steps(workdir: str, kind: str) -> List[int]:
  """The final (complete) steps of a kind, ascending; temporary directories excluded.

  Read from the directory listing, not through an orbax manager: a manager's creation
  synchronises the hosts, and hosts that looked before and after another created the
  directory would then wait at different barriers.
  """
  d = _kind_dir(workdir, kind)
  if not os.path.isdir(d):
    return []
  # Orbax names a final step directory by its number; temporary ones carry TMP_SUFFIX.
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.isdir(os.path.join(d, n)))


@jax.jit
def _all_finite(leaves):
  # One program for the whole tree (compiled once per state layout): op-by-op checks
  # would compile a kernel per leaf shape at the first save.
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> List[str]:
  """Paths ("params/a/kernel") of the floating-point leaves holding a NaN or Inf.

  Jax arrays are checked where they live (one jitted reduction over the tree; sharded
  and multi-host arrays included, the result replicated), host arrays with numpy.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names, on_device, ok = [], [], []
  for path, x in flat:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      continue
    names.append("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
    if isinstance(x, jax.Array):
      on_device.append((len(ok), x))
      ok.append(True)
    else:
      ok.append(bool(np.isfinite(np.asarray(x)).all()))
  # One call per set of devices: jit refuses arrays committed to different devices.
  groups = {}
  for i, x in on_device:
    groups.setdefault(frozenset(x.sharding.device_set), []).append((i, x))
  for members in groups.values():
    flags = _all_finite([x for _, x in members])
    flags = np.asarray(flags.addressable_data(0))
    for (i, _), f in zip(members, flags):
      ok[i] = bool(f)
  return [n for n, good in zip(names, ok) if not good]


class _CaptureOrbaxErrors(py_logging.Filter):
  """Holds back orbax's ERROR records during a save: a failed write is reported once,
  by `CheckpointWriteError`, instead of as tracebacks from each of orbax's threads."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    if "/orbax/" in record.pathname and record.levelno >= py_logging.ERROR:
      self.records.append(record)
      return False
    return True


@contextlib.contextmanager
def _held_orbax_errors():
  capture = _CaptureOrbaxErrors()
  logger = py_logging.getLogger("absl")
  logger.addFilter(capture)
  try:
    yield capture
  finally:
    logger.removeFilter(capture)


def _os_error(e: BaseException) -> Optional[str]:
  """The OS error (errno) somewhere in an exception chain, as one phrase, or None.

  Tensorstore reports a failed write as a ValueError whose text carries
  `os_error_code=N`; Python file operations raise an OSError.
  """
  for _ in range(50):  # chains are short; never loop on a pathological one
    text = str(e)
    m = re.search(r"os_error_code='?(\d+)", text)
    code = int(m.group(1)) if m else (e.errno if isinstance(e, OSError) else None)
    if code:
      return f"{os.strerror(code)} (errno {code}: {errno.errorcode.get(code, '?')})"
    if isinstance(e, OSError):
      return text.splitlines()[0][:300] if text else type(e).__name__
    nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if nxt is None:
      return None
    e = nxt
  return None


def _nbytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


def _on_host(state: Any) -> Any:
  """`state` as numpy arrays when this is the only process.

  Orbax copies device arrays to the host through per-replica slices, a dispatch per
  array and device: with the 8 devices of a CPU mesh that is seconds per save of a few
  hundred small arrays (1.2-1.8 s against 0.22 s for 139 arrays of 64x32 on a 2-core
  AMD EPYC, docs/benchmarks.md). With several processes the arrays span hosts, and
  orbax's path writes each shard once.
  """
  if jax.process_count() > 1:
    return state
  return jax.device_get(state)


def save(workdir: str, kind: str, step: int, state: Any, meta: dict) -> None:
  """Writes `state` (any pytree of arrays) and `meta` (JSON-able) as step `step`.

  Called by every process (orbax coordinates the hosts; files are written once). Steps
  of this kind at or after `step` are replaced (they belong to a crashed run that got
  further before it was resumed from an earlier `latest`). After a `latest` step is
  final, the `latest` steps before the previous one (`KEEP_LATEST`) and the `best`
  steps up to `step` that neither kept `latest` step records are removed. The step's
  files are listed with their checksums in `checksums.json` before its rename.

  Raises:
    NonFiniteStateError: a floating-point leaf of `state` holds NaN or Inf (nothing is
      written).
    CheckpointWriteError: the write failed (e.g. a full disk); the partial step is
      removed and the previous steps are intact.
  """
  step = int(step)
  path = _kind_dir(workdir, kind)
  _crash_point(kind, step, "begin")
  bad = nonfinite_leaves(state)
  if bad:
    kept = all_steps(workdir, kind)
    raise NonFiniteStateError(
        f"refusing to write checkpoint {kind!r} step {step} to {path}: {len(bad)} arrays "
        f"hold NaN/Inf ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
        + (f"step {kept[-1]} is kept" if kept else "no earlier step exists"))
  cleanup_partial(workdir, (kind,))
  _remove_steps(workdir, kind, lambda s: s >= step,
                why="%s: replacing step(s) %s, written by a run that crashed before its "
                    "'latest' checkpoint caught up")
  mgr = _manager(workdir, kind)
  _current.where = (kind, step)
  threads_before = set(threading.enumerate())
  try:
    with _held_orbax_errors() as held:
      try:
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_on_host(state)),
                                               meta=ocp.args.JsonSave(meta)), force=True)
        mgr.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        # Orbax's writer threads outlive the error: wait for them, or they write into
        # the temporary directory again after it is removed.
        for t in set(threading.enumerate()) - threads_before:
          if type(t).__module__.startswith("orbax"):
            t.join(timeout=120)
        raise
    for record in held.records:  # errors that did not fail the save: shown after all
      py_logging.getLogger("absl").handle(record)
  except Exception as e:  # pylint: disable=broad-except
    cause = _os_error(e)
    try:
      mgr.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the manager may be half torn down by the failed save
    partial = [p for p in partial_steps(workdir, kind)
               if os.path.basename(p).startswith(f"{step}{TMP_SUFFIX}")]
    if jax.process_index() == 0:
      for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    if cause is None:  # not the file system's doing (a bug, a bad meta): as it is
      raise
    kept = [s for s in all_steps(workdir, kind) if s != step]
    free = shutil.disk_usage(path).free if os.path.isdir(path) else 0
    raise CheckpointWriteError(
        f"cannot write checkpoint {kind!r} step {step} to {path}: {cause}; "
        f"{_nbytes(state) / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free; "
        + ("partial step removed; " if partial else "")
        + (f"step {kept[-1]} is intact" if kept else "no earlier step exists")) from None
  finally:
    _current.where = None
  mgr.close()
  if kind == LATEST:
    # The previous `latest` step stays (one to resume from if this one is damaged), and
    # so does every `best` step a kept `latest` step records. Every process computes
    # `kept`, but only process 0's (inside `doomed`) decides.
    kept = [s for s in all_steps(workdir, LATEST) if s < step][-(KEEP_LATEST - 1):] \
        if KEEP_LATEST > 1 else []
    _remove_steps(workdir, LATEST, lambda s: s < step and s not in kept)
    keep = (meta.get("best") or {}).get("step") if isinstance(meta, dict) else None
    if keep is not None:
      keep_best = {int(keep)} | {recorded_best(read_meta(workdir, LATEST, s)) for s in kept}
      _remove_steps(workdir, BEST, lambda s: s <= step and s not in keep_best)
  _crash_point(kind, step, "done")


def latest_step(workdir: str, kind: str) -> Optional[int]:
  """Step of the checkpoint of this kind, or None if there is none."""
  steps = all_steps(workdir, kind)
  return steps[-1] if steps else None


def step_dir(workdir: str, kind: str, step: int) -> str:
  """The directory of a final step."""
  return os.path.join(_kind_dir(workdir, kind), str(int(step)))


def verify_step(workdir: str, kind: str, step: int) -> bool:
  """Checks every file of a step against its `checksums.json`.

  Returns True when verified, False (with a warning) for a step written before
  checksums were. Raises CheckpointIntegrityError naming the step and the first file
  that differs (a flipped bit, a truncated or missing file, a damaged list).
  """
  d = step_dir(workdir, kind, step)
  what = f"checkpoint {kind!r} step {step}"
  listing_path = os.path.join(d, CHECKSUMS_FILE)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"{what}: {d} is missing")
  if not os.path.exists(listing_path):
    logging.warning("%s (%s) has no %s (written before checksums were): it is read "
                    "unverified", what, d, CHECKSUMS_FILE)
    return False
  try:
    listing = integrity.read_sealed_json(listing_path, required=True)
    if listing.get("format") != CHECKSUMS_FORMAT or not isinstance(listing.get("files"),
                                                                   dict):
      raise integrity.IntegrityError(f"{listing_path}: not a {CHECKSUMS_FORMAT} list")
  except integrity.IntegrityError as e:
    raise CheckpointIntegrityError(f"{what} is damaged: {e}") from None
  problems = integrity.check_tree(d, listing["files"])
  if problems:
    more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
    raise CheckpointIntegrityError(f"{what} is damaged: {os.path.join(d, problems[0])}"
                                   f"{more}")
  return True


def _read_failure(e: BaseException) -> str | None:
  """The first line of the innermost error of a failed orbax read when it is about the
  files (tensorstore's status, an OSError), or None for anything else (a bug)."""
  inner = e
  for _ in range(50):
    nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)
    if nxt is None:
      break
    inner = nxt
  first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
  if isinstance(inner, OSError) or re.match(
      r"(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|"
      r"UNKNOWN|INTERNAL|Error reading|Error opening)", first):
    return first[:400]
  return None


def restore(workdir: str, kind: str, template: Any = None,
            step: int | None = None) -> tuple[Any, dict]:
  """(state, meta) of the newest checkpoint of this kind (or of `step`), verified.

  With a `template` (a pytree of arrays, possibly sharded) the state is restored with the
  template's structure, dtypes and shardings (any device count or number of hosts);
  without one, as stored, onto this host's first device: a checkpoint written on 8
  devices or by several hosts loads on a single-device machine too.

  Raises:
    FileNotFoundError: no checkpoint of this kind.
    CheckpointIntegrityError: a file differs from the one written (`verify_step`).
    CheckpointReadError: orbax cannot read it (a step without checksums, damaged).
  """
  step = latest_step(workdir, kind) if step is None else int(step)
  if step is None:
    raise FileNotFoundError(
        f"no {kind!r} checkpoint under {os.path.join(workdir, CHECKPOINTS_DIR)}")
  verify_step(workdir, kind, step)
  try:
    if template is not None:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    else:
      abstract = _stored_layout(os.path.join(step_dir(workdir, kind, step), "state"))
    mgr = _manager(workdir, kind, create=False)
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    finally:
      mgr.close()
  except Exception as e:  # pylint: disable=broad-except
    cause = _read_failure(e)
    if cause is None:
      raise
    raise CheckpointReadError(f"cannot read checkpoint {kind!r} step {step} in "
                              f"{step_dir(workdir, kind, step)}: {cause}") from e
  return out["state"], out["meta"]


def read_meta(workdir: str, kind: str, step: int) -> dict | None:
  """The JSON meta of a step, read from its file (no orbax manager, so no barrier), or
  None when it cannot be read."""
  try:
    with open(os.path.join(step_dir(workdir, kind, step), "meta", "metadata")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None


def recorded_best(meta: dict | None) -> int | None:
  """The `best` step a `latest` step's meta records (None: none yet)."""
  step = ((meta or {}).get("best") or {}).get("step") if isinstance(meta, dict) else None
  return int(step) if step is not None and int(step) >= 0 else None


def restore_for_resume(workdir: str, template: Any) -> tuple[Any, dict] | None:
  """(state, meta) of the newest `latest` step that is intact, together with the `best`
  step it records; None when there is no `latest` step.

  A damaged newer step is named in one warning line that says which step the run
  resumes from instead, and removed (the resumed run writes those steps again).
  Raises CheckpointIntegrityError naming every damaged step when none is intact.
  """
  steps = all_steps(workdir, LATEST)
  if not steps:
    return None
  damaged = []
  for step in reversed(steps):
    try:
      verify_step(workdir, LATEST, step)
      best = recorded_best(read_meta(workdir, LATEST, step))
      if best is not None and best in all_steps(workdir, BEST):
        verify_step(workdir, BEST, best)
      out = restore(workdir, LATEST, template, step=step)
    except (CheckpointIntegrityError, CheckpointReadError) as e:
      damaged.append(str(e))
      continue
    if damaged:
      logging.warning("%s; resuming from step %d, the newest intact step (the newer "
                      "'latest' steps are removed and trained again)",
                      "; ".join(damaged), step)
      _remove_steps(workdir, LATEST, lambda s, keep=step: s > keep)
    return out
  raise CheckpointIntegrityError(
      f"no intact checkpoint to resume from in {_kind_dir(workdir, LATEST)}: "
      + "; ".join(damaged) + " (restore the workdir from a copy, or move "
      f"{os.path.join(workdir, CHECKPOINTS_DIR)} away to train from step 0)")


class _DropOrbaxWarning(py_logging.Filter):
  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record):
    return self.text not in record.getMessage()


def _stored_layout(path: str):
  """Shapes and dtypes of a saved state, placed on this host's first device.

  Orbax would otherwise rebuild the saving run's shardings, which name devices (and
  hosts) this process may not have ("Topology mismatch").
  """
  quiet = _DropOrbaxWarning("Metadata file does not exist")  # expected for an item dir
  logger = py_logging.getLogger("absl")
  logger.addFilter(quiet)
  try:
    metadata = ocp.StandardCheckpointer().metadata(path)
  finally:
    logger.removeFilter(quiet)
  tree = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(m):
    if hasattr(m, "shape") and hasattr(m, "dtype"):
      return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
    return m

  return jax.tree_util.tree_map(leaf, tree)


def load_variables(workdir: str) -> tuple[dict, dict]:
  """Model variables {'params', 'batch_stats'} of the best checkpoint (else the latest,
  less a family objective's parameters)."""
  kind = BEST if latest_step(workdir, BEST) is not None else LATEST
  state, meta = restore(workdir, kind)
  return {"params": model_params(state["params"]),
          "batch_stats": state["batch_stats"]}, meta

"""Training: `train_and_evaluate(config, workdir)` trains, then evaluates the best checkpoint
(`evaluation.evaluate_workdir`).

One global-view `jax.jit` step over a device `Mesh` with the batch sharded on the `data`
axis and the state replicated and donated: the max-violation loss and BatchNorm statistics
see the global batch on any number of devices and hosts. The step's randomness is
`fold_in(seed, step)` and the data order a function of `(seed, step)`, so a resumed run
replays exactly what an uninterrupted one would.
"""
import os
import signal
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from dsran_jax import checkpointing, data, evaluation, losses, models, optim, validation
from dsran_jax.core.training import OBJECTIVE_KEY, model_params
from dsran_jax.data import pipeline
from dsran_jax.models.variables import example_batch, init_variables
from dsran_jax.progress import Progress, interactive as progress_interactive
from dsran_jax.workdir import CONFIG_FILE, VOCAB_FILE, Workdir


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    """The model's variables (a family objective's parameters left out)."""
    return {"params": model_params(self.params), "batch_stats": self.batch_stats}


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh, axis `data`, over `devices` (default: every device of every host).

  Auto axis types: the step is written single-device style and XLA's partitioner inserts
  the cross-device reductions (BatchNorm statistics, the loss over the global batch).
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(config, mesh):
  n = mesh.devices.size
  if config.train.batch_size % n:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must be divisible "
                     f"by the {n} devices of the mesh")


def init_objective(model, variables, objective, rng) -> dict:
  """The family objective's fresh parameters, initialised on the model's training
  outputs for an example batch (their shapes only matter)."""
  batch = example_batch(model)
  shapes = jax.eval_shape(lambda v: model.apply(
      v, batch, train=True, method="training_outputs", rngs={"dropout": rng},
      mutable=["batch_stats"])[0], variables)
  outputs = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  got = jax.jit(objective.init)(rng, outputs)
  if set(got) != {"params"}:
    raise ValueError(f"a training objective's init must give {{'params': ...}}, got "
                     f"collections {sorted(got)}")
  return got["params"]


def create_state(model, tx, config, rng, sharding, workdir=None,
                 objective=None) -> TrainState:
  """Fresh replicated state: random init, then the family's pretrained weights (BERT,
  GloVe, ...); with a family `objective`, its parameters under
  `params[OBJECTIVE_KEY]`."""
  variables = init_variables(model, rng)
  variables = models.load_pretrained(variables, config, vocab=data.gru_vocabulary(config, workdir))
  params = variables["params"]
  if objective is not None:
    if OBJECTIVE_KEY in params:
      raise ValueError(f"the model has a top-level module named {OBJECTIVE_KEY!r}, "
                       f"the key of its training objective's parameters")
    params = {**params, OBJECTIVE_KEY: init_objective(
        model, variables, objective, jax.random.fold_in(rng, 1))}
  variables = jax.device_put({**variables, "params": params}, sharding)
  opt_state = jax.jit(tx.init, out_shardings=sharding)(variables["params"])
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sharding),
                    params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                    opt_state=opt_state)


def make_train_step(model, tx, config, schedule, frozen=(), objective=None):
  """The pure train step `(state, batch) -> (state, metrics)` (not yet jitted).

  Without a family `objective`, the model's training call gives the (B, B) score matrix
  of the batch and the loss is the VSE++ hinge on it. With one
  (`models.training_objective`), the loss is `objective.loss` of the model's
  `training_outputs` and the objective's parameters (`params[OBJECTIVE_KEY]`).
  Parameters matching a `frozen` regex get stop_gradient, so XLA drops their backward
  pass.
  """
  t = config.train
  base_rng = jax.random.PRNGKey(t.seed)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params):
      params = optim.stop_frozen_gradients(params, frozen)
      variables = {"params": model_params(params), "batch_stats": state.batch_stats}
      if objective is None:
        scores, updates = model.apply(variables, batch, train=True, rngs={"dropout": rng},
                                      mutable=["batch_stats"])
        loss = losses.training_loss(scores, t, state.step)
      else:
        outputs, updates = model.apply(variables, batch, train=True,
                                       method="training_outputs", rngs={"dropout": rng},
                                       mutable=["batch_stats"])
        loss = objective.loss({"params": params[OBJECTIVE_KEY]}, outputs, batch,
                              state.step, jax.random.fold_in(rng, 1))
      return loss, updates.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, new_stats, opt_state), metrics

  return step_fn


def jit_train_step(step_fn, mesh, state_sharding):
  """`jax.jit` of the step: batch sharded over `data`, state replicated and donated."""
  batch_sharding = NamedSharding(mesh, P("data"))
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


def global_batch(batch: dict, mesh) -> dict:
  """Assembles each host's slice of the batch into global arrays sharded over `data`."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


class _Preemption:
  """SIGTERM (a preempted TPU VM) and a first Ctrl-C become a flag the loop checks after
  every step and a dev evaluation checks between batches; the run then saves and exits.
  A second Ctrl-C aborts at once."""

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self.signal_time = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    self.signal_time = time.time()
    logging.warning("%s received: saving at the end of this step%s", self.signal_name,
                    " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "")

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _any_process(flag: bool) -> bool:
  """True if `flag` is true on any host, so every host saves or stops at the same step."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def build(config, workdir: str):
  """The model and the training split of a config (shared by train and benchmarks)."""
  train_split = data.load_split(config, config.data.train_split, workdir)
  model = models.build_model(config.model, vocab_size=data.vocab_size(config, workdir))
  return model, train_split


def _check_finite_step(step: int, metrics: dict, image_ids) -> None:
  """Stops the run at the first non-finite loss or gradient, naming step and images."""
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if np.isfinite(loss) and np.isfinite(grad_norm):
    return
  shown = ", ".join(str(i) for i in list(image_ids)[:16])
  more = f" (+{len(image_ids) - 16} more)" if len(image_ids) > 16 else ""
  raise FloatingPointError(
      f"step {step}: non-finite training {'loss' if not np.isfinite(loss) else 'gradient'} "
      f"(loss {loss}, grad_norm {grad_norm}); this host's batch held images {shown}{more}. "
      f"Nothing was saved after the last good checkpoint; check these images' features")


class _StepWatch:
  """Keeps the metrics of the last dispatched step, fetched (and checked) one step late
  so the host never waits on the device except where it must: logging, evaluation,
  saving."""

  def __init__(self, image_ids):
    self.image_ids = image_ids
    self.pending = None
    self.last = None

  def push(self, step: int, metrics, batch) -> None:
    self.flush()
    self.pending = (step, metrics, batch["image_index"])

  def flush(self) -> Optional[dict]:
    """The newest step's metrics (a copy), checked finite; None before any step."""
    if self.pending is not None:
      step, metrics, index = self.pending
      self.pending = None
      values = jax.device_get(metrics)
      _check_finite_step(step, values, [self.image_ids[int(i)] for i in np.asarray(index)])
      self.last = values
    return None if self.last is None else dict(self.last)


def _best_text(best) -> str:
  """The best dev result so far, for the log ("no dev evaluation yet" before the first)."""
  if best["step"] < 0:
    return "no dev evaluation yet"
  return f"best dev rsum {best['rsum']:.2f} at step {best['step']}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       stop_at: Optional[int] = None,
                       save_sims: Optional[bool] = None) -> dict:
  """Trains, keeps the best dev-rsum checkpoint, then evaluates it on the test split.

  Resumes from `{workdir}/checkpoints/latest` when present. A SIGTERM or Ctrl-C saves
  at the end of the current step (a dev evaluation in progress is abandoned and redone
  after resuming) and returns. Returns the test results (also written to
  `{workdir}/eval_results.json`).

  Args:
    config: the full config (see dsran_jax/default_config.py).
    workdir: output directory.
    mesh: device mesh with a `data` axis (default: every device).
    stop_at: save and return after this global step, as a preemption would (to split a
      run over time-limited sessions); the next call resumes from there.
    save_sims: also save the test sims matrix (default `eval.save_sims`).

  Raises:
    validation.ConfigError: a config value is out of range (checked before any work).
    workdir.WorkdirLockedError: another run (named by pid and host) uses `workdir`.
  """
  validation.validate_config(config, num_processes=jax.process_count())
  data.format_module(config)
  wd = Workdir(workdir)
  created = not os.path.isdir(wd.path) or not os.listdir(wd.path)
  os.makedirs(wd.path, exist_ok=True)
  try:
    # One run per workdir; the kernel drops the lock when the process ends, however.
    with wd.lock():
      return _train_and_evaluate(config, wd, mesh, stop_at, save_sims)
  except BaseException:
    if created:
      _remove_if_only_setup(wd)
    raise


# What a run writes before its first step; a new workdir holding only these when the run
# fails (a missing data root, a bad file) is removed, so a retry starts clean.
_SETUP_FILES = (CONFIG_FILE, VOCAB_FILE)


def _remove_if_only_setup(wd: Workdir) -> None:
  try:
    names = os.listdir(wd.path)
  except FileNotFoundError:
    return
  if all(name in _SETUP_FILES for name in names):
    for name in names:
      os.remove(os.path.join(wd.path, name))
    os.rmdir(wd.path)


def _train_and_evaluate(config, wd: Workdir, mesh, stop_at, save_sims) -> dict:
  """`train_and_evaluate` once the config is valid and the workdir is locked."""
  t_setup = time.time()
  workdir = wd.path
  # Said first and kept in config.json: a result of this run is not the authors' recipe.
  departures = models.departures(config)
  for note in departures:
    logging.warning("this run departs from the authors' recipe: %s", note)
  config.train.departures = "; ".join(departures)
  _, dtype_note = models.compute_dtype(config.model, jax.default_backend())
  if dtype_note:
    logging.warning("%s", dtype_note)
  wd.save_config(config)
  mesh = mesh or make_mesh()
  check_batch_size(config, mesh)
  model, train_split = build(config, workdir)
  dev_split = data.load_dev_split(config, workdir)
  steps_per_epoch = pipeline.steps_per_epoch(train_split, config)
  widths = pipeline.train_widths(train_split, config)
  logging.info("captions: training batches %s tokens wide (their longest caption, in "
               "steps of data.caption_bucket=%d): the step compiles once per width reached",
               f"{widths[0]} ... {widths[-1]}" if len(widths) > 1 else widths[0],
               config.data.caption_bucket)
  total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
  schedule = optim.learning_rate_schedule(config.train, steps_per_epoch, total_steps)
  model_frozen = models.frozen_paths(config.model)
  objective = models.training_objective(config)
  tx = optim.make_optimizer(config.train, schedule, model_frozen, objective)
  frozen = optim.frozen_patterns(config.train, model_frozen)
  logging.info("data: %d training captions of %d images, dev %d images; %d steps of %d "
               "(%d per epoch) (%.1fs)", train_split.num_captions, train_split.num_images,
               dev_split.num_images, total_steps, config.train.batch_size, steps_per_epoch,
               time.time() - t_setup)

  t0 = time.time()
  replicated = NamedSharding(mesh, P())
  state = create_state(model, tx, config, jax.random.PRNGKey(config.train.seed), replicated,
                       workdir, objective)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  logging.info("model %s: %.2fM parameters%s, on %d devices (%.1fs)", config.model.name,
               n_params / 1e6, f", frozen: {', '.join(frozen)}" if frozen else "",
               mesh.devices.size, time.time() - t0)
  best = {"rsum": -1.0, "step": -1}
  history = []
  pending_validation = None
  # The newest intact `latest` step (checksums verified, with the `best` step it
  # records); a damaged newer one is named in the log and trained again.
  resumed = checkpointing.restore_for_resume(workdir, state)
  if resumed is not None:
    restored, meta = resumed
    state = jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding), restored, state)
    best, history = meta["best"], meta["history"]
    pending_validation = meta.get("pending_validation")
    logging.info("resumed from step %d (%s)", int(state.step), _best_text(best))
  start = int(state.step)

  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_fn = jit_train_step(make_train_step(model, tx, config, schedule, frozen, objective),
                           mesh, state_sharding)
  eval_every = config.train.eval_every or steps_per_epoch
  every_s = float(config.train.checkpoint_every_s)
  log = wd.metrics_log(start)
  watch = _StepWatch(train_split.image_ids)

  def save_latest(step, pending=None):
    watch.flush()  # never write weights of a step whose loss was not finite
    log.sync()  # the rows up to this step survive a power loss along with the checkpoint
    t_save = time.time()
    checkpointing.save(workdir, checkpointing.LATEST, step, state,
                       {"step": step, "best": best, "history": history,
                        "pending_validation": pending})
    logging.info("step %d: saved checkpoints/latest (%.1fs)", step, time.time() - t_save)

  # One scorer for every dev evaluation: compiled once, given the new weights each time.
  dev_scorer = evaluation.make_scorer(model, state.variables, config)

  def validate(step, preempt) -> bool:
    """Dev evaluation; False if a signal cut it short."""
    nonlocal best
    t_eval = time.time()
    try:
      results = evaluation.evaluate_split(model, state.variables, dev_split, config, "1k",
                                          should_stop=lambda: preempt.requested,
                                          scorer=dev_scorer)
    except evaluation.Interrupted:
      return False
    rsum = evaluation.headline(results)["rsum"]
    history.append({"step": step, "dev_rsum": rsum})
    log.write(step, {"dev_rsum": rsum})
    logging.info("step %d: dev rsum %.2f (%s) (%.1fs)", step, rsum, _best_text(best),
                 time.time() - t_eval)
    if rsum > best["rsum"]:
      best = {"rsum": rsum, "step": step, "metrics": evaluation.headline(results)}
      checkpointing.save(workdir, checkpointing.BEST, step, state.variables, best)
    return True

  next_ckpt = min((start // config.train.checkpoint_every + 1) * config.train.checkpoint_every,
                  total_steps)
  logging.info("first checkpoint at step %d or after %.0fs, whichever comes first; dev "
               "evaluation every %d steps", next_ckpt, every_s, eval_every)
  bar = Progress(total_steps, "train", unit="step", initial=start)
  window_t, window_n, last_save = time.time(), 0, time.time()
  # Closing the endless reader stops its background reads before the final evaluation.
  augment = models.train_augmentation(config, data.vocab_size(config, workdir))
  with pipeline.train_batches(train_split, config, start_step=start,
                              augment=augment) as batches, \
      _Preemption() as preempt:
    if pending_validation is not None and not validate(pending_validation, preempt):
      save_latest(start, pending_validation)
      bar.close()
      return {"stopped_at": start}
    for step in range(start, total_steps):
      batch = next(batches)
      t_step = time.time()
      state, metrics = step_fn(state, global_batch(batch, mesh))
      done = step + 1
      watch.push(done, metrics, batch)
      window_n += config.train.batch_size
      bar.update(1)
      if done <= start + 3 or done == start + 10:
        # The first steps include compilation; later ones show the steady rate.
        values = watch.flush()
        logging.info("step %d: loss %.4f (%.2fs%s)", done, values["loss"],
                     time.time() - t_step, ", includes compilation" if done == start + 1
                     else "")
      if done % config.train.log_every == 0 or done == total_steps:
        values = watch.flush()
        values["examples_per_s"] = window_n / max(time.time() - window_t, 1e-9)
        values["epoch"] = done / steps_per_epoch
        log.write(done, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
        if not progress_interactive():
          logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f examples/s", done, total_steps,
                       values["loss"], values["lr"], values["examples_per_s"])
        window_t, window_n = time.time(), 0
      signalled = _any_process(preempt.requested)
      pending = None
      if done % eval_every == 0 or done == total_steps:
        watch.flush()
        # After a signal the evaluation is left for the resumed run (saved as pending).
        if signalled or not validate(done, preempt):
          pending = done
      stop = done == stop_at or _any_process(preempt.requested)
      timed = _any_process(time.time() - last_save >= every_s)
      if (done % config.train.checkpoint_every == 0 or done == total_steps or stop or timed):
        save_latest(done, pending)
        last_save = time.time()
      if stop:
        why = preempt.signal_name or "stop_at"
        delay = (f", {time.time() - preempt.signal_time:.1f}s after the signal"
                 if preempt.signal_time else "")
        logging.warning("stopped at step %d (%s%s); saved to %s; run again to resume", done,
                        why, delay, workdir)
        bar.close()
        return {"stopped_at": done}
  bar.close()
  return evaluation.evaluate_workdir(wd, config, save_sims=save_sims)

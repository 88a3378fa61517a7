"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate_workdir`.

One global-view `jax.jit` step over a device `Mesh` with the batch sharded on the `data`
axis and the state replicated and donated: the max-violation loss and BatchNorm statistics
see the global batch on any number of devices and hosts. The step's randomness is
`fold_in(seed, step)` and the data order a function of `(seed, step)`, so a resumed run
replays exactly what an uninterrupted one would.
"""
import json
import os
import signal
import sys
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from dsran_jax import checkpointing, data, evaluation, losses, models, optim
from dsran_jax.data import pipeline
from dsran_jax.default_config import CONFIG_FILE, load_workdir_config, save_workdir_config


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


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


def create_state(model, tx, config, rng, sharding, workdir=None) -> TrainState:
  """Fresh replicated state: random init, then the pretrained BERT (or GloVe) weights."""
  variables = models.init_variables(model, rng)
  if model.config.text_encoder == "bert" and not config.model.bert_random_init:
    variables = models.load_pretrained_bert(variables, config.model)
  elif model.config.text_encoder == "gru" and config.model.glove_path:
    variables = models.load_glove(variables, config.model.glove_path,
                                  data.gru_vocabulary(config, workdir).word2idx)
  variables = jax.device_put(variables, sharding)
  opt_state = jax.jit(tx.init, out_shardings=sharding)(variables["params"])
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sharding),
                    params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                    opt_state=opt_state)


def make_train_step(model, tx, config, schedule):
  """The pure train step `(state, batch) -> (state, metrics)` (not yet jitted)."""
  t = config.train
  base_rng = jax.random.PRNGKey(t.seed)

  def loss_fn(params, batch_stats, batch, rng):
    (img, txt), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch, train=True,
        rngs={"dropout": rng}, mutable=["batch_stats"])
    return img, txt, updates["batch_stats"]

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)

    def objective(params):
      if t.freeze_bert:
        # stop_gradient (not just a zero update) so XLA drops BERT's backward pass.
        text = dict(params["text_enc"])
        text["bert"] = jax.lax.stop_gradient(text["bert"])
        params = {**params, "text_enc": text}
      img, txt, new_stats = loss_fn(params, state.batch_stats, batch, rng)
      max_v = losses.contrastive_loss(img, txt, t.margin, max_violation=True)
      if not t.max_violation:
        loss = losses.contrastive_loss(img, txt, t.margin, max_violation=False)
      elif t.sum_violation_steps > 0:
        sum_v = losses.contrastive_loss(img, txt, t.margin, max_violation=False)
        loss = jnp.where(state.step < t.sum_violation_steps, sum_v, max_v)
      else:
        loss = max_v
      return loss, new_stats

    (loss, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
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


MODEL_BATCH_KEYS = ("grid", "regions", "region_pos", "region_mask", "input_ids",
                    "attention_mask")


def make_scorer(model, variables):
  """A DSRAN `EmbeddingScorer` over jitted eval-mode `embed_images` / `embed_texts`.

  Runs on this host's first device with its local copy of the (replicated) variables,
  so every host can encode without cross-host traffic.
  """
  variables = jax.tree_util.tree_map(
      lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, variables)

  image_fn, text_fn = models.jitted_embedders(model)

  def pick(batch, keys):
    return {k: batch[k] for k in keys if k in batch}

  return evaluation.EmbeddingScorer(
      lambda b: np.asarray(image_fn(variables, pick(b, MODEL_BATCH_KEYS[:4]))),
      lambda b: np.asarray(text_fn(variables, pick(b, MODEL_BATCH_KEYS[4:]))))


def evaluate_split(model, variables, split, config, protocol: str,
                   sims_path: Optional[str] = None) -> dict:
  """Encodes a split once and ranks it with the community protocol."""
  scorer = make_scorer(model, variables)
  bs = config.eval.batch_size
  return evaluation.evaluate(
      scorer,
      pipeline.eval_image_batches(split, bs, config.model.image_inputs),
      pipeline.eval_caption_batches(split, bs),
      cpi=split.captions_per_image, protocol=protocol, chunk_size=config.eval.chunk_size,
      sims_path=sims_path)


def headline(results: dict) -> dict:
  """The one metrics dict model selection looks at (1k, or COCO 1K folds)."""
  for key in ("1k", "coco1k", "coco5k"):
    if key in results:
      return results[key]
  raise KeyError(f"no known protocol in {sorted(results)}")


class _Preemption:
  """Turns SIGTERM (a preempted TPU VM) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard scalars."""

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_after(start_step)
    self._tb = None
    if jax.process_index() == 0:
      try:
        import tensorflow as tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      except Exception as e:  # TensorBoard is a convenience; metrics.jsonl is the record
        logging.warning("TensorBoard writer unavailable: %s", e)

  def _drop_after(self, step):
    # A resumed run rewrites the steps after its checkpoint, so the log has no duplicates.
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def write(self, step: int, values: dict):
    if jax.process_index() != 0:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      import tensorflow as tf
      try:
        with self._tb.as_default(step=int(step)):
          for k, v in values.items():
            tf.summary.scalar(k, float(v))
        self._tb.flush()
      except Exception as e:  # TensorBoard is a convenience; metrics.jsonl is the record
        logging.warning("TensorBoard summaries disabled: %s", e)
        self._tb = None


def _progress(total, initial):
  if not sys.stderr.isatty():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def build(config, workdir: str):
  """Model, data splits, optimiser and schedule for a config (shared by train and eval)."""
  train_split = data.load_split(config, config.data.train_split, workdir)
  model = models.build_model(config.model, vocab_size=data.vocab_size(config, workdir))
  return model, train_split


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       stop_at: Optional[int] = None) -> dict:
  """Trains, keeps the best dev-rsum checkpoint, then evaluates it on the test split.

  Resumes from `{workdir}/checkpoints/latest` when present. Returns the test results
  (also written to `{workdir}/eval_results.json`).

  Args:
    config: the full config (see dsran_jax/default_config.py).
    workdir: output directory.
    mesh: device mesh with a `data` axis (default: every device).
    stop_at: save and return after this global step, as a preemption would (to split a
      run over time-limited sessions); the next call resumes from there.
  """
  os.makedirs(workdir, exist_ok=True)
  save_workdir_config(config, workdir)
  mesh = mesh or make_mesh()
  check_batch_size(config, mesh)
  model, train_split = build(config, workdir)
  dev_split = data.load_split(config, config.data.dev_split, workdir).subset_images(
      config.eval.max_dev_images)
  steps_per_epoch = pipeline.steps_per_epoch(train_split, config)
  total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
  schedule = optim.learning_rate_schedule(config.train, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config.train, schedule)

  replicated = NamedSharding(mesh, P())
  state = create_state(model, tx, config, jax.random.PRNGKey(config.train.seed), replicated,
                       workdir)
  best = {"rsum": -1.0, "step": -1}
  history = []
  if checkpointing.latest_step(workdir, checkpointing.LATEST) is not None:
    restored, meta = checkpointing.restore(workdir, checkpointing.LATEST, state)
    state = jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding), restored, state)
    best, history = meta["best"], meta["history"]
    logging.info("resumed from step %d (best dev rsum %.2f)", int(state.step), best["rsum"])
  start = int(state.step)

  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_fn = jit_train_step(make_train_step(model, tx, config, schedule), mesh, state_sharding)
  eval_every = config.train.eval_every or steps_per_epoch
  log = MetricsLog(workdir, start)

  def save_latest(step):
    checkpointing.save(workdir, checkpointing.LATEST, step, state,
                       {"step": step, "best": best, "history": history})

  def validate(step):
    nonlocal best
    results = evaluate_split(model, state.variables, dev_split, config, "1k")
    rsum = headline(results)["rsum"]
    history.append({"step": step, "dev_rsum": rsum})
    log.write(step, {"dev_rsum": rsum})
    logging.info("step %d: dev rsum %.2f (best %.2f)", step, rsum, best["rsum"])
    if rsum > best["rsum"]:
      best = {"rsum": rsum, "step": step, "metrics": headline(results)}
      checkpointing.save(workdir, checkpointing.BEST, step, state.variables, best)

  bar = _progress(total_steps, start)
  window_t, window_n = time.time(), 0
  # Closing the endless reader stops its background reads before the final evaluation.
  with pipeline.train_batches(train_split, config, start_step=start) as batches, \
      _Preemption() as preempt:
    for step in range(start, total_steps):
      state, metrics = step_fn(state, global_batch(next(batches), mesh))
      window_n += config.train.batch_size
      done = step + 1
      if bar is not None:
        bar.update(1)
      if done % config.train.log_every == 0 or done == total_steps:
        values = jax.device_get(metrics)
        values["examples_per_s"] = window_n / max(time.time() - window_t, 1e-9)
        values["epoch"] = done / steps_per_epoch
        log.write(done, values)
        if bar is not None:
          bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
        else:
          logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f examples/s", done, total_steps,
                       values["loss"], values["lr"], values["examples_per_s"])
        window_t, window_n = time.time(), 0
      if done % eval_every == 0 or done == total_steps:
        validate(done)
      stop = preempt.requested or done == stop_at
      if done % config.train.checkpoint_every == 0 or done == total_steps or stop:
        save_latest(done)
      if stop:
        logging.warning("stopped at step %d (%s); saved to %s", done,
                        "SIGTERM" if preempt.requested else "stop_at", workdir)
        if bar is not None:
          bar.close()
        return {"stopped_at": done}
  if bar is not None:
    bar.close()
  results = evaluate_workdir(config, workdir, model=model)
  if jax.process_index() == 0:
    from dsran_jax import plots
    for draw in (plots.training_curves, lambda w: plots.evaluation_figures(w, config=config)):
      try:
        draw(workdir)
      except Exception as e:  # a missing plot must never cost a finished run
        logging.warning("could not draw figures: %s", e)
  return results


def _with_workdir_model(config, workdir: str):
  """`config` with its `model` section taken from the workdir's config.json, so a
  checkpoint is rebuilt with the shape it was trained (or converted) with."""
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return config
  saved = load_workdir_config(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = saved.model
  return config


def evaluate_workdir(config, workdir: str, model=None, save_sims: Optional[bool] = None) -> dict:
  """Evaluates the best checkpoint of a workdir on the test split (COCO: 5K and 5-fold 1K).

  Writes `{workdir}/eval_results.json` (and the sims `.npy` if asked) and returns the dict.
  """
  config = _with_workdir_model(config, workdir)
  if model is None:
    model = models.build_model(config.model, vocab_size=data.vocab_size(config, workdir))
  variables, meta = checkpointing.load_variables(workdir)
  split = data.load_split(config, config.data.test_split, workdir)
  save_sims = config.eval.save_sims if save_sims is None else save_sims
  sims_path = os.path.join(workdir, f"sims_{split.name}.npy") if save_sims else None
  results = evaluate_split(model, variables, split, config, config.eval.protocol, sims_path)
  out = {"split": split.name, "checkpoint_step": meta.get("step"),
         "num_images": split.num_images, "num_captions": split.num_captions, **results}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(out, f, indent=2)
  print(evaluation.format_table(results))
  return out

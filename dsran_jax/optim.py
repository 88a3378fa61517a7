"""Optimisers and learning-rate schedules of the authors' two recipes, in optax.

- BERT build ("bertadam"): BertAdam as in pytorch_pretrained_bert: each tensor's gradient
  clipped to norm 1.0, Adam moments without bias correction, eps 1e-6, no weight decay
  (the authors put every parameter in a decay-0 group); lr = base * 0.1^(epoch //
  lr_update) * warmup_linear(step / total, warmup), where warmup_linear rises linearly to
  1 over the first `warmup` fraction and then falls linearly to 0 at the last step.
- GRU build ("adam"): torch.optim.Adam (bias-corrected, eps 1e-8) after global-norm
  clipping at `grad_clip`, lr = base * 0.1^(epoch // lr_update).
- "adamw": torch.optim.AdamW, the same Adam direction plus the decoupled decay
  `weight_decay * param`, both scaled by the learning rate (VSE∞'s recipe); with
  `bert_lr_scale` the BERT group's decay is scaled too, as a torch param group's lr is.
"""
import re
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from dsran_jax.core.training import OBJECTIVE_KEY as OBJECTIVE, parse_milestones


def learning_rate_schedule(train_config, steps_per_epoch: int, total_steps: int):
  """step -> lr, the product of the step decay and (BertAdam) the warmup-linear factor.

  The step decay is x0.1 every `lr_update` epochs, or x0.1 at each epoch of
  `lr_milestones` when that is set (HREM's `--lr_schedules 15 25`)."""
  base = train_config.learning_rate
  decay_every = max(1, train_config.lr_update * steps_per_epoch)
  milestones = parse_milestones(train_config.get("lr_milestones", ""))
  bounds = jnp.asarray([m * steps_per_epoch for m in milestones], jnp.float32)
  warmup = train_config.warmup if train_config.optimizer == "bertadam" else 0.0
  total = max(1, total_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if milestones:
      lr = base * 0.1 ** jnp.sum(step >= bounds).astype(jnp.float32)
    else:
      lr = base * 0.1 ** jnp.floor(step / decay_every)
    if warmup > 0:
      x = step / total
      lr = lr * jnp.where(x < warmup, x / warmup, jnp.maximum((x - 1.0) / (warmup - 1.0), 0.0))
    return lr

  return schedule


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
  """Clips every tensor's gradient to `max_norm` separately (torch clip_grad_norm_ on one
  parameter at a time, as BertAdam does)."""

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      coef = max_norm / (norm + 1e-6)
      return jnp.where(coef < 1.0, g * coef, g)

    return jax.tree_util.tree_map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class BertAdamState(NamedTuple):
  mu: optax.Updates
  nu: optax.Updates


def scale_by_bert_adam(b1=0.9, b2=0.999, eps=1e-6) -> optax.GradientTransformation:
  """Adam direction m / (sqrt(v) + eps) with no bias correction (BertAdam's)."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return BertAdamState(jax.tree_util.tree_map(zeros, params),
                         jax.tree_util.tree_map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, BertAdamState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


BERT_PATHS = r"(^|/)bert(/|$)"


def path_str(path) -> str:
  """"a/b/kernel" for a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def frozen_patterns(train_config, model_patterns: Sequence[str] = ()) -> Tuple[str, ...]:
  """Regexes of the parameter paths a run never trains: the family's frozen layers, BERT
  when `train.freeze_bert`, and the comma-separated `train.freeze`."""
  patterns = list(model_patterns)
  if train_config.freeze_bert:
    patterns.append(BERT_PATHS)
  extra = str(train_config.get("freeze", ""))
  patterns += [p.strip() for p in extra.split(",") if p.strip()]
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"config.train.freeze: {p!r} is not a regular expression ({e})") from None
  return tuple(patterns)


def path_labels(params, patterns: Sequence[str], label: str, other: str = "rest"):
  """A pytree of `label` where a parameter's path matches one of `patterns`, else `other`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: label if any(c.search(path_str(path)) for c in compiled) else other,
      params)


def stop_frozen_gradients(params, patterns: Sequence[str]):
  """`params` with stop_gradient on the frozen ones, so XLA drops their backward pass
  (gradients still flow *through* frozen layers to the ones before them)."""
  if not patterns:
    return params
  labels = path_labels(params, patterns, "frozen")
  return jax.tree_util.tree_map(
      lambda p, l: jax.lax.stop_gradient(p) if l == "frozen" else p, params, labels)


class GateState(NamedTuple):
  count: jnp.ndarray
  inner: optax.OptState


def active_from(start: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` from its `start`-th update on; before that, zero updates and `inner`'s
  state untouched (torch's optimisers skip a parameter whose grad is None: no moment,
  no weight decay, no step count until the first gradient reaches it)."""

  def init_fn(params):
    return GateState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    on = state.count >= start
    updates = jax.tree_util.tree_map(lambda u: jnp.where(on, u, jnp.zeros_like(u)),
                                     new_updates)
    kept = jax.tree_util.tree_map(lambda n, o: jnp.where(on, n, o), new_inner, state.inner)
    return updates, GateState(state.count + 1, kept)

  return optax.GradientTransformation(init_fn, update_fn)


def _direction(t) -> list:
  """The per-parameter update direction of `t.optimizer`, before the learning rate."""
  if t.optimizer == "bertadam":
    return [clip_each_by_norm(1.0), scale_by_bert_adam()]
  if t.optimizer == "adam":
    return [optax.scale_by_adam(eps=1e-8)]
  if t.optimizer == "adamw":
    return [optax.scale_by_adam(eps=1e-8), optax.add_decayed_weights(t.weight_decay)]
  raise ValueError(f"config.train.optimizer={t.optimizer!r}; expected 'bertadam', 'adam' "
                   f"or 'adamw'")


def _with_objective(t, schedule, objective) -> optax.GradientTransformation:
  """The optimiser of a family objective's run (see `make_optimizer`): one global-norm
  clip over every trained parameter, then the groups bert (x bert_lr_scale), objective
  (x objective.lr_scale, updated from step objective.active_from on) and the rest."""
  groups = {"rest": optax.chain(*_direction(t)),
            "bert": optax.chain(*_direction(t), optax.scale(t.bert_lr_scale)),
            OBJECTIVE: optax.chain(active_from(int(objective.active_from),
                                               optax.chain(*_direction(t))),
                                   optax.scale(float(objective.lr_scale)))}

  def labels(params):
    def label(path, _):
      p = path_str(path)
      if p.split("/", 1)[0] == OBJECTIVE:
        return OBJECTIVE
      return "bert" if re.search(BERT_PATHS, p) else "rest"
    return jax.tree_util.tree_map_with_path(label, params)

  chain = [optax.multi_transform(groups, labels),
           optax.scale_by_schedule(lambda step: -schedule(step))]
  if t.grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(t.grad_clip))
  return optax.chain(*chain)


def make_optimizer(train_config, schedule, model_frozen: Sequence[str] = (),
                   objective=None) -> optax.GradientTransformation:
  """The optax chain for `config.train` (see module docstring). Parameters whose path
  matches a regex of `frozen_patterns(train_config, model_frozen)` get no update and take
  no part in gradient clipping; BERT weights can get a smaller lr (`bert_lr_scale`).

  `objective`: a family's training objective (`models.training_objective`), whose
  parameters sit under the key "objective" of the trained tree: they get their own
  group, at lr x `objective.lr_scale`, untouched before step `objective.active_from`
  (as torch's AdamW skips parameters without gradients), and share the global-norm clip
  (HREM's four AdamW groups). None: the chain of a family without one, unchanged."""
  t = train_config
  frozen = frozen_patterns(t, model_frozen)
  if objective is not None:
    tx = _with_objective(t, schedule, objective)
    if frozen:
      tx = optax.multi_transform({"frozen": optax.set_to_zero(), "rest": tx},
                                 lambda params: path_labels(params, frozen, "frozen"))
    return tx
  chain = _direction(t)
  split = t.bert_lr_scale != 1.0
  if t.grad_clip > 0 and not split:
    chain.insert(0, optax.clip_by_global_norm(t.grad_clip))
  chain.append(optax.scale_by_schedule(lambda step: -schedule(step)))
  tx = optax.chain(*chain)
  if split:
    tx = optax.multi_transform(
        {"bert": optax.chain(tx, optax.scale(t.bert_lr_scale)), "rest": tx},
        lambda params: path_labels(params, [BERT_PATHS], "bert"))
    if t.grad_clip > 0:
      # One global norm over every trained parameter, BERT's group included, as torch's
      # clip_grad_norm_(params) before the step (not one norm per group).
      tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  if frozen:
    # multi_transform hands the trainable subtree alone to `tx`, so a global-norm clip
    # is computed over the trained parameters only (MLASM's recipe).
    tx = optax.multi_transform({"frozen": optax.set_to_zero(), "rest": tx},
                               lambda params: path_labels(params, frozen, "frozen"))
  return tx

"""The family-independent half of `tools.convert_torch`: reading a PyTorch checkpoint
safely, and mapping a state dict onto Flax variables with a table of rules.

A rule is `(regex on the torch module prefix, Flax module path template, leaf kind)`:
the key `txt_enc.rnn.weight_ih_l0` has module prefix `txt_enc.rnn` and leaf
`weight_ih_l0`; a rule `(r"^txt_enc\\.rnn$", "text_enc/gru", "gru")` sends it to
`params/text_enc/gru/w_ih` (transposed), as the `gru` kind says. Templates may use the
regex's groups (`\\1`). Kind `drop` discards a module on purpose (weights we do not use).

`map_state_dict` reports every problem at once, naming both sides: unexpected torch keys,
model parameters no key maps to (with the torch key that would), and shape mismatches.
Families keep their tables in `dsran_jax/models/<family>/params.py`.
"""
import argparse
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dsran_jax import atomic
from dsran_jax.convert import torch_pickle


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a/b/c": leaf} of nested dicts (flax's traverse_util without importing jax)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """The nested dicts of a `flatten`ed mapping."""
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


_T = lambda w: np.ascontiguousarray(w.T)  # PyTorch (out, in) -> Flax (in, out)
_I = lambda w: w


def _conv(w):
  """PyTorch conv (out, in, kh, kw) -> Flax (kh, kw, in, out)."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


# How a checkpoint leaf lands in the Flax variables: {torch leaf: (collection, flax leaf,
# transform)}; None drops the leaf (e.g. BatchNorm's step counter).
LEAF_KINDS: Dict[str, Dict[str, Optional[Tuple[str, str, Callable]]]] = {
    "linear": {"weight": ("params", "kernel", _T), "bias": ("params", "bias", _I)},
    "conv": {"weight": ("params", "kernel", _conv), "bias": ("params", "bias", _I)},
    "bn": {"weight": ("params", "scale", _I), "bias": ("params", "bias", _I),
           "running_mean": ("batch_stats", "mean", _I),
           "running_var": ("batch_stats", "var", _I), "num_batches_tracked": None},
    "embed": {"weight": ("params", "embedding", _I)},
    "layernorm": {"weight": ("params", "scale", _I), "bias": ("params", "bias", _I)},
    # torch nn.MultiheadAttention's packed q/k/v projection (`common.transformer`).
    "mha": {"in_proj_weight": ("params", "in_proj_kernel", _T),
            "in_proj_bias": ("params", "in_proj_bias", _I)},
    # PyTorch GRU/LSTM (gate order kept: r, z, n / i, f, g, o). A bidirectional layer's
    # `*_reverse` leaves go to the sibling module `<template>_reverse`.
    "gru": {"weight_ih_l0": ("params", "w_ih", _T), "bias_ih_l0": ("params", "b_ih", _I),
            "weight_hh_l0": ("params", "w_hh", _T), "bias_hh_l0": ("params", "b_hh", _I)},
}
LEAF_KINDS["lstm"] = LEAF_KINDS["gru"]
DROP = "drop"
REVERSE = "_reverse"

Rule = Tuple[str, str, str]


class ConversionError(ValueError):
  """A checkpoint that does not fit the model; the message lists every problem."""


def to_numpy(value, keep_dtype: bool = False) -> np.ndarray:
  """A tensor (torch or numpy) as a numpy array; floats as float32, unless `keep_dtype`
  (the tensor as stored: a file written from it holds the checkpoint's own values)."""
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    if value.is_floating_point() and not keep_dtype:
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating) and not keep_dtype:
    value = value.astype(np.float32, copy=False)
  return value


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> Dict[str, Any]:
  """Drops a prefix every key carries (nn.DataParallel's `module.`)."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _fill_groups(regex: str, values: Sequence[str]) -> str:
  """The literal a rule's regex matches when its groups take `values` (for messages)."""
  out, depth, k, i = [], 0, 0, 0
  body = regex.strip("^$")
  while i < len(body):
    ch = body[i]
    if ch == "\\" and i + 1 < len(body):
      if depth == 0:
        out.append(body[i + 1])
      i += 2
      continue
    if ch == "(":
      if depth == 0:
        out.append(values[k] if k < len(values) else "?")
        k += 1
      depth += 1
    elif ch == ")":
      depth -= 1
    elif depth == 0 and ch not in "?":
      out.append(ch)
    i += 1
  return "".join(out)


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r"\\(\d+)", template)
  pattern = "".join(re.escape(p) if n % 2 == 0 else f"(?P<g{p}>[^/]+)"
                    for n, p in enumerate(parts))
  return re.compile(f"^{pattern}$")


def torch_key_for(path: str, rules: Sequence[Rule]) -> Optional[str]:
  """The checkpoint key a Flax variable path (`params/a/b/kernel`) is read from."""
  collection, _, rest = path.partition("/")
  module, _, leaf = rest.rpartition("/")
  reverse = module.endswith(REVERSE)
  for regex, template, kind in rules:
    if kind == DROP or kind not in LEAF_KINDS:
      continue
    for torch_leaf, target in LEAF_KINDS[kind].items():
      if target is None or target[0] != collection or target[1] != leaf:
        continue
      want_module = module[:-len(REVERSE)] if reverse and kind in ("gru", "lstm") else module
      m = _template_regex(template).match(want_module)
      if m:
        groups = [m.group(f"g{n}") if f"g{n}" in m.groupdict() else "?"
                  for n in range(1, 10)]
        suffix = REVERSE if reverse and kind in ("gru", "lstm") else ""
        return f"{_fill_groups(regex, groups)}.{torch_leaf}{suffix}"
  return None


def map_state_dict(state: Mapping[str, np.ndarray], rules: Sequence[Rule],
                   expected: Mapping[str, Tuple[int, ...]], what: str = "checkpoint",
                   extra: Optional[Mapping[str, np.ndarray]] = None) -> dict:
  """Maps `state` (torch key -> array) onto nested Flax variables with `rules`.

  Args:
    state: the (prefix-stripped) state dict as numpy arrays.
    rules: the family's table (first matching rule wins).
    expected: `models.variables.variable_shapes(model)` of the target model.
    what: names the source in messages ("SCAN checkpoint", ...).
    extra: already-mapped flat variables (`params/...` -> array), checked and added as
      they are (subtrees a family maps itself, such as BERT).

  Raises:
    ConversionError: listing every unexpected key, missing variable (with the torch
      key it would come from) and shape mismatch (torch key, Flax path, both shapes).
  """
  compiled = [(re.compile(p), t, kind) for p, t, kind in rules]
  flat: Dict[str, np.ndarray] = dict(extra or {})
  unexpected, bad_shapes = [], []
  for path, value in flat.items():
    if path not in expected:
      unexpected.append(f"{path} (mapped by the family; the model does not have it)")
    elif tuple(np.shape(value)) != tuple(expected[path]):
      bad_shapes.append(f"{path}: mapped {tuple(np.shape(value))}, model expects "
                        f"{tuple(expected[path])}")
  for key, value in state.items():
    module, _, leaf = key.rpartition(".")
    for pattern, template, kind in compiled:
      m = pattern.match(module)
      if m:
        break
    else:
      unexpected.append(key)
      continue
    if kind == DROP:
      continue
    target_module = m.expand(template)
    if kind in ("gru", "lstm") and leaf.endswith(REVERSE):
      leaf, target_module = leaf[:-len(REVERSE)], target_module + REVERSE
    target = LEAF_KINDS[kind].get(leaf, "unknown")
    if target is None:
      continue
    if target == "unknown":
      unexpected.append(key)
      continue
    collection, name, transform = target
    path = f"{collection}/{target_module}/{name}"
    if path not in expected:
      unexpected.append(f"{key} (would be {path}, which the model does not have)")
      continue
    value = transform(np.asarray(value, np.float32))
    if value.shape != tuple(expected[path]):
      bad_shapes.append(f"{key} -> {path}: checkpoint {tuple(value.shape)} (after mapping), "
                        f"model expects {tuple(expected[path])}")
    flat[path] = value
  missing = []
  for path in sorted(set(expected) - set(flat)):
    key = torch_key_for(path, rules)
    missing.append(f"{path} (checkpoint key {key})" if key else path)
  problems = []
  for title, items in (("unexpected keys", unexpected), ("missing keys", missing),
                       ("shape mismatches", bad_shapes)):
    if items:
      problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
  if problems:
    raise ConversionError(f"{what} does not match the model:\n" + "\n".join(problems))
  variables = unflatten(flat)
  variables.setdefault("batch_stats", {})
  return variables


def map_state_dict_reporting(state: Mapping[str, np.ndarray], rules: Sequence[Rule],
                             expected: Mapping[str, Tuple[int, ...]], what: str, model: str,
                             extra: Optional[Mapping[str, np.ndarray]] = None,
                             problems: Sequence[str] = ()) -> dict:
  """`map_state_dict`, its problems reported together with `problems` (what the family
  found mapping its own subtrees) in one ConversionError naming dsran_jax's `model`
  ("SCAN", ...)."""
  problems = list(problems)
  try:
    variables = map_state_dict(state, rules, expected, what, extra=extra)
  except ConversionError as e:
    problems.append(str(e))
  if problems:
    raise ConversionError(f"{what} does not match dsran_jax's {model}:\n" + "\n".join(problems))
  return variables


def require(state_dict: Mapping[str, Any], key: str, why: str):
  """`state_dict[key]`, else a ConversionError naming the key and what it was needed for."""
  if key not in state_dict:
    raise ConversionError(f"missing param {key} (needed to infer {why})")
  return state_dict[key]


def layer_count(keys, prefix: str) -> int:
  """How many numbered layers `prefix`N. the keys hold; they must be 0..n-1."""
  found = {int(m.group(1)) for k in keys for m in [re.match(prefix + r"(\d+)\.", k)] if m}
  if found != set(range(len(found))):
    raise ValueError(f"{prefix}N: layers {sorted(found)} are not numbered 0..n-1")
  return len(found)


def check_finite(variables: Mapping[str, Any], what: str) -> None:
  """Raises ConversionError naming every variable that holds NaN or Inf."""
  bad = [f"{path} ({int((~np.isfinite(v)).sum())} of {v.size} values)"
         for path, v in flatten(variables).items()
         if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
  if bad:
    raise ConversionError(f"{what} has non-finite weights:\n  " + "\n  ".join(bad))


# ------------------------------------------------------------------------ file reading


def load_checkpoint(path: str) -> Dict[str, Any]:
  """Reads a `.pth.tar` checkpoint safely and without torch (`convert.torch_pickle`): a
  dict whose tensors are numpy arrays and whose `opt` (an argparse Namespace in the
  authors' files) is a plain dict.

  Raises:
    FileNotFoundError: no such file.
    ValueError (`torch_pickle.CheckpointError`): the file is truncated or not a
      checkpoint, or its pickle needs a global besides tensors and argparse.Namespace
      (it is never built).
    ConversionError: the file holds something other than a checkpoint dict.
  """
  ckpt = torch_pickle.load(path)
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{path}: expected a dict (a training checkpoint), got "
                          f"{type(ckpt).__name__}")
  if isinstance(ckpt.get("opt"), argparse.Namespace):
    ckpt["opt"] = vars(ckpt["opt"])
  return ckpt


def state_dicts(ckpt: Mapping[str, Any], count: int, what: str) -> List[Dict[str, Any]]:
  """The `count` state dicts of `ckpt["model"]` (a list in the authors' layouts; one
  bare dict allowed when count is 1)."""
  model = ckpt.get("model")
  if isinstance(model, Mapping) and count == 1:
    model = [model]
  if not isinstance(model, (list, tuple)) or len(model) != count or not all(
      isinstance(m, Mapping) for m in model):
    got = (f"a list of {len(model)}" if isinstance(model, (list, tuple))
           else type(model).__name__)
    raise ConversionError(f"{what}: 'model' should be a list of {count} state dicts, got "
                          f"{got}")
  return [dict(m) for m in model]


def detected_state_dicts(ckpt: Any, count: int,
                         strip: bool = False) -> Optional[List[Dict[str, Any]]]:
  """For a family's `detect`: the `count` state dicts of `ckpt` (`strip`: each with
  DataParallel's `module.` stripped), None when `ckpt` is no checkpoint of `count`."""
  if not isinstance(ckpt, Mapping):
    return None
  try:
    found = state_dicts(ckpt, count, "checkpoint")
  except ConversionError:
    return None
  return [strip_prefix(sd) for sd in found] if strip else found


class Converted:
  """What a family's `params.convert(ckpt, options, config=base config)` returns.

  Attributes:
    variables: `{"params", "batch_stats"}` nested dicts of float32 numpy arrays.
    config: the full workdir config (the base config the caller passed in, with the
      model the weights imply and what the checkpoint's `opt` says).
    vocab: a `core.vocab.Vocabulary` to save as `vocab.json`, or None.
    summary: JSON-able facts printed by the CLI (widths, build, ...).
    files: other workdir files, `{name: write(path)}` (DSRAN's and MLASM's CNN
      weights, `safetensors_file`); the converter calls `write` with a name inside its
      temporary directory, and the file reaches the workdir whole, by a rename.
  """

  def __init__(self, variables: dict, config, vocab=None, summary: Optional[dict] = None,
               files: Optional[Dict[str, Callable[[str], None]]] = None):
    self.variables = variables
    self.config = config
    self.vocab = vocab
    self.summary = dict(summary or {})
    self.files = dict(files or {})


def safetensors_file(arrays: Mapping[str, np.ndarray],
                     metadata: Optional[Mapping[str, str]] = None) -> Callable[[str], None]:
  """A `Converted.files` writer: `arrays` (key -> array, dtypes kept) as a safetensors
  file, written atomically (`dsran_jax.atomic`)."""
  def write(path: str) -> None:
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    atomic.write_bytes(path, save(dict(arrays), metadata=dict(metadata or {})))
  return write


def opt_of(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
  """The checkpoint's `opt` (the authors' argparse options) as a dict ({} if absent)."""
  opt = ckpt.get("opt") or {}
  return vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt)


def apply_recipe_from_opt(config, opt: Mapping[str, Any]) -> None:
  """Copies the authors' training options every family shares into `config.train`."""
  recipe = {"batch_size": ("train", "batch_size", int),
            "learning_rate": ("train", "learning_rate", float),
            "num_epochs": ("train", "num_epochs", int), "lr_update": ("train", "lr_update", int),
            "margin": ("train", "margin", float), "grad_clip": ("train", "grad_clip", float)}
  for src, (section, key, cast) in recipe.items():
    if src in opt and opt[src] is not None:
      config[section][key] = cast(opt[src])
  if "max_violation" in opt:
    config.train.max_violation = bool(opt["max_violation"])
  if "batch_size" in opt:
    config.eval.batch_size = int(opt["batch_size"])
  name = str(opt.get("data_name", ""))
  if "coco" in name:
    config.data.name, config.eval.protocol, config.data.test_split = "coco", "coco", "testall"


def workdir_config(c, family: str, model_options: Mapping[str, Any], opt: Mapping[str, Any],
                   data_format: str, num_regions: int = 36):
  """Fills `c`, the base config (`default_config.get_base_config()`, from the caller), as
  the config of a converted GRU-family workdir: `model.name = family`, the model options
  the checkpoint implies (flat: `embed_size` sets `model.embed_size`, `scan.bi_gru` sets
  `model.scan.bi_gru` cast to its default's type), `data.img_dim` = `model.img_dim`,
  `data_format` with `num_regions` regions, Adam without warmup, SCAN's 1000-image dev
  (a family of VSE++'s loaders sets its own after), then the recipe `opt` records
  (`apply_recipe_from_opt`, for fine-tuning). Returns `c`."""
  c.model.name = family
  for key, value in model_options.items():
    section, dot, sub = key.partition(".")
    if dot:
      c.model[section][sub] = type(c.model[section][sub])(value)
    else:
      c.model[key] = value
  c.data.img_dim = c.model.img_dim
  c.data.format = data_format
  c.data.num_regions = num_regions
  c.train.optimizer, c.train.warmup = "adam", 0.0
  c.eval.max_dev_images = 1000  # their loaders keep the first 5000 dev captions
  apply_recipe_from_opt(c, opt)
  return c


def validate_workdir_config(config, what: str, validate: Callable[[Any], None]):
  """`config` if `validate` (the family's `config.validate`) accepts it, else a
  ConversionError saying the checkpoint's opt is not `what` ("a SCAN", ...)
  configuration dsran_jax runs."""
  try:
    validate(config)
  except ValueError as e:
    raise ConversionError(f"the checkpoint's opt is not {what} configuration dsran_jax "
                          f"runs: {e}") from None
  return config

"""The model zoo: a registry of matching-model families chosen by `config.model.name`.

A family is a package `dsran_jax/models/<name>/` with
- `config.py` (imports only ml_collections, so configs and `--help` stay fast):
    `defaults() -> ConfigDict | None`  options under `config.model.<name>`;
    `image_keys(model_config)`, `text_keys(model_config)`  the batch keys it reads;
    `tokenizer(model_config) -> "bert" | "vocab"`  how captions become ids;
    `bert_path(model_config) -> str`  (optional) the BERT directory or hub name of a
        "bert" tokenizer (its WordPiece vocabulary); "" (or no hook) without BERT;
    `caption_cap(model_config) -> int`  (optional) the authors' cut of a caption, in
        tokens, which `data.max_len=-1` follows; no hook: 0, every caption whole;
    `pads_to_cap(model_config) -> bool`  (optional) every caption batch is exactly the
        cut wide (a model that attends to padding, as DSRAN's reference BERT build);
    `image_views(model_config) -> (crop, resize) | None`  (optional) the raw-image views
        of a model that reads the `image` key (training: random resized crop + flip
        to crop; evaluation: shorter side to resize, centre crop);
    `input_hint(model_config, key) -> str`  (optional) how to run without batch key `key`
        (e.g. DSRAN without "grid"), for the readers' missing-file messages;
    `migrate(saved: dict) -> dict`  (optional) moves the keys of a config.json written
        before a change of the family's options into today's layout; a no-op on a
        migrated dict (`Workdir.load_config` applies every family's, `migrations()`);
    `recipe(config, dataset)`  the authors' recipe for "f30k" / "coco";
    `departures(config) -> list of str`  (optional) where a run of `config` departs from
        the authors' recipe in a way training must report (e.g. no GloVe file);
    `demo(config)`  the synthetic-world settings of `configs/demo.py:<name>`;
    `validate(config)`  raises ValueError naming the key and its allowed range;
    `frozen_paths(model_config) -> tuple of regexes`  parameters never trained;
    `eval_tile(model_config) -> (images, captions)`  default scoring tile;
- `__init__.py`: `build(model_config, vocab_size) -> flax Module` and
  `load_pretrained(variables, config, vocab=None) -> variables` (BERT, GloVe, ...;
  `vocab` the word vocabulary, from the caller); optional
  `train_augmentation(config, vocab_size) -> augment | None`, the family's training-time
  data augmentation, `augment(batch, rng) -> batch` on a host batch of numpy arrays
  (same keys and shapes; `rng` a `np.random.Generator`);
  `training_objective(config) -> objective | None` (optional), a training objective
  with parameters of its own (HREM's relation module), see below;
- `params.py`: its PyTorch checkpoint rules for `tools.convert_torch`.

A family objective (`training_objective`; none: the VSE++ hinge of `losses.training_loss`
on the (B, B) training scores, as every family had before) is an object with
    `init(rng, outputs) -> {"params": ...}`  its variables, from example model outputs;
    `loss(variables, outputs, batch, step, rng) -> scalar`  the loss of a train step;
    `lr_scale: float`  its parameters' lr factor (their own optimiser group);
    `active_from: int`  the step from which those parameters are updated (the optimiser
        leaves them, weight decay included, untouched before: torch skips parameters that
        got no gradient, e.g. a module used only after a warm-up);
where `outputs = model.apply(v, batch, train=True, method="training_outputs")`, a dict
the family's Module defines (its `__call__` stays the (B, B) scores). Training keeps the
objective's parameters in `TrainState.params[OBJECTIVE_KEY]` (`core.training`) beside the
model's (so the optimiser, the gradient clip and the `latest` checkpoint cover them, and a
resumed run restores them); `TrainState.variables`, the `best` checkpoint, evaluation, inference and
the converters see the model's variables only.

Every family's Module implements the `MatchingModel` contract (`common/base.py`):
`encode_images(batch)`, `encode_texts(batch)`, `score(image_reps, text_reps)` and
`__call__(batch) -> (B, B)` training scores. Train, evaluation, inference and search use
only this registry and that contract; none of them names a family.
"""
import importlib
import importlib.util
import pkgutil
from typing import Callable, Optional, Tuple

from dsran_jax.core import precision

DEFAULT = "dsran"
_NOT_FAMILIES = ("common",)


def names() -> Tuple[str, ...]:
  """Registered family names (every subpackage with a config.py), DSRAN first."""
  found = []
  for info in pkgutil.iter_modules(__path__):
    if info.ispkg and info.name not in _NOT_FAMILIES:
      if importlib.util.find_spec(f"{__name__}.{info.name}.config") is not None:
        found.append(info.name)
  return tuple(sorted(found, key=lambda n: (n != DEFAULT, n)))


def _check_name(name: str) -> str:
  known = names()
  if name not in known:
    raise ValueError(f"config.model.name={name!r}: expected one of {', '.join(known)}")
  return name


def family_config(name: str):
  """The jax-free config module of family `name`."""
  return importlib.import_module(f"{__name__}.{_check_name(name)}.config")


def family(name: str):
  """The family package (Flax module builder, pretrained-weight hook)."""
  return importlib.import_module(f"{__name__}.{_check_name(name)}")


def family_params(name: str):
  """The family's PyTorch converter rules (`params.py`)."""
  return importlib.import_module(f"{__name__}.{_check_name(name)}.params")


def spec(config):
  """The config module of the family `config` (full or `config.model`) selects."""
  model_config = config.model if "model" in config else config
  return family_config(model_config.name)


def image_keys(config) -> Tuple[str, ...]:
  """Image-side batch keys the configured model reads."""
  return tuple(spec(config).image_keys(config.model if "model" in config else config))


def text_keys(config) -> Tuple[str, ...]:
  """Text-side batch keys the configured model reads."""
  return tuple(spec(config).text_keys(config.model if "model" in config else config))


def tokenizer_kind(config) -> str:
  """"bert" (WordPiece from `bert_path(config)`) or "vocab" (a word vocabulary)."""
  return spec(config).tokenizer(config.model)


def bert_path(config) -> str:
  """The BERT directory (or hub name) the configured family's "bert" tokenizer reads;
  "" for a family without BERT."""
  hook = getattr(spec(config), "bert_path", None)
  return hook(config.model) if hook else ""


def caption_cap(config) -> int:
  """The cut applied to every caption, in tokens ([CLS]/[SEP] or <start>/<end>
  included; 0: none, captions whole): `data.max_len` when >= 0, else (-1) the family's
  `caption_cap` hook, the authors' cut (no hook: 0)."""
  if int(config.data.max_len) >= 0:
    return int(config.data.max_len)
  hook = getattr(spec(config), "caption_cap", None)
  return int(hook(config.model)) if hook else 0


def pads_to_cap(config) -> bool:
  """Whether every caption batch must be exactly `caption_cap(config)` wide (the model
  attends to padding, as DSRAN's reference BERT build); else batches are as wide as
  their longest caption, rounded up to `data.caption_bucket`."""
  hook = getattr(spec(config), "pads_to_cap", None)
  return bool(hook(config.model)) if hook else False


def image_views(config) -> Optional[Tuple[int, int]]:
  """`(crop, resize)` of the raw-image views the configured model reads (see the module
  docstring); None when it reads no raw images."""
  hook = getattr(spec(config), "image_views", None)
  return hook(config.model) if hook else None


def input_hint(config, key: str) -> str:
  """How the configured model could do without batch key `key` (a config override to
  suggest), or ""."""
  hook = getattr(spec(config), "input_hint", None)
  return hook(config.model, key) if hook else ""


def departures(config) -> Tuple[str, ...]:
  """Where a run of `config` departs from its family's authors' recipe (the family's
  `departures` hook; none without one): training logs each at its start and records
  them in config.json (`train.departures`)."""
  hook = getattr(family_config(config.model.name), "departures", None)
  return tuple(hook(config)) if hook else ()


def migrations() -> Tuple[Callable[[dict], dict], ...]:
  """Every family's `migrate(saved) -> saved` of a saved config dict (config.json), in
  `names()` order; each is a no-op on a config already migrated."""
  return tuple(m for m in (getattr(family_config(n), "migrate", None) for n in names())
               if m is not None)


def compute_dtype(model_config, backend: str) -> Tuple[str, str]:
  """The dtype a model of `config.model` computes in on `backend`
  (`jax.default_backend()`) and a note when that is not `model.dtype`: bf16 asked for on
  a CPU without native bf16 (`core.precision`; the families build through
  `common.layers.compute_dtype`)."""
  return precision.compute_dtype(model_config.dtype, model_config.bf16_on_cpu, backend)


def build_model(model_config, vocab_size: Optional[int] = None):
  """The Flax module of `config.model` (`vocab_size`: the word vocabulary's, if any)."""
  return family(model_config.name).build(model_config, vocab_size)


def load_pretrained(variables: dict, config, vocab=None) -> dict:
  """The family's pretrained-weight hook (BERT, GloVe, ...) applied to fresh variables.

  `vocab`: the word vocabulary (`core.vocab.Vocabulary`) of a word-id model, whose rows
  GloVe fills when `model.glove_path` is set; None for BERT tokenizers."""
  return family(config.model.name).load_pretrained(variables, config, vocab)


def train_augmentation(config, vocab_size: Optional[int] = None):
  """The family's training-batch augmentation `augment(batch, rng) -> batch` (numpy,
  same keys and shapes), or None when it has none (`vocab_size`: the word
  vocabulary's, if any)."""
  hook = getattr(family(config.model.name), "train_augmentation", None)
  return hook(config, vocab_size) if hook else None


def training_objective(config):
  """The family's training objective with parameters of its own (see the module
  docstring), or None when it trains with the VSE++ hinge on its training scores."""
  hook = getattr(family(config.model.name), "training_objective", None)
  return hook(config) if hook else None


def frozen_paths(model_config) -> Tuple[str, ...]:
  """Regexes of parameter paths ("a/b/kernel") the family never trains."""
  return tuple(family_config(model_config.name).frozen_paths(model_config))


def eval_tile(config) -> Tuple[int, int]:
  """The (images, captions) scoring tile: `eval.tile_*` when set, else the family's."""
  ti, tj = family_config(config.model.name).eval_tile(config.model)
  return (config.eval.tile_images or ti, config.eval.tile_captions or tj)

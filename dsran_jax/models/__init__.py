"""The model zoo: a registry of matching-model families chosen by `config.model.name`.

A family is a package `dsran_jax/models/<name>/` with
- `config.py` (imports only ml_collections, so configs and `--help` stay fast):
    `defaults() -> ConfigDict | None`  options under `config.model.<name>`;
    `image_keys(model_config)`, `text_keys(model_config)`  the batch keys it reads;
    `tokenizer(model_config) -> "bert" | "vocab"`  how captions become ids;
    `recipe(config, dataset)`  the authors' recipe for "f30k" / "coco";
    `demo(config)`  the synthetic-world settings of `configs/demo.py:<name>`;
    `validate(config)`  raises ValueError naming the key and its allowed range;
    `frozen_paths(model_config) -> tuple of regexes`  parameters never trained;
    `eval_tile(model_config) -> (images, captions)`  default scoring tile;
- `__init__.py`: `build(model_config, vocab_size) -> flax Module` and
  `load_pretrained(variables, config, workdir) -> variables` (BERT, GloVe, ...);
- `params.py`: its PyTorch checkpoint rules for `tools.convert_torch`.

Every family's Module implements the `MatchingModel` contract (`common/base.py`):
`encode_images(batch)`, `encode_texts(batch)`, `score(image_reps, text_reps)` and
`__call__(batch) -> (B, B)` training scores. Train, evaluation, inference and search use
only this registry and that contract; none of them names a family.
"""
import importlib
import importlib.util
import pkgutil
from typing import Optional, Tuple

from dsran_jax.core.batch import example_arrays

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
  """"bert" (WordPiece from model.bert_path) or "vocab" (a word vocabulary)."""
  return spec(config).tokenizer(config.model)


def build_model(model_config, vocab_size: Optional[int] = None):
  """The Flax module of `config.model` (`vocab_size`: the word vocabulary's, if any)."""
  return family(model_config.name).build(model_config, vocab_size)


def example_batch(model, batch_size: int = 2, num_regions: int = 4, max_len: int = 8):
  """A batch of every key `model` reads, with valid shapes (for init and shape checks)."""
  return example_arrays(tuple(model.image_keys) + tuple(model.text_keys), model.input_dims,
                        batch_size, num_regions, max_len)


def init_variables(model, rng) -> dict:
  """Randomly initialised {'params', 'batch_stats'} of any family's module."""
  import jax  # pylint: disable=g-import-not-at-top
  params_rng, dropout_rng = jax.random.split(rng)
  batch = example_batch(model)
  variables = jax.jit(lambda r1, r2: model.init({"params": r1, "dropout": r2}, batch,
                                                train=False))(params_rng, dropout_rng)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
          **{k: v for k, v in variables.items() if k not in ("params", "batch_stats")}}


def variable_shapes(model) -> dict:
  """{"params/a/b": shape, ...} of `model`, computed without running it."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  batch = example_batch(model)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch, train=False))
  flat = traverse_util.flatten_dict(dict(shapes), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def load_pretrained(variables: dict, config, workdir: Optional[str] = None) -> dict:
  """The family's pretrained-weight hook (BERT, GloVe, ...) applied to fresh variables."""
  return family(config.model.name).load_pretrained(variables, config, workdir)


def frozen_paths(model_config) -> Tuple[str, ...]:
  """Regexes of parameter paths ("a/b/kernel") the family never trains."""
  return tuple(family_config(model_config.name).frozen_paths(model_config))


def eval_tile(config) -> Tuple[int, int]:
  """The (images, captions) scoring tile: `eval.tile_*` when set, else the family's."""
  ti, tj = family_config(config.model.name).eval_tile(config.model)
  return (config.eval.tile_images or ti, config.eval.tile_captions or tj)

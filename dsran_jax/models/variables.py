"""Variables of any family's module: an example batch, random init and shapes.

Kept out of `models/__init__.py`, which must import without jax (configs read the
registry, and a CLI's `--help` stays fast); this module needs jax and flax.
"""
import jax
from flax import traverse_util

from dsran_jax.core.batch import example_arrays


def example_batch(model, batch_size: int = 2, num_regions: int = 4, max_len: int = 8):
  """A batch of every key `model` reads, with valid shapes (for init and shape checks)."""
  return example_arrays(tuple(model.image_keys) + tuple(model.text_keys), model.input_dims,
                        batch_size, num_regions, max_len)


def init_variables(model, rng) -> dict:
  """Randomly initialised {'params', 'batch_stats'} of any family's module."""
  params_rng, dropout_rng = jax.random.split(rng)
  batch = example_batch(model)
  variables = jax.jit(lambda r1, r2: model.init({"params": r1, "dropout": r2}, batch,
                                                train=False))(params_rng, dropout_rng)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
          **{k: v for k, v in variables.items() if k not in ("params", "batch_stats")}}


def variable_shapes(model) -> dict:
  """{"params/a/b": shape, ...} of `model`, computed without running it."""
  batch = example_batch(model)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch, train=False))
  flat = traverse_util.flatten_dict(dict(shapes), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}

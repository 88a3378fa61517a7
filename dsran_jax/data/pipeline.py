"""tf.data input pipelines over a `Split`: endless training batches and padded eval batches.

Training: one example is one caption and its image. The order is a pure function of
(`train.seed`, epoch): each epoch permutes the caption indices (numpy, keyed by
(seed, epoch)), cuts them into global batches of `train.batch_size` (the incomplete
last one is dropped), and process p of P takes rows [p*B/P, (p+1)*B/P) of every global
batch, so the hosts together see exactly the global batch one host would. Global step s
reads batch s % steps_per_epoch of epoch s // steps_per_epoch, so resuming at
`start_step` costs nothing and replays the same data. Only caption indices are shuffled;
features are read per batch by a parallel, order-preserving map calling
`split.train_images` / `split.captions`, so host RAM is bounded by the in-flight batches
and `data.prefetch`. A batch's captions are as wide as the global batch's longest
caption, rounded up to a multiple of `data.caption_bucket` (`caption_width_fn`): never
cut, and a bounded number of jit shapes (`train_widths`).

Evaluation: every image (or caption) exactly once, in order, in batches of `batch_size`;
the last batch is padded by repeating the last example and flagged by `valid`. Caption
batches are as wide as the split's longest caption (one width, so the caption reps of
every batch concatenate and one compiled encoder serves the split).
"""
import atexit
import functools
import gc
import threading
import weakref
from typing import Callable, Optional

import jax
import numpy as np

from dsran_jax import models
from dsran_jax.core import batch, text_policy
from dsran_jax.data.base import Split

TRAIN_INDEX_KEYS = ("image_index", "caption_index")


@functools.lru_cache(maxsize=None)
def _tf():
  """TensorFlow, imported when the first pipeline is built, with its GPUs hidden.

  Why not at the top: TensorFlow is an edge dependency of this one module (tf.data feeds
  numpy to JAX), and its import is most of a CLI's start: a run that stops at a flag or
  config error, or `inference.load` with its own arrays, never builds a pipeline and never
  pays it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    # TensorFlow only feeds numpy to JAX: it must never take the accelerator's memory.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF devices already initialised by someone else: nothing to do
    pass
  return tf


_LIVE_ITERATORS = weakref.WeakSet()


class Batches:
  """Iterator of numpy batch dicts over a tf.data pipeline.

  `close()` (or leaving a `with` block) stops its background reads. Iterators still open
  at interpreter exit are closed by an atexit hook: a tf.data iterator whose map calls
  Python (tf.numpy_function) otherwise deadlocks the exit.
  """

  def __init__(self, ds):  # a tf.data.Dataset
    self._it = ds.as_numpy_iterator()
    _LIVE_ITERATORS.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      raise StopIteration
    return next(self._it)

  def close(self) -> None:
    """Releases the pipeline (its threads and prefetched batches)."""
    self._it = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@atexit.register
def _close_live_iterators():
  for batches in list(_LIVE_ITERATORS):
    batches.close()
  gc.collect()  # drop the tf.data iterators now, while Python can still run their calls


def steps_per_epoch(split: Split, config) -> int:
  """Global steps per epoch: full global batches of `train.batch_size` captions."""
  batch_size = int(config.train.batch_size)
  steps = split.num_captions // batch_size
  if steps < 1:
    raise ValueError(
        f"split {split.name!r} has {split.num_captions} captions, fewer than one global "
        f"batch (train.batch_size={batch_size})")
  return steps


def epoch_order(num_captions: int, seed: int, epoch: int, shuffle_buffer: int = 0
                ) -> np.ndarray:
  """The caption order of one epoch, a pure function of (seed, epoch).

  Args:
    num_captions: size of the split.
    seed: `train.seed`.
    epoch: epoch number (0-based).
    shuffle_buffer: 0 (or >= num_captions): a full permutation. b > 0: consecutive
      windows of b captions are each shuffled and the windows visited in random order,
      the locality of a b-element shuffle buffer (for storage that prefers nearby reads)
      but exactly reproducible. Captions of one image are consecutive, so a small b
      puts an image's captions in the same batch (false negatives for the hinge loss).

  Returns:
    int64 (num_captions,) permutation of the caption indices.
  """
  rng = np.random.default_rng([int(seed), int(epoch), 0x7261696E])  # "rain"
  if shuffle_buffer <= 0 or shuffle_buffer >= num_captions:
    return rng.permutation(num_captions).astype(np.int64)
  window = np.arange(num_captions) // shuffle_buffer
  window_rank = rng.permutation(window[-1] + 1)
  # Integer part: the window's rank; fractional part: the place inside the window.
  key = window_rank[window] + rng.random(num_captions)
  return np.argsort(key, kind="stable").astype(np.int64)


class _TrainOrder:
  """Caption indices of (global step, process), and the caption width of each global
  step: cached per epoch, safe across threads.

  `token_counts` (the split's tokens per caption) and `width_of` (longest caption of a
  global batch -> its width) give `width(step)`: every process pads its slice to the
  width of the whole global batch, so the hosts' arrays assemble into one.
  """

  def __init__(self, num_captions, global_batch, local_batch, process_index, seed,
               shuffle_buffer, token_counts=None, width_of=None):
    self.num_captions = num_captions
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.seed = seed
    self.shuffle_buffer = shuffle_buffer
    self.token_counts = token_counts
    self.width_of = width_of
    self.steps_per_epoch = num_captions // global_batch
    self._lock = threading.Lock()
    self._cache = {}

  def _epoch(self, epoch: int):
    with self._lock:
      cached = self._cache.get(epoch)
      if cached is None:
        order = epoch_order(self.num_captions, self.seed, epoch, self.shuffle_buffer)
        order = order[:self.steps_per_epoch * self.global_batch].reshape(
            self.steps_per_epoch, self.global_batch)
        widths = None
        if self.token_counts is not None:
          longest = self.token_counts[order].max(axis=1)
          widths = np.array([self.width_of(int(n)) for n in longest], np.int64)
        lo = self.process_index * self.local_batch
        cached = (np.ascontiguousarray(order[:, lo:lo + self.local_batch]), widths)
        # The map runs a few steps ahead at most: two epochs cover the boundary.
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = cached
      return cached

  def __call__(self, step) -> np.ndarray:
    epoch, within = divmod(int(step), self.steps_per_epoch)
    return self._epoch(epoch)[0][within]

  def width(self, step) -> int:
    """Caption columns of global step `step` (needs `token_counts`)."""
    epoch, within = divmod(int(step), self.steps_per_epoch)
    return int(self._epoch(epoch)[1][within])


def caption_width_fn(split: Split, config):
  """`longest caption of a batch -> its width`: the smallest multiple of
  `data.caption_bucket` holding it, at most the split's width (`core.text_policy.
  bucket_width`); always the split's width (the cut) for a model that attends to
  padding (`models.pads_to_cap`: DSRAN's reference BERT build)."""
  limit = int(split.input_ids.shape[1])
  if models.pads_to_cap(config):
    return lambda longest: limit
  bucket = int(config.data.caption_bucket)
  return lambda longest: text_policy.bucket_width(longest, bucket, limit)


def train_widths(split: Split, config) -> tuple:
  """Every caption width a training run over `split` can compile (sorted): the jit-shape
  cost of length buckets (ceil(split width / data.caption_bucket) at most)."""
  width_of = caption_width_fn(split, config)
  return tuple(sorted({width_of(n) for n in range(1, int(split.input_ids.shape[1]) + 1)}))


def _probe(split: Split, keys, config=None):
  """Shapes (without batch) and dtypes of the image-side arrays `keys`, from image 0
  (`config`: the model's, whose family may say how to do without a missing key)."""
  arrays = split.images(np.zeros(1, np.int64))
  missing = [k for k in keys if k not in arrays]
  if missing:
    hint = "; the model reads grid features (data.grid_file)" if "grid" in missing else ""
    if config is not None:  # the family's way to do without (DSRAN: regions only)
      hint += "".join(f"; {h}" for h in (models.input_hint(config, k) for k in missing) if h)
    raise KeyError(
        f"split {split.name!r}: images() has no {missing} (it returns {sorted(arrays)})"
        + hint)
  return {k: (tuple(arrays[k].shape[1:]), arrays[k].dtype) for k in keys}


def _image_keys(keys) -> tuple:
  keys = tuple(keys)
  unknown = [k for k in keys if k not in batch.IMAGE_KEYS]
  if isinstance(keys, str) or unknown:
    raise ValueError(f"image keys {keys!r}: each must be one of {batch.IMAGE_KEYS}")
  return keys


def _checked(arrays: dict, key: str, batch: int, spec, split_name: str) -> np.ndarray:
  shape, dtype = spec
  value = np.asarray(arrays[key])
  if value.shape != (batch,) + shape:
    raise ValueError(
        f"split {split_name!r}: {key} has shape {value.shape}, expected "
        f"{(batch,) + shape} (the shape of image 0's {key})")
  return value.astype(dtype, copy=False)


def _numpy_map(ds, fn, specs: dict, num_parallel_calls):
  """`ds.map` of a numpy function returning a dict with fixed shapes and dtypes."""
  keys = list(specs)

  def wrapped(x):
    out = fn(x)
    return tuple(out[k] for k in keys)

  tf = _tf()

  def tf_fn(x):
    values = tf.numpy_function(
        wrapped, [x], [tf.as_dtype(specs[k][1]) for k in keys], stateful=False)
    return {k: tf.ensure_shape(v, specs[k][0]) for k, v in zip(keys, values)}

  return ds.map(tf_fn, num_parallel_calls=num_parallel_calls, deterministic=True)


def _options(ds):
  options = _tf().data.Options()
  options.deterministic = True
  return ds.with_options(options)


def train_batches(split: Split, config, start_step: int = 0,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  num_parallel_calls: Optional[int] = None,
                  augment: Optional[Callable[[dict, np.random.Generator], dict]] = None
                  ) -> "Batches":
  """Endless iterator of this host's training batches, starting at global `start_step`.

  Args:
    split: the training split.
    config: uses `train.batch_size` (global), `train.seed`, `data.shuffle_buffer`,
      `data.prefetch`, and the model's image keys (`models.image_keys`).
    start_step: the first global step to produce (resuming replays the same stream).
    process_index, process_count: this host and the number of hosts; default
      `jax.process_index()` / `jax.process_count()`.
    num_parallel_calls: feature reads in flight (default: tf.data autotuning).
    augment: the family's augmentation (`models.train_augmentation`), applied to each
      batch with a generator seeded by (train.seed, step, host), so a resumed run
      replays the same augmented batches.

  Yields:
    numpy dicts of `train.batch_size // process_count` (image, caption) pairs: the
    image keys the model reads (grid, regions, region_pos, region_mask, ...),
    input_ids, attention_mask (as wide as the global batch's longest caption, rounded
    up to `data.caption_bucket`: `train_widths` lists the widths), image_index,
    caption_index.
  """
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  global_batch = int(config.train.batch_size)
  if global_batch % process_count:
    raise ValueError(
        f"train.batch_size={global_batch} is not divisible by the {process_count} hosts")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  steps_per_epoch(split, config)  # raises if the split is smaller than one batch
  local_batch = global_batch // process_count
  order = _TrainOrder(split.num_captions, global_batch, local_batch, process_index,
                      int(config.train.seed), int(config.data.shuffle_buffer),
                      split.token_counts, caption_width_fn(split, config))
  image_specs = _probe(split, _image_keys(models.image_keys(config)), config)
  specs = dict(image_specs)
  # Caption width varies with the batch (its longest caption's bucket).
  specs["input_ids"] = ((None,), np.dtype(np.int32))
  specs["attention_mask"] = ((None,), np.dtype(np.int32))
  specs = {k: ((local_batch,) + shape, dtype) for k, (shape, dtype) in specs.items()}
  for k in TRAIN_INDEX_KEYS:
    specs[k] = ((local_batch,), np.dtype(np.int32))

  seed = int(config.train.seed)
  rows = process_index * local_batch + np.arange(local_batch)

  def read(step):
    captions = order(step)
    images = split.caption_image(captions)
    # Random image views (raw images, `data.images`) are keyed by (seed, step, row of
    # the global batch): a pure function of the step, as the order is.
    keys = np.stack([np.full(local_batch, seed), np.full(local_batch, int(step)), rows], 1)
    arrays = split.train_images(images, keys)
    out = {k: _checked(arrays, k, local_batch, image_specs[k], split.name)
           for k in image_specs}
    out.update({k: v.astype(np.int32, copy=False)
                for k, v in split.captions(captions, order.width(step)).items()})
    out["image_index"] = images.astype(np.int32)
    out["caption_index"] = captions.astype(np.int32)
    if augment is not None:
      out = augment(out, np.random.default_rng(
          (int(config.train.seed), int(step), int(process_index))))
    return out

  tf = _tf()
  ds = tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64)
  ds = _numpy_map(ds, read, specs, num_parallel_calls or tf.data.AUTOTUNE)
  ds = _options(ds.prefetch(int(config.data.prefetch)))
  return Batches(ds)


def _eval_batches(num_examples: int, batch_size: int, read, specs: dict,
                  index_key: str, prefetch: int) -> "Batches":
  if batch_size < 1:
    raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
  specs = {k: ((batch_size,) + shape, dtype) for k, (shape, dtype) in specs.items()}
  specs[index_key] = ((batch_size,), np.dtype(np.int32))
  specs["valid"] = ((batch_size,), np.dtype(bool))

  def block(b):
    start = int(b) * batch_size
    n = min(batch_size, num_examples - start)
    # Padding repeats the last real example: real inputs, never NaN-prone zeros.
    indices = np.minimum(np.arange(start, start + batch_size), start + n - 1)
    out = read(indices)
    out[index_key] = indices.astype(np.int32)
    out["valid"] = np.arange(batch_size) < n
    return out

  num_batches = -(-num_examples // batch_size)
  tf = _tf()
  ds = tf.data.Dataset.range(num_batches)
  ds = _numpy_map(ds, block, specs, tf.data.AUTOTUNE)
  ds = _options(ds.prefetch(prefetch))
  return Batches(ds)


def eval_image_batches(split: Split, batch_size: int,
                       image_keys=("grid", "regions", "region_pos", "region_mask"),
                       prefetch: int = 2) -> "Batches":
  """Every image of `split` once, in order, in padded batches.

  Args:
    image_keys: the image-side arrays to read (`models.image_keys(config)`).

  Yields:
    numpy dicts with those arrays, `image_index` int32 (B,) and `valid` bool (B,)
    (False on the last batch's padding).
  """
  specs = _probe(split, _image_keys(image_keys))

  def read(indices):
    arrays = split.images(indices)
    return {k: _checked(arrays, k, len(indices), specs[k], split.name) for k in specs}

  return _eval_batches(split.num_images, int(batch_size), read, specs, "image_index",
                       prefetch)


def eval_caption_batches(split: Split, batch_size: int, prefetch: int = 2
                         ) -> "Batches":
  """Every caption of `split` once, in order, in padded batches.

  Yields:
    numpy dicts with input_ids, attention_mask int32 (B, L), `caption_index` int32 (B,)
    and `valid` bool (B,).
  """
  specs = {k: (tuple(getattr(split, k).shape[1:]), np.dtype(np.int32))
           for k in batch.TEXT_KEYS}

  def read(indices):
    return {k: v.astype(np.int32, copy=False) for k, v in split.captions(indices).items()}

  return _eval_batches(split.num_captions, int(batch_size), read, specs, "caption_index",
                       prefetch)

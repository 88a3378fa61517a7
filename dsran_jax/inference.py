"""Embeds images and captions with a dsran_jax workdir (trained, or converted from the
authors' checkpoints by `tools.convert_torch`).

    enc = inference.load("runs/f30k")
    img = enc.encode_images(grid=g, regions=r, region_pos=p)   # (B, E) float32, L2-normed
    txt = enc.encode_texts(["a dog runs on the grass"])        # (B, E)
    sims = img @ txt.T                                         # cosine similarities

Inputs and outputs are numpy. Work is done by one jitted eval-mode `apply` per side, in
chunks of `batch_size` rows (the last chunk zero-padded, so large galleries compile once
and never hold more than a chunk of activations); a call with fewer rows is padded to the
next power of two instead, so small queries stay cheap and compiles stay few.

Text padding in `model.text_padding="reference"` mode (the authors' behaviour, which
converted checkpoints use):
- BERT build: ids are zero-padded to `data.max_len` (32) and every position is attended
  to and averaged, as in their code; longer `input_ids` are an error.
- GRU build: the authors pad each eval batch to its longest caption and the text graph
  spans that length, so a caption's embedding depends on its batch. `encode_texts` cuts
  the captions, in the order given, into consecutive groups of `config.eval.batch_size`
  (the converter sets it to their `opt.batch_size`), exactly as their unshuffled eval
  loader batches a split: encoding a whole split in order gives their embeddings. Texts
  are not truncated (their loader does not truncate either).
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsran_jax import checkpointing
from dsran_jax import models
from dsran_jax.default_config import load_workdir_config
from dsran_jax.models.dsran import GRID_NODES, DSRAN

DEFAULT_BATCH_SIZE = 256


def _bucket(n: int, batch_size: int) -> int:
  """Rows a chunk of n is padded to: batch_size, or the next power of two below it."""
  return min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _pad_rows(x: np.ndarray, rows: int, value=0) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.full((rows - x.shape[0],) + x.shape[1:], value, x.dtype)
  return np.concatenate([x, pad], axis=0)


def _float_array(name: str, x, ndim: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
          or x.dtype == bool):
    raise ValueError(f"{name} must hold numbers, got dtype {x.dtype}")
  return x.astype(np.float32, copy=False)


def _check_shape(name: str, x: np.ndarray, expected: Tuple[Optional[int], ...], why: str):
  ok = len(x.shape) == len(expected) and all(
      e is None or e == s for s, e in zip(x.shape, expected))
  if not ok:
    shown = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
    raise ValueError(f"{name} has shape {x.shape}, expected {shown} ({why})")


class Encoder:
  """Eval-mode DSRAN embedder. See the module docstring.

  Attributes:
    model: the Flax `DSRAN` module.
    variables: `{"params", "batch_stats"}` (on the default device).
    config: the workdir's full config (`ml_collections.ConfigDict`).
    workdir: where it was loaded from (for the GRU vocabulary), or None.
    batch_size: rows per jitted call.
  """

  def __init__(self, model: DSRAN, variables: Dict[str, Any], config, workdir: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE, meta: Optional[dict] = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.variables = jax.device_put(variables)
    self.config = config
    self.workdir = workdir
    self.batch_size = int(batch_size)
    self.meta = meta or {}
    self._tokenizer = None

    def embed_images(variables, batch):
      return model.apply(variables, **batch, train=False, method=DSRAN.embed_images)

    def embed_texts(variables, batch):
      return model.apply(variables, **batch, train=False, method=DSRAN.embed_texts)

    # Variables are an argument, not a closure: closed-over arrays become constants that
    # are copied into every compiled program.
    self._embed_images = jax.jit(embed_images)
    self._embed_texts = jax.jit(embed_texts)

  # --------------------------------------------------------------- model facts

  @property
  def embed_size(self) -> int:
    return self.model.config.embed_size

  @property
  def _reference(self) -> bool:
    return self.model.config.text_padding == "reference"

  @property
  def _uses_grid(self) -> bool:
    return self.model.config.image_inputs == "grid+regions"

  @property
  def _uses_region_pos(self) -> bool:
    c = self.model.config
    return c.bert_build and c.use_region_pos

  @property
  def _text_vocab_size(self) -> int:
    c = self.model.config
    return c.bert.vocab_size if c.bert_build else c.vocab_size

  # ----------------------------------------------------- batch-dict callables

  def image_fn(self, batch: Dict[str, Any]) -> jax.Array:
    """(B, E) embeddings of an eval image batch dict (`grid`, `regions`, `region_pos`,
    `region_mask`; other keys ignored), as is: one jitted call, no chunking. For
    `evaluation.EmbeddingScorer`."""
    keys = ("grid", "regions", "region_pos", "region_mask")
    return self._embed_images(self.variables, {k: batch[k] for k in keys if k in batch})

  def text_fn(self, batch: Dict[str, Any]) -> jax.Array:
    """(B, E) embeddings of an eval caption batch dict (`input_ids`, `attention_mask`).

    The batch is used as is, so in GRU reference mode its rows share one padding width
    (the authors' behaviour when batches hold `eval.batch_size` captions)."""
    keys = ("input_ids", "attention_mask")
    return self._embed_texts(self.variables, {k: batch[k] for k in keys if k in batch})

  def scorer(self):
    """An `evaluation.EmbeddingScorer` over `image_fn` / `text_fn`."""
    from dsran_jax import evaluation  # pylint: disable=g-import-not-at-top
    return evaluation.EmbeddingScorer(self.image_fn, self.text_fn)

  # ------------------------------------------------------------------ images

  def encode_images(self, grid=None, regions=None, region_pos=None,
                    region_mask=None) -> np.ndarray:
    """L2-normalised image embeddings.

    Args:
      grid: (B, 49, img_dim) ResNet grid features (models with image_inputs
        "grid+regions").
      regions: (B, R, img_dim) region features.
      region_pos: (B, R, pos_dim) box/class encoding (BERT build); None means zeros, as
        for data without boxes.
      region_mask: (B, R) True for real regions; None means all real. Ignored in
        reference padding mode (the authors attend to every region).

    Returns:
      float32 (B, E).
    """
    c = self.model.config
    if regions is None:
      raise ValueError(f"encode_images needs regions (B, R, {c.img_dim})")
    regions = _float_array("regions", regions, 3)
    b, r, _ = regions.shape
    _check_shape("regions", regions, (None, None, c.img_dim), f"img_dim={c.img_dim}")
    arrays = {"regions": regions}
    if self._uses_grid:
      if grid is None:
        raise ValueError(f"this model (image_inputs='grid+regions') needs grid "
                         f"(B, {GRID_NODES}, {c.img_dim})")
      grid = _float_array("grid", grid, 3)
      _check_shape("grid", grid, (b, GRID_NODES, c.img_dim),
                   f"B={b} from regions, {GRID_NODES} grid cells, img_dim={c.img_dim}")
      arrays["grid"] = grid
    elif grid is not None:
      raise ValueError("this model uses regions only (image_inputs='regions'); got a grid")
    if region_pos is not None:
      region_pos = _float_array("region_pos", region_pos, 3)
      _check_shape("region_pos", region_pos, (b, r, c.pos_dim),
                   f"B, R from regions {regions.shape}, pos_dim={c.pos_dim}")
    else:
      region_pos = np.zeros((b, r, c.pos_dim), np.float32)
    arrays["region_pos"] = region_pos
    if region_mask is not None:
      region_mask = np.asarray(region_mask)
      _check_shape("region_mask", region_mask, (b, r), f"B, R from regions {regions.shape}")
      region_mask = region_mask.astype(bool)
    else:
      region_mask = np.ones((b, r), bool)
    arrays["region_mask"] = region_mask
    # Padded rows get a real-looking mask so no row is all-masked.
    fill = {"region_mask": True}
    return self._run(self._embed_images, arrays, b, self.batch_size, fill)

  # ------------------------------------------------------------------- texts

  @property
  def tokenizer(self):
    """The caption tokenizer (`data.tokenize.make_tokenizer`), built on first use."""
    if self._tokenizer is None:
      from dsran_jax.data import tokenize  # pylint: disable=g-import-not-at-top
      self._tokenizer = tokenize.make_tokenizer(self.config, self.workdir)
    return self._tokenizer

  def tokenize(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` int32 for `texts`, as `encode_texts` would use them.

    GRU build in reference mode: not truncated (width = longest caption); otherwise the
    tokenizer's `data.max_len`.
    """
    if isinstance(texts, str):
      raise TypeError("texts must be a list of strings, got a single str")
    texts = list(texts)
    tok = self.tokenizer
    if not self.model.config.bert_build and self._reference and hasattr(tok, "vocab"):
      rows = [tok.vocab.encode_one(t) for t in texts]
      width = max([len(row) for row in rows] + [1])
      ids = np.zeros((len(rows), width), np.int32)
      for i, row in enumerate(rows):
        ids[i, :len(row)] = row
      return ids, (ids != 0).astype(np.int32)
    ids, mask = tok.encode(texts)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def encode_texts(self, texts: Optional[Sequence[str]] = None, input_ids=None,
                   attention_mask=None) -> np.ndarray:
    """L2-normalised caption embeddings, from raw `texts` or token ids.

    Args:
      texts: captions (tokenised with the model's tokenizer: BERT WordPiece from
        `model.bert_path`, or the GRU vocabulary `{workdir}/vocab.json`).
      input_ids: int (B, L), 0-padded, laid out as `tokenize` returns them.
      attention_mask: (B, L), 1 for tokens; None: `input_ids != 0`.

    Returns:
      float32 (B, E). In GRU reference mode, consecutive groups of `eval.batch_size`
      captions share a padding width (see the module docstring).
    """
    if (texts is None) == (input_ids is None):
      raise ValueError("encode_texts needs exactly one of texts or input_ids")
    if texts is not None:
      if attention_mask is not None:
        raise ValueError("attention_mask goes with input_ids, not texts")
      input_ids, attention_mask = self.tokenize(texts)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must have rank 2 (B, L), got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      if not np.array_equal(ids, np.round(ids)):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int32)
    vocab = self._text_vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"input_ids must be in [0, {vocab}) (the model's vocabulary), got "
                       f"values in [{ids.min()}, {ids.max()}]")
    if attention_mask is None:
      mask = (ids != 0).astype(np.int32)
    else:
      mask = np.asarray(attention_mask)
      _check_shape("attention_mask", mask, ids.shape, f"same as input_ids {ids.shape}")
      mask = (mask != 0).astype(np.int32)
    b, length = ids.shape
    width = self._text_width(length)
    if width > length:
      ids = np.pad(ids, ((0, 0), (0, width - length)))
      mask = np.pad(mask, ((0, 0), (0, width - length)))
    group = self.batch_size
    if self._reference and not self.model.config.bert_build:
      group = int(self.config.eval.batch_size)
    return self._run(self._embed_texts, {"input_ids": ids, "attention_mask": mask}, b, group,
                     {})

  def _text_width(self, length: int) -> int:
    c = self.model.config
    max_len = int(self.config.data.max_len)
    if c.bert_build and self._reference and length > max_len:
      raise ValueError(
          f"input_ids has {length} positions but reference padding (the authors' BERT "
          f"build) uses exactly data.max_len={max_len}: cut captions to {max_len} tokens")
    if c.bert_build and length > c.bert.max_position:
      raise ValueError(f"input_ids has {length} positions; BERT has only "
                       f"{c.bert.max_position} position embeddings")
    # A fixed width for every call up to max_len: one compile.
    return max(length, max_len)

  # ---------------------------------------------------------------- chunking

  def _run(self, fn, arrays: Dict[str, np.ndarray], n: int, batch_size: int,
           fill: Dict[str, Any]) -> np.ndarray:
    """fn over rows [i, i + batch_size), each chunk padded to a static row count."""
    if n == 0:
      return np.zeros((0, self.embed_size), np.float32)
    rows = batch_size if n > batch_size else _bucket(n, batch_size)
    outs = []
    for start in range(0, n, batch_size):
      chunk = {k: _pad_rows(v[start:start + batch_size], rows, fill.get(k, 0))
               for k, v in arrays.items()}
      outs.append((fn(self.variables, chunk), min(batch_size, n - start)))
    # Every chunk is dispatched before the first result is fetched.
    return np.concatenate([np.asarray(o[:m], np.float32) for o, m in outs], axis=0)


def _check_variables(model: DSRAN, variables: Dict[str, Any], workdir: str) -> None:
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      models.dummy_batch(model.config), train=False))
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(shapes), sep="/").items()}
  got = {k: tuple(np.shape(v))
         for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: checkpoint {got[k]}, model {want[k]}" for k in sorted(set(want) & set(got))
               if want[k] != got[k]]
  if problems:
    raise ValueError(f"{workdir}: the checkpoint does not fit the model its config.json "
                     f"describes ({len(problems)} problems):\n  " + "\n  ".join(problems[:20]))


def load(workdir: str, batch_size: int = DEFAULT_BATCH_SIZE) -> Encoder:
  """Rebuilds the model from `{workdir}/config.json` and restores its best checkpoint
  (else the latest).

  Args:
    workdir: a dsran_jax workdir.
    batch_size: rows per jitted call of `encode_images` / `encode_texts`.
  """
  config = load_workdir_config(workdir)
  variables, meta = checkpointing.load_variables(workdir)
  vocab_size = None
  if config.model.text_encoder == "gru":
    # The embedding table knows the vocabulary size even when the config says 0.
    vocab_size = config.model.vocab_size or int(
        np.shape(variables["params"]["text_enc"]["embed"]["embedding"])[0])
  model = models.build_model(config.model, vocab_size=vocab_size)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  _check_variables(model, variables, workdir)
  return Encoder(model, variables, config, workdir, batch_size, meta)

"""Matches images and captions with a dsran_jax workdir of any model family (trained, or
converted from the authors' checkpoints by `tools.convert_torch`).

    m = inference.load("runs/f30k")
    img = m.encode_images(grid=g, regions=r, region_pos=p)   # reps of B images
    txt = m.encode_texts(["a dog runs on the grass"])        # reps of B captions
    sims = m.score(img, txt)                                 # (B_img, B_txt) float32

Reps are opaque pytrees of numpy arrays with leading dim B: DSRAN's are its (B, E)
L2-normalised embeddings (so `img @ txt.T` is its score too); a cross-attention model's
hold token features and masks. `score` scores every pair in tiles spread over this host's
devices (`evaluation.ModelScorer`), so large galleries never hold more than a tile of
activations.

Encoding runs one jitted eval-mode call per chunk of `batch_size` rows (the last chunk
padded, so large galleries compile once); a call with fewer rows is padded to the next
power of two instead, so small queries stay cheap and compiles stay few. Which image
arrays a model reads, and their shapes, come from the family (`model.image_keys`,
`core.batch.KEY_SPECS`); a missing, misshapen or unexpected array is an error naming it.
A family may also set how captions are batched (`text_policy`: DSRAN's reference
padding mode groups GRU captions as the authors' eval loader did). Texts are tokenised
as training and evaluation tokenise them (cut only where the authors cut, or at a
`data.max_len` the user set, with a warning) and padded to the next multiple of
`data.caption_bucket`, so compiles stay few and no caption loses a word.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from dsran_jax import checkpointing, evaluation, models
from dsran_jax.core.batch import KEY_SPECS, key_shape
from dsran_jax.core.text_policy import TextPolicy, bucket_width
from dsran_jax.data import tokenize
from dsran_jax.workdir import Workdir, embedding_rows

DEFAULT_BATCH_SIZE = 256
# Arrays a caller may leave out, and what stands in for them.
_OPTIONAL_IMAGE_KEYS = {"region_pos": 0.0, "region_mask": True}


def _bucket(n: int, batch_size: int) -> int:
  """Rows a chunk of n is padded to: batch_size, or the next power of two below it."""
  return min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _pad_rows(x: np.ndarray, rows: int, value=0) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.full((rows - x.shape[0],) + x.shape[1:], value, x.dtype)
  return np.concatenate([x, pad], axis=0)


def _numeric_array(name: str, x, ndim: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
          or x.dtype == bool):
    raise ValueError(f"{name} must hold numbers, got dtype {x.dtype}")
  return x


def _check_shape(name: str, x: np.ndarray, expected: Tuple[Optional[int], ...], why: str):
  ok = len(x.shape) == len(expected) and all(
      e is None or e == s for s, e in zip(x.shape, expected))
  if not ok:
    shown = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
    raise ValueError(f"{name} has shape {x.shape}, expected {shown} ({why})")


def _check_image_values(arrays: Dict[str, np.ndarray]) -> None:
  """Refuses inputs whose reps would be meaningless yet look fine: a NaN embedding, or a
  unit-norm one from an image with no region."""
  for key, x in arrays.items():
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      rows = np.unique(np.nonzero(~np.isfinite(x))[0])
      raise ValueError(f"{key} holds {int((~np.isfinite(x)).sum())} NaN/Inf values, in "
                       f"image rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}")
  if "regions" in arrays and arrays["regions"].shape[1] == 0:
    raise ValueError(f"regions has shape {arrays['regions'].shape}: every image needs at "
                     "least one region")
  mask = arrays.get("region_mask")
  if mask is not None and mask.shape[1] and not mask.any(axis=1).all():
    rows = np.nonzero(~mask.any(axis=1))[0]
    raise ValueError(f"region_mask is all False in image rows {rows[:10].tolist()}: every "
                     "image needs at least one real region")


class Matcher:
  """Eval-mode matcher of one workdir's model. See the module docstring.

  Attributes:
    model: the family's Flax module.
    variables: `{"params", "batch_stats"}`.
    config: the workdir's full config (`ml_collections.ConfigDict`).
    workdir: where it was loaded from (for the word vocabulary), or None.
    batch_size: rows per jitted encoder call.
    meta: the checkpoint's meta (step, metrics, source file).
  """

  def __init__(self, model, variables: Dict[str, Any], config, workdir: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE, meta: Optional[dict] = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.config = config
    self.workdir = workdir
    self.batch_size = int(batch_size)
    self.meta = meta or {}
    self._tokenizer = None
    self._scorer = evaluation.make_scorer(model, variables, config, progress=False)
    self.variables = self._scorer.variables
    self._vocab_size = embedding_rows(variables)
    hook = getattr(models.family(config.model.name), "text_policy", None)
    self.text_policy = hook(model, config) if hook else TextPolicy()

  # ----------------------------------------------------- batch-dict callables

  def image_fn(self, batch: Dict[str, Any]):
    """Reps of an eval image batch dict (other keys ignored), as is: one jitted call,
    no chunking. For `evaluation.EmbeddingScorer` and custom loops."""
    return self._scorer.encode_images(batch)

  def text_fn(self, batch: Dict[str, Any]):
    """Reps of an eval caption batch dict (`input_ids`, `attention_mask`), as is."""
    return self._scorer.encode_texts(batch)

  def scorer(self) -> evaluation.ModelScorer:
    """The `evaluation.ModelScorer` this matcher encodes and scores with."""
    return self._scorer

  # ------------------------------------------------------------------ images

  def encode_images(self, *args, **arrays):
    """Image reps from feature arrays (numpy in, numpy out).

    Keywords are the model's image keys (`model.image_keys`, e.g. DSRAN's `grid`
    (B, 49, img_dim), `regions` (B, R, img_dim), `region_pos` (B, R, pos_dim),
    `region_mask` (B, R)); positional arguments fill them in that order.
    `region_pos` defaults to zeros (data without boxes) and `region_mask` to all True.
    """
    keys = tuple(self.model.image_keys)
    if len(args) > len(keys):
      raise TypeError(f"encode_images takes at most {len(keys)} positional arrays {keys}")
    for key, value in zip(keys, args):
      if key in arrays:
        raise TypeError(f"encode_images got {key} twice")
      arrays[key] = value
    arrays = {k: v for k, v in arrays.items() if v is not None}
    unknown = sorted(set(arrays) - set(keys))
    if unknown:
      raise ValueError(f"encode_images got {', '.join(unknown)}, which this model "
                       f"({self.config.model.name}) does not read; it reads {keys}")
    dims = self.model.input_dims
    # B and R come from the regions when given, so every message can name them.
    order = sorted(keys, key=lambda k: k != "regions")
    b = r = None
    checked = {}
    for key in order:
      spec = KEY_SPECS[key][0]
      if key not in arrays:
        if key in _OPTIONAL_IMAGE_KEYS and b is not None:
          shape = (b,) + key_shape(key, dims, r)
          checked[key] = np.full(shape, _OPTIONAL_IMAGE_KEYS[key], KEY_SPECS[key][1])
          continue
        shape = ", ".join(str(d) for d in ("B",) + spec)
        raise ValueError(f"this model ({self.config.model.name}) needs {key} ({shape}; "
                         f"{', '.join(f'{k}={v}' for k, v in dims.items())})")
      x = _numeric_array(key, arrays[key], 1 + len(spec))
      expected = (b,) + key_shape(key, dims, r)
      known = {k: v for k, v in (("B", b), ("R", r)) if v is not None}
      why = ", ".join([f"{k}={v}" for k, v in known.items()]
                      + [f"{k}={v}" for k, v in dims.items() if k in spec])
      _check_shape(key, x, expected, why or "see core.batch.KEY_SPECS")
      b = x.shape[0] if b is None else b
      if "R" in spec and r is None:
        r = x.shape[1 + spec.index("R")]
      checked[key] = x.astype(KEY_SPECS[key][1], copy=False)
    _check_image_values(checked)
    # Padded rows get a real-looking mask so no row is all-masked.
    return self._run(self._scorer.encode_images, checked, b, self.batch_size,
                     {"region_mask": True})

  # ------------------------------------------------------------------- texts

  @property
  def tokenizer(self):
    """The caption tokenizer (`data.tokenize.make_tokenizer`), built on first use."""
    if self._tokenizer is None:
      self._tokenizer = tokenize.make_tokenizer(self.config, self.workdir)
    return self._tokenizer

  def tokenize(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` int32 for `texts`, as `encode_texts` would use them:
    the tokenizer of training and evaluation, so a caption is cut only where they cut
    it (`models.caption_cap`: the authors' cut or `data.max_len`; `overlong` and
    `cut_note` say what it cuts)."""
    ids, mask, _ = self._encode(texts)
    return ids, mask

  def _encode(self, texts: Sequence[str]):
    """`tokenize(texts)` and what the cut did (`data.tokenize.CaptionLengths`)."""
    if isinstance(texts, str):
      raise TypeError("texts must be a list of strings, got a single str")
    ids, mask, lengths = self.tokenizer.encode_report(list(texts))
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32), lengths

  def overlong(self, texts: Sequence[str]) -> List[Tuple[int, int]]:
    """[(index, tokens)] of the texts `tokenize` cuts: longer than the model's cut
    (special tokens included; none for a family whose authors keep captions whole and
    no `data.max_len` set)."""
    if isinstance(texts, str):
      raise TypeError("texts must be a list of strings, got a single str")
    cap = self.tokenizer.cap
    if cap <= 0:
      return []
    lengths = np.asarray(self.tokenizer.lengths(list(texts)))
    return [(int(i), int(lengths[i])) for i in np.nonzero(lengths > cap)[0]]

  def cut_note(self, texts: Sequence[str]) -> Optional[str]:
    """What `encode_texts(texts)` cuts, in one line (None: nothing): how many texts, the
    longest, and the model's maximum."""
    cut = self.overlong(texts)
    if not cut:
      return None
    longest = max(cut, key=lambda c: c[1])
    what = (f"the text has {longest[1]} tokens" if len(texts) == 1 else
            f"{len(cut)} of {len(texts)} texts are longer (text {longest[0]}: "
            f"{longest[1]} tokens)")
    return (f"{what}; this model ({self.config.model.name}) reads at most "
            f"{self.tokenizer.cap} (data.max_len, special tokens included): the rest "
            "is cut")

  def encode_texts(self, texts: Optional[Sequence[str]] = None, input_ids=None,
                   attention_mask=None):
    """Caption reps, from raw `texts` or token ids.

    Args:
      texts: captions (tokenised with the model's tokenizer: BERT WordPiece from
        `models.bert_path`, or the word vocabulary `{workdir}/vocab.json`); those longer
        than the model's cut (`models.caption_cap`) are cut to it, with a warning
        (`cut_note`).
      input_ids: int (B, L), 0-padded, laid out as `tokenize` returns them.
      attention_mask: (B, L), 1 for tokens; None: `input_ids != 0`.
    """
    if (texts is None) == (input_ids is None):
      raise ValueError("encode_texts needs exactly one of texts or input_ids")
    if texts is not None:
      if attention_mask is not None:
        raise ValueError("attention_mask goes with input_ids, not texts")
      input_ids, attention_mask, lengths = self._encode(texts)
      if lengths.cut:   # said per text only when something was cut: no second tokenising
        logging.warning("%s", self.cut_note(texts))
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must have rank 2 (B, L), got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      if not np.array_equal(ids, np.round(ids)):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int32)
    vocab = self._vocab_size
    if vocab and ids.size and (ids.min() < 0 or ids.max() >= vocab):
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
    group = self.text_policy.group or self.batch_size
    return self._run(self._scorer.encode_texts, {"input_ids": ids, "attention_mask": mask},
                     b, group, {})

  def _text_width(self, length: int) -> int:
    """The width ids of `length` columns are padded to: the family's fixed width, else
    the next multiple of `data.caption_bucket` (bounded compiles; padding never changes
    a score)."""
    p = self.text_policy
    if p.fixed_width is not None:
      if length > p.fixed_width:
        raise ValueError(
            f"input_ids has {length} positions but this model takes at most "
            f"{p.fixed_width} tokens (its caption cut, padded to exactly that as the "
            f"authors' code does): cut captions to {p.fixed_width} tokens")
      return p.fixed_width
    if p.max_positions is not None and length > p.max_positions:
      raise ValueError(f"input_ids has {length} positions; the text encoder has only "
                       f"{p.max_positions} position embeddings")
    return bucket_width(length, int(self.config.data.caption_bucket), p.max_positions)

  # ---------------------------------------------------------------- scoring

  def score(self, image_reps, text_reps) -> np.ndarray:
    """(n_img, n_txt) float32 scores of every image against every caption."""
    return self._scorer.score(image_reps, text_reps)

  # ---------------------------------------------------------------- chunking

  def _run(self, fn, arrays: Dict[str, np.ndarray], n: int, batch_size: int,
           fill: Dict[str, Any]):
    """fn over rows [i, i + batch_size), each chunk padded to a static row count."""
    if n == 0:  # reps of the right structure and trailing shapes, with no rows
      one = fn({k: _pad_rows(v, 1, fill.get(k, 0)) for k, v in arrays.items()})
      return jax.tree.map(lambda x: np.asarray(x)[:0], one)
    rows = batch_size if n > batch_size else _bucket(n, batch_size)
    outs = []
    for start in range(0, n, batch_size):
      chunk = {k: _pad_rows(v[start:start + batch_size], rows, fill.get(k, 0))
               for k, v in arrays.items()}
      outs.append((fn(chunk), min(batch_size, n - start)))
    # Every chunk is dispatched before the first result is fetched.
    parts = [jax.tree.map(lambda x, m=m: np.asarray(x[:m]), o) for o, m in outs]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def load(workdir: str, batch_size: int = DEFAULT_BATCH_SIZE) -> Matcher:
  """The matcher of a workdir's model (`Workdir.restore`: built from its config.json,
  with its best checkpoint, else the latest).

  Args:
    workdir: a dsran_jax workdir.
    batch_size: rows per jitted call of `encode_images` / `encode_texts`.
  """
  wd = Workdir(workdir)
  config = wd.load_config()  # first: a directory that is no workdir says so
  if not any(checkpointing.latest_step(wd.path, kind) is not None
             for kind in (checkpointing.BEST, checkpointing.LATEST)):
    raise FileNotFoundError(
        f"{wd.path} has no checkpoint yet (nothing under "
        f"{wd.file(checkpointing.CHECKPOINTS_DIR)}): train until its first checkpoint "
        "(train.checkpoint_every) or convert one (python -m dsran_jax.tools.convert_torch)")
  restored = wd.restore(config)
  return Matcher(restored.model, restored.variables, restored.config, workdir, batch_size,
                 restored.meta)

"""Scorers: how evaluation, inference and search encode items and score pairs.

A scorer has three methods:

    encode_images(batch: dict) -> pytree of arrays with leading dim B
    encode_texts(batch: dict)  -> pytree of arrays with leading dim B
    score(image_reps, text_reps) -> (n_img, n_txt) array, higher = better match

`ModelScorer` is the scorer of every model family (and the only jit site of
evaluation): it encodes batches on all devices of a mesh and scores the gallery in 2-D
tiles (images x captions) of one fixed padded shape, so one compiled function serves
the whole gallery whatever the model (a dot product for an embedding model, stacked
cross attention for SCAN, ...). Tiles are split over the mesh's devices along the image
axis. `EmbeddingScorer` wraps plain embedding functions.

A model whose reps depend on each item's ground-truth partner (its
`partner_conditioning` is set: MLASM's reference mode) gets one paired pre-pass
(`ModelScorer.condition_on_partners`) between encoding and scoring; galleries not in the
evaluation layout are an error for it. Every other model's tiles stay independent.
"""
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from dsran_jax import models
from dsran_jax.progress import Progress

PyTree = Any


class Interrupted(Exception):
  """Raised between batches or tiles when the caller's `should_stop()` turns true (a
  SIGTERM during a dev evaluation): nothing half-written is kept."""


def stop_check(should_stop: Optional[Callable[[], bool]]) -> None:
  if should_stop is not None and should_stop():
    raise Interrupted("evaluation interrupted")


class Scorer:
  """Base class (and protocol) of evaluation scorers; see the module docstring."""

  def encode_images(self, batch: Dict[str, Any]) -> PyTree:
    """Image-side reps of an eval batch, every leaf with leading dim B."""
    raise NotImplementedError

  def encode_texts(self, batch: Dict[str, Any]) -> PyTree:
    """Caption-side reps of an eval batch, every leaf with leading dim B."""
    raise NotImplementedError

  def score(self, image_reps: PyTree, text_reps: PyTree) -> Any:
    """(n_img, n_txt) scores of every image against every caption."""
    raise NotImplementedError


@jax.jit
def _dot_scores(img: jax.Array, txt: jax.Array) -> jax.Array:
  # HIGHEST: no bf16 passes on TPU, ranks need full fp32 scores.
  return jnp.matmul(img, txt.T, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


class EmbeddingScorer(Scorer):
  """A scorer of one embedding per item; score = dot product (cosine when the
  embeddings are L2-normalised, as DSRAN's are).

  `image_fn(batch) -> (B, E)` and `text_fn(batch) -> (B, E)` are typically jitted
  closures over the model variables (e.g. `DSRAN.embed_images` via `apply`).
  """

  def __init__(self, image_fn: Callable[[Dict[str, Any]], Any],
               text_fn: Callable[[Dict[str, Any]], Any]):
    self.image_fn = image_fn
    self.text_fn = text_fn

  def encode_images(self, batch):
    return self.image_fn(batch)

  def encode_texts(self, batch):
    return self.text_fn(batch)

  def score(self, image_reps, text_reps):
    return _dot_scores(jnp.asarray(image_reps), jnp.asarray(text_reps))


def local_mesh() -> jax.sharding.Mesh:
  """A 1-D `data` mesh over this host's devices (every host evaluates the whole split)."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_edge(tree: PyTree, rows: int) -> PyTree:
  """Pads every leaf to `rows` rows by repeating its last row: padded items are real
  inputs, so no model can produce NaN on them (their scores are discarded)."""
  def pad(x):
    x = np.asarray(x)
    if x.shape[0] == rows:
      return x
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)
  return jax.tree.map(pad, tree)


def _slice(tree: PyTree, start: int, stop: int) -> PyTree:
  return jax.tree.map(lambda x: x[start:stop], tree)


def check_finite(block: np.ndarray, row_offset: int = 0, col_offset: int = 0,
                 what: str = "scores") -> None:
  """Raises ValueError if `block` holds NaN or Inf, saying how many and where."""
  bad = ~np.isfinite(block)
  if bad.any():
    rows, cols = np.nonzero(bad)
    where = ", ".join(f"({r + row_offset}, {c + col_offset})" for r, c in
                      zip(rows[:5], cols[:5]))
    raise ValueError(f"{what}: {int(bad.sum())} non-finite values (NaN/Inf) in the block "
                     f"at rows {row_offset}.., columns {col_offset}..; first at "
                     f"(image, caption) {where}")


class ModelScorer(Scorer):
  """Scorer of any model family: jitted eval-mode encoders and tiled scoring.

  Args:
    model: a family's Flax module (the `MatchingModel` contract).
    variables: its `{"params", "batch_stats"}`.
    mesh: a 1-D `data` mesh (default: this host's devices). Encoder batches are split
      over it, and each score tile's images too (captions replicated).
    tile: (images, captions) of one score call; the image count is rounded up to a
      multiple of the mesh size. Smaller galleries use one tile of their own padded size.
    progress: show pairs scored and pairs/s on long scoring.
    captions_per_image: the evaluation layout `score` assumes for a partner-conditioned
      model (caption j describes image j // captions_per_image); unused by others.
  """

  def __init__(self, model, variables, mesh=None, tile: Tuple[int, int] = (1000, 5000),
               progress: bool = True, captions_per_image: int = 5):
    self.model = model
    self.captions_per_image = int(captions_per_image)
    self._condition = None
    self.mesh = mesh or local_mesh()
    self.n_dev = int(self.mesh.devices.size)
    if tile[0] < 1 or tile[1] < 1:
      raise ValueError(f"score tile must be positive, got {tile}")
    self.tile = (_round_up(int(tile[0]), self.n_dev), int(tile[1]))
    self.progress = progress
    rep = NamedSharding(self.mesh, P())
    rows = NamedSharding(self.mesh, P("data"))
    self._replicated, self._rows = rep, rows
    self.set_variables(variables)
    # Variables are an argument, not a closure: closed-over arrays would become constants
    # copied into every compiled program.
    self._encode_images = jax.jit(
        lambda v, b: model.apply(v, b, train=False, method="encode_images"),
        in_shardings=(rep, rows), out_shardings=rows)
    self._encode_texts = jax.jit(
        lambda v, b: model.apply(v, b, train=False, method="encode_texts"),
        in_shardings=(rep, rows), out_shardings=rows)
    self._score = jax.jit(
        lambda v, i, t: model.apply(v, i, t, method="score"),
        in_shardings=(rep, rows, rep), out_shardings=rows)
    self._candidate_fns = {}

  def set_variables(self, variables) -> None:
    """Scores with new `variables` of the same model, keeping the compiled functions
    (a training run re-evaluates every epoch without compiling again)."""
    local = jax.tree_util.tree_map(
        lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, variables)
    self.variables = jax.device_put(local, self._replicated)

  def _encode(self, fn, batch, keys):
    arrays = {k: batch[k] for k in keys if k in batch}
    b = leading_dim(arrays, "batch")
    # Placed explicitly: with several processes jit refuses host arrays for a sharding.
    padded = jax.device_put(_pad_edge(arrays, _round_up(b, self.n_dev)), self._rows)
    return _slice(fn(self.variables, padded), 0, b)

  def encode_images(self, batch):
    return self._encode(self._encode_images, batch, self.model.image_keys)

  def encode_texts(self, batch):
    return self._encode(self._encode_texts, batch, self.model.text_keys)

  def tile_shape(self, n_img: int, n_txt: int) -> Tuple[int, int]:
    """The (images, captions) tile used for an `n_img x n_txt` gallery."""
    ti, tj = self.tile
    return min(ti, _round_up(n_img, self.n_dev)), min(tj, n_txt)

  def compile_tile(self, image_reps, text_reps):
    """The compiled score function of one tile for this gallery (for cost analysis)."""
    ti, tj = self.tile_shape(leading_dim(image_reps, "image_reps"),
                             leading_dim(text_reps, "text_reps"))
    pad = lambda reps, n: _pad_edge(_slice(jax.device_get(reps), 0, n), n)
    return self._score.lower(self.variables, pad(image_reps, ti), pad(text_reps, tj)).compile()

  def score(self, image_reps, text_reps):
    image_reps, text_reps = self.condition_on_partners(image_reps, text_reps)
    n_img = leading_dim(image_reps, "image_reps")
    n_txt = leading_dim(text_reps, "text_reps")
    out = np.empty((n_img, n_txt), np.float32)
    self.score_into(image_reps, text_reps, out)
    return out

  def condition_on_partners(self, image_reps, text_reps,
                            captions_per_image: Optional[int] = None):
    """The paired pre-pass of a partner-conditioned model; the reps unchanged otherwise.

    A model sets `partner_conditioning` (a sentence saying why) when its reps need each
    item's ground-truth partner before `score`, and implements
    `condition_on_partners(image_reps, text_reps) -> (image_extra, text_extra)` on B
    row-aligned (image, caption) pairs. The gallery must be in the evaluation layout,
    `n_txt = cpi * n_img` with caption j describing image j // cpi: every caption is
    paired with its image (in batches of the tile's caption count, padded to one shape),
    caption j keeps its own extra leaves and image i those of caption cpi * i (its first
    caption), merged into the reps dicts.

    Raises:
      ValueError: the gallery is not in that layout (the model's sentence included).
    """
    note = getattr(self.model, "partner_conditioning", None)
    if not note:
      return image_reps, text_reps
    cpi = int(captions_per_image or self.captions_per_image)
    n_img = leading_dim(image_reps, "image_reps")
    n_txt = leading_dim(text_reps, "text_reps")
    if n_txt != cpi * n_img or n_img == 0:
      raise ValueError(
          f"{note}. It scores only galleries in the evaluation layout: {cpi} captions per "
          f"image in order, caption j describing image j // {cpi}; this one has {n_img} "
          f"images and {n_txt} captions")
    if not isinstance(image_reps, dict) or not isinstance(text_reps, dict):
      raise TypeError("a partner-conditioned model's reps must be dicts (its extra "
                      "leaves are merged into them)")
    if self._condition is None:
      model = self.model
      self._condition = jax.jit(
          lambda v, i, t: model.apply(v, i, t, method="condition_on_partners"),
          in_shardings=(self._replicated, self._rows, self._rows), out_shardings=self._rows)
    image_reps = jax.tree.map(np.asarray, jax.device_get(image_reps))
    text_reps = jax.tree.map(np.asarray, jax.device_get(text_reps))
    chunk = _round_up(min(self.tile[1], n_txt), self.n_dev)
    outs = []
    for j in range(0, n_txt, chunk):
      owner = np.arange(j, min(j + chunk, n_txt)) // cpi
      img = _pad_edge(jax.tree.map(lambda x, o=owner: x[o], image_reps), chunk)
      txt = _pad_edge(_slice(text_reps, j, j + chunk), chunk)
      outs.append((self._condition(self.variables, img, txt), len(owner)))
    parts = [jax.tree.map(lambda x, m=m: np.asarray(x)[:m], o) for o, m in outs]
    img_extra, txt_extra = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)
    img_extra = jax.tree.map(lambda x: x[::cpi], img_extra)
    return {**image_reps, **img_extra}, {**text_reps, **txt_extra}

  def score_into(self, image_reps, text_reps, out, desc: str = "score",
                 should_stop: Optional[Callable[[], bool]] = None) -> None:
    """Writes every score into `out` (n_img, n_txt), each tile computed exactly once.

    Tiles are dispatched one ahead of the one being fetched, so the host's copy into
    `out` overlaps the devices' work. Raises ValueError on NaN/Inf scores of real pairs.
    """
    n_img = leading_dim(image_reps, "image_reps")
    n_txt = leading_dim(text_reps, "text_reps")
    if out.shape != (n_img, n_txt):
      raise ValueError(f"out has shape {out.shape}, expected {(n_img, n_txt)}")
    if n_img == 0 or n_txt == 0:
      return
    ti, tj = self.tile_shape(n_img, n_txt)
    image_reps = jax.tree.map(np.asarray, jax.device_get(image_reps))
    text_reps = jax.tree.map(np.asarray, jax.device_get(text_reps))
    text_tiles = [jax.device_put(_pad_edge(_slice(text_reps, j, j + tj), tj), self._replicated)
                  for j in range(0, n_txt, tj)]
    long_job = n_img * n_txt >= 2_000_000 and self.progress
    bar = Progress(n_img * n_txt, desc, unit="pair", unit_scale=True, leave=False,
                   log_every_s=30.0) if long_job else None
    t0 = time.time()
    pending = None

    def fetch(item):
      i, j, block = item
      rows, cols = min(ti, n_img - i), min(tj, n_txt - j)
      host = np.asarray(jax.device_get(block), np.float32)[:rows, :cols]
      check_finite(host, i, j)
      out[i:i + rows, j:j + cols] = host
      if bar is not None:
        bar.update(rows * cols)

    for i in range(0, n_img, ti):
      img_tile = jax.device_put(_pad_edge(_slice(image_reps, i, i + ti), ti), self._rows)
      for k, j in enumerate(range(0, n_txt, tj)):
        stop_check(should_stop)
        block = self._score(self.variables, img_tile, text_tiles[k])
        if pending is not None:
          fetch(pending)
        pending = (i, j, block)
    fetch(pending)
    if bar is not None:
      bar.close()
      dt = time.time() - t0
      logging.info("%s: %d x %d pairs in %.1fs (%.3g pairs/s, tile %dx%d on %d devices)",
                   desc, n_img, n_txt, dt, n_img * n_txt / max(dt, 1e-9), ti, tj,
                   self.n_dev)

  # -------------------------------------------------- gathered (sparse) scoring

  def candidate_tile(self, num_queries: int, num_candidates: int) -> int:
    """Queries per gathered-scoring call for `num_candidates` candidates each: about as
    many pairs as one (images x captions) score tile, a multiple of the mesh size."""
    ti, tj = self.tile
    q = max(1, (ti * tj) // max(int(num_candidates), 1))
    q = min(q, max(int(num_queries), 1))
    return _round_up(q, self.n_dev)

  def _candidate_fn(self, queries: str, on_device: bool):
    """The jitted scorer of Q query groups: (Q, g) images x (Q, h) captions -> (Q, g, h)
    (g = 1 for image queries, h = 1 for caption queries), `score` vmapped over the
    groups, so each group computes only its own g x h pairs. With `on_device` it takes
    the whole gallery's reps (replicated) and (Q,) / (Q, K) row indices, and gathers
    inside; otherwise it takes reps already gathered on the host."""
    key = (queries, on_device)
    if key in self._candidate_fns:
      return self._candidate_fns[key]
    model = self.model

    def groups(v, img, txt):
      return jax.vmap(lambda i, t: model.apply(v, i, t, method="score"))(img, txt)

    if on_device:
      def fn(v, image_reps, text_reps, query_idx, cand_idx):
        take = lambda tree, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)
        if queries == "images":
          return groups(v, take(image_reps, query_idx[:, None]), take(text_reps, cand_idx))
        return groups(v, take(image_reps, cand_idx), take(text_reps, query_idx[:, None]))
      shardings = (self._replicated, self._replicated, self._replicated, self._rows,
                   self._rows)
    else:
      fn = groups
      shardings = (self._replicated, self._rows, self._rows)
    jitted = jax.jit(fn, in_shardings=shardings, out_shardings=self._rows)
    self._candidate_fns[key] = jitted
    return jitted

  def score_candidates(self, image_reps, text_reps, candidates, queries: str = "images",
                       query_rows: Optional[np.ndarray] = None,
                       on_device: Optional[bool] = None, max_device_bytes: int = 1 << 30,
                       desc: str = "score candidates",
                       should_stop: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Scores each query against its own candidates only (the second stage of two-stage
    retrieval): `out[q, k] = score(query q, candidate candidates[q, k])`.

    Args:
      image_reps / text_reps: the reps of the images and captions (numpy pytrees, or
        arrays such as memmaps with leading dim N).
      candidates: int (n_queries, K) row indices into the other side's reps (captions
        for image queries, images for caption queries); every row has K candidates.
      queries: "images" (image -> captions) or "texts" (caption -> images).
      query_rows: (n_queries,) rows of the query side's reps (default: all, in order).
      on_device: gather the candidates' reps on the devices (the whole gallery is put
        on each device once) or on the host (only the candidates travel, e.g. for a
        memory-mapped gallery). Default: on the devices when both sides' reps take at
        most `max_device_bytes`.
    Returns:
      float32 (n_queries, K), the same numbers `score` gives those pairs (up to the
      floating-point reassociation a different batch shape may bring).

    Queries go in tiles of one fixed shape (`candidate_tile`; the last one padded with
    copies of real queries), so one compiled function serves the whole gallery. Raises
    ValueError on out-of-range candidates and on NaN/Inf scores of real pairs.
    """
    if queries not in ("images", "texts"):
      raise ValueError(f"queries must be 'images' or 'texts', got {queries!r}")
    n_img = leading_dim(image_reps, "image_reps")
    n_txt = leading_dim(text_reps, "text_reps")
    n_query_side, n_other = (n_img, n_txt) if queries == "images" else (n_txt, n_img)
    cand = np.asarray(candidates)
    if cand.ndim != 2 or not np.issubdtype(cand.dtype, np.integer):
      raise ValueError(f"candidates must be an int (n_queries, K) array, got shape "
                       f"{cand.shape} dtype {cand.dtype}")
    n_q, k = cand.shape
    if k < 1:
      raise ValueError(f"candidates has shape {cand.shape}: need K >= 1 per query")
    other = "captions" if queries == "images" else "images"
    if n_q and (cand.min() < 0 or cand.max() >= n_other):
      raise ValueError(f"candidates must be rows of the {n_other} {other}, got values in "
                       f"[{cand.min()}, {cand.max()}]")
    rows = np.arange(n_q) if query_rows is None else np.asarray(query_rows, np.int64)
    if rows.shape != (n_q,):
      raise ValueError(f"query_rows has shape {rows.shape}, expected ({n_q},) (one per row "
                       f"of candidates)")
    if n_q and (rows.min() < 0 or rows.max() >= n_query_side):
      raise ValueError(f"query_rows must be rows of the {n_query_side} {queries}, got "
                       f"values in [{rows.min()}, {rows.max()}]")
    out = np.empty((n_q, k), np.float32)
    if n_q == 0:
      return out
    if on_device is None:
      nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves((image_reps, text_reps)))
      on_device = nbytes <= max_device_bytes
    q = self.candidate_tile(n_q, k)
    fn = self._candidate_fn(queries, bool(on_device))
    if on_device:
      gallery = jax.device_put(jax.tree.map(np.asarray, (image_reps, text_reps)),
                               self._replicated)
    long_job = n_q * k >= 2_000_000 and self.progress
    bar = Progress(n_q * k, desc, unit="pair", unit_scale=True, leave=False,
                   log_every_s=30.0) if long_job else None
    pending = None

    def fetch(item):
      start, block = item
      m = min(q, n_q - start)
      host = np.asarray(jax.device_get(block), np.float32).reshape(q, k)[:m]
      check_finite(host, start, 0, what=f"{desc} (rows = queries, columns = candidates)")
      out[start:start + m] = host
      if bar is not None:
        bar.update(m * k)

    for start in range(0, n_q, q):
      stop_check(should_stop)
      # Padding repeats the last real query with its candidates: real inputs, finite.
      idx = _pad_edge(rows[start:start + q], q)
      cidx = _pad_edge(cand[start:start + q], q)
      if on_device:
        block = fn(self.variables, gallery[0], gallery[1],
                   jax.device_put(idx.astype(np.int32), self._rows),
                   jax.device_put(cidx.astype(np.int32), self._rows))
      else:
        gather = lambda tree, i: jax.tree.map(lambda x: np.asarray(x[i.ravel()]).reshape(
            i.shape + np.shape(x)[1:]), tree)
        if queries == "images":
          img, txt = gather(image_reps, idx[:, None]), gather(text_reps, cidx)
        else:
          img, txt = gather(image_reps, cidx), gather(text_reps, idx[:, None])
        block = fn(self.variables, jax.device_put(img, self._rows),
                   jax.device_put(txt, self._rows))
      if pending is not None:
        fetch(pending)
      pending = (start, block)
    fetch(pending)
    if bar is not None:
      bar.close()
    return out


def leading_dim(tree: PyTree, what: str) -> int:
  """The leading dim every leaf of a reps pytree shares (ValueError naming `what` if not)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{what}: empty pytree of reps")
  dims = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
  if len(dims) != 1 or -1 in dims:
    raise ValueError(f"{what}: every leaf needs the same leading dim, got shapes "
                     f"{[np.shape(x) for x in leaves]}")
  return dims.pop()


def _take_valid(reps: PyTree, batch: Dict[str, Any]) -> PyTree:
  reps = jax.tree.map(np.asarray, jax.device_get(reps))
  b = leading_dim(reps, "encode_all")
  valid = batch.get("valid") if isinstance(batch, dict) else None
  if valid is None:
    return reps
  valid = np.asarray(valid, dtype=bool)
  if valid.shape != (b,):
    raise ValueError(f"encode_all: batch 'valid' has shape {valid.shape} but the reps "
                     f"have leading dim {b}")
  if valid.all():
    return reps
  return jax.tree.map(lambda x: x[valid], reps)


def encode_all(fn: Callable[[Dict[str, Any]], PyTree], batches: Iterable[Dict[str, Any]],
               total: Optional[int] = None, desc: str = "encode",
               should_stop: Optional[Callable[[], bool]] = None) -> PyTree:
  """Runs `fn` over eval batches and concatenates its outputs as numpy, padding dropped.

  Batches carry a `valid` bool (B,) key (the last one is padded); rows with
  valid=False are dropped. The next batch is dispatched before the previous output is
  fetched, so an asynchronous (jitted) `fn` overlaps with the host. Progress shows as a
  bar on a terminal or in a notebook, as log lines otherwise.
  """
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  outs: List[PyTree] = []
  pending = None
  with Progress(total, desc, unit="batch", leave=False) as bar:
    for batch in batches:
      stop_check(should_stop)
      reps = fn(batch)
      if pending is not None:
        outs.append(_take_valid(*pending))
        bar.update(1)
      pending = (reps, batch)
    if pending is not None:
      outs.append(_take_valid(*pending))
      bar.update(1)
  if not outs:
    raise ValueError(f"encode_all ({desc}): no batches")
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def _score_rows(scorer: Scorer, image_reps: PyTree, text_reps: PyTree, offset: int,
                rows: int, n_txt: int) -> np.ndarray:
  img = jax.tree.map(lambda x: x[offset:offset + rows], image_reps)
  block = np.asarray(jax.device_get(scorer.score(img, text_reps)), dtype=np.float32)
  b = leading_dim(img, "image_reps")
  if block.shape != (b, n_txt):
    raise ValueError(f"scorer.score returned shape {block.shape} for {b} images and "
                     f"{n_txt} texts")
  return block


def compute_sims_blocks(scorer: Scorer, image_reps: PyTree, text_reps: PyTree,
                        chunk_size: int = 1000,
                        offsets: Optional[Sequence[int]] = None
                        ) -> Iterator[Tuple[int, np.ndarray]]:
  """Yields (row_offset, block): float32 `score(image_reps[rows], all text reps)` for
  rows `row_offset ... row_offset + chunk_size - 1` (or fewer at the end).

  `offsets` restricts the blocks to those row offsets (default: all, in order). The
  text reps are put on the device once.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  n_img = leading_dim(image_reps, "image_reps")
  n_txt = leading_dim(text_reps, "text_reps")
  text_dev = jax.device_put(text_reps)
  if offsets is None:
    offsets = range(0, n_img, chunk_size)
  for o in offsets:
    yield o, _score_rows(scorer, image_reps, text_dev, o, min(chunk_size, n_img - o), n_txt)


def make_scorer(model, variables, config, mesh=None, progress: bool = True) -> ModelScorer:
  """The evaluation scorer of any family for `config`: jitted encoders and tiled scoring
  (tile `eval.tile_*`, else the family's) over every device of this host (default),
  variables replicated."""
  return ModelScorer(model, variables, mesh, tile=models.eval_tile(config), progress=progress)

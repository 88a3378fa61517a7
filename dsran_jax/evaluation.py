"""Retrieval evaluation around a *scorer*, streaming sims blocks into `ranking`.

A scorer has three methods:

    encode_images(batch: dict) -> pytree of arrays with leading dim B
    encode_texts(batch: dict)  -> pytree of arrays with leading dim B
    score(image_reps, text_reps) -> (n_img, n_txt) array, higher = better match

DSRAN is an `EmbeddingScorer`: one L2-normalised vector per image / caption and a dot
product (cosine) as score. Cross-attention models (BSSAN, MLASM, KIDRR) return
token-level reps and a heavier `score`; everything else here is unchanged for them.

`evaluate` encodes every image and caption once, then scores `chunk_size` images at a
time against all captions and feeds each block to `ranking.RankAccumulator`s, so the
(N_img, N_cap) matrix is never held in memory. t2i ranks need every caption's positive
score before rows can be counted, and a block only reveals those of its own images, so
the blocks are produced twice (once more by the scorer, or read back from `sims_path`
when the matrix is being saved); the last block is not needed again.
"""
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsran_jax import ranking

PyTree = Any


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


def _leading_dim(tree: PyTree, what: str) -> int:
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
  b = _leading_dim(reps, "encode_all")
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
               total: Optional[int] = None, desc: str = "encode") -> PyTree:
  """Runs `fn` over eval batches and concatenates its outputs as numpy, padding dropped.

  Batches carry a `valid` bool (B,) key (the last one is padded); rows with
  valid=False are dropped. The next batch is dispatched before the previous output is
  fetched, so an asynchronous (jitted) `fn` overlaps with the host. A progress bar is
  shown on a terminal only.
  """
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  outs: List[PyTree] = []
  pending = None
  for batch in tqdm(batches, total=total, desc=desc, disable=None, leave=False):
    reps = fn(batch)
    if pending is not None:
      outs.append(_take_valid(*pending))
    pending = (reps, batch)
  if pending is not None:
    outs.append(_take_valid(*pending))
  if not outs:
    raise ValueError(f"encode_all ({desc}): no batches")
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def _score_rows(scorer: Scorer, image_reps: PyTree, text_reps: PyTree, offset: int,
                rows: int, n_txt: int) -> np.ndarray:
  img = jax.tree.map(lambda x: x[offset:offset + rows], image_reps)
  block = np.asarray(jax.device_get(scorer.score(img, text_reps)), dtype=np.float32)
  b = _leading_dim(img, "image_reps")
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
  n_img = _leading_dim(image_reps, "image_reps")
  n_txt = _leading_dim(text_reps, "text_reps")
  text_dev = jax.device_put(text_reps)
  if offsets is None:
    offsets = range(0, n_img, chunk_size)
  for o in offsets:
    yield o, _score_rows(scorer, image_reps, text_dev, o, min(chunk_size, n_img - o), n_txt)


class _Target:
  """One ranked matrix: rows/cols of the full sims matrix plus its accumulator."""

  def __init__(self, name: str, rows: slice, cols: slice, cpi: int):
    self.name = name
    self.rows = rows
    self.cols = cols
    self.acc = ranking.RankAccumulator(rows.stop - rows.start, cpi)

  def _span(self, offset: int, b: int) -> Tuple[int, int]:
    return max(offset, self.rows.start), min(offset + b, self.rows.stop)

  def needs(self, offset: int, b: int) -> bool:
    lo, hi = self._span(offset, b)
    return lo < hi and self.acc.needs_rows(lo - self.rows.start, hi - lo)

  def feed(self, offset: int, block: np.ndarray) -> None:
    lo, hi = self._span(offset, block.shape[0])
    if lo < hi and self.acc.needs_rows(lo - self.rows.start, hi - lo):
      self.acc.add(lo - self.rows.start, block[lo - offset:hi - offset, self.cols])


def evaluate(scorer: Scorer, image_batches: Iterable[Dict[str, Any]],
             caption_batches: Iterable[Dict[str, Any]], cpi: int = 5,
             protocol: str = "1k", chunk_size: int = 1000,
             sims_path: Optional[str] = None) -> Dict[str, Dict[str, float]]:
  """Encodes a test split once and returns its retrieval metrics.

  Args:
    scorer: see `Scorer`.
    image_batches / caption_batches: eval batches in order (caption c belongs to image
      c // cpi), each with a `valid` mask.
    cpi: captions per image.
    protocol: "1k" (one matrix, e.g. Flickr30K test or a 1000-image dev split) ->
      {"1k": metrics}; "coco" (5000 images) -> {"coco5k": all images,
      "coco1k": mean over 5 sequential folds of N/5 images}.
    chunk_size: images scored per block.
    sims_path: if set, the full float32 sims matrix is also saved there as .npy (for
      `python -m dsran_jax.tools.rank` ensembles), written block by block.
  Returns:
    {protocol name: `ranking.recall_metrics` dict}.
  """
  if protocol not in ("1k", "coco"):
    raise ValueError(f"protocol must be '1k' or 'coco', got {protocol!r}")
  image_reps = encode_all(scorer.encode_images, image_batches, desc="encode images")
  text_reps = encode_all(scorer.encode_texts, caption_batches, desc="encode captions")
  n_img = _leading_dim(image_reps, "image reps")
  n_cap = _leading_dim(text_reps, "caption reps")
  if n_cap != cpi * n_img:
    raise ValueError(f"{n_img} images and {n_cap} captions: expected {cpi} captions per "
                     f"image ({cpi * n_img})")
  everything = (slice(0, n_img), slice(0, n_cap))
  if protocol == "1k":
    targets = [_Target("1k", *everything, cpi)]
  else:
    targets = [_Target("coco5k", *everything, cpi)]
    targets += [_Target("coco1k", rs, cs, cpi)
                for rs, cs in ranking.fold_slices(n_img, cpi)]

  writer = tmp_path = None
  if sims_path:
    sims_path = os.fspath(sims_path)
    if not sims_path.endswith(".npy"):
      sims_path += ".npy"
    os.makedirs(os.path.dirname(os.path.abspath(sims_path)), exist_ok=True)
    tmp_path = sims_path[:-4] + ".partial.npy"
    writer = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32,
                                       shape=(n_img, n_cap))
  try:
    # Pass 1: i2t ranks and positive scores (and the saved matrix).
    for o, block in tqdm(compute_sims_blocks(scorer, image_reps, text_reps, chunk_size),
                         total=-(-n_img // chunk_size), desc="score", disable=None,
                         leave=False):
      if writer is not None:
        writer[o:o + block.shape[0]] = block
      for t in targets:
        t.feed(o, block)
    # Pass 2: t2i counts of the blocks seen before all positives were known.
    pending = [o for o in range(0, n_img, chunk_size)
               if any(t.needs(o, min(chunk_size, n_img - o)) for t in targets)]
    if pending:
      if writer is not None:
        writer.flush()
        source = ((o, np.asarray(writer[o:o + chunk_size])) for o in pending)
      else:
        source = compute_sims_blocks(scorer, image_reps, text_reps, chunk_size, pending)
      for o, block in tqdm(source, total=len(pending), desc="score (t2i)", disable=None,
                           leave=False):
        for t in targets:
          t.feed(o, block)
    if writer is not None:
      writer.flush()
      del writer
      writer = None
      os.replace(tmp_path, sims_path)
  finally:
    if writer is not None:   # failed half-way: leave no partial file behind
      del writer
      if tmp_path and os.path.exists(tmp_path):
        os.remove(tmp_path)

  per_target = [(t.name, ranking.recall_metrics(*t.acc.ranks())) for t in targets]
  results: Dict[str, Dict[str, float]] = {}
  for name in dict.fromkeys(n for n, _ in per_target):
    results[name] = ranking.mean_metrics([m for n, m in per_target if n == name])
  return results


def format_table(results: Dict[str, Dict[str, float]]) -> str:
  """A fixed-width text table: one row per protocol, R@1/5/10 + medr both ways, rsum."""
  head1 = f"{'':<10}| {'image -> text':^28} | {'text -> image':^28} |"
  cols = "".join(f"{c:>7}" for c in ("R@1", "R@5", "R@10", "medr"))
  head2 = f"{'protocol':<10}| {cols} | {cols} | {'rsum':>7}"
  lines = [head1, head2, "-" * len(head2)]
  for name, m in results.items():
    cells = []
    for d in ("i2t", "t2i"):
      cells.append("".join(f"{m[f'r{k}_{d}']:7.1f}" for k in (1, 5, 10))
                   + f"{m[f'medr_{d}']:7.1f}")
    lines.append(f"{name:<10}| {cells[0]} | {cells[1]} | {m['rsum']:7.1f}")
  return "\n".join(lines)

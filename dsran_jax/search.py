"""Searches a workdir's test gallery: text -> images and image -> captions.

    python -m dsran_jax.search --workdir=DIR --query="a dog on the beach" --top_k=5
    python -m dsran_jax.search --workdir=DIR --image_id=1000092795 --top_k=5

Prints one JSON object per hit on stdout (logs go to stderr):
- text -> image: `{"rank": 1, "image_id": ..., "score": ..., "captions": [...]}`, the
  image's ground-truth captions;
- image -> text: `{"rank": 1, "caption": ..., "score": ..., "image_id": ...}`, the id of
  the image the caption belongs to.

The gallery is the split `config.data.test_split` of the workdir's config (or `--split`),
read with `data.load_split` and encoded once by `inference.load(workdir)`, a matcher of
any model family: a query is encoded once and scored against the gallery's reps with the
model's own `score` (a dot product for DSRAN, cross attention for SCAN, ...). Image and
caption reps are cached in `{workdir}/gallery_{split}.npz` together with a fingerprint
(checkpoint step and meta, model config, split name and size, a checksum of its ids and
captions), so a new checkpoint or a changed split rebuilds the cache instead of serving
stale results. The cache also holds a checksum of its arrays (`integrity.arrays_digest`),
and a first-stage index's description the checksum of the index file: a damaged cache
or index is rebuilt, with a warning naming it.

Other flags: `--split` (another split), `--data_root` (the features moved since training),
`--rebuild` (re-encode), `--nocache`. An unknown `--image_id` exits with status 2 and a
message naming it and a few valid ids, before the model is loaded.

Two-stage search (`--shortlist_workdir=DSRAN_DIR [--shortlist_k=100] [--fusion=0]
[--index=exact|ivf|hnsw]`): the embedding model of the shortlist workdir (same dataset and
split, checked) finds each query's K best items through a first-stage index
(`dsran_jax.index`: exact inner product by default, faiss when installed, else numpy; IVF
or HNSW only when asked, their recall against exact search printed when built; saved as
`{shortlist_workdir}/gallery_{split}.{images|texts}.{kind}.faiss` and rebuilt when the
gallery changes), and `--workdir`'s model (e.g. SCAN) scores only those K pairs
(`ModelScorer.score_candidates`). Hits then also carry `first_stage_score` and `stage`
(2: re-scored; 1: past the short list, in the first stage's order).

From Python (notebooks):

    gallery = search.Gallery.load(workdir)
    hits = search.search_text(gallery, "a dog on the beach", top_k=5)
    hits = search.search_image(gallery, gallery.image_ids[0], top_k=5)
    print(search.format_hits(hits))
    first = search.Shortlist(search.Gallery.load(dsran_workdir), k=100)
    hits = search.search_text(gallery, "a dog on the beach", top_k=5, shortlist=first)
"""
import hashlib
import json
import os
import sys
import time
import types
import zlib
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from dsran_jax import atomic, cli, data, index as index_lib, inference, integrity
from dsran_jax.evaluation import two_stage
from dsran_jax.evaluation.shortlist import check_fusion, check_k, order_query
from dsran_jax.workdir import Workdir

CACHE_VERSION = 3  # 3: the cache holds a checksum of its arrays
CACHE_CHECKSUM = "checksum"


class UnknownImageError(KeyError):
  """An image id that the gallery does not hold (the message names a few that it does)."""

  def __str__(self):  # KeyError would show the message quoted
    return str(self.args[0]) if self.args else ""


def unknown_image_message(image_id, split_name: str, image_ids: Sequence[str]) -> str:
  """The error for an id that split `split_name` (with ids `image_ids`) does not hold."""
  examples = ", ".join(repr(str(i)) for i in list(image_ids)[:3])
  return (f"unknown image id {str(image_id)!r}: split {split_name!r} has {len(image_ids)} "
          f"images, with ids such as {examples}")


def cache_path(workdir: str, split_name: str) -> str:
  """Where the gallery embeddings of a split are cached."""
  return Workdir(workdir).gallery_file(split_name)


SIDES = ("images", "texts")


def index_path(workdir: str, split_name: str, side: str, kind: str) -> str:
  """Where the first-stage index of one side of a split's gallery is saved (faiss file;
  its description is the same path + ".json")."""
  return Workdir(workdir).index_file(split_name, side, kind)


def _describe_reps(reps) -> str:
  return ", ".join(f"{np.shape(x)} {np.asarray(x).dtype}" for x in jax.tree.leaves(reps)) \
      if not isinstance(reps, np.ndarray) else f"{reps.shape} {reps.dtype}"


def _content_checksum(image_ids: Sequence[str], texts: Sequence[str]) -> str:
  # crc32 streams in chunks: COCO's 25k captions stay cheap and nothing big is built.
  crc = 0
  for chunk in (image_ids, texts):
    for s in chunk:
      crc = zlib.crc32(str(s).encode("utf-8") + b"\n", crc)
  return f"{crc:08x}"


def fingerprint(meta: Dict[str, Any], split, model_config) -> Dict[str, Any]:
  """What the cached reps depend on: the checkpoint, the model and the split's content."""
  # The meta (step, rsum, source file) tells a retrained or re-converted checkpoint apart
  # even when it stops at the same step; the model config one edited in config.json.
  digest = lambda x: hashlib.sha1(json.dumps(x, sort_keys=True, default=str).encode()
                                  ).hexdigest()[:16]
  return {"version": CACHE_VERSION, "checkpoint_step": meta.get("step"),
          "checkpoint_meta": digest(meta), "model": digest(model_config.to_dict()),
          "split": split.name, "num_images": int(split.num_images),
          "num_captions": int(split.num_captions),
          "content": _content_checksum(split.image_ids, split.texts)}


def _flatten(prefix: str, reps) -> Dict[str, np.ndarray]:
  """{"image/a/b": array} of reps that are an array or nested dicts of arrays."""
  if isinstance(reps, dict):
    out = {}
    for k, v in reps.items():
      out.update(_flatten(f"{prefix}/{k}", v))
    return out
  return {prefix: np.asarray(reps)}


def _unflatten(prefix: str, arrays: Dict[str, np.ndarray]):
  if prefix in arrays:
    return arrays[prefix]
  out = {}
  for key, value in arrays.items():
    if key.startswith(prefix + "/"):
      node = out
      *parents, leaf = key[len(prefix) + 1:].split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
  if not out:
    raise KeyError(f"no {prefix} reps")
  return out


def _read_cache(path: str, want: Dict[str, Any]):
  """(image_reps, text_reps) if `path` holds reps of fingerprint `want`, else None.

  Every array is read and checked against the checksum written with them before the
  fingerprint is compared: a damaged cache (a flipped bit, a truncated file) is a miss
  with a warning naming it, so the caller rebuilds it; a stale one is a quiet miss.
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except Exception as e:  # pylint: disable=broad-except  # any unreadable file: rebuild
    logging.warning("gallery cache %s is damaged (%s); rebuilding it", path,
                    (str(e).splitlines() or [type(e).__name__])[0][:200])
    return None
  if CACHE_CHECKSUM not in arrays or "fingerprint" not in arrays:
    logging.info("gallery cache %s was written before checksums were; rebuilding it", path)
    return None
  stored = str(arrays.pop(CACHE_CHECKSUM))
  if integrity.arrays_digest(arrays) != stored:
    logging.warning("gallery cache %s is damaged (its arrays differ from the checksum "
                    "written with them); rebuilding it", path)
    return None
  if json.loads(str(arrays["fingerprint"])) != want:
    return None
  return _unflatten("image", arrays), _unflatten("text", arrays)


def _write_cache(path: str, image_reps, text_reps, fp: Dict[str, Any]) -> None:
  arrays = {**_flatten("image", image_reps), **_flatten("text", text_reps),
            "fingerprint": np.asarray(json.dumps(fp, sort_keys=True))}
  atomic.save_npz(path, **arrays,
                  **{CACHE_CHECKSUM: np.asarray(integrity.arrays_digest(arrays))})


def _concat(parts):
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def encode_split_images(encoder, split, batch_size: Optional[int] = None):
  """Reps of every image of `split`, read `batch_size` at a time."""
  bs = int(batch_size or encoder.batch_size)
  keys = encoder.model.image_keys
  out = []
  t0 = time.time()
  for start in range(0, split.num_images, bs):
    idx = np.arange(start, min(start + bs, split.num_images))
    arrays = split.images(idx)
    out.append(encoder.encode_images(**{k: arrays[k] for k in keys if k in arrays}))
    logging.log_every_n_seconds(logging.INFO, "encoded %d/%d images", 10,
                                start + len(idx), split.num_images)
  logging.info("encoded %d images in %.1fs", split.num_images, time.time() - t0)
  return _concat(out)


def encode_split_texts(encoder, split):
  """Reps of the split's captions, tokenised as `load_split` did (the ids evaluation
  uses, so gallery scores equal the evaluation's sims)."""
  return encoder.encode_texts(input_ids=split.input_ids, attention_mask=split.attention_mask)


def _take(reps, rows):
  return jax.tree.map(lambda x: x[rows], reps)


class Gallery:
  """A split's images and captions with their reps, ready to search.

  Attributes:
    split_name: the split's name.
    image_ids: one id per image.
    texts: captions, `captions_per_image` consecutive ones per image.
    captions_per_image: captions per image (5 for the standard releases).
    image_reps: the model's reps of every image (DSRAN: float32 (num_images, E)).
    text_reps: the model's reps of every caption.
    encoder: the `inference.Matcher` that made them (encodes queries, scores), or None.
    split: the `data.Split` (reads image features, e.g. for attention maps), or None.
    from_cache: whether the reps were read from the cache file.
    workdir: where the cache (and the indexes built by `index`) live, or None.
    fingerprint: what the reps depend on (`fingerprint`), or None.
  """

  def __init__(self, split_name: str, image_ids: Sequence[str], texts: Sequence[str],
               captions_per_image: int, image_reps, text_reps, encoder=None, split=None,
               from_cache: bool = False, workdir: Optional[str] = None,
               fingerprint: Optional[Dict[str, Any]] = None):
    if len(texts) != len(image_ids) * captions_per_image:
      raise ValueError(f"{len(texts)} captions for {len(image_ids)} images at "
                       f"{captions_per_image} per image")
    n_img = {int(np.shape(x)[0]) for x in jax.tree.leaves(image_reps)}
    n_txt = {int(np.shape(x)[0]) for x in jax.tree.leaves(text_reps)}
    if n_img != {len(image_ids)} or n_txt != {len(texts)}:
      raise ValueError(f"reps of {sorted(n_img)} images / {sorted(n_txt)} captions do not "
                       f"match {len(image_ids)} images / {len(texts)} captions")
    self.split_name = split_name
    self.image_ids = list(image_ids)
    self.texts = list(texts)
    self.captions_per_image = int(captions_per_image)
    self.image_reps = image_reps
    self.text_reps = text_reps
    self.encoder = encoder
    self.split = split
    self.from_cache = from_cache
    self.workdir = workdir
    self.fingerprint = fingerprint
    self._index = None
    self._indexes = {}

  @classmethod
  def load(cls, workdir: str, split: Optional[str] = None, encoder=None,
           config=None, use_cache: bool = True, rebuild: bool = False,
           batch_size: Optional[int] = None) -> "Gallery":
    """The gallery of a workdir's split, from the cache when it is up to date.

    Args:
      workdir: a dsran_jax workdir (trained, or converted by `tools.convert_torch`).
      split: split name; default `config.data.test_split`.
      encoder: an `inference.Matcher` of this workdir (default: `inference.load(workdir)`).
      config: the config whose `data` section locates the split (default: the workdir's
        config.json; pass one to point at data that has moved, e.g. a new `data.root`).
      use_cache: read and write `{workdir}/gallery_{split}.npz`.
      rebuild: re-encode even if the cache is up to date (and rewrite it).
      batch_size: images read and encoded at a time (default: the encoder's).
    """
    if encoder is None:
      encoder = inference.load(workdir)
    if config is None:
      config = encoder.config
    split_name = split or config.data.test_split
    ds = data.load_split(config, split_name, workdir)
    fp = fingerprint(encoder.meta, ds, encoder.config.model)
    path = cache_path(workdir, split_name)
    cached = _read_cache(path, fp) if use_cache and not rebuild else None
    if cached is not None:
      logging.info("gallery %s: %d images, %d captions from %s", split_name,
                   ds.num_images, ds.num_captions, path)
      image_reps, text_reps = cached
    else:
      logging.info("gallery %s: encoding %d images and %d captions", split_name,
                   ds.num_images, ds.num_captions)
      image_reps = encode_split_images(encoder, ds, batch_size)
      text_reps = encode_split_texts(encoder, ds)
      if use_cache:
        try:
          _write_cache(path, image_reps, text_reps, fp)
        except OSError as e:  # a read-only workdir still searches, just uncached
          logging.warning("could not write the gallery cache %s: %s", path, e)
    return cls(split_name, ds.image_ids, ds.texts, ds.captions_per_image, image_reps,
               text_reps, encoder=encoder, split=ds, from_cache=cached is not None,
               workdir=workdir if use_cache else None, fingerprint=fp)

  @property
  def num_images(self) -> int:
    return len(self.image_ids)

  @property
  def num_captions(self) -> int:
    return len(self.texts)

  def captions_of(self, image_index: int) -> List[str]:
    """The ground-truth captions of image `image_index`."""
    k = self.captions_per_image
    return self.texts[image_index * k:(image_index + 1) * k]

  def index_of(self, image_id) -> int:
    """Row of `image_id`; raises `UnknownImageError` naming a few valid ids."""
    if self._index is None:
      self._index = {str(i): n for n, i in enumerate(self.image_ids)}
    key = str(image_id)
    if key not in self._index:
      raise UnknownImageError(unknown_image_message(key, self.split_name, self.image_ids))
    return self._index[key]

  def _matcher(self):
    if self.encoder is None:
      raise ValueError("this Gallery has no matcher to encode queries and score with")
    return self.encoder

  def sims(self) -> np.ndarray:
    """(num_images, num_captions) scores (the evaluation's sims matrix)."""
    return self._matcher().score(self.image_reps, self.text_reps)

  def encode_query(self, text: str):
    """Reps of one query sentence (leading dim 1)."""
    return self._matcher().encode_texts([text])

  def text_scores(self, query: str) -> np.ndarray:
    """(num_images,) scores of every gallery image for the query sentence."""
    return self._matcher().score(self.image_reps, self.encode_query(query))[:, 0]

  def image_scores(self, row: int) -> np.ndarray:
    """(num_captions,) scores of every gallery caption for image `row`."""
    return self._matcher().score(_take(self.image_reps, slice(row, row + 1)),
                                 self.text_reps)[0]

  # ------------------------------------------------------- first-stage indexes

  def embeddings(self, side: str) -> np.ndarray:
    """The (N, E) float embeddings of `side` ("images" | "texts"); a ValueError when the
    model's reps are not one embedding per item (a cross-attention model's are not)."""
    if side not in SIDES:
      raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    reps = self.image_reps if side == "images" else self.text_reps
    if not (isinstance(reps, np.ndarray) and reps.ndim == 2
            and np.issubdtype(reps.dtype, np.floating)):
      raise ValueError(f"gallery {self.split_name}: the model's {side} reps are not one "
                       f"embedding per item (got {_describe_reps(reps)}); only an embedding "
                       f"model (e.g. DSRAN) can shortlist through an index")
    return reps

  def check_inner_product(self, rows: int = 8, rtol: float = 1e-4) -> None:
    """Raises ValueError unless the model's score of a few gallery pairs is the inner
    product of their embeddings (what an index ranks by)."""
    img, txt = self.embeddings("images")[:rows], self.embeddings("texts")[:rows]
    got = np.asarray(self._matcher().score(img, txt), np.float64)
    want = img.astype(np.float64) @ txt.astype(np.float64).T
    err = float(np.max(np.abs(got - want)))
    if err > rtol * max(1.0, float(np.max(np.abs(want)))):
      raise ValueError(f"gallery {self.split_name}: the model's score is not the inner "
                       f"product of its reps (max difference {err:.3g} on {rows} x {rows} "
                       f"pairs), so an inner-product index cannot shortlist for it")

  def index(self, side: str, kind: str = "exact", use_cache: bool = True,
            rebuild: bool = False, recall_queries: int = 1000, **params):
    """The first-stage `index.Index` over `side`'s embeddings ("images": searched by
    caption queries, "texts": by image queries), built on first use.

    With faiss installed (`pip install -e ".[index]"`) it is saved next to the gallery
    cache (`index_path`) and reused while its fingerprint (this gallery's, plus the
    embeddings' checksum and the index settings) still matches; a stale one is rebuilt.
    Without faiss, "exact" is numpy's blocked search (nothing to save) and the
    approximate kinds are an error. Approximate indexes measure their recall@10 against
    exact search on up to `recall_queries` embeddings of the other side when built.
    `params`: `index.build`'s (nlist, nprobe, hnsw_m, ef_construction, ef_search).
    """
    key = (side, kind, tuple(sorted(params.items())))
    if key in self._indexes and not rebuild:
      return self._indexes[key]
    items = self.embeddings(side)
    self.check_inner_product()
    other = self.embeddings("texts" if side == "images" else "images")
    queries = other[np.linspace(0, len(other) - 1, min(recall_queries, len(other))).astype(int)]
    extra = {"gallery": self.fingerprint, "side": side}
    built = None
    path = None
    if use_cache and self.workdir and index_lib.have_faiss():
      path = index_path(self.workdir, self.split_name, side, kind)
      if not rebuild:
        try:
          built = index_lib.load(path, expect=index_lib.expected_fingerprint(
              items, kind, extra, **params))
          logging.info("index %s of gallery %s (%s) from %s", kind, self.split_name, side,
                       path)
        except FileNotFoundError:
          built = None
        except (index_lib.StaleIndexError, index_lib.DamagedIndexError) as e:
          logging.warning("%s; rebuilding it", e)  # a cache: damaged or stale, rebuilt
          built = None
    if built is None:
      built = index_lib.build(items, kind, fingerprint=extra, recall_queries=queries,
                              **params)
      if path is not None:
        try:
          built.save(path)
        except OSError as e:  # a read-only workdir still searches, just unsaved
          logging.warning("could not save the index %s: %s", path, e)
    self._indexes[key] = built
    return built


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores, ties broken by index (as `ranking` does)."""
  k = max(0, min(int(k), scores.shape[0]))
  # Stable sort of the negated scores: equal scores keep index order.
  return np.argsort(-scores, kind="stable")[:k]


def _check_top_k(top_k: int) -> None:
  if int(top_k) < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")


class Shortlist:
  """The first stage of a two-stage search: an embedding model's gallery of the same
  split, searched through an index, whose top `k` the re-ranking gallery re-scores.

  Args:
    gallery: the first stage's `Gallery` (an embedding model, e.g. a DSRAN workdir's).
    k: candidates re-scored per query (>= 1).
    fusion: w in [0, 1]; the short list is ordered by `(1 - w) * second + w * first`.
    index_kind: "exact" (default), "ivf" or "hnsw" (see `dsran_jax.index`).
    index_params: `index.build`'s settings (nlist, nprobe, hnsw_m, ef_search, ...).
  """

  def __init__(self, gallery: "Gallery", k: int = 100, fusion: float = 0.0,
               index_kind: str = "exact", **index_params):
    self.gallery = gallery
    self.k = check_k(k)
    self.fusion = check_fusion(fusion)
    self.index_kind = index_kind
    self.index_params = index_params

  def index(self, side: str):
    """The index over the first stage's `side` embeddings (built or loaded on first use)."""
    return self.gallery.index(side, self.index_kind, **self.index_params)


def check_same_gallery(gallery: "Gallery", first: "Gallery") -> None:
  """Raises ValueError unless both galleries hold one split's images and captions."""
  where = lambda g: f"{g.split_name!r} of {g.workdir or 'an uncached gallery'}"
  if gallery.split_name != first.split_name:
    raise ValueError(f"the shortlist gallery is split {where(first)}, the re-ranking "
                     f"gallery split {where(gallery)}: the two stages must search one split")
  for what, a, b in (("image ids", gallery.image_ids, first.image_ids),
                     ("captions", gallery.texts, first.texts)):
    if list(map(str, a)) != list(map(str, b)):
      raise ValueError(f"the shortlist gallery {where(first)} and the re-ranking gallery "
                       f"{where(gallery)} hold different {what} ({len(b)} vs {len(a)}): "
                       f"another dataset or split")


def _check_rescorer(gallery: "Gallery") -> None:
  note = getattr(getattr(gallery.encoder, "model", None), "partner_conditioning", None)
  if note:
    raise ValueError(f"{note}: it cannot re-score a query's short list (the query has no "
                     f"ground-truth partner in the gallery)")


def _hit_extra(score: float, first: float, stage: int) -> Dict[str, Any]:
  return {"score": round(score, 6), "first_stage_score": round(first, 6), "stage": stage}


def search_text(gallery: Gallery, query: str, top_k: int = 5,
                shortlist: Optional[Shortlist] = None) -> List[Dict[str, Any]]:
  """Text -> image: the `top_k` gallery images closest to `query`.

  With a `shortlist`, its embedding model finds the query's `shortlist.k` best images
  through its index, and only those are scored by `gallery`'s model (K pairs, whatever
  the gallery size); hits past K follow the first stage's order.

  Returns:
    `[{"rank", "image_id", "score", "captions"}]`, best first (rank 1), `captions` the
    image's ground-truth captions; with a shortlist also `first_stage_score` and `stage`
    (2: re-scored, 1: first stage only).
  """
  _check_top_k(top_k)
  if not isinstance(query, str) or not query.strip():
    raise ValueError(f"query must be a non-empty string, got {query!r}")
  if shortlist is None:
    scores = gallery.text_scores(query)
    return [{"rank": r + 1, "image_id": str(gallery.image_ids[i]),
             "score": round(float(scores[i]), 6), "captions": gallery.captions_of(int(i))}
            for r, i in enumerate(_top_k(scores, top_k))]
  check_same_gallery(gallery, shortlist.gallery)
  _check_rescorer(gallery)
  q1 = np.asarray(shortlist.gallery.encode_query(query))
  s1, ids = shortlist.index("images").search(q1, max(shortlist.k, top_k))
  k = min(shortlist.k, ids.shape[1])
  second = gallery._matcher().scorer().score_candidates(  # pylint: disable=protected-access
      gallery.image_reps, gallery.encode_query(query), ids[:, :k], queries="texts",
      on_device=False)
  ranked = order_query(s1[0], ids[0], second[0], k, shortlist.fusion)[:top_k]
  return [{"rank": r + 1, "image_id": str(gallery.image_ids[i]), **_hit_extra(v, f, st),
           "captions": gallery.captions_of(i)} for r, (i, v, f, st) in enumerate(ranked)]


def search_image(gallery: Gallery, image_id, top_k: int = 5,
                 shortlist: Optional[Shortlist] = None) -> List[Dict[str, Any]]:
  """Image -> text: the `top_k` gallery captions closest to image `image_id`.

  With a `shortlist`, as `search_text`: the first stage's `shortlist.k` best captions
  of the image (its embedding searched in the caption index) are re-scored.

  Returns:
    `[{"rank", "caption", "score", "image_id"}]`, best first, `image_id` being the image
    the caption belongs to (equal to the query's when the model retrieves its own); with
    a shortlist also `first_stage_score` and `stage`.
  Raises:
    UnknownImageError: the gallery has no image `image_id`.
  """
  _check_top_k(top_k)
  row = gallery.index_of(image_id)
  cpi = gallery.captions_per_image
  if shortlist is None:
    scores = gallery.image_scores(row)
    return [{"rank": r + 1, "caption": gallery.texts[c], "score": round(float(scores[c]), 6),
             "image_id": str(gallery.image_ids[c // cpi])}
            for r, c in enumerate(_top_k(scores, top_k))]
  check_same_gallery(gallery, shortlist.gallery)
  _check_rescorer(gallery)
  q1 = shortlist.gallery.embeddings("images")[row:row + 1]
  s1, ids = shortlist.index("texts").search(q1, max(shortlist.k, top_k))
  k = min(shortlist.k, ids.shape[1])
  second = gallery._matcher().scorer().score_candidates(  # pylint: disable=protected-access
      gallery.image_reps, gallery.text_reps, ids[:, :k], queries="images",
      query_rows=np.asarray([row]), on_device=False)
  ranked = order_query(s1[0], ids[0], second[0], k, shortlist.fusion)[:top_k]
  return [{"rank": r + 1, "caption": gallery.texts[c], **_hit_extra(v, f, st),
           "image_id": str(gallery.image_ids[c // cpi])}
          for r, (c, v, f, st) in enumerate(ranked)]


def format_hits(hits: List[Dict[str, Any]], max_captions: int = 5) -> str:
  """A readable text block of `search_text` / `search_image` hits (for notebooks)."""
  lines = []
  for h in hits:
    if "captions" in h:
      lines.append(f"{h['rank']:>3}. {h['image_id']}  score {h['score']:.4f}")
      lines += [f"       - {c}" for c in h["captions"][:max_captions]]
    else:
      lines.append(f"{h['rank']:>3}. {h['score']:.4f}  {h['caption']}  [{h['image_id']}]")
  return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  f = types.SimpleNamespace(
      workdir=flags.DEFINE_string("workdir", None,
                                  "A dsran_jax workdir (trained or converted)."),
      query=flags.DEFINE_string("query", None, "Text -> image: the sentence to search for."),
      image_id=flags.DEFINE_string("image_id", None,
                                   "Image -> text: the id of a gallery image."),
      top_k=flags.DEFINE_integer("top_k", 5, "Number of hits to print."),
      split=flags.DEFINE_string("split", "",
                                "Gallery split (default: config.data.test_split)."),
      data_root=flags.DEFINE_string("data_root", "", "Override config.data.root (data moved "
                                    "since training)."),
      rebuild=flags.DEFINE_bool("rebuild", False,
                                "Re-encode the gallery even if the cache is fresh."),
      cache=flags.DEFINE_bool("cache", True, "Read/write {workdir}/gallery_{split}.npz."),
      shortlist_workdir=flags.DEFINE_string(
          "shortlist_workdir", "", "Two-stage search: the workdir of an embedding model "
          "(e.g. DSRAN) that shortlists through an index; --workdir's model re-scores the "
          "short list."),
      shortlist_k=flags.DEFINE_integer("shortlist_k", 100, "Candidates re-scored per query."),
      fusion=flags.DEFINE_float("fusion", 0.0, "Weight w of the first stage's score: the "
                                "short list is ordered by (1 - w) * second + w * first."),
      index=flags.DEFINE_enum("index", "exact", ["exact", "ivf", "hnsw"], "First-stage "
                              "index: exact inner product (faiss when installed, else "
                              "numpy), or approximate (needs faiss: pip install -e "
                              "'.[index]')."),
      index_nlist=flags.DEFINE_integer("index_nlist", 0, "IVF cells (0: 4 sqrt(N))."),
      index_nprobe=flags.DEFINE_integer("index_nprobe", 0,
                                        "IVF cells searched (0: nlist / 16)."),
      index_hnsw_m=flags.DEFINE_integer("index_hnsw_m", 32, "HNSW links per node."),
      index_ef_search=flags.DEFINE_integer("index_ef_search", 64,
                                           "HNSW candidates explored per query."),
  )
  flags.mark_flags_as_required(["workdir"])
  return f


def _shortlist_config(f, config, split_name: str):
  """The shortlist workdir's config, checked to be of this dataset and split (before
  any gallery is encoded: a wrong workdir fails in a second)."""
  sl_dir = f.shortlist_workdir.value
  try:
    sl_config = Workdir(sl_dir).load_config()
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"--shortlist_workdir: {cli.error_message(e)}") from e
  two_stage.check_shortlist_config(config, split_name, sl_config, sl_dir)
  return sl_config


def _load_shortlist(f, config, split_name: str, sl_config) -> Shortlist:
  """The CLI's first stage: the shortlist workdir's gallery of the same split, and its
  index settings."""
  sl_dir = f.shortlist_workdir.value
  first = Gallery.load(sl_dir, split_name, encoder=inference.load(sl_dir),
                       config=two_stage.shortlist_data_config(config, sl_config),
                       use_cache=f.cache.value, rebuild=f.rebuild.value)
  params = {"ivf": {"nlist": f.index_nlist.value, "nprobe": f.index_nprobe.value},
            "hnsw": {"hnsw_m": f.index_hnsw_m.value, "ef_search": f.index_ef_search.value},
            "exact": {}}[f.index.value]
  return Shortlist(first, f.shortlist_k.value, f.fusion.value, f.index.value, **params)


def _k_note(shortlist: Shortlist, gallery: Gallery, text_query: bool) -> str:
  """"K=100", or "K=4000 capped at the 10 images of the gallery"."""
  n, what = ((gallery.num_images, "images") if text_query
             else (gallery.num_captions, "captions"))
  return (f"K={shortlist.k}" if shortlist.k <= n
          else f"K={shortlist.k} capped at the {n} {what} of the gallery")


def main(argv):
  """Entry point of `python -m dsran_jax.search`."""
  f = _FLAGS
  query, image_id, top_k = f.query.value, f.image_id.value, f.top_k.value
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (query is None) == (image_id is None):
    raise app.UsageError("give exactly one of --query (text -> image) or --image_id "
                         "(image -> text)")
  if top_k < 1:
    raise app.UsageError(f"--top_k must be >= 1, got {top_k}")
  if f.shortlist_k.value < 1:
    raise app.UsageError(f"--shortlist_k must be >= 1, got {f.shortlist_k.value}")
  if not 0.0 <= f.fusion.value <= 1.0:
    raise app.UsageError(f"--fusion must be in [0, 1], got {f.fusion.value}")
  if not flags.FLAGS["verbosity"].present:
    # stdout carries the hits; keep stderr to warnings (orbax logs every restore at INFO).
    logging.set_verbosity(logging.WARNING)
  workdir = f.workdir.value
  try:
    config = Workdir(workdir).load_config()
  except (FileNotFoundError, ValueError) as e:
    cli.fail(cli.error_message(e))
  if f.data_root.value:
    config.data.root = f.data_root.value
  split_name = f.split.value or config.data.test_split
  if image_id is not None:
    # Checked on the split's ids before the model is loaded: a typo fails in a second.
    ids = [str(i) for i in data.read_raw_split(config, split_name).image_ids]
    if str(image_id) not in set(ids):
      cli.fail(unknown_image_message(image_id, split_name, ids))
  shortlist = None
  try:
    sl_config = (_shortlist_config(f, config, split_name) if f.shortlist_workdir.value
                 else None)
    encoder = inference.load(workdir)
    t0 = time.time()
    gallery = Gallery.load(workdir, split_name, encoder=encoder, config=config,
                           use_cache=f.cache.value, rebuild=f.rebuild.value)
    how = (f"cached in {cache_path(workdir, split_name)}" if gallery.from_cache
           else f"encoded in {time.time() - t0:.1f}s")
    print(f"gallery {split_name}: {gallery.num_images} images, {gallery.num_captions} "
          f"captions ({how})", file=sys.stderr)
    if sl_config is not None:
      shortlist = _load_shortlist(f, config, split_name, sl_config)
    t0 = time.time()
    if query is not None:
      hits = search_text(gallery, query, top_k, shortlist=shortlist)
    else:
      hits = search_image(gallery, image_id, top_k, shortlist=shortlist)
  except (UnknownImageError, ValueError, ImportError) as e:
    # (a workdir without its vocab.json fails in the tokenizer with a ValueError)
    cli.fail(cli.error_message(e))
  print(f"answered in {1000 * (time.time() - t0):.1f} ms"
        + (f" ({_k_note(shortlist, gallery, query is not None)}, {shortlist.index_kind} "
           "index; the first query of a process includes compiling)" if shortlist else ""),
        file=sys.stderr)
  for h in hits:
    print(json.dumps(h, ensure_ascii=False))
  sys.stdout.flush()


if __name__ == "__main__":
  _FLAGS = _define_flags()
  cli.run_cli(main)  # user errors: one `error:` line, exit 2

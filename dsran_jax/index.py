"""Nearest-neighbour indexes over a gallery's embeddings: the first stage of search.

    idx = index.build(image_embeddings)                    # exact inner product
    idx = index.build(image_embeddings, kind="hnsw",       # approximate, when asked
                      recall_queries=caption_embeddings)   # recall vs exact, printed
    scores, ids = idx.search(query_embeddings, k=100)      # (Q, k) each, best first

Kinds (`KINDS`):
- "exact": every item scored, `queries @ items.T`. With faiss installed
  (`pip install -e ".[index]"`) a `faiss.IndexFlatIP`; without it numpy, in blocks of
  `NUMPY_BLOCK` items, so a memory-mapped gallery never has to be read whole.
- "ivf": `faiss.IndexIVFFlat` (inner product): `nlist` k-means cells, `nprobe` searched.
- "hnsw": `faiss.IndexHNSWFlat` (inner product): graph of `hnsw_m` links per node,
  `ef_search` candidates explored per query.
The approximate kinds need faiss; asking for one without it is an error saying how to
install it. Their recall@k against exact search is measured at build time on the
queries given (`recall_queries`, e.g. the other side's embeddings) and printed.

Every result row is ordered by score, ties by item index (the `ranking` rule); which of
several items tied at the k-th score make the cut is up to faiss.

An index is saved as `PATH` (faiss's own file) plus `PATH.json` holding its settings,
recall and a fingerprint of the embeddings it was built from (count, width, checksum)
and of whatever the caller adds (the gallery's checkpoint and split); `load` with an
expected fingerprint raises `StaleIndexError` naming what changed, and
`search.Gallery.index` then rebuilds it.

What is read back is what was written: the description records the size and sha256 of
the faiss file's bytes and is sealed by a checksum of its own content
(`dsran_jax.integrity`); `load` checks both before faiss reads a byte, and a flipped bit
in either is a `DamagedIndexError` naming the file (a cache, such as search's, is then
rebuilt; an index the caller saved is refused).
"""
import json
import os
import sys
import time
import zlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

from dsran_jax import atomic, integrity, ranking

KINDS = ("exact", "ivf", "hnsw")
FORMAT_VERSION = 1
NUMPY_BLOCK = 1 << 16   # gallery rows per block of the numpy exact search


class StaleIndexError(ValueError):
  """A saved index was built from other embeddings or with other settings."""


class DamagedIndexError(integrity.IntegrityError):
  """A saved index or its description differs from the bytes written (names the file)."""


def have_faiss() -> bool:
  """Whether the optional faiss extra is installed."""
  try:
    import faiss  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _faiss(what: str):
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{what} needs faiss: pip install -e \".[index]\" (or pip install "
                      f"faiss-cpu)") from e
  return faiss


def _as_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} must be a float (N, dim) array, got shape {x.shape} dtype "
                     f"{x.dtype}")
  return x


def embeddings_fingerprint(embeddings) -> Dict[str, Any]:
  """Count, width and a crc32 of the embeddings' float32 bytes (read in blocks)."""
  x = _as_matrix(embeddings, "embeddings")
  crc = 0
  for o in range(0, x.shape[0], NUMPY_BLOCK):
    crc = zlib.crc32(np.ascontiguousarray(x[o:o + NUMPY_BLOCK], np.float32).data, crc)
  return {"num_items": int(x.shape[0]), "dim": int(x.shape[1]), "crc32": f"{crc:08x}"}


def _order(scores: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Rows re-ordered by score descending, ties by id ascending (-1 ids, faiss's 'no
  result', last)."""
  key_missing = ids < 0
  order = np.lexsort((ids, -scores.astype(np.float64), key_missing), axis=1)
  return (np.take_along_axis(scores, order, 1).astype(np.float32),
          np.take_along_axis(ids, order, 1).astype(np.int64))


def numpy_search(items, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product in blocks of NUMPY_BLOCK items: (scores, ids) (Q, k),
  best first, ties by index."""
  items = _as_matrix(items, "items")
  queries = _as_matrix(queries, "queries").astype(np.float32, copy=False)
  k = min(int(k), items.shape[0])
  best_s = np.zeros((queries.shape[0], 0), np.float32)
  best_i = np.zeros((queries.shape[0], 0), np.int64)
  for o in range(0, items.shape[0], NUMPY_BLOCK):
    s = queries @ np.asarray(items[o:o + NUMPY_BLOCK], np.float32).T
    # Each block's own top k in the (score desc, index asc) order holds every item of the
    # block that belongs to the overall top k, so merging them is exact.
    top = ranking.topk_stable(s, min(k, s.shape[1]))
    merged_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
    merged_i = np.concatenate([best_i, top + o], 1)
    best_s, best_i = _order(merged_s, merged_i)
    best_s, best_i = best_s[:, :k], best_i[:, :k]
  return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Mean fraction of each exact top-k found by the approximate search."""
  k = exact_ids.shape[1]
  hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids)]
  return float(np.mean(hits)) / k if hits else float("nan")


class Index:
  """A built (or loaded) index; see the module docstring.

  Attributes:
    kind: "exact" | "ivf" | "hnsw".
    backend: "faiss" or "numpy".
    params: the kind's settings (nlist, nprobe, hnsw_m, ef_construction, ef_search).
    fingerprint: what it was built from (`embeddings_fingerprint` plus the caller's).
    recall: {"k", "queries", "recall"} measured against exact search, or None.
    build_s: seconds to build (None when loaded).
  """

  def __init__(self, kind: str, backend: str, params: Dict[str, Any],
               fingerprint: Dict[str, Any], items=None, faiss_index=None,
               recall: Optional[Dict[str, Any]] = None, build_s: Optional[float] = None):
    self.kind, self.backend, self.params = kind, backend, dict(params)
    self.fingerprint = dict(fingerprint)
    self.items = items
    self.faiss_index = faiss_index
    self.recall = recall
    self.build_s = build_s

  @property
  def num_items(self) -> int:
    return int(self.fingerprint["num_items"])

  @property
  def dim(self) -> int:
    return int(self.fingerprint["dim"])

  @property
  def nbytes(self) -> int:
    """Bytes the index holds beyond the embeddings a numpy index points to."""
    if self.faiss_index is None:
      return 0
    faiss = _faiss("nbytes")
    return int(faiss.serialize_index(self.faiss_index).nbytes)

  def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(scores float32 (Q, k), ids int64 (Q, k)) of the k best items per query, best first
    (ties by index); k is capped at the number of items."""
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != self.dim:
      raise ValueError(f"queries have width {queries.shape[1]}, the index {self.dim} "
                       f"({self.kind}, {self.num_items} items)")
    if int(k) < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), self.num_items)
    if self.backend == "numpy":
      return numpy_search(self.items, queries, k)
    scores, ids = self.faiss_index.search(np.ascontiguousarray(queries, np.float32), k)
    return _order(scores, ids)

  def describe(self) -> Dict[str, Any]:
    """Settings, fingerprint and recall as JSON-able data (the `.json` sidecar, which
    `save` adds the faiss file's checksum to and seals)."""
    faiss_version = None
    if self.backend == "faiss":
      faiss_version = _faiss("describe").__version__
    return {"version": FORMAT_VERSION, "kind": self.kind, "backend": self.backend,
            "faiss": faiss_version, "params": self.params,
            "fingerprint": self.fingerprint, "recall": self.recall, "build_s": self.build_s}

  def save(self, path: str) -> None:
    """Writes a faiss index to `path` and its description to `path.json` (atomically; a
    numpy index has nothing to save but the description)."""
    description = self.describe()
    if self.backend == "faiss":
      faiss = _faiss("saving an index")
      with atomic.replacing_path(path) as tmp:
        faiss.write_index(self.faiss_index, tmp)
        # Hashed from the temporary file: the checksum is of the bytes that are renamed.
        description["file"] = integrity.file_record(tmp)
    atomic.write_json(path + ".json", integrity.seal(description), sort_keys=True)


def settings(kind: str, n: int, nlist: int = 0, nprobe: int = 0, hnsw_m: int = 32,
             ef_construction: int = 80, ef_search: int = 64) -> Dict[str, Any]:
  """The resolved settings of a `kind` index of n items (see `build`)."""
  if kind not in KINDS:
    raise ValueError(f"index kind {kind!r}: expected one of {KINDS}")
  if kind == "ivf":
    # faiss warns below 39 training points per cell; 4 sqrt(N) cells is its usual choice.
    nlist = nlist or int(min(max(1, 4 * round(n ** 0.5)), max(1, n // 39)))
    return {"nlist": int(nlist), "nprobe": int(nprobe or max(1, nlist // 16))}
  if kind == "hnsw":
    return {"hnsw_m": int(hnsw_m), "ef_construction": int(ef_construction),
            "ef_search": int(ef_search)}
  return {}


def expected_fingerprint(embeddings, kind: str, fingerprint: Optional[Dict[str, Any]] = None,
                         **params) -> Dict[str, Any]:
  """The fingerprint `build(embeddings, kind, fingerprint=..., **params)` gives its index
  (what `load(..., expect=...)` compares)."""
  x = _as_matrix(embeddings, "embeddings")
  return {**embeddings_fingerprint(x), "kind": kind,
          "params": settings(kind, x.shape[0], **params), **(fingerprint or {})}


def build(embeddings, kind: str = "exact", backend: str = "auto",
          fingerprint: Optional[Dict[str, Any]] = None, nlist: int = 0, nprobe: int = 0,
          hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64,
          recall_queries=None, recall_k: int = 10, seed: int = 0,
          verbose: bool = True) -> Index:
  """Builds an index of `embeddings` (N, dim) for inner-product search.

  Args:
    kind: one of KINDS; the approximate ones only when asked (they need faiss).
    backend: "auto" (faiss when installed, else numpy; numpy serves "exact" only),
      "faiss" or "numpy".
    fingerprint: the caller's entries added to the embeddings' fingerprint (what a saved
      index is checked against).
    nlist / nprobe: IVF cells and cells searched (0: 4 sqrt(N) and nlist / 16).
    hnsw_m / ef_construction / ef_search: HNSW links per node and search widths.
    recall_queries: (Q, dim) queries on which an approximate index's recall@recall_k
      against exact search is measured (and printed on stderr when `verbose`).
  """
  if kind not in KINDS:
    raise ValueError(f"index kind {kind!r}: expected one of {KINDS}")
  if backend not in ("auto", "faiss", "numpy"):
    raise ValueError(f"index backend {backend!r}: expected 'auto', 'faiss' or 'numpy'")
  x = _as_matrix(embeddings, "embeddings")
  if x.shape[0] < 1:
    raise ValueError("cannot index an empty gallery")
  if backend == "auto":
    backend = "faiss" if have_faiss() else "numpy"
  if backend == "numpy" and kind != "exact":
    raise ValueError(f"a {kind!r} index needs faiss: pip install -e \".[index]\" (the "
                     f"numpy backend does exact search only)")
  n, d = x.shape
  knobs = dict(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_construction=ef_construction,
               ef_search=ef_search)
  params = settings(kind, n, **knobs)
  fp = expected_fingerprint(x, kind, fingerprint, **knobs)
  t0 = time.time()
  if backend == "numpy":
    idx = Index(kind, backend, params, fp, items=x, build_s=0.0)
  else:
    faiss = _faiss(f"a {kind!r} index")
    data = np.ascontiguousarray(x, np.float32)
    if kind == "exact":
      fi = faiss.IndexFlatIP(d)
    elif kind == "ivf":
      quantizer = faiss.IndexFlatIP(d)
      fi = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
      rng = np.random.default_rng(seed)
      sample = data[np.sort(rng.choice(n, min(n, 256 * params["nlist"]), replace=False))]
      fi.train(sample)
      fi.nprobe = params["nprobe"]
    else:
      fi = faiss.IndexHNSWFlat(d, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
      fi.hnsw.efConstruction = params["ef_construction"]
      fi.hnsw.efSearch = params["ef_search"]
    fi.add(data)
    if kind == "hnsw":
      fi.hnsw.efSearch = params["ef_search"]
    idx = Index(kind, backend, params, fp, faiss_index=fi, build_s=time.time() - t0)
  if recall_queries is not None and kind != "exact":
    q = _as_matrix(recall_queries, "recall_queries")
    kk = min(int(recall_k), n)
    _, exact = numpy_search(x, q, kk)
    _, approx = idx.search(q, kk)
    idx.recall = {"k": kk, "queries": int(q.shape[0]), "recall": recall_at_k(approx, exact)}
  if verbose:
    msg = (f"index {kind} ({backend}) of {n} x {d} built in {idx.build_s:.2f}s"
           + (f", {params}" if params else ""))
    if idx.recall:
      msg += (f"; recall@{idx.recall['k']} vs exact search on {idx.recall['queries']} "
              f"queries: {idx.recall['recall']:.4f}")
    print(msg, file=sys.stderr)
  return idx


def load(path: str, items=None, expect: Optional[Dict[str, Any]] = None) -> Index:
  """Reads an index saved by `Index.save`.

  Args:
    path: the index file (its description is `path.json`).
    items: the embeddings, for a numpy index (it stores none).
    expect: the fingerprint it must have been built with; any difference raises
      `StaleIndexError` naming the entries that changed.
  Raises:
    DamagedIndexError: the index file or its description is not what was written (a
      flipped bit, a truncated file), or it was saved without checksums.
  """
  meta_path = path + ".json"
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"no index description {meta_path}")
  try:
    meta = integrity.read_sealed_json(meta_path, required=True)
  except integrity.IntegrityError as e:
    raise DamagedIndexError(f"index description {e}") from None
  if meta.get("version") != FORMAT_VERSION:
    raise StaleIndexError(f"{path}: index format {meta.get('version')}, this code writes "
                          f"{FORMAT_VERSION}: rebuild it")
  if expect is not None and meta["fingerprint"] != json.loads(json.dumps(expect)):
    got, want = meta["fingerprint"], json.loads(json.dumps(expect))
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    shown = "; ".join(f"{k}: index {got.get(k)!r}, gallery {want.get(k)!r}" for k in changed)
    raise StaleIndexError(f"{path} is stale: it was built from other embeddings or "
                          f"settings ({shown}); rebuild it")
  if meta["backend"] == "numpy":
    if items is None:
      raise ValueError(f"{path}: a numpy index needs the embeddings (items=...)")
    idx = Index(meta["kind"], "numpy", meta["params"], meta["fingerprint"], items=items,
                recall=meta.get("recall"))
  else:
    faiss = _faiss(f"loading {path}")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{meta_path} describes a faiss index, but {path} is missing")
    if not isinstance(meta.get("file"), dict):
      raise DamagedIndexError(f"{meta_path} records no checksum of {path}")
    problem = integrity.check_file(path, meta["file"])
    if problem:
      raise DamagedIndexError(f"index {path}: {problem}")
    try:
      fi = faiss.read_index(path)
    except RuntimeError as e:  # truncated or foreign file
      raise StaleIndexError(f"{path} cannot be read as a faiss index ({e}); rebuild it") from e
    if fi.ntotal != meta["fingerprint"]["num_items"] or fi.d != meta["fingerprint"]["dim"]:
      raise StaleIndexError(f"{path} holds {fi.ntotal} x {fi.d}, its description says "
                            f"{meta['fingerprint']['num_items']} x "
                            f"{meta['fingerprint']['dim']}: rebuild it")
    if meta["kind"] == "ivf":
      fi.nprobe = meta["params"]["nprobe"]
    elif meta["kind"] == "hnsw":
      fi.hnsw.efSearch = meta["params"]["ef_search"]
    idx = Index(meta["kind"], "faiss", meta["params"], meta["fingerprint"], faiss_index=fi,
                recall=meta.get("recall"))
  return idx

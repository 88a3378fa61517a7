"""Searches a workdir's test gallery: text -> images and image -> captions.

    python -m dsran_jax.search --workdir=DIR --query="a dog on the beach" --top_k=5
    python -m dsran_jax.search --workdir=DIR --image_id=1000092795 --top_k=5

Prints one JSON object per hit on stdout (logs go to stderr):
- text -> image: `{"rank": 1, "image_id": ..., "score": ..., "captions": [...]}`, the
  image's ground-truth captions;
- image -> text: `{"rank": 1, "caption": ..., "score": ..., "image_id": ...}`, the id of
  the image the caption belongs to.

The gallery is the split `config.data.test_split` of the workdir's config (or `--split`),
read with `data.load_split` and encoded once by `inference.load(workdir)`. Image and
caption embeddings are cached in `{workdir}/gallery_{split}.npz` together with a
fingerprint (checkpoint step and meta, split name and size, a checksum of its ids and
captions), so a new checkpoint or a changed split rebuilds the cache instead of serving
stale results.

Other flags: `--split` (another split), `--data_root` (the features moved since training),
`--rebuild` (re-encode), `--nocache`. An unknown `--image_id` exits with status 2 and a
message naming it and a few valid ids, before the model is loaded.

From Python (notebooks):

    gallery = search.Gallery.load(workdir)
    hits = search.search_text(gallery, "a dog on the beach", top_k=5)
    hits = search.search_image(gallery, gallery.image_ids[0], top_k=5)
    print(search.format_hits(hits))
"""
import hashlib
import json
import os
import sys
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

CACHE_VERSION = 1


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
  return os.path.join(workdir, f"gallery_{split_name}.npz")


def _content_checksum(image_ids: Sequence[str], texts: Sequence[str]) -> str:
  # crc32 streams in chunks: COCO's 25k captions stay cheap and nothing big is built.
  crc = 0
  for chunk in (image_ids, texts):
    for s in chunk:
      crc = zlib.crc32(str(s).encode("utf-8") + b"\n", crc)
  return f"{crc:08x}"


def fingerprint(meta: Dict[str, Any], split, embed_size: int) -> Dict[str, Any]:
  """What the cached embeddings depend on: the checkpoint and the split's content."""
  # The meta (step, rsum, source file) tells a retrained or re-converted checkpoint apart
  # even when it stops at the same step.
  meta_hash = hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
  return {"version": CACHE_VERSION, "checkpoint_step": meta.get("step"),
          "checkpoint_meta": meta_hash[:16], "split": split.name,
          "num_images": int(split.num_images), "num_captions": int(split.num_captions),
          "content": _content_checksum(split.image_ids, split.texts),
          "embed_size": int(embed_size)}


def _read_cache(path: str, want: Dict[str, Any]):
  """(image_emb, text_emb) if `path` holds embeddings of fingerprint `want`, else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if json.loads(str(f["fingerprint"])) != want:
        return None
      return np.asarray(f["image_emb"]), np.asarray(f["text_emb"])
  except Exception:  # a truncated or foreign file is just a cache miss
    return None


def _write_cache(path: str, image_emb, text_emb, fp: Dict[str, Any]) -> None:
  tmp = path + ".tmp"
  # A file object, because np.savez appends ".npz" to a bare path and breaks the rename.
  with open(tmp, "wb") as f:
    np.savez(f, image_emb=image_emb, text_emb=text_emb,
             fingerprint=np.asarray(json.dumps(fp, sort_keys=True)))
  os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def encode_split_images(encoder, split, batch_size: Optional[int] = None) -> np.ndarray:
  """(num_images, E) embeddings of every image of `split`, read `batch_size` at a time."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  bs = int(batch_size or encoder.batch_size)
  keys = ["regions", "region_pos", "region_mask"]
  if encoder.model.config.image_inputs == "grid+regions":
    keys.append("grid")
  out = []
  t0 = time.time()
  for start in range(0, split.num_images, bs):
    arrays = split.images(np.arange(start, min(start + bs, split.num_images)))
    out.append(encoder.encode_images(**{k: arrays[k] for k in keys if k in arrays}))
    logging.log_every_n_seconds(logging.INFO, "encoded %d/%d images", 10,
                                start + len(out[-1]), split.num_images)
  logging.info("encoded %d images in %.1fs", split.num_images, time.time() - t0)
  if not out:
    return np.zeros((0, encoder.embed_size), np.float32)
  return np.concatenate(out, axis=0)


def encode_split_texts(encoder, split) -> np.ndarray:
  """(num_captions, E) embeddings of the split's captions, tokenised as `load_split` did
  (the ids evaluation uses, so gallery scores equal the evaluation's sims)."""
  return encoder.encode_texts(input_ids=split.input_ids, attention_mask=split.attention_mask)


class Gallery:
  """A split's images and captions with their embeddings, ready to search.

  Attributes:
    split_name: the split's name.
    image_ids: one id per image.
    texts: captions, `captions_per_image` consecutive ones per image.
    captions_per_image: captions per image (5 for the standard releases).
    image_emb: float32 (num_images, E), L2-normalised.
    text_emb: float32 (num_captions, E), L2-normalised.
    encoder: the `inference.Encoder` that made them (encodes queries), or None.
    split: the `data.Split` (reads image features, e.g. for attention maps), or None.
    from_cache: whether the embeddings were read from the cache file.
  """

  def __init__(self, split_name: str, image_ids: Sequence[str], texts: Sequence[str],
               captions_per_image: int, image_emb: np.ndarray, text_emb: np.ndarray,
               encoder=None, split=None, from_cache: bool = False):
    if len(texts) != len(image_ids) * captions_per_image:
      raise ValueError(f"{len(texts)} captions for {len(image_ids)} images at "
                       f"{captions_per_image} per image")
    if image_emb.shape[0] != len(image_ids) or text_emb.shape[0] != len(texts):
      raise ValueError(f"embeddings {image_emb.shape} / {text_emb.shape} do not match "
                       f"{len(image_ids)} images / {len(texts)} captions")
    self.split_name = split_name
    self.image_ids = list(image_ids)
    self.texts = list(texts)
    self.captions_per_image = int(captions_per_image)
    self.image_emb = np.asarray(image_emb, np.float32)
    self.text_emb = np.asarray(text_emb, np.float32)
    self.encoder = encoder
    self.split = split
    self.from_cache = from_cache
    self._index = None

  @classmethod
  def load(cls, workdir: str, split: Optional[str] = None, encoder=None,
           config=None, use_cache: bool = True, rebuild: bool = False,
           batch_size: Optional[int] = None) -> "Gallery":
    """The gallery of a workdir's split, from the cache when it is up to date.

    Args:
      workdir: a dsran_jax workdir (trained, or converted by `tools.convert_torch`).
      split: split name; default `config.data.test_split`.
      encoder: an `inference.Encoder` of this workdir (default: `inference.load(workdir)`).
      config: the config whose `data` section locates the split (default: the workdir's
        config.json; pass one to point at data that has moved, e.g. a new `data.root`).
      use_cache: read and write `{workdir}/gallery_{split}.npz`.
      rebuild: re-encode even if the cache is up to date (and rewrite it).
      batch_size: images read and encoded at a time (default: the encoder's).
    """
    from absl import logging  # pylint: disable=g-import-not-at-top
    from dsran_jax import data, inference  # pylint: disable=g-import-not-at-top
    if encoder is None:
      encoder = inference.load(workdir)
    if config is None:
      config = encoder.config
    split_name = split or config.data.test_split
    ds = data.load_split(config, split_name, workdir)
    fp = fingerprint(encoder.meta, ds, encoder.embed_size)
    path = cache_path(workdir, split_name)
    cached = _read_cache(path, fp) if use_cache and not rebuild else None
    if cached is not None:
      logging.info("gallery %s: %d images, %d captions from %s", split_name,
                   ds.num_images, ds.num_captions, path)
      image_emb, text_emb = cached
    else:
      logging.info("gallery %s: encoding %d images and %d captions", split_name,
                   ds.num_images, ds.num_captions)
      image_emb = encode_split_images(encoder, ds, batch_size)
      text_emb = encode_split_texts(encoder, ds)
      if use_cache:
        try:
          _write_cache(path, image_emb, text_emb, fp)
        except OSError as e:  # a read-only workdir still searches, just uncached
          logging.warning("could not write the gallery cache %s: %s", path, e)
    return cls(split_name, ds.image_ids, ds.texts, ds.captions_per_image, image_emb,
               text_emb, encoder=encoder, split=ds, from_cache=cached is not None)

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

  def sims(self) -> np.ndarray:
    """(num_images, num_captions) cosine similarities (the evaluation's sims matrix)."""
    return self.image_emb @ self.text_emb.T

  def encode_query(self, text: str) -> np.ndarray:
    """(E,) embedding of a query sentence."""
    if self.encoder is None:
      raise ValueError("this Gallery has no encoder to embed queries with")
    return self.encoder.encode_texts([text])[0]


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores, ties broken by index (as `ranking` does)."""
  k = max(0, min(int(k), scores.shape[0]))
  # Stable sort of the negated scores: equal scores keep index order.
  return np.argsort(-scores, kind="stable")[:k]


def _check_top_k(top_k: int) -> None:
  if int(top_k) < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")


def search_text(gallery: Gallery, query: str, top_k: int = 5) -> List[Dict[str, Any]]:
  """Text -> image: the `top_k` gallery images closest to `query`.

  Returns:
    `[{"rank", "image_id", "score", "captions"}]`, best first (rank 1), `captions` the
    image's ground-truth captions.
  """
  _check_top_k(top_k)
  if not isinstance(query, str) or not query.strip():
    raise ValueError(f"query must be a non-empty string, got {query!r}")
  scores = gallery.image_emb @ gallery.encode_query(query)
  return [{"rank": r + 1, "image_id": str(gallery.image_ids[i]),
           "score": round(float(scores[i]), 6), "captions": gallery.captions_of(int(i))}
          for r, i in enumerate(_top_k(scores, top_k))]


def search_image(gallery: Gallery, image_id, top_k: int = 5) -> List[Dict[str, Any]]:
  """Image -> text: the `top_k` gallery captions closest to image `image_id`.

  Returns:
    `[{"rank", "caption", "score", "image_id"}]`, best first, `image_id` being the image
    the caption belongs to (equal to the query's when the model retrieves its own).
  Raises:
    UnknownImageError: the gallery has no image `image_id`.
  """
  _check_top_k(top_k)
  row = gallery.index_of(image_id)
  scores = gallery.text_emb @ gallery.image_emb[row]
  k = gallery.captions_per_image
  return [{"rank": r + 1, "caption": gallery.texts[c], "score": round(float(scores[c]), 6),
           "image_id": str(gallery.image_ids[c // k])}
          for r, c in enumerate(_top_k(scores, top_k))]


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


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A dsran_jax workdir (trained or converted).")
  flags.DEFINE_string("query", None, "Text -> image: the sentence to search for.")
  flags.DEFINE_string("image_id", None, "Image -> text: the id of a gallery image.")
  flags.DEFINE_integer("top_k", 5, "Number of hits to print.")
  flags.DEFINE_string("split", "", "Gallery split (default: config.data.test_split).")
  flags.DEFINE_string("data_root", "", "Override config.data.root (data moved since "
                      "training).")
  flags.DEFINE_bool("rebuild", False, "Re-encode the gallery even if the cache is fresh.")
  flags.DEFINE_bool("cache", True, "Read/write {workdir}/gallery_{split}.npz.")
  flags.mark_flags_as_required(["workdir"])


def _fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  """Entry point of `python -m dsran_jax.search`."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (flags_.query is None) == (flags_.image_id is None):
    raise app.UsageError("give exactly one of --query (text -> image) or --image_id "
                         "(image -> text)")
  if flags_.top_k < 1:
    raise app.UsageError(f"--top_k must be >= 1, got {flags_.top_k}")
  if not flags_["verbosity"].present:
    # stdout carries the hits; keep stderr to warnings (orbax logs every restore at INFO).
    logging.set_verbosity(logging.WARNING)
  from dsran_jax import data, inference  # pylint: disable=g-import-not-at-top
  from dsran_jax.default_config import load_workdir_config  # pylint: disable=g-import-not-at-top
  try:
    config = load_workdir_config(flags_.workdir)
  except FileNotFoundError as e:
    _fail(str(e))
  if flags_.data_root:
    config.data.root = flags_.data_root
  split_name = flags_.split or config.data.test_split
  if flags_.image_id is not None:
    # Checked on the split's ids before the model is loaded: a typo fails in a second.
    ids = [str(i) for i in data.read_raw_split(config, split_name).image_ids]
    if str(flags_.image_id) not in set(ids):
      _fail(unknown_image_message(flags_.image_id, split_name, ids))
  encoder = inference.load(flags_.workdir)
  t0 = time.time()
  gallery = Gallery.load(flags_.workdir, split_name, encoder=encoder, config=config,
                         use_cache=flags_.cache, rebuild=flags_.rebuild)
  how = (f"cached in {cache_path(flags_.workdir, split_name)}" if gallery.from_cache
         else f"encoded in {time.time() - t0:.1f}s")
  print(f"gallery {split_name}: {gallery.num_images} images, {gallery.num_captions} "
        f"captions ({how})", file=sys.stderr)
  try:
    if flags_.query is not None:
      hits = search_text(gallery, flags_.query, flags_.top_k)
    else:
      hits = search_image(gallery, flags_.image_id, flags_.top_k)
  except (UnknownImageError, ValueError) as e:
    _fail(str(e))
  for h in hits:
    print(json.dumps(h, ensure_ascii=False))
  sys.stdout.flush()


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # Flags are defined only when run as a script, so importing this module (notebooks,
  # plots) never clashes with another module's --workdir.
  _define_flags()
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _app.run(main)

"""Checksums of what is read back: a file is used only if its bytes are the ones written.

Three forms, one algorithm (`ALGORITHM`):
- a file's record, `{"size": bytes, "sha256": hex}` (`file_record`), checked by
  `check_file` (missing, truncated, longer, or other bytes); `tree_records` /
  `check_tree` do every file under a directory (a checkpoint step's, `checkpointing`);
- a sealed JSON object (`seal` / `unseal`): the object carries `"checksum"`, the digest
  of its own canonical JSON without that key (vocabularies, index descriptions,
  checkpoint checksum lists, data manifests), so one flipped bit anywhere in its
  content is caught without a second file;
- a digest of named arrays (`arrays_digest`: names, dtypes, shapes and bytes), stored
  beside them (the gallery cache).

sha256: on the machines this was measured on (AMD EPYC with SHA-NI) hashlib's sha256
streams at 1950 MiB/s against 1349 MiB/s for blake2b, 834 for md5 (one core, 256 MiB
of random bytes in 8 MiB blocks; see docs/reliability.md); it is also what `sha256sum`
checks by hand and what `data.check`'s manifests already use. A CPU without SHA
instructions hashes sha256 at about half blake2b's speed; the records name their
algorithm, so another can be read later.
"""
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

ALGORITHM = "sha256"
CHUNK = 8 << 20  # bytes read at a time: large enough for hashlib to release the GIL
SEAL_KEY = "checksum"


class IntegrityError(ValueError):
  """A file's bytes differ from the checksum recorded when it was written (a flipped
  bit, a truncated or replaced file). The message names the file and what differs."""


def new_hash(algorithm: str = ALGORITHM):
  """A fresh streaming hash of `algorithm` (default `ALGORITHM`)."""
  return hashlib.new(algorithm)


def file_digest(path: str, chunk: int = CHUNK, algorithm: str = ALGORITHM) -> str:
  """The hex digest (`algorithm`, default `ALGORITHM`) of the file's bytes, read `chunk`
  bytes at a time."""
  h = new_hash(algorithm)
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return h.hexdigest()
      h.update(block)


def file_record(path: str) -> dict[str, Any]:
  """`{"size", ALGORITHM}` of a file, as written into a checksum list."""
  return {"size": os.path.getsize(path), ALGORITHM: file_digest(path)}


def check_file(path: str, record: Mapping[str, Any]) -> str | None:
  """What is wrong with `path` against its `record` (None when it matches): missing,
  truncated, longer than written, or other bytes of the same size."""
  algorithm = next((a for a in record if a != "size"), ALGORITHM)
  if not os.path.isfile(path):
    return "missing"
  size, want = os.path.getsize(path), int(record["size"])
  if size < want:
    return f"truncated: {size} of the {want} bytes written"
  if size > want:
    return f"{size} bytes, {want} were written"
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      h.update(block)
  if h.hexdigest() != record[algorithm]:
    return f"{algorithm} differs from the one written (the bytes changed on disk)"
  return None


def tree_records(root: str, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
  """{relative path: `file_record`} of the files `rels` under `root`."""
  return {rel: file_record(os.path.join(root, rel)) for rel in sorted(rels)}


def check_tree(root: str, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """`"rel: problem"` for every file of `records` under `root` that does not match."""
  problems = []
  for rel in sorted(records):
    problem = check_file(os.path.join(root, rel), records[rel])
    if problem:
      problems.append(f"{rel}: {problem}")
  return problems


def _canonical(obj: Mapping[str, Any]) -> bytes:
  return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                    allow_nan=True).encode("utf-8")


def json_digest(obj: Mapping[str, Any]) -> str:
  """`"sha256:<hex>"` of the canonical JSON of `obj` (keys sorted, no spaces)."""
  return f"{ALGORITHM}:{hashlib.new(ALGORITHM, _canonical(obj)).hexdigest()}"


def seal(obj: Mapping[str, Any]) -> dict[str, Any]:
  """`obj` (a JSON object) with `"checksum"`: the digest of its content."""
  body = {k: v for k, v in obj.items() if k != SEAL_KEY}
  return {**body, SEAL_KEY: json_digest(body)}


def unseal(obj: Any, path: str, required: bool = False) -> dict[str, Any]:
  """`obj` (read from `path`) without its `"checksum"`, once the checksum matches.

  Raises IntegrityError naming `path` when the content differs from what was sealed,
  or when `required` and there is no checksum. An object written before checksums
  were (no `"checksum"` key) is returned as it is unless `required`.
  """
  if not isinstance(obj, dict):
    raise IntegrityError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  body = {k: v for k, v in obj.items() if k != SEAL_KEY}
  if SEAL_KEY not in obj:
    if required:
      raise IntegrityError(f"{path}: no checksum (written before checksums were, or not "
                           f"by dsran_jax)")
    return body
  want = obj[SEAL_KEY]
  algorithm = want.split(":", 1)[0] if isinstance(want, str) else None
  if algorithm not in hashlib.algorithms_available:
    raise IntegrityError(f"{path}: unreadable checksum {str(want)[:80]!r} (the file is "
                         f"damaged)")
  got = f"{algorithm}:{hashlib.new(algorithm, _canonical(body)).hexdigest()}"
  if got != want:
    raise IntegrityError(f"{path}: its content differs from the checksum written with it "
                         f"(the file was damaged or edited since)")
  return body


def read_sealed_json(path: str, required: bool = False) -> dict[str, Any]:
  """`unseal(json.load(path))`; a file that is not JSON is an IntegrityError too."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IntegrityError(f"{path}: not valid JSON ({e}): the file is damaged") from None
  return unseal(obj, path, required)


def arrays_digest(arrays: Mapping[str, Any]) -> str:
  """`"sha256:<hex>"` of named arrays: each name, dtype, shape and bytes, by name."""
  h = new_hash()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode("utf-8"))
    h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
  return f"{ALGORITHM}:{h.hexdigest()}"

r"""Scans a dataset before training: `python -m dsran_jax.data.check --config=configs/x.py`.

Reads every split the way training will (`--config.data.root=...` etc. override as usual)
and reports, per split: images and captions, missing and malformed feature files,
images with NaN/inf features, empty captions, captions the caption cut shortens
(`models.caption_cap`: the authors' cut or `data.max_len`; none for the word-vocabulary
families, whose authors keep every caption whole) and the longest caption. Exits 1 when the data cannot be trained on
(an unreadable split, a missing or malformed file, non-finite features), 2 on a user
error (an invalid config value, an unknown `data.format`, an unreadable manifest: one
`error: ...` message, no traceback), else 0.

Captions are measured with the tokenizer of the configured family
(`models.tokenizer_kind`): BERT WordPiece from the family's BERT directory
(`models.bert_path`), or words for the word-vocabulary families, which need no workdir
(nothing is written; `data.vocab_file` is read when given). Every family's config works:
`--config=configs/f30k.py:scan`.

It knows the public releases (`RELEASES`: Flickr30K and MS-COCO, precomp and VLP; images
per split, captions, regions and feature widths, COCO's 1000 VLP shards) and says what
a copy lacks against them: images and captions per split, truncated `.npy` files (from
their header), images with fewer detections, missing shards. `--release=auto` (default)
reports differences, `strict` also fails on them (an incomplete download), `off` skips.

A manifest (sha256, size and shape of every file under `data.root`) of a good copy is
written with `--write_manifest=PATH` (after a passing check) and another copy verified
against it with `--verify_manifest=PATH`.

  python -m dsran_jax.data.check --config=configs/f30k.py \
      --config.data.root=/data/f30k [--splits=train,test] [--max_images=1000]
  python -m dsran_jax.data.check --config=configs/f30k.py --config.data.root=/data/f30k \
      --release=strict --write_manifest=/data/f30k.manifest.json
  python -m dsran_jax.data.check --config=configs/f30k.py --config.data.root=/copy/f30k \
      --verify_manifest=/data/f30k.manifest.json
"""
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
import types
from typing import Dict, List, Optional

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from tqdm import tqdm

from dsran_jax import data as data_lib
from dsran_jax import models
from dsran_jax import atomic, cli, integrity, validation
from dsran_jax.data import formats
from dsran_jax.data import precomp
from dsran_jax.data import raw
from dsran_jax.data import tokenize
from dsran_jax.data import vlp


@dataclasses.dataclass(frozen=True)
class Release:
  """What a public feature release holds: images per split (5 captions each) and the
  per-image feature shapes."""
  title: str
  images: Dict[str, int]
  regions: int
  img_dim: int = 2048
  captions_per_image: int = 5
  shards: int = 0     # COCO VLP: {prefix}_featNNN.h5 and _clsNNN.h5, NNN = 000..999


# Karpathy splits: Flickr30K 29000 / 1014 / 1000 images, MS-COCO 113287 (train +
# restval) / 5000 / 5000; SCAN's COCO precomp also ships the 1K test as "test" and the
# 5K test as "testall" (our VLP reader maps both to the Karpathy test split).
RELEASES = {
    ("precomp", "f30k"): Release(
        "Flickr30K precomp (SCAN/VSE++ data/f30k_precomp, BUTD 36 regions)",
        {"train": 29000, "dev": 1014, "test": 1000}, regions=36),
    ("precomp", "coco"): Release(
        "MS-COCO precomp (SCAN/VSE++ data/coco_precomp, BUTD 36 regions)",
        {"train": 113287, "dev": 5000, "test": 1000, "testall": 5000}, regions=36),
    ("vlp", "f30k"): Release(
        "Flickr30K VLP/GVD features (DSRAN authors; 100 detections per image)",
        {"train": 29000, "dev": 1014, "test": 1000}, regions=100),
    ("vlp", "coco"): Release(
        "MS-COCO VLP/GVD features (DSRAN authors; 100 detections, 1000 HDF5 shards)",
        {"train": 113287, "dev": 5000, "test": 5000, "testall": 5000}, regions=100,
        shards=1000),
}


def release_of(config) -> Optional[Release]:
  """The public release `config.data.format` / `config.data.name` names, if any."""
  if config.data.tfds_dir:
    return None
  return RELEASES.get((config.data.format, config.data.name))


def npy_header(path: str):
  """(shape, dtype, bytes the file must have) from a .npy header, without reading data."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # pylint: disable=protected-access
    del fortran
    offset = f.tell()
  return tuple(shape), np.dtype(dtype), offset + int(np.prod(shape)) * np.dtype(dtype).itemsize


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class SplitReport:
  """What the scan found in one split."""
  name: str
  num_images: int = 0
  num_captions: int = 0
  captions_per_image: int = 0
  scanned_images: int = 0
  fatal: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)
  malformed: List[str] = dataclasses.field(default_factory=list)
  nonfinite: List[str] = dataclasses.field(default_factory=list)
  empty_captions: int = 0
  long_captions: int = 0
  max_caption_len: int = 0
  # Differences from the public release (failures with --release=strict).
  release: List[str] = dataclasses.field(default_factory=list)
  strict: bool = False
  few_regions: int = 0

  @property
  def ok(self) -> bool:
    return not (self.fatal or self.missing or self.malformed or self.nonfinite
                or (self.strict and self.release))


def splits_to_scan(config) -> list:
  """The format's own list of splits (configured ones plus any extra it finds)."""
  if config.data.tfds_dir:
    return list(dict.fromkeys(
        [config.data.train_split, config.data.dev_split, config.data.test_split]))
  return formats.list_splits(config)


def caption_lengths_fn(config):
  """`texts -> untruncated token counts` for the tokenizer of the configured family
  (`models.tokenizer_kind`): BERT WordPiece from `models.bert_path`, or words.

  A word vocabulary is not needed to count words, and the checker never writes one: it
  needs no workdir. `data.vocab_file`, when given and present, is loaded so that an
  unreadable one fails here, naming it.
  """
  kind = models.tokenizer_kind(config)
  if kind == "vocab":
    path = config.data.vocab_file and os.path.expanduser(config.data.vocab_file)
    vocab = tokenize.Vocabulary.load(path) if path and os.path.isfile(path) else None
    return tokenize.GruTokenizer(vocab, models.caption_cap(config)).lengths
  return tokenize.make_tokenizer(config).lengths


def _read_raw(config, split_name):
  if config.data.tfds_dir:
    return data_lib.read_raw_split(config, split_name)
  return formats.read_raw_split_for_check(config, split_name)


def _count_few_regions(batch: dict, report: SplitReport, expected_regions: int) -> None:
  mask = batch.get("region_mask")
  if expected_regions and mask is not None and np.shape(mask)[1] >= expected_regions:
    report.few_regions += int((np.asarray(mask).sum(1) < expected_regions).sum())


def _check_finite(batch: dict, ids, report: SplitReport) -> None:
  for key in sorted(batch):
    arr = np.asarray(batch[key])
    if not np.issubdtype(arr.dtype, np.floating):
      continue
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    report.nonfinite += [f"image {ids[i]}: NaN/inf in {key!r}" for i in np.flatnonzero(bad)]


def _scan_images(raw_split, report: SplitReport, max_images: int, batch_size: int,
                 expected_regions: int = 0) -> None:
  n = len(raw_split.image_ids)
  n = min(n, max_images) if max_images > 0 else n
  ids = list(raw_split.image_ids)
  with tqdm(total=n, desc=f"{report.name}", unit="img", file=sys.stderr,
            mininterval=1.0, leave=False) as bar:
    for start in range(0, n, batch_size):
      idx = np.arange(start, min(n, start + batch_size))
      try:
        batch = raw_split.read_images(idx)
        _check_finite(batch, [ids[i] for i in idx], report)
        _count_few_regions(batch, report, expected_regions)
      except (raw.DataError, OSError, ValueError, KeyError):
        # Re-read one by one so that every bad file of the batch is reported.
        for i in idx:
          try:
            one = raw_split.read_images(np.array([i]))
            _check_finite(one, [ids[i]], report)
            _count_few_regions(one, report, expected_regions)
          except raw.MissingDataError as e:
            report.missing.append(str(e))
          except (raw.DataError, OSError, ValueError, KeyError) as e:
            report.malformed.append(f"image {ids[i]}: {e}")
      report.scanned_images = int(idx[-1]) + 1
      bar.update(len(idx))


def _precomp_file_notes(config, split_name: str, rel: Release) -> List[str]:
  """A truncated `{split}_ims.npy` (from its header) and region counts of the release."""
  path = precomp.split_files(config.data.root, split_name)["ims"]
  if not os.path.isfile(path):
    return []
  try:
    shape, dtype, need = npy_header(path)
  except (OSError, ValueError) as e:
    return [f"{path}: unreadable .npy header ({e})"]
  notes = []
  have = os.path.getsize(path)
  if have < need:
    notes.append(f"{path}: {_gib(have)} of the {_gib(need)} its header promises "
                 f"(shape {shape}, {dtype}): truncated, download it again")
  if len(shape) == 3 and shape[1] != rel.regions:
    notes.append(f"{path}: {shape[1]} regions per image, the release has {rel.regions}")
  return notes


def release_notes(config, report: SplitReport, rel: Release) -> List[str]:
  """How a scanned split differs from the public release `rel`."""
  notes = []
  expected = rel.images.get(report.name)
  if expected is None:
    return notes
  if report.num_images != expected:
    diff = expected - report.num_images
    notes.append(f"{report.num_images} images, the release has {expected} ("
                 + (f"{diff} missing: an incomplete download?" if diff > 0
                    else f"{-diff} more than the release") + ")")
  if report.num_captions and report.num_captions != rel.captions_per_image * report.num_images:
    notes.append(f"{report.num_captions} captions for {report.num_images} images, the "
                 f"release has {rel.captions_per_image} per image")
  if report.few_regions:
    notes.append(f"{report.few_regions} scanned images have fewer than the release's "
                 f"{rel.regions} detections")
  return notes


def missing_coco_shards(root: str, shards: int) -> List[str]:
  """The COCO VLP shard files `{prefix}_featNNN.h5` / `_clsNNN.h5` that are absent."""
  try:
    prefix = vlp.find_coco_shard_prefix(root)
  except raw.DataError as e:
    return [str(e)]
  return [p for n in range(shards) for kind in ("feat", "cls")
          if not os.path.isfile(p := f"{prefix}_{kind}{n:03d}.h5")]


def scan_split(config, split_name: str, lengths_fn, max_images=0, batch_size=64,
               release_mode: str = "off") -> SplitReport:
  """Reads one split completely and returns what is wrong with it.

  release_mode: "auto" / "strict" compare with the public release of the config's
  format and dataset (`RELEASES`); "strict" makes a difference a failure.
  """
  report = SplitReport(name=split_name, strict=release_mode == "strict")
  rel = release_of(config) if release_mode != "off" else None
  if rel is not None and config.data.format == "precomp":
    notes = _precomp_file_notes(config, split_name, rel)
    report.release += notes
    report.fatal += [n for n in notes if "truncated" in n]
  try:
    raw_split = _read_raw(config, split_name)
  except (raw.DataError, OSError, ValueError, KeyError) as e:
    report.fatal.append(f"cannot read split: {e}")
    if rel is not None and split_name in rel.images:
      report.release.append(f"split missing or unreadable; the release has "
                            f"{rel.images[split_name]} images")
    return report
  report.num_images = len(raw_split.image_ids)
  report.num_captions = len(raw_split.texts)
  report.captions_per_image = raw_split.captions_per_image
  if not report.num_images or not report.num_captions:
    report.fatal.append("no images or no captions")
  report.empty_captions = sum(1 for t in raw_split.texts if not str(t).strip())
  if lengths_fn is not None and raw_split.texts:
    lengths = lengths_fn(raw_split.texts)
    cap = models.caption_cap(config)
    report.long_captions = int((lengths > cap).sum()) if cap else 0
    report.max_caption_len = int(lengths.max())
  _scan_images(raw_split, report, max_images, batch_size,
               rel.regions if rel is not None and config.data.format == "vlp" else 0)
  if rel is not None:
    report.release += release_notes(config, report, rel)
  return report


def format_report(config, reports, show: int = 10) -> str:
  """Human-readable report: a table, then the problems, then the verdict."""
  d = config.data
  lines = [f"data check: format={d.format} name={d.name} root={d.root or '-'} "
           f"model={config.model.name} tokenizer={models.tokenizer_kind(config)} "
           f"caption cut={models.caption_cap(config) or 'none'}", ""]
  head = ("split", "images", "captions", "cap/img", "scanned", "missing", "malformed",
          "non-finite", "empty caps", "cut", "longest")
  rows = [head] + [
      (r.name, r.num_images, r.num_captions, r.captions_per_image, r.scanned_images,
       len(r.missing), len(r.malformed), len(r.nonfinite), r.empty_captions,
       r.long_captions, r.max_caption_len) for r in reports]
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
  for row in rows:
    lines.append("  ".join(str(v).rjust(w) if j else str(v).ljust(w)
                           for j, (v, w) in enumerate(zip(row, widths))))
  for r in reports:
    for kind, items in (("error", r.fatal), ("missing", r.missing),
                        ("malformed", r.malformed), ("non-finite", r.nonfinite)):
      if items:
        lines.append("")
        lines.append(f"[{r.name}] {kind}: {len(items)}")
        lines += [f"  {m}" for m in items[:show]]
        if len(items) > show:
          lines.append(f"  ... and {len(items) - show} more")
    if r.empty_captions:
      lines.append(f"[{r.name}] warning: {r.empty_captions} empty captions")
    if r.release:
      rel = release_of(config)
      lines.append("")
      lines.append(f"[{r.name}] differs from the public release"
                   + (f" ({rel.title})" if rel else "") + f": {len(r.release)}"
                   + (" (an error with --release=strict)" if not r.strict else ""))
      lines += [f"  {m}" for m in r.release[:show]]
  bad = [r.name for r in reports if not r.ok]
  differ = [r.name for r in reports if r.release]
  lines.append("")
  lines.append(f"FAILED: cannot train on split(s) {', '.join(bad)}" if bad else
               "OK: every split is readable and finite"
               + (f" (split(s) {', '.join(differ)} differ from the public release, see "
                  f"above)" if differ else ""))
  return "\n".join(lines)


def run_check(config, splits=None, max_images=0, batch_size=64, show=10,
              release_mode: str = "auto"):
  """Scans `splits` (default: all) and returns `(reports, report_text, ok)`.

  release_mode: "auto" reports how each split differs from the public release of the
  config's format and dataset, "strict" also fails on it, "off" skips the comparison.
  """
  if release_mode not in ("auto", "strict", "off"):
    raise ValueError(f"release_mode={release_mode!r}: expected auto, strict or off")
  splits = splits or splits_to_scan(config)
  fatal_all = []
  try:
    lengths_fn = caption_lengths_fn(config)
  except (OSError, ValueError) as e:
    lengths_fn = None
    fatal_all.append(f"cannot build the {models.tokenizer_kind(config)} tokenizer of "
                     f"model.name={config.model.name!r}: {e}")
  reports = [scan_split(config, s, lengths_fn, max_images, batch_size, release_mode)
             for s in splits]
  rel = release_of(config) if release_mode != "off" else None
  if rel is not None and rel.shards and reports:
    missing = missing_coco_shards(config.data.root, rel.shards)
    if missing:
      shown = ", ".join(os.path.basename(m) for m in missing[:show])
      reports[0].release.append(
          f"{len(missing)} of the release's {2 * rel.shards} feature/class shards are "
          f"missing: {shown}" + (" ..." if len(missing) > show else ""))
  for r in reports:
    r.fatal = fatal_all + r.fatal
  text = format_report(config, reports, show)
  return reports, text, all(r.ok for r in reports)


# ------------------------------------------------------------------------- manifests

MANIFEST_VERSION = 1


def file_facts(path: str) -> dict:
  """size, sha256 and what the file holds: .npy shape/dtype, .h5 dataset shapes
  (counted per shape), text line count."""
  facts = integrity.file_record(path)  # {"size", "sha256"}
  name = path.lower()
  try:
    if name.endswith(".npy"):
      shape, dtype, _ = npy_header(path)
      facts.update(shape=list(shape), dtype=str(dtype))
    elif name.endswith((".h5", ".hdf5")):
      import h5py  # pylint: disable=g-import-not-at-top
      shapes = {}
      with h5py.File(path, "r") as f:
        for key in f:
          if isinstance(f[key], h5py.Dataset):
            s = "x".join(str(d) for d in f[key].shape) or "scalar"
            shapes[s] = shapes.get(s, 0) + 1
      facts["datasets"] = dict(sorted(shapes.items()))
    elif name.endswith(".txt"):
      with open(path, "rb") as f:
        facts["lines"] = sum(1 for _ in f)
  except (OSError, ValueError) as e:
    facts["unreadable"] = str(e)[:200]
  return facts


def _files_under(root: str, exclude=()) -> List[str]:
  exclude = {os.path.abspath(p) for p in exclude}
  out = []
  for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(d, name)
      if os.path.abspath(path) not in exclude:
        out.append(os.path.relpath(path, root))
  return out


def _facts_of(root: str, rels: List[str], desc: str) -> Dict[str, dict]:
  # sha256 releases the GIL on large blocks: a few files are hashed at once.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    facts = list(tqdm(pool.map(lambda r: file_facts(os.path.join(root, r)), rels),
                      total=len(rels), desc=desc, unit="file", file=sys.stderr,
                      mininterval=1.0, leave=False))
  return dict(zip(rels, facts))


def write_manifest(root: str, path: str) -> dict:
  """Writes the manifest of every file under `root` (relative paths) to `path`, sealed by
  a checksum of its content (`integrity.seal`), which `verify_manifest` checks."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: not a directory (data.root)")
  rels = _files_under(root, exclude=[path])
  manifest = {"version": MANIFEST_VERSION, "root": os.path.abspath(root),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "files": _facts_of(root, rels, "manifest")}
  atomic.write_json(path, integrity.seal(manifest), indent=1, sort_keys=True)  # checked on read
  return manifest


def verify_manifest(root: str, path: str) -> List[str]:
  """What differs between the files under `root` and the manifest at `path`: missing
  files, other sizes, checksums, shapes; files the manifest lacks are listed last."""
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not a manifest (invalid JSON: {e})") from None
  manifest = integrity.unseal(manifest, path)  # refused when damaged since written
  if manifest.get("version") != MANIFEST_VERSION:
    raise ValueError(f"{path}: not a dsran_jax data manifest (version "
                     f"{MANIFEST_VERSION})")
  want = manifest["files"]
  present = [r for r in want if os.path.isfile(os.path.join(root, r))]
  have = _facts_of(root, present, "verify")
  problems = [f"{os.path.join(root, r)}: missing" for r in want if r not in have]
  for rel, facts in have.items():
    exp = want[rel]
    where = os.path.join(root, rel)
    if facts["size"] != exp["size"]:
      problems.append(f"{where}: {facts['size']} bytes, expected {exp['size']}"
                      + (" (truncated)" if facts["size"] < exp["size"] else ""))
    elif facts["sha256"] != exp["sha256"]:
      problems.append(f"{where}: sha256 {facts['sha256'][:16]}..., expected "
                      f"{exp['sha256'][:16]}... (corrupt or another version)")
    for key in ("shape", "dtype", "datasets", "lines"):
      if key in exp and facts.get(key) != exp[key]:
        problems.append(f"{where}: {key} {facts.get(key)}, expected {exp[key]}")
  extra = [r for r in _files_under(root, exclude=[path]) if r not in want]
  problems += [f"{os.path.join(root, r)}: not in the manifest" for r in extra]
  return problems


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  f = types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "Config file.",
                                             lock_config=True),
      splits=flags.DEFINE_list("splits", None,
                               "Splits to scan (default: all of the format's)."),
      max_images=flags.DEFINE_integer("max_images", 0, "Scan at most this many images per "
                                      "split (0: all)."),
      batch_size=flags.DEFINE_integer("batch_size", 64, "Images read per call."),
      max_errors_shown=flags.DEFINE_integer("max_errors_shown", 10,
                                            "Problems listed per split and kind."),
      release=flags.DEFINE_enum("release", "auto", ["auto", "strict", "off"],
                                "Compare with the public release of data.format/data.name: "
                                "auto reports differences, strict also fails on them."),
      write_manifest=flags.DEFINE_string(
          "write_manifest", None, "After a passing check, write the sha256/size/shape of "
          "every file under data.root to this JSON file."),
      verify_manifest=flags.DEFINE_string(
          "verify_manifest", None, "Verify every file under data.root against this "
          "manifest (instead of the scan)."),
  )
  flags.mark_flags_as_required(["config"])
  return f


def run(config, splits=None, max_images: int = 0, batch_size: int = 64, show: int = 10,
        release_mode: str = "auto", write_manifest_path: Optional[str] = None,
        verify_manifest_path: Optional[str] = None) -> int:
  """What the command line does, as a function: validates `config`, checks the data (or
  verifies it against a manifest), prints the report and returns the exit status: 0 the
  data can be trained on, 1 it cannot, 2 a user error (an invalid config value, an
  unreadable manifest, ...), printed as one `error: ...` message on stderr.
  """
  try:
    validation.validate_config(config)
    formats.format_module(config)  # an unknown data.format: one line naming the key
    if verify_manifest_path:
      problems = verify_manifest(config.data.root, verify_manifest_path)
    else:
      _, text, ok = run_check(config, splits, max_images, batch_size, show, release_mode)
  except (ValueError, OSError) as e:  # ConfigError, DataError, FileNotFoundError, a bad manifest
    print(f"error: {cli.error_message(e)}", file=sys.stderr)
    return 2
  if verify_manifest_path:
    real = [p for p in problems if not p.endswith("not in the manifest")]
    for p in problems[:max(show, 1) * 10]:
      print(("  " if p in real else "  note: ") + p)
    print(f"FAILED: {len(real)} problems against {verify_manifest_path}" if real else
          f"OK: every file of {verify_manifest_path} is present and identical")
    return 1 if real else 0
  print(text, flush=True)
  if write_manifest_path:
    if not ok:
      print(f"not writing {write_manifest_path}: the check failed", file=sys.stderr)
      return 1
    try:
      manifest = write_manifest(config.data.root, write_manifest_path)
    except OSError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(f"wrote {write_manifest_path}: {len(manifest['files'])} files")
  return 0 if ok else 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = _FLAGS
  return run(f.config.value, f.splits.value, f.max_images.value, f.batch_size.value,
             f.max_errors_shown.value, f.release.value, f.write_manifest.value,
             f.verify_manifest.value)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  cli.run_cli(main)  # user errors: one `error:` line, exit 2

r"""Scans a dataset before training: `python -m dsran_jax.data.check --config=configs/x.py`.

Reads every split the way training will (`--config.data.root=...` etc. override as usual)
and reports, per split: images and captions, missing and malformed feature files,
images with NaN/inf features, empty captions, captions longer than `data.max_len`
(truncated in training, as the authors do). Exits 1 when the data cannot be trained on
(an unreadable split, a missing or malformed file, non-finite features), else 0.

  python -m dsran_jax.data.check --config=configs/f30k.py \
      --config.data.root=/data/f30k [--splits=train,test] [--max_images=1000]
"""
import dataclasses
import sys
from typing import List

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from dsran_jax import data as data_lib
from dsran_jax.data import raw

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_SPLITS = flags.DEFINE_list("splits", None, "Splits to scan (default: all of the format's).")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Scan at most this many images per "
                                   "split (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images read per call.")
_SHOW = flags.DEFINE_integer("max_errors_shown", 10, "Problems listed per split and kind.")


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

  @property
  def ok(self) -> bool:
    return not (self.fatal or self.missing or self.malformed or self.nonfinite)


def splits_to_scan(config) -> list:
  """The format's own list of splits (configured ones plus any extra it finds)."""
  module = data_lib.format_module(config)
  if hasattr(module, "list_splits"):
    return module.list_splits(config)
  return list(dict.fromkeys(
      [config.data.train_split, config.data.dev_split, config.data.test_split]))


def caption_lengths_fn(config):
  """`texts -> untruncated token counts` for the configured text encoder."""
  from dsran_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  if config.model.text_encoder == "gru":
    return tokenize.GruTokenizer(None, config.data.max_len).lengths  # needs no vocabulary
  from dsran_jax.hub import resolve_pretrained_dir  # pylint: disable=g-import-not-at-top
  return tokenize.BertTokenizer(str(resolve_pretrained_dir(config.model.bert_path)),
                                config.data.max_len).lengths


def _read_raw(config, split_name):
  if config.data.format == "vlp":
    from dsran_jax.data import vlp  # pylint: disable=g-import-not-at-top
    # Per-file checks below count every hole instead of stopping at the first.
    return vlp.read_raw_split(config, split_name, check_files=False)
  return data_lib.read_raw_split(config, split_name)


def _check_finite(batch: dict, ids, report: SplitReport) -> None:
  for key in sorted(batch):
    arr = np.asarray(batch[key])
    if not np.issubdtype(arr.dtype, np.floating):
      continue
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    report.nonfinite += [f"image {ids[i]}: NaN/inf in {key!r}" for i in np.flatnonzero(bad)]


def _scan_images(raw_split, report: SplitReport, max_images: int, batch_size: int) -> None:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n = len(raw_split.image_ids)
  n = min(n, max_images) if max_images > 0 else n
  ids = list(raw_split.image_ids)
  with tqdm(total=n, desc=f"{report.name}", unit="img", file=sys.stderr,
            mininterval=1.0, leave=False) as bar:
    for start in range(0, n, batch_size):
      idx = np.arange(start, min(n, start + batch_size))
      try:
        _check_finite(raw_split.read_images(idx), [ids[i] for i in idx], report)
      except (raw.DataError, OSError, ValueError, KeyError):
        # Re-read one by one so that every bad file of the batch is reported.
        for i in idx:
          try:
            _check_finite(raw_split.read_images(np.array([i])), [ids[i]], report)
          except raw.MissingDataError as e:
            report.missing.append(str(e))
          except (raw.DataError, OSError, ValueError, KeyError) as e:
            report.malformed.append(f"image {ids[i]}: {e}")
      report.scanned_images = int(idx[-1]) + 1
      bar.update(len(idx))


def scan_split(config, split_name: str, lengths_fn, max_images=0, batch_size=64
               ) -> SplitReport:
  """Reads one split completely and returns what is wrong with it."""
  report = SplitReport(name=split_name)
  try:
    raw_split = _read_raw(config, split_name)
  except (raw.DataError, OSError, ValueError, KeyError) as e:
    report.fatal.append(f"cannot read split: {e}")
    return report
  report.num_images = len(raw_split.image_ids)
  report.num_captions = len(raw_split.texts)
  report.captions_per_image = raw_split.captions_per_image
  if not report.num_images or not report.num_captions:
    report.fatal.append("no images or no captions")
  report.empty_captions = sum(1 for t in raw_split.texts if not str(t).strip())
  if lengths_fn is not None and raw_split.texts:
    lengths = lengths_fn(raw_split.texts)
    report.long_captions = int((lengths > config.data.max_len).sum())
    report.max_caption_len = int(lengths.max())
  _scan_images(raw_split, report, max_images, batch_size)
  return report


def format_report(config, reports, show: int = 10) -> str:
  """Human-readable report: a table, then the problems, then the verdict."""
  d = config.data
  lines = [f"data check: format={d.format} name={d.name} root={d.root or '-'} "
           f"text_encoder={config.model.text_encoder} max_len={d.max_len}", ""]
  head = ("split", "images", "captions", "cap/img", "scanned", "missing", "malformed",
          "non-finite", "empty caps", f">{d.max_len} tok", "longest")
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
  bad = [r.name for r in reports if not r.ok]
  lines.append("")
  lines.append(f"FAILED: cannot train on split(s) {', '.join(bad)}" if bad else
               "OK: every split is readable and finite")
  return "\n".join(lines)


def run_check(config, splits=None, max_images=0, batch_size=64, show=10):
  """Scans `splits` (default: all) and returns `(reports, report_text, ok)`."""
  splits = splits or splits_to_scan(config)
  fatal_all = []
  try:
    lengths_fn = caption_lengths_fn(config)
  except (OSError, ValueError) as e:
    lengths_fn = None
    fatal_all.append(f"cannot build the {config.model.text_encoder} tokenizer: {e}")
  reports = [scan_split(config, s, lengths_fn, max_images, batch_size) for s in splits]
  for r in reports:
    r.fatal = fatal_all + r.fatal
  text = format_report(config, reports, show)
  return reports, text, all(r.ok for r in reports)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  _, text, ok = run_check(_CONFIG.value, _SPLITS.value, _MAX_IMAGES.value, _BATCH.value,
                          _SHOW.value)
  print(text, flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

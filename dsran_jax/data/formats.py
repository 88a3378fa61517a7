"""The data formats, registered once: `config.data.format` -> its reader module.

A reader module provides
- `read_raw_split(config, split_name) -> raw.RawSplit`: the split's captions and a
  feature reader (`dsran_jax.data.load_split` tokenises the captions, for every format
  alike);
and may provide
- `list_splits(config) -> [split names]`: the splits `python -m dsran_jax.data.check`
  scans (default: `data.train_split`, `data.dev_split`, `data.test_split`);
- `read_raw_split_for_check(config, split_name) -> raw.RawSplit`: the reader the checker
  uses when it differs (VLP: per-file checks left to the checker's scan, which counts
  every hole instead of stopping at the first).

Adding a format is one module `dsran_jax/data/<name>.py` and one line in `READERS`.
"""
from types import ModuleType
from typing import Dict, List

from dsran_jax.data import coco_vsepp, precomp, raw, synthetic, vlp
from dsran_jax.validation import ConfigError

READERS: Dict[str, ModuleType] = {
    "synthetic": synthetic,
    "precomp": precomp,
    "vlp": vlp,
    "coco_vsepp": coco_vsepp,
}
FORMATS = tuple(READERS)

for _name, _module in READERS.items():
  if not callable(getattr(_module, "read_raw_split", None)):
    raise TypeError(f"data format {_name!r}: {_module.__name__} has no read_raw_split")


def format_module(config) -> ModuleType:
  """The reader module of `config.data.format`.

  Raises:
    ConfigError: an unknown format (one line naming the key, the value and the formats).
  """
  fmt = config.data.format
  module = READERS.get(fmt) if isinstance(fmt, str) else None
  if module is None:
    raise ConfigError([f"config.data.format={fmt!r}: expected one of "
                       f"{', '.join(FORMATS)}"], header="")
  return module


def read_raw_split(config, split_name: str) -> raw.RawSplit:
  """A split read by the reader of `config.data.format` (raw files, never TFDS)."""
  return format_module(config).read_raw_split(config, split_name)


def read_raw_split_for_check(config, split_name: str) -> raw.RawSplit:
  """A split as the data checker reads it (`read_raw_split_for_check` of the format,
  else its `read_raw_split`)."""
  module = format_module(config)
  reader = getattr(module, "read_raw_split_for_check", module.read_raw_split)
  return reader(config, split_name)


def list_splits(config) -> List[str]:
  """The splits the data checker scans: the format's own list (configured splits plus
  any extra it finds), else the configured train / dev / test splits."""
  module = format_module(config)
  if hasattr(module, "list_splits"):
    return list(module.list_splits(config))
  return list(dict.fromkeys(
      [config.data.train_split, config.data.dev_split, config.data.test_split]))

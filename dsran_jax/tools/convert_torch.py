"""Converts an authors' PyTorch checkpoint of any family with public code into a
dsran_jax workdir.

    python -m dsran_jax.tools.convert_torch --checkpoint=model_best.pth.tar --workdir=DIR \
        [--model=dsran|scan|...] [--vocab=VOCAB] [--bert_path=DIR] [--bert_heads=N] \
        [--data_format=vlp|precomp]

The family is recognised from the checkpoint (each family's `params.detect` looks at its
`opt` and its state-dict keys); `--model` forces it. The file is read safely (no code
from the pickle runs: only tensors and the authors' argparse options are accepted), and
the family's rule table (`dsran_jax/models/<family>/params.py`) maps every weight; every
unexpected key, missing key and shape mismatch is reported at once, naming the
checkpoint key. The workdir gets `config.json` (the options the checkpoint's `opt` holds
become its config, every `model.<family>` key written out), `checkpoints/best` (orbax)
and, where the family has them, `vocab.json` and other files: DSRAN's and MLASM's
checkpoints hold their ResNet-152, whose BatchNorm statistics drifted in training, and
it is written whole as `resnet152.safetensors` (named in the summary's `files`, `cnn`,
`cnn_weights`); extract the grid / global features of a converted workdir with it,
`python -m dsran_jax.extract --weights=<workdir>/resnet152.safetensors ...`, not with
torchvision's ImageNet weights. A new workdir is built in a temporary directory beside
it and renamed into place at the end, so a conversion that fails (or is killed) leaves
no workdir; into an existing workdir, its files are replaced one by one (each whole)
after the checkpoint step is written.
"""
import json
import os
import sys
import tempfile
import types
from typing import Any, Dict, Optional, Sequence

import numpy as np
from absl import app
from absl import flags

from dsran_jax import atomic, checkpointing, models
from dsran_jax import cli
from dsran_jax.convert.engine import ConversionError, check_finite, load_checkpoint
from dsran_jax.default_config import get_base_config
from dsran_jax.workdir import VOCAB_FILE, Workdir


def detect_family(ckpt: Dict[str, Any], path: str) -> str:
  """The one family whose `params.detect` recognises `ckpt`."""
  found = []
  for name in models.names():
    try:
      params = models.family_params(name)
    except ModuleNotFoundError:
      continue
    if params.detect(ckpt):
      found.append(name)
  if len(found) != 1:
    keys = ckpt.get("model")
    shown = (sorted(keys)[:6] if isinstance(keys, dict) else
             [sorted(k)[:4] for k in keys if isinstance(k, dict)] if isinstance(keys, list)
             else type(keys).__name__)
    what = ("no family recognises it" if not found else
            f"several families recognise it ({', '.join(found)})")
    raise ConversionError(f"{path}: {what}; pass --model=NAME. Its 'model' entry starts "
                          f"with {shown}")
  return found[0]


def _write_files(directory: str, converted) -> list[str]:
  """Writes the converted workdir's files but its checkpoint (config.json, vocab.json,
  the family's other files) into `directory`; returns their names."""
  names = [os.path.basename(Workdir(directory).save_config(converted.config))]
  if converted.vocab is not None:
    converted.vocab.save(os.path.join(directory, VOCAB_FILE))
    names.append(VOCAB_FILE)
  for name, write in converted.files.items():  # e.g. MLASM's resnet152.safetensors
    write(os.path.join(directory, name))
    names.append(name)
  return names


def _source_meta(ckpt: Dict[str, Any], path: str):
  """(step, checkpoint metadata) from the authors' `Eiters`, `epoch` and `best_rsum`,
  each a number or absent; anything else is refused naming the key."""
  values = {}
  for key in ("Eiters", "epoch", "best_rsum"):
    value = ckpt.get(key)
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
      value = value.item()  # a numpy scalar, or a 0-d tensor such as a saved rsum
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise ConversionError(f"{path}: '{key}' is a {type(value).__name__}, expected a "
                            "number")  # (its repr could be huge)
    values[key] = value
  step = int(values["Eiters"] or values["epoch"] or 0)
  best_rsum = None if values["best_rsum"] is None else float(values["best_rsum"])
  return step, {"step": step, "source_checkpoint": os.path.abspath(path),
                "epoch": values["epoch"], "Eiters": values["Eiters"], "best_rsum": best_rsum,
                "rsum": best_rsum, "converted_by": "dsran_jax.tools.convert_torch"}


def convert_checkpoint(checkpoint: str, workdir: str, model: Optional[str] = None,
                       **options) -> Dict[str, Any]:
  """Converts `checkpoint` into `workdir` (config.json, checkpoints/best, vocab.json, the
  family's files such as `resnet152.safetensors`).

  Args:
    checkpoint: the authors' `.pth.tar`.
    workdir: output directory.
    model: the family (default: recognised from the checkpoint).
    **options: family options (`vocab`, `bert_path`, `bert_heads`, `data_format`, ...).

  Returns a summary dict (family, widths, step, `files` written, `note` on what to do
  next, ...), also printed by the CLI.
  """
  data_format = options.get("data_format") or ""
  if data_format not in ("", "vlp", "precomp"):
    raise ValueError(f"--data_format={data_format!r}: expected 'vlp' or 'precomp'")
  ckpt = load_checkpoint(checkpoint)
  family = model or detect_family(ckpt, checkpoint)
  if family not in models.names():
    raise ConversionError(f"--model={family}: not a model family ({', '.join(models.names())})")
  try:
    rules = models.family_params(family)
  except ModuleNotFoundError:
    raise ConversionError(f"--model={family}: this family has no converter (no public "
                          "PyTorch code to convert from)") from None
  # The family fills in the base config (its model, the recipe the checkpoint's opt
  # records) and validates it with its own rules.
  converted = rules.convert(ckpt, {**options, "path": checkpoint}, config=get_base_config())
  check_finite(converted.variables, checkpoint)
  step, meta = _source_meta(ckpt, checkpoint)  # all checked before the first write
  if not os.path.exists(workdir):
    # Built in a temporary directory beside it and renamed into place whole: a failed
    # or killed conversion leaves no half workdir.
    with atomic.new_directory(workdir) as stage:
      _write_files(stage, converted)
      checkpointing.save(stage, checkpointing.BEST, step, converted.variables, meta)
  else:
    # An existing workdir: its files are replaced and the step added (replacing that
    # step and later ones, as a re-save does). Everything but the checkpoint is written
    # aside first, so a failure before the end leaves its files as they were.
    with tempfile.TemporaryDirectory(prefix=".convert-", suffix=".tmp", dir=workdir) as stage:
      names = _write_files(stage, converted)
      checkpointing.save(workdir, checkpointing.BEST, step, converted.variables, meta)
      for name in names:
        atomic.install(os.path.join(stage, name), os.path.join(workdir, name))
  written = [os.path.abspath(os.path.join(workdir, name)) for name in converted.files]
  return {"workdir": os.path.abspath(workdir), "model": family, **converted.summary,
          "step": step, "epoch": meta["epoch"], "best_rsum": meta["best_rsum"],
          "vocab_json": converted.vocab is not None, **({"files": written} if written else {})}


def _define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags and returns their holders; called under `__main__` only, so
  the module imports without flag collisions."""
  return types.SimpleNamespace(
      checkpoint=flags.DEFINE_string("checkpoint", None, "The authors' model_best.pth.tar."),
      workdir=flags.DEFINE_string("workdir", None, "Output dsran_jax workdir."),
      model=flags.DEFINE_string("model", None,
                                "Model family (default: recognised from the file)."),
      bert_path=flags.DEFINE_string(
          "bert_path", "", "DSRAN BERT build: BERT directory or hub name for the "
          "tokenizer (default bert-base-uncased for a BERT-base checkpoint)."),
      bert_heads=flags.DEFINE_integer(
          "bert_heads", None, "BERT attention heads (default: --bert_path's config.json, "
          "else the checkpoint's opt.bert_path, else hidden / 64)."),
      vocab=flags.DEFINE_string("vocab", "", "The authors' vocabulary (.pkl or .json) or a "
                                "dsran_jax vocab.json, for word-vocabulary models."),
      data_format=flags.DEFINE_enum(
          "data_format", "", ["", "vlp", "precomp"], "data.format of the workdir "
          "(default: the features the family's authors used)."),
  )


def main(argv: Sequence[str]) -> None:
  """CLI entry point: converts, then prints a JSON summary; errors are one message."""
  del argv
  f = _FLAGS
  if not f.checkpoint.value or not f.workdir.value:
    raise app.UsageError("--checkpoint and --workdir are required")
  try:
    summary = convert_checkpoint(f.checkpoint.value, f.workdir.value, model=f.model.value,
                                 bert_path=f.bert_path.value, bert_heads=f.bert_heads.value,
                                 vocab=f.vocab.value, data_format=f.data_format.value)
  except (ConversionError, ValueError, FileNotFoundError, OSError) as e:
    cli.fail(str(e))
  if "note" in summary:
    print(f"note: {summary['note']}", file=sys.stderr)
  print(json.dumps(summary))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  cli.run_cli(main)  # user errors: one `error:` line, exit 2

"""Every evaluation of a workdir kept: `evals/<id>/` holds each one's results, ranks,
sims and figure, `evals/index.json` lists them, and the top-level `eval_results.json`,
`ranks_<split>.npz` and `sims_<split>.npy` name the latest.

An evaluation's id names what decides its numbers: the checkpoint step, the split, the
evaluators and a digest of the model, data and evaluation settings (not of where the data
lies or how it is batched). A second evaluation with other settings (a two-stage one
after the full one, another `model.mlasm.global_mode`) gets its own directory; the same
checkpoint evaluated again with the same settings replaces its own entry, and says so.
"""
import datetime
import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
from absl import logging

from dsran_jax import atomic
from dsran_jax.evaluation.retrieval import headline
from dsran_jax.workdir import EVAL_RESULTS_FILE, RANKS_FILE, SIMS_FILE, Workdir

# Keys that change how an evaluation runs, never its numbers.
_NOT_SETTINGS = {"data": ("root", "tfds_dir"),
                 "eval": ("batch_size", "tile_images", "tile_captions", "save_sims")}


def evaluation_id(config, results: dict, evaluators: Sequence[str]) -> str:
  """`step<N>_<split>_<evaluators>_<digest of the settings>`."""
  settings = {section: {k: v for k, v in config[section].to_dict().items()
                        if k not in _NOT_SETTINGS.get(section, ())}
              for section in ("model", "data", "eval")}
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  step = results.get("checkpoint_step")
  return (f"step{step if step is not None else 'none'}_{results['split']}_"
          f"{'+'.join(evaluators)}_{digest.hexdigest()[:8]}")


def keep(wd: Workdir, results: dict, ranks: Dict[str, np.ndarray],
         sims_path: Optional[str], eval_id: str, evaluators: Sequence[str]) -> str:
  """Writes evaluation `eval_id` into `evals/<id>/`, makes the top-level files name it
  (the latest), and records it in `evals/index.json`; returns its directory."""
  directory = wd.evaluation_dir(eval_id)
  index = [e for e in wd.read_evaluations() if e["id"] != eval_id]
  if os.path.isdir(directory):
    logging.info("replacing evaluation %s (the same checkpoint and settings, evaluated "
                 "again)", eval_id)
  os.makedirs(directory, exist_ok=True)
  split = results["split"]
  kept = atomic.write_json(os.path.join(directory, EVAL_RESULTS_FILE), results)
  atomic.publish(kept, wd.eval_results_file)
  if ranks:
    kept = atomic.save_npz(os.path.join(directory, RANKS_FILE.format(split=split)), **ranks)
    atomic.publish(kept, wd.ranks_file(split))
  if sims_path and os.path.exists(sims_path):
    atomic.publish(sims_path, os.path.join(directory, SIMS_FILE.format(split=split)))
  try:
    rsum = headline(results)["rsum"]
  except KeyError:   # an evaluator without the retrieval protocols
    rsum = None
  index.append({"id": eval_id, "dir": os.path.relpath(directory, wd.path),
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "checkpoint_step": results.get("checkpoint_step"), "split": split,
                "evaluators": list(evaluators), "rsum": rsum})
  atomic.write_json(wd.evaluations_index_file, index)
  return directory

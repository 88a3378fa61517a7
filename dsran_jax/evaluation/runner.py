"""Evaluating a workdir: its model restored, its test split read, every evaluator the
config selects run, and `eval_results.json` written.

    python -m dsran_jax.main --mode=eval --workdir=DIR [--config.a.b=v ...]
    evaluation.evaluate_workdir(DIR)                      # from Python or a notebook
"""
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

from dsran_jax import data, validation
from dsran_jax.evaluation import registry
from dsran_jax.evaluation.retrieval import format_table
from dsran_jax.workdir import EVAL_RESULTS_FILE, Workdir


def evaluate_workdir(workdir, config=None, overrides: Optional[Mapping[str, Any]] = None,
                     save_sims: Optional[bool] = None, should_stop=None) -> dict:
  """Evaluates the best checkpoint of a workdir on `config.data.test_split`.

  Args:
    workdir: a dsran_jax workdir (trained or converted).
    config: the evaluation's config; default: the workdir's config.json with
      `overrides` ({"eval.batch_size": 64, "data.root": ...}) applied. Its `model`
      section must describe the checkpoint.
    save_sims: also save the sims matrix as `sims_<split>.npy` (default
      `eval.save_sims`).
  Returns:
    The dict written to `{workdir}/eval_results.json`: split, sizes, checkpoint step,
    model family, every evaluator's results and sections, and `protocol`.
  """
  wd = Workdir(workdir)
  if config is None:
    config = wd.load_config(overrides)
  validation.validate_config(config)
  data.format_module(config)
  evaluators = registry.selected(config)
  restored = wd.restore(config)
  split = data.load_split(config, config.data.test_split, wd.path)
  save_sims = config.eval.save_sims if save_sims is None else save_sims
  task = registry.Task(restored.model, restored.variables, config, split, wd.path,
                       wd.sims_file(split.name) if save_sims else None, should_stop)
  t0 = time.time()
  out = {"split": split.name, "checkpoint_step": restored.meta.get("step"),
         "model": config.model.name, "num_images": split.num_images,
         "num_captions": split.num_captions}
  protocol, ranks, sections, lines = {}, {}, {}, []
  for _, evaluator in evaluators:
    outcome = evaluator(task)
    out.update(outcome.results)
    protocol.update(outcome.protocol)
    ranks = ranks or outcome.ranks
    sections.update(outcome.sections)
    lines += outcome.lines
  out["protocol"] = protocol
  if split.caption_lengths is not None:  # how long the captions were, and any cut
    out["caption_lengths"] = split.caption_lengths.to_dict()
  out.update(sections)
  if jax.process_index() == 0:
    wd.write_json(EVAL_RESULTS_FILE, out)
    if ranks:
      np.savez(wd.ranks_file(split.name), **ranks)
  logging.info("evaluated %s (%d images, %d captions) in %.1fs%s", split.name,
               split.num_images, split.num_captions, time.time() - t0,
               f"; sims saved to {task.sims_path}" if task.sims_path else "")
  print(format_table({k: v for k, v in out.items() if k in protocol},
                     num_images=split.num_images))
  for line in lines:
    print(line)
  return out

"""Evaluating a workdir: its model restored, its test split read, every evaluator the
config selects run, and `eval_results.json` written.

    python -m dsran_jax.main --mode=eval --workdir=DIR [--config.a.b=v ...]
    evaluation.evaluate_workdir(DIR)                      # from Python or a notebook
"""
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Optional

import jax
from absl import logging

from dsran_jax import data, validation
from dsran_jax.evaluation import archive, registry
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
    The dict written to `{workdir}/evals/<id>/eval_results.json` (kept) and to
    `{workdir}/eval_results.json` (the latest): split, sizes, checkpoint step, model
    family, every evaluator's results and sections, `protocol` and `evaluation_id`.
  """
  wd = Workdir(workdir)
  if config is None:
    config = wd.load_config(overrides)
  validation.validate_config(config)
  format_module = data.format_module(config)
  evaluators = registry.selected(config)
  restored = wd.restore(config)
  split = data.load_split(config, config.data.test_split, wd.path)
  save_sims = config.eval.save_sims if save_sims is None else save_sims
  sims_path, tmpdir = wd.sims_file(split.name) if save_sims else None, None
  if sims_path is None and registry.needs_sims(config):
    # An evaluator reads the matrix after the retrieval evaluator: kept until the end.
    tmpdir = tempfile.mkdtemp(prefix="dsran_eval_sims_")
    sims_path = os.path.join(tmpdir, "sims.npy")
  task = registry.Task(restored.model, restored.variables, config, split, wd.path,
                       sims_path, should_stop, format_module)
  t0 = time.time()
  out = {"split": split.name, "checkpoint_step": restored.meta.get("step"),
         "model": config.model.name, "num_images": split.num_images,
         "num_captions": split.num_captions}
  protocol, ranks, sections, lines, table = {}, {}, {}, [], []
  try:
    for _, evaluator in evaluators:
      outcome = evaluator(task)
      out.update(outcome.results)
      table += list(outcome.results)
      protocol.update(outcome.protocol)
      ranks = ranks or outcome.ranks
      sections.update(outcome.sections)
      lines += outcome.lines
  finally:
    if tmpdir:
      shutil.rmtree(tmpdir, ignore_errors=True)
  out["protocol"] = protocol
  if split.caption_lengths is not None:  # how long the captions were, and any cut
    out["caption_lengths"] = split.caption_lengths.to_dict()
  out.update(sections)
  names = [name for name, _ in evaluators]
  eval_id = archive.evaluation_id(config, out, names)
  out["evaluation_id"] = eval_id
  kept = wd.evaluation_dir(eval_id)
  if jax.process_index() == 0:
    kept = archive.keep(wd, out, ranks, task.sims_path, eval_id, names)
  logging.info("evaluated %s (%d images, %d captions) in %.1fs; kept in %s (also %s, the "
               "latest)%s", split.name, split.num_images, split.num_captions,
               time.time() - t0, kept, EVAL_RESULTS_FILE,
               f"; sims saved to {task.sims_path}" if save_sims else "")
  print(format_table({k: out[k] for k in table}, num_images=split.num_images))
  for line in lines:
    print(line)
  return out

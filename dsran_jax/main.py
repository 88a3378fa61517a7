"""Command line: train then evaluate, or evaluate a workdir's best checkpoint.

    python -m dsran_jax.main --config=configs/f30k.py --workdir=DIR [--config.key=value ...]
    python -m dsran_jax.main --config=configs/f30k.py:scan --workdir=DIR
    python -m dsran_jax.main --workdir=DIR --mode=eval [--config.data.root=...] [--save_sims]

In eval mode the workdir's config.json (written by training or the converter) is the
config: the data settings a run trained with are reused, and only the `--config.a.b=v`
keys given on the command line change them (model keys included, e.g.
`--config.model.mlasm.global_mode=reference`). `--config` itself is then optional.
"""
import logging as py_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsran_jax import cli, data, evaluation, figures, train, validation
from dsran_jax.workdir import CONFIG_FILE, Workdir

# The default only types the --config.a.b=v overrides of `--mode=eval`, which apply to
# the workdir's config.json; training asks for a config file.
_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")
cli.define_config_file(  # a mistyped --config.a.b key: one line
    "config", _BASE_CONFIG, "Path to a configs/*.py file, optionally with a model family "
    "and recipe options (configs/f30k.py:sgraf,module=SAF); override keys with "
    "--config.a.b=v.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (default: workdirs/<config name>).")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train then evaluate; eval: evaluate the best checkpoint in workdir.")
flags.DEFINE_bool("save_sims", False, "Also save the test sims matrix as sims_<split>.npy.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host TPU/GPU).")
flags.DEFINE_string("coordinator_address", None, "With --distributed and no launcher that "
                    "JAX detects: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: processes in all.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's id.")
flags.DEFINE_bool("figures", True, "Draw training curves and Recall@K figures at the end.")
FLAGS = flags.FLAGS


def _eval_config(wd: Workdir):
  """The workdir's config with only the command line's explicit --config.* keys applied
  (the --config file itself when the workdir has no config.json)."""
  if not wd.has_config():
    if not wd.has_checkpoints():
      what = "no such directory" if not os.path.isdir(wd.path) else (
          f"no {CONFIG_FILE} and no checkpoints")
      raise app.UsageError(
          f"--workdir={wd.path}: {what}; --mode=eval evaluates a trained or converted "
          f"workdir (train one with --config=configs/...py, or convert a checkpoint with "
          f"python -m dsran_jax.tools.convert_torch)")
    if not FLAGS["config"].present:
      raise app.UsageError(f"{wd.path} has checkpoints but no {CONFIG_FILE}: give the "
                           f"--config=configs/...py it was trained with")
    return FLAGS.config
  overrides = config_flags.get_override_values(FLAGS["config"])
  for key, value in overrides.items():
    logging.info("eval: %s = %r (from the command line)", key, value)
  return wd.load_config(overrides)


def _quiet_platform_probe() -> None:
  """jax logs a WARNING-level traceback-like line when it looks for a TPU runtime that a
  CPU or GPU machine does not have; it is not an error, so it is dropped here."""
  class _Filter(py_logging.Filter):

    def filter(self, record):
      msg = record.getMessage()
      return not ("libtpu" in msg or "Unable to initialize backend 'tpu'" in msg)

  for name in ("jax._src.xla_bridge", "jax"):
    py_logging.getLogger(name).addFilter(_Filter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.mode == "train" and not FLAGS["config"].present:
    raise app.UsageError("--config is required to train (e.g. --config=configs/demo.py)")
  if FLAGS.mode == "eval" and not FLAGS.workdir:
    raise app.UsageError("--mode=eval needs --workdir (the run to evaluate)")
  logging.set_verbosity(logging.INFO)
  # Orbax reports every save/restore at INFO; keep our progress lines readable.
  logging.get_absl_handler().addFilter(
      lambda record: "/orbax/" not in record.pathname or record.levelno >= py_logging.WARNING)
  _quiet_platform_probe()
  if FLAGS.distributed:
    # TPU pods, Slurm and Open MPI need no arguments; a bare cluster names its coordinator.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  if FLAGS.workdir:
    workdir = FLAGS.workdir
  else:
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    workdir = os.path.join("workdirs", name)
  logging.info("devices: %s; workdir: %s", jax.devices(), workdir)
  if FLAGS.mode == "train":
    out = train.train_and_evaluate(FLAGS.config, workdir, save_sims=FLAGS.save_sims or None)
  else:
    out = evaluation.evaluate_workdir(workdir, _eval_config(Workdir(workdir)),
                                      save_sims=FLAGS.save_sims or None)
  if FLAGS.figures and "stopped_at" not in out and jax.process_index() == 0:
    try:
      for name, path in figures.evaluation_figures(workdir).items():
        logging.info("figure %s: %s", name, path)
    except Exception as e:  # pylint: disable=broad-except  # a plot must never cost a run
      logging.warning("could not draw figures: %s", e)


def _check_flags():
  """The run's config, validated as soon as the flags are parsed (before any data is read
  or anything compiled): train, the --config file; eval, the workdir's config.json with
  the command line's overrides."""
  config = None
  if FLAGS.mode == "train" and FLAGS["config"].present:
    config = FLAGS.config
  elif FLAGS.mode == "eval" and FLAGS.workdir:
    config = _eval_config(Workdir(FLAGS.workdir))
  if config is not None:
    validation.validate_config(config)
    data.format_module(config)  # the format's name, checked by its registry


def run():
  # Flag and config errors, and user errors raised later, as one `error:` line.
  cli.run_cli(main, check=_check_flags)


if __name__ == "__main__":
  run()

"""Command line: train then evaluate, or evaluate a workdir's best checkpoint.

    python -m dsran_jax.main --config=configs/f30k.py --workdir=DIR [--config.key=value ...]
    python -m dsran_jax.main --config=configs/f30k.py --workdir=DIR --mode=eval
"""
import logging as py_logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file; override keys with --config.a.b=v.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (default: workdirs/<config name>).")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train then evaluate; eval: evaluate the best checkpoint in workdir.")
flags.DEFINE_bool("save_sims", False, "Also save the test sims matrix as sims_<split>.npy.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host TPU/GPU).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax reports every save/restore at INFO; keep our progress lines readable.
  logging.get_absl_handler().addFilter(
      lambda record: "/orbax/" not in record.pathname or record.levelno >= py_logging.WARNING)
  import jax
  if FLAGS.distributed:
    jax.distributed.initialize()
  from dsran_jax import train
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  logging.info("devices: %s; workdir: %s", jax.devices(), workdir)
  if FLAGS.mode == "train":
    train.train_and_evaluate(config, workdir)
  else:
    train.evaluate_workdir(config, workdir, save_sims=FLAGS.save_sims or None)


if __name__ == "__main__":
  app.run(main)

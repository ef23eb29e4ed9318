"""Trains a model with DP-SGD: ``python main.py --config=configs/seq.py [--workdir=DIR]``.

This file is intentionally kept short: the logic lives in ``fastdp_jax`` where it can be
tested and imported in a notebook.
"""

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fastdp_jax import config as config_lib
from fastdp_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file (configs/*.py); override keys with --config.x.y=...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory; default runs/<time>")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  config_lib.validate(cfg)  # a typo fails here, before any work
  workdir = _WORKDIR.value or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
  logging.info("workdir %s", workdir)
  train.train_and_evaluate(cfg, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

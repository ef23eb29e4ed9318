"""Trains a model with DP-SGD: ``python main.py --config=configs/seq.py [--workdir=DIR]``.

Several processes (one per host): add ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` on each (or see ``configs/dist.py`` and ``python -m fastdp_jax.launch``).

This file is intentionally kept short: the logic lives in ``fastdp_jax`` where it can be
tested and imported in a notebook.
"""

import logging as std_logging
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fastdp_jax import checkpoint
from fastdp_jax import config as config_lib
from fastdp_jax import data
from fastdp_jax import distributed
from fastdp_jax import sampling
from fastdp_jax import train

# Errors that are the user's to fix: one clear line, no traceback, exit status 2.
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, data.ShardError,
                checkpoint.WorkdirLockedError, sampling.BatchOverflowError, FloatingPointError)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file (configs/*.py); override keys with --config.x.y=...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory; default runs/<time>")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 in a multi-process run (else "
    "$FASTDP_COORDINATOR_ADDRESS; else JAX's SLURM/Open MPI/Kubernetes detection; else one "
    "process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (hosts)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's rank, 0..N-1")
_INIT_TIMEOUT = flags.DEFINE_float("init_timeout_s", None,
                                   "wait this long for the coordinator and peers (default 90)")
_HEARTBEAT_TIMEOUT = flags.DEFINE_float(
    "heartbeat_timeout_s", None, "a process silent this long is dead; the others stop "
    "(default 60)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax logs about 20 INFO lines per checkpoint save, which would bury the progress bar and
  # the epoch lines; its warnings and errors still show, and so do our own INFO lines.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname)
  cfg = _CONFIG.value
  try:
    config_lib.validate(cfg)  # a typo fails here, before any work
  except ValueError as e:
    print(f"error: bad config: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  workdir = _WORKDIR.value or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
  logging.info("workdir %s", workdir)
  try:  # before any other JAX call
    topology = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        initialization_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)
  except (ValueError, distributed.CoordinatorUnreachableError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  logging.info("process %d of %d (%s): %d local devices, %d in all", jax.process_index(),
               jax.process_count(), topology.source, jax.local_device_count(),
               jax.device_count())
  with distributed.exit_promptly_on_failure():
    try:
      train.train_and_evaluate(cfg, workdir)
    except _USER_ERRORS as e:
      logging.error("%s: %s", type(e).__name__, e)
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

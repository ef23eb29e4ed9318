"""The trainer's command line: ``python -m fastdp_jax --config=configs/seq.py [--workdir=DIR]``.

Installed as ``fastdp-train``; ``main.py`` in the repository runs the same. Several processes
(one per host): add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on
each (or see ``configs/dist.py`` and ``python -m fastdp_jax.launch``).

An error that is the user's to fix (:class:`fastdp_jax.errors.UserError`: a bad config key or
value, a missing or corrupt dataset, a busy workdir, ...) is printed once, as one line
``error: ...``, and the exit status is 2; any other exception is a bug and keeps its traceback.
SIGTERM during training (a scheduler's preemption or time limit) checkpoints after the call
under way and exits with status 143 after one line ``stopped by SIGTERM after update N: ...``;
the same command resumes (:mod:`fastdp_jax.preemption`).

This file is intentionally kept short: the logic lives in ``fastdp_jax`` where it can be
tested and imported in a notebook. JAX is imported only once the flags and the config have
been checked, so that a mistake there is reported at once.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from fastdp_jax import config as config_lib
from fastdp_jax import errors

USAGE = ("usage: python -m fastdp_jax --config=CONFIG.py [--config.KEY=VALUE ...] "
         "[--workdir=DIR] (--help lists the options)")

# Errors that are the user's to fix: one line, no traceback, exit status 2. The OS's errors
# about a path name that path, and the paths are the user's (data.path, the workdir); a
# non-finite loss names the update and is fixed by the config (learning rate, clipping).
_USER_ERRORS = (errors.UserError, FileNotFoundError, FileExistsError, PermissionError,
                FloatingPointError)

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

_CONFIG_KEYS = flags.DEFINE_boolean(
    "config_keys", False, "print every config key with its value (of --config if given, else "
    "the defaults) and its comment, one line each, and exit")

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)")
# The trainer's own flags, in the order --help lists them (absl's and JAX's: --helpfull).
_OWN_FLAGS = ("config", "workdir", "config_keys", "coordinator_address", "num_processes",
              "process_id", "init_timeout_s", "heartbeat_timeout_s")
_HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")


def help_text() -> str:
  """The ``--help`` page: the usage line, then each option on one line.

  A command that reuses :func:`parse_flags` (``fastdp-tune``) gets its own flags listed after
  the trainer's, its program name in the usage line and its docstring's first line.
  """
  usage, about = USAGE, ("Trains a model with DP-SGD on a dataset directory and writes the run "
                         "(metrics, summary.json, model/) to --workdir.")
  names = list(_OWN_FLAGS)
  main = sys.modules["__main__"]
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    # absl names the flags of the program run (``python -m fastdp_jax.tune``) by its file.
    other = (main if module == getattr(main, "__file__", None)
             else sys.modules.get(module) if module.startswith("fastdp_jax.") else None)
    if other is not None and other is not sys.modules[__name__]:
      names += [f.name for f in defined if f.name not in names]
      doc = (other.__doc__ or "").strip().split("\n\n")[0]
      about = " ".join(doc.replace("``", "").split()) or about
      spec = getattr(other, "__spec__", None)
      program = spec.name if spec else module
      usage = USAGE.replace("python -m fastdp_jax ", f"python -m {program} ", 1)
  rows = [(f"--{name}", " ".join(flags.FLAGS[name].help.split())) for name in names]
  rows[1:1] = [("--config.KEY=VALUE", "override one config key, e.g. "
                "--config.dp.target_epsilon=1 (--config_keys lists the keys)")]
  rows += [("--help", "this page"), ("--helpfull", "every flag, absl's and JAX's included")]
  width = max(len(flag) for flag, _ in rows) + 2
  return "\n".join([usage, "", about, "", "options:"]
                   + [f"  {flag:<{width}}{text}" for flag, text in rows]) + "\n"


def _key_comments() -> dict[str, str]:
  """Each key's comment in :func:`fastdp_jax.config.base_config`'s source, its lines joined."""
  import inspect  # pylint: disable=g-import-not-at-top
  found: dict[str, str] = {}
  pattern = re.compile(r"^\s*(?:c\.)?([a-z_][\w.]*)\s*=\s*[^#\n]*?#\s*(.+)$")
  key = None  # the key whose comment the following comment-only lines continue
  for line in inspect.getsource(config_lib).splitlines():
    match = pattern.match(line)
    if match:
      key = match.group(1) if match.group(1) not in found else None
      if key:
        found[key] = match.group(2).strip()
    elif key and line.strip().startswith("#"):
      found[key] += " " + line.strip().lstrip("#").strip()
    else:
      key = None
  return found


def config_key_lines(cfg: Any) -> list[str]:
  """``KEY = VALUE  # comment`` for every key of ``cfg`` (a ConfigDict), groups left out."""
  comments = _key_comments()

  def walk(node: Any, prefix: str) -> list[str]:
    lines = []
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys"):
        lines += walk(value, f"{prefix}{key}.")
        continue
      note = comments.get(prefix + key)
      lines.append(f"{prefix}{key} = {value!r}" + (f"  # {note}" if note else ""))
    return lines

  return walk(cfg, "")


def _fail(message: object) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.USER_ERROR_EXIT_CODE)


def _describe(e: BaseException) -> str:
  # A config error names its key already; other classes (ShardError, WorkdirLockedError,
  # FileNotFoundError, ...) say what kind of problem it is.
  return str(e) if isinstance(e, errors.ConfigError) else f"{type(e).__name__}: {e}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with one-line errors (exit status 2) instead of tracebacks.

  A misspelt ``--config.KEY`` is caught here, before ``ml_collections`` would raise an
  ``AttributeError`` from deep inside the flag parser.
  ``--help`` prints :func:`help_text` and exits 0; ``--config_keys`` lists the config's keys
  and exits 0.
  """
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _HELP_ARGS:
      sys.stdout.write(help_text())
      sys.exit(0)
    match = _OVERRIDE.match(arg)
    if match:
      try:
        config_lib.check_key(match.group(1))
      except errors.ConfigError as e:
        _fail(e)
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:  # a config file that does not load, a value of the wrong type
    _fail(e)
  if _CONFIG_KEYS.value:
    cfg = _CONFIG.value if _CONFIG.value is not None else config_lib.base_config()
    print("\n".join(config_key_lines(cfg)))
    sys.exit(0)
  if _CONFIG.value is None:
    _fail(f"--config is required; {USAGE}")
  try:
    _CONFIG.value.keys()  # a config file that did not load raises its OSError when first used
  except OSError as e:
    _fail(f"--config: {' '.join(str(e).split())}")
  if len(rest) > 1:
    _fail(f"unexpected arguments {rest[1:]}; {USAGE}")
  return rest


class _DropUnavailableBackendNotes(std_logging.Filter):
  """Drops JAX's INFO line about backends that are not installed (``libtpu.so``).

  Every run on a machine without a TPU would otherwise print "Unable to initialize backend
  'tpu'"; warnings and errors from the same logger still show.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno < std_logging.WARNING
                and str(record.msg).startswith("Unable to initialize backend"))


def _quiet_library_logs() -> None:
  # Orbax logs about 20 INFO lines per checkpoint save, which would bury the progress bar and
  # the epoch lines; its warnings and errors still show, and so do our own INFO lines.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname)
  std_logging.getLogger("jax._src.xla_bridge").addFilter(_DropUnavailableBackendNotes())


def use_compilation_cache(cfg: Any) -> None:
  """Turns on the config's persistent compilation cache (``compilation_cache_dir``) for this
  process: a program compiled by an earlier run is read back instead of compiled. Call it
  before anything compiles (``fastdp-tune`` may call it too).

  A directory the user chose that cannot be used (not private, not creatable) is a one-line
  error; the default one, where the home is read-only or missing, only a warning: the run
  goes on uncached.
  """
  from fastdp_jax import services  # pylint: disable=g-import-not-at-top  (imports JAX)
  try:
    services.use_compilation_cache(cfg.compilation_cache_dir)
  except errors.UserError as e:
    if cfg.compilation_cache_dir != config_lib.DEFAULT_COMPILATION_CACHE:
      _fail(e)  # the user's own choice: theirs to fix
    logging.warning("running without a compilation cache: %s", e)


def main(argv: Sequence[str]) -> None:
  del argv  # checked by parse_flags
  _quiet_library_logs()
  cfg = _CONFIG.value
  try:
    config_lib.validate(cfg)  # a typo or a bad value fails here, before any work
  except errors.ConfigError as e:
    _fail(e)
  for name, value in (("init_timeout_s", _INIT_TIMEOUT.value),
                      ("heartbeat_timeout_s", _HEARTBEAT_TIMEOUT.value)):
    if value is not None and not value > 0:
      _fail(f"--{name}={value} must be positive")
  # JAX only now: the checks above answer in a fraction of a second.
  import jax  # pylint: disable=g-import-not-at-top
  from fastdp_jax import distributed  # pylint: disable=g-import-not-at-top
  from fastdp_jax import train  # pylint: disable=g-import-not-at-top
  try:  # the flags alone; resolve() starts nothing
    distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    _fail(e)
  use_compilation_cache(cfg)  # before anything compiles
  workdir = _WORKDIR.value or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
  logging.info("workdir %s", workdir)
  try:  # before any other JAX call
    topology = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        initialization_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)
  except errors.UserError as e:
    _fail(_describe(e))
  logging.info("process %d of %d (%s): %d local devices, %d in all", jax.process_index(),
               jax.process_count(), topology.source, jax.local_device_count(),
               jax.device_count())
  from fastdp_jax import preemption  # pylint: disable=g-import-not-at-top
  with distributed.exit_promptly_on_failure():
    try:
      train.train_and_evaluate(cfg, workdir)
    except _USER_ERRORS as e:
      _fail(_describe(e))
    except preemption.Preempted as e:  # checkpointed: a stop, not a failure to report
      print(e, file=sys.stderr, flush=True)
      sys.exit(preemption.EXIT_CODE)


def run() -> None:
  """The ``fastdp-train`` console entry point (and ``python -m fastdp_jax``)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()

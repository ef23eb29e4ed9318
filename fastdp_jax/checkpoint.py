"""Checkpoints that resume with their privacy state, and the workdir lock.

A checkpoint (orbax, ``WORKDIR/checkpoints/STEP/``) holds the training state (parameters,
optimizer state with the noise key zeroed and the noise counter, the update count) and the
:class:`RunState` as JSON: the privacy ledger, what the run must not silently change
(privacy parameters, model, data digest, seeds), the epochs' records and the current epoch's
partial sums. The secret keys live apart, in ``WORKDIR/keys.json`` (:mod:`fastdp_jax.dp.keys`).
The sampler needs no state of its own: its batches are a function of (sampling key, row,
update).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash during a save leaves the previous checkpoint intact. In multi-host runs every process
takes part in the save (the arrays are global); only process 0 writes the metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import orbax.checkpoint as ocp

from fastdp_jax.dp import accounting
from fastdp_jax import errors
from fastdp_jax.data import batch_format
from fastdp_jax.dp import count as count_lib
from fastdp_jax.dp import keys as keys_lib

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


class WorkdirLockedError(errors.UserError):
  """Another run holds the workdir."""


# What killed writers leave beside an output (fastdp_jax.atomic): a file being written, an
# output being staged, a replaced output being deleted. Each may hold private rows or keys.
_LEFTOVER_KINDS = ("tmp", "staging", "old")


def _leftovers_beside(path: str) -> list[str]:
  """The ``.NAME.KIND-*`` siblings that writers of ``path`` left (any owner, any kind)."""
  parent, name = os.path.split(os.path.abspath(path))
  return sorted(p for kind in _LEFTOVER_KINDS
                for p in glob.glob(os.path.join(glob.escape(parent),
                                                glob.escape(f".{name}.{kind}-") + "*")))


def _workdir_leftovers(workdir: str) -> list[str]:
  """Every ``.NAME.KIND-*`` entry in the workdir: keys.json, summary.json, model/... being
  written when a process died."""
  return sorted(os.path.join(workdir, e) for e in os.listdir(workdir)
                if e.startswith(".") and any(f".{kind}-" in e for kind in _LEFTOVER_KINDS))


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def forget(workdir: str, *, batches: str | None = None) -> list[str]:
  """Deletes every private leftover of a finished run from which its batches or noise could
  be recomputed, and leaves a marker that refuses a resume; returns what it removed.

  Removed: ``checkpoints/``, ``keys.json``, ``num_examples.json`` (the count's record, which
  names the data's digest), the temporary files and staging directories that
  killed writers left in the workdir, and, with ``batches``, the materialised batch directory
  the run trained from (its shards ARE the run's batches, in update order, and its
  ``private/`` holds the sampling key) with the staging directories beside it. A ``batches``
  path that is not a batch directory (no run manifest) is left alone and said so. The
  exported model, the summary and the metrics stay.

  Args:
    workdir: the finished run's directory (nothing may be running in it).
    batches: the run's ``data.batches``, or None (in memory, or kept on purpose).

  Returns:
    One line per path removed or left (``removed PATH`` / ``kept PATH: why``).
  """
  done = []
  targets = [os.path.join(workdir, CHECKPOINT_DIR), os.path.join(workdir, keys_lib.KEYS_FILE),
             os.path.join(workdir, count_lib.COUNT_FILE), *_workdir_leftovers(workdir)]
  if batches:
    if os.path.isfile(os.path.join(batches, batch_format.RUN_MANIFEST)):
      targets += [batches, *_leftovers_beside(batches)]
    elif os.path.exists(batches):
      done.append(f"kept {batches}: not a batch directory (no {batch_format.RUN_MANIFEST})")
  for path in targets:
    if os.path.lexists(path):
      _remove(path)
      done.append(f"removed {path}")
  keys_lib.forget(workdir)  # the marker; keys.json is gone already
  return done


def zero_partial() -> dict[str, float]:
  """The current epoch's training-row sums before its first update."""
  return dict(loss_sum=0.0, count=0.0, clipped=0.0, nonfinite=0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunState:
  """What a checkpoint holds besides the arrays, saved and restored as one object.

  Attributes:
    identity: what a resumed run must share with its checkpoint (privacy, model, data).
    ledger: the privacy ledger of every update so far.
    history: the epoch records so far.
    partial: the current epoch's training-row sums (loss, count, clipped, non-finite).
    overrides: the changes accepted by each resume with ``checkpoint.allow_changes``.
  """

  identity: dict[str, Any]
  ledger: accounting.PrivacyLedger
  history: tuple[dict[str, Any], ...] = ()
  partial: dict[str, float] = dataclasses.field(default_factory=zero_partial)
  overrides: tuple[tuple[str, ...], ...] = ()

  def to_json(self) -> dict[str, Any]:
    return dict(identity=self.identity, ledger=self.ledger.to_json(),
                history=list(self.history), partial=dict(self.partial),
                overrides=[list(o) for o in self.overrides])

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> RunState:
    return cls(identity=d["identity"], ledger=accounting.PrivacyLedger.from_json(d["ledger"]),
               history=tuple(d["history"]), partial=dict(d["partial"]),
               overrides=tuple(tuple(o) for o in d["overrides"]))


class WorkdirLock:
  """An exclusive lock on the workdir (``fcntl.flock``; released when the process dies)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._f: TextIO | None = None

  def acquire(self) -> None:
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.close()
      raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                               "(lock held); wait for it or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._f = f

  def release(self) -> None:
    if self._f is not None:
      fcntl.flock(self._f, fcntl.LOCK_UN)
      self._f.close()
      self._f = None


def check_writable(workdir: str) -> None:
  """Fails before any work if the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")  # one per process (multi-host)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(f"workdir {workdir} is not writable ({e.strerror}); choose another "
                          "--workdir") from e


class _CheckpointManager(ocp.CheckpointManager):
  """Orbax's manager, minus its own calls to JAX's preemption sync point.

  ``multihost_utils.reached_preemption_sync_point`` must be called by one caller, after every
  training call, with an id that grows by one per call (the agreed stop is "the largest id
  any process has reached, plus one"). The trainer does that
  (:mod:`fastdp_jax.preemption`); orbax would also call it from every save with the
  update number, which grows by ``steps_per_call``, and the two sequences together could
  make the processes disagree on where to stop.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """Saves and restores ``(state, metadata)`` in ``WORKDIR/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._mngr = _CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))
    self._closed = False
    # When the last save ended (time.monotonic()); at first, when this run opened the
    # directory: what checkpoint.min_interval_s counts from (services.Services.epoch_end).
    self.last_save_time = time.monotonic()

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, run_state: RunState) -> None:
    if step in (self._mngr.all_steps() or []):
      return  # already saved at this step (e.g. an epoch end that is also a periodic save)
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(run_state.to_json())))
    self._mngr.wait_until_finished()
    self.last_save_time = time.monotonic()

  def restore_metadata(self) -> RunState:
    """The latest checkpoint's run state only (to check it before restoring arrays)."""
    r = self._mngr.restore(self._mngr.latest_step(),
                           args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return RunState.from_json(r["meta"])

  def restore(self, like_state: Any) -> tuple[Any, RunState]:
    """Restores the latest checkpoint into the structure and shardings of ``like_state``."""
    step = self._mngr.latest_step()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return r["state"], RunState.from_json(r["meta"])

  def close(self) -> None:
    if not self._closed:
      self._mngr.close()
      self._closed = True


def compare_identity(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """What differs between a checkpoint's identity record and the current run's."""
  diffs = []
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      diffs.append(f"{key}: checkpoint {saved.get(key)!r} != now {current.get(key)!r}")
  return diffs


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m fastdp_jax.checkpoint forget WORKDIR``: drop a finished run's keys."""
  parser = argparse.ArgumentParser(prog="python -m fastdp_jax.checkpoint",
                                   description="Manage a run's checkpoints and keys.")
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("forget", help="delete every private leftover of a finished run from "
                     "which its batches or noise could be recomputed: keys, checkpoints, "
                     "staging leftovers and the materialised batches it trained from")
  f.add_argument("workdir", help="the finished run's workdir")
  f.add_argument("--keep-batches", action="store_true",
                 help="keep the run's data.batches directory (e.g. for another run)")
  args = parser.parse_args(argv)
  summary_path = os.path.join(args.workdir, "summary.json")
  if not os.path.isfile(summary_path):
    print(f"error: {args.workdir} holds no finished run (no summary.json); nothing deleted",
          file=sys.stderr)
    return 2
  with open(summary_path) as fh:
    batches = None if args.keep_batches else json.load(fh).get("batches")
  lock = WorkdirLock(args.workdir)
  try:
    lock.acquire()  # a run resumed in the workdir would recreate what is deleted
  except WorkdirLockedError as e:
    print(f"error: {e}; nothing deleted", file=sys.stderr)
    return 2
  try:
    for line in forget(args.workdir, batches=batches):
      print(line)
  finally:
    lock.release()
  print(f"{args.workdir}: the run's keys and checkpoints"
        + (", and its batches," if batches else "") + " are deleted; it cannot be resumed")
  return 0


if __name__ == "__main__":
  sys.exit(main())

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
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import orbax.checkpoint as ocp

from fastdp_jax.dp import accounting
from fastdp_jax import errors
from fastdp_jax.dp import keys as keys_lib

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


class WorkdirLockedError(errors.UserError):
  """Another run holds the workdir."""


def forget(workdir: str) -> None:
  """Deletes the keys and checkpoints of a finished run, leaving a marker that refuses resume.

  The exported model, the summary and the metrics stay. Without the keys nobody (the
  operator included) can recompute the batches or the noise of the run.
  """
  shutil.rmtree(os.path.join(workdir, CHECKPOINT_DIR), ignore_errors=True)
  keys_lib.forget(workdir)


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

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, run_state: RunState) -> None:
    if step in (self._mngr.all_steps() or []):
      return  # already saved at this step (e.g. an epoch end that is also a periodic save)
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(run_state.to_json())))
    self._mngr.wait_until_finished()

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
  f = sub.add_parser("forget", help="delete the keys and checkpoints of a finished run")
  f.add_argument("workdir")
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.workdir, "summary.json")):
    print(f"error: {args.workdir} holds no finished run (no summary.json); nothing deleted",
          file=sys.stderr)
    return 2
  forget(args.workdir)
  print(f"deleted the keys and checkpoints of {args.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

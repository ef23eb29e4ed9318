"""Checkpoints that resume with their privacy state, and the workdir lock.

A checkpoint (orbax, ``WORKDIR/checkpoints/STEP/``) holds the training state (parameters,
optimizer state -- which carries the noise key and the noise counter --, the update count)
and JSON metadata: the accountant's ledger (every segment of updates with its sigma and q),
what the run must not silently change (privacy parameters, model, data digest, sampling
seed), the epochs' metric records and the current epoch's partial sums. The sampler needs no
state of its own: its batches are a function of (seed, step).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash during a save leaves the previous checkpoint intact. In multi-host runs every process
takes part in the save (the arrays are global); only process 0 writes the metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import numpy as np
import orbax.checkpoint as ocp

from fastdp_jax import accounting
from fastdp_jax import errors
from fastdp_jax import release

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
KEYS_FILE = "keys.json"  # the secret keys, owner-only, apart from the checkpoints' arrays
KEYS_DELETED = "KEYS_DELETED"  # left by forget(): the run is over and cannot be resumed


class ResumeMismatchError(errors.UserError):
  """A resumed run differs from its checkpoint in something that must not change silently."""


class WorkdirLockedError(errors.UserError):
  """Another run holds the workdir."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunKeys:
  """The run's secret randomness.

  Attributes:
    sampling: uint64[2], the Poisson sampling key.
    noise: uint32[4], the noise key.
    sampling_fixed: the sampling key came from ``dp.sampling_seed`` (public).
    noise_fixed: the noise key came from ``dp.noise_seed`` (public).
  """

  sampling: np.ndarray
  noise: np.ndarray
  sampling_fixed: bool
  noise_fixed: bool

  def __repr__(self) -> str:  # never prints a key
    return f"RunKeys(sampling_fixed={self.sampling_fixed}, noise_fixed={self.noise_fixed})"

  def to_json(self) -> str:
    return json.dumps(dict(sampling=[int(w) for w in self.sampling],
                           noise=[int(w) for w in self.noise],
                           sampling_fixed=self.sampling_fixed, noise_fixed=self.noise_fixed))

  @classmethod
  def from_json(cls, text: str) -> RunKeys:
    d = json.loads(text)
    return cls(sampling=np.asarray(d["sampling"], np.uint64),
               noise=np.asarray(d["noise"], np.uint32),
               sampling_fixed=bool(d["sampling_fixed"]), noise_fixed=bool(d["noise_fixed"]))


def save_keys(workdir: str, keys: RunKeys) -> None:
  """Writes the keys to ``WORKDIR/keys.json`` (owner-only, atomic)."""
  release.write_private_file(os.path.join(workdir, KEYS_FILE), keys.to_json())


def load_keys(workdir: str) -> RunKeys | None:
  """The keys saved in ``workdir``, or None."""
  path = os.path.join(workdir, KEYS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return RunKeys.from_json(f.read())


def forget(workdir: str) -> None:
  """Deletes the keys and checkpoints of a finished run, leaving a marker that refuses resume.

  The exported model, the summary and the metrics stay. Without the keys nobody (the
  operator included) can recompute the batches or the noise of the run.
  """
  shutil.rmtree(os.path.join(workdir, CHECKPOINT_DIR), ignore_errors=True)
  path = os.path.join(workdir, KEYS_FILE)
  if os.path.exists(path):
    os.remove(path)
  with open(os.path.join(workdir, KEYS_DELETED), "w") as f:
    f.write("the keys and checkpoints of this run were deleted; it cannot be resumed\n")


def check_not_forgotten(workdir: str) -> None:
  """Refuses to train in a workdir whose keys were deleted (it would restart from scratch)."""
  if os.path.exists(os.path.join(workdir, KEYS_DELETED)):
    raise ResumeMismatchError(
        f"workdir {workdir} holds a finished run whose keys and checkpoints were deleted; "
        "use another --workdir (training again on the same data spends privacy budget again)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment:
  """``steps`` consecutive updates with the same privacy parameters (one ledger entry)."""

  noise_multiplier: float
  sampling_rate: float
  steps: int


def ledger_epsilon(segments: list[Segment], delta: float, accountant: str) -> float:
  """Epsilon of a sequence of DP-SGD segments, composed by ``dp_accounting``.

  One segment uses the configured accountant. Several segments (a resume with
  ``checkpoint.allow_changes``, whose parameters may have been chosen after seeing earlier
  results) are composed with the RDP accountant: RDP composition holds under adaptive choice
  of each segment's parameters when the total is compared with a budget fixed in advance
  (``dp.max_epsilon``; a Renyi filter, Feldman & Zrnic 2021).
  """
  segments = [s for s in segments if s.steps > 0]
  if not segments:
    return 0.0
  if len(segments) == 1:
    s = segments[0]
    return accounting.compute_epsilon(s.noise_multiplier, s.sampling_rate, s.steps, delta,
                                      accountant)
  acc = accounting.make_accountant("rdp")
  for s in segments:
    if s.noise_multiplier <= 0:
      return float("inf")
    acc.compose(accounting.dp_event(s.noise_multiplier, s.sampling_rate, s.steps))
  return float(acc.get_epsilon(delta))


def add_steps(segments: list[Segment], noise_multiplier: float, sampling_rate: float,
              steps: int) -> list[Segment]:
  """The ledger after ``steps`` more updates (merged into the last segment if it matches)."""
  out = list(segments)
  if out and (out[-1].noise_multiplier, out[-1].sampling_rate) == (noise_multiplier,
                                                                    sampling_rate):
    out[-1] = dataclasses.replace(out[-1], steps=out[-1].steps + steps)
  else:
    out.append(Segment(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                       steps=steps))
  return out


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


class Checkpointer:
  """Saves and restores ``(state, metadata)`` in ``WORKDIR/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    if step in (self._mngr.all_steps() or []):
      return  # already saved at this step (e.g. an epoch end that is also a periodic save)
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(metadata)))
    self._mngr.wait_until_finished()

  def restore_metadata(self) -> dict[str, Any]:
    """The latest checkpoint's metadata only (to check it before restoring arrays)."""
    r = self._mngr.restore(self._mngr.latest_step(),
                           args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return r["meta"]

  def restore(self, like_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the latest checkpoint into the structure and shardings of ``like_state``."""
    step = self._mngr.latest_step()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return r["state"], r["meta"]

  def close(self) -> None:
    self._mngr.close()


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

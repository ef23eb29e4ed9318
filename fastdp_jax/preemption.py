"""Stopping on SIGTERM with a checkpoint: what a cluster's preemption or time limit sends.

A scheduler (SLURM's time limit or ``scancel``, Kubernetes, a spot VM being reclaimed) sends
SIGTERM and, a grace period later, SIGKILL. On SIGTERM the trainer finishes the call under way,
checkpoints (parameters, optimizer and privacy state, both keys), and stops with exit status
:data:`EXIT_CODE`; the same command resumes it, as after a crash, without losing the updates
since the last periodic checkpoint.

* One process: a Python handler notes the signal (installed for the training loop only, in
  the main thread, and restored after it). Without a checkpointer
  (``checkpoint.enabled=False``) nothing is installed and SIGTERM ends the process as usual.
* Several processes: JAX's coordination service already owns SIGTERM (the preemption notifier
  that ``jax.distributed.initialize`` starts tells every process), and
  ``multihost_utils.reached_preemption_sync_point`` returns True on every process after the
  same call: each process asks after every call, with the number of calls it has made since
  it started (the same sequence on every process, as the function requires).

Privacy: the update at which a run stops is chosen by the signal's arrival, not by the data;
the checkpoint written is an ordinary one (private, owner-only: docs/privacy.md).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class Preempted(Exception):  # noqa: N818  (a stop, not an error)
  """The run stopped on SIGTERM after checkpointing update ``step`` (exit status 143)."""

  def __init__(self, step: int, workdir: str):
    self.step, self.workdir = step, workdir
    super().__init__(f"stopped by SIGTERM after update {step}: checkpoint saved in {workdir}; "
                     "run the same command to resume")


class Watch:
  """Whether a SIGTERM asks the run to stop, asked once after every call."""

  def __init__(self, enabled: bool):
    self._enabled = enabled
    self._multi = jax.process_count() > 1
    self._got_sigterm = False
    self._calls = 0

  @contextlib.contextmanager
  def armed(self) -> Iterator[None]:
    """Installs the one-process SIGTERM handler for the duration of the training loop."""
    if (not self._enabled or self._multi
        or threading.current_thread() is not threading.main_thread()):
      yield
      return

    def note(signum, frame):
      del signum, frame
      self._got_sigterm = True

    previous = signal.signal(signal.SIGTERM, note)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)

  def requested(self) -> bool:
    """True after the call at which this run (every process of it) stops.

    In a multi-process run this is collective in effect: every process must ask after every
    call, and all of them get True after the same one.
    """
    if not self._enabled:
      return False
    self._calls += 1
    if not self._multi:
      return self._got_sigterm
    try:
      return bool(multihost_utils.reached_preemption_sync_point(self._calls))
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      self._enabled = False
      return False

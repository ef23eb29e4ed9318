"""When things happen in a run: the one place that decides each compiled call's length.

A run is a sequence of compiled calls of at most ``steps_per_call`` updates. A call ends early
at the next *event*: an epoch end, a logging point, a periodic checkpoint, an edge of the
profiler's trace window, or the budget's stop. The updates themselves do not depend on where
calls end (each call runs a masked ``lax.scan``), so the schedule changes timing, never
results.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
  """The event steps of a run.

  Attributes:
    steps_per_epoch: updates per epoch.
    stop_at: the update count the run stops at (the plan's total, or the budget's stop).
    steps_per_call: the compiled call length.
    log_every: a logging point every this many updates (0: epoch ends only).
    checkpoint_every: a checkpoint every this many updates (0: epoch ends only).
    profile_window: ``(first, last)`` updates of the profiler's trace, or None.
  """

  steps_per_epoch: int
  stop_at: int
  steps_per_call: int
  log_every: int = 0
  checkpoint_every: int = 0
  profile_window: tuple[int, int] | None = None

  def is_epoch_end(self, step: int) -> bool:
    return step == self.stop_at or (step > 0 and step % self.steps_per_epoch == 0)

  def is_log_point(self, step: int) -> bool:
    """A logging point that is not an epoch end (epoch ends log on their own)."""
    return (self.log_every > 0 and step % self.log_every == 0 and step > 0
            and not self.is_epoch_end(step))

  def is_checkpoint(self, step: int) -> bool:
    """A periodic checkpoint (epoch ends are checkpointed as well)."""
    return self.checkpoint_every > 0 and step > 0 and step % self.checkpoint_every == 0

  def next_event(self, step: int) -> int:
    """The first event step after ``step``."""
    events = [self.stop_at, (step // self.steps_per_epoch + 1) * self.steps_per_epoch]
    for every in (self.log_every, self.checkpoint_every):
      if every > 0:
        events.append((step // every + 1) * every)
    if self.profile_window is not None:
      events += [e for e in self.profile_window if e > step]
    return min(e for e in events if e > step)

  def call_length(self, step: int) -> int:
    """How many updates the next compiled call from ``step`` runs."""
    return min(self.steps_per_call, self.next_event(step) - step)

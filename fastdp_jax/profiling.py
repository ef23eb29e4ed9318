"""Where a training run spends its time: a per-phase table and a JAX profiler trace.

The counterpart of the original system's cProfile hot-spot analysis, for a program whose hot
loop runs on the device: with ``--config.profile_steps=N`` the training loop

* times its host-side phases (``sampling`` the Poisson batches, ``data transfer`` of the
  sampled indices to the devices, the compiled ``step`` calls, ``evaluation``,
  ``accounting``; the profiler's own start and stop apart; ``other`` is the rest: logging,
  metrics files, checkpoints, attacks) and prints a table at the end, also written to
  ``WORKDIR/profile/phases.json``;
* writes a JAX profiler trace of N updates into ``WORKDIR/profile`` (TensorBoard's profile
  plugin reads ``plugins/profile/*/*.xplane.pb``; ``perfetto_trace.json.gz`` opens in
  https://ui.perfetto.dev). The traced window starts after the first call, which compiles,
  when the run is long enough, and calls are cut at the window's edges so that it holds
  exactly N updates.

Phases are measured with wall clocks on the host. JAX dispatches device work asynchronously,
so while profiling, :meth:`Profiler.sync` waits for a phase's device work before its clock
stops; without profiling nothing waits and the table is not printed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import jax

from fastdp_jax import atomic

PHASES = ("sampling", "data transfer", "step", "evaluation", "accounting")
FIRST_STEP_CALL = "step, first call (compiles)"
TRACER = "profiler (trace start/stop)"  # the cost of profiling itself, booked apart


class Profiler:
  """Per-phase timer of the training loop and the trace of a window of updates.

  Args:
    workdir: the run's directory; the trace and ``phases.json`` go to ``workdir/profile``.
    profile_steps: N, the number of updates to trace; 0 disables profiling (then the phases
      are still timed, without waiting for the device, and nothing is reported).
    first_step: the update the loop starts from (non-zero when resuming).
    last_step: the update the loop stops at.
    steps_per_call: the compiled call length.

  Example::

    prof = Profiler(workdir, 10, first_step=0, last_step=1000, steps_per_call=128)
    k = prof.call_length(step, k)
    with prof.phase("sampling"):
      batches = sampler.batches(step, k)
    prof.before_call(step)
    with prof.phase("step"):
      state, m = run(...)
    prof.after_call(step + k, state)
    print(prof.report())
  """

  def __init__(self, workdir: str, profile_steps: int, *, first_step: int, last_step: int,
               steps_per_call: int):
    if profile_steps < 0:
      raise ValueError(f"{profile_steps=} must be non-negative")
    self.enabled = profile_steps > 0
    self.directory = os.path.join(workdir, "profile")
    # Skip the first call (compilation) when enough updates remain to trace N after it.
    start = first_step
    if last_step - first_step >= steps_per_call + profile_steps:
      start = first_step + steps_per_call
    self.trace_start = start
    self.trace_end = min(start + profile_steps, last_step)
    self._seconds: dict[str, float] = collections.defaultdict(float)
    self._calls: dict[str, int] = collections.defaultdict(int)
    self._tracing = False
    self._traced = False
    self._t0 = time.perf_counter()

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Adds the wall time of the ``with`` body to phase ``name``.

    The first ``'step'`` call is booked apart (:data:`FIRST_STEP_CALL`): it compiles.
    """
    if name == "step" and not self._calls[FIRST_STEP_CALL]:
      name = FIRST_STEP_CALL
    annotation = (jax.profiler.TraceAnnotation(name) if self._tracing
                  else contextlib.nullcontext())
    t0 = time.perf_counter()
    try:
      with annotation:
        yield
    finally:
      self._seconds[name] += time.perf_counter() - t0
      self._calls[name] += 1

  def sync(self, tree: Any) -> Any:
    """Waits for ``tree``'s device work when profiling (so the phase's clock includes it)."""
    return jax.block_until_ready(tree) if self.enabled else tree

  def call_length(self, step: int, k: int) -> int:
    """Shortens a call of ``k`` updates from ``step`` so it does not cross the trace window's
    edges (the compiled call runs fewer active updates; nothing recompiles)."""
    if self.enabled:
      for edge in (self.trace_start, self.trace_end):
        if step < edge < step + k:
          k = edge - step
    return k

  def before_call(self, step: int) -> None:
    """Starts the trace when the call from ``step`` opens the window."""
    if self.enabled and not self._traced and not self._tracing and step == self.trace_start:
      with self.phase(TRACER):
        os.makedirs(self.directory, exist_ok=True)
        jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self._tracing = True

  def after_call(self, step: int, outputs: Any) -> None:
    """Stops the trace once the updates up to ``step`` are done and the window is full."""
    if self._tracing and step >= self.trace_end:
      jax.block_until_ready(outputs)
      self._tracing = False
      with self.phase(TRACER):
        jax.profiler.stop_trace()  # writes the trace files
      self._traced = True

  def close(self) -> None:
    """Stops a trace still running (a run that ended inside the window)."""
    if self._tracing:
      self._tracing = False
      with self.phase(TRACER):
        jax.profiler.stop_trace()
      self._traced = True

  def phases(self) -> dict[str, dict[str, float]]:
    """``{phase: {'seconds', 'calls'}}`` so far, with ``'other'``: the rest of the wall time
    (attack, checkpoints, logging)."""
    wall = time.perf_counter() - self._t0
    names = [p for p in (FIRST_STEP_CALL, *PHASES, TRACER) if p in self._seconds]
    names += sorted(set(self._seconds) - set(names))
    out = {n: dict(seconds=self._seconds[n], calls=self._calls[n]) for n in names}
    out["other"] = dict(seconds=max(0.0, wall - sum(self._seconds.values())), calls=0)
    out["total"] = dict(seconds=wall, calls=0)
    return out

  def table(self) -> str:
    """The phases as a fixed-width text table (seconds, calls, ms per call, share of wall)."""
    rows = self.phases()
    wall = rows["total"]["seconds"] or 1.0
    lines = [f"{'phase':<30}{'seconds':>10}{'calls':>8}{'ms/call':>10}{'share':>8}"]
    for name, r in rows.items():
      per = f"{1e3 * r['seconds'] / r['calls']:.3f}" if r["calls"] else ""
      calls = str(r["calls"]) if r["calls"] else ""
      lines.append(f"{name:<30}{r['seconds']:>10.3f}{calls:>8}{per:>10}"
                   f"{100 * r['seconds'] / wall:>7.1f}%")
    return "\n".join(lines)

  def report(self) -> str | None:
    """Ends profiling: stops the trace, writes ``phases.json``; returns the table (``None``
    when profiling is off)."""
    self.close()
    if not self.enabled:
      return None
    os.makedirs(self.directory, exist_ok=True)
    atomic.write_json(os.path.join(self.directory, "phases.json"),
                      dict(phases=self.phases(), trace_steps=[self.trace_start, self.trace_end],
                           trace_written=self._traced), mode=0o600)
    return (f"time per phase (trace of updates {self.trace_start}..{self.trace_end} in "
            f"{self.directory}):\n" + self.table())

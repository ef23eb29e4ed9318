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

After the loop, the run's last work is timed too (:meth:`Profiler.finish`, when the run
ends): the final ``evaluation`` of the calibrated model, the ``privacy evaluation``'s loss
pass, the ``calibration``'s pass over the validation rows and the ``export`` of ``model/``,
each booked by the function that does it (:func:`booked`); with the start-up before the loop
(imports, data, privacy plan, model) and the process's CPU seconds (on a shared machine the
steadier figure), they go into a second table and ``phases.json``'s ``after_loop``.

Phases are measured with wall clocks on the host. JAX dispatches device work asynchronously,
so while profiling, :meth:`Profiler.sync` waits for a phase's device work before its clock
stops; without profiling nothing waits and the table is not printed. A phase inside another
(an evaluation inside the loop's ``evaluation``) is booked once, to the outer one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from fastdp_jax import atomic

# JAX is imported where the profiler uses it, not here: the exported model's writer books
# its time (books("export")) and must stay importable without JAX.

PHASES = ("sampling", "data transfer", "step", "evaluation", "accounting")
FIRST_STEP_CALL = "step, first call (compiles)"
TRACER = "profiler (trace start/stop)"  # the cost of profiling itself, booked apart
# After the loop, in the order a run does them (fastdp_jax.train.finalize).
AFTER_LOOP = ("privacy evaluation", "evaluation", "export")
START_UP = "start-up, before the loop"  # imports, data, privacy plan, model

_active: Profiler | None = None  # the running run's, for booked()


def activate(prof: Profiler | None) -> None:
  """Makes ``prof`` the profiler :func:`booked` books into (``None``: none)."""
  global _active
  _active = prof


@contextlib.contextmanager
def booked(name: str) -> Iterator[None]:
  """Books the ``with`` body as phase ``name`` of the active run's profiler, if any.

  For work that the loop's caller does not time itself (the evaluation, calibration and
  export after the loop): the function doing it books itself, wherever it is called from.
  """
  if _active is None:
    yield
  else:
    with _active.phase(name):
      yield


_P = ParamSpec("_P")
_R = TypeVar("_R")


def books(name: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
  """Decorates a function so that each call is :func:`booked` as phase ``name``."""
  def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
      with booked(name):
        return fn(*args, **kwargs)
    return timed
  return decorate


def _process_age_s() -> float | None:
  """Seconds since this process started (Linux's /proc), or ``None`` where unknown."""
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in ticks
    with open("/proc/uptime", encoding="ascii") as f:
      uptime = float(f.read().split()[0])
    return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return None


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
    self._depth = 0  # phases open now: only the outermost is booked
    self._t0 = time.perf_counter()
    self._start_up = _process_age_s()
    self._cpu0 = time.process_time()
    # Set by report(): the loop's phases, clock and CPU seconds, to tell the rest apart.
    self._loop: dict[str, dict[str, float]] | None = None
    self._loop_end = (0.0, 0.0)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Adds the wall time of the ``with`` body to phase ``name``.

    The first ``'step'`` call is booked apart (:data:`FIRST_STEP_CALL`): it compiles.
    """
    if name == "step" and not self._calls[FIRST_STEP_CALL]:
      name = FIRST_STEP_CALL
    annotation: Any = contextlib.nullcontext()
    if self._tracing:
      import jax  # pylint: disable=g-import-not-at-top  (see the imports)
      annotation = jax.profiler.TraceAnnotation(name)
    outermost = self._depth == 0
    self._depth += 1
    t0 = time.perf_counter()
    try:
      with annotation:
        yield
    finally:
      self._depth -= 1
      if outermost:
        self._seconds[name] += time.perf_counter() - t0
        self._calls[name] += 1

  def sync(self, tree: Any) -> Any:
    """Waits for ``tree``'s device work when profiling (so the phase's clock includes it)."""
    if not self.enabled:
      return tree
    import jax  # pylint: disable=g-import-not-at-top
    return jax.block_until_ready(tree)

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
      import jax  # pylint: disable=g-import-not-at-top
      with self.phase(TRACER):
        os.makedirs(self.directory, exist_ok=True)
        jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self._tracing = True

  def after_call(self, step: int, outputs: Any) -> None:
    """Stops the trace once the updates up to ``step`` are done and the window is full."""
    if self._tracing and step >= self.trace_end:
      import jax  # pylint: disable=g-import-not-at-top
      jax.block_until_ready(outputs)
      self._tracing = False
      with self.phase(TRACER):
        jax.profiler.stop_trace()  # writes the trace files
      self._traced = True

  def close(self) -> None:
    """Stops a trace still running (a run that ended inside the window)."""
    if self._tracing:
      import jax  # pylint: disable=g-import-not-at-top
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
    self._loop = self.phases()
    self._loop_end = (time.perf_counter(), time.process_time())
    self._write()
    return (f"time per phase (trace of updates {self.trace_start}..{self.trace_end} in "
            f"{self.directory}):\n" + self.table())

  def _write(self, **extra: Any) -> None:
    os.makedirs(self.directory, exist_ok=True)
    atomic.write_json(os.path.join(self.directory, "phases.json"),
                      dict(phases=self._loop, trace_steps=[self.trace_start, self.trace_end],
                           trace_written=self._traced, **extra), mode=0o600)

  def after_loop(self) -> dict[str, dict[str, float]]:
    """``{phase: {'seconds', 'calls'}}`` since :meth:`report`: :data:`AFTER_LOOP`'s phases,
    ``other`` (privacy statistics, outputs, summary) and ``total``; empty before it."""
    if self._loop is None:
      return {}
    wall = time.perf_counter() - self._loop_end[0]
    out = {}
    for name in AFTER_LOOP:
      before = self._loop.get(name, dict(seconds=0.0, calls=0))
      calls = self._calls[name] - before["calls"]
      if calls:
        out[name] = dict(seconds=self._seconds[name] - before["seconds"], calls=calls)
    out["other"] = dict(seconds=max(0.0, wall - sum(r["seconds"] for r in out.values())),
                        calls=0)
    out["total"] = dict(seconds=wall, calls=0)
    return out

  def finish(self) -> str | None:
    """Ends the run's profile (after its outputs): adds the start-up, the work after the loop
    and the CPU seconds to ``phases.json``; returns their table (``None`` unless profiling
    and :meth:`report` ran)."""
    if not self.enabled or self._loop is None:
      return None
    rows = self.after_loop()
    cpu = dict(before_loop=self._cpu0, loop=self._loop_end[1] - self._cpu0,
               after_loop=time.process_time() - self._loop_end[1])
    self._write(after_loop=rows, start_up_s=self._start_up, process_cpu_s=cpu)
    lines = ["time after the loop:", f"{'phase':<30}{'seconds':>10}{'calls':>8}"]
    lines += [f"{name:<30}{r['seconds']:>10.3f}{str(r['calls'] or ''):>8}"
              for name, r in rows.items()]
    if self._start_up is not None:
      lines.append(f"{START_UP:<30}{self._start_up:>10.3f}")
    lines.append("process CPU seconds: " + ", ".join(
        f"{v:.2f} {k.replace('_', ' ')}" for k, v in cpu.items()))
    return "\n".join(lines)

"""What a run prints for people: process 0's lines, the epoch line, the progress and its ETA.

Only process 0 prints (:func:`say`); the other processes log what it prints. The progress is
a ``rich`` bar on a terminal and plain lines elsewhere (logs, CI, notebooks), drawn by
:class:`ConsoleSink`, which :func:`fastdp_jax.sinks.make_sinks` gives process 0.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
from absl import logging

from fastdp_jax import records
from fastdp_jax.dp import release

_BAR_WIDTH = 24
_REFRESH_S = 0.2  # redraw the progress bar at most this often


def say(text: str, file: TextIO | None = None) -> None:
  """Prints a user-facing line once, from process 0 (the other processes only log it).

  Args:
    text: the line.
    file: where process 0 prints it (default ``sys.stdout``, which a progress bar on the
      terminal redirects above itself while it is drawn).
  """
  if jax.process_index() == 0:
    print(text, file=file if file is not None else sys.stdout, flush=True)
  else:
    logging.info("process %d: %s", jax.process_index(), text)


def format_epoch_line(record: Mapping[str, Any], num_epochs: int) -> str:
  """The console line of one epoch record."""
  # '*': computed on training rows without noise (not covered by the guarantee).
  line = (f"epoch {record['epoch']}/{num_epochs}  "
          f"train_loss* {record[release.TRAIN_LOSS]:.4f}  "
          f"test_loss {record['test_loss']:.4f}  "
          + (f"test_acc {record['test_accuracy']:.4f}  " if "test_accuracy" in record else
             f"test_rmse {record.get('test_rmse', float('nan')):.4f}  ")  # regression
          + f"epsilon {record['epsilon']:.4f}")
  if record.get(release.ATTACK_ACCURACY) is not None:
    line += f"  attack_acc* {record[release.ATTACK_ACCURACY]:.4f}"
  return line + f"  time {record.get('epoch_time_s', 0.0):.1f}s"


def _format_duration(seconds: float) -> str:
  """``m:ss`` or ``h:mm:ss``; ``?`` for a duration not known yet (nan)."""
  if not math.isfinite(seconds):
    return "?"
  h, rest = divmod(int(round(seconds)), 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleSink:
  """The console: epoch lines, and the progress of the updates with an ETA.

  On a terminal the progress is a ``rich`` bar (redrawn at most every 0.2 s; lines printed
  meanwhile appear above it; cleared at the end). Elsewhere (logs, CI, notebooks) it is a
  plain line at most every ``plain_interval_s`` seconds. The ETA's rate leaves out the
  intervals that hold one-time costs: the first call of this run (mostly compilation: seconds,
  against milliseconds for a steady call) and the interval after the first ``eval`` or
  ``epoch`` record (the evaluation's compilation, the first checkpoint save); until a steady
  call has finished it shows ``?``.

  Args:
    total_steps: the update count the run stops at (the bar's end, the ETA's target).
    num_epochs: epochs of the whole run.
    stream: where the text goes (default ``sys.stdout`` at the time of each line).
    progress_bar: draw a bar; default: when ``stream`` is a terminal.
    plain_interval_s: without a bar, the least time between two progress lines.
    start_step: updates already done (a resumed run).
    start_epoch: the epoch the next update belongs to.
  """

  def __init__(self, total_steps: int, num_epochs: int, *, stream: TextIO | None = None,
               progress_bar: bool | None = None, plain_interval_s: float = 10.0,
               start_step: int = 0, start_epoch: int = 1):
    self.total_steps, self.num_epochs = int(total_steps), int(num_epochs)
    self._stream = stream
    if progress_bar is None:
      isatty = getattr(stream if stream is not None else sys.stdout, "isatty", None)
      progress_bar = bool(isatty and isatty())
    self.progress_bar = bool(progress_bar)
    self.plain_interval_s = plain_interval_s
    self._step, self._epoch = int(start_step), int(start_epoch)
    self._t0 = self._last_plain = time.time()
    # The ETA's rate: seconds and updates summed over the intervals between calls, except
    # those that hold a one-time cost (``_skip``: the first call, the first evaluation).
    self._last_call: tuple[float, int] | None = None
    self._rate_s, self._rate_steps = 0.0, 0
    self._skip = self._evaluated = False
    self._last_loss, self._last_eps = float("nan"), float("nan")
    self._bar: Any = None  # (rich Progress, task id, file proxy) while the bar is drawn
    self._last_draw = 0.0

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> None:
    if kind == records.PROGRESS:
      self._progress(step, scalars)
      return
    if kind in (records.EVAL, records.EPOCH):
      if not self._evaluated:  # the first one: the next interval holds one-time costs
        self._evaluated = self._skip = True
      if records.is_number(scalars.get("epsilon")):
        self._last_eps = float(scalars["epsilon"])
    if kind == records.EPOCH:
      self._epoch = int(scalars["epoch"]) + 1
      say(format_epoch_line(scalars, self.num_epochs), file=self._file())

  def flush(self) -> None:
    self._file().flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar[0].stop()  # transient: the bar's line is cleared
      self._bar = None

  def _file(self) -> TextIO:
    if self._bar is not None:
      return self._bar[2]
    return self._stream if self._stream is not None else sys.stdout

  def _progress(self, step: int, totals: Mapping[str, float]) -> None:
    if totals.get("count", 0) > 0:
      self._last_loss = totals["loss_sum"] / totals["count"]
    self._step = int(step)
    now = time.time()
    if self._last_call is not None and not self._skip:
      self._rate_s += now - self._last_call[0]
      self._rate_steps += self._step - self._last_call[1]
    self._last_call, self._skip = (now, self._step), False
    if self.progress_bar:
      if now - self._last_draw >= _REFRESH_S or self._step >= self.total_steps:
        self._draw()
        self._last_draw = now
    elif now - self._last_plain >= self.plain_interval_s and self._step < self.total_steps:
      say(self._progress_text(), file=self._file())
      self._last_plain = now

  def _eta_s(self) -> float:
    """Seconds left at the steady rate (``nan`` until a steady interval was measured)."""
    if self._rate_steps <= 0:
      return float("nan")
    return self._rate_s / self._rate_steps * (self.total_steps - self._step)

  def _progress_text(self) -> str:
    pct = 100.0 * self._step / max(self.total_steps, 1)
    text = (f"step {self._step}/{self.total_steps} ({pct:.0f}%)  "
            f"epoch {min(self._epoch, self.num_epochs)}/{self.num_epochs}")
    if math.isfinite(self._last_loss):
      text += f"  loss* {self._last_loss:.4f}"
    if math.isfinite(self._last_eps):
      text += f"  eps {self._last_eps:.3f}"
    return text + (f"  elapsed {_format_duration(time.time() - self._t0)}"
                   f"  ETA {_format_duration(self._eta_s())}")

  def _draw(self) -> None:
    if self._bar is None:  # started at the first call, so set-up lines come before it
      from rich import console as rich_console
      from rich import file_proxy
      from rich import progress
      stream = self._stream if self._stream is not None else sys.stdout
      con = rich_console.Console(file=stream, force_terminal=True)
      # No auto refresh (no thread): this sink redraws, throttled. stdout is redirected
      # above the bar while it is drawn (say's lines); stderr is left alone.
      bar = progress.Progress(progress.BarColumn(bar_width=_BAR_WIDTH),
                              progress.TextColumn("{task.description}", markup=False),
                              console=con, auto_refresh=False, transient=True,
                              redirect_stderr=False)
      task = bar.add_task(self._progress_text(), total=max(self.total_steps, 1),
                          completed=self._step)
      bar.start()
      self._bar = (bar, task, file_proxy.FileProxy(con, stream))
    bar, task, _ = self._bar
    bar.update(task, completed=self._step, description=self._progress_text())
    bar.refresh()


def announce_plan(plan: Any, *, devices: int, capacity: int, private: bool,
                  privacy_note: str | None) -> None:
  """The run's privacy plan in one line (a :class:`fastdp_jax.dp.plan.PrivacyPlan`), and a
  warning when its (epsilon, delta) is not a guarantee."""
  say(f"DP-SGD: q={plan.sampling_rate:.6g} sigma={plan.noise_multiplier:.4g} "
      f"C={plan.l2_norm_clip} updates={plan.total_steps} ({plan.steps_per_epoch}/epoch) "
      f"delta={plan.delta_total:.3g} accountant={plan.accountant} "
      f"devices={devices} capacity/device={capacity} private={private}"
      if plan.enabled else
      f"non-private SGD: updates={plan.total_steps} devices={devices}")
  if privacy_note and plan.enabled:
    say(f"WARNING: private: false: {privacy_note}")

"""Where a run's numbers go: small sinks behind one interface, and the one process-0 printer.

The trainer writes *records* (a kind, the update count, scalars) to one :class:`MultiSink`,
built by :func:`make_sinks`; each sink takes the kinds it shows and ignores the others:

============ ====================================== ==========================================
kind         written                                by
============ ====================================== ==========================================
``progress`` after every compiled call              :class:`ConsoleSink` (bar or plain lines)
``eval``     every ``log_every_steps`` updates and   :class:`JsonlSink`, :class:`TensorBoardSink`
             every epoch end                        (per-update curves)
``epoch``    every epoch end                        all three (the console's epoch line)
``config``   once, at set-up                        :class:`TensorBoardSink` (text, hparams)
``summary``  once, at the end                       :class:`JsonlSink`, :class:`TensorBoardSink`
============ ====================================== ==========================================

``WORKDIR/metrics.jsonl`` is the one file of records; each line carries its ``kind``. An
``eval`` record holds the training loss and clipped fraction of the updates since the previous
``eval`` record (``nonprivate_*``: training rows, no noise), test loss and accuracy, epsilon
and ``time_s``; an ``epoch`` record is the trainer's epoch record; the ``summary`` record holds
the summary's numbers.

Only process 0 writes and prints: :func:`make_sinks` gives every other process a
:class:`NullSink`. When to write (the call lengths, the logging points) is decided by
:mod:`fastdp_jax.schedule`, never here.

TensorBoard event files go straight into the workdir (``tensorboard --logdir runs/`` shows
every run), written by ``tensorboardX`` (no TensorFlow). Scalar tags: ``nonprivate/train_loss``,
``nonprivate/clipped_fraction`` (training-row diagnostics without noise, see
:mod:`fastdp_jax.dp.release`), ``test/loss``, ``test/accuracy`` (every ``test_*`` number of
the eval records as ``test/*``), ``privacy/epsilon`` (x-axis:
optimizer updates), every epoch record's number under ``epoch/`` (x-axis: the epoch), and
``final/*``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TextIO

import jax
import numpy as np
from absl import logging

from fastdp_jax import atomic
from fastdp_jax.dp import release

METRICS_FILE = "metrics.jsonl"
PROGRESS, EVAL, EPOCH, CONFIG, SUMMARY = "progress", "eval", "epoch", "config", "summary"
KINDS = (PROGRESS, EVAL, EPOCH, CONFIG, SUMMARY)
_BAR_WIDTH = 24
_REFRESH_S = 0.2  # redraw the progress bar at most this often

# eval record key -> TensorBoard tag of the per-update curves.
TENSORBOARD_TAGS = {
    release.TRAIN_LOSS: "nonprivate/train_loss",
    release.CLIPPED_FRACTION: "nonprivate/clipped_fraction",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "epsilon": "privacy/epsilon",
}


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
  """The console line of one epoch record (the same text the training loop always printed)."""
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


def call_totals(metrics: Mapping[str, np.ndarray], num_steps: int) -> dict[str, float]:
  """A ``progress`` record: the sums over one compiled call's first ``num_steps`` updates.

  Args:
    metrics: per-update arrays ``loss_sum``, ``count``, ``clipped`` of length >= num_steps
      (sums over each update's Poisson batch).
    num_steps: updates the call ran.
  """
  return {name: float(np.sum(np.asarray(metrics[name])[:num_steps]))
          for name in ("loss_sum", "count", "clipped")}


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
  """The records of a ``.jsonl`` file (blank lines skipped), only those of ``kind`` if given.

  A last line without its newline that does not parse is dropped: an append cut short by a
  kill or a full disk (the resumed run rewrites the file from its checkpoint).
  """
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
  return [r for r in records if kind is None or r.get("kind") == kind]


def _is_number(value: Any) -> bool:
  """A finite int or float (inf epsilon of non-private runs stays out of the curves)."""
  return (isinstance(value, (int, float, np.floating, np.integer))
          and not isinstance(value, bool) and math.isfinite(value))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'dp': {'delta': 1e-5}}`` -> ``{'dp.delta': 1e-5}`` (nested mappings only)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _hparam_value(value: Any) -> bool | int | float | str:
  """TensorBoard's hparams accept bool, number or string; the rest becomes its text."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return str(value)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  h, rest = divmod(int(round(seconds)), 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Sink(Protocol):
  """Where records go; every method may be called on every kind (a sink ignores the rest)."""

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> None:
    """Takes one record: its kind (:data:`KINDS`), the update count, its values."""

  def flush(self) -> None:
    """Makes what was written durable or visible."""

  def close(self) -> None:
    """Ends the sink (idempotent)."""


class NullSink:
  """A process other than 0: writes no file and prints nothing.

  Its copies of the epoch lines (the same numbers as process 0's) go to absl's log at
  verbosity 1 only (``--verbosity=1``), to debug one process of a multi-process run.
  """

  def __init__(self, num_epochs: int, process_index: int):
    self.num_epochs, self.process_index = int(num_epochs), int(process_index)

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> None:
    del step
    if kind == EPOCH:
      logging.vlog(1, "process %d: %s", self.process_index,
                   format_epoch_line(scalars, self.num_epochs))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


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
    if kind == PROGRESS:
      self._progress(step, scalars)
      return
    if kind in (EVAL, EPOCH):
      if not self._evaluated:  # the first one: the next interval holds one-time costs
        self._evaluated = self._skip = True
      if _is_number(scalars.get("epsilon")):
        self._last_eps = float(scalars["epsilon"])
    if kind == EPOCH:
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


class JsonlSink:
  """``WORKDIR/metrics.jsonl``: one JSON line per ``eval``, ``epoch`` and ``summary`` record.

  A resumed run rewrites the file (atomically) from what its checkpoint covers: the ``eval``
  records up to the restored update and the checkpoint's epoch records; records of updates
  after the checkpoint (they are redone) and a previous ``summary`` are dropped.

  Args:
    workdir: the run's directory (exists).
    history: the checkpoint's epoch records (a resumed run).
    start_step: the restored update count.
  """

  _WRITES = (EVAL, EPOCH, SUMMARY)

  def __init__(self, workdir: str, *, history: Sequence[Mapping[str, Any]] = (),
               start_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    kept: list[dict[str, Any]] = []
    if start_step > 0 and os.path.isfile(self.path):
      kept = [r for r in read_jsonl(self.path, EVAL) if r.get("step", 0) <= start_step]
    kept += [{"kind": EPOCH, **r} for r in history]
    # Stable: an epoch end's eval record stays before its epoch record, as first written.
    kept.sort(key=lambda r: (r["step"], r["kind"] == EPOCH))
    atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept), mode=0o600)

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> None:
    if kind not in self._WRITES:
      return
    with open(self.path, "a") as f:  # one append per record: a kill loses at most one line
      f.write(json.dumps({"kind": kind, "step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    pass  # every record is closed into the file as it is written

  def close(self) -> None:
    pass


class TensorBoardSink:
  """TensorBoard event files in ``workdir`` (``tensorboardX``; see the module docstring)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # local: only the writing process needs it
    self._tb: Any = SummaryWriter(logdir=workdir, flush_secs=10)
    self._hparams: dict[str, bool | int | float | str] = {}

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> None:
    if self._tb is None:
      return
    if kind == EVAL:
      for key, value in scalars.items():
        # Other tasks' test metrics (test_rmse, test_macro_f1, ...) under test/ as well.
        tag = TENSORBOARD_TAGS.get(key) or (f"test/{key[5:]}" if key.startswith("test_")
                                            else None)
        if tag is not None and _is_number(value):
          self._tb.add_scalar(tag, float(value), int(step))
    elif kind == EPOCH:
      for key, value in scalars.items():
        if key not in ("epoch", "step") and _is_number(value):
          self._tb.add_scalar(f"epoch/{key}", float(value), int(scalars["epoch"]))
    elif kind == CONFIG:
      self._hparams = {k: _hparam_value(v) for k, v in scalars.items()}
      self._tb.add_text("config", "\n".join(f"    {k} = {v!r}"
                                            for k, v in sorted(self._hparams.items())), 0)
    elif kind == SUMMARY:
      final = {f"final/{k}": float(v) for k, v in scalars.items()}
      if self._hparams:  # TensorBoard's hparams tab: the config next to the final metrics
        from tensorboardX import summary as tb_summary
        for s in tb_summary.hparams(self._hparams, final):
          self._tb.file_writer.add_summary(s)
      for tag, value in final.items():
        self._tb.add_scalar(tag, value, int(step))
    else:
      return
    self._tb.flush()

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class MultiSink:
  """The run's sinks, each given every record; what the trainer writes to.

  It shapes the records once for all sinks: an ``eval`` record gets ``time_s`` and the
  training diagnostics of the ``progress`` records since the previous one; ``config`` and
  ``summary`` are flattened (``dp.delta``), a summary to its finite numbers.
  """

  def __init__(self, sinks: Sequence[Sink]):
    self.sinks = list(sinks)
    self._t0 = time.time()
    self._window = dict(loss_sum=0.0, count=0.0, clipped=0.0)

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
    """Gives one record to every sink.

    Args:
      kind: one of :data:`KINDS`.
      step: updates done.
      scalars: the record's values (``progress``: :func:`call_totals`).

    Returns:
      The values the sinks got.
    """
    if kind not in KINDS:
      raise ValueError(f"{kind=} is not a record kind {KINDS}")
    record = dict(scalars)
    if kind == PROGRESS:
      for name in self._window:
        self._window[name] += float(record.get(name, 0.0))
    elif kind == EVAL:
      window, self._window = self._window, dict(loss_sum=0.0, count=0.0, clipped=0.0)
      head: dict[str, Any] = dict(time_s=time.time() - self._t0)
      if window["count"] > 0:
        head[release.TRAIN_LOSS] = window["loss_sum"] / window["count"]
        head[release.CLIPPED_FRACTION] = window["clipped"] / window["count"]
      record = head | {k: float(v) for k, v in record.items() if v is not None}
    elif kind == CONFIG:
      record = _flatten(record)
    elif kind == SUMMARY:
      record = {k: v for k, v in _flatten(record).items()
                if not k.startswith("config.") and _is_number(v)}
    for sink in self.sinks:
      sink.write(kind, int(step), record)
    return record

  def flush(self) -> None:
    for sink in self.sinks:
      sink.flush()

  def close(self) -> None:
    """Closes every sink (idempotent; the trainer's clean-up calls it after a failure too)."""
    for sink in self.sinks:
      sink.close()


def make_sinks(workdir: str, *, process_index: int, total_steps: int, num_epochs: int,
               history: Sequence[Mapping[str, Any]] = (), start_step: int = 0,
               tensorboard: bool = True, stream: TextIO | None = None,
               progress_bar: bool | None = None, plain_interval_s: float = 10.0) -> MultiSink:
  """The one place a run's sinks are chosen.

  Args:
    workdir: the run's directory (created on process 0).
    process_index: this process (``jax.process_index()``); only process 0 writes and prints.
    total_steps: the update count the run stops at.
    num_epochs: epochs of the whole run.
    history: epoch records already done (a resumed run's checkpoint).
    start_step: updates already done (a resumed run): ``metrics.jsonl`` is cut back to it.
    tensorboard: write TensorBoard event files.
    stream, progress_bar, plain_interval_s: the console's (see :class:`ConsoleSink`).
  """
  if process_index != 0:
    return MultiSink([NullSink(num_epochs, process_index)])
  os.makedirs(workdir, exist_ok=True)
  start_epoch = int(history[-1]["epoch"]) + 1 if history else 1
  sinks: list[Sink] = [
      ConsoleSink(total_steps, num_epochs, stream=stream, progress_bar=progress_bar,
                  plain_interval_s=plain_interval_s, start_step=start_step,
                  start_epoch=start_epoch),
      JsonlSink(workdir, history=history, start_step=start_step)]
  if tensorboard:
    sinks.append(TensorBoardSink(workdir))
  return MultiSink(sinks)

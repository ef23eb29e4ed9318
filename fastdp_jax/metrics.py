"""Where a run's numbers go: the console, ``metrics.jsonl``, ``steps.jsonl`` and TensorBoard.

:class:`MetricWriter` is the one object the training loop talks to:

* per epoch (:meth:`MetricWriter.write_epoch`): one console line, one record in
  ``WORKDIR/metrics.jsonl``, and TensorBoard scalars;
* at every evaluation point (:meth:`MetricWriter.write_point`; every ``log_every_steps``
  updates and at every epoch end): the training loss of the updates since the previous
  point, test loss and accuracy, and epsilon, to TensorBoard and ``WORKDIR/steps.jsonl``;
* after every compiled chunk of updates (:meth:`MetricWriter.write_train_steps`): the
  progress bar with an ETA when stdout is a terminal; plain progress lines (at most one
  every ``plain_interval_s`` seconds) when it is not, so logs of batch jobs stay readable.
  The ETA's rate leaves out the intervals that hold one-time costs: the first call of this run
  (mostly compilation: seconds, against milliseconds for a steady call) and the interval
  around the first evaluation and epoch end (the evaluation's compilation, the first
  checkpoint save); until a steady call has finished it shows ``?``;
* hyperparameters (:meth:`MetricWriter.write_hparams`) and the final metrics
  (:meth:`MetricWriter.write_summary`) to TensorBoard's hparams dashboard.

Only process 0 writes files and prints (``enabled``); the others keep the same bookkeeping so
that every process makes the same decisions (when to evaluate, for example). The others log
their epoch lines only at verbosity 1 (``--verbosity=1``): by default a multi-process run
shows each epoch once, from process 0.

TensorBoard event files go straight into the workdir (``tensorboard --logdir runs/`` shows
every run), written by ``tensorboardX`` (no TensorFlow). :func:`read_scalars` reads them back
without TensorBoard.

Scalar tags: ``nonprivate/train_loss``, ``nonprivate/clipped_fraction`` (training-row
diagnostics without noise, see :mod:`fastdp_jax.release`), ``test/loss``, ``test/accuracy``,
``privacy/epsilon`` (x-axis: optimizer updates), the same under ``epoch/`` with the epoch
number as x-axis, and ``final/*``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np
from absl import logging

from fastdp_jax import atomic
from fastdp_jax import release

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
_BAR_WIDTH = 24
_REFRESH_S = 0.2  # redraw the progress bar at most this often


def say(text: str) -> None:
  """Prints a user-facing line once, from process 0 (the other processes only log it)."""
  if jax.process_index() == 0:
    print(text, flush=True)
  else:
    logging.info("process %d: %s", jax.process_index(), text)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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


def _hparam_value(value: Any) -> bool | int | float | str:
  """TensorBoard's hparams accept bool, number or string; the rest becomes its repr."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if value is None:
    return "None"
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return str(value)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'dp': {'delta': 1e-5}}`` -> ``{'dp.delta': 1e-5}`` (nested mappings only)."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_config(value, name + "."))
    else:
      out[name] = value
  return out


class MetricWriter:
  """Writes a run's metrics; see the module docstring for where each number goes.

  Args:
    workdir: the run's output directory (created).
    total_steps: optimizer updates of the whole run (for the progress bar and ETA).
    num_epochs: epochs of the whole run (for the console lines).
    log_every_steps: updates between two logging points (0: per epoch only).
    enabled: whether this process writes files and prints (process 0); default
      ``jax.process_index() == 0``.
    stream: where the console text goes (default ``sys.stdout``).
    progress_bar: draw a one-line progress bar; default: when ``stream`` is a terminal.
    tensorboard: write TensorBoard event files into ``workdir``.
    plain_interval_s: without a progress bar, the least time between two progress lines.
    history: epoch records already done (a resumed run): ``metrics.jsonl`` is rewritten with
      them.
    start_step: updates already done (a resumed run): ``steps.jsonl`` is cut back to it and
      the ETA counts from it.
  """

  def __init__(self, workdir: str, *, total_steps: int, num_epochs: int,
               log_every_steps: int = 0, enabled: bool | None = None,
               stream: TextIO | None = None, progress_bar: bool | None = None,
               tensorboard: bool = True, plain_interval_s: float = 10.0,
               history: list[Mapping[str, Any]] | None = None, start_step: int = 0):
    if log_every_steps < 0:
      raise ValueError(f"{log_every_steps=} must be non-negative")
    if enabled is None:
      enabled = jax.process_index() == 0
    self.workdir = workdir
    self.total_steps = int(total_steps)
    self.num_epochs = int(num_epochs)
    self.log_every_steps = int(log_every_steps)
    self.enabled = bool(enabled)
    self.stream = stream if stream is not None else sys.stdout
    if progress_bar is None:
      isatty = getattr(self.stream, "isatty", None)
      progress_bar = bool(isatty and isatty())
    self.progress_bar = progress_bar and self.enabled
    self.plain_interval_s = plain_interval_s
    history = list(history or [])
    self._start_step = int(start_step)
    self._step = self._start_step
    self._epoch = int(history[-1]["epoch"]) + 1 if history else 1
    self._t0 = time.time()
    # The ETA's rate: seconds and updates summed over the intervals between calls, except
    # those that hold a one-time cost (``_skip``: the first call, the first evaluation).
    self._last_call: tuple[float, int] | None = None
    self._rate_s = 0.0
    self._rate_steps = 0
    self._skip = False
    self._evaluated = False
    self._last_draw = 0.0
    self._last_plain = self._t0
    self._bar_shown = False
    self._window = dict(loss_sum=0.0, count=0.0, clipped=0.0)
    self._last_loss = float("nan")
    self._last_eps: float | None = None
    self._hparams: dict[str, bool | int | float | str] = {}
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    atomic.write_text(os.path.join(workdir, METRICS_FILE),
                      "".join(json.dumps(r) + "\n" for r in history), mode=0o600)
    self._truncate_steps_file(self._start_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # local: only the writing process needs it
      self._tb = SummaryWriter(logdir=workdir, flush_secs=10)

  # ------------------------------------------------------------------ scheduling
  def steps_to_next_log(self, step: int) -> int:
    """Updates from ``step`` to the next logging point (a large number when there is none).

    The training loop caps each compiled call at this, so logging points fall exactly on
    multiples of ``log_every_steps``.
    """
    if self.log_every_steps <= 0:
      return max(self.total_steps - step, 1)
    return self.log_every_steps - step % self.log_every_steps

  def log_due(self, step: int) -> bool:
    """Whether ``step`` is a logging point."""
    return self.log_every_steps > 0 and step > 0 and step % self.log_every_steps == 0

  # ------------------------------------------------------------------ writing
  def write_train_steps(self, first_step: int, metrics: Mapping[str, np.ndarray],
                        num_steps: int) -> None:
    """Takes the per-update metrics of one compiled call; redraws the progress.

    Args:
      first_step: updates done before this call.
      metrics: per-update arrays ``loss_sum``, ``count``, ``clipped`` of length >= num_steps
        (sums over each update's Poisson batch).
      num_steps: updates this call ran.
    """
    for name in self._window:
      self._window[name] += float(np.sum(np.asarray(metrics[name])[:num_steps]))
    count = float(np.sum(np.asarray(metrics["count"])[:num_steps]))
    if count > 0:
      self._last_loss = float(np.sum(np.asarray(metrics["loss_sum"])[:num_steps])) / count
    self._step = first_step + num_steps
    now = time.time()
    if self._last_call is not None and not self._skip:
      self._rate_s += now - self._last_call[0]
      self._rate_steps += self._step - self._last_call[1]
    self._last_call, self._skip = (now, self._step), False
    if not self.enabled:
      return
    if self.progress_bar:
      if now - self._last_draw >= _REFRESH_S or self._step >= self.total_steps:
        self._draw_bar()
        self._last_draw = now
    elif now - self._last_plain >= self.plain_interval_s and self._step < self.total_steps:
      self._println(self._progress_text())
      self._last_plain = now

  def write_point(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
    """Writes a logging point: the training window since the last point plus ``scalars``.

    Args:
      step: updates done.
      scalars: e.g. ``test_loss``, ``test_accuracy``, ``epsilon``.

    Returns:
      The record written to ``steps.jsonl``.
    """
    record = dict(step=int(step), time_s=time.time() - self._t0)
    self._one_time_cost_once()
    if self._window["count"] > 0:
      record[release.TRAIN_LOSS] = self._window["loss_sum"] / self._window["count"]
      record[release.CLIPPED_FRACTION] = self._window["clipped"] / self._window["count"]
    record.update({k: float(v) for k, v in scalars.items() if v is not None})
    self._window = dict(loss_sum=0.0, count=0.0, clipped=0.0)
    if "epsilon" in record:
      self._last_eps = record["epsilon"]
    if not self.enabled:
      return record
    with open(os.path.join(self.workdir, STEPS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
    self._add_scalars(record, step, prefix_map=_STEP_TAGS)
    return record

  def write_epoch(self, record: Mapping[str, Any]) -> None:
    """Writes one epoch record: console line, ``metrics.jsonl``, TensorBoard."""
    self._epoch = int(record["epoch"]) + 1
    self._one_time_cost_once()
    if record.get("epsilon") is not None:
      self._last_eps = float(record["epsilon"])
    if not self.enabled:
      # Process 0 prints the epoch line for the run; the others' copies, the same numbers,
      # only at --verbosity=1 (a multi-process console would show each epoch N times).
      logging.vlog(1, "process %d: %s", jax.process_index(),
                   format_epoch_line(record, self.num_epochs))
      return
    with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
      f.write(json.dumps(dict(record)) + "\n")
    self._println(format_epoch_line(record, self.num_epochs))
    if self._tb is not None:
      for key, value in record.items():
        if key not in ("epoch", "step") and _is_number(value):
          self._tb.add_scalar(f"epoch/{key}", float(value), int(record["epoch"]))
      self._tb.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's (flattened) configuration as TensorBoard text and hparams."""
    self._hparams = {k: _hparam_value(v) for k, v in flatten_config(hparams).items()}
    if self.enabled and self._tb is not None:
      text = "\n".join(f"    {k} = {v!r}" for k, v in sorted(self._hparams.items()))
      self._tb.add_text("config", text, 0)

  def write_summary(self, summary: Mapping[str, Any]) -> None:
    """Writes the final metrics next to the hyperparameters (TensorBoard's hparams tab)."""
    if not self.enabled:
      return
    self._clear_bar()
    if self._tb is None:
      return
    final = {f"final/{k}": float(v) for k, v in flatten_config(summary).items()
             if k != "config" and not k.startswith("config.") and _is_number(v)}
    from tensorboardX import summary as tb_summary  # local: only the writer needs it
    if self._hparams:
      for s in tb_summary.hparams(self._hparams, final):
        self._tb.file_writer.add_summary(s)
    step = int(summary.get("steps", self._step))
    for tag, value in final.items():
      self._tb.add_scalar(tag, value, step)
    self._tb.flush()

  def print(self, text: str) -> None:
    """Prints a line on process 0 without breaking the progress bar."""
    if self.enabled:
      self._println(text)

  def close(self) -> None:
    if not self.enabled:
      return
    self._clear_bar()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------ helpers
  def _add_scalars(self, record: Mapping[str, Any], step: int,
                   prefix_map: Mapping[str, str]) -> None:
    if self._tb is None:
      return
    for key, tag in prefix_map.items():
      if key in record and _is_number(record[key]):
        self._tb.add_scalar(tag, float(record[key]), int(step))
    self._tb.flush()

  def _one_time_cost_once(self) -> None:
    """The first evaluation point or epoch end of the run: the interval up to the next call
    holds compilation and the first checkpoint save, so it stays out of the ETA's rate."""
    if not self._evaluated:
      self._evaluated = self._skip = True

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
    if self._last_eps is not None and math.isfinite(self._last_eps):
      text += f"  eps {self._last_eps:.3f}"
    return text + (f"  elapsed {_format_duration(time.time() - self._t0)}"
                   f"  ETA {_format_duration(self._eta_s())}")

  def _draw_bar(self) -> None:
    frac = min(1.0, self._step / max(self.total_steps, 1))
    filled = int(round(frac * _BAR_WIDTH))
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    # \r returns to the line start, \x1b[K clears what a longer previous line left behind.
    self.stream.write(f"\r[{bar}] {self._progress_text()}\x1b[K")
    self.stream.flush()
    self._bar_shown = True

  def _clear_bar(self) -> None:
    if self._bar_shown:
      self.stream.write("\r\x1b[K")
      self.stream.flush()
      self._bar_shown = False

  def _println(self, text: str) -> None:
    redraw = self._bar_shown
    self._clear_bar()
    self.stream.write(text + "\n")
    self.stream.flush()
    if redraw and self._step < self.total_steps:
      self._draw_bar()

  def _truncate_steps_file(self, last_step: int) -> None:
    """Keeps the ``steps.jsonl`` records up to ``last_step`` (resume), drops the rest."""
    path = os.path.join(self.workdir, STEPS_FILE)
    kept = []
    if last_step > 0 and os.path.isfile(path):
      kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept), mode=0o600)


# steps.jsonl key -> TensorBoard tag of the per-update curves.
_STEP_TAGS = {
    release.TRAIN_LOSS: "nonprivate/train_loss",
    release.CLIPPED_FRACTION: "nonprivate/clipped_fraction",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "epsilon": "privacy/epsilon",
}


def _is_number(value: Any) -> bool:
  """A finite int or float (inf epsilon of non-private runs stays out of TensorBoard)."""
  return (isinstance(value, (int, float, np.floating, np.integer))
          and not isinstance(value, bool) and math.isfinite(value))


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a ``.jsonl`` file (blank lines skipped).

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
  return records


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads every scalar of the TensorBoard event files in ``workdir`` (no TensorBoard needed).

  Returns:
    tag -> [(step, value), ...] in file order.
  """
  from tensorboardX.proto import event_pb2  # local: only readers need it
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    # TFRecord framing: uint64 length, uint32 length crc, payload, uint32 payload crc.
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value") and not value.tag.startswith("_hparams_"):
          out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out

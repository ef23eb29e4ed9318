"""Where a run's numbers go: small sinks behind one interface.

The trainer writes *records* (a kind, the update count, scalars; the kinds are in
:mod:`fastdp_jax.records`) to one :class:`MultiSink`, built by :func:`make_sinks`: the console
(:class:`fastdp_jax.console.ConsoleSink`), :class:`JsonlSink` and :class:`TensorBoardSink`.
Each sink takes the kinds it shows and ignores the others.

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
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TextIO

from absl import logging

from fastdp_jax import atomic
from fastdp_jax import console
from fastdp_jax import records
from fastdp_jax.dp import release

METRICS_FILE = "metrics.jsonl"

# eval record key -> TensorBoard tag of the per-update curves.
TENSORBOARD_TAGS = {
    release.TRAIN_LOSS: "nonprivate/train_loss",
    release.CLIPPED_FRACTION: "nonprivate/clipped_fraction",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "epsilon": "privacy/epsilon",
}


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
  """The records of a ``.jsonl`` file (blank lines skipped), only those of ``kind`` if given.

  A last line without its newline that does not parse is dropped: an append cut short by a
  kill or a full disk (the resumed run rewrites the file from its checkpoint).
  """
  with open(path) as f:
    lines = f.read().split("\n")
  parsed = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      parsed.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
  return [r for r in parsed if kind is None or r.get("kind") == kind]


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


class Sink(Protocol):
  """Where records go; every method may be called on every kind (a sink ignores the rest)."""

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> None:
    """Takes one record: its kind (``records.KINDS``), the update count, its values."""

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
    if kind == records.EPOCH:
      logging.vlog(1, "process %d: %s", self.process_index,
                   console.format_epoch_line(scalars, self.num_epochs))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


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

  _WRITES = (records.EVAL, records.EPOCH, records.SUMMARY)

  def __init__(self, workdir: str, *, history: Sequence[Mapping[str, Any]] = (),
               start_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    kept: list[dict[str, Any]] = []
    if start_step > 0 and os.path.isfile(self.path):
      kept = [r for r in read_jsonl(self.path, records.EVAL)
              if r.get("step", 0) <= start_step]
    kept += [{"kind": records.EPOCH, **r} for r in history]
    # Stable: an epoch end's eval record stays before its epoch record, as first written.
    kept.sort(key=lambda r: (r["step"], r["kind"] == records.EPOCH))
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
    if kind == records.EVAL:
      for key, value in scalars.items():
        # Other tasks' test metrics (test_rmse, test_macro_f1, ...) under test/ as well.
        tag = TENSORBOARD_TAGS.get(key) or (f"test/{key[5:]}" if key.startswith("test_")
                                            else None)
        if tag is not None and records.is_number(value):
          self._tb.add_scalar(tag, float(value), int(step))
    elif kind == records.EPOCH:
      for key, value in scalars.items():
        if key not in ("epoch", "step") and records.is_number(value):
          self._tb.add_scalar(f"epoch/{key}", float(value), int(scalars["epoch"]))
    elif kind == records.CONFIG:
      self._hparams = {k: _hparam_value(v) for k, v in scalars.items()}
      self._tb.add_text("config", "\n".join(f"    {k} = {v!r}"
                                            for k, v in sorted(self._hparams.items())), 0)
    elif kind == records.SUMMARY:
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
      kind: one of ``records.KINDS``.
      step: updates done.
      scalars: the record's values (``progress``: :func:`fastdp_jax.records.call_totals`).

    Returns:
      The values the sinks got.
    """
    if kind not in records.KINDS:
      raise ValueError(f"{kind=} is not a record kind {records.KINDS}")
    record = dict(scalars)
    if kind == records.PROGRESS:
      for name in self._window:
        self._window[name] += float(record.get(name, 0.0))
    elif kind == records.EVAL:
      window, self._window = self._window, dict(loss_sum=0.0, count=0.0, clipped=0.0)
      head: dict[str, Any] = dict(time_s=time.time() - self._t0)
      if window["count"] > 0:
        head[release.TRAIN_LOSS] = window["loss_sum"] / window["count"]
        head[release.CLIPPED_FRACTION] = window["clipped"] / window["count"]
      # Eval records are curves: numbers only (a reliability diagram's bins stay in the epoch
      # record and the summary).
      record = head | {k: float(v) for k, v in record.items() if records.is_number(v)}
    elif kind == records.CONFIG:
      record = _flatten(record)
    elif kind == records.SUMMARY:
      record = {k: v for k, v in _flatten(record).items()
                if not k.startswith("config.") and records.is_number(v)}
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
    stream, progress_bar, plain_interval_s: the console's (see
      :class:`fastdp_jax.console.ConsoleSink`).
  """
  if process_index != 0:
    return MultiSink([NullSink(num_epochs, process_index)])
  os.makedirs(workdir, exist_ok=True)
  start_epoch = int(history[-1]["epoch"]) + 1 if history else 1
  sinks: list[Sink] = [
      console.ConsoleSink(total_steps, num_epochs, stream=stream, progress_bar=progress_bar,
                          plain_interval_s=plain_interval_s, start_step=start_step,
                          start_epoch=start_epoch),
      JsonlSink(workdir, history=history, start_step=start_step)]
  if tensorboard:
    sinks.append(TensorBoardSink(workdir))
  return MultiSink(sinks)

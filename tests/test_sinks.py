"""The metric sinks: the one metrics.jsonl, TensorBoard events, the records they get, and
nothing at all on processes other than 0."""

import io
import json
import logging as std_logging
import os
import struct

import numpy as np
import pytest

from fastdp_jax import atomic
from fastdp_jax import console
from fastdp_jax import records as records_lib
from fastdp_jax import schedule
from fastdp_jax import sinks
from tests.metric_records import chunk, epoch_record, write_progress
from tests.tensorboard_events import read_scalars


def test_logging_points_fall_on_exact_multiples():
  # The schedule (not the sinks) cuts calls so that logging points land exactly on multiples.
  s = schedule.Schedule(steps_per_epoch=100, stop_at=100, steps_per_call=1000, log_every=30)
  assert [s.call_length(x) for x in (0, 29, 30, 31, 89)] == [30, 1, 30, 29, 1]
  assert [x for x in range(101) if s.is_log_point(x)] == [30, 60, 90]
  off = schedule.Schedule(steps_per_epoch=100, stop_at=100, steps_per_call=1000)
  assert off.call_length(40) == 60 and not any(off.is_log_point(x) for x in range(101))


def test_plain_lines_one_jsonl_with_kinds_and_tensorboard(tmp_path):
  out = io.StringIO()
  w = sinks.make_sinks(str(tmp_path), process_index=0, total_steps=20, num_epochs=2,
                       stream=out, plain_interval_s=0.0)
  w.write(records_lib.CONFIG, 0, {"dp": {"noise_multiplier": 1.1, "enabled": True},
                                  "model": {"sizes": (8,)}})
  # Updates 0-4 have losses 1..5 on batches of 2, 4, ...: the point's loss is their weighted
  # mean; the sixth entry is past the call's length (padding of the compiled call).
  write_progress(w, 5, chunk([1, 2, 3, 4, 5, 9], [2, 4, 6, 8, 10, 99], [1, 0, 0, 0, 1, 0]), 5)
  p = w.write(records_lib.EVAL, 5, dict(test_loss=0.7, test_accuracy=0.61, epsilon=0.3))
  assert p["nonprivate_train_loss"] == pytest.approx((2 + 8 + 18 + 32 + 50) / 30)
  assert p["nonprivate_clipped_fraction"] == pytest.approx(2 / 30)
  write_progress(w, 10, chunk([1.0] * 5, [3] * 5), 5)
  w.write(records_lib.EVAL, 10, dict(test_loss=0.65, test_accuracy=0.63, epsilon=0.4))
  w.write(records_lib.EPOCH, 10, epoch_record(1, 10, 0.63, 0.4))
  write_progress(w, 20, chunk([0.5] * 10, [3] * 10), 10)
  w.write(records_lib.EVAL, 20, dict(test_loss=0.6, test_accuracy=0.64, epsilon=0.5))
  w.write(records_lib.EPOCH, 20,
          dict(epoch_record(2, 20, 0.64, 0.5), nonprivate_attack_accuracy=0.55))
  w.write(records_lib.SUMMARY, 20, dict(epsilon=0.5, test_accuracy=0.64, steps=20,
                                        dp_enabled=True, config={"x": 1}))
  w.close()

  text = out.getvalue()
  assert "\r" not in text and "\x1b" not in text  # no progress bar when not a terminal
  lines = text.splitlines()
  epoch_lines = [l for l in lines if l.startswith("epoch ")]
  assert epoch_lines == [
      "epoch 1/2  train_loss* 0.5000  test_loss 0.6000  test_acc 0.6300  epsilon 0.4000  "
      "time 1.0s",
      "epoch 2/2  train_loss* 0.5000  test_loss 0.6000  test_acc 0.6400  epsilon 0.5000  "
      "attack_acc* 0.5500  time 1.0s"]
  progress = [l for l in lines if l.startswith("step ")]
  # One plain line per call but the last (the epoch line says it), the training loss starred.
  assert [l.split("  ")[0] for l in progress] == ["step 5/20 (25%)", "step 10/20 (50%)"]
  assert all("ETA" in l and "loss* " in l for l in progress)
  assert len(lines) == len(epoch_lines) + len(progress)

  # One file; the kinds in the order written; progress and config stay out of it.
  records = sinks.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["kind"], r["step"]) for r in records] == [
      ("eval", 5), ("eval", 10), ("epoch", 10), ("eval", 20), ("epoch", 20), ("summary", 20)]
  assert not (tmp_path / "steps.jsonl").exists()
  epochs = sinks.read_jsonl(tmp_path / "metrics.jsonl", records_lib.EPOCH)
  assert [r["epoch"] for r in epochs] == [1, 2] and epochs[1]["nonprivate_attack_accuracy"] == 0.55
  evals = sinks.read_jsonl(tmp_path / "metrics.jsonl", records_lib.EVAL)
  assert evals[0] == dict(kind="eval", step=5, **p)  # the record the sinks got, time_s too
  assert p["time_s"] >= 0 and list(p)[:1] == ["time_s"]
  assert evals[1]["nonprivate_train_loss"] == pytest.approx(1.0)
  # The summary record: its finite numbers (no bool, no config).
  assert records[-1] == dict(kind="summary", step=20, epsilon=0.5, test_accuracy=0.64,
                             steps=20)

  scalars = read_scalars(tmp_path)
  assert scalars["test/accuracy"] == [(5, pytest.approx(0.61)), (10, pytest.approx(0.63)),
                                      (20, pytest.approx(0.64))]
  assert [s for s, _ in scalars["privacy/epsilon"]] == [5, 10, 20]
  # float32 in the event file: 1e-6 relative is above its rounding (2^-24 ~ 6e-8).
  assert scalars["nonprivate/train_loss"][0][1] == pytest.approx(p["nonprivate_train_loss"],
                                                                 rel=1e-6)
  assert scalars["epoch/test_accuracy"] == [(1, pytest.approx(0.63)), (2, pytest.approx(0.64))]
  assert scalars["final/epsilon"] == [(20, pytest.approx(0.5))]
  assert not any(t.startswith("final/config") for t in scalars)
  # The hyperparameters are in the same event file (TensorBoard's hparams plugin data).
  raw = b"".join(open(os.path.join(tmp_path, f), "rb").read() for f in os.listdir(tmp_path)
                 if f.startswith("events.out.tfevents"))
  assert b"_hparams_/session_start_info" in raw and b"dp.noise_multiplier" in raw


def test_tensorboard_tags(tmp_path):
  tb = sinks.TensorBoardSink(str(tmp_path))
  eval_record = dict(time_s=3.0, nonprivate_train_loss=0.7, nonprivate_clipped_fraction=0.25,
                     test_loss=0.6, test_accuracy=0.75, epsilon=1.5)
  tb.write(records_lib.EVAL, 7, eval_record)
  tb.write(records_lib.EVAL, 9, dict(eval_record, epsilon=float("inf")))  # non-private: no curve
  tb.write(records_lib.EVAL, 11, dict(time_s=4.0, test_loss=0.5, test_rmse=0.25))  # regression
  tb.write(records_lib.EPOCH, 9, epoch_record(3, 9, 0.75, 1.5))
  tb.write(records_lib.PROGRESS, 9, dict(loss_sum=1.0, count=2.0, clipped=0.0))  # not a curve
  tb.close()
  tb.close()  # idempotent
  scalars = read_scalars(tmp_path)
  per_update = {t: v for t, v in scalars.items() if not t.startswith("epoch/")}
  # The training-row diagnostics under nonprivate/, the rest under test/ and privacy/.
  assert per_update == {
      "nonprivate/train_loss": [(7, pytest.approx(0.7)), (9, pytest.approx(0.7))],
      "nonprivate/clipped_fraction": [(7, 0.25), (9, 0.25)],
      "test/loss": [(7, pytest.approx(0.6)), (9, pytest.approx(0.6)), (11, 0.5)],
      "test/accuracy": [(7, 0.75), (9, 0.75)],
      "test/rmse": [(11, 0.25)],
      "privacy/epsilon": [(7, 1.5)]}
  assert set(sinks.TENSORBOARD_TAGS.values()) | {"test/rmse"} == set(per_update)
  # Epoch curves: every number of the record but epoch and step, against the epoch.
  assert sorted(t for t in scalars if t.startswith("epoch/")) == sorted(
      f"epoch/{k}" for k in epoch_record(3, 9, 0.75, 1.5) if k not in ("epoch", "step"))
  assert all(s == 3 for t, v in scalars.items() if t.startswith("epoch/") for s, _ in v)


def test_other_processes_write_and_print_nothing(tmp_path, capsys):
  out = io.StringIO()
  w = sinks.make_sinks(str(tmp_path / "w"), process_index=1, total_steps=4, num_epochs=1,
                       stream=out, progress_bar=True)
  assert [type(s) for s in w.sinks] == [sinks.NullSink]
  w.write(records_lib.CONFIG, 0, {"a": 1})
  write_progress(w, 2, chunk([1.0] * 2, [1] * 2), 2)
  # The same bookkeeping as process 0's (the record is built), nothing shown or written.
  assert w.write(records_lib.EVAL, 2, dict(epsilon=0.1))["nonprivate_train_loss"] == 1.0
  w.write(records_lib.EPOCH, 4, epoch_record(1, 4, 0.5, 0.1))
  w.write(records_lib.SUMMARY, 4, dict(epsilon=0.1))
  w.flush()
  w.close()
  assert out.getvalue() == "" and capsys.readouterr().out == ""
  assert not (tmp_path / "w").exists()


def test_a_record_of_an_unknown_kind_is_refused(tmp_path):
  w = sinks.make_sinks(str(tmp_path), process_index=0, total_steps=4, num_epochs=1,
                       stream=io.StringIO(), tensorboard=False)
  with pytest.raises(ValueError, match="'point' is not a record kind"):
    w.write("point", 1, {})
  w.close()


def test_other_processes_log_their_epoch_lines_only_at_verbosity_1(tmp_path):
  # Process 0 prints each epoch; a copy from every other process would repeat it N-1 times.
  from absl import logging as absl_logging
  seen = []

  class Catch(std_logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  logger, catch = absl_logging.get_absl_logger(), Catch()
  logger.addHandler(catch)
  verbosity = absl_logging.get_verbosity()
  w = sinks.make_sinks(str(tmp_path / "w"), process_index=2, total_steps=4, num_epochs=1)
  try:
    absl_logging.set_verbosity(absl_logging.INFO)
    w.write(records_lib.EPOCH, 4, epoch_record(1, 4, 0.5, 0.1))
    assert not [m for m in seen if "epoch 1/1" in m]
    absl_logging.set_verbosity(1)
    w.write(records_lib.EPOCH, 4, epoch_record(1, 4, 0.5, 0.1))
    assert [m for m in seen if "epoch 1/1" in m] == [
        "process 2: " + console.format_epoch_line(epoch_record(1, 4, 0.5, 0.1), 1)]
  finally:
    absl_logging.set_verbosity(verbosity)
    logger.removeHandler(catch)


def _old_run(path):
  """metrics.jsonl of a run killed after update 20 whose last checkpoint is at update 15."""
  with open(path / "metrics.jsonl", "w") as f:
    for s in (5, 10, 15, 20):
      f.write(json.dumps(dict(kind="eval", step=s, epsilon=s / 10)) + "\n")
      if s % 10 == 0:
        f.write(json.dumps(dict(kind="epoch", **epoch_record(s // 10, s, 0.6, s / 10))) + "\n")
    f.write(json.dumps(dict(kind="summary", step=20, epsilon=2.0)) + "\n")
    f.write('{"kind": "eval", "step": 25, "eps')  # an append cut short by the kill


def test_resume_keeps_the_records_up_to_the_checkpoint(tmp_path):
  _old_run(tmp_path)
  # The checkpoint's history has epoch 1 only: epoch 2 (update 20) is redone, so are the
  # eval records after update 15; a summary of an earlier end goes too.
  w = sinks.make_sinks(str(tmp_path), process_index=0, total_steps=40, num_epochs=4,
                       history=[epoch_record(1, 10, 0.6, 0.1)], start_step=15,
                       stream=io.StringIO(), tensorboard=False)
  expected = [("eval", 5), ("eval", 10), ("epoch", 10), ("eval", 15)]
  records = sinks.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["kind"], r["step"]) for r in records] == expected
  assert records[2] == dict(kind="epoch", **epoch_record(1, 10, 0.6, 0.1))
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read().endswith("}\n")  # whole lines only: the next append starts a line
  # The resumed run appends after them.
  w.write(records_lib.EVAL, 20, dict(epsilon=2.0))
  w.write(records_lib.EPOCH, 20, epoch_record(2, 20, 0.6, 2.0))
  w.close()
  assert [(r["kind"], r["step"]) for r in sinks.read_jsonl(tmp_path / "metrics.jsonl")] == (
      expected + [("eval", 20), ("epoch", 20)])
  # The checkpoint's epoch records are what counts, even when the file lost them.
  os.remove(tmp_path / "metrics.jsonl")
  sinks.make_sinks(str(tmp_path), process_index=0, total_steps=40, num_epochs=4,
                   history=[epoch_record(1, 10, 0.6, 0.1)], start_step=15,
                   stream=io.StringIO(), tensorboard=False).close()
  assert [(r["kind"], r["step"]) for r in sinks.read_jsonl(tmp_path / "metrics.jsonl")] == [
      ("epoch", 10)]


def test_resume_cut_is_atomic(tmp_path, monkeypatch):
  # A failure while the cut file is written (a full disk) leaves the previous file whole.
  _old_run(tmp_path)
  before = (tmp_path / "metrics.jsonl").read_bytes()

  def fail(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(atomic.os, "replace", fail)
  with pytest.raises(atomic.DiskFullError, match="previous metrics.jsonl .* is intact"):
    sinks.make_sinks(str(tmp_path), process_index=0, total_steps=40, num_epochs=4,
                     history=[epoch_record(1, 10, 0.6, 0.1)], start_step=15,
                     stream=io.StringIO(), tensorboard=False)
  assert (tmp_path / "metrics.jsonl").read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left


def test_a_fresh_run_starts_an_empty_file(tmp_path):
  _old_run(tmp_path)  # a workdir without a checkpoint: nothing of the old file is kept
  sinks.make_sinks(str(tmp_path), process_index=0, total_steps=40, num_epochs=4,
                   stream=io.StringIO(), tensorboard=False).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""
  assert oct(os.stat(tmp_path / "metrics.jsonl").st_mode & 0o777) == "0o600"


def test_read_scalars_reads_tfrecord_framing(tmp_path):
  from tensorboardX import SummaryWriter
  with SummaryWriter(logdir=str(tmp_path)) as tb:
    for step in range(3):
      tb.add_scalar("a/b", step * 1.5, step)
  assert read_scalars(tmp_path) == {"a/b": [(0, 0.0), (1, 1.5), (2, 3.0)]}
  # The framing the reader relies on: 8-byte length, 4-byte crc, payload, 4-byte crc.
  path = next(p for p in tmp_path.iterdir() if p.name.startswith("events"))
  data = path.read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  assert 12 + length + 4 <= len(data)


def test_training_run_logs_every_n_steps_and_every_epoch(tmp_path, capsys):
  from configs import test as test_config
  from fastdp_jax.dp import accounting
  from fastdp_jax import train
  from tests.conftest import make_dataset
  cfg = test_config.get_config()
  cfg.data.path = make_dataset(str(tmp_path / "data"), rows=3000, seed=1)
  cfg.log_every_steps = 25
  cfg.privacy_eval.membership_rows = 0
  cfg.export_model = False
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  work = str(tmp_path / "w")
  per_epoch = summary.steps // cfg.num_epochs
  path = os.path.join(work, "metrics.jsonl")
  records = sinks.read_jsonl(path)
  epochs, points = sinks.read_jsonl(path, "epoch"), sinks.read_jsonl(path, "eval")
  assert {r["kind"] for r in records} == {"eval", "epoch", "summary"}
  assert records[-1]["kind"] == "summary" and records[-1]["steps"] == summary.steps
  assert records[-1]["test_accuracy"] == summary.test_accuracy
  assert not os.path.exists(os.path.join(work, "steps.jsonl"))
  expected = sorted(set(range(25, summary.steps + 1, 25)) | {per_epoch, 2 * per_epoch})
  assert [p["step"] for p in points] == expected  # exact multiples of N, plus epoch ends
  assert [r["epoch"] for r in epochs] == [1, 2]
  # Mid-epoch epsilon is the accountant's; epoch-end points repeat the epoch records.
  mid = [p for p in points if p["step"] % per_epoch]
  assert mid[0]["epsilon"] == accounting.compute_epsilon(
      cfg.dp.noise_multiplier, summary.sampling_rate, mid[0]["step"],
      summary.accountant_delta)
  eps = [p["epsilon"] for p in points]
  assert eps == sorted(eps) and len(set(eps)) == len(eps)
  by_step = {p["step"]: p for p in points}
  for r in epochs:
    assert by_step[r["step"]]["test_accuracy"] == r["test_accuracy"]
    assert by_step[r["step"]]["epsilon"] == r["epsilon"]
  assert all(np.isfinite(p["nonprivate_train_loss"]) and 0 <= p["nonprivate_clipped_fraction"] <= 1 for p in points)
  scalars = read_scalars(work)
  assert [s for s, _ in scalars["test/accuracy"]] == expected
  # float32 in the event file: 1e-6 relative is above its rounding (2^-24 ~ 6e-8).
  assert [v for _, v in scalars["privacy/epsilon"]] == pytest.approx(eps, rel=1e-6)
  assert [v for _, v in scalars["epoch/test_accuracy"]] == pytest.approx(
      [r["test_accuracy"] for r in epochs], rel=1e-6)
  assert scalars["final/test_accuracy"][0][1] == pytest.approx(summary.test_accuracy)
  out = capsys.readouterr().out
  assert "\r" not in out and out.count("\nepoch ") + out.startswith("epoch ") == 2

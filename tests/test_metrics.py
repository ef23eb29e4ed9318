"""MetricWriter: console lines, progress bar, metrics.jsonl / steps.jsonl, TensorBoard events."""

import io
import json
import logging as std_logging
import os
import re
import struct

import numpy as np
import pytest

from fastdp_jax import metrics


class _Tty(io.StringIO):
  def isatty(self):
    return True


def _chunk(losses, counts, clipped=None):
  losses = np.asarray(losses, np.float64)
  counts = np.asarray(counts, np.float64)
  return dict(loss_sum=losses * counts, count=counts,
              clipped=np.zeros_like(counts) if clipped is None else np.asarray(clipped, float),
              nonfinite=np.zeros_like(counts))


def _record(epoch, step, acc, eps):
  return dict(epoch=epoch, step=step, nonprivate_train_loss=0.5, test_loss=0.6,
              test_accuracy=acc, epsilon=eps, nonprivate_clipped_fraction=0.1,
              nonprivate_nonfinite_examples=0, epoch_time_s=1.0)


def test_schedule_puts_points_on_exact_multiples():
  w = metrics.MetricWriter("unused", total_steps=100, num_epochs=1, log_every_steps=30,
                           enabled=False)
  assert [w.steps_to_next_log(s) for s in (0, 29, 30, 31, 89)] == [30, 1, 30, 29, 1]
  assert [s for s in range(101) if w.log_due(s)] == [30, 60, 90]
  off = metrics.MetricWriter("unused", total_steps=100, num_epochs=1, log_every_steps=0,
                             enabled=False)
  assert off.steps_to_next_log(40) == 60 and not any(off.log_due(s) for s in range(101))


def test_plain_output_files_and_tensorboard(tmp_path):
  out = io.StringIO()
  w = metrics.MetricWriter(str(tmp_path), total_steps=20, num_epochs=2, log_every_steps=5,
                           stream=out, plain_interval_s=0.0)
  w.write_hparams({"dp": {"noise_multiplier": 1.1, "enabled": True}, "model": {"sizes": (8,)}})
  # Updates 0-4 have losses 1..5 on batches of 2, 4, ...: the point's loss is their weighted mean.
  w.write_train_steps(0, _chunk([1, 2, 3, 4, 5, 9], [2, 4, 6, 8, 10, 99], [1, 0, 0, 0, 1, 0]),
                      num_steps=5)
  p = w.write_point(5, dict(test_loss=0.7, test_accuracy=0.61, epsilon=0.3))
  assert p["nonprivate_train_loss"] == pytest.approx((2 + 8 + 18 + 32 + 50) / 30)
  assert p["nonprivate_clipped_fraction"] == pytest.approx(2 / 30)
  w.write_train_steps(5, _chunk([1.0] * 5, [3] * 5), num_steps=5)
  w.write_point(10, dict(test_loss=0.65, test_accuracy=0.63, epsilon=0.4))
  w.write_epoch(_record(1, 10, 0.63, 0.4))
  w.write_train_steps(10, _chunk([0.5] * 10, [3] * 10), num_steps=10)
  w.write_point(20, dict(test_loss=0.6, test_accuracy=0.64, epsilon=0.5))
  w.write_epoch(dict(_record(2, 20, 0.64, 0.5), nonprivate_attack_accuracy=0.55))
  w.write_summary(dict(epsilon=0.5, test_accuracy=0.64, steps=20, dp_enabled=True,
                       config={"x": 1}))
  w.close()

  text = out.getvalue()
  assert "\r" not in text  # no progress bar when the stream is not a terminal
  lines = text.splitlines()
  epoch_lines = [l for l in lines if l.startswith("epoch ")]
  assert epoch_lines == [
      "epoch 1/2  train_loss* 0.5000  test_loss 0.6000  test_acc 0.6300  epsilon 0.4000  "
      "time 1.0s",
      "epoch 2/2  train_loss* 0.5000  test_loss 0.6000  test_acc 0.6400  epsilon 0.5000  "
      "attack_acc* 0.5500  time 1.0s"]
  progress = [l for l in lines if l.startswith("step ")]
  assert progress and all("ETA" in l for l in progress)

  recs = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in recs] == [1, 2] and recs[1]["nonprivate_attack_accuracy"] == 0.55
  points = metrics.read_jsonl(tmp_path / "steps.jsonl")
  assert [p["step"] for p in points] == [5, 10, 20]
  assert points[1]["nonprivate_train_loss"] == pytest.approx(1.0)

  scalars = metrics.read_scalars(str(tmp_path))
  assert scalars["test/accuracy"] == [(5, pytest.approx(0.61)), (10, pytest.approx(0.63)),
                                      (20, pytest.approx(0.64))]
  assert [s for s, _ in scalars["privacy/epsilon"]] == [5, 10, 20]
  assert scalars["nonprivate/train_loss"][0][1] == pytest.approx(p["nonprivate_train_loss"], rel=1e-6)
  assert scalars["epoch/test_accuracy"] == [(1, pytest.approx(0.63)), (2, pytest.approx(0.64))]
  assert scalars["final/epsilon"] == [(20, pytest.approx(0.5))]
  assert not any(t.startswith("final/config") for t in scalars)
  # The hyperparameters are in the same event file (TensorBoard's hparams plugin data).
  raw = b"".join(open(os.path.join(tmp_path, f), "rb").read() for f in os.listdir(tmp_path)
                 if f.startswith("events.out.tfevents"))
  assert b"_hparams_/session_start_info" in raw and b"dp.noise_multiplier" in raw


def test_progress_bar_on_a_terminal(tmp_path):
  tty = _Tty()
  w = metrics.MetricWriter(str(tmp_path), total_steps=8, num_epochs=2, stream=tty,
                           tensorboard=False)
  w.write_train_steps(0, _chunk([0.9] * 4, [2] * 4), num_steps=4)
  w.write_epoch(_record(1, 4, 0.6, 0.2))
  w.write_train_steps(4, _chunk([0.7] * 4, [2] * 4), num_steps=4)
  w.write_epoch(_record(2, 8, 0.6, 0.3))
  w.close()
  text = tty.getvalue()
  assert "\r[" in text and "ETA" in text and "step 8/8 (100%)" in text
  assert "#" * 24 in text  # a full bar at the end
  # Epoch lines start on a cleared line and are never glued to the bar.
  assert "\r\x1b[Kepoch 1/2  train_loss*" in text
  # Finished: the bar is cleared and not redrawn after the last line.
  assert text.endswith("\r\x1b[Kepoch 2/2  train_loss* 0.5000  test_loss 0.6000  "
                       "test_acc 0.6000  epsilon 0.3000  time 1.0s\n")
  assert not (tmp_path / "events").exists() and not any(
      f.startswith("events.out") for f in os.listdir(tmp_path))


def test_only_the_writing_process_writes(tmp_path):
  out = io.StringIO()
  w = metrics.MetricWriter(str(tmp_path / "w"), total_steps=4, num_epochs=1, stream=out,
                           log_every_steps=2, enabled=False)
  w.write_train_steps(0, _chunk([1.0] * 2, [1] * 2), num_steps=2)
  assert w.write_point(2, dict(epsilon=0.1))["nonprivate_train_loss"] == 1.0  # same bookkeeping
  w.write_epoch(_record(1, 4, 0.5, 0.1))
  w.print("hello")
  w.close()
  assert out.getvalue() == "" and not (tmp_path / "w").exists()


def test_eta_leaves_out_compilation_and_the_first_evaluation(tmp_path, monkeypatch):
  # A fake clock: the first call takes 100 s (compilation), each later call of 10 updates 1 s,
  # the first epoch end 30 s (the evaluation's compilation, the first checkpoint save). The
  # first ETA of a 4-minute run used to read 1:17:43: the compiling call counted as a rate.
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
  out = io.StringIO()
  w = metrics.MetricWriter(str(tmp_path), total_steps=1000, num_epochs=2, stream=out,
                           tensorboard=False, plain_interval_s=0.0)
  eta = {}

  def call(step, seconds):
    clock[0] += seconds
    w.write_train_steps(step, _chunk([0.5] * 10, [2] * 10), num_steps=10)
    eta[step + 10] = re.findall(r"ETA (\S+)", out.getvalue())[-1]

  call(0, 100.0)
  for step in range(10, 500, 10):
    call(step, 1.0)
  clock[0] += 30.0
  w.write_point(500, dict(epsilon=0.5))
  w.write_epoch(_record(1, 500, 0.6, 0.5))
  for step in range(500, 600, 10):
    call(step, 1.0)
  w.close()
  assert eta[10] == "?"  # only the compiling call so far: no rate yet
  assert eta[20] == "1:38"  # 0.1 s per update, 980 to go (counted from the start: 1:22:29)
  assert eta[500] == "0:50"
  assert eta[510] == "0:49"  # the first epoch end's one-time 30 s left out as well
  assert eta[600] == "0:40"


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
  w = metrics.MetricWriter(str(tmp_path / "w"), total_steps=4, num_epochs=1, enabled=False)
  try:
    absl_logging.set_verbosity(absl_logging.INFO)
    w.write_epoch(_record(1, 4, 0.5, 0.1))
    assert not [m for m in seen if "epoch 1/1" in m]
    absl_logging.set_verbosity(1)
    w.write_epoch(_record(1, 4, 0.5, 0.1))
    assert [m for m in seen if "epoch 1/1" in m] == [
        "process 0: " + metrics.format_epoch_line(_record(1, 4, 0.5, 0.1), 1)]
  finally:
    absl_logging.set_verbosity(verbosity)
    logger.removeHandler(catch)


def test_resume_rewrites_epochs_and_cuts_points(tmp_path):
  with open(tmp_path / "steps.jsonl", "w") as f:
    for s in (5, 10, 15, 20):
      f.write(json.dumps(dict(step=s, epsilon=s / 10)) + "\n")
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps(_record(1, 10, 0.6, 0.1)) + "\n")
    f.write(json.dumps(_record(2, 20, 0.6, 0.2)) + "\n")  # done after the checkpoint: redone
  w = metrics.MetricWriter(str(tmp_path), total_steps=40, num_epochs=4, log_every_steps=5,
                           history=[_record(1, 10, 0.6, 0.1)], start_step=15,
                           stream=io.StringIO(), tensorboard=False)
  w.close()
  assert [r["epoch"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [1]
  assert [r["step"] for r in metrics.read_jsonl(tmp_path / "steps.jsonl")] == [5, 10, 15]


def test_read_scalars_reads_tfrecord_framing(tmp_path):
  from tensorboardX import SummaryWriter
  with SummaryWriter(logdir=str(tmp_path)) as tb:
    for step in range(3):
      tb.add_scalar("a/b", step * 1.5, step)
  assert metrics.read_scalars(str(tmp_path)) == {"a/b": [(0, 0.0), (1, 1.5), (2, 3.0)]}
  # The framing the reader relies on: 8-byte length, 4-byte crc, payload, 4-byte crc.
  path = next(p for p in tmp_path.iterdir() if p.name.startswith("events"))
  data = path.read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  assert 12 + length + 4 <= len(data)


def test_training_run_logs_every_n_steps_and_every_epoch(tmp_path, capsys):
  from configs import test as test_config
  from fastdp_jax import accounting
  from fastdp_jax import train
  from tests.conftest import make_dataset
  cfg = test_config.get_config()
  cfg.data.path = make_dataset(str(tmp_path / "data"), rows=3000, seed=1)
  cfg.log_every_steps = 25
  cfg.privacy_eval.membership_rows = 0
  cfg.export_model = False
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  work = str(tmp_path / "w")
  per_epoch = summary["steps"] // cfg.num_epochs
  epochs = metrics.read_jsonl(os.path.join(work, "metrics.jsonl"))
  points = metrics.read_jsonl(os.path.join(work, "steps.jsonl"))
  expected = sorted(set(range(25, summary["steps"] + 1, 25)) | {per_epoch, 2 * per_epoch})
  assert [p["step"] for p in points] == expected  # exact multiples of N, plus epoch ends
  # Mid-epoch epsilon is the accountant's; epoch-end points repeat the epoch records.
  mid = [p for p in points if p["step"] % per_epoch]
  assert mid[0]["epsilon"] == accounting.compute_epsilon(
      cfg.dp.noise_multiplier, summary["sampling_rate"], mid[0]["step"],
      summary["accountant_delta"])
  eps = [p["epsilon"] for p in points]
  assert eps == sorted(eps) and len(set(eps)) == len(eps)
  by_step = {p["step"]: p for p in points}
  for r in epochs:
    assert by_step[r["step"]]["test_accuracy"] == r["test_accuracy"]
    assert by_step[r["step"]]["epsilon"] == r["epsilon"]
  assert all(np.isfinite(p["nonprivate_train_loss"]) and 0 <= p["nonprivate_clipped_fraction"] <= 1 for p in points)
  scalars = metrics.read_scalars(work)
  assert [s for s, _ in scalars["test/accuracy"]] == expected
  assert [v for _, v in scalars["privacy/epsilon"]] == pytest.approx(eps, rel=1e-6)
  assert [v for _, v in scalars["epoch/test_accuracy"]] == pytest.approx(
      [r["test_accuracy"] for r in epochs], rel=1e-6)
  assert scalars["final/test_accuracy"][0][1] == pytest.approx(summary["test_accuracy"])
  out = capsys.readouterr().out
  assert "\r" not in out and out.count("\nepoch ") + out.startswith("epoch ") == 2

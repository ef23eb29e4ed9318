"""The console: epoch lines, plain progress lines and the progress bar, and the ETA."""

import io
import os
import re

import pytest

from fastdp_jax import console
from fastdp_jax import records as records_lib
from fastdp_jax import sinks
from tests.metric_records import chunk, epoch_record, write_progress


class _Tty(io.StringIO):
  def isatty(self):
    return True


def _screen(text):
  """What a terminal shows after ``text``: the few controls rich's progress bar uses (carriage
  return, newline, erase line, cursor up, colours and cursor visibility ignored)."""
  rows, row, col = [[]], 0, 0
  for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", text):
    if token == "\r":
      col = 0
    elif token == "\n":
      row, col = row + 1, 0
      rows += [[] for _ in range(row + 1 - len(rows))]
    elif token == "\x1b[2K":
      rows[row] = []
    elif token == "\x1b[1A":
      row = max(row - 1, 0)
    elif token.startswith("\x1b"):
      assert token[-1] in "mhl", f"an unexpected control {token!r}"  # colours, cursor
    else:
      line = rows[row]
      line += [" "] * (col + 1 - len(line))
      line[col] = token
      col += 1
  return ["".join(r).rstrip() for r in rows if "".join(r).strip()]


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
  monkeypatch.setenv("COLUMNS", "160")  # room for the whole bar and its text on one line
  tty = _Tty()
  w = sinks.make_sinks(str(tmp_path), process_index=0, total_steps=8, num_epochs=2,
                       stream=tty, tensorboard=False)
  write_progress(w, 4, chunk([0.9] * 4, [2] * 4), 4)
  w.write(records_lib.EPOCH, 4, epoch_record(1, 4, 0.6, 0.2))
  console.say("a line from elsewhere in the trainer")  # above the bar as well
  write_progress(w, 8, chunk([0.7] * 4, [2] * 4), 4)
  w.write(records_lib.EPOCH, 8, epoch_record(2, 8, 0.6, 0.3))
  w.close()
  text = tty.getvalue()
  assert "ETA" in text and "step 8/8 (100%)" in text and "loss* 0.7000" in text
  assert "━" * 24 in text  # rich's full bar at the end (24 cells)
  # Lines start on an erased line (never glued to the bar); at the end the bar is gone and
  # the screen holds exactly the lines printed, in order.
  assert "\r\x1b[2Kepoch 1/2  train_loss*" in text
  assert _screen(text) == [
      console.format_epoch_line(epoch_record(1, 4, 0.6, 0.2), 2),
      "a line from elsewhere in the trainer",
      console.format_epoch_line(epoch_record(2, 8, 0.6, 0.3), 2)]
  assert not any(f.startswith("events.out") for f in os.listdir(tmp_path))
  w.close()  # idempotent (the trainer's clean-up closes again)


def test_eta_leaves_out_compilation_and_the_first_evaluation(tmp_path, monkeypatch):
  # A fake clock: the first call takes 100 s (compilation), each later call of 10 updates 1 s,
  # the first epoch end 30 s (the evaluation's compilation, the first checkpoint save).
  # Counted as a rate, the compiling call alone would make a 4-minute run's first ETA 1:17:43.
  clock = [0.0]
  monkeypatch.setattr(console.time, "time", lambda: clock[0])
  out = io.StringIO()
  w = sinks.make_sinks(str(tmp_path), process_index=0, total_steps=1000, num_epochs=2,
                       stream=out, tensorboard=False, plain_interval_s=0.0)
  eta = {}

  def call(step, seconds):
    clock[0] += seconds
    write_progress(w, step + 10, chunk([0.5] * 10, [2] * 10), 10)
    eta[step + 10] = re.findall(r"ETA (\S+)", out.getvalue())[-1]

  call(0, 100.0)
  for step in range(10, 500, 10):
    call(step, 1.0)
  clock[0] += 30.0
  w.write(records_lib.EVAL, 500, dict(epsilon=0.5))
  w.write(records_lib.EPOCH, 500, epoch_record(1, 500, 0.6, 0.5))
  for step in range(500, 600, 10):
    call(step, 1.0)
  w.close()
  assert eta[10] == "?"  # only the compiling call so far: no rate yet
  assert eta[20] == "1:38"  # 0.1 s per update, 980 to go (counted from the start: 1:22:29)
  assert eta[500] == "0:50"
  assert eta[510] == "0:49"  # the first epoch end's one-time 30 s left out as well
  assert eta[600] == "0:40"


def test_a_failed_run_clears_its_progress_bar_and_shows_the_cursor(tmp_path, monkeypatch):
  # The trainer's clean-up closes the sinks: a bar left drawn would keep the cursor hidden.
  from configs import test as test_config
  from fastdp_jax import train
  from tests.conftest import make_dataset
  cfg = test_config.get_config()
  cfg.data.path = make_dataset(str(tmp_path / "data"), rows=3000, seed=1)
  cfg.log_every_steps, cfg.steps_per_call = 10, 5

  def fail(self, prefix):
    raise RuntimeError("evaluation failed")

  monkeypatch.setattr(train.Trainer, "split_metrics", fail)
  monkeypatch.setenv("COLUMNS", "160")
  tty = _Tty()
  monkeypatch.setattr("sys.stdout", tty)
  with pytest.raises(RuntimeError, match="evaluation failed"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  text = tty.getvalue()
  # The bar was drawn (its first draw is never throttled: the first call, 5 updates).
  assert "\x1b[?25l" in text and re.search(r"step 5/\d+ ", text)
  assert text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")  # the cursor is back
  assert not any(line.startswith("━") for line in _screen(text))  # and the bar is gone

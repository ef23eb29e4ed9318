"""Kill -9 or SIGTERM mid-epoch, then resume: same parameters and epsilon as an uninterrupted
run; SIGTERM first checkpoints the update it stops at."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, make_dataset

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

EPOCH_STEPS = 625  # round(train rows / batch_size) for the data set below
LOG_EVERY = 650  # an eval record early in epoch 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=25_000, seed=11)


def _cmd(dataset, workdir, *extra):
  return [sys.executable, "main.py", "--config=configs/test.py",
          f"--config.data.path={dataset}", f"--workdir={workdir}", "--config.num_epochs=3",
          "--config.batch_size=32", "--config.steps_per_call=1",
          "--config.checkpoint.every_steps=50", *extra]


def _saved_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _eval_steps(workdir):
  """The updates of the eval records past epoch 1 in ``metrics.jsonl`` (whole lines only)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f.read().split("\n")[:-1] if line]  # the last may be partial
  return [r["step"] for r in map(json.loads, lines)
          if r["kind"] == "eval" and r["step"] > EPOCH_STEPS]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
  """The uninterrupted run's workdir."""
  work = tmp_path_factory.mktemp("ref") / "ref"
  ref = subprocess.run(_cmd(dataset, work), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert json.loads((work / "summary.json").read_text())["steps"] == 3 * EPOCH_STEPS
  return work


def _assert_same_run(ref, work, log_every=None):
  a = np.load(ref / "final_params.npz")
  b = np.load(work / "final_params.npz")
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7)
  sa = json.loads((ref / "summary.json").read_text())
  sb = json.loads((work / "summary.json").read_text())
  assert sb["epsilon"] == sa["epsilon"] and sb["steps"] == sa["steps"]
  ma = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
  mb = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  # The eval records too: the ones after the checkpoint were cut and written again, once
  # (with ``log_every``, also one at each multiple of it).
  want = {r["step"] for r in ma if r["kind"] == "eval"}
  if log_every:
    want |= set(range(log_every, sa["steps"] + 1, log_every))
  assert [r["step"] for r in mb if r["kind"] == "eval"] == sorted(want)
  ma, mb = ([r for r in m if r["kind"] == "epoch"] for m in (ma, mb))
  assert [r["epoch"] for r in mb] == [1, 2, 3]  # no duplicated or lost epochs
  assert mb[-1]["test_accuracy"] == pytest.approx(ma[-1]["test_accuracy"], abs=1e-6)


def _resume(dataset, work, *extra):
  again = subprocess.run(_cmd(dataset, work, *extra), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout


def test_sigkill_during_epoch_3_then_resume_equals_uninterrupted(dataset, reference, tmp_path):
  work = tmp_path / "killed"
  log = open(tmp_path / "killed.log", "w")  # a file, not a pipe nobody reads (it would block)
  proc = subprocess.Popen(_cmd(dataset, work), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  killed_after = None
  while time.time() < deadline and proc.poll() is None:
    saved = _saved_steps(work)
    # Wait for a periodic (mid-epoch) checkpoint in epoch 3, then kill without warning.
    if saved and saved[-1] > 2 * EPOCH_STEPS and saved[-1] % EPOCH_STEPS:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      killed_after = saved[-1]
      break
    time.sleep(0.02)
  assert killed_after is not None, "the run ended before it could be killed in epoch 3"
  assert proc.returncode == -signal.SIGKILL
  assert not (work / "summary.json").exists()
  _resume(dataset, work)
  _assert_same_run(reference, work)


def test_sigterm_checkpoints_the_update_it_stops_at_then_resume_equals_uninterrupted(
    dataset, reference, tmp_path):
  # Epoch ends are the only scheduled checkpoints here: any other one is SIGTERM's. An eval
  # record at update LOG_EVERY (log_every_steps; it changes no parameter) tells the test that the
  # run is in epoch 2, past epoch 1's checkpoint: a signal sent on the checkpoint's appearance
  # alone could land while the run still finishes epoch 1 (it then stops at update 625).
  extra = ("--config.checkpoint.every_steps=100000", f"--config.log_every_steps={LOG_EVERY}")
  work = tmp_path / "terminated"
  log_path = tmp_path / "terminated.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_cmd(dataset, work, *extra), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      deadline, evals = time.time() + 300, []
      while proc.poll() is None and not evals and time.time() < deadline:
        time.sleep(0.02)
        evals = _eval_steps(work)
      assert evals and proc.poll() is None, "the run ended before it could be stopped"
      assert _saved_steps(work)[0] == EPOCH_STEPS  # epoch 1's checkpoint, the first there is
      proc.send_signal(signal.SIGTERM)  # in epoch 2 (or later on a starved machine)
      code = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  text = log_path.read_text()
  assert code == 143, text[-3000:]
  stopped = re.search(r"^stopped by SIGTERM after update (\d+): checkpoint saved in (\S+); "
                      r"run the same command to resume$", text, re.M)
  assert stopped, text[-3000:]
  step = int(stopped.group(1))
  assert stopped.group(2) == str(work)
  assert step > EPOCH_STEPS and step in _saved_steps(work)  # the update it stopped at
  assert not (work / "summary.json").exists()
  _resume(dataset, work, *extra)
  _assert_same_run(reference, work, log_every=LOG_EVERY)

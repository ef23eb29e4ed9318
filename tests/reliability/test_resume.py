"""Kill -9 mid-epoch and resume: same parameters and epsilon as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, make_dataset

EPOCH_STEPS = 625  # round(train rows / batch_size) for the data set below


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


def test_sigkill_during_epoch_3_then_resume_equals_uninterrupted(dataset, tmp_path):
  ref = subprocess.run(_cmd(dataset, tmp_path / "ref"), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  steps = json.loads((tmp_path / "ref" / "summary.json").read_text())["steps"]
  assert steps == 3 * EPOCH_STEPS

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

  again = subprocess.run(_cmd(dataset, work), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout
  a = np.load(tmp_path / "ref" / "final_params.npz")
  b = np.load(work / "final_params.npz")
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7)
  sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
  sb = json.loads((work / "summary.json").read_text())
  assert sb["epsilon"] == sa["epsilon"] and sb["steps"] == sa["steps"]
  ma = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  mb = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  # The eval records too: the ones after the checkpoint were cut and written again, once.
  assert [r["step"] for r in mb if r["kind"] == "eval"] == [
      r["step"] for r in ma if r["kind"] == "eval"]
  ma, mb = ([r for r in m if r["kind"] == "epoch"] for m in (ma, mb))
  assert [r["epoch"] for r in mb] == [1, 2, 3]  # no duplicated or lost epochs
  assert mb[-1]["test_accuracy"] == pytest.approx(ma[-1]["test_accuracy"], abs=1e-6)

"""Training from materialised Poisson batches (``data.batches``) equals training in memory.

The Spark job (preprocessing.poisson_batches) evaluates the sampler's inclusion function row
by row; with the same sampling key, the streamed run sees exactly the in-memory sampler's
batches, so the two runs give the same parameters (up to float32 summation order over a
different padding: 1e-5 relative) and the same epsilon. One SparkSession per module.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastdp_jax.data import batch_format
from fastdp_jax import summary as summary_lib
from fastdp_jax import train
from tests import preprocessing_helpers as T
from tests.conftest import ROOT, make_config, make_dataset

_WHY_NOT = T.spark_available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

BATCH, EPOCHS, SEED = 64, 2, 0  # configs/test.py's dp.sampling_seed is 0


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_streamed_training")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=2500, seed=21)


@pytest.fixture(scope="module")
def batches(spark, dataset, tmp_path_factory):
  from preprocessing import poisson_batches as pb
  out = str(tmp_path_factory.mktemp("b") / "batches")
  pb.run_job(spark, pb.plan_job(dataset, out, batch_size=BATCH, epochs=EPOCHS,
                                sampling_seed=SEED, updates_per_shard=16))
  return out


def _cfg(dataset, **overrides):
  return make_config(dataset, **{"batch_size": BATCH, "num_epochs": EPOCHS,
                                 "checkpoint.every_steps": 10, **overrides})


def _params(workdir):
  saved = np.load(os.path.join(workdir, "final_params.npz"))
  return {k: saved[k] for k in saved.files}


@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
def test_streamed_training_equals_in_memory_training(dataset, batches, tmp_path, strategy):
  memory = train.train_and_evaluate(_cfg(dataset, **{"parallel.strategy": strategy}),
                                    str(tmp_path / "memory"))
  streamed = train.train_and_evaluate(
      _cfg(dataset, **{"data.batches": batches, "parallel.strategy": strategy}),
      str(tmp_path / "streamed"))
  assert streamed.steps == memory.steps == EPOCHS * round(memory.train_examples / BATCH)
  assert streamed.epsilon == memory.epsilon
  assert streamed.sampling_rate == memory.sampling_rate
  # Batches from --sampling-seed: a reproducibility run, said so.
  assert streamed.private is False and streamed.batches == batches
  a, b = _params(tmp_path / "memory"), _params(tmp_path / "streamed")
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * np.abs(a[k]).max())
  assert streamed.test_accuracy == pytest.approx(memory.test_accuracy, abs=1e-3)


def test_batches_for_another_run_are_refused_before_training(dataset, batches, tmp_path):
  for overrides, what in (({"batch_size": 32}, "batch_size"), ({"num_epochs": 3}, "epochs")):
    with pytest.raises(batch_format.BatchMismatchError, match=what):
      train.train_and_evaluate(_cfg(dataset, **{"data.batches": batches, **overrides}),
                               str(tmp_path / what))
    assert not (tmp_path / what / "metrics.jsonl").exists()
  other = make_dataset(str(tmp_path / "other"), rows=2500, seed=22)
  with pytest.raises(batch_format.BatchMismatchError, match="dataset_digest"):
    train.train_and_evaluate(_cfg(other, **{"data.batches": batches}), str(tmp_path / "o"))


def test_a_corrupt_batch_shard_is_named_before_training(dataset, batches, tmp_path):
  import shutil
  copy = str(tmp_path / "copy")
  shutil.copytree(batches, copy)
  block = next(d for d in sorted(os.listdir(copy)) if d.startswith("epochs-"))
  shard = sorted(f for f in os.listdir(os.path.join(copy, block)) if f.endswith(".h5"))[1]
  path = os.path.join(copy, block, shard)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(batch_format.BatchError, match=shard):
    train.train_and_evaluate(_cfg(dataset, **{"data.batches": copy}), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_signal_mid_stream_then_resume_equals_uninterrupted(dataset, batches, tmp_path, sig):
  cmd = [sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
         f"--config.data.path={dataset}", f"--config.data.batches={batches}",
         f"--config.batch_size={BATCH}", f"--config.num_epochs={EPOCHS}",
         "--config.steps_per_call=1", "--config.checkpoint.every_steps=5"]
  ref = subprocess.run(cmd + [f"--workdir={tmp_path / 'ref'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  steps = summary_lib.read_summary(str(tmp_path / "ref")).steps
  work = tmp_path / "stopped"

  def saved():
    ckpt = work / "checkpoints"
    return sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) if ckpt.is_dir() else []

  with open(tmp_path / "stopped.log", "w") as log:
    proc = subprocess.Popen(cmd + [f"--workdir={work}"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
  signalled_after, deadline = None, time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None:
      if saved() and 0 < saved()[-1] <= steps // 2:  # half the run still to go
        signalled_after = saved()[-1]
        proc.send_signal(sig)
        proc.wait(timeout=120)
        break
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert signalled_after is not None, "the run ended before it could be stopped"
  text = (tmp_path / "stopped.log").read_text()
  if sig == signal.SIGTERM:  # the reader thread stopped too, after the checkpoint
    assert proc.returncode == 143, text[-3000:]
    stop = re.search(r"^stopped by SIGTERM after update (\d+)", text, re.M)
    assert stop and int(stop.group(1)) in saved(), text[-3000:]
  else:
    assert proc.returncode == -signal.SIGKILL
  again = subprocess.run(cmd + [f"--workdir={work}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout
  a, b = _params(tmp_path / "ref"), _params(work)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k])  # same batches, same noise, same shapes


def test_two_processes_streaming_equal_one(dataset, batches, tmp_path):
  # 2 processes x 2 fake CPU devices, each reading only its devices' slots of every update.
  one = train.train_and_evaluate(_cfg(dataset, **{"data.batches": batches,
                                                  "checkpoint.enabled": False}),
                                 str(tmp_path / "one"))
  work = tmp_path / "two"
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
       "--devices_per_process=2", "--", "--config=configs/test.py",
       f"--config.data.path={dataset}", f"--config.data.batches={batches}",
       f"--config.batch_size={BATCH}", f"--config.num_epochs={EPOCHS}",
       "--config.checkpoint.enabled=False", f"--workdir={work}"],
      cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stdout[-3000:]
  two = summary_lib.read_summary(str(work))
  assert two.num_processes == 2 and two.num_devices == 4
  assert two.steps == one.steps and two.epsilon == one.epsilon
  # Same batches and noise; the float32 sums differ in order only (see test_multihost's
  # derivation of the 1e-5 bound).
  a, b = _params(tmp_path / "one"), _params(work)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * np.abs(a[k]).max())


@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
def test_update_minus_noise_equals_float64_clipped_sum_streamed(dataset, batches, tmp_path,
                                                                clipping):
  # The materialised batches' updates, read back with h5py, through the real loop: each update
  # minus its exact noise is the float64 clipped sum of that update's rows, before and after
  # a resume (tests/dp/test_update_precision.py has the in-memory cases and the derivation).
  from tests.dp import test_update_precision as P
  from tests.dp import update_reference as ref_lib
  cfg = P._config(dataset, clipping=clipping, **{
      "data.batches": batches, "batch_size": BATCH, "num_epochs": EPOCHS})
  P.run_and_resume(cfg, str(tmp_path / "w"),
                   lambda t: lambda step: ref_lib.streamed_batch(batches, step),
                   f"streamed, {clipping} clipping", batch_size=BATCH)
  # A streamed run never samples: keys.json holds the noise key and no sampling key.
  with open(tmp_path / "w" / "keys.json") as f:
    stored = json.load(f)
  assert stored["sampling"] is None and len(stored["noise"]) == 4


def test_forget_removes_the_batches_the_run_trained_from(dataset, batches, tmp_path):
  import shutil
  from fastdp_jax import checkpoint
  copy = str(tmp_path / "batches")
  shutil.copytree(batches, copy)
  work = tmp_path / "w"
  train.train_and_evaluate(_cfg(dataset, **{"data.batches": copy, "export_model": False}),
                           str(work))
  assert json.loads((work / "keys.json").read_text())["sampling"] is None
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.checkpoint", "forget", str(work)],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  for path in (copy, str(work / "keys.json"), str(work / checkpoint.CHECKPOINT_DIR)):
    assert not os.path.exists(path) and f"removed {path}\n" in r.stdout, (path, r.stdout)
  assert (work / "summary.json").exists() and (work / "KEYS_DELETED").exists()

"""Values are checked wherever rows enter: the streamed batches by the in-memory loader's rule.

A batch shard edited by someone who also recomputed its sha256 and the block manifest's digest
passes every integrity check; its rows must still be finite, inside the dataset manifest's
declared bounds and labelled in the task's domain, or the run stops naming the shard and the
row (exit status 2 from the command line). One SparkSession per module.
"""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fastdp_jax import train
from fastdp_jax.data import batch_format
from fastdp_jax.data import batch_stream
from fastdp_jax.data import shards as data_lib
from tests import preprocessing_helpers as T
from tests.conftest import ROOT, make_config, make_dataset

_WHY_NOT = T.spark_available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

BATCH, EPOCHS, SEED = 64, 2, 0  # configs/test.py's dp.sampling_seed is 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=1500, seed=5)


@pytest.fixture(scope="module")
def batches(dataset, tmp_path_factory):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  spark_session = T.spark_session("test_streamed_values")
  spark = next(spark_session)
  out = str(tmp_path_factory.mktemp("b") / "batches")
  try:
    pb.run_job(spark, pb.plan_job(dataset, out, batch_size=BATCH, epochs=EPOCHS,
                                  sampling_seed=SEED, updates_per_shard=8))
  finally:
    spark_session.close()
  return out


def _forge(batches, tmp_path, *, features=None, labels=None):
  """A copy whose second shard's real rows of its third update get these values, resealed
  (sha256 and block digest recomputed) as a forger would; returns (copy, shard, update)."""
  copy = str(tmp_path / "forged")
  shutil.copytree(batches, copy)
  block = batch_format.block_dirs(copy)[0]
  manifest_path = os.path.join(copy, block, batch_format.BLOCK_MANIFEST)
  with open(manifest_path) as f:
    body = json.load(f)
  entry = body["shards"][1]
  path = os.path.join(copy, block, entry["file"])
  with h5py.File(path, "r+") as f:
    mask = f["mask"][2]
    assert mask.any()
    if features is not None:
      x = f["features"][2]
      x[mask] = features
      f["features"][2] = x
    if labels is not None:
      y = f["labels"][2]
      y[mask] = labels
      f["labels"][2] = y
  entry["sha256"] = data_lib.sha256_file(path)
  entry["bytes"] = os.path.getsize(path)
  body["digest"] = batch_format.body_digest(body)
  with open(manifest_path, "w") as f:
    json.dump(body, f)
  batch_stream.open_batches(copy)  # every integrity check passes
  return copy, entry["file"], entry["first_update"] + 2


def _cfg(dataset, batches):
  return make_config(dataset, **{"batch_size": BATCH, "num_epochs": EPOCHS,
                                 "data.batches": batches})


@pytest.mark.parametrize("features, labels, what", [
    (1e30, 7, "outside its declared bounds"),
    (None, 7, r"label\(s\) outside \{0, 1\}"),
    (np.nan, None, "non-finite"),
], ids=["features_and_labels", "labels", "nan"])
def test_values_checked_wherever_rows_enter_streamed_batches(dataset, batches, tmp_path,
                                                              features, labels, what):
  forged, shard, update = _forge(batches, tmp_path, features=features, labels=labels)
  with pytest.raises(batch_format.BatchError, match=what) as info:
    train.train_and_evaluate(_cfg(dataset, forged), str(tmp_path / "w"))
  message = str(info.value)
  assert shard in message and f"update {update}, slot " in message
  assert "\n" not in message
  assert not (tmp_path / "w" / "summary.json").exists()


def test_values_checked_wherever_rows_enter_streamed_batches_cli(dataset, batches, tmp_path):
  forged, shard, update = _forge(batches, tmp_path, features=1e30, labels=7)
  r = subprocess.run([sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
                      f"--config.data.path={dataset}", f"--config.data.batches={forged}",
                      f"--config.batch_size={BATCH}", f"--config.num_epochs={EPOCHS}",
                      f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, check=False)
  assert r.returncode == 2, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and shard in last and f"update {update}, slot " in last
  assert not (tmp_path / "w" / "summary.json").exists()


def test_the_unforged_batches_still_train(dataset, batches, tmp_path):
  summary = train.train_and_evaluate(_cfg(dataset, batches), str(tmp_path / "w"))
  assert summary.steps == EPOCHS * round(summary.train_examples / BATCH)

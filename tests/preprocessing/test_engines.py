"""The data command's two engines (``--engine local|spark``) write the same dataset.

Same shard files byte for byte (hence every array), the same rejects, and the same manifest
but for the fields that name the engine and its timing; ``--engine auto`` picks the local
streaming path for a small local CSV and Spark otherwise.
"""

import glob
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from preprocessing import spark_job
from preprocessing.output import PipelineError
from tests import preprocessing_helpers as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The manifest fields allowed to differ between engines: which engine ran, Spark's own
# settings, and the wall time.
ENGINE_FIELDS = {"producer", "engine", "spark", "seconds"}


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
  """3,000 generated CaPUMS rows (a few NA cells) with 25 malformed lines, one of each kind
  five times."""
  return T.dirty_capums(tmp_path_factory.mktemp("engines"), 3000, seed=7, malformed=25,
                        malformed_seed=3)


def _data_command(*args):
  r = subprocess.run([sys.executable, "-m", "preprocessing.spark_job", *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _files(out):
  return sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "**", "*"),
                                                           recursive=True)
                if os.path.isfile(p))


def _arrays(path):
  with h5py.File(path, "r") as f:
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                 if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.mark.slow
@pytest.mark.skipif(T.spark_available() is not None, reason=str(T.spark_available()))
def test_local_and_spark_engines_write_the_same_dataset(small_csv, tmp_path):
  local, spark = str(tmp_path / "local"), str(tmp_path / "spark")
  common = ["--input", small_csv["dirty"], "--spec", "capums", "--max-rows-per-shard", "1000"]
  r = _data_command(*common, "--output", local, "--engine", "local")
  assert "local engine" in r.stdout
  _data_command(*common, "--output", spark, "--engine", "spark", "--master", "local[2]")
  # The same files, each the same bytes: shards, rejects and nothing else but the manifest.
  assert _files(local) == _files(spark)
  shards = [f for f in _files(local) if f.endswith(".h5")]
  assert len(shards) >= 3  # 2,3xx train rows in shards of 1,000, and the test shard
  for name in _files(local):
    if name == "manifest.json":
      continue
    with open(os.path.join(local, name), "rb") as a, open(os.path.join(spark, name), "rb") as b:
      assert a.read() == b.read(), name
  for name in shards:  # and therefore every array (said again in arrays, for the reader)
    a, b = _arrays(os.path.join(local, name)), _arrays(os.path.join(spark, name))
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # The manifests differ only in the fields that name the engine.
  ml, ms = (json.load(open(os.path.join(d, "manifest.json"), encoding="utf-8"))
            for d in (local, spark))
  assert (ml["extra"]["engine"], ms["extra"]["engine"]) == ("local", "spark")
  differing = {k for k in set(ml["extra"]) | set(ms["extra"])
               if ml["extra"].get(k) != ms["extra"].get(k)}
  assert differing <= ENGINE_FIELDS, differing
  assert {k: v for k, v in ml.items() if k != "extra"} == {
      k: v for k, v in ms.items() if k != "extra"}
  # Counts: every line read, the malformed ones rejected.
  pv = ml["provenance"]
  assert pv["rows_read"] == T.count_lines(small_csv["dirty"]) - 1 == 3025
  assert pv["rejected"] == len(small_csv["injected"]) == 25
  assert pv["rows_read"] == pv["kept"] + pv["dropped_na"] + pv["rejected"]


def test_auto_picks_local_for_a_small_csv_and_spark_otherwise(small_csv, tmp_path,
                                                              monkeypatch):
  csv = small_csv["dirty"]
  assert spark_job.choose_engine("auto", csv, "auto") == "local"
  assert spark_job.choose_engine("auto", csv, "auto", ["master"]) == "spark"
  assert spark_job.choose_engine("spark", csv, "auto") == "spark"
  assert spark_job.choose_engine("auto", str(small_csv["dir"]), "auto") == "spark"  # a directory
  monkeypatch.setattr(spark_job, "LOCAL_ENGINE_MAX_BYTES", os.path.getsize(csv))
  assert spark_job.choose_engine("auto", csv, "auto") == "spark"  # at the threshold


@pytest.mark.parametrize("make_input,extra,message", [
    (lambda d: str(d), [], "one local CSV file"),
    (lambda d: "hdfs://nn/census.csv", [], "one local CSV file"),
    (lambda d: str(d / "x.csv"), ["master"], "takes no Spark setting (--master)"),
])
def test_engine_local_refuses_what_it_cannot_do(small_csv, tmp_path, make_input, extra,
                                                message):
  path = tmp_path / "x.csv"
  path.write_text("a,b\n1,2\n")
  with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
    spark_job.choose_engine("local", make_input(tmp_path), "csv", extra)

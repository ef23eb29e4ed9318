"""The two preprocessing paths agree or say why; a full disk is one line; nothing private stays.

Compressed input, the header length limit, hidden input files, ``--conf`` for the workers'
interpreter, a full disk under the output, and staging directories of killed jobs, through the
Spark job and the streaming path. One SparkSession (local[2]) serves the module.
"""

import bz2
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from preprocessing import synthesize as S
from preprocessing.mapreduce import local
from preprocessing.output import PipelineError
from tests import preprocessing_helpers as T
from tests.conftest import ROOT
from tests.reliability import tmpfs

_WHY_NOT = T.spark_available()
# A Spark session: `make test-fast` leaves these out.
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT)), pytest.mark.slow]
_NO_TMPFS = tmpfs.why_not()
needs_tmpfs = pytest.mark.skipif(_NO_TMPFS is not None, reason=str(_NO_TMPFS))

HEADER = ",".join(f'"{c}"' for c in split_lib.CAPUMS_COLUMNS)
GOOD = ["1,0,1,0,1,1,0,1,0,1,1,1", "0,1,0,0,0,0,0,1,1,1,0,0", "1,1,0,1,1,1,1,1,0,1,0,1",
        "0,0,0,0,0,1,0,0,0,1,0,1"]


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_preprocess_faults")


def _run_spark(spark, path, out, **kw):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  return spark_job.run_job(spark, str(path), str(out), "capums", **kw)


def _csv(path, rows=400, seed=3) -> str:
  S.write_csv_file(str(path), rows, seed=seed)
  return str(path)


def _same_data(a: str, b: str) -> None:
  for split in ("train", "test"):
    x, y = data_lib.load_split(a, split), data_lib.load_split(b, split)
    np.testing.assert_array_equal(x.features, y.features)
    np.testing.assert_array_equal(x.labels, y.labels)


def _one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


# --- compressed input --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_gzip_and_bzip2_input_give_the_same_dataset_on_both_paths(spark, tmp_path, suffix,
                                                                  opener):
  plain = _csv(tmp_path / "in.csv")
  packed = str(tmp_path / f"in.csv{suffix}")
  with open(plain, "rb") as src, opener(packed, "wb") as dst:
    dst.write(src.read())
  reference = local.run_local(plain, str(tmp_path / "plain"), "capums")
  a = _run_spark(spark, packed, tmp_path / "spark")
  b = local.run_local(packed, str(tmp_path / "streaming"), "capums")
  assert a.provenance == b.provenance == reference.provenance
  _same_data(str(tmp_path / "spark"), str(tmp_path / "plain"))
  _same_data(str(tmp_path / "streaming"), str(tmp_path / "plain"))


def test_other_compressions_are_refused_by_the_streaming_path_in_its_words(tmp_path):
  zst = tmp_path / "in.csv.zst"
  zst.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))  # a zstd frame's magic number
  with pytest.raises(PipelineError, match=r"is zstd-compressed: compressed input is not "
                     "supported by the streaming path"):
    local.run_local(str(zst), str(tmp_path / "out"), "capums")
  # The mapper alone (as under Hadoop, which decompresses only the codecs it knows).
  with open(_csv(tmp_path / "in.csv"), "rb") as f:
    packed = gzip.compress(f.read())
  r = subprocess.run([sys.executable, "preprocessing/mapreduce/mapper.py", "--spec", "capums"],
                     input=packed, cwd=ROOT, capture_output=True, timeout=120)
  assert r.returncode == 2 and b"compressed input is not supported by the streaming path" in (
      r.stderr), r.stderr
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# --- the header length limit -------------------------------------------------------------------
def test_a_header_longer_than_1_mib_is_refused_alike_by_both_paths(spark, tmp_path):
  path = tmp_path / "long.csv"
  path.write_text(HEADER + "," + "x" * (1 << 20) + "\n" + "\n".join(GOOD) + "\n")
  same = r"the first line is taken as the header: it is longer than 1048576 bytes \(1 MiB\)"
  with pytest.raises(PipelineError, match=same):  # before: "first line changed while ..."
    _run_spark(spark, path, tmp_path / "spark")
  with pytest.raises(PipelineError, match=same):
    local.run_local(str(path), str(tmp_path / "streaming"), "capums")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# --- hidden input files ------------------------------------------------------------------------
def test_skipped_input_files_are_listed_in_the_summary_line(spark, tmp_path, capsys):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  inputs = tmp_path / "in"
  inputs.mkdir()
  _csv(inputs / "part-0.csv", rows=50)
  for hidden in ("_SUCCESS", ".part-1.csv.crc", "_rows_of_2019.csv"):
    (inputs / hidden).write_text(HEADER + "\n" + GOOD[0] + "\n")
  code = spark_job.main(["--input", str(inputs), "--output", str(tmp_path / "out"),
                         "--spec", "capums", "--master", "local[2]"])
  out = capsys.readouterr().out
  assert code == 0
  assert ("skipped 3 input files that Spark ignores (names starting with _ or .): "
          ".part-1.csv.crc, _SUCCESS, _rows_of_2019.csv") in out
  manifest = manifest_lib.read_manifest(str(tmp_path / "out"))
  assert manifest.provenance.rows_read == 50
  assert manifest.extra["skipped_inputs"] == [".part-1.csv.crc", "_SUCCESS", "_rows_of_2019.csv"]


# --- --conf spark.pyspark.python -------------------------------------------------------------
def test_a_workers_interpreter_that_cannot_run_the_tasks_is_refused_before_spark(tmp_path,
                                                                                capsys):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  args = ["--input", _csv(tmp_path / "in.csv", rows=20), "--output", str(tmp_path / "o"),
          "--spec", "capums"]
  assert spark_job.main(args + ["--conf", "spark.pyspark.python=/no/such/python"]) == 2
  assert "spark.pyspark.python=/no/such/python: no such interpreter" in capsys.readouterr().err
  bare = tmp_path / "bare-python"  # an interpreter without h5py and friends
  bare.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named h5py' >&2\nexit 1\n")
  bare.chmod(0o755)
  assert spark_job.main(args + ["--conf", f"spark.pyspark.python={bare}"]) == 2
  assert "cannot import h5py, numpy, pandas and pyarrow" in capsys.readouterr().err
  assert spark_job.main(args + ["--conf", "spark.pyspark.driver.python=/usr/bin/python0"]) == 2
  assert "the driver is this process" in capsys.readouterr().err
  assert spark_job.main(args + ["--conf", "no-equals-sign"]) == 2
  assert "expected KEY=VALUE" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")


def test_conf_spark_pyspark_python_is_the_interpreter_the_workers_run(tmp_path):
  log = tmp_path / "python.log"
  wrapper = tmp_path / "python-wrapper"
  wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {sys.executable} "$@"\n')
  wrapper.chmod(0o755)
  r = subprocess.run([sys.executable, "-m", "preprocessing.spark_job", "--input",
                      _csv(tmp_path / "in.csv", rows=50), "--output", str(tmp_path / "out"),
                      "--spec", "capums", "--master", "local[1]",
                      "--conf", f"spark.pyspark.python={wrapper}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  calls = log.read_text().splitlines()
  assert calls[0].startswith("-c import h5py")  # the check before Spark starts
  assert any("pyspark" in c for c in calls[1:]), calls  # then Spark's Python workers


# --- a full disk -------------------------------------------------------------------------------
@needs_tmpfs
def test_a_full_disk_under_the_output_is_one_line_and_keeps_the_previous_dataset(spark,
                                                                                 tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  small = tmp_path / "small.csv"
  small.write_text(HEADER + "\n" + "\n".join(GOOD) + "\n")
  big = _csv(tmp_path / "big.csv", rows=60_000)  # ~600 kB of shards
  with tmpfs.mounted(tmp_path / "disk", "192k") as disk:
    for name, run in (
        ("spark", lambda args: spark_job.main(args + ["--master", "local[2]"])),
        ("streaming", local.main)):
      out = os.path.join(disk, name)
      assert run(["--input", str(small), "--output", out, "--spec", "capums"]) == 0
      before = data_lib.load_split(out, "train")
      err = subprocess.run(  # a subprocess for the exit status and stderr as a user sees it
          [sys.executable, "-c", "import sys; from preprocessing.mapreduce import local; "
           "sys.exit(local.main(sys.argv[1:]))", "--input", big, "--output", out,
           "--spec", "capums", "--overwrite"], cwd=ROOT, capture_output=True, text=True,
          timeout=300) if name == "streaming" else None
      if err is None:
        with pytest.raises(atomic.DiskFullError, match=f"no space left on device writing {out};"
                           f" the previous {out} \\(if any\\) is intact"):
          _run_spark(spark, big, out, overwrite=True)
      else:
        assert err.returncode == 2, err.stderr[-3000:]
        line = _one_error_line(err.stderr)
        assert f"no space left on device writing {out}; the previous {out}" in line
      after = data_lib.load_split(out, "train")
      np.testing.assert_array_equal(after.features, before.features)
      assert not [p for p in os.listdir(disk) if p.startswith(".")]  # no staging left


@needs_tmpfs
def test_the_spark_cli_on_a_full_disk_exits_2_with_one_line(tmp_path):
  big = _csv(tmp_path / "big.csv", rows=60_000)
  with tmpfs.mounted(tmp_path / "disk", "128k") as disk:
    out = os.path.join(disk, "out")
    r = subprocess.run([sys.executable, "-m", "preprocessing.spark_job", "--input", big,
                        "--output", out, "--spec", "capums", "--master", "local[2]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "no space left on device writing" in _one_error_line(r.stderr)
    assert os.listdir(disk) == []


# --- what killed jobs leave ----------------------------------------------------------------
def _dead_pid() -> int:
  r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                     capture_output=True, text=True, check=True)
  return int(r.stdout)


def test_staging_directories_of_killed_jobs_are_removed_or_reported(spark, tmp_path, capsys):
  out = tmp_path / "out"
  host = atomic.host_tag()
  dead = tmp_path / f".out.staging-{host}-{_dead_pid()}-0123456789ab"
  old_format = tmp_path / ".out.staging-0123456789ab"  # no owner: maybe another host's
  trash = tmp_path / f".out.old-{host}-{_dead_pid()}-0123456789ab"
  for d in (dead, old_format, trash):
    d.mkdir()
    (d / "train-000000000000.h5").write_bytes(b"private rows")
  small = tmp_path / "small.csv"
  small.write_text(HEADER + "\n" + "\n".join(GOOD) + "\n")
  local.run_local(str(small), str(out), "capums")
  err = capsys.readouterr().err
  assert not dead.exists() and not trash.exists() and old_format.exists()
  assert f"removed {dead}, left by a killed job" in err
  assert f"remove it: rm -rf {old_format}" in err
  # The Spark path reports the same on its next run (and removes nothing it cannot prove dead).
  _run_spark(spark, small, out, overwrite=True)
  assert f"remove it: rm -rf {old_format}" in capsys.readouterr().err


def test_a_job_killed_mid_write_leaves_staging_that_the_next_run_removes(spark, tmp_path,
                                                                        capsys):
  big = _csv(tmp_path / "big.csv", rows=300_000)
  out = tmp_path / "out"
  job = subprocess.Popen([sys.executable, "-m", "preprocessing.mapreduce.local", "--input",
                          big, "--output", str(out), "--spec", "capums"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
  try:
    for _ in range(600):  # until its work directory holds private rows
      staging = [p for p in os.listdir(tmp_path) if p.startswith(".out.staging-")]
      if staging and os.listdir(tmp_path / staging[0]):
        break
      assert job.poll() is None, "the job ended before it could be killed"
      time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
  finally:
    job.wait()
  assert staging and (tmp_path / staging[0]).exists() and not out.exists()
  small = tmp_path / "small.csv"
  small.write_text(HEADER + "\n" + "\n".join(GOOD) + "\n")
  _run_spark(spark, small, out)
  assert f"removed {tmp_path / staging[0]}, left by a killed job" in capsys.readouterr().err
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
  assert json.load(open(out / manifest_lib.MANIFEST))["provenance"]["kept"] == 4

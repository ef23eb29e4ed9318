"""The Spark job: counts reconcile, rejects are complete, shards hold exactly the kept rows,
the split does not depend on partitioning, and the streaming path and the direct writer agree.

One SparkSession (local[2]) serves the whole module.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import features as features_lib
from preprocessing import synthesize as S
from tests import preprocessing_helpers as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULTON = os.path.join(ROOT, "..", "shared", "data", "FultonPUMS5full.csv")

_WHY_NOT = T.spark_available()
# A Spark session: `make test-fast` leaves these out.
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT)), pytest.mark.slow]


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_spark_job")


@pytest.fixture(scope="module")
def capums(tmp_path_factory):
  """200,000 generated CaPUMS rows, and the same file with 300 malformed lines inserted."""
  return T.dirty_capums(tmp_path_factory.mktemp("capums"), 200_000, seed=11, malformed=300,
                        malformed_seed=5)


def assert_same_splits(a: str, b: str):
  for split in manifest_lib.SPLITS:
    sa, sb = data_lib.load_split(a, split), data_lib.load_split(b, split)
    assert sa.feature_names == sb.feature_names
    np.testing.assert_array_equal(sa.features, sb.features)
    np.testing.assert_array_equal(sa.labels, sb.labels)


def assert_holds(output: str, expected):
  for split, (x, y) in expected.items():
    got = data_lib.load_split(output, split)
    assert got.features.shape == x.shape
    np.testing.assert_array_equal(got.features, x)
    np.testing.assert_array_equal(got.labels, y)


def test_200k_rows_with_malformed_lines(spark, capums, tmp_path):
  """The issue's acceptance check, Spark and streaming side by side."""
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  from preprocessing.mapreduce import local  # pylint: disable=g-import-not-at-top
  spec = features_lib.load_spec("capums")
  out = str(tmp_path / "spark")
  m = spark_job.run_job(spark, capums["dirty"], out, spec, max_rows_per_shard=40_000)
  pv = m.provenance
  # Counts reconcile with `wc -l` (minus the header) and with each other.
  assert pv.rows_read == T.count_lines(capums["dirty"]) - 1 == 200_300
  assert pv.rows_read == pv.kept + pv.dropped_na + pv.rejected
  assert m.extra["lines"] == T.count_lines(capums["dirty"])
  # Every injected line is in rejects/ with its reason and its text; nothing else is.
  rejects = T.read_rejects(out)
  assert pv.rejected == len(rejects) == 300
  assert [(r["line"], r["reason"], r["text"]) for r in rejects] == [
      (i.line, i.reason, i.text) for i in capums["injected"]]
  assert all(r["detail"] for r in rejects)
  assert sum(m.extra["rejected_by_reason"].values()) == 300
  # The shards hold exactly the kept rows, in the splits their row ids give.
  row_ids = T.row_ids_after_injection(200_000, [i.line for i in capums["injected"]])
  expected, dropped = T.expected_splits(spec, capums["columns"], row_ids)
  assert pv.dropped_na == dropped and pv.kept == 200_000 - dropped
  assert_holds(out, expected)
  assert max(s.rows for s in m.shards) <= 40_000
  assert sum(m.extra["dropped_na_by_column"].values()) >= dropped
  # The streaming path gives the same rows, counts and rejects.
  out_mr = str(tmp_path / "streaming")
  m2 = local.run_local(capums["dirty"], out_mr, "capums")
  assert m2.provenance == pv
  assert_same_splits(out, out_mr)
  assert [(r["line"], r["row"], r["reason"], r["detail"], r["text"])
          for r in T.read_rejects(out_mr)] == [
              (r["line"], r["row"], r["reason"], r["detail"], r["text"]) for r in rejects]
  assert m2.extra["dropped_na_by_column"] == m.extra["dropped_na_by_column"]


def test_split_does_not_depend_on_partitioning(spark, capums, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  a = spark_job.run_job(spark, capums["clean"], str(tmp_path / "a"), "capums")
  b = spark_job.run_job(spark, capums["clean"], str(tmp_path / "b"), "capums",
                        partition_mb=0.3)
  assert a.extra["spark"]["partitions"] != b.extra["spark"]["partitions"]
  assert b.extra["spark"]["partitions"] >= 10
  assert_same_splits(str(tmp_path / "a"), str(tmp_path / "b"))
  # ... and equals the direct writer on the same generated rows.
  S.write_shards(capums["columns"], str(tmp_path / "direct"))
  assert_same_splits(str(tmp_path / "a"), str(tmp_path / "direct"))
  assert a.provenance == manifest_lib.read_manifest(str(tmp_path / "direct")).provenance
  # A different split seed moves rows between train and test.
  c = spark_job.run_job(spark, capums["clean"], str(tmp_path / "c"), "capums", split_seed=1)
  assert c.rows("test") != a.rows("test")
  assert c.rows("train") + c.rows("test") == a.rows("train") + a.rows("test")


def test_raw_spec_matches_the_direct_writer(spark, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  cols = S.synthesize_raw(30_000, seed=2, na_fraction=0.002)
  csv = str(tmp_path / "raw.csv")
  S.write_csv(cols, csv)
  m = spark_job.run_job(spark, csv, str(tmp_path / "spark"), "fastdp_jax/data/specs/pums_raw.py")
  spec = features_lib.load_spec("pums_raw")
  assert m.feature_names == spec.feature_names and m.num_features == 29
  expected, dropped = T.expected_splits(spec, cols)
  assert m.provenance.dropped_na == dropped > 0
  assert_holds(str(tmp_path / "spark"), expected)
  train = data_lib.load_split(str(tmp_path / "spark"), "train")
  assert train.features.min() >= 0 and train.features.max() <= 1
  assert m.extra["spec"]["features"][-1] == {"name": "income", "kind": "numeric",
                                              "bounds": [0.0, 1e6], "domain": None,
                                              "transform": "log1p"}


def test_parquet_input_gives_the_same_rows_as_csv(spark, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  cols = S.synthesize_raw(20_000, seed=6, na_fraction=0.002)
  frame = pd.DataFrame(cols)
  os.makedirs(tmp_path / "pq")
  frame.iloc[:12_000].to_parquet(tmp_path / "pq" / "part-0.parquet")
  frame.iloc[12_000:].to_parquet(tmp_path / "pq" / "part-1.parquet")
  m = spark_job.run_job(spark, str(tmp_path / "pq"), str(tmp_path / "out"), "pums_raw")
  assert m.extra["format"] == "parquet" and m.provenance.rows_read == 20_000
  expected, _ = T.expected_splits(features_lib.load_spec("pums_raw"), cols)
  assert_holds(str(tmp_path / "out"), expected)
  # Malformed Parquet cells (a string column with junk, an out-of-domain code) are rejected.
  bad = frame.iloc[:100].copy()
  bad["age"] = bad["age"].astype(str)  # a text column: its cells go through the token rules
  bad.loc[3, "age"] = "old"
  bad.loc[7, "educ"] = 99
  bad.to_parquet(tmp_path / "bad.parquet")
  m = spark_job.run_job(spark, str(tmp_path / "bad.parquet"), str(tmp_path / "bad"),
                        "pums_raw")
  rejects = T.read_rejects(str(tmp_path / "bad"))
  assert [(r["line"], r["reason"]) for r in rejects] == [(4, "non_numeric"),
                                                          (8, "out_of_domain")]
  assert json.loads(rejects[0]["text"])["age"] == "old"
  assert m.provenance.rows_read == 100 and m.provenance.rejected == 2


def test_directory_of_part_files_continues_row_ids(spark, capums, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  with open(capums["clean"], encoding="utf-8") as f:
    lines = f.read().split("\n")[:-1]
  header, body = lines[0], lines[1:]
  os.makedirs(tmp_path / "parts")
  for i, (lo, hi) in enumerate([(0, 70_000), (70_000, 130_000), (130_000, 200_000)]):
    with open(tmp_path / "parts" / f"part-{i:05d}.csv", "w", encoding="utf-8") as f:
      f.write("\n".join([header] + body[lo:hi]) + "\n")
  open(tmp_path / "parts" / "_SUCCESS", "w").close()  # pylint: disable=consider-using-with
  m = spark_job.run_job(spark, str(tmp_path / "parts"), str(tmp_path / "out"), "capums")
  assert m.extra["header_lines"] == 3 and m.provenance.rows_read == 200_000
  assert len(m.extra["files"]) == 3
  expected, _ = T.expected_splits(features_lib.load_spec("capums"), capums["columns"])
  assert_holds(str(tmp_path / "out"), expected)


def test_overwrite_replaces_a_dataset(spark, capums, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "out")
  S.write_shards(S.synthesize_capums(1000, seed=0), out)
  with pytest.raises(FileExistsError, match="--overwrite"):
    spark_job.run_job(spark, capums["clean"], out, "capums")
  assert manifest_lib.read_manifest(out).provenance.rows_read == 1000  # untouched
  m = spark_job.run_job(spark, capums["clean"], out, "capums", overwrite=True)
  assert m.provenance.rows_read == 200_000
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging left


def test_many_partitions_give_the_local_splits_and_neighbours_stay_neighbours(spark, tmp_path):
  """The row-level split on many partitions: a row's occurrence counts the identical rows of
  the earlier partitions (the pre-pass's offsets), so the splits are the local engine's row
  for row; a removed line moves no other row; reordering the lines moves nothing."""
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  from preprocessing.mapreduce import local  # pylint: disable=g-import-not-at-top
  cols = S.synthesize_capums(20_000, seed=12, na_fraction=0.002)  # 10 binary columns: repeats
  n = len(cols["employed"])

  def run(name, rows=None, engine="spark"):
    rows = np.arange(n) if rows is None else rows
    S.write_csv({c: v[rows] for c, v in cols.items()}, str(tmp_path / f"{name}.csv"))
    out = str(tmp_path / name)
    if engine == "local":
      return local.run_local(str(tmp_path / f"{name}.csv"), out, "capums"), out
    return spark_job.run_job(spark, str(tmp_path / f"{name}.csv"), out, "capums",
                             partition_mb=0.05), out

  m, full = run("full")
  assert m.extra["spark"]["partitions"] >= 8
  _, by_local = run("local", engine="local")
  for split in manifest_lib.SPLITS:
    a, b = data_lib.load_split(full, split), data_lib.load_split(by_local, split)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.row_keys, b.row_keys)
  sets = T.split_multisets(full)
  i = T.middle_copy_of_the_commonest_row(cols)
  _, less = run("less", np.delete(np.arange(n), i))
  T.assert_neighbours(sets, T.split_multisets(less), T.capums_row(cols, i))
  _, shuffled = run("shuffled", np.random.default_rng(1).permutation(n))
  assert T.split_multisets(shuffled) == sets
  # Parquet: three files of small row groups, several partitions per file.
  os.makedirs(tmp_path / "pq")
  frame = pd.DataFrame(cols)
  for j, (lo, hi) in enumerate([(0, 6000), (6000, 13_000), (13_000, n)]):
    frame.iloc[lo:hi].to_parquet(tmp_path / "pq" / f"part-{j}.parquet", row_group_size=500)
  m = spark_job.run_job(spark, str(tmp_path / "pq"), str(tmp_path / "pq_out"), "capums",
                        partition_mb=0.01)
  assert m.extra["spark"]["partitions"] >= 6
  assert_same_splits(str(tmp_path / "pq_out"), full)


def test_real_fulton_file_with_the_raw_spec(spark, tmp_path):
  if not os.path.isfile(FULTON):
    pytest.skip(f"real data file {FULTON} is absent")
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  m = spark_job.run_job(spark, FULTON, str(tmp_path / "fulton"), "pums_raw")
  pv = m.provenance
  assert pv.rows_read == T.count_lines(FULTON) - 1 == 25_766
  assert pv.kept == 25_766 and pv.rejected == 0 and pv.dropped_na == 0
  d = pd.read_csv(FULTON)
  S.write_shards({c: d[c].to_numpy() for c in d.columns}, str(tmp_path / "direct"),
                 spec=features_lib.load_spec("pums_raw"))
  assert_same_splits(str(tmp_path / "fulton"), str(tmp_path / "direct"))


def test_spark_submit_runs_the_script(capums, tmp_path):
  submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
  if not os.path.exists(submit):
    submit = shutil.which("spark-submit")
  if not submit:
    pytest.skip("spark-submit is not installed")
  small = str(tmp_path / "small.csv")
  S.write_csv_file(small, 5000, seed=1)
  out = str(tmp_path / "out")
  env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
  r = subprocess.run([submit, "--master", "local[1]", "preprocessing/spark_job.py",
                      "--input", small, "--output", out, "--spec", "fastdp_jax/data/specs/capums.py"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  m = manifest_lib.read_manifest(out)
  assert m.extra["spark"]["master"] == "local[1]"  # the master came from spark-submit
  assert m.provenance.rows_read == 5000 and "5000 rows read" in r.stdout


def test_killed_job_leaves_no_complete_looking_output(tmp_path):
  big = str(tmp_path / "big.csv")
  S.write_csv_file(big, 1_000_000, seed=3)
  out = str(tmp_path / "out")
  proc = subprocess.Popen(
      [sys.executable, "-m", "preprocessing.spark_job", "--input", big, "--output", out,
       "--spec", "capums", "--master", "local[2]", "--partition-mb", "1.5"],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if glob.glob(str(tmp_path / ".out.staging-*" / "*.h5")):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the job ended before any shard was written"
    assert glob.glob(str(tmp_path / ".out.staging-*" / "*.h5")), "no shard appeared in time"
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not os.path.exists(out)
  with pytest.raises(FileNotFoundError):
    data_lib.load_split(out, "train")
  for staging in glob.glob(str(tmp_path / ".out.staging-*")):
    assert not os.path.exists(os.path.join(staging, manifest_lib.MANIFEST))


def test_gzip_input_and_a_path_with_spaces(spark, tmp_path):
  """Compressed files take the Spark-side header lookup; odd paths the local one."""
  import gzip  # pylint: disable=g-import-not-at-top
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  clean, dirty = str(tmp_path / "clean.csv"), str(tmp_path / "dirty.csv")
  S.write_csv_file(clean, 20_000, seed=9)
  injected = S.inject_malformed(clean, dirty, 40, seed=9)
  with open(dirty, "rb") as f:
    raw = f.read()
  gz = str(tmp_path / "dirty.csv.gz")
  with gzip.open(gz, "wb") as f:
    f.write(raw)
  odd = tmp_path / "dir with space%20"
  odd.mkdir()
  shutil.copy(dirty, odd / "dirty #1.csv")
  a = spark_job.run_job(spark, gz, str(tmp_path / "gz"), "capums")
  b = spark_job.run_job(spark, str(odd / "dirty #1.csv"), str(tmp_path / "odd"), "capums")
  assert a.provenance == b.provenance and a.provenance.rejected == 40
  assert a.provenance.rows_read == 20_040
  assert_same_splits(str(tmp_path / "gz"), str(tmp_path / "odd"))
  assert [r["line"] for r in T.read_rejects(str(tmp_path / "gz"))] == [i.line for i in injected]


# --- Columns by name; label kinds and embeddings ---------------------------------------------


def _reordered(cols: dict, path: str, extra: bool = True) -> list[str]:
  """Writes ``cols`` as a CSV in reversed column order with an extra unused column."""
  frame = pd.DataFrame(cols)[list(reversed(list(cols)))]
  if extra:
    frame.insert(3, "notes", np.arange(len(frame)) % 7)
  frame.to_csv(path, index=False, na_rep="NA")
  return list(frame.columns)


def test_columns_in_another_order_with_an_extra_column_give_the_same_shards(spark, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  cols = S.synthesize_raw(5_000, seed=8, na_fraction=0.002)
  canonical, shuffled = str(tmp_path / "canonical.csv"), str(tmp_path / "shuffled.csv")
  S.write_csv(cols, canonical)
  header = _reordered(cols, shuffled)
  a = spark_job.run_job(spark, canonical, str(tmp_path / "a"), "pums_raw")
  b = spark_job.run_job(spark, shuffled, str(tmp_path / "b"), "pums_raw")
  assert_same_splits(str(tmp_path / "a"), str(tmp_path / "b"))
  assert a.provenance == b.provenance
  # The columns the spec does not use are listed, in header order.
  assert a.extra["ignored_columns"] == ["state", "puma", "fips"]
  assert b.extra["ignored_columns"] == [c for c in header if c in ("state", "puma", "fips",
                                                                   "notes")]
  assert "notes" in b.extra["ignored_columns"]
  # Parquet: the same rule (another order, an extra column).
  os.makedirs(tmp_path / "pq")
  pd.read_csv(shuffled).to_parquet(tmp_path / "pq" / "part-0.parquet")
  c = spark_job.run_job(spark, str(tmp_path / "pq"), str(tmp_path / "c"), "pums_raw")
  assert_same_splits(str(tmp_path / "a"), str(tmp_path / "c"))
  assert "notes" in c.extra["ignored_columns"]


def test_a_missing_column_is_refused_before_spark_starts(tmp_path, monkeypatch, capsys):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  cols = S.synthesize_raw(100, seed=1)
  del cols["age"], cols["income"]
  path = str(tmp_path / "short.csv")
  _reordered(cols, path)
  started = []
  from fastdp_jax.data import spark as spark_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(spark_lib, "create_session", lambda *a, **k: started.append(a))
  code = spark_job.main(["--input", path, "--output", str(tmp_path / "out"), "--spec",
                         "pums_raw"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and started == [] and not (tmp_path / "out").exists()
  assert err.count("\n") == 0 and err.startswith("error: ")
  assert "missing ['age', 'income']" in err and path in err
  # The refusal comes from the local header check, which needs no Spark at all.
  with pytest.raises(spark_job.PipelineError, match=r"missing \['age', 'income'\]"):
    spark_job.check_header(path, features_lib.load_spec("pums_raw"))
  # Parquet's schema is read locally too.
  pd.DataFrame(cols).to_parquet(tmp_path / "short.parquet")
  with pytest.raises(spark_job.PipelineError, match=r"Parquet schema.*missing \['age'"):
    spark_job.check_header(str(tmp_path / "short.parquet"), features_lib.load_spec("pums_raw"))


def _label_spec(task: dict, embedding: dict | None = None) -> features_lib.FeatureSpec:
  columns = {"a": {"kind": "binary"}}
  features = ["a"]
  if embedding is not None:
    columns["code"] = embedding
    features.append("code")
  return features_lib.spec_from_config({"name": "t", "features": features, "columns": columns,
                                        "label": "y", "task": task})


def _write_rows(path, header, rows):
  with open(path, "w") as f:
    f.write(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_label_kinds_and_embeddings_reject_or_clip_and_count(spark, tmp_path):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  rows = [(i % 2, code, y) for i, (code, y) in enumerate(
      [(101, 1), (102, 5), (150, 2), (999, 3), (101, 7), (103, 4), (101, 6), (102, 2)])]
  csv = str(tmp_path / "rows.csv")
  _write_rows(csv, ("a", "code", "y"), rows)
  vocab = {"kind": "embedding", "range": (101, 150)}
  # Multiclass: codes 1..6 in three public buckets; the code 7 is in none: rejected.
  multi = _label_spec({"kind": "multiclass", "classes": (("low", (1, 2)), ("mid", (3, 4)),
                                                        ("high", (5, 6)))}, vocab)
  m = spark_job.run_job(spark, csv, str(tmp_path / "multi"), multi, test_fraction=0.5)
  rejects = T.read_rejects(str(tmp_path / "multi"))
  assert [(r["line"], r["reason"]) for r in rejects] == [(5, "out_of_domain"),
                                                          (6, "out_of_domain")]
  assert "'code': 999 is not an integer code in [101, 150]" in rejects[0]["detail"]
  assert "'y': 7 is not one of 1,2,3,4,5,6" in rejects[1]["detail"]
  assert m.task == manifest_lib.Task("multiclass", classes=("low", "mid", "high"))
  assert m.embeddings == (manifest_lib.Embedding("code", 50),)
  both = {s: data_lib.load_split(str(tmp_path / "multi"), s) for s in manifest_lib.SPLITS}
  got = sorted(zip(*(np.concatenate([both[s].features[:, 1] for s in both]),
                     np.concatenate([both[s].labels for s in both]))))
  assert got == sorted([(0.0, 0.0), (1.0, 2.0), (49.0, 0.0), (2.0, 1.0), (0.0, 2.0),
                        (1.0, 0.0)])
  # Regression, clipped: 7 and 1 leave [2, 6]; both are clipped and counted, none rejected.
  clip = _label_spec({"kind": "regression", "bounds": (2, 6), "transform": "log1p",
                      "out_of_bounds": "clip"}, dict(vocab, unknown="extra_id"))
  m = spark_job.run_job(spark, csv, str(tmp_path / "clip"), clip, test_fraction=0.5)
  assert m.provenance.rejected == 0 and m.provenance.kept == len(rows)
  assert m.extra["adjusted_by_column"] == {"label_clipped:y": 2, "unknown_id:code": 1}
  assert m.task.bounds == pytest.approx((np.log1p(2), np.log1p(6)), rel=1e-15)
  assert m.embeddings == (manifest_lib.Embedding("code", 51),)  # the extra id 50 for 999
  labels = np.concatenate([data_lib.load_split(str(tmp_path / "clip"), s).labels
                           for s in manifest_lib.SPLITS])
  assert sorted(labels.tolist()) == sorted(np.float32(np.log1p(np.clip(
      [r[2] for r in rows], 2, 6))).tolist())
  # Regression, rejected: the same two rows are rejected as out_of_bounds.
  reject = _label_spec({"kind": "regression", "bounds": (2, 6), "out_of_bounds": "reject"})
  spark_job.run_job(spark, csv, str(tmp_path / "reject"), reject, test_fraction=0.5)
  rejects = T.read_rejects(str(tmp_path / "reject"))
  assert [(r["line"], r["reason"]) for r in rejects] == [(2, "out_of_bounds"),
                                                          (6, "out_of_bounds")]
  assert "inside the label's bounds [2, 6]" in rejects[0]["detail"]

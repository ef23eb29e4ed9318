"""The Hadoop-streaming path: mapper | sort | reducer, locally and as Hadoop would run it.

(The comparison with the Spark job on the same input is in test_spark_job.py.)
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import features as features_lib
from preprocessing import synthesize as S
from tests import preprocessing_helpers as T
from preprocessing.mapreduce import mapper
from preprocessing.mapreduce import reducer
from preprocessing.mapreduce import to_shards
from preprocessing.output import PipelineError

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HADOOP_ENV = {"mapreduce_task_id": "attempt_1_0001_m_000000_0",
              "stream_map_input_ignoreKey": "false"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return T.dirty_capums(tmp_path_factory.mktemp("mr"), 30_000, seed=21, malformed=50,
                        malformed_seed=2)


def assert_same_splits(a, b):
  for split in manifest_lib.SPLITS:
    sa, sb = data_lib.load_split(a, split), data_lib.load_split(b, split)
    np.testing.assert_array_equal(sa.features, sb.features)
    np.testing.assert_array_equal(sa.labels, sb.labels)


def shell_pipeline(csv: str, tsv: str, spec: str = "fastdp_jax/data/specs/capums.py"):
  """The documented local command, verbatim."""
  cmd = (f"set -o pipefail; cat {csv} | {sys.executable} preprocessing/mapreduce/mapper.py "
         f"--spec {spec} | LC_ALL=C sort | {sys.executable} preprocessing/mapreduce/reducer.py "
         f"> {tsv}")
  return subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                        check=False)


def test_local_pipeline_equals_the_direct_writer(data, tmp_path):
  tsv = str(tmp_path / "cleaned.tsv")
  r = shell_pipeline(data["clean"], tsv)
  assert r.returncode == 0, r.stderr
  assert to_shards.main(["--input", tsv, "--output", str(tmp_path / "mr"), "--spec",
                         "capums"]) == 0
  S.write_shards(data["columns"], str(tmp_path / "direct"))
  assert_same_splits(str(tmp_path / "mr"), str(tmp_path / "direct"))
  m = manifest_lib.read_manifest(str(tmp_path / "mr"))
  assert m.provenance == manifest_lib.read_manifest(str(tmp_path / "direct")).provenance
  assert m.extra["producer"] == "preprocessing.mapreduce"


def test_malformed_lines_are_rejected_with_their_reason(data, tmp_path):
  tsv = str(tmp_path / "cleaned.tsv")
  assert shell_pipeline(data["dirty"], tsv).returncode == 0
  m = to_shards.convert(open(tsv, encoding="utf-8"), str(tmp_path / "mr"), "capums")
  assert m.provenance.rows_read == T.count_lines(data["dirty"]) - 1
  assert m.provenance.rejected == 50
  rejects = T.read_rejects(str(tmp_path / "mr"))
  assert [(r["line"], r["reason"], r["text"]) for r in rejects] == [
      (i.line, i.reason, i.text) for i in data["injected"]]
  row_ids = T.row_ids_after_injection(30_000, [i.line for i in data["injected"]])
  expected, dropped = T.expected_splits(features_lib.load_spec("capums"), data["columns"],
                                        row_ids)
  assert m.provenance.dropped_na == dropped
  for split, (x, y) in expected.items():
    got = data_lib.load_split(str(tmp_path / "mr"), split)
    np.testing.assert_array_equal(got.features, x)
    np.testing.assert_array_equal(got.labels, y)


def _hadoop_map(path: str, uri: str, cut: int, spec) -> list[bytes]:
  """Two map tasks over the byte ranges [0, cut) and [cut, end) of one file, as Hadoop's
  TextInputFormat feeds them with stream.map.input.ignoreKey=false (OFFSET<TAB>LINE)."""
  with open(path, "rb") as f:
    raw = f.read()
  offsets, lines, pos = [], [], 0
  for line in raw.split(b"\n")[:-1]:
    offsets.append(pos)
    lines.append(line.decode().rstrip("\r"))
    pos += len(line) + 1
  out = []
  for task in (0, 1):
    records = "".join(f"{o}\t{l}\n" for o, l in zip(offsets, lines) if (o < cut) == (task == 0))
    buf = io.StringIO()
    env = dict(HADOOP_ENV, mapreduce_map_input_file=uri)
    assert mapper.run(io.StringIO(records), buf, spec, None, environ=env) == 0
    out.extend(buf.getvalue().encode().splitlines(keepends=True))
  return out


def _shuffle_reduce(map_output: list[bytes]) -> str:
  """Hadoop's shuffle with one reducer: sort by key bytes, then the reducer."""
  buf = io.StringIO()
  stdin = io.StringIO(b"".join(sorted(map_output)).decode())
  assert reducer.run(stdin, buf) == 0
  return buf.getvalue()


def test_hadoop_style_map_tasks_give_the_same_dataset(data, tmp_path):
  spec = features_lib.load_spec("capums")
  size = os.path.getsize(data["dirty"])
  reduced = _shuffle_reduce(_hadoop_map(data["dirty"], "hdfs://nn/census/dirty.csv",
                                        size // 3, spec))
  to_shards.convert(io.StringIO(reduced), str(tmp_path / "hadoop"), spec)
  tsv = str(tmp_path / "local.tsv")
  assert shell_pipeline(data["dirty"], tsv).returncode == 0
  to_shards.convert(open(tsv, encoding="utf-8"), str(tmp_path / "local"), spec)
  assert_same_splits(str(tmp_path / "hadoop"), str(tmp_path / "local"))
  a, b = T.read_rejects(str(tmp_path / "hadoop")), T.read_rejects(str(tmp_path / "local"))
  assert {r["file"] for r in a} == {"hdfs://nn/census/dirty.csv"}
  assert [(r["line"], r["row"], r["reason"], r["text"]) for r in a] == [
      (r["line"], r["row"], r["reason"], r["text"]) for r in b]


def test_two_input_files_number_rows_in_path_order(data, tmp_path):
  """Each part file has its header at offset 0; row ids continue across files."""
  spec = features_lib.load_spec("capums")
  with open(data["clean"], encoding="utf-8") as f:
    lines = f.read().split("\n")[:-1]
  parts = []
  for i, (lo, hi) in enumerate([(1, 12_001), (12_001, 30_001)]):
    p = str(tmp_path / f"part-{i}.csv")
    with open(p, "w", encoding="utf-8") as f:
      f.write("\n".join([lines[0]] + lines[lo:hi]) + "\n")
    parts.append(p)
  # Map outputs of the two files, in the "wrong" order: the shuffle must restore it.
  out = _hadoop_map(parts[1], "hdfs://nn/d/part-1.csv", 10**9, spec)
  out += _hadoop_map(parts[0], "hdfs://nn/d/part-0.csv", 10**9, spec)
  m = to_shards.convert(io.StringIO(_shuffle_reduce(out)), str(tmp_path / "out"), spec)
  assert m.extra["header_lines"] == 2 and m.provenance.rows_read == 30_000
  S.write_shards(data["columns"], str(tmp_path / "direct"))
  assert_same_splits(str(tmp_path / "out"), str(tmp_path / "direct"))


def test_mapper_under_hadoop_needs_the_byte_offsets():
  spec = features_lib.load_spec("capums")
  env = {"mapreduce_task_id": "attempt_1", "mapreduce_map_input_file": "f.csv"}
  err = io.StringIO()
  sys_stderr, sys.stderr = sys.stderr, err
  try:
    assert mapper.run(io.StringIO("1,0,1\n"), io.StringIO(), spec, None, environ=env) == 2
  finally:
    sys.stderr = sys_stderr
  assert "stream.map.input.ignoreKey=false" in err.getvalue()


def test_mapper_rejects_a_bad_header_and_needs_columns_without_input_columns(tmp_path):
  spec = features_lib.spec_from_config(
      {"name": "t", "features": ("a",), "columns": {"a": {"kind": "binary"}}, "label": "y"})
  err = io.StringIO()
  sys_stderr, sys.stderr = sys.stderr, err
  try:
    assert mapper.run(io.StringIO("b,y\n1,0\n"), io.StringIO(), spec, None, environ={}) == 2
    env = dict(HADOOP_ENV, mapreduce_map_input_file="f.csv")
    assert mapper.run(io.StringIO("17\t1,0\n"), io.StringIO(), spec, None, environ=env) == 2
    out = io.StringIO()
    assert mapper.run(io.StringIO("17\t1,0\n"), out, spec, ("a", "y"), environ=env) == 0
  finally:
    sys.stderr = sys_stderr
  assert "missing ['a']" in err.getvalue()
  assert "--columns" in err.getvalue()
  assert out.getvalue() == "f.csv\t000000000000017\tK\t1,0\n"


def test_reducer_refuses_unsorted_input():
  lines = "-\t000000000000002\tK\t1,0\n-\t000000000000001\tK\t0,0\n"
  err = io.StringIO()
  sys_stderr, sys.stderr = sys.stderr, err
  try:
    assert reducer.run(io.StringIO(lines), io.StringIO()) == 2
  finally:
    sys.stderr = sys_stderr
  assert "LC_ALL=C sort" in err.getvalue()


def test_converter_detects_missing_records_and_a_wrong_spec(tmp_path):
  gap = "H\t-\t1\nK\t0\t1,0,1,0,1,0,1,0,1,1\nK\t2\t1,0,1,0,1,0,1,0,1,1\n"
  with pytest.raises(PipelineError, match="row id 2, expected 1"):
    to_shards.convert(io.StringIO(gap), str(tmp_path / "a"), "capums")
  narrow = "H\t-\t1\nK\t0\t1,0\n"
  with pytest.raises(PipelineError, match="does not hold 10 values"):
    to_shards.convert(io.StringIO(narrow), str(tmp_path / "b"), "capums")
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_mapper_values_read_back_exactly():
  values = np.array([[0.1, 1e-300, 123456789.123, -2.5e17, 3.0, 2.0**60, 3.0],
                     [1.0, 0.0, -0.5, 7.0, 1e22, -(2.0**53), -4.0]])
  texts = mapper.format_values(values)
  back = np.array([[float(t) for t in s.split(",")] for s in texts])
  np.testing.assert_array_equal(back, values)
  assert [s.split(",")[6] for s in texts] == ["3", "-4"]  # integers print as integers


def test_columns_by_name_in_any_order_with_an_extra_column(data, tmp_path):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = pd.read_csv(data["clean"], keep_default_na=False, dtype=str)
  shuffled = frame[list(reversed(frame.columns))]
  shuffled.insert(2, "notes", "x")
  path = str(tmp_path / "shuffled.csv")
  shuffled.to_csv(path, index=False)
  outputs = {}
  for name, csv in (("canonical", data["clean"]), ("shuffled", path)):
    tsv = str(tmp_path / f"{name}.tsv")
    r = shell_pipeline(csv, tsv)
    assert r.returncode == 0, r.stderr
    outputs[name] = str(tmp_path / name)
    assert to_shards.main(["--input", tsv, "--output", outputs[name], "--spec", "capums"]) == 0
  assert_same_splits(outputs["canonical"], outputs["shuffled"])
  # Unused columns are listed in the manifest, in header order.
  assert manifest_lib.read_manifest(outputs["canonical"]).extra["ignored_columns"] == [
      "blackfemale", "targetted"]
  assert manifest_lib.read_manifest(outputs["shuffled"]).extra["ignored_columns"] == [
      "targetted", "blackfemale", "notes"]
  # A missing used column is refused by the mapper, naming it.
  short = str(tmp_path / "short.csv")
  frame.drop(columns=["married"]).to_csv(short, index=False)
  r = shell_pipeline(short, str(tmp_path / "short.tsv"))
  assert r.returncode != 0 and "missing ['married']" in r.stderr

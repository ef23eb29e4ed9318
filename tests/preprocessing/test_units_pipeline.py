"""Privacy units through the producers: a CSV with a household column becomes a unit dataset.

The local engine (the streaming path) and the Spark job put every household wholly in one
split, by its key alone (removing an input row moves no other household), record the unit in
the manifest and the key of every row in the shards, and reject a row without a unit id.
"""

import os

import numpy as np
import pytest

from fastdp_jax.data import features as features_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units
from preprocessing import spark_job
from preprocessing.mapreduce import local
from preprocessing.output import PipelineError
from tests import preprocessing_helpers as T

SPEC = """
def get_config():
  return dict(name="households", features=("sex", "married"),
              columns=dict(sex=dict(kind="binary"), married=dict(kind="binary")),
              label="employed", privacy_unit="hh", max_rows_per_unit=3)
"""


def _write_csv(path, households=400, seed=0, drop_line=None):
  """Households of 1..5 persons, rows shuffled; ids spelled unevenly (" 7", "007", "7.0").

  Returns the data lines' household ids (canonical), in file order.
  """
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 6, size=households)
  hh = np.repeat(np.arange(households), sizes)
  order = rng.permutation(len(hh))
  spellings = (lambda h: f"{h}", lambda h: f" {h:03d}", lambda h: f"{h}.0")
  lines, ids = [], []
  for i in order:
    h = int(hh[i])
    # sex = the household's parity: a row's key and its features must stay together.
    cells = [spellings[rng.integers(3)](h), str(h % 2)] + [str(v) for v in rng.integers(0, 2, 2)]
    lines.append(",".join(cells))
    ids.append(str(h))
  if drop_line is not None:
    del lines[drop_line], ids[drop_line]
  lines.append("NA,1,0,1")  # a person without a household id: rejected, never a unit
  with open(path, "w", encoding="utf-8") as f:
    f.write("hh,sex,married,employed\n" + "\n".join(lines) + "\n")
  return ids


def _splits_by_key(out):
  found = {}
  for split in manifest_lib.SPLITS:
    for key in data_lib.load_split(out, split).unit_keys.tolist():
      found.setdefault(key, set()).add(split)
  return found


@pytest.fixture()
def spec_path(tmp_path):
  path = tmp_path / "households.py"
  path.write_text(SPEC)
  return str(path)


def _check_unit_dataset(out, ids):
  m = manifest_lib.read_manifest(out)
  assert m.privacy_unit == ("hh",) and m.max_rows_per_unit == 3
  assert m.provenance.kept == len(ids) and m.provenance.rejected == 1
  assert m.extra["rejected_by_reason"] == {"missing_unit": 1}
  by_key = _splits_by_key(out)
  assert all(len(s) == 1 for s in by_key.values())  # every household in one split
  assert set(by_key) == set(units.unit_keys([ids]).tolist())  # keyed by the canonical id
  assert {s for v in by_key.values() for s in v} == {"train", "test"}
  parity = dict(zip(units.unit_keys([ids]).tolist(), (int(i) % 2 for i in ids)))
  for split in manifest_lib.SPLITS:
    rows = data_lib.load_split(out, split)
    assert [parity[k] for k in rows.unit_keys.tolist()] == rows.features[:, 0].tolist()
    # The manifest records what the bound k = 3 will keep: per unit min(rows, 3).
    _, sizes = np.unique(rows.unit_keys, return_counts=True)
    assert m.extra["units"][split] == {"units": len(sizes), "rows": len(rows),
                                       "rows_dropped_by_bound": int(np.maximum(sizes - 3, 0)
                                                                    .sum())}
  assert m.extra["units"]["train"]["rows_dropped_by_bound"] + \
      m.extra["units"]["test"]["rows_dropped_by_bound"] > 0  # a household of 5 is cut to 3
  return {k: s.pop() for k, s in by_key.items()}


def test_local_engine_writes_whole_households_stable_under_row_removal(tmp_path, spec_path):
  csv = str(tmp_path / "in.csv")
  ids = _write_csv(csv)
  # Small shards: the sink carries partial shards' rows (and their ids) between writes.
  local.run_local(csv, str(tmp_path / "a"), spec_path, max_rows_per_shard=50)
  before = _check_unit_dataset(str(tmp_path / "a"), ids)
  # No bound in the producer: a household of 5 keeps its 5 rows (the trainer bounds).
  keys = np.concatenate([data_lib.load_split(str(tmp_path / "a"), s).unit_keys
                         for s in manifest_lib.SPLITS])
  assert np.unique(keys, return_counts=True)[1].max() == 5
  # One input line removed: every household keeps its split.
  ids2 = _write_csv(csv, drop_line=17)
  local.run_local(csv, str(tmp_path / "b"), spec_path)
  after = _check_unit_dataset(str(tmp_path / "b"), ids2)
  assert after == {k: before[k] for k in after}


def test_missing_unit_column_is_refused_before_any_work(tmp_path, spec_path):
  csv = str(tmp_path / "in.csv")
  with open(csv, "w", encoding="utf-8") as f:
    f.write("house,sex,married,employed\n1,0,1,0\n")
  with pytest.raises(PipelineError, match=r"privacy_unit column\(s\) \['hh'\]"):
    local.run_local(csv, str(tmp_path / "out"), spec_path)
  assert not os.path.exists(tmp_path / "out")
  with pytest.raises(PipelineError, match=r"\['hh'\]"):
    spark_job.check_header(csv, features_lib.load_spec(spec_path))


def test_local_engine_refuses_colliding_unit_ids(tmp_path, spec_path, monkeypatch):
  # Every id on one key (the hash patched): the sink refuses before writing a dataset.
  monkeypatch.setattr(units, "_hash64", lambda text: 7)
  from preprocessing.mapreduce import to_shards
  csv, tsv = str(tmp_path / "in.csv"), str(tmp_path / "out.tsv")
  _write_csv(csv, households=20)
  local.run_streaming(csv, tsv, spec_path)  # the mapper runs in a subprocess: unpatched
  with open(tsv, encoding="utf-8") as f, pytest.raises(PipelineError, match="share the 64-bit"):
    to_shards.convert(f, str(tmp_path / "out"), spec_path)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(T.spark_available() is not None, reason=str(T.spark_available()))
def test_spark_job_writes_the_local_engines_unit_dataset(tmp_path, spec_path):
  csv = str(tmp_path / "in.csv")
  ids = _write_csv(csv)
  local.run_local(csv, str(tmp_path / "local"), spec_path)
  session = T.spark_session("test_units_pipeline")
  spark = next(session)
  try:
    spark_job.run_job(spark, csv, str(tmp_path / "spark"), spec_path, max_rows_per_shard=300)
    # The same rows as Parquet, the id typed as an integer with a null: the same unit keys.
    import pandas as pd
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table["hh"] = pd.to_numeric(table["hh"], errors="coerce").astype("Int64")
    table = table.astype({c: "int64" for c in ("sex", "married", "employed")})
    table.to_parquet(str(tmp_path / "in.parquet"), index=False)
    spark_job.run_job(spark, str(tmp_path / "in.parquet"), str(tmp_path / "parquet"),
                      spec_path)
    # The driver's aggregation refuses two ids on one key (pairs made by hand: a patched
    # hash would not reach the executors' Python).
    from preprocessing import output as output_lib
    pairs = spark.createDataFrame([(5, "a"), (6, "c"), (5, "b"), (6, "c")],
                                  output_lib.UNIT_ID_SCHEMA)
    with pytest.raises(PipelineError, match="'a' and 'b'"):
      output_lib.check_unit_collisions(pairs)
  finally:
    session.close()
  _check_unit_dataset(str(tmp_path / "spark"), ids)
  _check_unit_dataset(str(tmp_path / "parquet"), ids)
  for split in manifest_lib.SPLITS:
    a = data_lib.load_split(str(tmp_path / "local"), split)
    for other in ("spark", "parquet"):
      b = data_lib.load_split(str(tmp_path / other), split)
      np.testing.assert_array_equal(a.unit_keys, b.unit_keys)
      np.testing.assert_array_equal(a.features, b.features)
      np.testing.assert_array_equal(a.labels, b.labels)


def test_spark_collision_check_reads_ids_as_the_cleaner_does():
  """The check's mapInPandas function, run on pandas batches without Spark."""
  import pandas as pd
  from preprocessing import output as output_lib
  spec = features_lib.spec_from_config(dict(
      name="h", features=("sex",), columns=dict(sex=dict(kind="binary")), label="employed",
      privacy_unit=("hh",), max_rows_per_unit=2))
  header = ("hh", "sex", "employed")
  lines = [b"hh,sex,employed", b" 07,1,0", b"7.0,0,0", b"A,1", b"NA,1,1", b"b,0,1"]
  fn = output_lib.unit_id_task(spec, header)
  out = pd.concat(list(fn(iter([pd.DataFrame({"value": lines})]))))
  # The header again, the short line and the NA id are skipped; " 07" and "7.0" are one unit.
  assert out["uid"].tolist() == ["7", "7", "b"]
  assert (out["ukey"].to_numpy().view(np.uint64) == units.unit_keys([["7", "7", "b"]])).all()

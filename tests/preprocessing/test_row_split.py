"""The row-level split is keyed by content and occurrence, not by position.

Neighbouring input tables (one line removed) must train on neighbouring sets: only a copy
identical to the removed row may change splits, and then only that one copy. Reordering the
input moves nothing. A position hash fails both (a removed line re-hashes every row after it).
These run through the local engine (the streaming path); ``test_spark_job.py`` checks that the
Spark job on many partitions writes the same splits.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from fastdp_jax.data import features as features_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import split as split_lib
from preprocessing import synthesize as S
from preprocessing.mapreduce import local
from tests import preprocessing_helpers as T

ROWS = 3000


def table(rows: int = ROWS, seed: int = 4) -> dict[str, np.ndarray]:
  """Generated CaPUMS columns: 10 binary used columns, so rows repeat (a few NA cells)."""
  return S.synthesize_capums(rows, seed=seed, na_fraction=S.DEFAULT_NA_FRACTION["capums"])


def write(cols: dict[str, np.ndarray], path: str, rows: np.ndarray | None = None) -> str:
  """Writes the rows ``rows`` (default all, in order) of ``cols`` as a CSV."""
  rows = np.arange(len(next(iter(cols.values())))) if rows is None else rows
  S.write_csv({c: v[rows] for c, v in cols.items()}, path)
  return path


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  d = tmp_path_factory.mktemp("rowsplit")
  cols = table()
  out = str(d / "full")
  local.run_local(write(cols, str(d / "full.csv")), out, "capums")
  return {"cols": cols, "out": out, "sets": T.split_multisets(out), "dir": d,
          "csv": str(d / "full.csv")}


def test_removing_one_row_moves_no_other_row(full):
  cols, d = full["cols"], full["dir"]
  # The middle copy of the most repeated kept row (its later copies' occurrences shift), an
  # early kept row, and a row dropped for a missing cell (nothing may change then).
  repeated = T.middle_copy_of_the_commonest_row(cols)
  assert Counter(T.capums_row(cols, i) for i in range(ROWS))[T.capums_row(cols, repeated)] >= 20
  kept = [i for i in range(ROWS) if T.capums_row(cols, i) is not None]
  dropped = next(i for i in range(ROWS) if T.capums_row(cols, i) is None)
  for i in (repeated, kept[7], dropped):
    out = str(d / f"less{i}")
    local.run_local(write(cols, str(d / f"less{i}.csv"), np.delete(np.arange(ROWS), i)), out,
                    "capums")
    T.assert_neighbours(full["sets"], T.split_multisets(out), T.capums_row(cols, i))


def test_reordering_the_input_changes_no_split(full):
  cols, d = full["cols"], full["dir"]
  order = np.random.default_rng(0).permutation(ROWS)
  out = str(d / "shuffled")
  local.run_local(write(cols, str(d / "shuffled.csv"), order), out, "capums")
  assert T.split_multisets(out) == full["sets"]


def test_shards_hold_the_row_keys_the_split_was_decided_by(full):
  train, test = (data_lib.load_split(full["out"], s) for s in manifest_lib.SPLITS)
  assert not split_lib.is_test_row(train.row_keys).any()
  assert split_lib.is_test_row(test.row_keys).all()
  # Recomputed from the kept rows' values in row-id order (the table without its NA rows).
  cols, spec = full["cols"], features_lib.load_spec("capums")
  used = np.stack([np.asarray(cols[c], np.float64) for c in spec.used_columns], axis=1)
  content = split_lib.value_keys(used[~np.isnan(used).any(axis=1)])
  keys = split_lib.row_keys(content, split_lib.occurrences(content))
  assert sorted(np.r_[train.row_keys, test.row_keys].tolist()) == sorted(keys.tolist())
  assert len(set(keys.tolist())) == len(keys)  # every row its own key, copies included


def test_a_heavily_duplicated_table_gets_the_test_fraction(tmp_path):
  # 4 binary used columns (3 features and the label vary; the others are 0): 16 distinct
  # rows, 2,000 rows. A key of content alone would put all copies of a row in one split
  # (test share 0 or 1 for each of the 16); content and occurrence give every row its own
  # key, so the test rows are Binomial(n, p), within z standard deviations.
  n, p, z = 2000, split_lib.DEFAULT_TEST_FRACTION, 4.5  # two-sided tail < 1e-5
  cols = S.synthesize_capums(n, seed=9)
  for c in split_lib.CAPUMS_FEATURES[3:]:
    cols[c] = np.zeros(n, np.float32)
  m = local.run_local(write(cols, str(tmp_path / "dup.csv")), str(tmp_path / "out"), "capums")
  x = data_lib.load_split(str(tmp_path / "out"), "train").features
  assert len(np.unique(x, axis=0)) <= 8 and m.provenance.kept == n
  assert abs(m.rows("test") - n * p) <= z * math.sqrt(n * p * (1 - p)), m.rows("test")
  # Every one of the 16 contents with enough copies lands in both splits.
  both = T.split_multisets(str(tmp_path / "out"))
  for row, count in (both["train"] + both["test"]).items():
    if count >= 60:  # P(all of 60 in one split) <= 0.8^60 < 2e-6
      assert both["train"][row] and both["test"][row], row


def test_write_shards_and_the_local_engine_agree(full, tmp_path):
  S.write_shards(full["cols"], str(tmp_path / "direct"))
  assert T.split_multisets(str(tmp_path / "direct")) == full["sets"]
  for split in manifest_lib.SPLITS:
    a = data_lib.load_split(full["out"], split)
    b = data_lib.load_split(str(tmp_path / "direct"), split)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.row_keys, b.row_keys)


def test_evaluating_a_raw_csv_finds_the_shards_rows(full, monkeypatch):
  # fastdp_jax.evaluate on a raw CSV splits it by the same rule, counting occurrences over
  # its blocks (smaller blocks than the file here, so that copies straddle blocks).
  from fastdp_jax import evaluation  # pylint: disable=g-import-not-at-top
  from fastdp_jax.data import features as features_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(evaluation, "_CSV_BLOCK", 700)
  spec = features_lib.load_spec("capums")
  for split in manifest_lib.SPLITS:
    x, y = evaluation.csv_split(spec, full["csv"], split, split_lib.DEFAULT_SPLIT_SEED,
                                split_lib.DEFAULT_TEST_FRACTION)
    s = data_lib.load_split(full["out"], split)
    np.testing.assert_array_equal(x, s.features)
    np.testing.assert_array_equal(y, s.labels)


def test_runs_are_ranges_of_consecutive_row_ids_of_one_input_split():
  from preprocessing import output as output_lib  # pylint: disable=g-import-not-at-top
  lines: dict[str, int] = {}
  runs = output_lib._Runs(lines)  # pylint: disable=protected-access
  # A Parquet task can read two row ranges of one file in one batch: two runs.
  assert runs.cut("a", np.array([0, 1, 2, 5, 6])) == [(0, 0, 3), (5, 3, 5)]
  assert runs.cut("a", np.array([7, 8])) == [(5, 0, 2)]  # the run goes on
  assert runs.cut("b", np.array([9])) == [(9, 0, 1)]  # consecutive, but another split
  assert lines == {"0": 3, "5": 4, "9": 1}
  with pytest.raises(output_lib.PipelineError, match="internal error"):
    runs.cut("c", np.array([5]))


def test_a_writing_pass_with_other_runs_is_an_internal_error():
  from preprocessing import output as output_lib  # pylint: disable=g-import-not-at-top

  def stats(runs):
    return ("stats", json.dumps({"runs": runs}))

  planned = {"0": 10, "10": 5}
  output_lib.check_runs([stats({"0": 10}), ("shard", "{}"), stats({"10": 5})], planned)
  for bad in ([stats({"0": 15})], [stats({"0": 10}), stats({"10": 4})],
              [stats({"0": 10, "10": 5, "15": 1})]):
    with pytest.raises(output_lib.PipelineError, match="internal error"):
      output_lib.check_runs(bad, planned)


def test_two_specs_over_the_same_columns_split_a_table_alike(tmp_path):
  # pums_raw and pums_binned read the same raw columns and encode them differently (the
  # binned spec merges incomes and ages into bins, so it sees more identical rows): the
  # content a row is split by is its cleaned values, not its encoding, so both datasets hold
  # the same rows on each side and the peers and every config are scored on one test set.
  csv = write(S.synthesize_raw(4000, seed=2), str(tmp_path / "raw.csv"))
  keys = {}
  for spec in ("pums_raw", "pums_binned"):
    local.run_local(csv, str(tmp_path / spec), spec)
    keys[spec] = [np.sort(data_lib.load_split(str(tmp_path / spec), s).row_keys)
                  for s in manifest_lib.SPLITS]
  for a, b in zip(keys["pums_raw"], keys["pums_binned"]):
    np.testing.assert_array_equal(a, b)


def test_keys_of_no_rows_are_empty_not_an_error():
  """A shard may hold no rows of a split (all held out, or an empty block of the input)."""
  assert split_lib.value_keys(np.zeros((0, 4))).shape == (0,)
  assert split_lib.content_keys(np.zeros((0, 9), np.uint8), np.zeros(0, np.uint8)).shape == (0,)
  one = np.array([[1.0, 2.0, 3.0]])
  assert split_lib.value_keys(np.concatenate([np.zeros((0, 3)), one])) == split_lib.value_keys(one)

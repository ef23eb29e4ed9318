"""Synthetic households: sizes as published, shared household variables,
correlated members, deterministic, and trained as units by the spec ``pums_households``.

Tolerances are four standard errors of the statistic at the sample size used (a false failure
about once in 16,000 runs), never fitted to the output.
"""

import math

import numpy as np
import pytest

from fastdp_jax.data import features as features_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units
from preprocessing import households as households_lib
from preprocessing import synthesize
from preprocessing.mapreduce import local

H = 40_000


@pytest.fixture(scope="module")
def hh():
  return synthesize.synthesize_households(H, seed=0)


def _per_household(cols, name):
  """The first row's value of ``name`` per household, and whether all rows agree."""
  serial = cols["SERIALNO"]
  starts = np.flatnonzero(np.r_[True, serial[1:] != serial[:-1]])
  first = cols[name][starts]
  agree = np.array_equal(np.repeat(first, np.diff(np.r_[starts, len(serial)])), cols[name])
  return first, agree


def test_household_sizes_follow_the_published_distribution(hh):
  _, counts = np.unique(hh["SERIALNO"], return_counts=True)
  assert len(counts) == H
  p = np.asarray(households_lib.HOUSEHOLD_SIZE_PROBS) / sum(households_lib.HOUSEHOLD_SIZE_PROBS)
  observed = np.bincount(counts, minlength=11)[1:] / H
  se = np.sqrt(p * (1 - p) / H)
  assert np.all(np.abs(observed - p) <= 4 * se + 1e-12), (observed, p)
  assert counts.max() > 8  # the rare large household a bound of 8 rows must cut


def test_rows_are_grouped_by_household_with_shared_household_variables(hh):
  serial, order = hh["SERIALNO"], hh["SPORDER"]
  assert np.all(np.diff(serial) >= 0) and serial[0] == 1 and serial[-1] == H
  _, counts = np.unique(serial, return_counts=True)
  starts = np.r_[0, np.cumsum(counts)[:-1]]
  expected_order = np.arange(len(serial)) - np.repeat(starts, counts) + 1
  assert np.array_equal(order, expected_order)  # SPORDER 1..n, the householder first
  for name in ("puma", "NP", "HINCP", "state", "fips"):
    assert _per_household(hh, name)[1], name
  assert np.array_equal(_per_household(hh, "NP")[0], counts)
  income = np.zeros(H)
  np.add.at(income, serial - 1, np.maximum(hh["income"], 0))
  assert np.array_equal(_per_household(hh, "HINCP")[0], np.minimum(income, 9_999_999))
  assert hh["age"].min() >= 18 and hh["age"].max() <= 93  # the adult schema's domain


def _corr(a, b):
  return float(np.corrcoef(a.astype(float), b.astype(float))[0, 1])


def test_members_are_correlated_within_their_household(hh):
  head = np.flatnonzero(hh["SPORDER"] == 1)
  second = np.flatnonzero(hh["SPORDER"] == 2)
  pairs = second - 1  # the householder's row precedes the second person's
  assert np.all(hh["SPORDER"][pairs] == 1)
  # The same statistic between persons of different households: the shuffle's null.
  rng = np.random.default_rng(0)
  other = rng.choice(head, size=len(second))
  tol = 4 / math.sqrt(len(second))  # the standard error of a correlation near 0
  for name in ("employed", "black", "age"):
    same = _corr(hh[name][pairs], hh[name][second])
    null = _corr(hh[name][other], hh[name][second])
    assert abs(null) <= tol, (name, null)
    assert same > null + 2 * tol, (name, same, null)
  married_couples = hh["married"][pairs] * hh["married"][second]
  assert married_couples.mean() > 0.5  # most second persons are the householder's spouse


def test_deterministic_and_the_first_households_do_not_depend_on_the_total(monkeypatch):
  monkeypatch.setattr(households_lib, "HOUSEHOLD_BLOCK", 500)  # several blocks, quickly
  small = synthesize.synthesize_households(1200, seed=3)
  large = synthesize.synthesize_households(2600, seed=3)
  n = len(small["SERIALNO"])
  for name in synthesize.HOUSEHOLD_COLUMNS:
    assert np.array_equal(large[name][:n], small[name]), name
  assert len(np.unique(large["SERIALNO"])) == 2600
  other = synthesize.synthesize_households(1200, seed=4)
  assert not np.array_equal(other["age"][:100], small["age"][:100])


def test_fixing_nothing_draws_the_rows_of_every_earlier_version():
  plain = synthesize._raw_block([5, 0], 3000)
  nan = np.full(3000, np.nan)
  same = synthesize._raw_block([5, 0], 3000, {"age": nan, "sex": nan, "puma": nan,
                                              "employed_offset": np.zeros(3000)})
  for name in synthesize.RAW_COLUMNS:
    assert np.array_equal(plain[name], same[name]), name


def _assert_whole_households(path, households):
  train = data_lib.load_split(path, "train")
  test = data_lib.load_split(path, "test")
  assert train.unit_keys is not None and test.unit_keys is not None
  assert not set(train.unit_keys.tolist()) & set(test.unit_keys.tolist())
  assert len(set(train.unit_keys.tolist()) | set(test.unit_keys.tolist())) == households
  m = manifest_lib.read_manifest(path)
  assert m.privacy_unit == ("SERIALNO",) and m.max_rows_per_unit == 8


def test_the_spec_trains_households_as_units(tmp_path):
  spec = features_lib.load_spec("pums_households")
  assert spec.privacy_unit == ("SERIALNO",) and spec.max_rows_per_unit == 8
  assert spec.input_columns == synthesize.HOUSEHOLD_COLUMNS
  assert {"NP", "HINCP"} <= set(spec.feature_names)
  cols = synthesize.synthesize_households(3000, seed=1)
  synthesize.write_shards(cols, str(tmp_path / "direct"), spec=spec)
  _assert_whole_households(str(tmp_path / "direct"), 3000)
  # The streaming path reads the CSV the CLI writes, with the same spec.
  csv = str(tmp_path / "hh.csv")
  assert synthesize.main(["--households", "3000", "--seed", "1", "--output", csv]) == 0
  local.run_local(csv, str(tmp_path / "local"), "pums_households")
  _assert_whole_households(str(tmp_path / "local"), 3000)


def test_cli_households_and_its_refusal(tmp_path, capsys):
  out = str(tmp_path / "ds")
  assert synthesize.main(["--households", "200", "--output-shards", out]) == 0
  assert "train" in capsys.readouterr().out
  assert manifest_lib.read_manifest(out).privacy_unit == ("SERIALNO",)
  with pytest.raises(SystemExit):
    synthesize.main(["--households", "10", "--na-fraction", "0.1", "--output", "x.csv"])
  # Without --households the schema and its rows are as before.
  assert synthesize.main(["--rows", "50", "--schema", "raw", "--output",
                          str(tmp_path / "raw.csv")]) == 0
  with open(tmp_path / "raw.csv") as f:
    assert f.readline().strip() == ",".join(f'"{c}"' for c in synthesize.RAW_COLUMNS)


def test_unit_keys_of_serial_numbers_do_not_collide(hh):
  ids = units.canonical_ids([hh["SERIALNO"].tolist()])
  keys = units.keys_of_ids(ids)
  units.check_no_collision(ids, keys)
  assert len(np.unique(keys)) == H

"""Privacy units on the data side: keys, the split by unit, the bound, the shard contract."""

import json
import os

import h5py
import numpy as np
import pytest

from fastdp_jax import errors
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units
from tests.conftest import make_dataset, make_unit_dataset


def _panel(n_units=400, seed=0):
  """Raw ids (one per row, 1..6 rows each, rows shuffled) and their unit keys."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 7, size=n_units)
  ids = np.repeat([f"P{u}" for u in range(n_units)], sizes)
  rng.shuffle(ids)
  return list(ids), units.unit_keys([list(ids)])


def _split_of_units(ids, test):
  """{unit id: set of splits its rows fall in}."""
  out: dict = {}
  for uid, t in zip(ids, test):
    out.setdefault(uid, set()).add(bool(t))
  return out


def test_canonical_ids_merge_number_spellings_and_keep_text():
  ids = units.canonical_ids([[" 007", "7.0", "7e0", "7", "0.50", "A07", "a07", ' "A07" ']])
  assert ids[:4] == ["7"] * 4
  assert ids[4] == "0.5"
  assert ids[5] != ids[6]  # text is case-sensitive
  assert ids[7] == ids[5]  # a CSV's quotes are not part of the id
  keys = units.unit_keys([[" 007", "7.0", "7"]])
  assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 1


def test_multi_column_ids_do_not_run_together():
  # ("1", "23") and ("12", "3") must be different units.
  keys = units.unit_keys([["1", "12"], ["23", "3"]])
  assert keys[0] != keys[1]


def test_empty_id_is_refused_naming_the_row():
  with pytest.raises(errors.PipelineError, match="row 1"):
    units.unit_keys([["a", "  ", "b"]])


def test_every_unit_lies_wholly_in_one_split():
  ids, keys = _panel()
  test = units.is_test_unit(keys)
  assert all(len(s) == 1 for s in _split_of_units(ids, test).values())
  # Both splits are used (a rule that sent everything to one side would pass the above).
  assert 0 < test.sum() < len(test)


def test_removing_or_reordering_rows_leaves_every_other_unit_in_its_split():
  ids, keys = _panel()
  before = {u: s.pop() for u, s in _split_of_units(ids, units.is_test_unit(keys)).items()}
  rng = np.random.default_rng(1)
  # One row removed, a whole unit removed, and the rest reordered.
  drop_row = int(rng.integers(len(ids)))
  gone = ids[int(rng.integers(len(ids)))]
  rest = [u for i, u in enumerate(ids) if i != drop_row and u != gone]
  rng.shuffle(rest)
  after = _split_of_units(rest, units.is_test_unit(units.unit_keys([rest])))
  assert gone not in after
  for u, s in after.items():
    assert s == {before[u]}


def test_validation_units_are_by_unit_and_none_at_fraction_zero():
  ids, keys = _panel()
  val = units.is_validation_unit(keys, 0.3, seed=70)
  assert all(len(s) == 1 for s in _split_of_units(ids, val).values())
  assert not units.is_validation_unit(keys, 0.0, seed=70).any()
  # Another seed than the test split's: the two rules are not the same rule.
  assert (val != units.is_test_unit(keys, test_fraction=0.3)).any()


def _rows(n, seed=0, d=3):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 2, size=(n, d)).astype(np.float32), rng.integers(0, 2, n)


def test_group_keeps_at_most_k_rows_per_unit_whole_units_contiguous():
  ids, keys = _panel()
  x, y = _rows(len(ids))
  g = units.group(keys, units.row_content_keys(x, y), 3)
  sizes = np.diff(g.offsets)
  assert sizes.min() >= 1 and sizes.max() <= 3
  counts = {u: ids.count(u) for u in set(ids)}
  assert len(sizes) == len(counts)
  assert g.dropped_rows == sum(max(c - 3, 0) for c in counts.values()) > 0
  assert len(g.order) + g.dropped_rows == len(ids)
  unit_of = keys[g.order]
  for a, b in zip(g.offsets[:-1], g.offsets[1:]):
    assert len(set(unit_of[a:b].tolist())) == 1
  starts = unit_of[g.offsets[:-1]]
  assert (starts[1:] > starts[:-1]).all()  # units in ascending key order


def test_bound_counts_are_what_the_grouping_keeps_and_drops():
  rng = np.random.default_rng(3)
  keys = rng.integers(0, 40, 500).astype(np.uint64)
  rows = units.row_content_keys(rng.normal(size=(500, 2)), rng.integers(0, 2, 500))
  for k in (1, 3, 8, 64):
    g = units.group(keys, rows, k)
    got = units.bound_counts(keys, k)
    assert got == {"units": len(g.offsets) - 1, "rows": 500,
                   "rows_dropped_by_bound": g.dropped_rows}


def test_group_choice_does_not_depend_on_row_order():
  ids, keys = _panel(seed=2)
  x, y = _rows(len(ids), seed=2)
  # Duplicate rows inside units: identical rows must be interchangeable.
  x[1::7], y[1::7] = x[0::7][:len(x[1::7])], y[0::7][:len(y[1::7])]
  def kept(perm):
    k, xx, yy = keys[perm], x[perm], y[perm]
    g = units.group(k, units.row_content_keys(xx, yy), 2)
    rows = np.c_[k[g.order].astype(np.float64), xx[g.order], yy[g.order]]
    return sorted(map(tuple, rows.tolist()))
  rng = np.random.default_rng(3)
  base = kept(np.arange(len(ids)))
  for _ in range(3):
    assert kept(rng.permutation(len(ids))) == base


def test_group_does_not_keep_the_first_rows_of_the_file():
  # 200 units of 6 rows, k=1: file order would keep row 0 of each; the rank keeps others.
  keys = np.repeat(np.arange(200, dtype=np.uint64) * np.uint64(7919), 6)
  x = np.tile(np.arange(6, dtype=np.float32), 200).reshape(-1, 1)
  g = units.group(keys, units.row_content_keys(x, np.zeros(len(x))), 1)
  firsts = (x[g.order, 0] == 0).mean()
  # Under a uniform choice 1/6 of the kept rows are row 0; 5 sigma below "always row 0".
  assert firsts < 1 / 6 + 5 * np.sqrt(1 / 6 * 5 / 6 / 200)


def test_row_content_keys_tell_rows_apart_and_ignore_storage_dtype():
  x = np.array([[0, 1], [1, 0], [0, 1]], np.uint8)
  k = units.row_content_keys(x, np.array([1, 1, 1]))
  assert k[0] == k[2] and k[0] != k[1]
  assert (units.row_content_keys(x.astype(np.float32), np.ones(3, np.float32)) == k).all()


def test_collision_is_refused_naming_both_ids(monkeypatch):
  monkeypatch.setattr(units, "_hash64", lambda text: 42)  # every id on one key
  ids = units.canonical_ids([["a", "a", "b"]])
  keys = units.keys_of_ids(ids)
  with pytest.raises(errors.PipelineError, match="'a' and 'b'"):
    units.check_no_collision(ids, keys)


def test_no_collision_when_ids_repeat():
  ids = units.canonical_ids([["a", "b", "a", "7", "07"]])
  units.check_no_collision(ids, units.keys_of_ids(ids))


@pytest.mark.parametrize("unit,k,match", [
    ("hh", None, "needs max_rows_per_unit"), (None, 4, "privacy_unit is not"),
    ("hh", 0, r"in \[1, 64\]"), ("hh", 65, r"in \[1, 64\]"), (["a", "a"], 2, "distinct")])
def test_declared_unit_is_checked(unit, k, match):
  with pytest.raises(errors.UserError, match=match):
    units.normalize_unit(unit, k, "spec")


def test_unit_dataset_round_trips_its_keys(tmp_path):
  path = make_unit_dataset(str(tmp_path / "u"), units=300, max_rows=3, max_size=5)
  m = manifest_lib.read_manifest(path)
  assert m.privacy_unit == ("household",) and m.max_rows_per_unit == 3
  train, test = data_lib.load_split(path, "train"), data_lib.load_split(path, "test")
  assert train.unit_keys.dtype == np.uint64 and len(train.unit_keys) == len(train)
  assert not set(train.unit_keys.tolist()) & set(test.unit_keys.tolist())
  part = data_lib.load_split(path, "train", rows=(5, 50))
  assert (part.unit_keys == train.unit_keys[5:50]).all()


def test_row_dataset_is_unchanged(tmp_path):
  path = make_dataset(str(tmp_path / "r"), rows=500)
  with open(os.path.join(path, manifest_lib.MANIFEST)) as f:
    body = json.load(f)
  assert "privacy_unit" not in body and "max_rows_per_unit" not in body
  m = manifest_lib.read_manifest(path)
  with h5py.File(os.path.join(path, m.shards[0].file)) as f:
    # No unit keys; the row keys its split was decided by (fastdp_jax.data.split.row_keys).
    assert sorted(f.keys()) == ["features", "labels", "row_keys"]
  assert data_lib.load_split(path, "train").unit_keys is None
  # The digest of a row dataset is computed as before (no unit entry in its identity).
  unit = manifest_lib.Manifest(**{**m.__dict__, "privacy_unit": ("h",), "max_rows_per_unit": 2})
  assert unit.digest() != m.digest()


def test_writer_requires_keys_exactly_for_unit_datasets(tmp_path):
  x, y = np.zeros((3, 2), np.uint8), np.zeros(3, np.uint8)
  with pytest.raises(manifest_lib.ShardError, match="need their unit_keys"):
    with data_lib.DatasetWriter(tmp_path / "a", feature_names=["a", "b"], label_name="y",
                                feature_bounds=(0, 1), privacy_unit="h",
                                max_rows_per_unit=2) as w:
      w.add("train", x, y)
  with pytest.raises(manifest_lib.ShardError, match="without privacy_unit"):
    with data_lib.DatasetWriter(tmp_path / "b", feature_names=["a", "b"], label_name="y",
                                feature_bounds=(0, 1)) as w:
      w.add("train", x, y, unit_keys=np.zeros(3, np.uint64))
  with pytest.raises(manifest_lib.ShardError, match="uint64"):
    with data_lib.DatasetWriter(tmp_path / "c", feature_names=["a", "b"], label_name="y",
                                feature_bounds=(0, 1), privacy_unit="h",
                                max_rows_per_unit=2) as w:
      w.add("train", x, y, unit_keys=np.zeros(3, np.int64))


def test_shard_without_its_unit_keys_is_refused(tmp_path):
  path = make_unit_dataset(str(tmp_path / "u"), units=50)
  m = manifest_lib.read_manifest(path)
  info = m.shards_of("train")[0]
  with h5py.File(os.path.join(path, info.file), "a") as f:
    del f["unit_keys"]
  with pytest.raises(manifest_lib.ShardError, match="unit_keys"):
    data_lib.load_split(path, "train", verify_checksum=False)


_SPEC = """
import ml_collections

def get_config():
  config = ml_collections.ConfigDict(dict(
      name="hh", features=("sex",), columns=dict(sex=dict(kind="binary")), label="employed"))
  config.privacy_unit = {unit!r}
{more}  return config
"""


def _spec_file(tmp_path, unit, more=""):
  path = tmp_path / "spec.py"
  path.write_text(_SPEC.format(unit=unit, more=more))
  return str(path)


def test_spec_declares_the_unit_and_keeps_it_through_its_canonical_form(tmp_path):
  from fastdp_jax.data import features
  spec = features.load_spec(_spec_file(tmp_path, "SERIALNO",
                                       '  config.max_rows_per_unit = 8\n'))
  assert spec.privacy_unit == ("SERIALNO",) and spec.max_rows_per_unit == 8
  again = features.spec_from_dict(spec.to_dict())
  assert (again.privacy_unit, again.max_rows_per_unit) == (("SERIALNO",), 8)
  # A row-level spec's canonical form (and so its digest) has no unit entries.
  assert "privacy_unit" not in features.load_spec("capums").to_dict()


def test_spec_with_a_unit_but_no_bound_is_one_line_at_its_line(tmp_path):
  from fastdp_jax.data import features
  path = _spec_file(tmp_path, ("SERIALNO", "SPORDER"))
  with pytest.raises(features.SpecError) as e:
    features.load_spec(path)
  assert "\n" not in str(e.value) and "needs max_rows_per_unit" in str(e.value)
  line = _SPEC.splitlines().index("  config.privacy_unit = {unit!r}") + 1  # 1-based
  assert str(e.value).startswith(f"{path}:{line}:")  # the line that declares the unit


def test_spec_input_columns_must_name_the_unit(tmp_path):
  from fastdp_jax.data import features
  path = _spec_file(tmp_path, "hh", '  config.max_rows_per_unit = 2\n'
                    '  config.input_columns = ("sex", "employed")\n')
  with pytest.raises(features.SpecError, match=r"lacks the unit column\(s\) \['hh'\]"):
    features.load_spec(path)


def test_spec_with_a_unit_refuses_row_level_private_estimates(tmp_path):
  # fastdp-spec init's estimates are DP for one row; a household of k rows moves them k times,
  # so a unit-level statement including their epsilon would not hold.
  from fastdp_jax.data import features
  from fastdp_jax.data import spec_init
  path = _spec_file(tmp_path, "SERIALNO", '  config.max_rows_per_unit = 8\n'
                    "  config.private_estimates = ml_collections.ConfigDict({'epsilon': 0.5, "
                    f"'delta': 1e-6, 'mechanism': {spec_init.MECHANISM!r}}})\n")
  with pytest.raises(features.SpecError, match="hold for one row, not one unit") as e:
    features.load_spec(path)
  assert "\n" not in str(e.value)

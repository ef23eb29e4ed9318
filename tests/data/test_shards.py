"""The shard format: round trip, atomic output, an error naming the shard on mismatch, the
declared public bounds (writer and loader), and reading global row ranges across shards."""

import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from tests.conftest import make_dataset


def _write(tmp_path, max_rows=1000, rows=3000):
  return make_dataset(str(tmp_path / "ds"), rows=rows, max_rows_per_shard=max_rows)


def test_round_trip_and_manifest(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(250, 4)).astype(np.float32)
  y = rng.integers(0, 2, 250)
  out = str(tmp_path / "d")
  with data_lib.DatasetWriter(out, feature_names=list("abcd"), label_name="y",
                              feature_bounds=(-10, 10), max_rows_per_shard=100) as w:
    w.add("train", x[:200], y[:200])
    w.add("test", x[200:], y[200:])
    w.set_provenance(manifest_lib.Provenance(rows_read=260, kept=250, dropped_na=7, rejected=3))
  m = manifest_lib.read_manifest(out)
  assert [s.file for s in m.shards] == ["test-00000.h5", "train-00000.h5", "train-00001.h5"]
  assert m.rows("train") == 200 and m.rows("test") == 50
  assert m.provenance.dropped_na == 7 and m.provenance.rejected == 3
  tr = data_lib.load_split(out, "train")
  np.testing.assert_array_equal(tr.features, x[:200])
  np.testing.assert_array_equal(tr.labels, y[:200].astype(np.float32))
  assert tr.feature_names == tuple("abcd") and tr.label_name == "y"
  assert m.feature_bounds == tr.feature_bounds == ((-10.0, 10.0),) * 4
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_binary_features_are_stored_compactly(tmp_path):
  out = _write(tmp_path)
  with h5py.File(os.path.join(out, "train-00000.h5")) as f:
    assert f["features"].dtype == np.uint8 and f["labels"].dtype == np.uint8


def test_provenance_must_reconcile():
  with pytest.raises(ValueError, match="reconcile"):
    manifest_lib.Provenance(rows_read=10, kept=5, dropped_na=1, rejected=1)


def test_existing_output_is_refused_and_failed_writer_leaves_nothing(tmp_path):
  out = _write(tmp_path)
  with pytest.raises(FileExistsError):
    data_lib.DatasetWriter(out, feature_names=["a"], label_name="y", feature_bounds=(0, 1))
  new = str(tmp_path / "crashed")
  with pytest.raises(RuntimeError):
    with data_lib.DatasetWriter(new, feature_names=["a"], label_name="y",
                                feature_bounds=(0, 1)) as w:
      w.add("train", np.zeros((5, 1)), np.zeros(5))
      raise RuntimeError("producer crashed")
  assert not os.path.exists(new)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_missing_shard_is_named(tmp_path):
  out = _write(tmp_path)
  os.remove(os.path.join(out, "train-00001.h5"))
  with pytest.raises(manifest_lib.ShardError, match="train-00001.h5.*missing"):
    data_lib.load_split(out, "train")


def test_corrupt_shard_is_named(tmp_path):
  out = _write(tmp_path)
  path = os.path.join(out, "train-00000.h5")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff\x00garbage")
  with pytest.raises(manifest_lib.ShardError, match="train-00000.h5.*sha256"):
    data_lib.load_split(out, "train")


def test_truncated_shard_is_named_even_without_checksums(tmp_path):
  out = _write(tmp_path)
  path = os.path.join(out, "train-00000.h5")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  with pytest.raises(manifest_lib.ShardError, match="train-00000.h5"):
    data_lib.load_split(out, "train", verify_checksum=False)


def _shard(m, name):
  return next(s for s in m["shards"] if s["file"] == name)


def _edit_manifest(out, fn):
  p = os.path.join(out, "manifest.json")
  with open(p) as f:
    m = json.load(f)
  fn(m)
  with open(p, "w") as f:
    json.dump(m, f)


def test_wrong_row_count_is_named(tmp_path):
  out = _write(tmp_path)
  _edit_manifest(out, lambda m: _shard(m, "train-00001.h5").update(rows=1001))
  with pytest.raises(manifest_lib.ShardError, match="train-00001.h5.*rows|train-00001.h5.*manifest"):
    data_lib.load_split(out, "train", verify_checksum=False)


def test_wrong_feature_width_is_named(tmp_path):
  out = _write(tmp_path)
  _edit_manifest(out, lambda m: _shard(m, "train-00001.h5").update(num_features=8))
  with pytest.raises(manifest_lib.ShardError, match="train-00001.h5.*width"):
    data_lib.load_split(out, "train", verify_checksum=False)
  out2 = make_dataset(str(tmp_path / "ds2"), rows=500)
  _edit_manifest(out2, lambda m: m.update(feature_names=m["feature_names"][:-1]))
  with pytest.raises(manifest_lib.ShardError, match="width|features"):
    data_lib.load_split(out2, "train", verify_checksum=False)


def test_missing_dataset_says_how_to_create_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="synthesize"):
    data_lib.load_split(str(tmp_path / "nope"), "train")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(manifest_lib.ShardError, match="manifest"):
    data_lib.load_split(str(tmp_path / "empty"), "train")


def test_digest_identifies_the_data(tmp_path):
  a = manifest_lib.read_manifest(make_dataset(str(tmp_path / "a"), rows=500, seed=1))
  b = manifest_lib.read_manifest(make_dataset(str(tmp_path / "b"), rows=500, seed=2))
  a2 = manifest_lib.read_manifest(make_dataset(str(tmp_path / "a2"), rows=500, seed=1))
  assert a.digest() == a2.digest() != b.digest()


# ------------------------------------------------------------------ declared bounds

def write_raw_dataset(out, shards, *, feature_bounds=(0, 1), names=("a", "b", "c")):
  """A dataset written by hand (h5py + write_manifest), bypassing the writer's checks.

  Args:
    shards: ``{file: (split, features, labels)}``, written as given (any dtype or shape).
  """
  os.makedirs(out)
  infos = []
  for file, (split, x, y) in shards.items():
    path = os.path.join(out, file)
    with h5py.File(path, "w") as f:
      f["features"] = x
      f["labels"] = y
    infos.append(manifest_lib.ShardInfo(file=file, split=split, rows=int(np.shape(x)[0]),
                                        num_features=len(names),
                                        sha256=data_lib.sha256_file(path)))
  rows = sum(i.rows for i in infos)
  manifest_lib.write_manifest(out, feature_names=names, label_name="y", shards=infos,
                              provenance=manifest_lib.Provenance(rows_read=rows, kept=rows),
                              feature_bounds=feature_bounds)
  return out


def _binary(rows, seed=0, d=3):
  rng = np.random.default_rng(seed)
  return (rng.random((rows, d)) < 0.5).astype(np.float32), rng.integers(0, 2, rows)


@pytest.mark.parametrize("value,what", [(1e30, "outside its declared bounds"),
                                        (np.nan, "non-finite"), (np.inf, "non-finite"),
                                        (-0.5, "outside its declared bounds")])
def test_writer_refuses_a_value_outside_the_bounds_naming_the_column(tmp_path, value, what):
  x, y = _binary(50)
  x[17, 1] = value
  out = str(tmp_path / "d")
  with pytest.raises(manifest_lib.ShardError, match=f"shard train-00000.h5: column 'b' has 1 .*"
                     f"{what}.*first at row 17"):
    with data_lib.DatasetWriter(out, feature_names=list("abc"), label_name="y",
                                feature_bounds=(0, 1)) as w:
      w.add("train", x, y)
  assert not os.path.exists(out)  # nothing published


@pytest.mark.parametrize("value,what", [(1e30, "outside its declared bounds"),
                                        (np.nan, "non-finite")])
def test_loader_refuses_a_hand_written_value_outside_the_bounds(tmp_path, value, what):
  x, y = _binary(300)
  x[250, 2] = value  # in the second shard, at its row 150
  out = write_raw_dataset(str(tmp_path / "d"), {
      "train-0.h5": ("train", x[:100], y[:100]), "train-1.h5": ("train", x[100:], y[100:]),
      "test-0.h5": ("test", x[:10], y[:10])})
  with pytest.raises(manifest_lib.ShardError,
                     match=f"shard train-1.h5: column 'c' has 1 .*{what}.*first at row 150"):
    data_lib.load_split(out, "train")
  # A read that does not reach the bad row does not see it; one that does, refuses it.
  assert len(data_lib.load_split(out, "train", rows=(0, 250))) == 250
  with pytest.raises(manifest_lib.ShardError, match="train-1.h5"):
    data_lib.load_split(out, "train", rows=(250, 251))


def test_bounds_are_compared_in_float32_as_stored(tmp_path):
  # 0.1 is not a float32; stored as float32 it rounds above the float64 bound 0.1. Both the
  # writer and the loader compare in float32 against the bound rounded the same way, so a
  # value the user gave inside its bound stays inside.
  x = np.full((4, 1), 0.1)
  out = str(tmp_path / "d")
  with data_lib.DatasetWriter(out, feature_names=["a"], label_name="y",
                              feature_bounds=(-0.1, 0.1)) as w:
    w.add("train", x, np.zeros(4))
    w.add("test", -x, np.ones(4))
  assert float(np.float32(0.1)) > 0.1
  np.testing.assert_array_equal(data_lib.load_split(out, "train").features, np.float32(x))


def test_per_feature_bounds_are_recorded_and_enforced(tmp_path):
  x, y = _binary(20)
  x[:, 2] *= 5
  out = str(tmp_path / "d")
  bounds = ((0, 1), (0, 1), (0, 5))
  with data_lib.DatasetWriter(out, feature_names=list("abc"), label_name="y",
                              feature_bounds=bounds) as w:
    w.add("train", x, y)
  assert manifest_lib.read_manifest(out).feature_bounds == ((0.0, 1.0), (0.0, 1.0), (0.0, 5.0))
  with pytest.raises(manifest_lib.ShardError, match="column 'c'"):
    with data_lib.DatasetWriter(str(tmp_path / "e"), feature_names=list("abc"),
                                label_name="y", feature_bounds=(0, 1)) as w:
      w.add("train", x, y)


@pytest.mark.parametrize("bounds", [(1, 0), (0, np.inf), (0, 1, 2), ((0, 1),) * 2, "01"])
def test_malformed_bounds_are_refused(tmp_path, bounds):
  with pytest.raises(ValueError, match="feature_bounds"):
    data_lib.DatasetWriter(str(tmp_path / "d"), feature_names=list("abc"), label_name="y",
                           feature_bounds=bounds)
  assert not os.listdir(tmp_path)  # no staging directory left


def test_a_manifest_without_bounds_needs_them_from_the_config(tmp_path):
  out = make_dataset(str(tmp_path / "old"), rows=500)
  _edit_manifest(out, lambda m: m.pop("feature_bounds"))  # as written before bounds existed
  assert manifest_lib.read_manifest(out).feature_bounds is None
  with pytest.raises(manifest_lib.ShardError, match="no feature bounds declared.*"
                     "data.feature_bounds"):
    data_lib.load_split(out, "train")
  full = data_lib.load_split(out, "train", feature_bounds=(0, 1))
  assert full.feature_bounds == ((0.0, 1.0),) * 9
  with pytest.raises(manifest_lib.ShardError, match="outside its declared bounds"):
    data_lib.load_split(out, "train", feature_bounds=(0, 0.5))  # binary data, 1 > 0.5
  with pytest.raises(errors.ConfigError, match="data.feature_bounds"):
    data_lib.load_split(out, "train", feature_bounds=((0, 1),) * 2)


def test_the_manifests_bounds_take_precedence_over_the_config(tmp_path):
  out = make_dataset(str(tmp_path / "d"), rows=500)
  s = data_lib.load_split(out, "train", feature_bounds=(-5, 5))
  assert s.feature_bounds == ((0.0, 1.0),) * 9


# ------------------------------------------------------------------ global row ranges

@pytest.mark.parametrize("rows,counts", [(4801, [2, 2]), (7, [1, 1, 1]), (3, [2, 2]),
                                         (10, [1, 3]), (0, [1, 1]), (40_000, [1])])
def test_process_row_ranges_are_contiguous_complete_and_balanced(rows, counts):
  ranges = data_lib.process_row_ranges(rows, counts)
  assert ranges[0][0] == 0 and ranges[-1][1] == rows
  assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))
  # Each process holds its devices' share of the rows within one row.
  for (lo, hi), k in zip(ranges, counts):
    assert abs((hi - lo) - rows * k / sum(counts)) < 1
  if len(set(counts)) == 1:  # equal devices: process p of P holds [p N // P, (p + 1) N // P)
    p_count = len(counts)
    assert ranges == [(p * rows // p_count, (p + 1) * rows // p_count) for p in range(p_count)]


def test_row_ranges_read_across_shard_boundaries(tmp_path):
  out = _write(tmp_path, max_rows=700)  # train shards of 700 rows and a shorter last one
  full = data_lib.load_split(out, "train")
  n = len(full)
  for lo, hi in [(0, n), (0, 1), (699, 701), (650, 2150), (n - 1, n), (1400, 1400),
                 (0, n // 2), (n // 2, n)]:
    part = data_lib.load_split(out, "train", rows=(lo, hi))
    np.testing.assert_array_equal(part.features, full.features[lo:hi])
    np.testing.assert_array_equal(part.labels, full.labels[lo:hi])
    assert part.digest == full.digest  # the digest names the whole dataset
  with pytest.raises(ValueError, match="outside"):
    data_lib.load_split(out, "train", rows=(0, n + 1))


def test_a_row_range_verifies_the_shards_it_touches(tmp_path):
  out = _write(tmp_path, max_rows=1000)  # train-00000 .. train-00002
  path = os.path.join(out, "train-00002.h5")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff\x00garbage")
  assert len(data_lib.load_split(out, "train", rows=(0, 2000))) == 2000
  with pytest.raises(manifest_lib.ShardError, match="train-00002.h5.*sha256"):
    data_lib.load_split(out, "train", rows=(1999, 2001))


def test_a_killed_writers_staging_directory_is_removed_by_the_next_writer(tmp_path, capsys):
  # The DatasetWriter's staging directory holds private rows: it is named after its writer
  # (.NAME.staging-HOST-PID-*), so the next writer of the same output removes a dead one's.
  import signal
  import subprocess
  import sys
  out = tmp_path / "d"
  code = ("import sys, numpy as np\n"
          "from fastdp_jax.data import shards\n"
          f"w = shards.DatasetWriter({str(out)!r}, feature_names=['a'], label_name='y',"
          " feature_bounds=(0, 1))\n"
          "w.add('train', np.ones((5, 1)), np.ones(5))\n"
          "print('ready', flush=True)\n"
          "sys.stdin.read()\n")
  child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  try:
    assert child.stdout.readline().strip() == "ready"
    [left] = [n for n in os.listdir(tmp_path) if n.startswith(".d.staging-")]
    assert f"-{child.pid}-" in left and os.listdir(tmp_path / left) == ["train-00000.h5"]
    os.kill(child.pid, signal.SIGKILL)
  finally:
    child.wait()
  with data_lib.DatasetWriter(str(out), feature_names=["a"], label_name="y",
                              feature_bounds=(0, 1)) as w:
    w.add("train", np.zeros((3, 1)), np.zeros(3))
  assert os.listdir(tmp_path) == ["d"]
  assert f"removed {tmp_path / left}, left by a killed job (pid {child.pid})" in (
      capsys.readouterr().err)
  assert manifest_lib.read_manifest(str(out)).rows("train") == 3


def test_overwrite_replaces_a_dataset_whole(tmp_path):
  out = make_dataset(str(tmp_path / "d"), rows=500, seed=1)
  with data_lib.DatasetWriter(out, feature_names=["a"], label_name="y", feature_bounds=(0, 1),
                              overwrite=True) as w:
    w.add("train", np.ones((4, 1)), np.ones(4))
  m = manifest_lib.read_manifest(out)
  assert m.feature_names == ("a",) and m.rows("train") == 4 and m.rows("test") == 0
  assert sorted(os.listdir(out)) == ["manifest.json", "train-00000.h5"]  # no old shard kept
  assert os.listdir(tmp_path) == ["d"]  # nor the old directory


def test_row_keys_round_trip_and_the_writer_counts_occurrences_per_split(tmp_path):
  # Rows repeat (3 binary features and a label): the writer's keys number identical rows
  # over its calls for one split, each split on its own.
  from fastdp_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = rng.integers(0, 2, (300, 3)).astype(np.float32)
  y = rng.integers(0, 2, 300)
  out = str(tmp_path / "d")
  given = split_lib.splitmix64(np.arange(50, dtype=np.uint64))  # any uint64 keys are kept
  with data_lib.DatasetWriter(out, feature_names=list("abc"), label_name="y",
                              feature_bounds=(0, 1), max_rows_per_shard=70) as w:
    w.add("train", x[:120], y[:120])
    w.add("train", x[120:250], y[120:250])
    w.add("test", x[250:], y[250:], row_keys=given)
  train, test = data_lib.load_split(out, "train"), data_lib.load_split(out, "test")
  content = split_lib.content_keys(x[:250], y[:250])
  want = split_lib.row_keys(content, split_lib.occurrences(content))
  np.testing.assert_array_equal(train.row_keys, want)
  assert len(set(want.tolist())) == 250  # copies get distinct keys
  np.testing.assert_array_equal(test.row_keys, given)
  # A range across shard boundaries, and one shard's keys read alone.
  np.testing.assert_array_equal(data_lib.load_split(out, "train", rows=(60, 150)).row_keys,
                                want[60:150])
  m = manifest_lib.read_manifest(out)
  np.testing.assert_array_equal(
      data_lib.read_row_keys(out, m.shards_of("train")[1], start=5, stop=9), want[75:79])


def test_row_keys_are_optional_on_read_and_checked(tmp_path):
  out = str(tmp_path / "d")
  with data_lib.DatasetWriter(out, feature_names=["a"], label_name="y", feature_bounds=(0, 1),
                              max_rows_per_shard=10) as w:
    w.add("train", np.zeros((20, 1)), np.zeros(20))
  m = manifest_lib.read_manifest(out)
  first, second = m.shards_of("train")
  for info in (first, second):  # as a dataset written before rows had keys
    with h5py.File(os.path.join(out, info.file), "a") as f:
      del f["row_keys"]
  infos = [dataclasses.replace(s, sha256=data_lib.sha256_file(os.path.join(out, s.file)))
           for s in m.shards]
  manifest_lib.write_manifest(out, feature_names=["a"], label_name="y", shards=infos,
                              provenance=m.provenance, feature_bounds=m.feature_bounds)
  assert data_lib.load_split(out, "train").row_keys is None
  assert data_lib.read_row_keys(out, infos[0]) is None

  def give_first_keys(keys):
    with h5py.File(os.path.join(out, first.file), "a") as f:
      if "row_keys" in f:
        del f["row_keys"]
      f.create_dataset("row_keys", data=keys)
    infos[0] = dataclasses.replace(infos[0], sha256=data_lib.sha256_file(
        os.path.join(out, first.file)))
    manifest_lib.write_manifest(out, feature_names=["a"], label_name="y", shards=infos,
                                provenance=m.provenance, feature_bounds=m.feature_bounds)

  give_first_keys(np.arange(10, dtype=np.uint64))  # one shard with keys, one without
  assert data_lib.load_split(out, "train").row_keys is None
  np.testing.assert_array_equal(data_lib.load_split(out, "train", rows=(0, 10)).row_keys,
                                np.arange(10))
  give_first_keys(np.arange(10, dtype=np.int64))
  with pytest.raises(manifest_lib.ShardError, match="row_keys have dtype int64"):
    data_lib.load_split(out, "train")
  with pytest.raises(manifest_lib.ShardError, match="row_keys have dtype"):
    data_lib.write_shard(out, "x.h5", "train", np.zeros((2, 1)), np.zeros(2),
                         feature_bounds=(0, 1), row_keys=np.zeros(3, np.uint64))
  with pytest.raises(manifest_lib.ShardError, match="row_keys given for a unit dataset"):
    with data_lib.DatasetWriter(str(tmp_path / "u"), feature_names=["a"], label_name="y",
                                feature_bounds=(0, 1), privacy_unit="hh",
                                max_rows_per_unit=2) as w:
      w.add("train", np.zeros((2, 1)), np.zeros(2), unit_keys=np.zeros(2, np.uint64),
            row_keys=np.zeros(2, np.uint64))

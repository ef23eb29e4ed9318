"""The shard format: round trip, atomic output, and an error naming the shard on mismatch."""

import json
import os

import h5py
import numpy as np
import pytest

from fastdp_jax import data as data_lib
from tests.conftest import make_dataset


def _write(tmp_path, max_rows=1000, rows=3000):
  return make_dataset(str(tmp_path / "ds"), rows=rows, max_rows_per_shard=max_rows)


def test_round_trip_and_manifest(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(250, 4)).astype(np.float32)
  y = rng.integers(0, 2, 250)
  out = str(tmp_path / "d")
  with data_lib.DatasetWriter(out, feature_names=list("abcd"), label_name="y",
                              max_rows_per_shard=100) as w:
    w.add("train", x[:200], y[:200])
    w.add("test", x[200:], y[200:])
    w.set_provenance(data_lib.Provenance(rows_read=260, kept=250, dropped_na=7, rejected=3))
  m = data_lib.read_manifest(out)
  assert [s.file for s in m.shards] == ["test-00000.h5", "train-00000.h5", "train-00001.h5"]
  assert m.rows("train") == 200 and m.rows("test") == 50
  assert m.provenance.dropped_na == 7 and m.provenance.rejected == 3
  tr = data_lib.load_split(out, "train")
  np.testing.assert_array_equal(tr.features, x[:200])
  np.testing.assert_array_equal(tr.labels, y[:200].astype(np.float32))
  assert tr.feature_names == tuple("abcd") and tr.label_name == "y"
  assert not any(n.startswith(".staging") for n in os.listdir(tmp_path))


def test_binary_features_are_stored_compactly(tmp_path):
  out = _write(tmp_path)
  with h5py.File(os.path.join(out, "train-00000.h5")) as f:
    assert f["features"].dtype == np.uint8 and f["labels"].dtype == np.uint8


def test_provenance_must_reconcile():
  with pytest.raises(ValueError, match="reconcile"):
    data_lib.Provenance(rows_read=10, kept=5, dropped_na=1, rejected=1)


def test_existing_output_is_refused_and_failed_writer_leaves_nothing(tmp_path):
  out = _write(tmp_path)
  with pytest.raises(FileExistsError):
    data_lib.DatasetWriter(out, feature_names=["a"], label_name="y")
  new = str(tmp_path / "crashed")
  with pytest.raises(RuntimeError):
    with data_lib.DatasetWriter(new, feature_names=["a"], label_name="y") as w:
      w.add("train", np.zeros((5, 1)), np.zeros(5))
      raise RuntimeError("producer crashed")
  assert not os.path.exists(new)
  assert not any(n.startswith(".staging") for n in os.listdir(tmp_path))


def test_missing_shard_is_named(tmp_path):
  out = _write(tmp_path)
  os.remove(os.path.join(out, "train-00001.h5"))
  with pytest.raises(data_lib.ShardError, match="train-00001.h5.*missing"):
    data_lib.load_split(out, "train")


def test_corrupt_shard_is_named(tmp_path):
  out = _write(tmp_path)
  path = os.path.join(out, "train-00000.h5")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff\x00garbage")
  with pytest.raises(data_lib.ShardError, match="train-00000.h5.*sha256"):
    data_lib.load_split(out, "train")


def test_truncated_shard_is_named_even_without_checksums(tmp_path):
  out = _write(tmp_path)
  path = os.path.join(out, "train-00000.h5")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  with pytest.raises(data_lib.ShardError, match="train-00000.h5"):
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
  with pytest.raises(data_lib.ShardError, match="train-00001.h5.*rows|train-00001.h5.*manifest"):
    data_lib.load_split(out, "train", verify_checksum=False)


def test_wrong_feature_width_is_named(tmp_path):
  out = _write(tmp_path)
  _edit_manifest(out, lambda m: _shard(m, "train-00001.h5").update(num_features=8))
  with pytest.raises(data_lib.ShardError, match="train-00001.h5.*width"):
    data_lib.load_split(out, "train", verify_checksum=False)
  out2 = make_dataset(str(tmp_path / "ds2"), rows=500)
  _edit_manifest(out2, lambda m: m.update(feature_names=m["feature_names"][:-1]))
  with pytest.raises(data_lib.ShardError, match="width|features"):
    data_lib.load_split(out2, "train", verify_checksum=False)


def test_missing_dataset_says_how_to_create_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="synthesize"):
    data_lib.load_split(str(tmp_path / "nope"), "train")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(data_lib.ShardError, match="manifest"):
    data_lib.load_split(str(tmp_path / "empty"), "train")


def test_digest_identifies_the_data(tmp_path):
  a = data_lib.read_manifest(make_dataset(str(tmp_path / "a"), rows=500, seed=1))
  b = data_lib.read_manifest(make_dataset(str(tmp_path / "b"), rows=500, seed=2))
  a2 = data_lib.read_manifest(make_dataset(str(tmp_path / "a2"), rows=500, seed=1))
  assert a.digest() == a2.digest() != b.digest()

"""The dataset directory is a trust boundary, and values are checked where they enter.

A manifest names only plain files inside its directory, each once, with a known split; the
shard writer and the reader refuse what a shard must not hold (non-finite or out-of-bounds
features, labels outside {0, 1}, non-numeric or boolean dtypes, wrong shapes), naming the
shard and column; a bad dataset is refused before the first update. Small data throughout.
"""

import json
import os

import h5py
import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from fastdp_jax import train
from tests.conftest import make_config, make_dataset
from tests.data.test_shards import write_raw_dataset

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

NAMES = ("a", "b", "c")


def _rows(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.random((n, 3)) < 0.5).astype(np.float32), rng.integers(0, 2, n).astype(np.uint8)


def _edit_manifest(out, fn):
  path = os.path.join(out, manifest_lib.MANIFEST)
  with open(path) as f:
    body = json.load(f)
  fn(body)
  with open(path, "w") as f:
    json.dump(body, f)


def _good(tmp_path, name="d"):
  x, y = _rows()
  return write_raw_dataset(str(tmp_path / name), {
      "train-0.h5": ("train", x[:30], y[:30]), "test-0.h5": ("test", x[30:], y[30:])})


def test_shard_errors_are_user_errors():
  assert issubclass(manifest_lib.ShardError, errors.UserError)


# ------------------------------------------------------------------ paths inside the directory

@pytest.mark.parametrize("name", ["../outside.h5", "sub/../../outside.h5", "/abs/outside.h5",
                                  "sub/train-0.h5", "..", ""])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(tmp_path, name):
  out = _good(tmp_path)
  x, y = _rows()
  with h5py.File(tmp_path / "outside.h5", "w") as f:  # a readable file outside the directory
    f["features"], f["labels"] = x, y
  if name.startswith("/abs/"):
    name = str(tmp_path / "outside.h5")

  def point_outside(body):
    body["shards"][1]["file"] = name  # the train shard
  _edit_manifest(out, point_outside)
  with pytest.raises(manifest_lib.ShardError, match="not a plain file name inside the dataset"):
    data_lib.load_split(out, "train", verify_checksum=False)
  with pytest.raises(manifest_lib.ShardError, match="not a plain file name"):
    manifest_lib.read_manifest(out)


def test_a_symlink_leading_outside_the_directory_is_refused(tmp_path):
  out = _good(tmp_path)
  outside = tmp_path / "outside.h5"
  os.replace(os.path.join(out, "train-0.h5"), outside)
  os.symlink(outside, os.path.join(out, "train-0.h5"))
  with pytest.raises(manifest_lib.ShardError, match="train-0.h5: a symlink leading outside"):
    data_lib.load_split(out, "train")


def test_a_shard_listed_twice_is_refused(tmp_path):
  out = _good(tmp_path)
  _edit_manifest(out, lambda body: body["shards"].append(dict(body["shards"][1])))
  with pytest.raises(manifest_lib.ShardError, match="train-0.h5 is listed more than once"):
    data_lib.load_split(out, "train")


def test_a_shard_aliased_by_a_symlink_inside_the_directory_is_refused(tmp_path):
  out = _good(tmp_path)
  os.symlink("train-0.h5", os.path.join(out, "train-1.h5"))

  def alias(body):
    body["shards"].append(dict(body["shards"][1], file="train-1.h5"))
  _edit_manifest(out, alias)
  with pytest.raises(manifest_lib.ShardError, match="train-1.h5: the same file as shard train-0.h5"):
    data_lib.load_split(out, "train")


def test_an_unknown_split_is_refused(tmp_path):
  out = _good(tmp_path)
  _edit_manifest(out, lambda body: body["shards"][0].update(split="validation"))
  with pytest.raises(manifest_lib.ShardError, match="test-0.h5 has split 'validation'"):
    data_lib.load_split(out, "train")
  with pytest.raises(manifest_lib.ShardError, match="split"):
    data_lib.write_shard(str(tmp_path), "v.h5", "validation", *_rows(), feature_bounds=(0, 1))


@pytest.mark.parametrize("key,value", [("rows", -1), ("rows", "30"), ("num_features", 2.5)])
def test_a_shard_entry_with_a_bad_count_is_refused(tmp_path, key, value):
  out = _good(tmp_path)
  _edit_manifest(out, lambda body: body["shards"][1].update({key: value}))
  with pytest.raises(manifest_lib.ShardError, match=f"train-0.h5 has {key}=|train-0.h5: feature"):
    data_lib.load_split(out, "train")


# ------------------------------------------------------------------ values and types: writer

def _writer(tmp_path):
  return data_lib.DatasetWriter(str(tmp_path / "w"), feature_names=NAMES, label_name="y",
                                feature_bounds=(0, 1))


@pytest.mark.parametrize("labels,count", [([2] + [0] * 9, 1), ([-1, 1] + [0] * 8, 1),
                                          ([0.7] + [1] * 9, 1), ([np.nan, 5] + [0] * 8, 2)])
def test_the_writer_refuses_labels_outside_0_1_instead_of_casting(tmp_path, labels, count):
  x, _ = _rows(10)
  with pytest.raises(manifest_lib.ShardError,
                     match=rf"shard train-00000.h5: {count} label\(s\) outside \{{0, 1\}}"):
    with _writer(tmp_path) as w:
      w.add("train", x, np.asarray(labels))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("features", [
    np.array([["0", "1", "0"]] * 4), np.ones((4, 3), np.complex64), np.ones((4, 3), bool),
    np.array([[0, 1, None]] * 4, dtype=object)], ids=["str", "complex", "bool", "object"])
def test_the_writer_refuses_non_numeric_features(tmp_path, features):
  with pytest.raises(manifest_lib.ShardError, match="train-00000.h5: features have dtype"):
    with _writer(tmp_path) as w:
      w.add("train", features, np.zeros(4))


@pytest.mark.parametrize("x_shape,y_shape,match", [
    ((4, 3), (4, 1), r"labels have shape \(4, 1\), expected \(4,\)"),
    ((4, 3), (5,), r"labels have shape \(5,\), expected \(4,\)"),
    ((4,), (4,), r"features have shape \(4,\)"),
    ((4, 2), (4,), "2 features, expected 3")])
def test_the_writer_refuses_wrong_shapes(tmp_path, x_shape, y_shape, match):
  with pytest.raises(manifest_lib.ShardError, match=match):
    with _writer(tmp_path) as w:
      w.add("train", np.zeros(x_shape), np.zeros(y_shape))


def test_the_writer_refuses_a_shard_name_with_a_directory(tmp_path):
  with pytest.raises(manifest_lib.ShardError, match="not a plain file name"):
    data_lib.write_shard(str(tmp_path), "../x.h5", "train", *_rows(), feature_bounds=(0, 1))
  assert not os.path.exists(tmp_path.parent / "x.h5")


# ------------------------------------------------------------------ values and types: reader

@pytest.mark.parametrize("build,match", [
    (lambda x, y: (x, y.reshape(-1, 1).astype(np.uint8)), r"labels have shape \(30, 1\)"),
    (lambda x, y: (x, np.where(np.arange(30) == 3, 255, y).astype(np.uint8)),
     r"1 label\(s\) outside \{0, 1\}, first at row 3"),
    (lambda x, y: (x.astype(bool), y), "'features' is not numeric .dtype bool"),
    (lambda x, y: (x.astype(np.complex64), y), "'features' is not numeric .dtype complex64"),
    (lambda x, y: (x.astype("S1"), y), "'features' is not numeric .dtype .S1"),
    (lambda x, y: (x, y.astype(bool)), "'labels' is not numeric .dtype bool"),
], ids=["column_labels", "label_255", "bool", "complex", "bytes", "bool_labels"])
def test_the_reader_refuses_what_the_writer_would(tmp_path, build, match):
  x, y = _rows()
  tx, ty = build(x[:30], y[:30])
  out = write_raw_dataset(str(tmp_path / "d"), {"train-0.h5": ("train", tx, ty),
                                                "test-0.h5": ("test", x[30:], y[30:])})
  with pytest.raises(manifest_lib.ShardError, match=f"shard train-0.h5: .*{match}"):
    data_lib.load_split(out, "train")


def test_a_features_group_instead_of_a_dataset_is_a_shard_error(tmp_path):
  out = _good(tmp_path)
  path = os.path.join(out, "train-0.h5")
  with h5py.File(path, "w") as f:
    f.create_group("features")
    f["labels"] = np.zeros(30, np.uint8)
  with pytest.raises(manifest_lib.ShardError, match="train-0.h5: 'features' is not a dataset"):
    data_lib.load_split(out, "train", verify_checksum=False)


# ------------------------------------------------------------------ refused before any update

@pytest.mark.parametrize("value,what", [(1e30, "outside its declared bounds"),
                                        (np.nan, "non-finite")])
def test_a_dataset_with_one_bad_feature_is_refused_before_any_update(tmp_path, value, what):
  src = make_dataset(str(tmp_path / "src"), rows=3000, seed=3)
  rows = data_lib.load_split(src, "train")
  x, y = rows.features.copy(), rows.labels
  x[1234, 5] = value  # one person's value
  names = manifest_lib.read_manifest(src).feature_names
  test = data_lib.load_split(src, "test")
  out = write_raw_dataset(str(tmp_path / "bad"), {
      "train-0.h5": ("train", x[:1000], y[:1000]), "train-1.h5": ("train", x[1000:], y[1000:]),
      "test-0.h5": ("test", test.features, test.labels)}, names=names)
  workdir = tmp_path / "w"
  with pytest.raises(manifest_lib.ShardError,
                     match=f"shard train-1.h5: column '{names[5]}' has 1 .*{what}.*row 234"):
    train.train_and_evaluate(make_config(out, num_epochs=1), str(workdir))
  # Nothing was trained: no metrics, no checkpoint, no parameters.
  left = set(os.listdir(workdir)) if workdir.exists() else set()
  assert not left & {"metrics.jsonl", "steps.jsonl", "checkpoints", "final_params.npz"}, left

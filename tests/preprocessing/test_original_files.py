"""The original system's single-file layouts: dataset.h5 and dataset_package.h5.

``dataset.h5``: ``x_train (n, 9)``, ``y_train (n,)``, ``x_test``, ``y_test``.
``dataset_package.h5``: ``train (n, 10)``, ``test (n, 10)``, the label in the last column.
Neither declares feature bounds: they come from ``data.feature_bounds`` or the file is refused.
"""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax import summary as summary_lib
from preprocessing import synthesize as S

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def arrays():
  cols = S.synthesize_capums(6000, seed=8)
  x = np.stack([cols[c] for c in split_lib.CAPUMS_FEATURES], axis=1).astype(np.float64)
  y = cols[split_lib.CAPUMS_LABEL].astype(np.int64)
  test = split_lib.is_test_row(np.arange(len(y)))
  return x[~test], y[~test], x[test], y[test]


def write_dataset_h5(path, arrays, y_shape=None):
  x_tr, y_tr, x_te, y_te = arrays
  with h5py.File(path, "w") as f:
    f["x_train"], f["x_test"] = x_tr, x_te
    f["y_train"] = y_tr if y_shape is None else y_tr.reshape(-1, 1)
    f["y_test"] = y_te if y_shape is None else y_te.reshape(-1, 1)
  return str(path)


def write_package_h5(path, arrays):
  x_tr, y_tr, x_te, y_te = arrays
  with h5py.File(path, "w") as f:
    f["train"] = np.concatenate([x_tr, y_tr[:, None]], axis=1)
    f["test"] = np.concatenate([x_te, y_te[:, None]], axis=1)
  return str(path)


@pytest.mark.parametrize("layout", ["dataset", "dataset_column_labels", "package"])
def test_load_split_reads_the_original_layouts(tmp_path, arrays, layout):
  if layout == "package":
    path = write_package_h5(tmp_path / "dataset_package.h5", arrays)
  else:
    path = write_dataset_h5(tmp_path / "dataset.h5", arrays,
                            y_shape="column" if layout.endswith("labels") else None)
  for split, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
    s = data_lib.load_split(path, split, feature_bounds=(0, 1))
    assert s.features.dtype == np.float32 and s.labels.dtype == np.float32
    assert s.features.shape == x.shape and s.labels.shape == (len(y),)
    np.testing.assert_array_equal(s.features, x)
    np.testing.assert_array_equal(s.labels, y)
    assert s.feature_names == split_lib.CAPUMS_FEATURES and s.label_name == "employed"
    assert s.digest == data_lib.sha256_file(path)
    assert s.feature_bounds == ((0.0, 1.0),) * 9


def test_original_files_without_configured_bounds_are_refused(tmp_path, arrays):
  path = write_dataset_h5(tmp_path / "dataset.h5", arrays)
  with pytest.raises(manifest_lib.ShardError, match=r"dataset.h5 \(an original single-file layout"
                     r"\): no feature bounds declared.*--config.data.feature_bounds"):
    data_lib.load_split(path, "train")
  # Bounds are checked, not just required: these binary features are not all in [0, 0.5].
  with pytest.raises(manifest_lib.ShardError, match="dataset.h5 \\(train\\): column 'sex'.*outside"):
    data_lib.load_split(path, "train", feature_bounds=(0, 0.5))
  per_feature = tuple((0, 1) for _ in split_lib.CAPUMS_FEATURES)
  assert len(data_lib.load_split(path, "test", feature_bounds=per_feature)) == len(arrays[3])


def test_other_widths_get_generic_feature_names(tmp_path):
  path = str(tmp_path / "dataset_package.h5")
  with h5py.File(path, "w") as f:
    f["train"] = np.array([[0.5, 1, 0], [1.5, 0, 1]])
    f["test"] = np.array([[2.5, 1, 1]])
  s = data_lib.load_split(path, "train", feature_bounds=(0, 2))
  assert s.feature_names == ("x0", "x1") and s.labels.tolist() == [0, 1]


def test_shards_of_the_spark_job_equal_the_original_layout(tmp_path, arrays):
  """The same rows in both formats load identically (so the trainer sees no difference)."""
  x_tr, y_tr, x_te, y_te = arrays
  with data_lib.DatasetWriter(str(tmp_path / "shards"), feature_names=split_lib.CAPUMS_FEATURES,
                              label_name="employed", feature_bounds=(0, 1),
                              max_rows_per_shard=1000) as w:
    w.add("train", x_tr, y_tr)
    w.add("test", x_te, y_te)
  package = write_package_h5(tmp_path / "dataset_package.h5", arrays)
  for split in manifest_lib.SPLITS:
    a = data_lib.load_split(str(tmp_path / "shards"), split)
    b = data_lib.load_split(package, split, feature_bounds=(0, 1))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("name,build,match", [
    ("no_datasets.h5", lambda f: f.create_dataset("other", data=[1]),
     r"neither x_train/y_train \(dataset.h5 layout\) nor train"),
    ("no_labels.h5", lambda f: f.create_dataset("x_train", data=np.zeros((3, 9))),
     "y_train"),
    ("mismatch.h5", lambda f: (f.create_dataset("x_train", data=np.zeros((3, 9))),
                               f.create_dataset("y_train", data=np.zeros(4))),
     "do not match"),
    ("flat_package.h5", lambda f: f.create_dataset("train", data=np.zeros(10)), "2-D"),
    ("group.h5", lambda f: f.create_group("train"), "not a dataset"),
    ("labels_12.h5", lambda f: (f.create_dataset("x_train", data=np.zeros((2, 9))),
                                f.create_dataset("y_train", data=np.array([1, 2]))),
     r"label\(s\) outside \{0, 1\}"),
    ("nan.h5", lambda f: f.create_dataset("train", data=np.array([[np.nan, 1.0]])),
     "non-finite"),
    ("strings.h5", lambda f: f.create_dataset("train", data=np.array([[b"a", b"1"]])),
     "not numeric"),
])
def test_malformed_original_files_raise_a_shard_error(tmp_path, name, build, match):
  path = str(tmp_path / name)
  with h5py.File(path, "w") as f:
    build(f)
  with pytest.raises(manifest_lib.ShardError, match=match) as e:
    data_lib.load_split(path, "train", feature_bounds=(0, 1))
  assert name in str(e.value)


def test_a_file_that_is_not_hdf5(tmp_path):
  path = tmp_path / "dataset.h5"
  path.write_text("x_train,y_train\n")
  with pytest.raises(manifest_lib.ShardError, match="unreadable HDF5 file"):
    data_lib.load_split(str(path), "train")


def test_the_trainer_reads_dataset_h5_directly(tmp_path, arrays):
  if not os.path.isfile(os.path.join(ROOT, "main.py")):
    pytest.skip("main.py is not there")
  path = write_dataset_h5(tmp_path / "dataset.h5", arrays)
  workdir = str(tmp_path / "run")
  r = subprocess.run([sys.executable, "main.py", "--config=configs/test.py",
                      f"--config.data.path={path}", f"--workdir={workdir}",
                      "--config.data.feature_bounds=(0, 1)", "--config.num_epochs=1"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = summary_lib.read_summary(workdir)
  assert summary.train_examples == len(arrays[1])
  assert summary.test_examples == len(arrays[3])
  assert summary.data_digest == data_lib.sha256_file(path)
  assert 0 <= summary.test_accuracy <= 1

"""Materialised Poisson batches for every task: multiclass and regression datasets (an
embedding column included) go through the Spark job, their labels are checked against the
manifest's task and stored as float32, and training from the batches equals training in
memory; a version-1 directory (uint8 labels) is refused. One SparkSession per module.
"""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from fastdp_jax.data import batch_format as bf
from fastdp_jax.data import batch_stream as bs
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.dp import sampling
from fastdp_jax import train
from tests import preprocessing_helpers as T
from tests.conftest import make_config
from tests.test_tasks import BOUNDS, CLASSES, _write

_WHY_NOT = T.spark_available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

BATCH, EPOCHS, SEED = 64, 2, 0  # configs/test.py's dp.sampling_seed is 0
KINDS = ("multiclass", "regression")


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_batches_tasks")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  return {kind: _write(str(root / kind), kind, rows=2500, seed=3) for kind in KINDS}


def _job(spark, dataset, out, **kw):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  return pb.run_job(spark, pb.plan_job(dataset, str(out), batch_size=BATCH, epochs=EPOCHS,
                                       sampling_seed=SEED, **kw))


@pytest.fixture(scope="module")
def batches(spark, datasets, tmp_path_factory):
  root = tmp_path_factory.mktemp("batches")
  out = {}
  for kind, path in datasets.items():
    out[kind] = str(root / kind)
    _job(spark, path, out[kind], updates_per_shard=16)
  return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_update_holds_the_samplers_rows_with_their_labels(kind, datasets, batches):
  train_rows = data_lib.load_split(datasets[kind], "train")
  n = len(train_rows)
  stream = bs.open_batches(batches[kind], expected=bs.dataset_identity(datasets[kind]))
  # The dataset digest the run records is the manifest's, which covers its task.
  assert stream.dataset_digest == manifest_lib.read_manifest(datasets[kind]).digest()
  sampler = sampling.PoissonSampler(n, BATCH, sampling.sampling_key(SEED)[0])
  f, lab, m = stream.read(0, stream.total_updates)
  assert lab.dtype == np.float32
  seen = []
  for t in range(stream.total_updates):
    want = sampler.global_indices(t)
    k = len(want)
    assert m[t, :k].all() and not m[t, k:].any()
    np.testing.assert_array_equal(f[t, :k], train_rows.features[want])
    np.testing.assert_array_equal(lab[t, :k], train_rows.labels[want])
    seen.append(lab[t, :k])
  seen = np.concatenate(seen)
  if kind == "multiclass":  # class 2 survives (uint8 would too; a binary check would not)
    assert set(np.unique(seen)) == {0.0, 1.0, 2.0}
  else:  # fractional values survive (uint8 would truncate them)
    assert np.any(seen != np.round(seen)) and seen.min() >= BOUNDS[0] and seen.max() <= BOUNDS[1]
  # On disk the labels are float32: the regression values bit for bit, not a rounding.
  block = next(d for d in sorted(os.listdir(batches[kind])) if d.startswith("epochs-"))
  shard = sorted(s for s in os.listdir(os.path.join(batches[kind], block)) if s.endswith(".h5"))[0]
  with h5py.File(os.path.join(batches[kind], block, shard), "r") as h:
    assert h["labels"].dtype == np.dtype("<f4")


def _retask(src, dst, task):
  """A copy of dataset ``src`` whose manifest declares ``task`` (the same shard files)."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, manifest_lib.MANIFEST)
  body = json.load(open(path))
  body["task"] = task.to_json()
  with open(path, "w") as f:
    json.dump(body, f)
  return str(dst)


def _first_bad(dataset, bad):
  """``(shard file, row in it, count in it)`` of the first training labels where ``bad``."""
  m = manifest_lib.read_manifest(dataset)
  for info in m.shards_of("train"):
    _, y = data_lib.read_shard(dataset, info)
    hits = np.flatnonzero(bad(y))
    if len(hits):
      return info.file, int(hits[0]), int(bad(y).sum())
  raise AssertionError("no bad label")


@pytest.mark.parametrize("kind,task,bad,message", [
    # The same labels 0..2 under a 2-class task: class 2 is no class index.
    ("multiclass", manifest_lib.Task("multiclass", classes=CLASSES[:2]), lambda y: y > 1,
     r"label\(s\) that are not a class index 0..1 of 2 classes"),
    # The same values under narrower bounds.
    ("regression", manifest_lib.Task("regression", bounds=(0.0, 6.0)), lambda y: y > 6,
     r"label\(s\) non-finite or outside the regression bounds \[0, 6\]"),
])
def test_labels_outside_the_manifests_task_are_refused_naming_shard_and_row(
    spark, datasets, tmp_path, kind, task, bad, message):
  path = _retask(datasets[kind], tmp_path / "data", task)
  shard, row, count = _first_bad(path, bad)
  assert count < manifest_lib.read_manifest(path).rows("train")  # some labels are fine
  with pytest.raises(manifest_lib.ShardError, match=f"shard {shard}: {count} {message}, first at "
                                                f"row {row}"):
    # One task for the one train shard: the first bad row is the one reported.
    _job(spark, path, tmp_path / "out", rows_per_task=1 << 20)
  assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing published, no staging left


def _cfg(dataset, **overrides):
  return make_config(dataset, **{"batch_size": BATCH, "num_epochs": EPOCHS,
                                 "model.embedding_dim": 4, "checkpoint.enabled": False,
                                 **overrides})


def _params(workdir):
  saved = np.load(os.path.join(workdir, "final_params.npz"))
  return {k: saved[k] for k in saved.files}


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_training_equals_in_memory_training(kind, datasets, batches, tmp_path):
  memory = train.train_and_evaluate(_cfg(datasets[kind]), str(tmp_path / "memory"))
  streamed = train.train_and_evaluate(_cfg(datasets[kind], **{"data.batches": batches[kind]}),
                                      str(tmp_path / "streamed"))
  assert streamed.task == memory.task == kind
  assert streamed.batches == batches[kind]
  assert streamed.steps == memory.steps == EPOCHS * round(memory.train_examples / BATCH)
  assert streamed.epsilon == memory.epsilon
  assert streamed.sampling_rate == memory.sampling_rate
  # Same batches and noise; float32 sums over another padding differ in order only (as
  # test_streamed_training's binary comparison).
  a, b = _params(tmp_path / "memory"), _params(tmp_path / "streamed")
  assert sorted(a) == sorted(b) and "tables/0/embedding" in a
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * np.abs(a[k]).max())
  metric = "test_accuracy" if kind == "multiclass" else "test_rmse"
  assert getattr(streamed, metric) == pytest.approx(getattr(memory, metric), rel=1e-3)
  # The model learned the labels (not a constant): wrong labels could not match memory's.
  if kind == "multiclass":
    assert streamed.test_accuracy > streamed.majority_class_rate
  else:
    assert streamed.test_rmse < streamed.baseline_rmse


def test_batches_of_the_same_shards_under_another_task_are_refused(datasets, batches,
                                                                   tmp_path):
  # Same files, another declared task: the manifest digest (which covers the task) differs.
  other = _retask(datasets["regression"], tmp_path / "data",
                  manifest_lib.Task("regression", bounds=(0.0, 20.0)))
  with pytest.raises(bf.BatchMismatchError, match="dataset_digest"):
    train.train_and_evaluate(_cfg(other, **{"data.batches": batches["regression"]}),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_version_1_directory_is_refused_with_a_rerun_message(batches, tmp_path):
  copy = tmp_path / "v1"
  shutil.copytree(batches["multiclass"], copy)
  path = copy / bf.RUN_MANIFEST
  body = json.load(open(path))
  body["format_version"] = 1
  body["digest"] = bf.body_digest(body)  # a well-formed version-1 manifest, not an edit
  path.write_text(json.dumps(body))
  with pytest.raises(bf.BatchError) as e:
    bs.open_batches(str(copy))
  text = str(e.value)
  assert "\n" not in text
  assert "format_version 1" in text and "needs 2" in text
  assert "rerun `python -m preprocessing.poisson_batches`" in text
  assert bf.FORMAT_VERSION == 2


def test_the_disk_estimate_is_what_the_shards_take(datasets, batches):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  stream = bs.open_batches(batches["regression"])
  block = bf.read_block(stream.path, bf.block_name(0, EPOCHS), stream.run)
  on_disk = sum(os.path.getsize(os.path.join(stream.path, block.name, s.file))
                for s in block.shards)
  # The estimate the job plans with (and checks free space against) for this run.
  plan = pb.plan_job(datasets["regression"], os.path.join(os.path.dirname(stream.path), "x"),
                     batch_size=BATCH, epochs=EPOCHS, sampling_seed=SEED, updates_per_shard=16)
  assert plan.block_bytes() == stream.total_updates * stream.capacity * bf.bytes_per_slot(
      stream.num_features)
  # The shards hold exactly those bytes of arrays, plus an HDF5 header each (a few KB).
  assert plan.block_bytes() <= on_disk <= plan.block_bytes() + len(block.shards) * 16384
  arrays = 0
  for s in block.shards:
    with h5py.File(os.path.join(stream.path, block.name, s.file), "r") as h:
      arrays += sum(h[name].size * h[name].dtype.itemsize for name in h)
  assert arrays == plan.block_bytes()


def test_an_embedding_id_that_is_no_integer_is_refused_naming_shard_and_row(spark, tmp_path):
  # Inside its column's bounds [0, VOCAB - 1], so only the embedding check can catch it, as
  # in-memory loading does. Written without the embedding (the writer would refuse it), then
  # the manifest declares it, as a hand-made dataset might.
  from tests.test_tasks import EMBEDDINGS, FEATURE_BOUNDS, NAMES, TASKS, _rows
  from fastdp_jax.data import split as split_lib
  x, y = _rows("multiclass", 2500, 3)
  test = split_lib.is_test_row(np.arange(len(y)))
  j = NAMES.index(EMBEDDINGS[0].feature)
  train_rows = np.flatnonzero(~test)
  x[train_rows[[40, 700]], j] = 2.5
  path = str(tmp_path / "data")
  with data_lib.DatasetWriter(path, feature_names=NAMES, label_name="y",
                              feature_bounds=FEATURE_BOUNDS, task=TASKS["multiclass"]) as w:
    w.add("train", x[~test], y[~test])
    w.add("test", x[test], y[test])
  manifest = os.path.join(path, manifest_lib.MANIFEST)
  body = json.load(open(manifest))
  body["embeddings"] = [e.to_json() for e in EMBEDDINGS]
  with open(manifest, "w") as f:
    json.dump(body, f)
  with pytest.raises(manifest_lib.ShardError):  # in-memory loading refuses it ...
    data_lib.load_split(path, "train")
  shard = manifest_lib.read_manifest(path).shards_of("train")[0].file
  with pytest.raises(manifest_lib.ShardError, match=f"shard {shard}: embedding column 'region' has "
                                                r"2 id\(s\) that are not integers in \[0, 5\], "
                                                "first at row 40"):
    _job(spark, path, tmp_path / "out", rows_per_task=1 << 20)  # ... and so does the job
  assert sorted(os.listdir(tmp_path)) == ["data"]

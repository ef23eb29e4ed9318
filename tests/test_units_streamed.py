"""Materialised Poisson batches of a unit dataset (privacy units, out of core) = in memory.

The Spark job (preprocessing.poisson_batches) groups and bounds a unit dataset's rows as the
trainer's loader does (fastdp_jax.data.units.group), samples UNITS with each unit's key as
its counter and packs the sampled units' kept rows contiguously (an int8 mask: 2 at a unit's
first row, 1 at its further rows), so with the same sampling key the streamed run reads
exactly the in-memory run's batches on one device (checked slot by slot), and the two give
the same parameters up to float32 summation order over a different padding (the capacities
differ: 1e-5 relative, as for row-level batches in tests/test_streamed_training.py). The
reader repacks the units for several devices and microbatches. One SparkSession per module.
"""

import os

import numpy as np
import pytest

from fastdp_jax import train
from fastdp_jax.data import batch_format
from fastdp_jax.data import batch_stream
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import release
from fastdp_jax.dp import sampling
from tests import preprocessing_helpers as T
from tests import test_units_training
from tests.conftest import make_config, make_dataset, make_unit_dataset

_WHY_NOT = T.spark_available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

BATCH, EPOCHS, K, SEED = 32, 2, 4, 0  # configs/test.py's dp.sampling_seed is 0


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_units_streamed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  # Units of 1..6 rows with k = 4: the bound drops rows of the larger units.
  return make_unit_dataset(str(tmp_path_factory.mktemp("u") / "data"), units=700,
                           max_rows=K, max_size=6, seed=3)


def _job(spark, dataset, out, **kw):
  from preprocessing import poisson_batches as pb
  plan = pb.plan_job(dataset, out, batch_size=BATCH, epochs=EPOCHS, sampling_seed=SEED,
                     updates_per_shard=16, **kw)
  pb.run_job(spark, plan)
  return out


@pytest.fixture(scope="module")
def batches(spark, dataset, tmp_path_factory):
  return _job(spark, dataset, str(tmp_path_factory.mktemp("b") / "batches"))


def _cfg(dataset, **overrides):
  return make_config(dataset, **{"batch_size": BATCH, "num_epochs": EPOCHS,
                                 "checkpoint.every_steps": 10, **overrides})


def _params(workdir):
  saved = np.load(os.path.join(workdir, "final_params.npz"))
  return {k: saved[k] for k in saved.files}


def _grouped(dataset):
  """The in-memory loader's grouping: (unit keys ascending, offsets, kept rows in order)."""
  train_split = data_lib.load_split(dataset, "train")
  g = units_lib.group(train_split.unit_keys, units_lib.row_content_keys(
      train_split.features, train_split.labels), K)
  keys = train_split.unit_keys[g.order[g.offsets[:-1]]]
  return keys, g.offsets, train_split.features[g.order], train_split.labels[g.order], g


def test_q_and_n_of_the_plan_are_units(dataset, batches):
  keys, _, _, _, g = _grouped(dataset)
  units, rows = len(keys), len(data_lib.load_split(dataset, "train").labels)
  assert g.dropped_rows > 0 and rows > 2 * units  # a q or N from rows would differ
  run = batch_format.read_run(batches)
  assert run.num_examples == units and run.max_rows_per_unit == K
  assert run.sampling_rate == BATCH / units
  assert run.steps_per_epoch == round(units / BATCH)
  assert run.total_updates == EPOCHS * run.steps_per_epoch
  p = sampling.automatic_overflow_probability(release.default_delta(units),
                                              run.total_updates, 1)
  assert run.overflow_probability == p
  sizes = np.bincount(np.diff(g.offsets), minlength=K + 1)  # the kept units' sizes
  assert run.capacity == sampling.row_capacity_for(sizes, BATCH / units, p)


def test_the_batches_are_the_in_memory_runs_batches_slot_by_slot(dataset, batches):
  keys, offsets, x, y, _ = _grouped(dataset)
  # The in-memory sampler (fastdp_jax.feed.make_batches, one device): units by key counter.
  sampler = sampling.PoissonSampler(len(keys), BATCH, SEED, counters=keys)
  stream = batch_stream.open_batches(batches, dataset=dataset)
  f, lab, m = stream.read(0, stream.total_updates)
  sampled = 0
  for t in range(stream.total_updates):
    want_x = np.zeros((stream.capacity, x.shape[1]), np.float32)
    want_y = np.zeros(stream.capacity, np.float32)
    want_m = np.zeros(stream.capacity, np.int8)
    at = 0
    for u in sampler.global_indices(t):  # packed in ascending key, a 2 then 1s
      rows = np.arange(offsets[u], offsets[u + 1])
      slots = at + np.arange(len(rows))
      want_x[slots], want_y[slots], want_m[slots] = x[rows], y[rows], 1
      want_m[at] = 2
      at += len(rows)
      sampled += 1
    np.testing.assert_array_equal(m[t], want_m, err_msg=f"update {t}")
    np.testing.assert_array_equal(f[t], want_x, err_msg=f"update {t}")
    np.testing.assert_array_equal(lab[t], want_y, err_msg=f"update {t}")
  assert sampled > stream.total_updates * BATCH / 2  # the comparison saw real units


def test_streamed_unit_training_equals_in_memory_training(dataset, batches, tmp_path):
  memory = train.train_and_evaluate(_cfg(dataset), str(tmp_path / "memory"))
  streamed = train.train_and_evaluate(_cfg(dataset, **{"data.batches": batches}),
                                      str(tmp_path / "streamed"))
  units = batch_format.read_run(batches).num_examples
  assert streamed.train_examples == memory.train_examples == units
  assert streamed.privacy_unit == memory.privacy_unit == ("household",)
  assert streamed.max_rows_per_unit == memory.max_rows_per_unit == K
  assert streamed.sampling_rate == memory.sampling_rate == BATCH / units
  assert streamed.steps == memory.steps and streamed.epsilon == memory.epsilon
  # The same batches and noise; only the padding (capacity) and so the float32 summation
  # order differ.
  a, b = _params(tmp_path / "memory"), _params(tmp_path / "streamed")
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * np.abs(a[k]).max())


def test_a_resumed_streamed_unit_run_equals_the_uninterrupted_one(dataset, batches, tmp_path,
                                                                  monkeypatch):
  cfg = _cfg(dataset, **{"data.batches": batches, "checkpoint.every_steps": 5,
                         "steps_per_call": 1})
  ref, resumed, work = test_units_training.crash_midway_and_resume(cfg, tmp_path, monkeypatch)
  assert resumed.steps == ref.steps and resumed.epsilon == ref.epsilon
  a, b = _params(tmp_path / "ref"), _params(work)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k])  # same batches, same noise, same shapes


def test_row_level_and_unit_batches_are_not_mixed_up(spark, dataset, batches, tmp_path):
  rows = make_dataset(str(tmp_path / "rows"), rows=400, seed=5)
  row_batches = _job(spark, rows, str(tmp_path / "row_batches"))
  for data, wrong, what in ((dataset, row_batches, "holds row-level batches"),
                            (rows, batches, r"holds privacy-unit batches \(k=4\)")):
    with pytest.raises(batch_format.BatchMismatchError, match=what) as e:
      train.train_and_evaluate(_cfg(data, **{"data.batches": wrong}), str(tmp_path / "w"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.parametrize("devices, block", [(1, None), (3, None), (8, None), (2, 9), (3, 4)])
def test_the_reader_repacks_whole_units_for_the_devices(devices, block):
  # Full packed batches (every update at its capacity, units of 1..k rows) repacked for the
  # devices: each unit whole on one device and inside one block, in order, every row once.
  from tests.test_units_training import packed_units
  rng = np.random.default_rng(devices)
  capacity, steps = 61, 20
  mask = np.zeros((steps, capacity), np.int8)
  for t in range(steps):
    at = 0
    while at < capacity - (t % 3):  # some updates full, some not
      n = min(int(rng.integers(1, K + 1)), capacity - at)
      mask[t, at], mask[t, at + 1:at + n] = 2, 1
      at += n
  ids = np.arange(steps * capacity, dtype=np.float32).reshape(steps, capacity)
  f, y, m = batch_stream.split_units_for_devices(ids[..., None], ids, mask, devices, K, block)
  per = batch_stream.unit_device_capacity(capacity, devices, K, block)
  assert f.shape == (steps, devices, per, 1) and m.shape == y.shape == (steps, devices, per)
  size = block or per
  assert per % size == 0
  for t in range(steps):
    want = packed_units(ids[t].astype(np.int64), mask[t])
    got = []
    for d in range(devices):
      for a, b in zip(range(0, per, size), range(size, per + 1, size)):
        got += packed_units(y[t, d, a:b].astype(np.int64), m[t, d, a:b])
    assert [rows for _, rows in got] == [rows for _, rows in want]
    np.testing.assert_array_equal(f[t, ..., 0], y[t])


def test_blocks_written_one_epoch_at_a_time_equal_the_whole_run(spark, dataset, batches,
                                                                 tmp_path):
  out = str(tmp_path / "blocks")
  _job(spark, dataset, out, first_epoch=0, num_epochs_block=1)
  _job(spark, dataset, out, first_epoch=1, num_epochs_block=1)  # the directory's units run
  blocks = batch_stream.open_batches(out, dataset=dataset)
  whole = batch_stream.open_batches(batches, dataset=dataset)
  assert blocks.run.digest == whole.run.digest
  for a, b in zip(blocks.read(0, blocks.total_updates), whole.read(0, whole.total_updates)):
    np.testing.assert_array_equal(a, b)

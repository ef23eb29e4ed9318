"""The rows a run reads: training rows on the device mesh, test and validation rows, the task.

Each process reads its range of the training rows and holds only its part, on its devices of
the global mesh; N is the global row count. With materialised batches (``data.batches``) the
training rows are never all in memory: the updates stream from the batches, and only bounded
samples of the rows are read (for the attacks).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from fastdp_jax import config as config_lib
from fastdp_jax import distributed
from fastdp_jax import errors
from fastdp_jax import metrics
from fastdp_jax import models
from fastdp_jax import parallel
from fastdp_jax import unit_batches
from fastdp_jax.data import batch_stream
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import plan as plan_lib
from fastdp_jax.dp import privacy_eval

# The train/test split's hash rule (split_lib.is_test_row) with another seed.
VALIDATION_SEED = 70


@dataclasses.dataclass(kw_only=True, eq=False)
class RunData:
  """What a run reads, and what follows from it alone (the task, the baseline).

  Attributes:
    train: this process's training rows (a bounded sample when the batches are streamed).
    test: the test rows (a bounded sample when the batches are streamed).
    dev: the training rows on the devices (None when the batches are streamed).
    num_examples: N, the training rows of all processes.
    validation: rows held out of training (``data.validation_fraction``), or None.
    head: the task, from the manifest.
    embeddings: the model's embedding inputs, from the manifest.
    baseline: the task's constant baseline on the test rows.
    canaries: an audit dataset's canaries (checked before the first update), or None.
    attack_index: the model-inversion attack's column, or None.
    streamed_from: the dataset directory whose test shards evaluation streams (None: the test
      rows are in memory).
    spec_estimate: ``(epsilon, delta)`` the dataset's feature spec spent on private estimates
      (:func:`fastdp_jax.data.manifest.spec_estimate`); added to the run's.
    unit: the dataset's privacy unit (None: every row is its own unit). With a unit,
      ``train`` holds the grouped and bounded rows, ``num_examples`` counts training UNITS
      and ``validation`` holds the rows of the validation units
      (:mod:`fastdp_jax.unit_batches`).
  """
  train: data_lib.Split
  test: data_lib.Split
  dev: parallel.DeviceData | None
  num_examples: int
  validation: data_lib.Split | None
  head: models.TaskHead
  embeddings: tuple[models.EmbeddingInput, ...]
  baseline: dict[str, float]
  canaries: privacy_eval.Canaries | None
  attack_index: int | None
  streamed_from: str | None
  spec_estimate: tuple[float, float] = (0.0, 0.0)
  unit: unit_batches.UnitSpec | None = None

  @property
  def validation_units(self) -> np.ndarray | None:
    """Each validation row's unit key (None without a unit: each row is its own unit), by
    which the temperature's selection scores whole units (docs/privacy.md)."""
    return self.validation.unit_keys if self.unit and self.validation is not None else None


Given = tuple[data_lib.Split, data_lib.Split, parallel.DeviceData]


def load(rc: config_lib.RunConfig, mesh: jax.sharding.Mesh, given: Given | None = None
         ) -> RunData:
  """Reads the run's rows (or takes ``given``: ``(train, test, device data)`` in memory).

  Raises:
    ConfigError: settings that contradict the data (``model.task``, a validation split
      with materialised batches); ShardError: a corrupt or inconsistent dataset.
  """
  d = rc.data
  if given is not None and given[2].units is not None:
    # The unit (its columns, k) lives in a dataset's manifest: rows given in memory with a unit
    # layout would be sampled by unit but clipped row by row.
    raise errors.ConfigError("rows given in memory cannot carry a privacy unit; train on the "
                             "unit dataset's directory (data.path)")
  streamed = given is None and bool(d.batches)
  unit = unit_batches.unit_spec(d.path) if given is None else None
  if unit is not None and streamed:  # the batches hold the sampled units' row slots
    _check_unit_settings(rc)
    validation, dev = None, None
    train, test, _ = _load_streamed(d, rc.privacy_eval.membership_rows, rc.json)
    n = _unit_counts(d)[0]
  elif unit is not None:
    _check_unit_settings(rc)
    train, test, dev, validation = _load_units(d, mesh, rc.json, unit)
    n = dev.num_examples
  elif streamed:
    validation = _load_validation(d, given=False)
    train, test, n = _load_streamed(d, rc.privacy_eval.membership_rows, rc.json)
    dev = None
  else:
    validation = _load_validation(d, given=given is not None)
    train, test, dev = _load_data(d, mesh, rc.json) if given is None else given
    n = dev.num_examples
  head, embeddings = task_of(rc.model, train)
  if rc.calibration.epsilon and head.kind == "regression":
    raise errors.ConfigError("calibration.epsilon applies to classifiers (a temperature for "
                             "probabilities); this dataset's task is regression: unset it")
  streamed_from = d.path if streamed else None
  return RunData(
      train=train, test=test, dev=dev, num_examples=n, validation=validation, head=head,
      embeddings=embeddings,
      baseline=metrics.baseline(test, head, streamed_from=streamed_from,
                                 chunk_rows=rc.eval_batch_size),
      canaries=privacy_eval.load_canaries(d.path) if given is None else None,
      attack_index=_attack_index(d.attack_column, train), streamed_from=streamed_from,
      spec_estimate=manifest_lib.spec_estimate(d.path) if given is None else (0.0, 0.0),
      unit=unit)


def _check_unit_settings(rc: config_lib.RunConfig) -> None:
  """Refuses what a unit dataset does not support, in one line.

  Raises:
    ConfigError: a validation fraction with materialised batches (the batches are drawn from
      every training unit, so none can be held out).
  """
  if rc.data.batches and rc.data.validation_fraction:
    raise errors.ConfigError("data.validation_fraction needs the training units read from "
                             "data.path (the batches of data.batches are drawn from every "
                             "training unit); unset it")


def _load_units(d: config_lib.DataSettings, mesh: jax.sharding.Mesh, config_json: str,
                unit: unit_batches.UnitSpec):
  """A unit dataset's ``(train, test, device data, validation)``, in memory.

  Every process reads the whole train split (a unit's rows must not straddle processes); the
  validation units (``data.validation_fraction``, a rule of the unit key with
  :data:`VALIDATION_SEED`) are held out whole, and the rest grouped and bounded by unit.
  """
  full = data_lib.load_split(d.path, "train", verify_checksum=d.verify_checksums,
                             feature_bounds=d.feature_bounds)
  distributed.check_same_on_all_processes("config and data", (config_json, full.digest))
  validation = None
  if full.unit_keys is not None and d.validation_fraction:
    held = units_lib.is_validation_unit(full.unit_keys, d.validation_fraction,
                                        seed=VALIDATION_SEED)
    validation = _rows(full, held)
    full = _rows(full, ~held)
    # Bounded like the training units (at most k rows each, the same rank): the validation
    # units are the units a model would be trained on. The private statistics of them (the
    # temperature, a tuning score) weigh each unit's rows by 1 / its rows, a bound of one
    # row's worth per unit whatever k is.
    kept = units_lib.group(validation.unit_keys, units_lib.row_content_keys(
        validation.features, validation.labels), unit.max_rows).order
    validation = validation.take(kept)
  train, dev = unit_batches.place_units(mesh, full, unit.max_rows)
  test = data_lib.load_split(d.path, "test", verify_checksum=d.verify_checksums,
                             feature_bounds=d.feature_bounds)
  return train, test, dev, validation


def _unit_counts(d: config_lib.DataSettings) -> tuple[int, int]:
  """``(training units, units of the train split)`` of a unit dataset, from its unit keys
  only (8 bytes a row; the training load verifies the shards). The bound k drops rows, never
  a whole unit, so this is the U the loader's grouping finds."""
  shards = manifest_lib.read_manifest(d.path).shards_of("train")
  keys = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [
      data_lib.read_unit_keys(d.path, info) for info in shards]))
  held = units_lib.is_validation_unit(keys, d.validation_fraction, seed=VALIDATION_SEED)
  return int(np.count_nonzero(~held)), int(keys.shape[0])


def _rows(split: data_lib.Split, keep: np.ndarray) -> data_lib.Split:
  """The rows of ``split`` where ``keep`` (with their unit and row keys)."""
  return split.take(keep)


def check_enough_rows(rc: config_lib.RunConfig) -> None:
  """Refuses data with too few training rows (units, in a unit dataset) for the run, or
  settings a unit dataset does not support, before any row is read.

  Called before the workdir is made or locked: found later, by the privacy plan, the refusal
  left a workdir holding only its lock. N is what the loaders will count: the manifest's (an
  original ``.h5`` file's shape) less the validation rows (their hash rule over the row ids).

  Raises:
    ConfigError: no training row, or batch_size > N (:func:`fastdp_jax.dp.plan.check_rows`).
  """
  d = rc.data
  counts = training_row_count(d)
  if counts is None:
    return  # the loader names what is wrong with data.path
  n, total = counts
  what = "rows"
  if unit_batches.unit_spec(d.path) is not None:
    _check_unit_settings(rc)
    what = "units"
  held = f" ({total} train {what}, {total - n} held out for validation)" if n != total else ""
  plan_lib.check_rows(n, rc.batch_size, public_num_examples=d.public_num_examples,
                      where=f"data.path={d.path}{held}")


def training_row_count(d: config_lib.DataSettings) -> tuple[int, int] | None:
  """``(N, train rows)``: the rows a run trains on (the train split less the validation
  rows) and the train split's, from the manifest without reading a row; None when
  ``data.path`` is not a dataset (the loader then says why). A unit dataset's are UNITS
  (N = U), counted from its unit keys alone."""
  total = data_lib.count_rows(d.path, "train")
  if total is None:
    return None
  if unit_batches.unit_spec(d.path) is not None:
    return _unit_counts(d)
  n, rule = total, validation_rows(d.validation_fraction, d.path)
  if rule is not None and not d.batches:  # with batches the loader refuses the fraction
    n -= sum(int(np.count_nonzero(rule(np.arange(lo, min(total, lo + (1 << 20))))))
             for lo in range(0, total, 1 << 20))  # bounded memory: a chunk of ids at a time
  return n, total


def _load_data(d: config_lib.DataSettings, mesh: jax.sharding.Mesh, config_json: str):
  train, dev = parallel.load_training_data(mesh, d.path, verify_checksum=d.verify_checksums,
                                           feature_bounds=d.feature_bounds,
                                           exclude=validation_rows(d.validation_fraction,
                                                                   d.path))
  distributed.check_same_on_all_processes("config and data", (config_json, train.digest))
  test = data_lib.load_split(d.path, "test", verify_checksum=d.verify_checksums,
                             feature_bounds=d.feature_bounds)
  if train.features.shape[1] != test.features.shape[1]:
    raise manifest_lib.ShardError(f"{d.path}: train has {train.features.shape[1]} features,"
                                  f" test {test.features.shape[1]}")
  return train, test, dev


def validation_rows(fraction: float, path: str | None = None
                    ) -> Callable[[np.ndarray], np.ndarray] | None:
  """``rows(ids) -> bool``: which global training rows are validation rows (None: none).

  The same hash rule as the train/test split (:func:`fastdp_jax.data.split.is_test_row`) with
  :data:`VALIDATION_SEED`, applied to each row's key (its content and occurrence, stored in
  its shard), so that removing one row moves no other between training and validation; a row
  whose shard holds no keys (an original ``.h5`` file, a dataset written before rows had
  keys, a canary shard) by its row number. Every process reads the same keys: the same rows.

  Args:
    fraction: ``data.validation_fraction``.
    path: the dataset (None: by row number).
  """
  if not fraction:
    return None
  keys = _train_row_keys(path) if path is not None else None
  if keys is None:
    return lambda ids: split_lib.is_test_row(ids, seed=VALIDATION_SEED,
                                             test_fraction=float(fraction))
  return lambda ids: split_lib.is_test_row(keys[np.asarray(ids, np.int64)],
                                           seed=VALIDATION_SEED, test_fraction=float(fraction))


def _train_row_keys(path: str) -> np.ndarray | None:
  """[train rows] the key of each training row, in row order: its stored row key, or its row
  number where its shard holds none (None: no shard holds keys, or not a dataset directory).
  8 bytes a row, read once per run."""
  if not os.path.isdir(path):
    return None
  keys, base, any_keys = [], 0, False
  for info in manifest_lib.read_manifest(path).shards_of("train"):
    k = data_lib.read_row_keys(path, info)
    any_keys |= k is not None
    keys.append(np.arange(base, base + info.rows, dtype=np.uint64) if k is None else k)
    base += info.rows
  return np.concatenate(keys) if any_keys else None


def _load_validation(d: config_lib.DataSettings, given: bool) -> data_lib.Split | None:
  """The validation rows (every process reads all of them, a chunk at a time), or None.

  Raises:
    ConfigError: with ``data.batches`` (materialised batches are drawn from every training
      row) or with data given in memory.
  """
  rule = validation_rows(d.validation_fraction, None if given else d.path)
  if rule is None:
    return None
  if d.batches or given:
    raise errors.ConfigError("data.validation_fraction needs the training rows read from "
                             "data.path (not data.batches or data given in memory); unset it")
  if not os.path.isdir(d.path):
    full = data_lib.load_split(d.path, "train", feature_bounds=d.feature_bounds)
    keep = rule(np.arange(len(full)))
    return full.take(keep)
  total = manifest_lib.read_manifest(d.path).rows("train")
  parts = []
  for lo in range(0, total, 1 << 20):  # bounded memory: one chunk and the validation rows
    hi = min(total, lo + (1 << 20))
    chunk = data_lib.load_split(d.path, "train", rows=(lo, hi),
                                verify_checksum=False,  # the training load verified them
                                feature_bounds=d.feature_bounds)
    keep = rule(np.arange(lo, hi))
    parts.append(chunk.take(keep))
  if not parts:
    return None
  keys = [p.row_keys for p in parts]
  return dataclasses.replace(parts[0], features=np.concatenate([p.features for p in parts]),
                             labels=np.concatenate([p.labels for p in parts]),
                             row_keys=None if any(k is None for k in keys) else
                             np.concatenate(keys))


def task_of(m: config_lib.ModelSettings, train: data_lib.Split
            ) -> tuple[models.TaskHead, tuple[models.EmbeddingInput, ...]]:
  """The model's task head and embedding inputs, from the manifest (via the split).

  Raises:
    ConfigError: ``model.task`` contradicts the manifest's task.
  """
  task = train.task
  if m.task is not None and m.task != task.kind:
    raise errors.ConfigError(f"model.task={m.task!r} contradicts the dataset's task "
                             f"{task.kind!r} (its manifest.json); unset model.task")
  head = models.TaskHead(kind=task.kind, num_classes=len(task.classes), bounds=task.bounds,
                         huber_delta=m.huber_delta if task.kind == "regression" else None)
  return head, models.embedding_inputs(train.feature_names, train.embeddings, m.embedding_dim)


def _load_streamed(d: config_lib.DataSettings, membership_rows: int, config_json: str):
  """Bounded samples of the training and test rows (attacks, membership inference) and N."""
  manifest = manifest_lib.read_manifest(d.path)
  n, n_test = manifest.rows("train"), manifest.rows("test")
  sample = max(1, d.attack_rows, membership_rows)
  kw: dict[str, Any] = dict(verify_checksum=d.verify_checksums,
                            feature_bounds=d.feature_bounds)
  lo, hi = data_lib.process_row_ranges(n, parallel.devices_per_process(parallel.make_mesh()))[
      jax.process_index()]
  train = data_lib.load_split(d.path, "train", rows=(lo, min(hi, lo + sample)), **kw)
  test = data_lib.load_split(d.path, "test", rows=(0, min(n_test, sample)), **kw)
  distributed.check_same_on_all_processes("config and data", (config_json, train.digest))
  return train, test, n


def open_stream(rc: config_lib.RunConfig, plan: plan_lib.PrivacyPlan
                ) -> batch_stream.BatchStream:
  """The materialised batches of ``data.batches``, verified, and refused unless they are this
  run's (dataset, batch size, epochs, q and the number of updates; for a unit dataset, unit
  batches of its k drawn from its U units: :func:`batch_stream.dataset_identity`)."""
  if rc.dp.overflow_probability is not None:
    raise errors.ConfigError("dp.overflow_probability is fixed by the batches' capacity with "
                             "data.batches; unset it (or rewrite the batches)")
  expected = dict(batch_stream.dataset_identity(rc.data.path), batch_size=rc.batch_size,
                  epochs=rc.num_epochs, sampling_rate=plan.sampling_rate,
                  total_updates=plan.total_steps)
  # The dataset's rule checks every real row as it is read, as _load_data checks the rows it
  # holds: the batches' digests say which rows a shard holds, not that they are sound.
  return batch_stream.open_batches(rc.data.batches, expected=expected, dataset=rc.data.path,
                                   feature_bounds=rc.data.feature_bounds)


def _attack_index(column: str, train: data_lib.Split) -> int | None:
  """The model-inversion attack's column (None, logged, when the data has no such column)."""
  if column and column in train.feature_names:
    return train.feature_names.index(column)
  if column:
    logging.info("model-inversion attack skipped: no column %r in the data", column)
  return None

"""The Spark job that materialises Poisson batches: dataset -> batch shards of fixed capacity.

Runs on a laptop (Spark local mode) and unchanged on a cluster::

  python -m preprocessing.poisson_batches --dataset data/capums --output data/capums-b1024 \
      --batch-size 1024 --epochs 10 [--sampling-seed S] [--master local[2]]
  PYSPARK_PYTHON=.venv/bin/python spark-submit preprocessing/poisson_batches.py --dataset ...
  # bounded disk: one block of epochs at a time, into the same directory (same key)
  python -m preprocessing.poisson_batches ... --first-epoch 0 --num-epochs-block 2
  python -m preprocessing.poisson_batches ... --first-epoch 2 --num-epochs-block 2

What it does (the format is :mod:`fastdp_jax.data.batch_format`'s):

1. **Plan** (driver, before Spark starts): reads the dataset manifest; N = its training rows,
   q = B / N, T = E * max(1, round(N / B)) updates (``fastdp_jax.train.plan_privacy``'s
   convention), capacity = ``sampling.capacity_for(N, q, p)`` with p = ``--overflow-probability``
   (default ``automatic_overflow_probability(default_delta(N), T, 1)``). The key: 128 bits of
   OS entropy, ``--sampling-seed`` (reproducible, public: no privacy), or, when a block is
   appended, the directory's own key. Refuses an existing output, a block that exists or
   overlaps one, a run that differs from the directory's, and a block larger than the free
   disk space.
2. **Inclusions** (``mapInArrow``, one task per piece of a train shard): each task reads its
   global row range with h5py (checking the shard's sha256 once per shard, every feature
   against the declared bounds and every label against the manifest's task), evaluates
   ``sampling.inclusions`` for its rows and the block's updates, and emits, per output shard,
   one record holding the included rows' update, row id, label (float32, any task) and
   features.
3. **Batches** (``groupBy(shard).applyInPandas``): each group orders its rows by (update,
   row id) and writes the shard ``updates-UUUUUUUUU.h5`` (K updates x capacity slots, masked),
   or reports an overflow (an update with more rows than the capacity) or a write error.
4. **Commit** (driver): any overflow or write error fails the job; shards that no row fell in
   are written empty; ``block.json`` is written last and the staging directory renamed into
   place. A failed or killed job leaves only a hidden ``.NAME.staging-*`` directory.

Privacy units: a unit dataset's UNITS are sampled, as the trainer samples them in memory
(:mod:`preprocessing.poisson_units`): N = U, its training units, q = B / U, the sampled
units' kept rows (at most k = ``max_rows_per_unit``, chosen by ``units.group``) are packed
contiguously with an int8 mask marking each unit's first row, the capacity counts rows (a
Chernoff bound from the units' sizes), and ``batches.json`` records k; the batches equal the
in-memory run's (one device) for the same key.

Disk: the block takes about (its updates) x capacity x (4 F + 5) bytes, i.e. about epochs x
the training rows in float32 plus the capacity's headroom over B. The output is as private as
the dataset (it holds its rows, and the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script (spark-submit preprocessing/poisson_batches.py)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from fastdp_jax import atomic  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import batch_format as bf  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import shards as data_lib  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
from fastdp_jax import errors  # pylint: disable=g-import-not-at-top
from fastdp_jax.dp import release  # pylint: disable=g-import-not-at-top
from fastdp_jax.dp import sampling  # pylint: disable=g-import-not-at-top
from preprocessing import output as output_lib  # pylint: disable=g-import-not-at-top
from preprocessing import poisson_units  # pylint: disable=g-import-not-at-top
from preprocessing.output import PipelineError  # pylint: disable=g-import-not-at-top

DEFAULT_SHARD_BYTES = 64 << 20  # target size of one batch shard (sets K by default)
_PIECE_BYTES = 64 << 20  # features one task reads at most
_INCLUSIONS_PER_CHUNK = 1 << 20  # inclusions one task holds at a time


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobPlan:
  """Everything the job needs, decided on the driver before Spark starts.

  Attributes:
    dataset: the dataset directory.
    output: the batch directory (absolute).
    run: the run manifest (new, or the existing directory's when appending).
    append: True to add a block to an existing batch directory.
    first_epoch, end_epoch: the block's epochs ``[first_epoch, end_epoch)``.
    updates_per_shard: K.
    rows_per_task: rows of a train shard one Spark task reads; None: about 3 tasks per
      core of the session (decided by :func:`run_job`).
    overwrite: replace the existing output (the whole directory, or the block when appending).
  """

  dataset: str
  output: str
  run: bf.RunInfo
  append: bool
  first_epoch: int
  end_epoch: int
  updates_per_shard: int
  rows_per_task: int | None
  overwrite: bool
  key: np.ndarray = dataclasses.field(repr=False)  # secret: never printed
  # A unit dataset's grouping (None: row-level); shipped to the tasks as a broadcast.
  units: poisson_units.UnitRows | None = dataclasses.field(default=None, repr=False)

  @property
  def block(self) -> str:
    return bf.block_name(self.first_epoch, self.end_epoch)

  @property
  def first_update(self) -> int:
    return self.first_epoch * self.run.steps_per_epoch

  @property
  def end_update(self) -> int:
    return self.end_epoch * self.run.steps_per_epoch

  @property
  def num_shards(self) -> int:
    return -(-(self.end_update - self.first_update) // self.updates_per_shard)

  def shard_range(self, j: int) -> tuple[int, int]:
    first = self.first_update + j * self.updates_per_shard
    return first, min(self.end_update, first + self.updates_per_shard)

  def block_bytes(self) -> int:
    """Disk bytes of the block's shards (HDF5 overhead aside)."""
    return ((self.end_update - self.first_update) * self.run.capacity
            * bf.bytes_per_slot(self.run.num_features))


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise PipelineError(f"{name}={value!r} must be a positive integer")
  return int(value)


def _train_manifest(dataset: str) -> manifest_lib.Manifest:
  """The dataset's manifest, checked for what the job needs (train rows, declared bounds)."""
  if not os.path.isdir(dataset):
    raise FileNotFoundError(f"dataset {dataset} does not exist (a directory written by "
                            "preprocessing.spark_job or synthesize --output-shards)")
  m = manifest_lib.read_manifest(dataset)
  if m.rows("train") == 0:
    raise PipelineError(f"{dataset}: no training rows")
  manifest_lib.resolve_bounds(m.feature_bounds, None, m.num_features,
                              f"{dataset} (a manifest without feature_bounds)")
  seen: dict[str, str] = {}
  for info in m.shards:  # one file listed under two names would count its rows twice
    real = os.path.realpath(data_lib.shard_path(dataset, info))
    if real in seen:
      raise manifest_lib.ShardError(f"shard {info.file}: the same file as shard {seen[real]}")
    seen[real] = info.file
  return m


def derive_run(manifest: manifest_lib.Manifest, *, batch_size: int, epochs: int,
               overflow_probability: float | None, key: np.ndarray,
               sampling_fixed: bool, num_units: int | None = None,
               unit_counts: np.ndarray | None = None) -> bf.RunInfo:
  """The run manifest a (dataset, B, E, p, key) gives: q, T and the capacity.

  With ``num_units`` (a unit dataset's U), N = U and the capacity counts the rows of the
  units sampled: a Chernoff bound from ``unit_counts``, the exact unit-size histogram
  (:meth:`poisson_units.UnitRows.size_counts`).
  """
  n = manifest.rows("train") if num_units is None else num_units
  k = int(manifest.max_rows_per_unit) if num_units is not None else None
  what = "rows" if k is None else "units"
  if batch_size > n:
    raise PipelineError(f"--batch-size {batch_size} exceeds the {n} training {what} (q = B / "
                        "N must be at most 1)")
  q = batch_size / n
  spe = max(1, round(n / batch_size))
  total = epochs * spe
  if overflow_probability is None:
    overflow_probability = sampling.automatic_overflow_probability(
        release.default_delta(n), total, 1)
  if not 0 < overflow_probability < 1:
    raise PipelineError(f"--overflow-probability {overflow_probability} must be in (0, 1)")
  units: dict[str, Any] = {} if k is None else dict(
      max_rows_per_unit=k,
      slot_order=bf.UNIT_SLOT_ORDER,
      inclusion=("fastdp_jax.dp.sampling.inclusions with each UNIT's key as its counter: unit"
                 " u is in update t iff t is a partial sum of its Geometric(q) gaps"))
  return bf.RunInfo(**units,
      format_version=bf.FORMAT_VERSION, dataset_digest=manifest.digest(), num_examples=n,
      batch_size=batch_size, epochs=epochs, steps_per_epoch=spe, total_updates=total,
      sampling_rate=q, expected_batch_size=q * n,
      capacity=(sampling.capacity_for(n, q, overflow_probability) if k is None else
                sampling.row_capacity_for(unit_counts, q, overflow_probability)),
      overflow_probability=float(overflow_probability),
      feature_names=tuple(manifest.feature_names), label_name=manifest.label_name,
      sampling_fixed=bool(sampling_fixed), key_commitment=bf.key_commitment(key))


def _epoch_range(epochs: int, first_epoch: int | None,
                 num_epochs_block: int | None) -> tuple[int, int]:
  """``(first, count)``: the block's epochs, checked to lie inside the run's."""
  first = 0 if first_epoch is None else int(first_epoch)
  count = epochs - first if num_epochs_block is None else _positive_int(num_epochs_block,
                                                                         "--num-epochs-block")
  if not 0 <= first < epochs or first + count > epochs or count < 1:
    raise PipelineError(f"epochs [{first}, {first + count}) (--first-epoch, --num-epochs-block)"
                        f" must lie inside the run's {epochs} epochs")
  return first, count


def _local_paths(dataset: str, output: str) -> tuple[str, str]:
  """``(dataset, output)`` as absolute local paths that do not contain each other."""
  if not output_lib.is_local(output):
    raise PipelineError(f"--output {output}: shards are written with h5py, so the output must "
                        "be a path on a (shared) POSIX file system, not a URI")
  dataset = os.path.abspath(output_lib.local_path(dataset))
  out = os.path.abspath(output_lib.local_path(output))
  if os.path.commonpath([out, dataset]) in (out, dataset):
    raise PipelineError(f"--output {out} and --dataset {dataset} must not contain each other")
  return dataset, out


def _is_append(out: str, blocked: bool, overwrite: bool) -> bool:
  """Whether the job adds a block to an existing batch directory; refuses to replace anything
  else (or anything at all without ``overwrite``)."""
  exists = os.path.lexists(out)
  is_batches = os.path.isfile(os.path.join(out, bf.RUN_MANIFEST))
  append = blocked and exists and is_batches
  if exists and not append:
    if not overwrite:
      raise FileExistsError(f"output {out} exists; pass --overwrite to replace it"
                            + ("" if is_batches or not blocked else
                               " (it is not a batch directory, so no block can be added)"))
    if not os.path.isdir(out) or (os.listdir(out) and not is_batches):
      raise PipelineError(f"refusing to replace {out}: it is not a batch directory (no "
                          f"{bf.RUN_MANIFEST}); remove it yourself or choose another --output")
  return append


def _existing_run(out: str, manifest: manifest_lib.Manifest, *, batch_size: int, epochs: int,
                  sampling_seed: int | None, overflow_probability: float | None,
                  num_units: int | None = None, unit_counts: np.ndarray | None = None
                  ) -> tuple[bf.RunInfo, np.ndarray]:
  """``(run, key)`` of the batch directory ``out``, refused unless this job's run is its run."""
  existing = bf.read_run(out)
  key, fixed = bf.read_key(out)
  if sampling_seed is not None and bf.key_commitment(
      sampling.sampling_key(sampling_seed)[0]) != existing.key_commitment:
    raise bf.BatchMismatchError(f"{out}: --sampling-seed {sampling_seed} is not the seed of "
                                "this directory's key; omit it to use the directory's key")
  wanted = derive_run(manifest, batch_size=batch_size, epochs=epochs,
                      overflow_probability=overflow_probability, key=key, sampling_fixed=fixed,
                      num_units=num_units, unit_counts=unit_counts)
  # The directory's overflow probability holds unless one was asked for explicitly.
  if overflow_probability is None:
    wanted = dataclasses.replace(wanted, overflow_probability=existing.overflow_probability,
                                 capacity=existing.capacity)
  diffs = [f"{f.name}={getattr(existing, f.name)!r} (asked {getattr(wanted, f.name)!r})"
           for f in dataclasses.fields(bf.RunInfo) if f.name != "digest"
           and getattr(existing, f.name) != getattr(wanted, f.name)]
  if diffs:
    raise bf.BatchMismatchError(f"{out} was made for another run: " + "; ".join(diffs)
                                + "; write this run's batches to another --output")
  return existing, key


def _check_new_block(out: str, first: int, count: int, overwrite: bool) -> None:
  """Refuses a block whose epochs overlap another block of ``out``, or that exists."""
  name = bf.block_name(first, first + count)
  for other in os.listdir(out):
    epochs_of = bf.parse_block_name(other)
    if epochs_of is None or other == name:
      continue
    a, b = epochs_of
    if a < first + count and first < b:
      raise PipelineError(f"epochs [{first}, {first + count}) overlap block {other} of {out}"
                          "; delete it first or choose other epochs")
  if os.path.lexists(os.path.join(out, name)) and not overwrite:
    raise FileExistsError(f"block {os.path.join(out, name)} exists; pass --overwrite to "
                          "replace it")


def plan_job(dataset: str, output: str, *, batch_size: int, epochs: int,
             sampling_seed: int | None = None, first_epoch: int | None = None,
             num_epochs_block: int | None = None, updates_per_shard: int | None = None,
             overflow_probability: float | None = None, overwrite: bool = False,
             rows_per_task: int | None = None) -> JobPlan:
  """Checks the arguments, the dataset and the output; decides the run and the block.

  Raises:
    FileNotFoundError: no dataset.
    FileExistsError: the output (or, when appending, the block) exists without overwrite.
    BatchMismatchError: appending to a directory made for another run.
    PipelineError: bad arguments, or not enough free disk for the block.
  """
  batch_size = _positive_int(batch_size, "--batch-size")
  epochs = _positive_int(epochs, "--epochs")
  if sampling_seed is not None and (isinstance(sampling_seed, bool)
                                    or not isinstance(sampling_seed, (int, np.integer))):
    raise PipelineError(f"--sampling-seed={sampling_seed!r} must be an integer")
  blocked = first_epoch is not None or num_epochs_block is not None
  first, count = _epoch_range(epochs, first_epoch, num_epochs_block)
  dataset, out = _local_paths(dataset, output)
  manifest = _train_manifest(dataset)
  append = _is_append(out, blocked, overwrite)
  units = None
  if manifest.privacy_unit:  # the units' grouping, as the trainer's loader makes it
    units = poisson_units.unit_rows(dataset, manifest, max(1024, _PIECE_BYTES // (
        4 * manifest.num_features)))
  num_units = None if units is None else units.num_units
  counts = None if units is None else units.size_counts()
  if append:
    run, key = _existing_run(out, manifest, batch_size=batch_size, epochs=epochs,
                             sampling_seed=sampling_seed,
                             overflow_probability=overflow_probability, num_units=num_units,
                             unit_counts=counts)
    _check_new_block(out, first, count, overwrite)
  else:
    key, fixed = sampling.sampling_key(sampling_seed)
    run = derive_run(manifest, batch_size=batch_size, epochs=epochs,
                     overflow_probability=overflow_probability, key=key, sampling_fixed=fixed,
                     num_units=num_units, unit_counts=counts)
  run = bf.RunInfo.from_json(run.to_json(), "run")  # fills in the digest
  slot = bf.bytes_per_slot(run.num_features)
  if updates_per_shard is None:
    updates_per_shard = max(1, DEFAULT_SHARD_BYTES // (run.capacity * slot))
  k = min(_positive_int(updates_per_shard, "--updates-per-shard"), count * run.steps_per_epoch)
  if rows_per_task is not None:
    rows_per_task = _positive_int(rows_per_task, "--rows-per-task")
  plan = JobPlan(dataset=dataset, output=out, run=run, append=append, first_epoch=first,
                 end_epoch=first + count, updates_per_shard=k, rows_per_task=rows_per_task,
                 overwrite=overwrite, key=key, units=units)
  _check_free_space(plan)
  return plan


def _check_free_space(plan: JobPlan) -> None:
  where = plan.output if plan.append else os.path.dirname(plan.output)
  while not os.path.isdir(where):
    where = os.path.dirname(where)
  need = plan.block_bytes() + plan.num_shards * 16384  # HDF5 headers
  free = shutil.disk_usage(where).free
  if need > free:
    raise PipelineError(
        f"the block needs about {need / 1e9:.3g} GB ({plan.end_update - plan.first_update} "
        f"updates x capacity {plan.run.capacity} x {bf.bytes_per_slot(plan.run.num_features)} "
        f"bytes), {free / 1e9:.3g} GB free on {where}; write fewer epochs at a time "
        "(--first-epoch/--num-epochs-block) or free space")


# ---------------------------------------------------------------------------------------------
# Executor side.

def _encode(updates: np.ndarray, rows: np.ndarray, labels: np.ndarray,
            features: np.ndarray) -> bytes:
  """One record of the shuffle: n inclusions (update offset, row id, label, features).

  Labels travel as float32 for every task: 0/1 and class indices (< 2**24) are exact, and a
  regression label is float32 in the dataset already.
  """
  return b"".join([np.int64(len(rows)).tobytes(), updates.astype("<i4").tobytes(),
                   rows.astype("<i8").tobytes(), labels.astype("<f4").tobytes(),
                   features.astype("<f4").tobytes()])


def _decode(payload: bytes, num_features: int):
  n = int(np.frombuffer(payload, "<i8", 1)[0])
  at = 8
  out = []
  for dtype, width in (("<i4", 1), ("<i8", 1), ("<f4", 1), ("<f4", num_features)):
    a = np.frombuffer(payload, dtype, n * width, at)
    at += a.nbytes
    out.append(a.reshape(n, num_features) if width > 1 else a)
  return out


def _inclusion_task(plan: JobPlan, pieces: list[tuple[manifest_lib.ShardInfo, int, int, int, bool]],
                    bounds: manifest_lib.Bounds, task: manifest_lib.Task,
                    embeddings: tuple[manifest_lib.Embedding, ...] = (),
                    units: Callable[[], poisson_units.UnitRows] | None = None):
  """The mapInArrow function: piece ids -> (shard index, payload) records.

  Every row read is checked as the loader checks it: features against ``bounds``, labels
  against ``task`` and embedding ids against ``embeddings`` (the dataset manifest's). With
  ``units`` (a unit dataset's grouping), a row is in every update its unit is in, and travels
  with its slot id ``u * k + j`` in place of its row id (a dropped row never travels).
  """
  key, q, names = plan.key, plan.run.sampling_rate, plan.run.feature_names
  u0, u1, k = plan.first_update, plan.end_update, plan.updates_per_shard
  expected = max(q * u1, 1e-12)  # inclusions per row before the block's end
  sub_rows = int(max(1, min(1 << 16, _INCLUSIONS_PER_CHUNK / expected)))

  def included(rows: np.ndarray, first: int):
    """``(ids, updates, positions in the piece)`` of the rows' inclusions."""
    if units is None:
      r, t = sampling.inclusions(key, rows, q, u1, start=u0)
      return r, t, r - first
    grouping = units()
    slot = grouping.slot[rows]
    kept = np.flatnonzero(slot >= 0)
    row_units = slot[kept] // grouping.k
    uu = np.unique(row_units)
    # The unit keys are the sampler's counters (fastdp_jax.unit_batches); inclusions takes
    # them as int64 and hashes the same 64 bits.
    counters = grouping.keys[uu].view(np.int64)
    c, t = sampling.inclusions(key, counters, q, u1, start=u0)
    by_counter = np.argsort(counters)
    unit_of = uu[by_counter[np.searchsorted(counters[by_counter], c)]]
    pos, t = poisson_units.rows_of_units(row_units, unit_of, t)
    return slot[kept][pos], t, rows[kept][pos] - first

  def run(batches):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    for batch in batches:
      for pid in batch.column(0).to_pylist():
        info, lo, hi, base, verify = pieces[pid]
        x, y = data_lib.read_shard(plan.dataset, info, start=lo, stop=hi,
                                   verify_checksum=verify)
        manifest_lib.check_values(x, y, bounds=bounds, feature_names=names, task=task,
                                  embeddings=embeddings, where=f"shard {info.file}", first_row=lo)
        for s in range(0, hi - lo, sub_rows):
          rows = np.arange(base + lo + s, base + min(hi, lo + s + sub_rows), dtype=np.int64)
          r, t, at = included(rows, base + lo)
          if not len(r):
            continue
          shard = (t - u0) // k
          order = np.argsort(shard, kind="stable")
          r, t, at, shard = r[order], t[order], at[order], shard[order]
          cuts = np.flatnonzero(np.diff(shard)) + 1
          ids, payloads = [], []
          for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(r)]):
            j = int(shard[a])
            local = at[a:b]
            ids.append(j)
            payloads.append(_encode(t[a:b] - (u0 + j * k), r[a:b], y[local], x[local]))
          yield pa.RecordBatch.from_arrays(
              [pa.array(ids, pa.int32()), pa.array(payloads, pa.binary())],
              names=["shard", "payload"])

  return run


def fill_shard(updates: np.ndarray, rows: np.ndarray, labels: np.ndarray,
               features: np.ndarray, num_updates: int, capacity: int):
  """Lays out one shard's inclusions: per update, rows by increasing global id, then padding.

  Args:
    updates: [n] update of each inclusion, relative to the shard's first update.
    rows: [n] global row ids; labels [n] (any task's, kept as float32); features [n, F].
    num_updates: k, the shard's updates.
    capacity: slots per update.

  Returns:
    ``(features [k, capacity, F], labels [k, capacity], mask [k, capacity], None)``, or
    ``(None, None, None, (update, count))`` for the first update over the capacity.
  """
  counts = np.bincount(updates, minlength=num_updates)
  if len(counts) and counts.max() > capacity:
    over = int(np.flatnonzero(counts > capacity)[0])
    return None, None, None, (over, int(counts[over]))
  order = np.lexsort((rows, updates))
  t = updates[order]
  starts = np.r_[0, np.cumsum(counts)[:-1]]
  slot = np.arange(len(t)) - starts[t]
  return poisson_units.scatter(features[order], labels[order], t, slot, num_updates, capacity)


def write_one_shard(block_dir: str, plan: JobPlan, j: int, payloads: Sequence[bytes]) -> tuple[
    str, str]:
  """Writes shard j of the block from its shuffle records; ``(kind, json body)`` to report.

  Kinds: ``shard`` (its :class:`ShardEntry`), ``overflow`` (update and count), ``error`` (a
  write failed, e.g. the disk is full; no partial file is left).
  """
  first, end = plan.shard_range(j)
  parts = [_decode(p, plan.run.num_features) for p in payloads]
  if not parts:
    parts = [_decode(_encode(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0),
                             np.zeros((0, plan.run.num_features))), plan.run.num_features)]
  updates, rows, labels, features = (np.concatenate(c) for c in zip(*parts))
  unit = plan.run.max_rows_per_unit
  if unit is None:
    f, lab, m, over = fill_shard(updates.astype(np.int64), rows, labels, features, end - first,
                                 plan.run.capacity)
  else:  # ``rows`` holds slot ids u * k + j
    f, lab, m, over = poisson_units.fill_unit_shard(
        updates.astype(np.int64), rows, labels, features, end - first,
        plan.run.capacity, unit)
  if over is not None:
    return "overflow", json.dumps({"update": first + over[0], "examples": over[1],
                                   "what": "examples" if unit is None else "unit rows"})
  try:
    entry = bf.write_shard(block_dir, first, f, lab, m)
  except OSError as e:
    return "error", json.dumps({"shard": bf.shard_name(first), "errno": e.errno,
                                "error": f"{type(e).__name__}: {e}"})
  return "shard", json.dumps(dataclasses.asdict(entry))


def _shard_task(block_dir: str, plan: JobPlan):
  """The applyInPandas function: one shard's records -> one (kind, body) row."""

  def run(pdf):
    import pandas as pd  # pylint: disable=g-import-not-at-top
    j = int(pdf["shard"].iloc[0])
    kind, body = write_one_shard(block_dir, plan, j, pdf["payload"].tolist())
    return pd.DataFrame({"kind": [kind], "body": [body]})

  return run


# ---------------------------------------------------------------------------------------------
# Driver side.

def _pieces(manifest: manifest_lib.Manifest, rows_per_task: int):
  """(shard, lo, hi, global id of the shard's row 0, verify sha256) for every task.

  Pieces never cross a shard's end; the first piece of each shard checks its sha256.
  """
  out, base = [], 0
  for info in manifest.shards_of("train"):
    for lo in range(0, info.rows, rows_per_task):
      out.append((info, lo, min(info.rows, lo + rows_per_task), base, lo == 0))
    base += info.rows
  return out


def _collect(df, what: str) -> list:
  try:
    return df.collect()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    for marker, cls in (("ShardError: ", manifest_lib.ShardError), ("UserError: ", PipelineError),
                        ("PipelineError: ", PipelineError)):
      if marker in text:
        raise cls(f"{what} failed: {text.split(marker, 1)[1].splitlines()[0]}") from e
    raise


def _write_block(spark, plan: JobPlan, block_dir: str) -> tuple[list[bf.ShardEntry], dict]:
  """The Spark part: every shard of the block into ``block_dir``; returns their entries."""
  manifest = manifest_lib.read_manifest(plan.dataset)
  if manifest.digest() != plan.run.dataset_digest:
    raise bf.BatchMismatchError(f"{plan.dataset} changed since the batch directory was made "
                                "(its manifest digest differs)")
  for info in manifest.shards_of("train"):  # empty shards have no task to check them
    if info.rows == 0:
      data_lib.read_shard(plan.dataset, info)
  rows_per_task = plan.rows_per_task or max(1024, min(
      _PIECE_BYTES // (4 * plan.run.num_features),
      math.ceil(plan.run.num_examples / (3 * spark.sparkContext.defaultParallelism))))
  pieces = _pieces(manifest, rows_per_task)
  bounds = manifest_lib.resolve_bounds(manifest.feature_bounds, None, manifest.num_features,
                                       plan.dataset)
  ids = spark.range(0, len(pieces), 1, numPartitions=len(pieces))
  units = None
  if plan.units is not None:  # shipped once per executor, not in every task's closure
    shared = spark.sparkContext.broadcast(plan.units)
    units = lambda: shared.value  # noqa: E731 - pickled into the tasks
  task_plan = dataclasses.replace(plan, units=None)
  check = _inclusion_task(task_plan, pieces, bounds, manifest.task, tuple(manifest.embeddings),
                          units)
  records = ids.mapInArrow(check, "shard int, payload binary")
  results = _collect(records.groupBy("shard").applyInPandas(
      _shard_task(block_dir, task_plan), "kind string, body string"),
      "materialising the batches")
  shards: dict[int, bf.ShardEntry] = {}
  failures, overflows = [], []
  for r in results:
    body = json.loads(r["body"])
    if r["kind"] == "error":
      failures.append(body)
    elif r["kind"] == "overflow":
      overflows.append(body)
    else:
      entry = bf.ShardEntry(**body)
      shards[entry.first_update] = entry
  if failures:
    f = min(failures, key=lambda b: b["shard"])
    full = f["errno"] in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    raise PipelineError(f"writing batch shard {f['shard']} failed: {f['error']}"
                        + ("; the disk (or a file size limit) is full: free space or write "
                           "fewer epochs at a time (--num-epochs-block)" if full else "")
                        + "; nothing was published")
  if overflows:
    o = min(overflows, key=lambda b: b["update"])
    cap = plan.run.capacity // plan.run.unit_size
    raise sampling.BatchOverflowError(
        f"update {o['update']}: {o['examples']} {o['what']} sampled, capacity "
        f"{cap}; lower --overflow-probability (now "
        f"{plan.run.overflow_probability:g}) and rerun; nothing was published")
  for j in range(plan.num_shards):  # shards no row fell in (rare: tiny q)
    first, _ = plan.shard_range(j)
    if first not in shards:
      kind, body = write_one_shard(block_dir, plan, j, [])
      if kind != "shard":
        raise PipelineError(f"writing empty batch shard {bf.shard_name(first)} failed: "
                            f"{json.loads(body)['error']}; nothing was published")
      shards[first] = bf.ShardEntry(**json.loads(body))
  entries = [shards[k] for k in sorted(shards)]
  if [e.first_update for e in entries] != [plan.shard_range(j)[0] for j in range(
      plan.num_shards)]:
    raise PipelineError(f"internal error: shards {[e.file for e in entries]} do not tile the "
                        f"block's updates [{plan.first_update}, {plan.end_update})")
  return entries, {"tasks": len(pieces), "rows_per_task": rows_per_task}


def run_job(spark, plan: JobPlan) -> tuple[bf.RunInfo, bf.BlockInfo]:
  """Runs a planned job on an existing SparkSession; returns the run and the new block.

  Raises:
    BatchOverflowError: an update drew more rows than the capacity (nothing published).
    PipelineError: a write failed (e.g. a full disk; nothing published) or a task failed.
    ShardError: a dataset shard does not match its manifest or its declared bounds.
  """
  t0 = time.perf_counter()
  out = plan.output
  if plan.append:
    staging = atomic.make_staging(os.path.join(out, plan.block))
    block_dir, target = staging, os.path.join(out, plan.block)
  else:
    staging = atomic.make_staging(out)
    block_dir, target = os.path.join(staging, plan.block), out
  try:
    if not plan.append:
      atomic.make_private_dir(staging)  # rows and the key: owner-only
      bf.write_key(staging, plan.key, plan.run.sampling_fixed)
      bf.write_json(os.path.join(staging, bf.RUN_MANIFEST), plan.run.to_json())
      os.makedirs(block_dir)
    entries, extra = _write_block(spark, plan, block_dir)
    block = bf.BlockInfo(
        name=plan.block, run_digest=plan.run.digest, first_epoch=plan.first_epoch,
        end_epoch=plan.end_epoch, first_update=plan.first_update, end_update=plan.end_update,
        shards=tuple(entries),
        extra={"producer": "preprocessing.poisson_batches", "updates_per_shard":
               plan.updates_per_shard,
               "spark": {"version": spark.version, "master": spark.sparkContext.master,
                         **extra}, "seconds": round(time.perf_counter() - t0, 2)})
    bf.write_json(os.path.join(block_dir, bf.BLOCK_MANIFEST), block.to_json())
    atomic.publish(staging, target, plan.overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return plan.run, bf.read_block(out, plan.block, plan.run)


def describe(plan: JobPlan, block: bf.BlockInfo, seconds: float) -> str:
  """The one-line account of a run of the job."""
  run = plan.run
  size = sum(s.bytes for s in block.shards)
  key = ("fixed by --sampling-seed: the batches are public, training from them is NOT private"
         if run.sampling_fixed else
         f"secret, in {os.path.join(plan.output, bf.PRIVATE_DIR, bf.KEY_FILE)}")
  return (f"{plan.output}/{block.name}: updates [{block.first_update}, {block.end_update}) of "
          f"{run.total_updates} (epochs {block.first_epoch}-{block.end_epoch} of {run.epochs}, "
          f"{run.steps_per_epoch}/epoch), q={run.sampling_rate:.6g}, capacity {run.capacity}"
          + ("" if run.max_rows_per_unit is None else
             f" row slots ({run.capacity // run.unit_size} units of k={run.unit_size})")
          + ", "
          f"{len(block.shards)} shards, {size / 1e6:.1f} MB; sampling key {key}; "
          f"{seconds:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m preprocessing.poisson_batches",
      description="Dataset -> materialised Poisson batches (see docs/data_pipeline.md)")
  p.add_argument("--dataset", required=True, help="dataset directory (manifest.json, shards)")
  p.add_argument("--output", required=True, help="batch directory to create or add a block to")
  p.add_argument("--batch-size", type=int, required=True, help="expected batch size B (units per update, for a unit dataset)")
  p.add_argument("--epochs", type=int, required=True, help="epochs E of the whole run")
  p.add_argument("--sampling-seed", type=int, default=None,
                 help="fix the sampling key (reproducible, public: no privacy); default: "
                 "128 bits of OS entropy")
  p.add_argument("--master", default=None,
                 help="Spark master; default: spark-submit's, else local[*]")
  p.add_argument("--updates-per-shard", type=int, default=None,
                 help="K, updates per batch shard (default: about 64 MB shards)")
  p.add_argument("--first-epoch", type=int, default=None,
                 help="write one block of epochs, starting here (appends to --output)")
  p.add_argument("--num-epochs-block", type=int, default=None,
                 help="epochs in the block (default: to the end)")
  p.add_argument("--overflow-probability", type=float, default=None,
                 help="per-update overflow probability (default: 1%% of default delta / T)")
  p.add_argument("--rows-per-task", type=int, default=None,
                 help="rows of a train shard per Spark task (default: about 3 tasks per core)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing batch directory (or the block, with --first-epoch)")
  p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                 help="extra Spark setting (repeatable)")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    plan = plan_job(args.dataset, args.output, batch_size=args.batch_size, epochs=args.epochs,
                    sampling_seed=args.sampling_seed, first_epoch=args.first_epoch,
                    num_epochs_block=args.num_epochs_block,
                    updates_per_shard=args.updates_per_shard,
                    overflow_probability=args.overflow_probability, overwrite=args.overwrite,
                    rows_per_task=args.rows_per_task)
    from fastdp_jax.data import spark as spark_lib  # pylint: disable=g-import-not-at-top
    conf = dict(kv.split("=", 1) for kv in args.conf)
    spark = spark_lib.create_session(args.master, app_name="fastdp-poisson-batches", conf=conf)
    _, block = run_job(spark, plan)
  except (errors.UserError, FileNotFoundError, FileExistsError) as e:  # one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  print(describe(plan, block, time.perf_counter() - t0))
  return 0


if __name__ == "__main__":
  sys.exit(main())

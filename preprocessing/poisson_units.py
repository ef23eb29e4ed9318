"""The privacy-unit side of the Poisson-batch job: the slots a unit dataset's rows take.

A unit dataset (its manifest names ``privacy_unit`` and the public bound k) is sampled by
UNIT, as the trainer samples it in memory (:mod:`fastdp_jax.unit_batches`): the training rows
are grouped and bounded with :func:`fastdp_jax.data.units.group` (at most k rows per unit,
chosen by a seeded rank of their content; units in ascending key order), unit u is in update
t by the inclusion function with the unit's KEY as its counter, and the sampled units' kept
rows are packed contiguously in ascending unit key (:data:`fastdp_jax.data.batch_format.
UNIT_SLOT_ORDER`: an int8 mask, 2 at a unit's first row, 1 at its further rows), the capacity
a Chernoff bound on the rows of a sample (:func:`fastdp_jax.dp.sampling.row_capacity_for`,
from the exact unit sizes). The materialised batches are then the in-memory run's batches on
one device; the reader repacks them for several devices and microbatches
(:func:`fastdp_jax.data.batch_stream.split_units_for_devices`).

The grouping needs every row's unit key and content key (16 bytes a row on the driver); the
features are read one piece at a time and dropped once hashed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fastdp_jax.data import batch_format as bf
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units as units_lib


@dataclasses.dataclass(frozen=True, eq=False)
class UnitRows:
  """Where every training row of a unit dataset goes.

  Attributes:
    keys: [U] uint64, ascending: unit u's key, its sampling counter.
    slot: [rows] int64 by global row id (train shards concatenated in manifest order):
      ``u * k + j`` for the row kept as row j of unit u, -1 for a row the bound drops.
    k: the bound, ``max_rows_per_unit``.
  """

  keys: np.ndarray
  slot: np.ndarray
  k: int

  @property
  def num_units(self) -> int:
    return int(self.keys.shape[0])

  def size_counts(self) -> np.ndarray:
    """[k + 1] the exact unit-size histogram: ``counts[s]`` units of s kept rows (it fixes
    the row capacity, :func:`fastdp_jax.dp.sampling.row_capacity_for`)."""
    kept = self.slot[self.slot >= 0] // self.k
    sizes = np.bincount(kept, minlength=self.num_units)
    return np.bincount(sizes, minlength=self.k + 1)


def unit_rows(dataset: str, manifest: manifest_lib.Manifest, piece_rows: int) -> UnitRows:
  """Groups and bounds a unit dataset's training rows as the in-memory loader does.

  Args:
    dataset: the dataset directory.
    manifest: its manifest (naming ``privacy_unit`` and ``max_rows_per_unit``).
    piece_rows: rows read at a time (each shard's first piece verifies its sha256).

  Raises:
    ShardError: a shard that does not match the manifest, or carries no unit keys.
  """
  k = int(manifest.max_rows_per_unit or 0)
  unit_parts, row_parts = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
  for info in manifest.shards_of("train"):
    for lo in range(0, info.rows, piece_rows):
      hi = min(info.rows, lo + piece_rows)
      x, y = data_lib.read_shard(dataset, info, start=lo, stop=hi, verify_checksum=lo == 0)
      row_parts.append(units_lib.row_content_keys(x, y))
      unit_parts.append(data_lib.read_unit_keys(dataset, info, start=lo, stop=hi))
  unit_keys, row_keys = np.concatenate(unit_parts), np.concatenate(row_parts)
  g = units_lib.group(unit_keys, row_keys, k)
  sizes = np.diff(g.offsets)
  unit_of = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
  j = np.arange(len(g.order), dtype=np.int64) - np.repeat(g.offsets[:-1], sizes)
  slot = np.full(unit_keys.shape[0], -1, np.int64)
  slot[g.order] = unit_of * k + j
  return UnitRows(keys=unit_keys[g.order[g.offsets[:-1]]], slot=slot, k=k)


def rows_of_units(row_units: np.ndarray, units: np.ndarray, updates: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Every (row, update) whose row's unit is in that update.

  Args:
    row_units: [n] the unit of each row of a piece.
    units, updates: [m] the (unit, update) inclusions of the piece's units.

  Returns:
    ``(rows, updates)``: positions into ``row_units``, and the update of each.
  """
  order = np.argsort(row_units, kind="stable")
  sorted_units = row_units[order]
  lo = np.searchsorted(sorted_units, units, "left")
  counts = np.searchsorted(sorted_units, units, "right") - lo
  which = np.repeat(np.arange(len(units)), counts)
  within = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
  return order[lo[which] + within], updates[which]


def fill_unit_shard(updates: np.ndarray, slots: np.ndarray, labels: np.ndarray,
                    features: np.ndarray, num_updates: int, capacity: int, k: int):
  """Lays out one shard's rows: per update, its units' kept rows packed in ascending key.

  Args:
    updates: [n] update of each row, relative to the shard's first update.
    slots: [n] ``u * k + j`` of each row (:attr:`UnitRows.slot`).
    labels: [n] float32; features [n, F].
    num_updates: the shard's updates.
    capacity: row slots per update.
    k: the bound.

  Returns:
    ``(features [K, capacity, F], labels [K, capacity], mask [K, capacity] int8, None)``
    (mask 2 at a unit's first row, 1 at its further rows, 0 for padding), or
    ``(None, None, None, (update, rows))`` for the first update over the capacity.
  """
  order = np.lexsort((slots, updates))  # by update, then unit, then the row's rank in it
  t, s = updates[order], slots[order]
  counts = np.bincount(t, minlength=num_updates)
  if len(counts) and counts.max() > capacity:
    over = int(np.flatnonzero(counts > capacity)[0])
    return None, None, None, (over, int(counts[over]))
  position = np.arange(len(t)) - np.r_[0, np.cumsum(counts)[:-1]][t]  # rank in its update
  marks = np.where(s % k == 0, bf.UNIT_FIRST, bf.UNIT_MORE).astype(np.int8)
  return scatter(features[order], labels[order], t, position, num_updates, capacity, marks)


def scatter(features: np.ndarray, labels: np.ndarray, updates: np.ndarray,
            slots: np.ndarray, num_updates: int, capacity: int,
            marks: np.ndarray | None = None):
  """The padded arrays of a shard: row i at ``[updates[i], slots[i]]``, the rest masked.

  Returns:
    ``(features [num_updates, capacity, F], labels [num_updates, capacity],
    mask [num_updates, capacity], None)``: mask bool, or int8 holding ``marks`` (a unit run).
  """
  f = np.zeros((num_updates, capacity, features.shape[1]), np.float32)
  lab = np.zeros((num_updates, capacity), np.float32)
  m = np.zeros((num_updates, capacity), bool if marks is None else np.int8)
  f[updates, slots] = features
  lab[updates, slots] = labels
  m[updates, slots] = True if marks is None else marks
  return f, lab, m, None

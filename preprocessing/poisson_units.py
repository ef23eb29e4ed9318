"""The privacy-unit side of the Poisson-batch job: the slots a unit dataset's rows take.

A unit dataset (its manifest names ``privacy_unit`` and the public bound k) is sampled by
UNIT, as the trainer samples it in memory (:mod:`fastdp_jax.unit_batches`): the training rows
are grouped and bounded with :func:`fastdp_jax.data.units.group` (at most k rows per unit,
chosen by a seeded rank of their content; units in ascending key order), unit u is in update
t by the inclusion function with the unit's KEY as its counter, and each sampled unit takes
k consecutive slots of its update: slot j of unit slot u at ``u * k + j``, masked beyond the
unit's kept rows. The materialised batches are then exactly the in-memory run's batches.

The grouping needs every row's unit key and content key (16 bytes a row on the driver); the
features are read one piece at a time and dropped once hashed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
                    features: np.ndarray, num_updates: int, unit_capacity: int, k: int):
  """Lays out one shard's rows: per update, its units in ascending key order, k slots each.

  Args:
    updates: [n] update of each row, relative to the shard's first update.
    slots: [n] ``u * k + j`` of each row (:attr:`UnitRows.slot`).
    labels: [n] float32; features [n, F].
    num_updates: the shard's updates.
    unit_capacity: unit slots per update (the row capacity is ``unit_capacity * k``).
    k: the bound.

  Returns:
    ``(features [K, capacity, F], labels [K, capacity], mask [K, capacity], None)``, or
    ``(None, None, None, (update, units))`` for the first update over the unit capacity.
  """
  order = np.lexsort((slots, updates))
  t, s = updates[order], slots[order]
  unit = s // k
  new = np.r_[True, (t[1:] != t[:-1]) | (unit[1:] != unit[:-1])] if len(t) else \
      np.zeros(0, bool)
  counts = np.bincount(t[new], minlength=num_updates)
  if len(counts) and counts.max() > unit_capacity:
    over = int(np.flatnonzero(counts > unit_capacity)[0])
    return None, None, None, (over, int(counts[over]))
  rank = np.cumsum(new) - 1 - np.r_[0, np.cumsum(counts)[:-1]][t]  # unit slot in its update
  position = rank * k + s % k
  return scatter(features[order], labels[order], t, position, num_updates, unit_capacity * k)


def scatter(features: np.ndarray, labels: np.ndarray, updates: np.ndarray,
            slots: np.ndarray, num_updates: int, capacity: int):
  """The padded arrays of a shard: row i at ``[updates[i], slots[i]]``, the rest masked.

  Returns:
    ``(features [num_updates, capacity, F], labels [num_updates, capacity],
    mask [num_updates, capacity], None)``.
  """
  f = np.zeros((num_updates, capacity, features.shape[1]), np.float32)
  lab = np.zeros((num_updates, capacity), np.float32)
  m = np.zeros((num_updates, capacity), bool)
  f[updates, slots] = features
  lab[updates, slots] = labels
  m[updates, slots] = True
  return f, lab, m, None

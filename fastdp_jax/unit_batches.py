"""Privacy units in memory: the training rows grouped by unit on the devices, and each
update's Poisson-sampled units turned into row slots.

A unit dataset (its manifest names ``privacy_unit`` and the public bound ``max_rows_per_unit``
k) is trained with user-level sampling (docs/privacy.md; ``PRIVACY_UNITS.md`` A1-A2): each
UNIT is in an update independently with probability q = batch_size / U, and contributes the
sum of its rows' gradients clipped to C as a whole, so adding or removing a whole unit moves
the clipped sum by at most C whatever its number of rows.

On load, the training rows are grouped and bounded (:func:`fastdp_jax.data.units.group`: at
most k rows per unit, each unit's rows contiguous, units in ascending key order); unit i is
the i-th unit of that order. The units are split over the devices in contiguous ranges, in
proportion to the devices, so that every row of a unit is on one device (its clipped sum
never crosses devices). The sampler (:class:`fastdp_jax.dp.sampling.PoissonSampler`) draws
units with the run's secret sampling key, as it draws rows in a row-level run, with the unit
KEY as each unit's counter: the inclusion of a unit in update t is a function of (sampling
key, unit key, t, q) alone, so 1 and N devices and a resumed run see the same batches, and
adding or removing a unit changes no other unit's. :func:`pack` lays each device's sampled
units' kept rows out contiguously (:data:`fastdp_jax.data.batch_format.UNIT_SLOT_ORDER`:
an int8 mask, 2 at a unit's first row, 1 at its further rows), no unit straddling a
microbatch. The capacity counts ROWS (:func:`row_capacity`): a Chernoff bound on the rows of
each device's sample from its exact unit sizes, so that a device's batch overflows with
probability at most the run's per-update, per-device p, and the overflow's term in delta
(``p T D``) stands as for rows; the sampler's unit capacity is that row capacity (a unit has
at least one row), so its own overflow can happen only with the rows'.

Materialised batches of a unit dataset (``preprocessing.poisson_batches``, ``data.batches``)
hold the same units packed the same way, drawn by the same rule: the streamed run equals this
one.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from fastdp_jax import parallel
from fastdp_jax.data import batch_format
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import sampling

@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """A dataset's privacy unit, from its manifest: the unit's columns and the bound k."""

  columns: tuple[str, ...]
  max_rows: int


def unit_spec(path: str) -> UnitSpec | None:
  """The privacy unit of the dataset at ``path`` (None: a row-level dataset, or an original
  ``.h5`` file, which has no manifest)."""
  if not os.path.isdir(path):
    return None
  m = manifest_lib.read_manifest(path)
  if not m.privacy_unit:
    return None
  return UnitSpec(columns=tuple(m.privacy_unit), max_rows=int(m.max_rows_per_unit or 0))


def unit_bounds(num_units: int, mesh: jax.sharding.Mesh) -> np.ndarray:
  """[num_devices + 1] global unit offsets: the same split of units over processes and
  devices as of rows in a row-level run (:func:`fastdp_jax.parallel.device_bounds`)."""
  counts = parallel.devices_per_process(mesh)
  ranges = data_lib.process_row_ranges(num_units, counts)
  bounds, _ = parallel.device_bounds([hi - lo for lo, hi in ranges], counts)
  return bounds


def place_units(mesh: jax.sharding.Mesh, train: data_lib.Split, k: int
                ) -> tuple[data_lib.Split, parallel.DeviceData]:
  """Groups and bounds the training rows by unit and places each device's units on it.

  Every process holds the whole grouped split (the unit dataset is in memory) and places its
  own devices' blocks; the grouping is a function of the rows alone, so every process agrees.

  Args:
    mesh: the ``data`` mesh.
    train: the training rows (validation units already removed), with ``unit_keys``.
    k: ``max_rows_per_unit``, the public bound.

  Returns:
    ``(grouped, device_data)``: the kept rows in unit order (each unit's rows contiguous) and
    the :class:`~fastdp_jax.parallel.DeviceData` whose ``num_examples`` is U, the number of
    training units, and whose ``units`` says where each unit is.

  Raises:
    ShardError: the train shards carry no unit keys.
  """
  if train.unit_keys is None:
    raise manifest_lib.ShardError(
        "the dataset's manifest names privacy_unit but its train shards carry no unit_keys; "
        "write the dataset again with this version")
  grouping = units_lib.group(train.unit_keys,
                             units_lib.row_content_keys(train.features, train.labels), k)
  order, offsets = np.asarray(grouping.order), np.asarray(grouping.offsets, np.int64)
  grouped = dataclasses.replace(train, features=train.features[order],
                                labels=train.labels[order], unit_keys=train.unit_keys[order])
  num_units = len(offsets) - 1
  ub = unit_bounds(num_units, mesh)
  rb = offsets[ub]  # each device's rows: those of its units
  device_of_unit = np.searchsorted(ub, np.arange(num_units), side="right") - 1
  layout = parallel.UnitLayout(unit_size=int(k), unit_bounds=ub,
                               starts=offsets[:-1] - rb[device_of_unit],
                               sizes=np.diff(offsets), keys=grouped.unit_keys[offsets[:-1]])
  counts = parallel.devices_per_process(mesh)
  first = sum(counts[:jax.process_index()])
  lo, hi = int(rb[first]), int(rb[first + counts[jax.process_index()]])
  dev = parallel.place_blocks(mesh, grouped.features[lo:hi], grouped.labels[lo:hi], rb,
                              offset=lo, num_examples=num_units, units=layout)
  return grouped, dev


def size_counts(layout: parallel.UnitLayout) -> np.ndarray:
  """[devices, k + 1] each device's exact unit-size histogram (units of s kept rows)."""
  k, bounds = layout.unit_size, layout.unit_bounds
  device = np.searchsorted(bounds, np.arange(len(layout.sizes)), side="right") - 1
  counts = np.zeros((len(bounds) - 1, k + 1), np.int64)
  np.add.at(counts, (device, np.asarray(layout.sizes, np.int64)), 1)
  return counts


def row_capacity(layout: parallel.UnitLayout, sampling_rate: float,
                 overflow_probability: float, block: int | None) -> tuple[int, int]:
  """``(rows, capacity)``: the rows a device's sample exceeds with probability at most p, and
  the row slots per device that always hold that many packed (:func:`pack`).

  ``rows`` is the largest over the devices of :func:`fastdp_jax.dp.sampling.row_capacity_for`
  on each one's exact unit sizes (a function of the private data, like the row-level
  capacity: unpublished, docs/privacy.md). With microbatches of ``block`` rows the capacity
  is whole blocks, enough for next-fit packing of any sample of at most ``rows`` rows
  (:func:`fastdp_jax.data.batch_format.unit_blocks`); without, it is ``rows`` rounded up to
  whole blocks of k rows, ghost clipping's view of the slots
  (:mod:`fastdp_jax.dp.ghost`): a copy of every wide activation to pad them
  would cost more than the few more slots.

  Raises:
    ValueError: ``block`` is below k (a unit of k rows would not fit in a microbatch).
  """
  rows = max(sampling.row_capacity_for(c, sampling_rate, overflow_probability)
             for c in size_counts(layout))
  if block is None:
    return rows, -(-rows // layout.unit_size) * layout.unit_size
  return rows, block * batch_format.unit_blocks(rows, block, layout.unit_size)


def pack(units: sampling.PaddedBatches, layout: parallel.UnitLayout, capacity: int,
         block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Each device's sampled units' kept rows, packed contiguously (vectorised over
  [steps, devices]).

  Args:
    units: [steps, devices, unit slots] unit indices local to each device, and their mask
      (the sampler's: ascending, used slots first).
    layout: where each unit's rows are.
    capacity: row slots per device (:func:`row_capacity`).
    block: rows per microbatch (``capacity`` a multiple of it): no unit straddles a multiple
      of it; None: the whole capacity is one block.

  Returns:
    ``(indices [steps, devices, capacity] int32, mask [steps, devices, capacity] int8)``:
    the row indices local to each device's block (0 for padding), and the mask
    (:data:`fastdp_jax.data.batch_format.UNIT_SLOT_ORDER`: 2 at a unit's first row, 1 at its
    further rows, 0 for padding), units in the sampler's order.

  Raises:
    BatchOverflowError: a device's units do not fit (a sample of more rows than the
      capacity's bound: probability at most p per update and device).
  """
  num_units = len(layout.sizes)
  # Only the unit slots some device uses (the sampler's capacity is the rows'): host work.
  used = max(1, int(units.mask.sum(axis=-1).max(initial=0)))
  units = sampling.PaddedBatches(indices=units.indices[..., :used], mask=units.mask[..., :used])
  steps, devices, _ = units.indices.shape
  # Global unit of each slot; an unused slot (of a device without units: past the last unit)
  # is clamped, then given size 0.
  g = np.minimum(units.indices.astype(np.int64) + layout.unit_bounds[:-1][None, :, None],
                 max(num_units - 1, 0))
  sizes = np.where(units.mask, layout.sizes[g], 0)
  size = block or capacity
  first, fits = batch_format.unit_positions(sizes, size, capacity // size)
  if not fits.all():
    s, d = np.argwhere(~fits)[0]
    raise sampling.BatchOverflowError(
        f"{int(sizes[s, d].sum())} rows sampled on device {d} (of {int(units.mask[s, d].sum())}"
        f" units), capacity {capacity}; lower dp.overflow_probability and rerun")
  # One entry per kept row: its unit slot (flat over [steps, devices, slots]) and rank in it.
  sizes, first = sizes.ravel(), (first + (np.arange(steps * devices) * capacity).reshape(
      steps, devices, 1)).ravel()
  unit = np.repeat(np.arange(len(sizes)), sizes)
  rank = np.arange(len(unit)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
  indices = np.zeros(steps * devices * capacity, np.int32)
  mask = np.zeros(steps * devices * capacity, np.int8)
  indices[first[unit] + rank] = layout.starts[g.ravel()[unit]] + rank
  mask[first[unit] + rank] = np.where(rank == 0, batch_format.UNIT_FIRST, batch_format.UNIT_MORE)
  shape = (steps, devices, capacity)
  return indices.reshape(shape), mask.reshape(shape)

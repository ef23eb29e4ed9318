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
adding or removing a unit changes no other unit's. :func:`expand` turns each device's sampled
unit slots into k row slots each: row slot j of unit slot u at ``u * k + j``, masked beyond
the unit's rows. The capacity (and its overflow term in delta) counts units.

Materialised batches of a unit dataset (``preprocessing.poisson_batches``, ``data.batches``)
hold the same row slots, drawn by the same rule: the streamed run equals this one.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from fastdp_jax import parallel
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


def expand(units: sampling.PaddedBatches, layout: parallel.UnitLayout
           ) -> sampling.PaddedBatches:
  """Each device's sampled unit slots as k row slots each.

  Args:
    units: [steps, devices, capacity] unit indices local to each device, and their mask.
    layout: where each unit's rows are.

  Returns:
    [steps, devices, capacity * k] row indices local to each device's block: row slot j of
    unit slot u at ``u * k + j``, True in the mask for the unit's rows only (False for the
    slots beyond its rows and for unused unit slots, whose index is 0).
  """
  k = layout.unit_size
  num_units = len(layout.sizes)
  steps, devices, cap = units.indices.shape
  # Global unit of each slot; an unused slot of a device without units points past the last
  # unit: clamped, then masked off.
  g = np.minimum(units.indices.astype(np.int64) + layout.unit_bounds[:-1][None, :, None],
                 max(num_units - 1, 0))
  j = np.arange(k)
  mask = units.mask[..., None] & (j < layout.sizes[g][..., None])
  idx = np.where(mask, layout.starts[g][..., None] + j, 0)
  return sampling.PaddedBatches(indices=idx.reshape(steps, devices, cap * k).astype(np.int32),
                                mask=mask.reshape(steps, devices, cap * k))

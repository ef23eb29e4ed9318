"""The device mesh and where the training rows live on it, for one or many processes.

One program for 1 and N devices on 1 or N hosts: a 1-D mesh with axis ``data`` over all
devices of all processes, ordered by process and then by device, so that each process's
devices are one contiguous run of the mesh. Parameters are replicated. The training rows
are laid out in global order (the train shards concatenated in manifest order: a row's global
id is its offset there): process p holds one contiguous range of rows, in proportion to its
devices and whatever the number of shards (:func:`fastdp_jax.data.shards.process_row_ranges`; read
as HDF5 slices across shard boundaries), and splits it into equal contiguous blocks, one per
local device. A single device is a mesh of size 1 holding every row.

Every process computes every device's global row range from the manifest alone
(:func:`device_bounds`), which is what the topology-independent Poisson sampler needs to map
a step's global indices to per-device local indices.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class UnitLayout:
  """Where the privacy units' rows are on the mesh (a unit dataset, held in memory).

  Units are numbered 0..U-1 in the grouped order (:func:`fastdp_jax.data.units.group`); each
  unit's rows are contiguous and on one device, so a unit's clipped sum is computed where its
  rows are and the Poisson sampler draws units, never rows (:mod:`fastdp_jax.unit_batches`).

  Attributes:
    unit_size: k, the public bound on a unit's rows (the band width of a unit's Gram norm:
      a sampled unit's rows are packed contiguously, :func:`fastdp_jax.unit_batches.pack`).
    unit_bounds: [num_devices + 1] global unit offsets: device d holds units
      ``unit_bounds[d]:unit_bounds[d+1]``.
    starts: [U] each unit's first row, local to its device's block.
    sizes: [U] each unit's rows (1..k).
    keys: [U] uint64 unit keys (ascending): the sampler's counter of each unit.
  """

  unit_size: int
  unit_bounds: np.ndarray
  starts: np.ndarray
  sizes: np.ndarray
  keys: np.ndarray


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """Training rows on the mesh: device k holds global rows ``bounds[k]:bounds[k+1]``.

  Attributes:
    features: [num_devices * rows_per_device, d] float32, sharded along ``data``; device k's
      block starts with its rows and is padded with zeros.
    labels: [num_devices * rows_per_device] float32, sharded along ``data``.
    bounds: [num_devices + 1] global row offsets of the devices' blocks.
    num_examples: N, the number of training rows over all processes (of training units, when
      ``units`` is set).
    units: where each privacy unit's rows are (None: every row is its own unit).
  """

  features: jax.Array
  labels: jax.Array
  bounds: np.ndarray
  num_examples: int = -1
  units: UnitLayout | None = None

  def __post_init__(self):
    if self.num_examples < 0:
      object.__setattr__(self, "num_examples", int(self.bounds[-1]))


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over all devices of all processes (one device: a mesh of size 1).

  Devices are ordered by (process, id) so that each process's devices are contiguous, which
  lets each process hold one contiguous range of rows.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def devices_per_process(mesh: jax.sharding.Mesh) -> list[int]:
  """Number of mesh devices of each process, indexed by process."""
  counts = np.bincount([d.process_index for d in mesh.devices.flat],
                       minlength=jax.process_count())
  return [int(c) for c in counts]


def device_bounds(process_rows: Sequence[int],
                  device_counts: Sequence[int]) -> tuple[np.ndarray, int]:
  """Global row ranges of every device, and the padded block size.

  Args:
    process_rows: rows held by each process, in process order (contiguous, in global order).
    device_counts: mesh devices of each process.

  Returns:
    ``(bounds, rows_per_device)``: [num_devices + 1] global offsets (device k holds rows
    ``bounds[k]:bounds[k+1]``) and the common block length every device is padded to.
  """
  if len(process_rows) != len(device_counts):
    raise ValueError(f"{len(process_rows)} processes' rows for {len(device_counts)} processes")
  bounds, start, per = [0], 0, 1
  for rows, k in zip(process_rows, device_counts):
    if k <= 0:
      raise ValueError(f"a process with rows has {k} devices in the mesh")
    block = -(-rows // k)
    for j in range(k):
      bounds.append(start + min((j + 1) * block, rows))
    start += rows
    per = max(per, block)
  return np.asarray(bounds, np.int64), per


def place_training_data(mesh: jax.sharding.Mesh, x: np.ndarray, y: np.ndarray,
                        process_rows: Sequence[int] | None = None) -> DeviceData:
  """Puts this process's rows on its devices: equal contiguous blocks, padded with zeros.

  Args:
    mesh: the ``data`` mesh (from :func:`make_mesh`).
    x: [n_p, d] this process's features, its global rows in order.
    y: [n_p] its labels.
    process_rows: rows held by each process; default (one process) ``[len(y)]``.

  Returns:
    The :class:`DeviceData`; with several processes, ``features``/``labels`` are global
    arrays of which this process holds only its blocks.
  """
  if process_rows is None:
    if jax.process_count() > 1:
      raise ValueError("with several processes, give every process's row count")
    process_rows = [len(y)]
  me = jax.process_index()
  if process_rows[me] != len(y):
    raise ValueError(f"process {me} holds {len(y)} rows, the layout says {process_rows[me]}")
  bounds, _ = device_bounds(process_rows, devices_per_process(mesh))
  return place_blocks(mesh, x, y, bounds, offset=sum(process_rows[:me]),
                      num_examples=int(sum(process_rows)))


def place_blocks(mesh: jax.sharding.Mesh, x: np.ndarray, y: np.ndarray, bounds: np.ndarray,
                 *, offset: int, num_examples: int, units: UnitLayout | None = None
                 ) -> DeviceData:
  """Puts this process's devices' blocks on them: device k gets global rows
  ``bounds[k]:bounds[k+1]``, each block padded with zeros to the longest one.

  Args:
    mesh: the ``data`` mesh (from :func:`make_mesh`).
    x: [n_p, d] features of global rows ``offset .. offset + n_p - 1``, covering this
      process's devices' blocks.
    y: [n_p] their labels.
    bounds: [num_devices + 1] global row offsets of every device's block.
    offset: the global row of ``x[0]``.
    num_examples: N (rows, or units with ``units``), recorded in the result.
    units: the unit layout of a unit dataset, recorded in the result.
  """
  me, counts = jax.process_index(), devices_per_process(mesh)
  per = max(1, int(np.diff(bounds).max()))
  first = sum(counts[:me])
  xs, ys = [], []
  for k in range(first, first + counts[me]):
    lo, hi = bounds[k] - offset, bounds[k + 1] - offset
    pad = per - (hi - lo)
    xs.append(np.concatenate([x[lo:hi], np.zeros((pad,) + x.shape[1:], x.dtype)]))
    ys.append(np.concatenate([y[lo:hi], np.zeros((pad,), y.dtype)]))
  sharding = NamedSharding(mesh, P(AXIS))
  total = per * mesh.devices.size
  features = jax.make_array_from_process_local_data(sharding, np.concatenate(xs),
                                                    (total,) + x.shape[1:])
  labels = jax.make_array_from_process_local_data(sharding, np.concatenate(ys), (total,))
  return DeviceData(features=features, labels=labels, bounds=np.asarray(bounds, np.int64),
                    num_examples=int(num_examples), units=units)


def load_training_data(mesh: jax.sharding.Mesh, path: str, *, verify_checksum: bool = True,
                       feature_bounds: Any = None,
                       exclude: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> tuple[data_lib.Split, DeviceData]:
  """Reads this process's rows of the training split and places them on its devices.

  Process p reads only its range of global rows (:func:`fastdp_jax.data.shards.process_row_ranges`,
  N/P rows plus or minus one with equal devices per process), as HDF5 slices of the shards
  that hold them, and verifies those shards (checksum, structure, and every row's values
  against the bounds: :func:`fastdp_jax.data.shards.load_split`). Together the processes check every
  row; a refusal on any process stops every process with the same one-line message, before
  the first update. An original single-file layout (``dataset.h5``) has no shards: every
  process reads and checks the whole file and keeps its range.

  Args:
    mesh: the ``data`` mesh (from :func:`make_mesh`).
    path: a dataset directory or an original-layout ``.h5`` file.
    verify_checksum: check the sha256 of every shard this process reads.
    feature_bounds: ``data.feature_bounds``, for data that declares no bounds.
    exclude: ``exclude(global row ids [n]) -> [n] bool``: rows held out of training (the
      validation split); a function of the global row id (and the row keys every process
      reads alike), so every process agrees on N.

  Returns:
    ``(local, device_data)``: this process's rows as a :class:`fastdp_jax.data.shards.Split`
    (its ``digest`` identifies the whole data set) and the placed :class:`DeviceData`, whose
    ``num_examples`` is the global N.

  Raises:
    ShardError: on every process, naming the process, shard and column, if any process
      refuses its rows.
  """
  me, nproc = jax.process_index(), jax.process_count()
  counts = devices_per_process(mesh)
  local, ranges, failure = None, None, None
  try:
    if os.path.isdir(path):
      total = manifest_lib.read_manifest(path).rows("train")
      ranges = data_lib.process_row_ranges(total, counts)
      local = data_lib.load_split(path, "train", rows=ranges[me],
                                  verify_checksum=verify_checksum,
                                  feature_bounds=feature_bounds)
    else:
      full = data_lib.load_split(path, "train", verify_checksum=verify_checksum,
                                 feature_bounds=feature_bounds)
      ranges = data_lib.process_row_ranges(len(full), counts)
      lo, hi = ranges[me]
      local = full.take(slice(lo, hi))
  except errors.UserError as e:
    failure = e
  _agree_on_failure(failure)
  assert local is not None and ranges is not None
  process_rows = [hi - lo for lo, hi in ranges]
  if exclude is not None:  # each process drops its own held-out rows; N counts the rest
    keep = ~np.asarray(exclude(np.arange(*ranges[me])), bool)
    local = local.take(keep)
    process_rows = [int(np.count_nonzero(~np.asarray(exclude(np.arange(lo, hi)), bool)))
                    for lo, hi in ranges]
  if nproc > 1:
    logging.info("process %d holds training rows %d:%d of %d", me, ranges[me][0],
                 ranges[me][1], sum(process_rows))
  return local, place_training_data(mesh, local.features, local.labels, process_rows)


_MESSAGE_BYTES = 1024  # a refusal's message as shared with the other processes


def _agree_on_failure(failure: errors.UserError | None) -> None:
  """Raises on every process if data loading failed on any (a collective when P > 1).

  Without this, a process that refused its rows would leave the others waiting in the next
  collective until the heartbeat timeout, and they would report a lost peer, not the shard.
  """
  if jax.process_count() == 1:
    if failure is not None:
      raise failure
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  me = jax.process_index()
  text = b"" if failure is None else f"{failure}".encode()[:_MESSAGE_BYTES]
  mine = np.zeros(_MESSAGE_BYTES, np.uint8)
  mine[:len(text)] = np.frombuffer(text, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, _MESSAGE_BYTES)
  if failure is not None:
    raise failure
  for p, row in enumerate(every):
    if row.any() and p != me:
      message = bytes(row).rstrip(b"\0").decode("utf-8", errors="replace")
      raise manifest_lib.ShardError(f"process {p} refused its training rows: {message}")


def replicate(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """Places a pytree, identical on every process, replicated on every mesh device."""
  sharding = NamedSharding(mesh, P())

  def put(leaf):
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree_util.tree_map(put, tree)


def shard_along_devices(mesh: jax.sharding.Mesh, value: np.ndarray, axis: int = 1) -> jax.Array:
  """Places a host array, identical on every process, sharded along ``axis`` by device.

  Each process transfers only its own devices' slices (e.g. the per-device sampled indices
  ``[steps, num_devices, capacity]``).
  """
  value = np.asarray(value)
  spec = P(*([None] * axis + [AXIS]))
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec),
                                      lambda index: value[index])

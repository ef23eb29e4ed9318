"""The device mesh and where the training rows live on it.

One program for 1 and N devices: a 1-D mesh with axis ``data`` over all devices; the training
rows are split into contiguous blocks, one per device; parameters are replicated. A single
device is a mesh of size 1.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """Training rows on the mesh: device k holds global rows ``bounds[k]:bounds[k+1]``.

  Attributes:
    features: [num_devices * rows_per_device, d] float32, sharded along ``data``.
    labels: [num_devices * rows_per_device] float32, sharded along ``data``.
    bounds: [num_devices + 1] global row offsets of the devices' blocks.
  """

  features: jax.Array
  labels: jax.Array
  bounds: np.ndarray


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over all devices (a single device is a mesh of size 1)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def place_training_data(mesh: jax.sharding.Mesh, x: np.ndarray, y: np.ndarray) -> DeviceData:
  """Splits the rows into contiguous equal blocks, one per device (the last one padded)."""
  n, k = len(y), mesh.devices.size
  per = -(-n // k)
  bounds = np.minimum(np.arange(k + 1) * per, n)
  pad = per * k - n
  xp = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x
  yp = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
  sharding = NamedSharding(mesh, P(AXIS))
  return DeviceData(features=jax.device_put(xp, sharding), labels=jax.device_put(yp, sharding),
                    bounds=bounds)

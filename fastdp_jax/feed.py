"""How each update's batch reaches the devices: the in-memory sampler or materialised batches.

In memory, the rows sit on the devices once and each call ships only the sampled indices and
masks (:class:`fastdp_jax.dp.sampling.PoissonSampler`); with materialised batches
(``data.batches``) each call reads the next updates' rows from disk, this process's devices'
slots only, a reader thread ahead of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np

from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax import inputs
from fastdp_jax import parallel
from fastdp_jax import profiling
from fastdp_jax import step as step_lib
from fastdp_jax import unit_batches
from fastdp_jax.data import batch_stream
from fastdp_jax.dp import count as count_lib
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax.dp import plan as plan_lib
from fastdp_jax.dp import sampling


@dataclasses.dataclass(kw_only=True, eq=False)
class Batches:
  """Where each update's batch comes from.

  Attributes:
    sampler: the in-memory Poisson sampler (None when the batches are streamed).
    stream: the materialised batches (None in memory).
    local_shards: this process's devices (it computes only their batches; the others' never
      move).
    steps_per_call: updates per compiled call (the inputs are padded to it).
    reader: the prefetching reader of ``stream``, started by the first call.
    units: the unit layout of an in-memory unit run (None otherwise).
    block: a unit run's microbatch (rows): no packed unit straddles a multiple of it.
    unit_capacity: an in-memory unit run's row slots per update per device.
  """
  sampler: sampling.PoissonSampler | None
  stream: batch_stream.BatchStream | None
  local_shards: list[int]
  steps_per_call: int
  reader: batch_stream.Prefetcher | None = None
  units: parallel.UnitLayout | None = None
  block: int | None = None
  unit_capacity: int | None = None

  @property
  def capacity(self) -> int:
    """Row slots per update per device (in memory; of the whole update when streamed)."""
    if self.sampler is None:
      return self.stream.capacity
    return self.unit_capacity if self.units is not None else self.sampler.capacity

  def sampled(self, run: step_lib.TrainStep, dev: parallel.DeviceData, step: int, k: int,
              prof: profiling.Profiler) -> tuple:
    """The inputs of ``k`` in-memory updates from update ``step``: the rows on the devices,
    and the sampled indices and masks, placed."""
    chunk = self.steps_per_call
    with prof.phase("sampling"):
      b = self.sampler.batches(step, k, shards=self.local_shards)
      idx, msk = b.indices, b.mask
      if self.units is not None:  # the sampled units' rows, packed
        idx, msk = unit_batches.pack(b, self.units, self.unit_capacity, self.block)
      pad = ((0, chunk - k), (0, 0), (0, 0))
      idx, msk = np.pad(idx, pad), np.pad(msk, pad)
      active = np.arange(chunk) < k
    with prof.phase("data transfer"):
      placed = prof.sync(run.place(idx, msk, active))
    return (dev.features, dev.labels, *placed)

  def streamed(self, run: step_lib.StreamedStep, mesh: jax.sharding.Mesh, step: int, k: int,
               stop_at: int, prof: profiling.Profiler,
               cleanup: contextlib.ExitStack | None) -> tuple:
    """This process's devices' slots of the next ``k`` materialised batches, placed."""
    chunk, d = self.steps_per_call, int(mesh.devices.size)
    lo, hi = self.local_shards[0], self.local_shards[-1] + 1
    unit = self.stream.run.max_rows_per_unit
    if self.reader is None:  # starts at the run's position (a resume seeks to it)
      # Unit batches are read whole and their units repacked over the devices (below), so
      # that no unit's clipped sum straddles two devices or two microbatches.
      self.reader = self.stream.reader(step, stop_at, device_slice=None if unit else (
          batch_stream.device_slots(self.stream.capacity, d, (lo, hi))))
      if cleanup is not None:
        cleanup.callback(self.reader.close)
    with prof.phase("data read"):
      if unit:
        f, y, m = (a[:, lo:hi] for a in batch_stream.split_units_for_devices(
            *self.reader.take(k), d, unit, self.block))
      else:
        f, y, m = batch_stream.split_for_devices(*self.reader.take(k), hi - lo)
      shape = (chunk, d) + f.shape[2:]
      features = np.zeros(shape, np.float32)
      labels, mask = np.zeros(shape[:3], np.float32), np.zeros(shape[:3], m.dtype)
      features[:k, lo:hi], labels[:k, lo:hi], mask[:k, lo:hi] = f, y, m
    with prof.phase("data transfer"):
      return prof.sync(run.place(features, labels, mask, np.arange(chunk) < k))


def make_batches(mesh: jax.sharding.Mesh, plan: plan_lib.PrivacyPlan, keys: keys_lib.RunKeys,
                 dev: parallel.DeviceData | None, stream: batch_stream.BatchStream | None, *,
                 batch_size: int, steps_per_call: int,
                 microbatch_size: int | None, block: int | None = None) -> Batches:
  """The run's batches: a Poisson sampler over the rows on the devices (over the units, in a
  unit dataset: :mod:`fastdp_jax.unit_batches`), or ``stream``.

  With units, ``block`` is the step's microbatch in rows (:func:`unit_block`) and the
  capacity counts rows (:func:`fastdp_jax.unit_batches.row_capacity`); the sampler's unit
  capacity is the same number, so only the rows' overflow event (probability at most
  ``plan.overflow_probability`` per update and device) can stop the run: the overflow's
  term in delta is unchanged.
  """
  sampler, units, rows, capacity = None, dev.units if dev is not None else None, None, None
  if units is not None:
    rows, capacity = unit_batches.row_capacity(units, plan.sampling_rate,
                                               plan.overflow_probability, block)
  if dev is not None:
    sampler = sampling.PoissonSampler(
        dev.num_examples, batch_size, keys.sampling,
        shard_bounds=dev.bounds if units is None else units.unit_bounds,
        capacity_multiple=microbatch_size if units is None else None, capacity=rows,
        overflow_probability=plan.overflow_probability, sampling_rate=plan.sampling_rate,
        counters=None if units is None else units.keys)
  return Batches(sampler=sampler, stream=stream, steps_per_call=steps_per_call, units=units,
                 block=block if plan.privacy_unit else None, unit_capacity=capacity,
                 local_shards=[k for k, d in enumerate(mesh.devices.flat)
                               if d.process_index == jax.process_index()])


def unit_block(rc: config_lib.RunConfig, method: str, plan: plan_lib.PrivacyPlan
               ) -> int | None:
  """A unit run's block in rows (:func:`fastdp_jax.step.unit_block`: the padding microbatch
  or the vmap chunk): no packed unit straddles a multiple of it. None for a row-level run, or
  a unit run whose batch is one block.

  Raises:
    ConfigError: a block of fewer than k rows (a unit of k rows would not fit in one).
  """
  if not plan.privacy_unit:
    return None
  k = int(plan.max_rows_per_unit or 1)
  m = step_lib.unit_block(rc.padding_microbatch, method, rc.dp.microbatch_size, k)
  if m is not None and m < k:
    raise errors.ConfigError(f"microbatches of {m} rows cannot hold a unit of "
                             f"max_rows_per_unit={k} rows; raise padding_microbatch to at "
                             "least k")
  return m


def plan_run(rc: config_lib.RunConfig, rows: count_lib.RowCount, mesh: jax.sharding.Mesh,
             data: inputs.RunData
             ) -> tuple[plan_lib.PrivacyPlan, batch_stream.BatchStream | None]:
  """The privacy plan and, with ``data.batches``, the verified batches it is checked against
  (their capacity fixes the overflow term of delta).

  The plan sees N only as ``rows``: the DP estimate or the declared figure, never the exact
  count (which only the sampler's capacity uses, unpublished: docs/privacy.md). In a unit
  dataset N counts units (``data.unit``), and the plan names the unit.
  """
  count_lib.check_estimate(rows, rc.batch_size)
  plan = plan_lib.plan_privacy(rc.dp, batch_size=rc.batch_size, num_epochs=rc.num_epochs,
                               num_examples=rows.value, num_devices=int(mesh.devices.size))
  if plan.enabled:  # a non-private run states no N (it has no guarantee to state it for)
    plan = dataclasses.replace(plan, num_examples=rows.value, num_examples_source=rows.source,
                               count_epsilon=rows.epsilon)
  if data.unit is not None:
    plan = dataclasses.replace(plan, privacy_unit=data.unit.columns,
                               max_rows_per_unit=data.unit.max_rows)
  if data.streamed_from is None:
    return plan, None
  stream = inputs.open_stream(rc, plan)
  # One capacity per update (not per device): the job's union bound.
  requested = plan.delta / (1 - sampling.OVERFLOW_SHARE)
  plan = dataclasses.replace(
      plan, overflow_probability=stream.overflow_probability,
      overflow_delta=plan_lib.overflow_term(
          stream.overflow_probability, plan.total_steps, 1, plan.epsilon_bound, requested,
          f"the overflow probability of the batches in {stream.path}") if plan.enabled else 0.0)
  return plan, stream

"""The compiled training step: many DP-SGD updates in one device call.

``build_train_chunk`` returns ``run(state, features, labels, indices, mask, active)`` that runs
a ``lax.scan`` of updates. Each update gathers each device's Poisson-sampled rows from the
rows it holds, computes the sum of clipped per-example gradients on that device (clipping
always precedes any reduction), all-reduces the per-device sums across the mesh with ONE
all-reduce, then the optax chain adds the noise once and applies the optimizer. The sampled
indices come from the host (:mod:`fastdp_jax.dp.sampling`); nothing else crosses between host and
device per update.

Two strategies produce the all-reduce (``config.parallel.strategy``):

* ``shard_map``: explicit SPMD code: each device runs the per-device function on its block
  and calls ``lax.psum`` on its clipped sum (the original system's hand-written all-reduce,
  done once per update instead of once per parameter and microbatch).
* ``auto``: plain ``jax.jit`` with sharding annotations: the per-device function is
  ``vmap``-ed over a device axis that is sharded along ``data``, the per-device sums are
  packed into one [num_devices, num_params + 4] buffer and summed over that axis, and XLA's
  partitioner inserts the all-reduce (the counterpart of DistributedDataParallel).

Both run the same per-device function and give the same update (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from absl import logging

from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax import models
from fastdp_jax.dp import clip_types
from fastdp_jax.dp import clipping
from fastdp_jax.dp import plan as plan_lib
from fastdp_jax import parallel
from fastdp_jax.config import STRATEGIES
from fastdp_jax.parallel import AXIS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """What a compiled call carries from one update to the next.

  Attributes:
    params: the parameter pytree (replicated).
    opt_state: the optax state, including the noise key and update count.
    step: int32 number of updates done.
  """

  params: Any
  opt_state: Any
  step: jax.Array


# STRATEGIES is defined in fastdp_jax.config (imported above), which must not import JAX.
_METRICS = ("loss_sum", "count", "clipped", "nonfinite")


def _per_device(loss_fn: clip_types.LossFn, clipped_sum: clip_types.ClippedSumFn,
                l2_norm_clip: float | None, microbatch: int | None = None,
                unit_size: int | None = None) -> Callable:
  """One device's work: ``(params, x, y, idx, mask) -> (clipped sum, metric sums)``.

  ``x``, ``y`` are the device's own rows, ``idx``/``mask`` [capacity] its local sampled
  indices. Nothing here reduces across devices. With ``microbatch``, the rows are gathered
  and processed one microbatch at a time, skipping those that hold only padding
  (:func:`_sum_microbatches`). With ``unit_size`` k (privacy units), the batch is packed
  units (``mask`` int8, :func:`fastdp_jax.dp.clip_types.unit_rows`) and no unit straddles a
  microbatch (the host packs them so: :func:`unit_block`).
  """

  on_batch = _per_device_batch(loss_fn, clipped_sum, l2_norm_clip, unit_size)
  if microbatch is not None:
    def by_microbatch(params, x, y, idx, mask):
      idx = _split(idx, microbatch)  # padded with row 0, masked off
      return _sum_microbatches(on_batch, params, lambda i: (x[idx[i]], y[idx[i]]),
                               _split(mask, microbatch))
    return by_microbatch

  def fn(params, x, y, idx, mask):
    return on_batch(params, (x[idx], y[idx]), mask)

  return fn


def _split(a: jax.Array, size: int) -> jax.Array:
  """[capacity, ...] -> [n, size, ...], zero-padded (mask: False, or 0 = empty slot in a unit
  batch) up to a multiple of size; a capacity of at most ``size`` rows is one microbatch of
  the capacity."""
  size = min(size, a.shape[0])
  n = -(-a.shape[0] // size)
  pad = [(0, n * size - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
  return jnp.pad(a, pad).reshape((n, size) + a.shape[1:])


def _sum_microbatches(on_batch: Callable, params: Any, take: Callable[[jax.Array], Any],
                      masks: jax.Array) -> Any:
  """The sum of ``on_batch(params, take(i), masks[i])`` over the microbatches ``i`` that
  matter, skipping all-padding ones.

  ``masks`` [n, size]. The loop runs up to the last microbatch holding a real row, a trip
  count computed from the mask inside the compiled step. Every output of ``on_batch`` is a
  masked sum, so the microbatches after it would add exactly zero: the result equals the sum
  over all ``n`` (the same values), and differs from one pass over the whole padded batch by float
  summation order only.

  Skipping makes the step's duration depend on the realised batch size, which the accountant
  does not cover: acceptable only because no step duration reaches a public output
  (docs/privacy.md, "Step duration"); ``padding_microbatch=None`` turns it off.
  """
  n = masks.shape[0]
  used = jnp.max(jnp.where(jnp.any(masks, axis=1), jnp.arange(1, n + 1), 0))

  def one(i):
    return on_batch(params, take(i), masks[i])

  zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                jax.eval_shape(one, jnp.zeros((), jnp.int32)))
  return jax.lax.fori_loop(0, used, lambda i, acc: jax.tree_util.tree_map(jnp.add, acc, one(i)),
                           zero)


def _per_device_batch(loss_fn: clip_types.LossFn, clipped_sum: clip_types.ClippedSumFn,
                      l2_norm_clip: float | None, unit_size: int | None = None) -> Callable:
  """One device's work on its batch: ``(params, (x, y), mask) -> (clipped sum, metrics)``.

  With ``unit_size`` k the batch is packed units (``mask`` int8; see
  :func:`fastdp_jax.dp.clip_types.unit_rows`) and ``stats.norms`` / ``stats.nonfinite`` sit
  at each unit's first row: ``count`` counts the rows kept, ``clipped`` the rows of the units
  whose sum was clipped (so ``clipped / count`` is the share of sampled rows whose unit was
  clipped, as in a row-level run) and ``nonfinite`` the units zeroed.
  """

  def on_batch(params, batch, mask):
    grads, stats = clipped_sum(params, batch, mask)
    losses = getattr(stats, "losses", None)
    if losses is None:  # ghost clipping returns them; vmap clipping does not.
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
    clipped = stats.norms > (l2_norm_clip if l2_norm_clip is not None else jnp.inf)
    if unit_size is not None:  # a unit's verdict, read at its first row, for each of its rows
      rows = clip_types.unit_rows(mask, unit_size)
      mask, clipped = rows.keep, clipped[rows.first]
    # A non-finite loss is left out of the sum (its gradient was zeroed and counted): the
    # run must not behave differently at the update where such a row was sampled.
    finite = mask & jnp.isfinite(losses)
    local = dict(loss_sum=jnp.sum(jnp.where(finite, losses, 0.0)),
                 count=jnp.sum(mask).astype(jnp.float32),
                 clipped=jnp.sum(clipped & mask).astype(jnp.float32),
                 nonfinite=jnp.sum(stats.nonfinite).astype(jnp.float32))
    return grads, local

  return on_batch


def _shard_map_sum(mesh: jax.sharding.Mesh, per_device: Callable) -> Callable:
  """``shard_map`` strategy: ``lax.psum`` of every device's clipped sum."""

  def local_sum(params, x, y, idx, mask):
    sums = per_device(params, x, y, idx[0], mask[0])
    # The only cross-device communication of an update: one all-reduce of the clipped sums.
    return jax.lax.psum(sums, AXIS)

  # check_vma=False: the body is plain per-device code. With the default (True), the gradient
  # with respect to any device-invariant value (the replicated parameters, or a zero "tap"
  # that ghost clipping differentiates) is the gradient of the SUM over devices: an implicit
  # psum before clipping. Casting the parameters with pcast fixes only the first case; this
  # fixes every ClippedSumFn. The one explicit psum above is then the only reduction.
  return jax.shard_map(local_sum, mesh=mesh,
                       in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
                       out_specs=(P(), P()), check_vma=False)


def _auto_sum(mesh: jax.sharding.Mesh, per_device: Callable) -> Callable:
  """``auto`` strategy: sharding annotations only; XLA inserts the all-reduce."""
  num_devices = mesh.devices.size
  by_device = NamedSharding(mesh, P(AXIS))
  replicated = NamedSharding(mesh, P())

  def total_sum(params, x, y, idx, mask):
    # [num_devices * rows, ...] -> [num_devices, rows, ...]: the leading axis is the device
    # axis, sharded along ``data``, so each device computes its own block's sum. The sharding
    # constraints stay outside the per-example vmap (they break inside it).
    x = jax.lax.with_sharding_constraint(x.reshape((num_devices, -1) + x.shape[1:]), by_device)
    y = jax.lax.with_sharding_constraint(y.reshape(num_devices, -1), by_device)
    sums = jax.vmap(per_device, in_axes=(None, 0, 0, 0, 0))(params, x, y, idx, mask)
    return _sum_over_devices(sums, by_device, replicated)

  return total_sum


def _sum_over_devices(sums: Any, by_device: NamedSharding, replicated: NamedSharding) -> Any:
  """The sum over the leading (device) axis of per-device sums, as ONE all-reduce.

  One buffer per device, like DistributedDataParallel's bucket, so that XLA sums
  num_params + 4 floats in one collective.
  """
  packed = jax.vmap(lambda s: jax.flatten_util.ravel_pytree(s)[0])(sums)
  packed = jax.lax.with_sharding_constraint(packed, by_device)
  total = jax.lax.with_sharding_constraint(jnp.sum(packed, axis=0), replicated)
  _, unravel = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda s: s[0], sums))
  return unravel(total)


def padding_microbatch(size: int | None, method: str, vmap_chunk: int | None,
                       unit_size: int | None = None) -> int | None:
  """The step's ``padding_microbatch`` (rows) for config ``padding_microbatch=size``.

  The vmap path with ``dp.microbatch_size`` already works in chunks (the capacity is a
  multiple of them): its chunks become the microbatches that are skipped, so that the two
  never disagree on the rows per chunk. With privacy units of at most ``unit_size`` k rows, a
  vmap chunk counts units of k row slots and any other microbatch holds at least k rows, so
  that every unit fits in one (packed units never straddle a microbatch: :func:`unit_block`).
  """
  if size is None:
    return None
  k = unit_size or 1
  if method == "vmap" and vmap_chunk is not None:
    return vmap_chunk * k
  if unit_size is None:
    return size
  return max(size, k)


def unit_block(size: int | None, method: str, vmap_chunk: int | None,
               unit_size: int) -> int | None:
  """m, the rows of each block of a packed unit batch (no unit straddles a multiple of m).

  The host packs each device's sampled units into blocks of m row slots (the capacity a
  multiple of m) because the device clips each block on its own: a padding microbatch
  (:func:`padding_microbatch`) or, without one, a vmap chunk of ``vmap_chunk`` units of k
  slots (:func:`fastdp_jax.dp.clipping.unit_clipped_grad_sum_with_stats`). None: the whole
  batch is one block.

  Args:
    size: config ``padding_microbatch`` (rows), or None.
    method: the resolved clipping method, ``'ghost'`` or ``'vmap'``.
    vmap_chunk: ``dp.microbatch_size``, or None.
    unit_size: k, the most rows of a unit.
  """
  m = padding_microbatch(size, method, vmap_chunk, unit_size)
  if m is None and method == "vmap" and vmap_chunk is not None:
    return vmap_chunk * unit_size
  return m


def _check_microbatch(size: int | None) -> None:
  if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
    raise ValueError(f"padding_microbatch={size!r} must be a positive integer or None")


def _update_fn(tx: optax.GradientTransformation) -> Callable:
  """``update(state, active, sums_fn) -> (state, metrics)``: one noised update, or none."""

  def update(state, active, sums_fn):
    def do(state):
      grads, m = sums_fn(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      # Whether the noised parameters are finite: a function of the DP output only.
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                  for p in jax.tree_util.tree_leaves(params)]))
      m = dict(m, params_finite=finite)
      return State(params=params, opt_state=opt_state, step=state.step + 1), m

    def skip(state):
      zero = jnp.zeros((), jnp.float32)
      return state, dict({k: zero for k in _METRICS}, params_finite=jnp.ones((), bool))

    return jax.lax.cond(active, do, skip, state)

  return update


def build_train_chunk(mesh: jax.sharding.Mesh, loss_fn: clip_types.LossFn,
                      clipped_sum: clip_types.ClippedSumFn, tx: optax.GradientTransformation,
                      l2_norm_clip: float | None, strategy: str = "shard_map",
                      padding_microbatch: int | None = None,
                      unit_size: int | None = None) -> TrainStep:
  """Compiles ``run(state, features, labels, indices, mask, active) -> (state, metrics)``.

  Args:
    mesh: the 1-D ``data`` mesh (all devices of all processes).
    loss_fn: ``loss_fn(params, (x, y)) -> scalar`` of one example (for the loss metric).
    clipped_sum: the per-device sum of clipped per-example gradients.
    tx: the optax chain (privatize, then the optimizer).
    l2_norm_clip: C, or None when DP is off (only used to count clipped examples).
    strategy: ``'shard_map'`` (explicit ``psum``) or ``'auto'`` (XLA inserts the all-reduce).
    padding_microbatch: rows per microbatch: each device's padded batch is processed in
      microbatches of this size and those holding only padding are skipped
      (:func:`_sum_microbatches`); None: the whole padded batch at once.
    unit_size: k, the most rows of a unit when the batches sample privacy units: ``mask``
      is then int8 packed units (0 empty, 2 a unit's first row, 1 a further row; none
      straddles a microbatch), ``clipped_sum`` clips each unit's sum; None: each row is its
      own unit (``mask`` bool).

  Returns:
    A :class:`TrainStep`. ``features``/``labels`` are :class:`fastdp_jax.parallel.DeviceData`
    arrays;
    ``indices``/``mask`` are host arrays [steps, num_devices, capacity] of per-device local
    row indices of each update's Poisson batch (identical on every process; each process
    transfers only its devices' slices); ``active`` [steps] bool lets a call run fewer updates
    than its compiled length without recompiling. ``metrics`` holds per-update
    ``loss_sum, count, clipped, nonfinite`` [steps] (training-row sums, not private) and
    ``params_finite`` [steps] bool (of the noised parameters).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"{strategy=} must be one of {STRATEGIES}")
  _check_microbatch(padding_microbatch)
  per_device = _per_device(loss_fn, clipped_sum, l2_norm_clip, padding_microbatch, unit_size)
  sharded_sum = (_shard_map_sum if strategy == "shard_map" else _auto_sum)(mesh, per_device)
  update = _update_fn(tx)

  def one_step(carry, inputs):
    state, x, y = carry
    idx, mask, active = inputs
    state, m = update(state, active, lambda p: sharded_sum(p, x, y, idx, mask))
    return (state, x, y), m

  replicated = NamedSharding(mesh, P())
  by_device = NamedSharding(mesh, P(AXIS))
  per_step = NamedSharding(mesh, P(None, AXIS))

  @functools.partial(jax.jit, in_shardings=(replicated, by_device, by_device, per_step,
                                            per_step, replicated),
                     out_shardings=(replicated, replicated))
  def jitted(state, x, y, indices, mask, active):
    (state, _, _), metrics = jax.lax.scan(one_step, (state, x, y), (indices, mask, active))
    return state, metrics

  return TrainStep(layout=BatchLayout(mesh=mesh), jitted=jitted)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a call's Poisson batches go from the host to the devices.

  ``indices`` and ``mask`` are ``[steps, num_devices, capacity]``: for update s and mesh
  device d, the batch's rows among d's OWN block of training rows (local indices), padded with
  ``mask == False`` (or 0 in an int8 mask of packed units, ``unit_size``). They are sharded
  along axis 1 (one slice per device), so each process transfers only its devices' slices;
  ``active`` ``[steps]`` is replicated.
  """

  mesh: jax.sharding.Mesh

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  def place(self, indices: np.ndarray, mask: np.ndarray,
            active: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The host -> device transfer of a call's batches (on its own, for profiling)."""
    if indices.ndim != 3 or indices.shape[1] != self.num_devices or mask.shape != indices.shape:
      raise ValueError(f"batches of shape {indices.shape} / {mask.shape}; expected [steps, "
                       f"{self.num_devices}, capacity] for both")
    return (parallel.shard_along_devices(self.mesh, indices),
            parallel.shard_along_devices(self.mesh, mask),
            parallel.replicate(self.mesh, np.asarray(active)))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The compiled call: ``step(state, features, labels, indices, mask, active)``.

  Attributes:
    layout: the batches' device layout (:class:`BatchLayout`).
    jitted: the jitted function (for inspection).
  """

  layout: BatchLayout
  jitted: Callable

  def place(self, indices, mask, active):
    return self.layout.place(indices, mask, active)

  def __call__(self, state, x, y, indices, mask, active):
    if not isinstance(indices, jax.Array):  # host arrays; place() may have placed them
      indices, mask, active = self.place(indices, mask, active)
    return self.jitted(state, x, y, indices, mask, active)

  def lower(self, state, x, y, indices, mask, active):
    """Lowers the jitted function for these arguments (to inspect the compiled step)."""
    return self.jitted.lower(state, x, y, *self.place(indices, mask, active))


def _streamed_sum(mesh: jax.sharding.Mesh, on_batch: Callable, strategy: str) -> Callable:
  """The per-update sum over devices of batches given as arrays [num_devices, capacity, ...]."""
  if strategy == "shard_map":
    def local_sum(params, x, y, mask):
      return jax.lax.psum(on_batch(params, (x[0], y[0]), mask[0]), AXIS)

    # check_vma=False for the reason given in _shard_map_sum.
    return jax.shard_map(local_sum, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                         out_specs=(P(), P()), check_vma=False)
  by_device, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())

  def total_sum(params, x, y, mask):
    x = jax.lax.with_sharding_constraint(x, by_device)
    sums = jax.vmap(on_batch, in_axes=(None, 0, 0))(params, (x, y), mask)
    return _sum_over_devices(sums, by_device, replicated)

  return total_sum


@dataclasses.dataclass(frozen=True)
class StreamedStep:
  """The compiled call on streamed batches: ``step(state, features, labels, mask, active)``.

  ``features`` [steps, num_devices, capacity, F], ``labels`` and ``mask`` [steps,
  num_devices, capacity]: each device's slots of each update (materialised Poisson batches,
  :mod:`fastdp_jax.data.batch_stream`), sharded along axis 1; ``active`` [steps] replicated.
  """

  mesh: jax.sharding.Mesh
  jitted: Callable

  def place(self, features, labels, mask, active):
    return (parallel.shard_along_devices(self.mesh, features),
            parallel.shard_along_devices(self.mesh, labels),
            parallel.shard_along_devices(self.mesh, mask),
            parallel.replicate(self.mesh, np.asarray(active)))

  def __call__(self, state, features, labels, mask, active):
    if not isinstance(features, jax.Array):
      features, labels, mask, active = self.place(features, labels, mask, active)
    return self.jitted(state, features, labels, mask, active)


def build_streamed_chunk(mesh: jax.sharding.Mesh, loss_fn: clip_types.LossFn,
                         clipped_sum: clip_types.ClippedSumFn, tx: optax.GradientTransformation,
                         l2_norm_clip: float | None, strategy: str = "shard_map",
                         padding_microbatch: int | None = None,
                         unit_size: int | None = None) -> StreamedStep:
  """Like :func:`build_train_chunk`, for batches read from disk instead of gathered on device.

  The per-device work (clipping, metrics) and the update (one all-reduce, noise once, the
  optimizer) are the same functions; only where each device's batch comes from differs.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"{strategy=} must be one of {STRATEGIES}")
  _check_microbatch(padding_microbatch)
  on_batch = _per_device_batch(loss_fn, clipped_sum, l2_norm_clip, unit_size)
  if padding_microbatch is not None:
    whole, size = on_batch, padding_microbatch

    def on_batch(params, batch, mask):
      xs, ys = (_split(a, size) for a in batch)
      return _sum_microbatches(whole, params, lambda i: (xs[i], ys[i]), _split(mask, size))
  summed = _streamed_sum(mesh, on_batch, strategy)
  update = _update_fn(tx)

  def one_step(state, inputs):
    x, y, mask, active = inputs
    return update(state, active, lambda p: summed(p, x, y, mask))

  replicated = NamedSharding(mesh, P())
  per_step = NamedSharding(mesh, P(None, AXIS))

  @functools.partial(jax.jit, in_shardings=(replicated, per_step, per_step, per_step,
                                            replicated),
                     out_shardings=(replicated, replicated))
  def jitted(state, x, y, mask, active):
    return jax.lax.scan(one_step, state, (x, y, mask, active))

  return StreamedStep(mesh=mesh, jitted=jitted)


class NonFiniteParametersError(errors.UserError):
  """The noised parameters became non-finite (a diverging optimizer, not one row)."""


def check_finite(metrics: dict[str, np.ndarray], step: int, k: int) -> None:
  """Stops the run at the first update whose noised parameters are not finite.

  Only the parameters are checked: they are the DP output, so stopping on them is
  post-processing. A non-finite per-example gradient or loss is zeroed and counted inside the
  step instead: halting on it would reveal that the row was sampled at that update.
  """
  bad = np.flatnonzero(~metrics["params_finite"][:k].astype(bool))
  if bad.size:
    raise NonFiniteParametersError(
        f"the parameters became non-finite at update {step + int(bad[0]) + 1}; lower the "
        "learning rate")


def learning_rate(o: config_lib.OptimizerSettings, total_steps: int) -> optax.ScalarOrSchedule:
  """``optimizer.learning_rate``, constant or decayed to 0 over the ``total_steps`` planned.

  The schedule reads the optimizer state's update count, which the checkpoint carries, so a
  resumed run continues the same decay.
  """
  if o.decay == "constant":
    return o.learning_rate
  if o.decay == "cosine":
    return optax.cosine_decay_schedule(o.learning_rate, max(total_steps, 1))
  return optax.linear_schedule(o.learning_rate, 0.0, max(total_steps, 1))


def make_optimizer(o: config_lib.OptimizerSettings,
                   total_steps: int = 0) -> optax.GradientTransformation:
  """The optimizer that follows the noise (``optimizer.name``: plain or momentum SGD, Adam),
  with decoupled weight decay when ``optimizer.weight_decay`` is set and the learning rate's
  ``optimizer.decay`` over ``total_steps`` updates."""
  lr = learning_rate(o, total_steps)
  if o.name == "sgd":
    sgd = optax.sgd(lr, momentum=o.momentum or None)
    if not o.weight_decay:
      return sgd
    return optax.chain(optax.add_decayed_weights(o.weight_decay), sgd)
  if not o.weight_decay:
    return optax.adam(lr)
  return optax.adamw(lr, weight_decay=o.weight_decay)


def compile_step(mesh: jax.sharding.Mesh, plan: plan_lib.PrivacyPlan, model: Any, loss_fn: Any,
                 tx: optax.GradientTransformation, *, dp: config_lib.DPSettings,
                 padding_microbatch_rows: int | None, strategy: str, streamed: bool,
                 head: models.TaskHead) -> tuple[TrainStep | StreamedStep, str]:
  """The compiled step and the per-example clipping method it uses ('ghost' or 'vmap').

  With a privacy unit (``plan.privacy_unit``), each unit's rows are clipped as one sum
  (``unit_size`` = ``plan.max_rows_per_unit``) and the padding microbatches hold whole units.
  """
  unit = plan.max_rows_per_unit if plan.privacy_unit else None
  clipped_sum = clipping.make_clipped_sum(dp.clipping, model, loss_fn, plan.l2_norm_clip,
                                          microbatch_size=dp.microbatch_size, head=head,
                                          unit_size=unit)
  method = clipping.resolve_method(dp.clipping, model)
  logging.info("per-example clipping: %s%s", method, f", per unit of k={unit} rows" if unit
               else "")
  build = build_streamed_chunk if streamed else build_train_chunk
  microbatch = padding_microbatch(padding_microbatch_rows, method, dp.microbatch_size, unit)
  return build(mesh, loss_fn, clipped_sum, tx, plan.l2_norm_clip, strategy,
               padding_microbatch=microbatch, unit_size=unit), method

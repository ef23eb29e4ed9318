"""The compiled training step: many DP-SGD updates in one device call.

``build_train_chunk`` returns ``run(state, features, labels, indices, mask, active)`` that runs
a ``lax.scan`` of updates. Each update gathers each device's Poisson-sampled rows from the
rows it holds, computes the sum of clipped per-example gradients on that device, all-reduces
the sums across the mesh with ONE ``psum`` (clipping always precedes any reduction), then the
optax chain adds the noise once and applies the optimizer. The sampled indices come from the
host (:mod:`fastdp_jax.sampling`); nothing else crosses between host and device per update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fastdp_jax import clipping
from fastdp_jax.parallel import AXIS

# (params, batch, mask) -> (sum of clipped per-example gradients, ClipStats)
ClippedSumFn = Callable[[Any, Any, jax.Array], tuple[Any, clipping.ClipStats]]


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


def vmap_clipped_sum(loss_fn: clipping.LossFn, l2_norm_clip: float | None,
                     microbatch_size: int | None = None) -> ClippedSumFn:
  """The ``vmap`` per-example clipping method as a :data:`ClippedSumFn`."""
  def fn(params, batch, mask):
    return clipping.clipped_grad_sum_with_stats(loss_fn, params, batch, l2_norm_clip, mask,
                                                microbatch_size=microbatch_size)
  return fn


def build_train_chunk(mesh: jax.sharding.Mesh, loss_fn: clipping.LossFn,
                      clipped_sum: ClippedSumFn, tx: optax.GradientTransformation,
                      l2_norm_clip: float | None) -> Callable:
  """Compiles ``run(state, features, labels, indices, mask, active) -> (state, metrics)``.

  Args:
    mesh: the 1-D ``data`` mesh.
    loss_fn: ``loss_fn(params, (x, y)) -> scalar`` of one example (for the loss metric).
    clipped_sum: the per-device sum of clipped per-example gradients.
    tx: the optax chain (privatize, then the optimizer).
    l2_norm_clip: C, or None when DP is off (only used to count clipped examples).

  Returns:
    A jitted function. ``indices``/``mask`` are [steps, num_devices, capacity] per-device
    local row indices of each update's Poisson batch; ``active`` [steps] bool lets a call run
    fewer updates than its compiled length without recompiling. ``metrics`` holds per-update
    ``loss_sum, count, clipped, nonfinite`` [steps].
  """

  def local_sum(params, x, y, idx, mask):
    # One device's block: idx/mask [1, capacity]; x, y its own rows.
    idx, mask = idx[0], mask[0]
    batch = (x[idx], y[idx])
    # Parameters are replicated; per-example gradients inside shard_map need them marked
    # device-varying, or their gradients come back summed across devices (JAX 0.10).
    params = jax.lax.pcast(params, AXIS, to="varying")
    grads, stats = clipped_sum(params, batch, mask)
    losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
    clipped = stats.norms > (l2_norm_clip if l2_norm_clip is not None else jnp.inf)
    local = dict(loss_sum=jnp.sum(jnp.where(mask, losses, 0.0)),
                 count=jnp.sum(mask).astype(jnp.float32),
                 clipped=jnp.sum(clipped & mask).astype(jnp.float32),
                 nonfinite=jnp.sum(stats.nonfinite).astype(jnp.float32))
    # The only cross-device communication of an update: one all-reduce of the clipped sums.
    return jax.lax.psum((grads, local), AXIS)

  sharded_sum = jax.shard_map(local_sum, mesh=mesh,
                              in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
                              out_specs=(P(), P()))

  def one_step(carry, inputs):
    state, x, y = carry
    idx, mask, active = inputs

    def do(state):
      grads, m = sharded_sum(state.params, x, y, idx, mask)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return State(params=params, opt_state=opt_state, step=state.step + 1), m

    def skip(state):
      zero = jnp.zeros((), jnp.float32)
      return state, dict(loss_sum=zero, count=zero, clipped=zero, nonfinite=zero)

    state, m = jax.lax.cond(active, do, skip, state)
    return (state, x, y), m

  @jax.jit
  def run(state, x, y, indices, mask, active):
    (state, _, _), metrics = jax.lax.scan(one_step, (state, x, y), (indices, mask, active))
    return state, metrics

  return run

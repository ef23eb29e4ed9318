"""Per-example gradient clipping: the sum of per-example gradients, each clipped to norm C.

The sum has L2 sensitivity C with respect to adding or removing one example, which is what the
Gaussian noise in :mod:`fastdp_jax.noise` is calibrated to. Padding rows (``mask == 0``)
contribute exactly zero, and a per-example gradient that is not finite is zeroed (and counted)
rather than propagated into the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]  # (params, one example) -> scalar loss


class ClipStats(NamedTuple):
  """Per-example diagnostics of a clipped sum.

  Attributes:
    norms: [batch] L2 norm of each example's gradient before clipping (0 for padding).
    nonfinite: [batch] bool, True where the gradient was not finite and was zeroed.
    losses: optional [batch] per-example losses, when the method computed them anyway
      (ghost clipping does); the step then reports them instead of running another
      forward pass. ``None`` otherwise.
  """

  norms: jax.Array
  nonfinite: jax.Array
  losses: jax.Array | None = None


def _per_example_norms(grads: PyTree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(grads)
  sq = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves)
  return jnp.sqrt(sq)


def _clip_and_sum_chunk(loss_fn: LossFn, params: PyTree, batch: PyTree, l2_norm_clip: float,
                        mask: jax.Array) -> tuple[PyTree, ClipStats]:
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
  norms = _per_example_norms(grads)
  nonfinite = ~jnp.isfinite(norms)
  # min(1, C / norm); a zero norm gets factor 1 (its gradient is zero anyway).
  factor = jnp.minimum(1.0, l2_norm_clip / jnp.where(norms > 0, norms, 1.0))
  factor = jnp.where(nonfinite | ~mask, 0.0, factor)
  # where(), not multiplication: 0 * inf would be NaN.
  summed = jax.tree_util.tree_map(
      lambda g: jnp.sum(jnp.where(
          (factor > 0).reshape((-1,) + (1,) * (g.ndim - 1)),
          g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), 0), axis=0), grads)
  return summed, ClipStats(norms=jnp.where(mask & ~nonfinite, norms, 0.0),
                           nonfinite=nonfinite & mask)


def clipped_grad_sum(loss_fn: LossFn, params: PyTree, batch: PyTree,
                     l2_norm_clip: float | None, mask: jax.Array | None = None, *,
                     microbatch_size: int | None = None) -> tuple[PyTree, jax.Array]:
  """Sum over a batch of per-example gradients, each clipped to L2 norm ``l2_norm_clip``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
    params: the parameter pytree.
    batch: a pytree whose leaves have a leading batch axis [batch, ...].
    l2_norm_clip: C > 0. ``None`` disables clipping (non-private baselines): the plain sum
      of gradients, computed with one backward pass.
    mask: [batch] bool or 0/1; rows with 0 are padding and contribute exactly zero.
    microbatch_size: process the batch in chunks of this many examples with ``lax.scan`` to
      bound the memory of materialised per-example gradients; must divide the batch size.

  Returns:
    ``(grad_sum, per_example_norms)``: a pytree like ``params`` and the [batch] unclipped
    per-example gradient norms (0 for padding and for zeroed non-finite rows).
  """
  grad_sum, stats = clipped_grad_sum_with_stats(loss_fn, params, batch, l2_norm_clip, mask,
                                                microbatch_size=microbatch_size)
  return grad_sum, stats.norms


def clipped_grad_sum_with_stats(loss_fn: LossFn, params: PyTree, batch: PyTree,
                                l2_norm_clip: float | None, mask: jax.Array | None = None, *,
                                microbatch_size: int | None = None) -> tuple[PyTree, ClipStats]:
  """Like :func:`clipped_grad_sum`, returning :class:`ClipStats` (norms and non-finite rows)."""
  n = jax.tree_util.tree_leaves(batch)[0].shape[0]
  mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask).astype(bool)
  if l2_norm_clip is None:
    def masked_total(p):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
      return jnp.sum(jnp.where(mask, losses, 0.0))
    grads = jax.grad(masked_total)(params)
    zero = jnp.zeros((n,), jnp.float32)
    return grads, ClipStats(norms=zero, nonfinite=zero.astype(bool))
  if l2_norm_clip <= 0:
    raise ValueError(f"{l2_norm_clip=} must be positive")
  if microbatch_size is None or microbatch_size >= n:
    return _clip_and_sum_chunk(loss_fn, params, batch, l2_norm_clip, mask)
  if n % microbatch_size:
    raise ValueError(f"{microbatch_size=} must divide the batch size {n}")
  chunks = n // microbatch_size
  reshape = lambda x: x.reshape((chunks, microbatch_size) + x.shape[1:])
  xs = (jax.tree_util.tree_map(reshape, batch), reshape(mask))

  def body(acc, chunk):
    b, m = chunk
    s, st = _clip_and_sum_chunk(loss_fn, params, b, l2_norm_clip, m)
    return jax.tree_util.tree_map(jnp.add, acc, s), st

  init = jax.tree_util.tree_map(jnp.zeros_like, params)
  total, st = jax.lax.scan(body, init, xs)
  return total, ClipStats(norms=st.norms.reshape(n), nonfinite=st.nonfinite.reshape(n))

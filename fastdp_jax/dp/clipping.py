"""Per-example gradient clipping: the sum of per-example gradients, each clipped to norm C.

The sum has L2 sensitivity C with respect to adding or removing one example, which is what the
Gaussian noise in :mod:`fastdp_jax.dp.noise` is calibrated to. Padding rows (``mask == 0``)
contribute exactly zero, and a per-example gradient that is not finite is zeroed (and counted)
rather than propagated into the update: a run never stops because of one row.

The per-example gradients, their clipping and the sum are ``jax_privacy.clipping.clipped_grad``
(the field's implementation of this primitive); this module adds the whole-example zeroing of
non-finite gradients, the statistics of :class:`ClipStats` and a fixed-length microbatch loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax_privacy import clipping as jp_clipping

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


def _zero_if_nonfinite(grad: PyTree) -> PyTree:
  """One example's gradient, or zeros where its norm is not finite (a NaN or inf anywhere in
  it, or squares that overflow)."""
  # jax_privacy's nan_safe zeroes the non-finite COORDINATES and keeps (and clips) the rest of
  # such a gradient; we drop the whole example, as before, so that a broken row moves nothing.
  # The same expression as the norm clipped_grad reports (return_grad_norms), which XLA can
  # share.
  finite = jnp.isfinite(optax.tree.norm(grad))
  return jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grad)


def _clip_and_sum_chunk(loss_fn: LossFn, params: PyTree, batch: PyTree, l2_norm_clip: float,
                        mask: jax.Array) -> tuple[PyTree, ClipStats]:
  clipped_sum = jp_clipping.clipped_grad(
      loss_fn, l2_clip_norm=l2_norm_clip,
      batch_argnums=1, keep_batch_dim=False,  # loss_fn takes ONE example, no batch axis
      return_grad_norms=True, pre_clipping_transform=_zero_if_nonfinite)
  summed, aux = clipped_sum(params, batch, is_padding_example=~mask)
  # clipped_grad reports the norm of each gradient before the transform and clipping; a
  # non-finite norm is the row that _zero_if_nonfinite zeroed: the count comes from it.
  nonfinite = ~jnp.isfinite(aux.grad_norms)
  return summed, ClipStats(norms=jnp.where(mask & ~nonfinite, aux.grad_norms, 0.0),
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
  # Our own loop rather than clipped_grad's microbatch_size: that one stops after the last
  # microbatch holding a real row (its trip count, hence the step's duration, would follow
  # the realised Poisson batch size) and interleaves rows across microbatches; this scan has a
  # fixed trip count and sums the chunks in order.
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

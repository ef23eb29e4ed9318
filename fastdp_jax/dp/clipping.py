"""Per-example gradient clipping: the sum of per-example gradients, each clipped to norm C.

The sum has L2 sensitivity C with respect to adding or removing one example, which is what the
Gaussian noise in :mod:`fastdp_jax.dp.noise` is calibrated to. Padding rows (``mask == 0``)
contribute exactly zero, and a per-example gradient that is not finite is zeroed (and counted)
rather than propagated into the update: a run never stops because of one row.

Two methods compute the sum:

* ``'vmap'``, here: the per-example gradients, their clipping and the sum are
  ``jax_privacy.clipping.clipped_grad`` (the field's implementation of this primitive); this
  module adds the whole-example zeroing of non-finite gradients, the statistics of
  :class:`~fastdp_jax.dp.clip_types.ClipStats` and a fixed-length microbatch loop. Any model.
* ``'ghost'``, :mod:`fastdp_jax.dp.ghost`: the same sum from activations and output gradients,
  at the cost of a non-private step, for the dense and embedding layers of
  :class:`fastdp_jax.models.MLP`.

With a privacy unit of at most k rows (``unit_size=k``, a packed batch whose int8 mask marks
each unit's first row: :func:`fastdp_jax.dp.clip_types.unit_rows`) both methods clip each
unit's SUMMED gradient instead (:func:`unit_clipped_grad_sum_with_stats`; ghost by band
norms): the sum then has sensitivity C with respect to adding or removing one whole unit.

:func:`make_clipped_sum` is the ``dp.clipping`` choice between them (``'auto'``: ghost when
every parametrised layer of the model supports it, else vmap). This module imports the ghost
module and never the reverse; the types both methods return are in
:mod:`fastdp_jax.dp.clip_types`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax_privacy import clipping as jp_clipping

from fastdp_jax.dp import clip_types
from fastdp_jax.dp import ghost
from fastdp_jax import models
from fastdp_jax.config import CLIPPING_METHODS

METHODS = CLIPPING_METHODS  # defined in fastdp_jax.config, which must not import JAX
PyTree = clip_types.PyTree


def _zero_if_nonfinite(grad: PyTree) -> PyTree:
  """One example's gradient, or zeros where its norm is not finite (a NaN or inf anywhere in
  it, or squares that overflow)."""
  # jax_privacy's nan_safe zeroes the non-finite COORDINATES and keeps (and clips) the rest of
  # such a gradient; we drop the whole example, so that a broken row moves nothing.
  # The same expression as the norm clipped_grad reports (return_grad_norms), which XLA can
  # share.
  finite = jnp.isfinite(optax.tree.norm(grad))
  return jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grad)


def _clip_and_sum_chunk(loss_fn: clip_types.LossFn, params: PyTree, batch: PyTree,
                        l2_norm_clip: float, mask: jax.Array
                        ) -> tuple[PyTree, clip_types.ClipStats]:
  clipped_sum = jp_clipping.clipped_grad(
      loss_fn, l2_clip_norm=l2_norm_clip,
      batch_argnums=1, keep_batch_dim=False,  # loss_fn takes ONE example, no batch axis
      return_grad_norms=True, pre_clipping_transform=_zero_if_nonfinite)
  summed, aux = clipped_sum(params, batch, is_padding_example=~mask)
  # clipped_grad reports the norm of each gradient before the transform and clipping; a
  # non-finite norm is the row that _zero_if_nonfinite zeroed: the count comes from it.
  nonfinite = ~jnp.isfinite(aux.grad_norms)
  return summed, clip_types.ClipStats(norms=jnp.where(mask & ~nonfinite, aux.grad_norms, 0.0),
                                      nonfinite=nonfinite & mask)


def clipped_grad_sum(loss_fn: clip_types.LossFn, params: PyTree, batch: PyTree,
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


def clipped_grad_sum_with_stats(loss_fn: clip_types.LossFn, params: PyTree, batch: PyTree,
                                l2_norm_clip: float | None, mask: jax.Array | None = None, *,
                                microbatch_size: int | None = None
                                ) -> tuple[PyTree, clip_types.ClipStats]:
  """Like :func:`clipped_grad_sum`, returning a :class:`~fastdp_jax.dp.clip_types.ClipStats`
  (norms and non-finite rows)."""
  n = jax.tree_util.tree_leaves(batch)[0].shape[0]
  mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask).astype(bool)
  if l2_norm_clip is None:
    def masked_total(p):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
      return jnp.sum(jnp.where(mask, losses, 0.0))
    grads = jax.grad(masked_total)(params)
    zero = jnp.zeros((n,), jnp.float32)
    return grads, clip_types.ClipStats(norms=zero, nonfinite=zero.astype(bool))
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
  return total, clip_types.ClipStats(norms=st.norms.reshape(n),
                                     nonfinite=st.nonfinite.reshape(n))


def _unit_chunk(loss_fn: clip_types.LossFn, params: PyTree, batch: PyTree,
                l2_norm_clip: float, rows: clip_types.UnitRows
                ) -> tuple[PyTree, clip_types.ClipStats]:
  """One packed block: per-row gradients, summed into units, each unit's sum clipped."""
  n = rows.keep.shape[0]
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
  units = rows.unit  # row r's gradient joins its unit's sum: never clipped alone
  def to_units(g):
    # where, not a product: a dropped or empty row's gradient may be NaN (garbage features).
    g = jnp.where(rows.keep.reshape((n,) + (1,) * (g.ndim - 1)), g, jnp.zeros((), g.dtype))
    return jax.ops.segment_sum(g, units, num_segments=n, indices_are_sorted=True)
  sums = jax.tree_util.tree_map(to_units, grads)  # [n units, ...], by unit id
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(v.reshape(n, -1)), axis=1)
                       for v in jax.tree_util.tree_leaves(sums)))
  finite = jnp.isfinite(norms)  # a unit with a non-finite gradient is zeroed whole
  factor = jnp.where(finite, jnp.minimum(1.0, l2_norm_clip / jnp.where(norms > 0, norms, 1.0)),
                     0.0)
  clipped = jax.tree_util.tree_map(
      lambda v: jnp.tensordot(factor.astype(v.dtype), jnp.where(
          finite.reshape((n,) + (1,) * (v.ndim - 1)), v, jnp.zeros((), v.dtype)), axes=1),
      sums)
  return clipped, clip_types.ClipStats(
      norms=clip_types.at_first_rows(jnp.where(finite, norms, 0.0), rows),
      nonfinite=clip_types.at_first_rows(~finite, rows))


def unit_clipped_grad_sum_with_stats(loss_fn: clip_types.LossFn, params: PyTree, batch: PyTree,
                                     l2_norm_clip: float | None, mask: jax.Array,
                                     unit_size: int, *, microbatch_size: int | None = None
                                     ) -> tuple[PyTree, clip_types.ClipStats]:
  """Sum over units of each unit's summed row gradients, clipped as a whole to norm C.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE row.
    params: the parameter pytree.
    batch: a pytree of row arrays [n, ...]: packed units, each unit's rows contiguous.
    l2_norm_clip: C > 0, or ``None`` (non-private): the plain sum of the kept rows'
      gradients.
    mask: [n] int8: 0 empty slot, 2 a unit's first row, 1 a further row of that unit
      (:func:`fastdp_jax.dp.clip_types.unit_rows`).
    unit_size: k, the most rows a unit has (the slots a unit may span).
    microbatch_size: process the batch in chunks of ``microbatch_size * k`` row slots (the
      rows of that many full units), bounding the memory of materialised per-row and
      per-unit gradients; each chunk is a block that no unit straddles, and must divide n.

  Returns:
    ``(grad_sum, ClipStats)``: each unit's norm (0 if zeroed) and non-finite flag at its
    first row slot, 0/False elsewhere; ``losses`` None.
  """
  clip_types.check_unit_size(unit_size)
  n = jax.tree_util.tree_leaves(batch)[0].shape[0]
  mask = jnp.asarray(mask)
  if l2_norm_clip is None:  # the unit changes nothing without clipping: one backward pass
    grads, _ = clipped_grad_sum_with_stats(loss_fn, params, batch, None,
                                           clip_types.unit_rows(mask, unit_size).keep)
    zero = jnp.zeros((n,), jnp.float32)
    return grads, clip_types.ClipStats(norms=zero, nonfinite=zero.astype(bool))
  if l2_norm_clip <= 0:
    raise ValueError(f"{l2_norm_clip=} must be positive")
  chunk = n if microbatch_size is None else min(microbatch_size * unit_size, n)
  if n % chunk:
    raise ValueError(f"{microbatch_size=} units of {unit_size} row slots ({chunk} rows per"
                     f" chunk) must divide the {n} row slots of a batch")
  reshape = lambda v: v.reshape((n // chunk, chunk) + v.shape[1:])

  def body(acc, part):
    b, m = part
    s, st = _unit_chunk(loss_fn, params, b, l2_norm_clip, clip_types.unit_rows(m, unit_size))
    return jax.tree_util.tree_map(jnp.add, acc, s), st

  # A fixed trip count (the step's duration does not follow the realised batch), in order.
  init = jax.tree_util.tree_map(jnp.zeros_like, params)
  total, st = jax.lax.scan(body, init, (jax.tree_util.tree_map(reshape, batch), reshape(mask)))
  return total, clip_types.ClipStats(norms=st.norms.reshape(n),
                                     nonfinite=st.nonfinite.reshape(n))


def resolve_method(method: str, model: nnx.Module) -> str:
  """The clipping method that ``method`` means for ``model``: ``'ghost'`` or ``'vmap'``.

  Raises:
    ValueError: for an unknown method, or ``'ghost'`` on a model it does not support.
  """
  if method not in METHODS:
    raise ValueError(f"dp.clipping={method!r} must be one of {METHODS}")
  if method == "vmap":
    return "vmap"
  problems = ghost.unsupported_layers(model)
  if method == "ghost" and problems:
    raise ValueError("dp.clipping='ghost' does not support this model: " + "; ".join(problems)
                     + " (use 'auto' or 'vmap')")
  return "vmap" if problems else "ghost"


def make_clipped_sum(method: str, model: nnx.Module, loss_fn: clip_types.LossFn,
                     l2_norm_clip: float | None, *,
                     microbatch_size: int | None = None,
                     head: models.TaskHead = models.BINARY,
                     unit_size: int | None = None) -> clip_types.ClippedSumFn:
  """The ``dp.clipping`` choice: a per-device ``ClippedSumFn`` for the training step.

  Args:
    method: ``'auto'`` (ghost when :func:`fastdp_jax.dp.ghost.unsupported_layers` finds
      nothing, else vmap), ``'ghost'`` or ``'vmap'``.
    model: the NNX model (inspected, not called).
    loss_fn: ``loss_fn(params, (x, y)) -> scalar`` of one example, used by the vmap path and
      by the non-private sum (it must be :func:`fastdp_jax.models.example_loss` with
      ``head`` for the ghost path, which computes the same loss on the whole batch).
    l2_norm_clip: C; ``None`` when DP is off: the plain (unclipped) masked sum of gradients
      by one backward pass, whatever the method.
    microbatch_size: chunk size of the vmap path (ghost needs no chunking: its memory is that
      of the activations).
    head: the task (its per-example loss is the ghost path's).
    unit_size: None: every row is its own privacy unit (clipped alone; ``mask`` bool or
      0/1). k: the batch is packed units of at most k contiguous rows (``mask`` int8: 0
      empty, 2 a unit's first row, 1 a further row) and each unit's summed gradient is
      clipped to C as a whole (:func:`unit_clipped_grad_sum_with_stats`, or ghost's band
      norms); ``microbatch_size`` then counts units of k row slots.

  Returns:
    ``fn(params, batch, mask) -> (grad_sum, ClipStats)``; with ``unit_size`` a unit's norm
    and non-finite flag sit at its first row slot, losses per row or None.
  """
  clip_types.check_unit_size(unit_size)
  resolved = resolve_method(method, model)
  if (l2_norm_clip is None or resolved == "vmap") and unit_size is not None:
    def unit_fn(params, batch, mask):
      return unit_clipped_grad_sum_with_stats(loss_fn, params, batch, l2_norm_clip, mask,
                                              unit_size, microbatch_size=microbatch_size)
    return unit_fn
  if l2_norm_clip is None or resolved == "vmap":
    def fn(params, batch, mask):
      return clipped_grad_sum_with_stats(loss_fn, params, batch, l2_norm_clip, mask,
                                         microbatch_size=microbatch_size)
    return fn
  graphdef, _ = nnx.split(model, nnx.Param)
  return ghost.ghost_clipped_sum(l2_norm_clip, head.losses, graphdef=graphdef,
                                 unit_size=unit_size)

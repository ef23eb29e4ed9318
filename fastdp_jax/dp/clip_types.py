"""What a per-example clipping method hands the training step: the clipped sum and its stats.

Both methods, the per-example gradients of :mod:`fastdp_jax.dp.clipping` and the ghost norms
of :mod:`fastdp_jax.dp.ghost`, are a :data:`ClippedSumFn` returning a :class:`ClipStats`;
:func:`fastdp_jax.dp.clipping.make_clipped_sum` chooses one and :mod:`fastdp_jax.step` calls
it. These types have a module of their own so that the clipping module can import the ghost
module without the ghost module importing it back; so is what both methods (and the step) read
off a packed unit batch's mask (:func:`unit_rows`).

A packed unit batch (privacy units, ``unit_size=k``) is a block of n row slots whose int8 mask
says, per slot: 0 empty, 2 the FIRST row of a sampled unit, 1 a further row of the unit whose
first row is the nearest 2 before it. A unit's rows (1..k) are contiguous and never straddle
a block (a microbatch or vmap chunk), so each block is clipped on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]  # (params, one example) -> scalar loss


class ClipStats(NamedTuple):
  """Per-example (or per-unit) diagnostics of a clipped sum.

  With privacy units (``unit_size=k``, a packed batch) the clipped thing is a unit's summed
  gradient; its norm and non-finite flag are reported at the unit's FIRST row slot (mask 2)
  and are 0/False at every other slot, so the arrays keep the batch's shape [batch] and a
  sum over them counts units.

  Attributes:
    norms: [batch] L2 norm of each example's (unit's) gradient before clipping (0 for empty
      slots, for a unit's further rows and for zeroed non-finite gradients).
    nonfinite: [batch] bool, True where the gradient was not finite and was zeroed (for a
      unit: at its first row).
    losses: optional [batch] per-example losses, when the method computed them anyway
      (ghost clipping does); the step then reports them instead of running another
      forward pass. ``None`` otherwise.
  """

  norms: jax.Array
  nonfinite: jax.Array
  losses: jax.Array | None = None


# (params, batch, mask) -> (sum of clipped per-example gradients, ClipStats)
ClippedSumFn = Callable[[Any, Any, jax.Array], tuple[Any, ClipStats]]


def check_unit_size(unit_size: int | None) -> None:
  """Refuses a ``unit_size`` that is neither None (rows) nor a positive int k."""
  if unit_size is not None and (isinstance(unit_size, bool) or not isinstance(unit_size, int)
                                or unit_size <= 0):
    raise ValueError(f"unit_size={unit_size!r} must be a positive integer (rows per unit) or"
                     " None (each row its own unit)")


class UnitRows(NamedTuple):
  """What a packed unit block's int8 mask says about its n row slots (see the module doc).

  Attributes:
    keep: [n] bool, the rows that count: present (mask > 0), after a unit's first row in the
      block, and fewer than k slots after it. The host never sends other rows; a row that
      breaks these rules (a unit longer than k, or the tail of a unit cut by a block's start)
      is dropped rather than clipped with the wrong unit, because ghost clipping's band of
      width k would not see all of its pairs and its unit norm would come out too small.
    start: [n] bool, a unit's first row (mask == 2).
    unit: [n] int32, the unit of each row: 0, 1, ... in order of the first rows (the
      segment id of ``jax.ops.segment_sum``; sorted, in [0, n)). Meaningful where ``keep``.
    first: [n] int32, the slot of each row's unit's first row (meaningful where ``keep``).
  """

  keep: jax.Array
  start: jax.Array
  unit: jax.Array
  first: jax.Array


def unit_rows(mask: jax.Array, unit_size: int) -> UnitRows:
  """The units of a packed block from its int8 ``mask`` [n] (0 empty, 2 first row, 1 further).

  Raises:
    ValueError: for a bool mask: that is a row-level batch (or the old layout of k slots
      per unit), whose rows would all be taken for continuations of no unit.
  """
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    raise ValueError("a unit batch has an int8 mask (0 empty, 2 a unit's first row, 1 a"
                     " further row of it); got a bool (row-level) mask")
  n = mask.shape[0]
  slot = jnp.arange(n, dtype=jnp.int32)
  start = mask == 2
  # -1 before the block's first unit: such rows belong to a unit cut by the block's start.
  first = jax.lax.cummax(jnp.where(start, slot, -1))
  keep = (mask > 0) & (first >= 0) & (slot - first < unit_size)
  unit = jnp.maximum(jnp.cumsum(start, dtype=jnp.int32) - 1, 0)
  return UnitRows(keep=keep, start=start, unit=unit, first=jnp.maximum(first, 0))


def at_first_rows(per_unit: jax.Array, rows: UnitRows) -> jax.Array:
  """A per-unit value ``per_unit`` [n] (indexed by unit id) placed at each unit's first row
  slot, zero (False) elsewhere: the layout of :class:`ClipStats` in a unit batch."""
  return jnp.where(rows.start, per_unit[rows.unit], jnp.zeros((), per_unit.dtype))

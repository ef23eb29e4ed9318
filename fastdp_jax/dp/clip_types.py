"""What a per-example clipping method hands the training step: the clipped sum and its stats.

Both methods, the per-example gradients of :mod:`fastdp_jax.dp.clipping` and the ghost norms
of :mod:`fastdp_jax.dp.ghost`, are a :data:`ClippedSumFn` returning a :class:`ClipStats`;
:func:`fastdp_jax.dp.clipping.make_clipped_sum` chooses one and :mod:`fastdp_jax.step` calls
it. These types have a module of their own so that the clipping module can import the ghost
module without the ghost module importing it back; so are the two helpers both methods use
for privacy units (a flat batch of unit slots of k row slots each).
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

  With a privacy unit of k row slots (``unit_size=k``) the clipped thing is a unit's summed
  gradient, so ``norms`` and ``nonfinite`` have one entry per unit slot, [batch // k];
  ``losses`` stay per row.

  Attributes:
    norms: [batch] (or [units]) L2 norm of each example's (unit's) gradient before clipping
      (0 for padding and for empty unit slots).
    nonfinite: [batch] (or [units]) bool, True where the gradient was not finite and was
      zeroed.
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


def units_present(mask: jax.Array, unit_size: int) -> jax.Array:
  """[units] bool: which unit slots hold at least one real row of the flat row ``mask``
  [units * k] (row slot j of unit slot u at index ``u * k + j``).

  Raises:
    ValueError: when the batch is not a whole number of unit slots.
  """
  if mask.shape[0] % unit_size:
    raise ValueError(f"a batch of {mask.shape[0]} rows is not a whole number of units of"
                     f" {unit_size} row slots")
  return jnp.any(mask.reshape(mask.shape[0] // unit_size, unit_size), axis=1)

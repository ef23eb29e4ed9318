"""What a per-example clipping method hands the training step: the clipped sum and its stats.

Both methods, the per-example gradients of :mod:`fastdp_jax.dp.clipping` and the ghost norms
of :mod:`fastdp_jax.dp.ghost`, are a :data:`ClippedSumFn` returning a :class:`ClipStats`;
:func:`fastdp_jax.dp.clipping.make_clipped_sum` chooses one and :mod:`fastdp_jax.step` calls
it. These types have a module of their own so that the clipping module can import the ghost
module without the ghost module importing it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

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


# (params, batch, mask) -> (sum of clipped per-example gradients, ClipStats)
ClippedSumFn = Callable[[Any, Any, jax.Array], tuple[Any, ClipStats]]

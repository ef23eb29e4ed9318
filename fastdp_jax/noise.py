"""The Gaussian mechanism as an optax transform: noise once on the clipped sum, then the mean.

``privatize(l2_norm_clip, noise_multiplier, expected_batch_size, key)`` takes the SUM of
clipped per-example gradients, adds ``N(0, (noise_multiplier * l2_norm_clip)^2)`` to every
coordinate once per optimizer update, and divides by the public expected batch size (never the
realised one, which would leak the batch size). Chain it before the optimizer::

  tx = optax.chain(noise.privatize(C, sigma, B, key), optax.sgd(lr))

The noise of update t uses ``fold_in(key, t)``: keys are never reused, and every device and
process holding the same key adds the same noise, so noise is added exactly once to the global
sum.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class PrivatizeState(NamedTuple):
  """State of :func:`privatize`.

  Attributes:
    key: uint32[2] raw PRNG key of the noise (secret; checkpointed, never logged).
    count: int32 number of updates done so far (the step whose noise comes next).
  """

  key: jax.Array
  count: jax.Array


def noise_key(noise_seed: int | None) -> tuple[np.ndarray, bool]:
  """The noise key: from the OS's entropy, or from an integer seed for reproducible tests.

  Returns:
    ``(uint32[2] key data, deterministic)``.
  """
  if noise_seed is None:
    return np.frombuffer(os.urandom(8), dtype=np.uint32).copy(), False
  return np.asarray(jax.random.key_data(jax.random.key(int(noise_seed))), np.uint32), True


def privatize(l2_norm_clip: float, noise_multiplier: float, expected_batch_size: float,
              key: jax.typing.ArrayLike) -> optax.GradientTransformation:
  """Adds Gaussian noise of std ``noise_multiplier * l2_norm_clip`` to a gradient sum, then
  divides by ``expected_batch_size``.

  Args:
    l2_norm_clip: C, the sensitivity of the incoming sum.
    noise_multiplier: sigma >= 0 (0: no noise, for non-private baselines).
    expected_batch_size: the public expected batch size q * N.
    key: uint32[2] raw key data of the noise.

  Returns:
    An optax ``GradientTransformation``.
  """
  if noise_multiplier < 0:
    raise ValueError(f"{noise_multiplier=} must be non-negative")
  if expected_batch_size <= 0:
    raise ValueError(f"{expected_batch_size=} must be positive")
  stddev = float(noise_multiplier) * float(l2_norm_clip)
  key = jnp.asarray(key, jnp.uint32)

  def init_fn(params):
    del params
    return PrivatizeState(key=key, count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    if stddev > 0:
      step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
      leaves, treedef = jax.tree_util.tree_flatten(updates)
      keys = jax.random.split(step_key, len(leaves))
      leaves = [g + stddev * jax.random.normal(k, g.shape, g.dtype)
                for g, k in zip(leaves, keys)]
      updates = jax.tree_util.tree_unflatten(treedef, leaves)
    updates = jax.tree_util.tree_map(lambda g: g / expected_batch_size, updates)
    return updates, PrivatizeState(key=state.key, count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)

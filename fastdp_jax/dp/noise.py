"""The Gaussian mechanism as an optax transform: noise once on the clipped sum, then the mean.

``privatize(l2_norm_clip, noise_multiplier, expected_batch_size, key)`` takes the SUM of
clipped per-example gradients, adds ``N(0, (noise_multiplier * l2_norm_clip)^2)`` to every
coordinate once per optimizer update, and divides by the public expected batch size (never the
realised one, which would leak the batch size). Chain it before the optimizer::

  tx = optax.chain(noise.privatize(C, sigma, B, key), optax.sgd(lr))

The noise key is 128 bits (uint32[4]): two independent 64-bit Threefry keys whose bit streams
are XOR-ed, so that guessing the noise means guessing both halves (JAX's own Threefry key is 64
bits). This is why the noise is not ``jax_privacy.noise_addition.gaussian_privatizer`` (the same
mechanism, with ``optax.scale(1 / B)`` after it): that one draws ``jax.random.normal`` from one
JAX key, split once per update and once per leaf, so it would give up the 128-bit key and, with
its different key schedule, change every noise value (reproducibility runs included). The noise of update t folds t into both halves: keys are never reused, and every device
and process holding the same key adds the same noise, so noise is added exactly once to the
global sum. The key lives in the optimizer state (a runtime argument of the compiled step,
never a compile-time constant); checkpoints store it apart, owner-only
(:mod:`fastdp_jax.checkpoint`).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastdp_jax import errors


class PrivatizeState(NamedTuple):
  """State of :func:`privatize`.

  Attributes:
    key: uint32[4] key data of the noise (secret; checkpointed apart, never logged).
    count: int32 number of updates done so far (the step whose noise comes next).
  """

  key: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count


KEY_WORDS = 4  # uint32 words: 128 bits


def noise_key(noise_seed: int | None) -> tuple[np.ndarray, bool]:
  """The noise key: 128 bits of OS entropy, or derived from an integer seed (reproducible).

  Returns:
    ``(uint32[4] key data, fixed)``; ``fixed`` is True when the key came from a seed: such a
    run's noise is known to anyone who knows the seed, and it has no DP guarantee.
  """
  if noise_seed is None:
    return np.frombuffer(os.urandom(4 * KEY_WORDS), dtype=np.uint32).copy(), False
  if isinstance(noise_seed, bool) or not isinstance(noise_seed, (int, np.integer)):
    raise errors.ConfigError(f"dp.noise_seed={noise_seed!r} must be an integer")
  seq = np.random.SeedSequence([int(noise_seed) & (2**64 - 1), 0x4E4F4953])
  return seq.generate_state(KEY_WORDS, np.uint32), True


_PARITY32 = np.uint32(0x1BD11BDA)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array,
                  x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32-20 (Random123), unrolled: the block function behind ``jax.random``."""
  ks = (k0, k1, k0 ^ k1 ^ _PARITY32)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for s in range(5):
    for r in _ROTATIONS[s % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0 = x0 + ks[(s + 1) % 3]
    x1 = x1 + ks[(s + 2) % 3] + np.uint32(s + 1)
  return x0, x1


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``jax.random.bits(key, shape, uint32)``, bit for bit, as one fusible expression.

  Why not ``jax.random.bits`` itself: on CPU JAX lowers Threefry as a rolled 5-iteration loop
  whose state goes through memory between iterations; the unrolled rounds below fuse with the
  XOR and the normal transform that follow, and halve the noise's time (W2: 1.2 M normals per
  update, 5.5 -> 2.9 ms). The counters are JAX's partitionable layout (the 64-bit flat index
  as two words, both output words XOR-ed), so the values are the same
  (``tests/dp/test_noise.py`` checks them against ``jax.random.bits``).

  Args:
    key: a typed JAX key (``jax.random.wrap_key_data`` of uint32[2], Threefry).
    shape: the output shape.
  """
  n = math.prod(shape)
  if n >= 2**32:  # the flat index needs its high word: leave it to JAX
    return jax.random.bits(key, shape, jnp.uint32)
  words = jax.random.key_data(key)
  lo = jax.lax.iota(jnp.uint32, n).reshape(shape)
  a, b = _threefry2x32(words[0], words[1], jnp.zeros(shape, jnp.uint32), lo)
  return a ^ b


def gaussian_noise(key: jax.typing.ArrayLike, count: jax.typing.ArrayLike,
                   like: Any) -> Any:
  """Standard normal noise shaped like the pytree ``like``, for update number ``count``.

  Args:
    key: uint32[4] noise key data.
    count: the update number (folded into the key: a fresh draw per update).
    like: a pytree of float arrays.

  Returns:
    A pytree like ``like`` of i.i.d. N(0, 1) values (JAX's normal-from-bits transform applied
    to the XOR of two Threefry streams).
  """
  key = jnp.asarray(key, jnp.uint32)
  halves = [jax.random.fold_in(jax.random.wrap_key_data(key[i:i + 2], impl="threefry2x32"), count)
            for i in (0, 2)]
  leaves, treedef = jax.tree_util.tree_flatten(like)
  keys = [jax.random.split(h, len(leaves)) for h in halves]
  out = []
  for j, g in enumerate(leaves):
    bits = random_bits(keys[0][j], g.shape) ^ random_bits(keys[1][j], g.shape)
    # The construction of jax.random.normal (23 random mantissa bits give a uniform in [1, 2),
    # mapped to (-1, 1), then sqrt(2) * erfinv), not its exact values: its last rounding step
    # differs, by up to 2e-3 in the tails; the distribution is the same Gaussian.
    floats = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(lo, (floats - 1.0) * 2.0 - 1.0)
    out.append((np.sqrt(2.0).astype(np.float32) * jax.lax.erf_inv(u)).astype(g.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def without_key(opt_state: Any) -> Any:
  """``opt_state`` with every noise key zeroed (what a checkpoint's state file holds)."""
  return _map_privatize(opt_state, lambda s: s._replace(key=jnp.zeros_like(s.key)))


def with_key(opt_state: Any, key: jax.typing.ArrayLike) -> Any:
  """``opt_state`` with the noise key set to ``key`` (restoring a checkpoint)."""
  return _map_privatize(opt_state,
                        lambda s: s._replace(key=jnp.asarray(key, s.key.dtype).reshape(s.key.shape)))


def _map_privatize(opt_state: Any, fn) -> Any:
  is_state = lambda x: isinstance(x, PrivatizeState)
  return jax.tree_util.tree_map(lambda x: fn(x) if is_state(x) else x, opt_state,
                                is_leaf=is_state)


def privatize(l2_norm_clip: float, noise_multiplier: float, expected_batch_size: float,
              key: jax.typing.ArrayLike) -> optax.GradientTransformation:
  """Adds Gaussian noise of std ``noise_multiplier * l2_norm_clip`` to a gradient sum, then
  divides by ``expected_batch_size``.

  Args:
    l2_norm_clip: C, the sensitivity of the incoming sum.
    noise_multiplier: sigma >= 0 (0: no noise, for non-private baselines).
    expected_batch_size: the public expected batch size q * N.
    key: uint32[4] key data of the noise (see :func:`noise_key`).

  Returns:
    An optax ``GradientTransformation``.
  """
  if noise_multiplier < 0:
    raise ValueError(f"{noise_multiplier=} must be non-negative")
  if expected_batch_size <= 0:
    raise ValueError(f"{expected_batch_size=} must be positive")
  stddev = float(noise_multiplier) * float(l2_norm_clip)
  key = jnp.asarray(key, jnp.uint32)
  if key.shape != (KEY_WORDS,):
    raise ValueError(f"noise key must be uint32[{KEY_WORDS}], got shape {key.shape}")

  def init_fn(params):
    del params
    return PrivatizeState(key=key, count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    if stddev > 0:
      noise = gaussian_noise(state.key, state.count, updates)
      updates = jax.tree_util.tree_map(lambda g, z: g + stddev * z, updates, noise)
    updates = jax.tree_util.tree_map(lambda g: g / expected_batch_size, updates)
    return updates, PrivatizeState(key=state.key, count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)

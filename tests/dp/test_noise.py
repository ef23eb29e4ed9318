"""The Gaussian mechanism: std sigma*C on the sum, divided by the expected batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fastdp_jax.dp import noise


def test_noise_std_matches_sigma_times_c():
  clip, sigma, batch = 2.0, 1.5, 4.0
  key, det = noise.noise_key(7)
  assert det
  tx = noise.privatize(clip, sigma, batch, key)
  zeros = {"w": jnp.zeros((200, 100))}
  state = tx.init(zeros)
  samples = []
  for _ in range(3):
    upd, state = tx.update(zeros, state)
    samples.append(np.asarray(upd["w"]).ravel() * batch)  # undo the division
  z = np.concatenate(samples)
  # KS test against N(0, (sigma C)^2), and the sample std within 1 %.
  assert stats.kstest(z / (sigma * clip), "norm").pvalue > 1e-3
  assert np.std(z) == pytest.approx(sigma * clip, rel=0.01)
  assert abs(np.mean(z)) < 5 * sigma * clip / np.sqrt(z.size)


def test_fresh_noise_every_update_and_reproducible_from_seed():
  key, _ = noise.noise_key(3)
  tx = noise.privatize(1.0, 1.0, 1.0, key)
  g = {"w": jnp.zeros(50)}
  s = tx.init(g)
  a, s = tx.update(g, s)
  b, s = tx.update(g, s)
  assert not np.allclose(a["w"], b["w"])  # keys are never reused
  s2 = tx.init(g)
  a2, _ = tx.update(g, s2)
  np.testing.assert_array_equal(a["w"], a2["w"])
  assert int(s.count) == 2


def test_os_entropy_keys_differ():
  k1, d1 = noise.noise_key(None)
  k2, d2 = noise.noise_key(None)
  assert not d1 and not d2
  assert not np.array_equal(k1, k2)


def test_divides_by_expected_not_realised_batch_size():
  key, _ = noise.noise_key(0)
  tx = optax.chain(noise.privatize(1.0, 0.0, 8.0, key), optax.sgd(1.0))
  g = {"w": jnp.full(3, 16.0)}
  upd, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(upd["w"], -2.0)


def test_rejects_bad_parameters():
  key, _ = noise.noise_key(0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    noise.privatize(1.0, -1.0, 1.0, key)
  with pytest.raises(ValueError, match="expected_batch_size"):
    noise.privatize(1.0, 1.0, 0.0, key)


def test_the_noise_key_can_be_taken_out_of_and_put_back_into_any_optimizer_state():
  import optax
  key, _ = noise.noise_key(4)
  params = {"w": jnp.zeros(3)}
  for opt in (optax.sgd(0.1), optax.adam(0.1), optax.sgd(0.1, momentum=0.9)):
    state = optax.chain(noise.privatize(1.0, 1.0, 8, key), opt).init(params)
    stripped = noise.without_key(state)
    assert not any(np.array_equal(np.asarray(leaf), key)
                   for leaf in jax.tree_util.tree_leaves(stripped))
    restored = noise.with_key(stripped, key)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (128, 33), (3, 5, 17)])
def test_the_fused_threefry_gives_jax_random_bits_bit_for_bit(shape):
  # The noise's values (and every reproducibility run) rest on this: our unrolled Threefry
  # with JAX's partitionable counters must be jax.random.bits, not just as random.
  rng = np.random.default_rng(0)
  for _ in range(3):
    words = jnp.asarray(rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32))
    key = jax.random.wrap_key_data(words, impl="threefry2x32")
    ours = jax.jit(noise.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(np.asarray(ours),
                                  np.asarray(jax.random.bits(key, shape, jnp.uint32)))

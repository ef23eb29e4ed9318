"""Poisson sampling: inclusion frequency q, fixed capacity, topology independence."""

import numpy as np
import pytest
from scipy import stats

from fastdp_jax import sampling


def test_inclusion_frequency_matches_q():
  n, batch, steps = 500, 40, 4000
  s = sampling.PoissonSampler(n, batch, seed=1)
  counts = np.zeros(n)
  sizes = []
  for t in range(steps):
    idx = s.global_indices(t)
    assert len(np.unique(idx)) == len(idx)  # without replacement within a step
    counts[idx] += 1
    sizes.append(len(idx))
  q = batch / n
  # Each example's count is Binomial(steps, q): check all of them jointly with a chi-square.
  chi2 = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
  assert stats.chi2.sf(chi2, n) > 1e-4
  # Batch sizes are Binomial(n, q), not fixed.
  assert np.mean(sizes) == pytest.approx(batch, rel=0.02)
  assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)


def test_batches_are_padded_with_mask_and_match_global_indices():
  s = sampling.PoissonSampler(1000, 50, seed=5)
  b = s.batches(10, 3)
  assert b.indices.shape == (3, 1, s.capacity) and b.mask.shape == b.indices.shape
  for k in range(3):
    got = b.indices[k, 0][b.mask[k, 0]]
    np.testing.assert_array_equal(got, s.global_indices(10 + k))
    assert not b.mask[k, 0, len(got):].any()


def test_same_global_batch_on_any_number_of_shards():
  n = 1003
  one = sampling.PoissonSampler(n, 64, seed=9)
  bounds = np.array([0, 126, 252, 378, 504, 630, 756, 882, n])
  eight = sampling.PoissonSampler(n, 64, seed=9, shard_bounds=bounds)
  b1, b8 = one.batches(0, 20), eight.batches(0, 20)
  for t in range(20):
    g1 = b1.indices[t, 0][b1.mask[t, 0]]
    g8 = np.concatenate([b8.indices[t, d][b8.mask[t, d]] + bounds[d] for d in range(8)])
    np.testing.assert_array_equal(g1, g8)


def test_capacity_makes_overflow_improbable_and_overflow_raises():
  cap = sampling.capacity_for(979_193, 256 / 979_193)
  assert stats.binom.sf(cap, 979_193, 256 / 979_193) <= 1e-10
  assert cap < 2 * 256
  s = sampling.PoissonSampler(100, 50, seed=0)
  s.capacity = 10  # force an overflow: it must raise, never truncate
  with pytest.raises(sampling.BatchOverflowError, match="capacity"):
    s.batches(0, 1)


def test_sampling_rate_out_of_range_is_rejected():
  with pytest.raises(ValueError, match="sampling rate"):
    sampling.PoissonSampler(10, 20, seed=0)


def test_capacity_rounds_up_to_the_microbatch_size():
  plain = sampling.PoissonSampler(1000, 50, seed=0)
  s = sampling.PoissonSampler(1000, 50, seed=0, capacity_multiple=16)
  assert s.capacity % 16 == 0 and plain.capacity <= s.capacity < plain.capacity + 16

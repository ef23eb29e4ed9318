"""Poisson sampling: per-example inclusion at rate q, independence, secrecy, fixed capacity.

The accountant assumes that every example is in every update independently with probability
q. Statistical checks use fixed seeds (deterministic) and thresholds of p > 1e-4, or 5
standard errors, derived from the exact null distributions named in each test.
"""

import numpy as np
import pytest
from scipy import stats

from fastdp_jax.dp import sampling


def test_inclusion_frequency_matches_q():
  n, batch, steps = 500, 40, 4000
  s = sampling.PoissonSampler(n, batch, key=1)
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
  s = sampling.PoissonSampler(1000, 50, key=5)
  b = s.batches(10, 3)
  assert b.indices.shape == (3, 1, s.capacity) and b.mask.shape == b.indices.shape
  for k in range(3):
    got = b.indices[k, 0][b.mask[k, 0]]
    np.testing.assert_array_equal(got, s.global_indices(10 + k))
    assert not b.mask[k, 0, len(got):].any()


def test_same_global_batch_on_any_number_of_shards():
  n = 1003
  one = sampling.PoissonSampler(n, 64, key=9)
  bounds = np.array([0, 126, 252, 378, 504, 630, 756, 882, n])
  eight = sampling.PoissonSampler(n, 64, key=9, shard_bounds=bounds)
  b1, b8 = one.batches(0, 20), eight.batches(0, 20)
  for t in range(20):
    g1 = b1.indices[t, 0][b1.mask[t, 0]]
    g8 = np.concatenate([b8.indices[t, d][b8.mask[t, d]] + bounds[d] for d in range(8)])
    np.testing.assert_array_equal(g1, g8)


def test_capacity_makes_overflow_improbable_and_overflow_raises():
  cap = sampling.capacity_for(979_193, 256 / 979_193)
  assert stats.binom.sf(cap, 979_193, 256 / 979_193) <= 1e-10
  assert cap < 2 * 256
  s = sampling.PoissonSampler(100, 50, key=0)
  s.capacity = 10  # force an overflow: it must raise, never truncate
  with pytest.raises(sampling.BatchOverflowError, match="capacity"):
    s.batches(0, 1)


def test_sampling_rate_out_of_range_is_rejected():
  with pytest.raises(ValueError, match="sampling rate"):
    sampling.PoissonSampler(10, 20, key=0)


def test_capacity_rounds_up_to_the_microbatch_size():
  plain = sampling.PoissonSampler(1000, 50, key=0)
  s = sampling.PoissonSampler(1000, 50, key=0, capacity_multiple=16)
  assert s.capacity % 16 == 0 and plain.capacity <= s.capacity < plain.capacity + 16


def test_threefry_matches_the_random123_known_answers():
  # Random123's kat_vectors for threefry2x64_20 (counter, key -> output).
  zero = np.zeros(1, np.uint64)
  out = sampling.threefry2x64(np.zeros(2, np.uint64), zero, zero)
  assert [hex(int(o[0])) for o in out] == ["0xc2b6e3a8c2c69865", "0x6f81ed42f350084d"]
  ones = np.full(1, 2**64 - 1, np.uint64)
  out = sampling.threefry2x64(np.full(2, 2**64 - 1, np.uint64), ones, ones)
  assert [hex(int(o[0])) for o in out] == ["0xe02cb7c4d95d277a", "0xd06633d0893b8b68"]


def test_inclusion_is_a_function_of_the_key_the_row_and_the_update_only():
  # Adding a row changes no other row's batches (the sensitivity argument needs this), and
  # the sampler agrees with the row-by-row reference definition (what a Spark job evaluates).
  key = sampling.sampling_key(4)[0]
  n, q, steps = 300, 0.05, 200
  small = sampling.PoissonSampler(n, q * n, key, sampling_rate=q)
  large = sampling.PoissonSampler(n + 1, q * n, key, sampling_rate=q)
  for t in range(steps):
    a, b = small.global_indices(t), large.global_indices(t)
    np.testing.assert_array_equal(a, b[b < n])
  for row in (0, 17, n - 1):
    ref = sampling.row_updates(key, row, q, steps)
    got = [t for t in range(steps) if row in set(small.global_indices(t))]
    np.testing.assert_array_equal(ref, got)


def _inclusion_matrix(n, batch, steps, key):
  s = sampling.PoissonSampler(n, batch, key)
  inc = np.zeros((steps, n), bool)
  for t in range(steps):
    inc[t, s.global_indices(t)] = True
  return inc


def test_pairs_of_examples_are_included_jointly_with_probability_q_squared():
  n, batch, steps = 400, 80, 3000
  q = batch / n
  inc = _inclusion_matrix(n, batch, steps, sampling.sampling_key(2)[0])
  # Neighbouring rows, far rows, and the same row at consecutive updates: each joint count is
  # Binomial(pairs * steps, q^2) under independence (pairs are disjoint within a family).
  families = {
      "adjacent rows": (inc[:, 0::2], inc[:, 1::2]),
      "rows n/2 apart": (inc[:, : n // 2], inc[:, n // 2:]),
      "consecutive updates": (inc[:-1], inc[1:]),
  }
  for name, (a, b) in families.items():
    trials = a.size
    joint = np.sum(a & b)
    se = np.sqrt(trials * q * q * (1 - q * q))
    assert abs(joint - trials * q * q) < 5 * se, f"{name}: {joint} joint inclusions, " \
        f"expected {trials * q * q:.0f} +- {se:.0f}"


def test_inclusions_are_independent_across_examples_and_updates():
  # Chi-square test of independence on 2x2 tables (included now / included at the next
  # update, and row i / row i + 1), and a goodness-of-fit of each update's batch size to
  # Binomial(N, q).
  n, batch, steps = 400, 80, 3000
  inc = _inclusion_matrix(n, batch, steps, sampling.sampling_key(3)[0])
  for a, b in ((inc[:-1], inc[1:]), (inc[:, :-1], inc[:, 1:])):
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
    _, p, _, _ = stats.chi2_contingency(table, correction=False)
    assert p > 1e-4, table
  sizes = inc.sum(axis=1)
  q = batch / n
  # Chi-square goodness of fit over bins of Binomial(N, q) mass at least 5 / steps each.
  edges = stats.binom(n, q).ppf(np.linspace(0, 1, 21)[1:-1])
  cells = np.searchsorted(np.unique(edges), sizes, side="left")  # cell k: (e[k-1], e[k]]
  uniq = np.unique(edges)
  cdf = np.concatenate([[0.0], stats.binom(n, q).cdf(uniq), [1.0]])
  expected = np.diff(cdf) * steps
  observed = np.bincount(cells, minlength=len(expected))
  assert expected.min() >= 5
  assert stats.chisquare(observed, expected).pvalue > 1e-4
  # Each example's count over the updates is Binomial(steps, q).
  counts = inc.sum(axis=0)
  chi2 = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
  assert stats.chi2.sf(chi2, n) > 1e-4


def test_default_keys_are_secret_and_differ_between_runs():
  (k1, fixed1), (k2, fixed2) = sampling.sampling_key(None), sampling.sampling_key(None)
  assert not fixed1 and not fixed2 and k1.dtype == np.uint64 and k1.shape == (2,)
  assert not np.array_equal(k1, k2)
  a = sampling.PoissonSampler(1000, 50, k1).global_indices(0)
  b = sampling.PoissonSampler(1000, 50, k2).global_indices(0)
  assert not np.array_equal(a, b)
  assert str(int(k1[0])) not in repr(sampling.PoissonSampler(1000, 50, k1))
  key, fixed = sampling.sampling_key(7)
  assert fixed and np.array_equal(key, sampling.sampling_key(7)[0])


def test_non_integer_seeds_are_refused():
  from fastdp_jax import errors
  from fastdp_jax.dp import noise
  with pytest.raises(errors.ConfigError, match="dp.sampling_seed"):
    sampling.sampling_key(1.5)
  with pytest.raises(errors.ConfigError, match="dp.noise_seed"):
    noise.noise_key("x")


def test_resume_at_any_update_gives_the_same_batches():
  s = sampling.PoissonSampler(2000, 40, sampling.sampling_key(5)[0])
  forward = [s.global_indices(t) for t in range(0, 3 * sampling.BLOCK_UPDATES, 97)]
  fresh = sampling.PoissonSampler(2000, 40, s._key)
  back = [fresh.global_indices(t) for t in reversed(range(0, 3 * sampling.BLOCK_UPDATES, 97))]
  for a, b in zip(forward, reversed(back)):
    np.testing.assert_array_equal(a, b)


def test_overflow_probability_is_part_of_the_stated_delta():
  # The overflow's term is (1 + e^epsilon) p T D (docs/privacy.md): at most 1 % of delta for
  # the epsilon the probability was chosen for, and more for a larger epsilon.
  p = sampling.automatic_overflow_probability(1e-7, 38_000, 8, epsilon=2.0)
  assert sampling.overflow_delta(p, 38_000, 8, 2.0) <= 0.01 * 1e-7 * (1 + 1e-12)
  assert sampling.overflow_delta(p, 38_000, 8, 2.0) == pytest.approx(
      (1 + np.exp(2.0)) * p * 38_000 * 8, rel=1e-12)
  assert sampling.overflow_delta(p, 38_000, 8, 3.0) > 0.01 * 1e-7
  cap = sampling.capacity_for(979_193, 256 / 979_193, p)
  assert stats.binom.sf(cap, 979_193, 256 / 979_193) <= p


def test_the_vectorised_inclusion_function_is_the_samplers():
  key = sampling.sampling_key(8)[0]
  n, batch, steps = 500, 25, 300
  s = sampling.PoissonSampler(n, batch, key)
  rows, updates = sampling.inclusions(key, np.arange(n), batch / n, end=steps, start=100)
  for t in range(100, steps):
    np.testing.assert_array_equal(np.sort(rows[updates == t]), s.global_indices(t))


@pytest.mark.parametrize("p", [1e-10, 1e-14, 2e-17, 1e-30])
def test_capacity_holds_for_tiny_overflow_probabilities(p):
  # Large N and long runs ask for p far below 1e-16, where scipy's isf returns N.
  n, q = 12_673_878, 256 / 12_673_878
  cap = sampling.capacity_for(n, q, p)
  assert stats.binom.logsf(cap, n, q) <= np.log(p) < stats.binom.logsf(cap - 1, n, q)
  assert cap < 3 * 256

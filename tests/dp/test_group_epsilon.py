"""group_epsilon: what a row-level run's (sigma, q, T, delta) gives a unit of k rows.

Checked against the design notes' computed figures (PRIVACY_UNITS.md, part A1), against the
row-level accountant at k = 1, and between two independent bounds: the unit is at least as
exposed as one row, and at most what group privacy (Vadhan 2017, Lemma 2.2) allows.
"""

import math

import pytest

from fastdp_jax.dp import accounting

# The design notes' setting: N_rows = 1.2 M, B = 4096 rows, 10 epochs; delta = 1e-7.
Q, STEPS, DELTA = 0.00341, 2929, 1e-7
# Their figures (tight MoG accountant, sigma calibrated to a row-level epsilon of 1), stated to
# 2 decimals: a correct computation lies within half a unit of the last digit.
DESIGN = {2: 2.10, 3: 3.27, 5: 5.75}
ROUNDING = 0.005


@pytest.fixture(scope="module")
def sigma_for_row_epsilon_one():
  return accounting.calibrate_noise_multiplier(1.0, Q, STEPS, DELTA)


def _vadhan_bound(sigma, q, steps, delta, k):
  """An upper bound of a k-row unit's epsilon at ``delta`` by group privacy.

  (eps, d)-DP for one row gives (k eps, k e^{(k-1) eps} d) for k rows. Pick d1 so that the
  group's delta is at most ``delta``: starting above the answer, e0, d1 = delta / (k e^{(k-1)
  e0}); the row-level eps1 at d1 is then at most e0 (checked), so k e^{(k-1) eps1} d1 <= delta.
  Iterating e0 <- eps1 tightens the bound while keeping it valid.
  """
  e0 = 1.5 * accounting.compute_epsilon(sigma, q, steps, delta)
  for _ in range(3):
    d1 = delta / (k * math.exp((k - 1) * e0))
    eps1 = accounting.compute_epsilon(sigma, q, steps, d1)
    assert eps1 <= e0  # the precondition of the bound
    e0 = eps1
  return k * e0


@pytest.mark.parametrize("k", [2, pytest.param(3, marks=pytest.mark.slow),
                               pytest.param(5, marks=pytest.mark.slow)])
def test_design_figures_and_the_group_privacy_bound(sigma_for_row_epsilon_one, k):
  sigma = sigma_for_row_epsilon_one
  eps_k = accounting.group_epsilon(sigma, Q, STEPS, DELTA, k)
  assert eps_k == pytest.approx(DESIGN[k], abs=ROUNDING)
  # Removing a whole unit exposes at least one of its rows (which is a 1-row unit)...
  assert eps_k > accounting.compute_epsilon(sigma, Q, STEPS, DELTA)
  # ...and at most what the (looser) group-privacy argument allows.
  assert eps_k <= _vadhan_bound(sigma, Q, STEPS, DELTA, k)


def test_one_row_per_unit_is_the_row_level_epsilon():
  # A 1-row unit's mixture is [0, 1] with weights [1 - q, q]: the Poisson-subsampled Gaussian.
  # Both are PLDs discretised at 1e-4 (dp_accounting's default interval), pessimistically, so
  # they agree to a few discretisation steps.
  sigma, q, steps, delta = 2.0, 0.01, 300, 1e-6
  assert accounting.group_epsilon(sigma, q, steps, delta, 1) == pytest.approx(
      accounting.compute_epsilon(sigma, q, steps, delta), abs=1e-3)


def test_a_larger_unit_is_more_exposed():
  sigma, q, steps, delta = 2.0, 0.01, 300, 1e-6
  eps = [accounting.group_epsilon(sigma, q, steps, delta, k) for k in (1, 2, 4)]
  assert eps[0] < eps[1] < eps[2]


def test_edges_and_refusals():
  assert accounting.group_epsilon(1.0, 0.01, 0, 1e-6, 3) == 0.0
  assert accounting.group_epsilon(0.0, 0.01, 10, 1e-6, 3) == math.inf
  for k in (0, accounting.MAX_ROWS_PER_UNIT + 1):
    with pytest.raises(ValueError, match="rows_per_unit"):
      accounting.group_epsilon(1.0, 0.01, 10, 1e-6, k)
  with pytest.raises(ValueError, match="delta"):
    accounting.group_epsilon(1.0, 0.01, 10, 1.0, 2)

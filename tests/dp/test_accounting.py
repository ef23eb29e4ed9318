"""Accounting through dp_accounting, checked against the libraries' published values."""

import pytest

from fastdp_jax.dp import accounting


@pytest.mark.parametrize("sigma,q,steps,delta,acc,expected,tol", [
    # TF Privacy test: N=60000, batch 150, 15 epochs, RDP.
    (1.3, 150 / 60000, 15 * 60000 // 150, 1e-5, "rdp", 0.7242234026, 1e-8),
    # TF Privacy test: N=100000, batch 100, 30 epochs, delta 1e-7, RDP.
    (1.0, 100 / 100000, 30 * 100000 // 100, 1e-7, "rdp", 1.4154988495, 1e-8),
    # jax_privacy v1 test: N=50000, batch 1024, 10000 steps (its RDP value, 2.27535, used
    # another set of RDP orders; dp_accounting's default orders give 2.2746).
    (4.0, 1024 / 50000, 10000, 1e-5, "pld", 2.09245, 1e-5),
    # jax_privacy 2.x doctest.
    (3.0, 0.1, 512, 1e-6, "pld", 3.77, 1e-2),
    # Opacus RDP test, as dp_accounting computes it.
    (1.5, 0.04, 2250, 1e-5, "rdp", 7.32933, 1e-5),
])
def test_reference_values(sigma, q, steps, delta, acc, expected, tol):
  eps = accounting.compute_epsilon(sigma, q, steps, delta, acc)
  assert eps == pytest.approx(expected, rel=tol)


def test_old_conversion_values_are_not_reproduced():
  # TF Privacy MNIST tutorial's "3.01" came from the old RDP conversion.
  eps = accounting.compute_epsilon(1.1, 256 / 60000, 60 * 60000 // 256, 1e-5, "rdp")
  assert eps == pytest.approx(2.597, abs=2e-3)


def test_calibration_reaches_and_never_exceeds_target():
  sigma = accounting.calibrate_noise_multiplier(1.0, 0.1, 512, 1e-6)
  assert sigma == pytest.approx(9.66, abs=0.01)  # jax_privacy 2.x doctest
  for target, q, steps in [(1.0, 0.1, 512), (3.0, 0.01, 1000), (0.5, 0.02, 200)]:
    for acc in ("pld", "rdp"):
      s = accounting.calibrate_noise_multiplier(target, q, steps, 1e-5, acc)
      eps = accounting.compute_epsilon(s, q, steps, 1e-5, acc)
      assert eps <= target
      assert eps >= target * 0.999  # and it is not wastefully noisy


def test_epsilon_grows_with_steps_and_edge_cases():
  e1 = accounting.compute_epsilon(1.0, 0.01, 100, 1e-5)
  e2 = accounting.compute_epsilon(1.0, 0.01, 200, 1e-5)
  assert 0 < e1 < e2
  assert accounting.compute_epsilon(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampling_rate=0.0), "sampling_rate"), (dict(sampling_rate=1.5), "sampling_rate"),
    (dict(delta=1.0), "delta"), (dict(accountant="moments"), "accountant"),
])
def test_bad_parameters_fail_clearly(kwargs, match):
  args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    accounting.compute_epsilon(**args)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_the_ledgers_cached_epsilon_equals_the_accountant(accountant):
  ledger = accounting.PrivacyLedger(1e-5, accountant)
  for steps in (1, 37, 500):
    grown = ledger.add(1.1, 0.01, steps)
    assert grown.epsilon() == accounting.compute_epsilon(1.1, 0.01, steps, 1e-5, accountant)
  assert ledger.epsilon() == 0.0 and ledger.steps == 0
  assert accounting.PrivacyLedger(1e-5).add(0.0, 0.01, 10).epsilon() == float("inf")


def test_the_ledger_merges_segments_and_round_trips_through_json():
  ledger = accounting.PrivacyLedger(1e-6, "pld").add(1.0, 0.01, 10).add(1.0, 0.01, 5)
  assert len(ledger.segments) == 1 and ledger.steps == 15
  ledger = ledger.add(2.0, 0.01, 5)
  assert len(ledger.segments) == 2 and ledger.composition == "rdp (adaptive)"
  again = accounting.PrivacyLedger.from_json(ledger.to_json())
  assert again.segments == ledger.segments and again.epsilon() == ledger.epsilon()


def test_steps_within_a_budget_is_the_last_update_within_it():
  ledger = accounting.PrivacyLedger(1e-5, "pld").add(0.9, 0.01, 100)
  k = ledger.steps_within(2.0, 0.9, 0.01, 10_000)
  assert ledger.epsilon(k, 0.9, 0.01) <= 2.0 < ledger.epsilon(k + 1, 0.9, 0.01)
  assert ledger.steps_within(None, 0.9, 0.01, 77) == 77
  assert ledger.steps_within(1e-3, 0.9, 0.01, 77) == 0

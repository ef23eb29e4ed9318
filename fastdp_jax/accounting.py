"""Privacy accounting of DP-SGD with Poisson sampling, through Google's ``dp_accounting``.

One optimizer update is one ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; a run of T
updates is their self-composition. Nothing here re-implements RDP or PLD arithmetic.
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("pld", "rdp")
# Smallest noise multiplier calibration searches; below it the PLD discretisation explodes and
# DP-SGD gives no meaningful guarantee anyway.
_MIN_SIGMA = 0.3


def _check(sampling_rate: float, steps: int, delta: float, accountant: str) -> None:
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"{sampling_rate=} must be in (0, 1]")
  if steps < 0:
    raise ValueError(f"{steps=} must be non-negative")
  if not 0 < delta < 1:
    raise ValueError(f"{delta=} must be in (0, 1)")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"{accountant=} must be one of {ACCOUNTANTS}")


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
  """The DP event of ``steps`` Poisson-subsampled Gaussian updates."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                          dp_accounting.GaussianDpEvent(noise_multiplier)),
      steps)


def make_accountant(accountant: str = "pld") -> dp_accounting.PrivacyAccountant:
  if accountant == "pld":
    return pld.PLDAccountant()
  if accountant == "rdp":
    return rdp.RdpAccountant()
  raise ValueError(f"{accountant=} must be one of {ACCOUNTANTS}")


def compute_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                    accountant: str = "pld") -> float:
  """Epsilon of DP-SGD after ``steps`` updates at ``delta``.

  Args:
    noise_multiplier: sigma, noise std divided by the clipping norm.
    sampling_rate: q, the Poisson inclusion probability of each example.
    steps: number of optimizer updates (not epochs, not microbatches).
    delta: target delta.
    accountant: ``'pld'`` (tight, default) or ``'rdp'``.

  Returns:
    epsilon (0 for zero steps, ``inf`` for sigma 0).
  """
  _check(sampling_rate, steps, delta, accountant)
  if steps == 0:
    return 0.0
  if noise_multiplier <= 0:
    return float("inf")
  acc = make_accountant(accountant)
  acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
  return float(acc.get_epsilon(delta))


def _bracket(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
             accountant: str) -> dp_accounting.ExplicitBracketInterval:
  """An interval holding the calibrated sigma, found with cheap RDP evaluations.

  PLD evaluations at small sigma are slow (wide loss distributions), so the search for a
  bracket starts from the RDP calibration, which is fast and never below the PLD sigma.
  """
  hi = float(dp_accounting.calibrate_dp_mechanism(
      rdp.RdpAccountant, lambda s: dp_event(s, sampling_rate, steps), target_epsilon, delta,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(_MIN_SIGMA, 1.0)))
  eps = lambda s: compute_epsilon(s, sampling_rate, steps, delta, accountant)
  while eps(hi) > target_epsilon:
    hi *= 1.25
  lo = hi
  while lo > _MIN_SIGMA:
    lo = max(_MIN_SIGMA, lo * 0.8)
    if eps(lo) > target_epsilon:
      break
  else:
    raise ValueError(f"target epsilon {target_epsilon} needs a noise multiplier below "
                     f"{_MIN_SIGMA}: DP-SGD gives no meaningful guarantee there")
  return dp_accounting.ExplicitBracketInterval(lo, hi)


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: str = "pld") -> float:
  """The smallest noise multiplier (to the search tolerance) whose epsilon <= target.

  The returned sigma is checked: ``compute_epsilon(sigma, ...) <= target_epsilon``.
  """
  _check(sampling_rate, steps, delta, accountant)
  if target_epsilon <= 0:
    raise ValueError(f"{target_epsilon=} must be positive")
  if steps == 0:
    raise ValueError("cannot calibrate noise for zero steps")
  bracket = _bracket(target_epsilon, sampling_rate, steps, delta, accountant)
  sigma = float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant),
      lambda s: dp_event(s, sampling_rate, steps),
      target_epsilon, delta, bracket_interval=bracket, tol=1e-5 * bracket.endpoint_2))
  # Brent's search brackets the root; step up until the target is met for certain.
  while compute_epsilon(sigma, sampling_rate, steps, delta, accountant) > target_epsilon:
    sigma *= 1 + 1e-6
  return sigma

"""Private hyperparameter tuning: a secret number of private trials, the best one released.

The procedure of Papernot and Steinke 2022 ("Hyperparameter Tuning with Renyi Differential
Privacy", ICLR, arXiv:2110.03620): draw the number of trials K from a PUBLIC distribution with
SECRET randomness, run K independent trials, each one a full private training run with its own
secret keys and hyperparameters drawn from a public search space, that scores itself with a DP
mechanism on validation rows; release only the best trial's model (and nothing about the
others, K included). Its RDP is bounded in terms of one trial's by their Theorems 2 (truncated
negative binomial K, with the geometric and logarithmic distributions as special cases) and 6
(Poisson K), which ``dp_accounting``'s RDP accountant implements as
``RepeatAndSelectDpEvent(trial_event, mean, shape)``.

One trial's event composes, sequentially (the validation rows are chosen by a hash of the row
position, so one row's removal may move others between the splits: see
:mod:`fastdp_jax.dp.calibration`):

- training: ``T`` Poisson-sampled Gaussian updates (:func:`fastdp_jax.dp.accounting.dp_event`);
- the private score: a Gaussian mechanism on the validation rows' summed per-row score, each
  term in ``[0, S]`` so adding or removing a row moves the sum by at most ``S``
  (:func:`noisy_score`), ``GaussianDpEvent(score_noise_multiplier)``;
- the temperature's exponential mechanism when the trial calibrates (``calibration.epsilon``):
  an epsilon-DP mechanism is ``epsilon^2 / 2``-zCDP (Bun and Steinke 2016, Prop. 3.3), so
  ``ZCDpEvent(epsilon^2 / 2)`` bounds its RDP at every order.

Every trial has the same event: the search space may not change q, T, sigma or the score, so
the per-trial RDP bound the theorems need holds for every draw of the hyperparameters.
"""

from __future__ import annotations

import dataclasses
import math
import os

import dp_accounting
import numpy as np
from dp_accounting import dp_event, rdp
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from fastdp_jax import errors
from fastdp_jax.dp import accounting

# The distributions of K, by name, and the ``shape`` dp_accounting's event takes for them.
DISTRIBUTIONS = ("poisson", "geometric", "logarithmic", "truncated_negative_binomial")
SCORES = ("brier", "accuracy", "log_loss")
# Each score's per-row range [0, S]: its sensitivity under adding or removing one row.
# Brier: sum_k (p_k - y_k)^2 <= 2 (1 for a binary task's (p - y)^2); accuracy: 0 or 1; the
# log-loss with probabilities clamped to [0.01, 0.99] (as the temperature's score): <= 4.61.
_PROB_FLOOR = 1e-2


class TuningError(errors.UserError):
  """A tuning procedure that cannot meet its budget (or is asked for nonsense)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialCount:
  """The public distribution of the number of trials K.

  Attributes:
    distribution: one of :data:`DISTRIBUTIONS`.
    mean: E[K] (>= 1).
    shape: the truncated negative binomial's eta (only for that distribution).
  """
  distribution: str
  mean: float
  shape: float | None = None

  def __post_init__(self):
    if self.distribution not in DISTRIBUTIONS:
      raise TuningError(f"trials.distribution={self.distribution!r} must be one of "
                        f"{DISTRIBUTIONS}")
    if not (math.isfinite(self.mean) and self.mean >= 1):
      raise TuningError(f"trials.mean={self.mean} must be a finite number >= 1")
    if self.distribution == "truncated_negative_binomial" and not (
        self.shape is not None and 0 < self.shape < math.inf):
      raise TuningError(f"trials.shape={self.shape} must be in (0, inf) for the truncated "
                        "negative binomial (0 is 'logarithmic', 1 'geometric')")

  @property
  def event_shape(self) -> float:
    """``RepeatAndSelectDpEvent``'s shape: inf (Poisson), 1, 0, or eta."""
    return {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}.get(
        self.distribution, float(self.shape or 0.0))

  def describe(self) -> str:
    if self.distribution == "truncated_negative_binomial":
      return f"truncated negative binomial (eta {self.shape:g}, mean {self.mean:g})"
    return f"{self.distribution} (mean {self.mean:g})"

  def gamma(self) -> float:
    """The truncated negative binomial's gamma for ``mean``: the accountant's own value, so
    the K drawn follows exactly the distribution accounted."""
    # pylint: disable=protected-access  (dp_accounting is pinned; its value is the reference)
    return float(rdp_lib._gamma_truncated_negative_binomial(self.event_shape, self.mean))

  def draw(self, rng: np.random.Generator) -> int:
    """K, drawn with ``rng`` (which must be secret for the guarantee: :func:`secret_rng`).

    Poisson may give 0 (Thm 6: nothing is released); the others give K >= 1.
    """
    if self.distribution == "poisson":
      return int(rng.poisson(self.mean))
    gamma, eta = self.gamma(), self.event_shape
    if gamma >= 1.0:  # mean 1: the distribution is K = 1
      return 1
    # Inverse CDF of the paper's D_{eta,gamma}: P[K=1] = (1-gamma) eta / (gamma^-eta - 1)
    # (eta = 0: (1-gamma) / ln(1/gamma), the logarithmic distribution), and
    # P[K=k+1] / P[K=k] = (1-gamma)(k+eta)/(k+1). Exact for every mean, where rejection
    # from the untruncated negative binomial would loop ~1/P[K>=1] times near mean 1.
    p = ((1 - gamma) * eta / (gamma ** -eta - 1) if eta > 0
         else (1 - gamma) / math.log(1 / gamma))
    u, k, cdf = float(rng.random()), 1, p
    while cdf < u and p > 0:
      p *= (1 - gamma) * (k + eta) / (k + 1)
      k += 1
      cdf += p
    return k


def secret_rng() -> np.random.Generator:
  """A generator seeded from the OS's entropy (256 bits), never from a config value."""
  return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


# --- the private score ------------------------------------------------------------------------
def score_sensitivity(metric: str, num_classes: int) -> float:
  """S, the most one validation row adds to the summed score (its add/remove sensitivity)."""
  if metric == "accuracy":
    return 1.0
  if metric == "brier":
    return 1.0 if num_classes <= 2 else 2.0
  if metric == "log_loss":
    return -math.log(_PROB_FLOOR)
  raise TuningError(f"score.metric={metric!r} must be one of {SCORES}")


def probabilities(logits: np.ndarray, temperature: float | None) -> np.ndarray:
  """[n, K] class probabilities of a classifier's logits ([n] binary, [n, K] multiclass)."""
  z = np.asarray(logits, np.float64) / (temperature or 1.0)
  if z.ndim == 1:
    z = np.stack([np.zeros_like(z), z], axis=-1)  # softmax over (0, z) is sigmoid(z)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def row_scores(logits: np.ndarray, labels: np.ndarray, metric: str,
               temperature: float | None = None) -> np.ndarray:
  """Each validation row's score, higher is better, in ``[0, S]`` (:func:`score_sensitivity`).

  Losses are turned into scores as ``S - loss`` so that every metric is maximised.
  """
  p = probabilities(logits, temperature)
  y = np.asarray(labels).astype(np.int64) if p.shape[1] > 2 else (
      np.asarray(labels) > 0.5).astype(np.int64)
  s = score_sensitivity(metric, p.shape[1])
  if metric == "accuracy":
    return (p.argmax(axis=-1) == y).astype(np.float64)
  if metric == "brier":
    onehot = np.eye(p.shape[1])[y]
    loss = ((p - onehot) ** 2).sum(axis=-1)
    if p.shape[1] == 2:
      loss = loss / 2  # binary: (p - y)^2, counted once
    return s - np.minimum(loss, s)
  return s - np.minimum(-np.log(np.clip(p[np.arange(len(y)), y], 1e-300, 1.0)), s)


def noisy_score(scores: np.ndarray, sensitivity: float, noise_multiplier: float,
                rng: np.random.Generator) -> float:
  """The Gaussian mechanism on ``sum(scores)``: add N(0, (sigma * S)^2), S the sensitivity.

  Args:
    scores: each row's score, in [0, sensitivity] (:func:`row_scores`).
    sensitivity: S.
    noise_multiplier: sigma (0: exact, for a public proxy).
    rng: the noise's randomness (secret: :func:`secret_rng`).
  """
  total = float(np.sum(np.clip(scores, 0.0, sensitivity)))
  if noise_multiplier <= 0:
    return total
  return total + float(rng.normal(0.0, noise_multiplier * sensitivity))


# --- accounting -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialPlan:
  """One trial's public privacy parameters (identical for every trial)."""
  sampling_rate: float
  steps: int
  noise_multiplier: float
  score_noise_multiplier: float
  calibration_epsilon: float = 0.0


def trial_event(p: TrialPlan) -> dp_accounting.DpEvent:
  """One trial's event: training, then the private score, then the temperature (if any)."""
  events = [accounting.dp_event(p.noise_multiplier, p.sampling_rate, p.steps),
            dp_accounting.GaussianDpEvent(p.score_noise_multiplier)]
  if p.calibration_epsilon:
    events.append(dp_event.ZCDpEvent(p.calibration_epsilon ** 2 / 2))
  return dp_accounting.ComposedDpEvent(events)


def procedure_event(p: TrialPlan, count: TrialCount,
                    count_epsilon: float = 0.0) -> dp_accounting.DpEvent:
  """The whole procedure's event: K ~ ``count`` trials, the best one released; first, when
  ``count_epsilon`` is set, the Laplace count of the training rows that every trial's q and T
  derive from (:mod:`fastdp_jax.dp.count`, drawn once for all the trials)."""
  repeated = dp_event.RepeatAndSelectDpEvent(trial_event(p), count.mean, count.event_shape)
  if not count_epsilon:
    return repeated
  return dp_accounting.ComposedDpEvent(
      [dp_accounting.LaplaceDpEvent(1.0 / count_epsilon), repeated])


def total_epsilon(p: TrialPlan, count: TrialCount, delta: float,
                  count_epsilon: float = 0.0) -> float:
  """The procedure's epsilon at ``delta``, by ``dp_accounting``'s RDP accountant."""
  acc = rdp.RdpAccountant()
  acc.compose(procedure_event(p, count, count_epsilon))
  return float(acc.get_epsilon(delta))


def calibrate(target_epsilon: float, delta: float, count: TrialCount, *,
              sampling_rate: float, steps: int, score_noise_multiplier: float,
              calibration_epsilon: float = 0.0, count_epsilon: float = 0.0) -> TrialPlan:
  """The per-trial plan with the smallest training sigma whose procedure meets the target
  (with the count of N, ``count_epsilon``, when one is drawn).

  Raises:
    TuningError: the score and the temperature alone already exceed the target, or the
      target needs a sigma outside the accountant's sane range.
  """
  def plan(sigma: float) -> TrialPlan:
    return TrialPlan(sampling_rate=sampling_rate, steps=steps, noise_multiplier=sigma,
                     score_noise_multiplier=score_noise_multiplier,
                     calibration_epsilon=calibration_epsilon)

  top = accounting.MAX_CALIBRATED_NOISE_MULTIPLIER
  def total(p: TrialPlan) -> float:
    return total_epsilon(p, count, delta, count_epsilon)

  at_top = total(plan(top))
  if at_top > target_epsilon:
    rest = total(plan(1e6))  # training all but free
    why = (f"the score, the temperature and the count alone take epsilon {rest:.4g}"
           if rest > target_epsilon else f"training at sigma {top:g} still gives {at_top:.4g}")
    raise TuningError(
        f"dp.target_epsilon={target_epsilon:g} cannot hold {count.describe()} trials: {why}; "
        "raise the target, lower trials.mean or num_epochs, raise score.noise_multiplier or "
        "lower calibration.epsilon")
  low = 0.3
  if total(plan(low)) <= target_epsilon:
    raise TuningError(f"dp.target_epsilon={target_epsilon:g} is met with a training sigma "
                      f"below {low}: no meaningful guarantee; lower the target")
  sigma = float(dp_accounting.calibrate_dp_mechanism(
      rdp.RdpAccountant, lambda s: procedure_event(plan(s), count, count_epsilon),
      target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(low, top), tol=1e-6))
  # Brent's search brackets the root: step up until the target is met for certain.
  while total(plan(sigma)) > target_epsilon:
    sigma *= 1 + 1e-6
  return plan(sigma)


def describe(p: TrialPlan, count: TrialCount, epsilon: float, delta: float,
             metric: str, count_epsilon: float = 0.0) -> dict[str, object]:
  """The procedure as the summary, the model's privacy record and the card state it."""
  return dict(
      method="random search, the best of K private trials released (Papernot & Steinke "
             "2022; dp_accounting RepeatAndSelectDpEvent, RDP)",
      trials_distribution=count.distribution, trials_mean=count.mean,
      trials_shape=count.shape, trials_released=False,
      noise_multiplier=p.noise_multiplier, sampling_rate=p.sampling_rate, steps=p.steps,
      score=metric, score_noise_multiplier=p.score_noise_multiplier,
      calibration_epsilon=p.calibration_epsilon or None, count_epsilon=count_epsilon or None,
      epsilon=epsilon, accountant_delta=delta, accountant="rdp", accounted=True)


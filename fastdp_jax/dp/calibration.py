"""Private temperature scaling: a classifier's probabilities calibrated on validation rows.

DP-SGD inflates the logit scale (per-example clipping, and noise accumulating in the last
layer: Zhang et al. 2022, arXiv:2210.08248), so a private MLP's probabilities are
overconfident although its ranking is good. Dividing the logits by a temperature T > 1 fixes
the scale without changing any decision's order (AUC and accuracy stay as they are).

T is chosen on the validation rows (held out of training) from a PUBLIC grid with the
exponential mechanism: the score of a candidate is the validation rows' summed log-loss, each
row's term clamped to at most ``L = -log(PROB_FLOOR)``, so adding or removing one row moves
every score by at most L, and all of them in the same direction (a row adds a non-negative
term to each). For such a monotone score, drawing candidate i with probability proportional to
``exp(-epsilon * score_i / L)`` is epsilon-DP (McSherry and Talwar 2007; Dwork and Roth 2014,
after Thm 3.10: the factor 2 of the general mechanism is not needed). With a privacy unit the
score is the sum over validation UNITS of each unit's mean clamped log-loss: one whole unit
then moves every score by at most L too, in the same direction, whatever its number of rows
(a sum over its rows would move it by up to k L and need k times the noise). The
validation rows are chosen by each row's key (its content and occurrence) or unit key, so one
unit's removal moves no other between the splits. The calibration is still composed with
training sequentially, a conservative choice (parallel composition over the two disjoint
parts is not claimed): its epsilon adds to the training's (basic composition,
:func:`total_epsilon`): ``dp_accounting``'s PLD accountant composes no pure-DP selection under
add-or-remove neighbours, and with a calibration budget of a few hundredths the sum loses
almost nothing against a tighter composition.

References:
  Guo et al. 2017, On Calibration of Modern Neural Networks (temperature scaling).
  McSherry and Talwar 2007, Mechanism Design via Differential Privacy.
  Dwork and Roth 2014, The Algorithmic Foundations of Differential Privacy, Thm 3.16.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fastdp_jax import config as config_lib
from fastdp_jax import distributed
from fastdp_jax import errors
from fastdp_jax import models
from fastdp_jax.console import say
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import keys as keys_lib

# The public grid of temperatures: 1 (no change) to 10, about 25 % apart.
TEMPERATURES = tuple(float(t) for t in np.round(np.geomspace(1.0, 10.0, 12), 3))
# Probabilities are clamped to [PROB_FLOOR, 1 - PROB_FLOOR] in the score: each row's log-loss
# term is then at most -log(PROB_FLOOR) = 4.6 nats, the score's sensitivity. A lower floor
# would count confidently wrong rows more fully but make every comparison noisier.
PROB_FLOOR = 1e-2
SENSITIVITY = -math.log(PROB_FLOOR)


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def row_losses(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
  """Each row's log-loss at ``temperature``, clamped to at most :data:`SENSITIVITY`.

  Args:
    logits: [n] (binary: the logit of P(y = 1)) or [n, K] (multiclass).
    labels: [n] 0/1 or class indices.
    temperature: T > 0; the probabilities are those of ``logits / T``.

  Returns:
    [n] float64 in [0, SENSITIVITY].
  """
  z = np.asarray(logits, np.float64) / temperature
  y = np.asarray(labels)
  if z.ndim == 1:
    z = np.stack([np.zeros_like(z), z], axis=-1)  # softmax over (0, z) is sigmoid(z)
    y = (y > 0.5).astype(np.int64)
  logp = _log_softmax(z)[np.arange(len(y)), y.astype(np.int64)]
  return np.minimum(-logp, SENSITIVITY)


def scores(logits: np.ndarray, labels: np.ndarray,
           temperatures: tuple[float, ...] = TEMPERATURES,
           units: np.ndarray | None = None) -> np.ndarray:
  """[m] every candidate temperature's score (lower is better): the summed clamped log-loss
  of the rows, or with ``units`` ([n] each row's unit, any labels) the sum over units of each
  unit's mean clamped log-loss. Either way one row (or unit) adds a term in [0, L]."""
  weights = 1.0 if units is None else units_lib.unit_weights(units)
  return np.array([np.sum(row_losses(logits, labels, t) * weights) for t in temperatures])


def select_temperature(logits: np.ndarray, labels: np.ndarray, epsilon: float,
                       rng: np.random.Generator,
                       temperatures: tuple[float, ...] = TEMPERATURES, *,
                       units: np.ndarray | None = None) -> float:
  """A temperature drawn by the exponential mechanism (epsilon-DP in the validation rows).

  Args:
    logits: the validation rows' logits ([n] or [n, K]).
    labels: their labels.
    epsilon: the selection's privacy budget (> 0).
    rng: the mechanism's randomness; it must be secret for the guarantee to hold.
    temperatures: the public candidates.
    units: [n] each validation row's privacy unit (None: every row its own unit); the
      score is then the units' mean losses, so that one unit moves it by at most L.

  Returns:
    One of ``temperatures``.
  """
  if not epsilon > 0:
    raise ValueError(f"{epsilon=} must be positive")
  utility = -scores(logits, labels, temperatures, units) * epsilon / SENSITIVITY
  # Gumbel-max: argmax(u_i + G_i) is distributed as softmax(u).
  return temperatures[int(np.argmax(utility + rng.gumbel(size=len(temperatures))))]


def total_epsilon(training_epsilon: float, calibration_epsilon: float) -> float:
  """The run's epsilon at its delta: training's (from ``dp_accounting``) plus the
  calibration's pure epsilon (basic composition, Dwork and Roth Thm 3.16)."""
  return float(training_epsilon) + float(calibration_epsilon)


def training_budget(dp: config_lib.DPSettings, calibration_epsilon: float,
                    what: str = "calibration.epsilon") -> config_lib.DPSettings:
  """The ``dp`` settings training gets when the calibration takes ``calibration_epsilon`` of
  ``dp.target_epsilon`` and ``dp.max_epsilon`` (a fixed sigma is left as it is: the run's
  epsilon is then training's plus the calibration's). ``what`` names the key that takes it
  (another pure-DP part composed the same way, e.g. ``dp.count_epsilon``).

  Raises:
    ConfigError: the calibration would take the whole target or cap.
  """
  if not calibration_epsilon or not dp.enabled:
    return dp
  out = {}
  for name in ("target_epsilon", "max_epsilon"):
    value = getattr(dp, name)
    if value is None or value == math.inf:
      continue
    if value <= calibration_epsilon:
      raise errors.ConfigError(
          f"dp.{name}={value} leaves nothing for training after {what}="
          f"{calibration_epsilon}; lower {what} or raise dp.{name}")
    out[name] = value - calibration_epsilon
  return dataclasses.replace(dp, **out)


_PARTS = {"count": "dp.count_epsilon", "calibration": "calibration.epsilon",
          "spec": "the spec's private_estimates epsilon"}


def training_share(dp: config_lib.DPSettings, **parts: float) -> config_lib.DPSettings:
  """:func:`training_budget` for every pure-DP part of a run at once: ``count`` (the DP
  count of N), ``calibration`` (the temperature) and ``spec`` (the spec's private estimates),
  each an epsilon that comes out of the target and the cap."""
  for name, epsilon in parts.items():
    dp = training_budget(dp, epsilon, _PARTS[name])
  return dp


def mechanism_rng(noise_key: np.ndarray, fixed: bool) -> np.random.Generator:
  """The selection's randomness: the OS's entropy, or (a reproducibility run, whose noise
  seed is public) a stream derived from the run's noise key."""
  if not fixed:
    return np.random.default_rng()
  return np.random.default_rng([int(w) for w in np.asarray(noise_key).ravel()] + [2])


def choose_temperature(logits: np.ndarray, labels: np.ndarray, epsilon: float | None,
                       rng: np.random.Generator, units: np.ndarray | None = None) -> float:
  """The temperature of the calibrated model: drawn by :func:`select_temperature` with
  ``epsilon`` (and ``units``), or (``epsilon`` None: a non-private run) the grid's best
  score."""
  if epsilon is None:
    return TEMPERATURES[int(np.argmin(scores(logits, labels, units=units)))]
  return select_temperature(logits, labels, epsilon, rng, units=units)


def calibrated_head(head: models.TaskHead, logits: np.ndarray, labels: np.ndarray,
                    epsilon: float | None, keys: keys_lib.RunKeys,
                    units: np.ndarray | None = None) -> models.TaskHead:
  """``head`` with the temperature chosen on the validation rows' ``logits`` and ``labels``
  (privately with ``epsilon``; None: a non-private run), the same on every process;
  ``units`` (each row's privacy unit) as :func:`select_temperature`'s.

  Raises:
    ConfigError: the task is not a classification.
  """
  if head.kind == "regression":
    raise errors.ConfigError("calibration.epsilon applies to classifiers; unset it for a "
                             "regression task")
  temperature = choose_temperature(logits, labels, epsilon,
                                   mechanism_rng(keys.noise, keys.noise_fixed), units)
  # The grid's index travels (an exact integer), not the float.
  index = int(distributed.broadcast_from_process_0(
      np.array(TEMPERATURES.index(temperature), np.int32)))
  temperature = TEMPERATURES[index]
  say(f"calibration: temperature {temperature:g} chosen on {len(labels)} validation rows"
      + (f" (epsilon {epsilon:g})" if epsilon is not None else " (non-private)"))
  return dataclasses.replace(head, temperature=temperature)

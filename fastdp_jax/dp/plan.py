"""The privacy plan of a run: its public parameters, fixed before the first update.

q = batch_size / N, T = epochs * round(N / batch_size) updates, delta (default below 1/N),
sigma (given, or calibrated to ``dp.target_epsilon`` through ``dp_accounting``), and the
overflow probability of the fixed-capacity Poisson batches, which adds to the stated delta.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fastdp_jax import config as config_lib
from fastdp_jax.dp import accounting
from fastdp_jax import errors
from fastdp_jax.console import say
from fastdp_jax.dp import release
from fastdp_jax.dp import sampling


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
  """The public privacy parameters of a run (logged and written to the summary).

  ``delta`` is the accountant's: the requested delta (``dp.delta``, or the default below 1/N)
  less :data:`fastdp_jax.dp.sampling.OVERFLOW_SHARE` of it, which bounds the overflow's term
  ``overflow_delta``; the stated delta, :attr:`delta_total`, is their sum.
  """

  enabled: bool
  sampling_rate: float
  steps_per_epoch: int
  total_steps: int
  l2_norm_clip: float | None
  noise_multiplier: float
  delta: float
  accountant: str
  overflow_probability: float = sampling.DEFAULT_OVERFLOW_PROBABILITY
  overflow_delta: float = 0.0
  epsilon_bound: float = float("inf")  # the epsilon the run can reach (the overflow term's)
  delta_warning: str | None = None
  # The N that q, T and delta derive from, and how it is known (fastdp_jax.dp.count): a DP
  # estimate whose epsilon adds to the run's, or a figure the user declared public.
  num_examples: int | None = None
  num_examples_source: str | None = None
  count_epsilon: float = 0.0
  # The privacy unit of a unit dataset (its manifest's columns and the public bound k on a
  # unit's rows): N, q, the capacity and delta's default then count units, and (epsilon,
  # delta) hold for adding or removing one whole unit. None: every row is its own unit.
  privacy_unit: tuple[str, ...] | None = None
  max_rows_per_unit: int | None = None

  @property
  def delta_total(self) -> float:
    """The stated delta: the accountant's plus the overflow's term, at most the requested."""
    return self.delta + self.overflow_delta

  def epsilon(self, steps: int) -> float:
    """Epsilon of ``steps`` updates of this plan (inf when DP is off)."""
    if not self.enabled:
      return float("inf")
    return accounting.compute_epsilon(self.noise_multiplier, self.sampling_rate, steps,
                                      self.delta, self.accountant)


def check_rows(num_examples: int, batch_size: int, *, public_num_examples: int | None = None,
               where: str = "") -> float:
  """The sampling rate q = batch_size / N of ``num_examples`` training rows, or a refusal.

  The one rule on N, run twice: from the manifest's row count before the workdir is made
  (:func:`fastdp_jax.inputs.check_enough_rows`), and by :func:`plan_privacy` on the rows read.

  Args:
    num_examples: the training rows (of all processes).
    batch_size: the expected batch size.
    public_num_examples: a declared public N that q is derived from instead.
    where: what holds the rows, for the message (e.g. ``data.path=DIR``).

  Raises:
    ConfigError: no training row (N = 0 would divide q by zero), or q > 1.
  """
  if num_examples < 1:
    raise errors.ConfigError(
        f"{where or 'the training data'} has no training rows (N = {num_examples}); each "
        f"update samples its batch from them (q = batch_size / N <= 1 needs N >= "
        f"batch_size={batch_size}): use a larger dataset")
  n = num_examples if public_num_examples is None else int(public_num_examples)
  q = batch_size / n
  if not 0 < q <= 1:
    raise errors.ConfigError(f"sampling rate q = batch_size / N = {batch_size} / {n} = "
                             f"{q:.4g} must be in (0, 1]{f' for {where}' if where else ''}; "
                             "lower batch_size or use more training rows")
  return q


def plan_privacy(dp: config_lib.DPSettings, *, batch_size: int, num_epochs: int,
                 num_examples: int, num_devices: int = 1,
                 public_num_examples: int | None = None) -> PrivacyPlan:
  """Derives q, the number of updates, delta and sigma (calibrated to a target epsilon).

  Convention for N: q = batch_size / N and T = epochs * round(N / batch_size) treat the
  number of training rows as public, as Opacus, TF Privacy and jax_privacy do;
  ``public_num_examples`` (``data.public_num_examples``) derives q and T from a declared public
  figure instead. The guarantee is for adding or removing one row with q held fixed.

  Args:
    dp: the ``dp`` settings (sigma or a target epsilon, C, delta, the accountant, a cap).
    batch_size: the expected batch size.
    num_epochs: epochs of round(N / batch_size) updates.
    num_examples: N, the training rows of all processes.
    num_devices: devices the batch is split over (each pads its part to a capacity).
    public_num_examples: a declared public N that replaces ``num_examples``.
  """
  q = check_rows(num_examples, batch_size, public_num_examples=public_num_examples)
  if public_num_examples is not None:
    num_examples = int(public_num_examples)
  steps_per_epoch = max(1, round(num_examples / batch_size))
  total = num_epochs * steps_per_epoch
  requested = release.default_delta(num_examples) if dp.delta is None else float(dp.delta)
  # The stated delta is at most the requested one: the accountant gets all of it but the
  # share set aside for a batch overflowing its capacity (see overflow_term).
  delta = requested * (1 - sampling.OVERFLOW_SHARE)
  if not dp.enabled:
    return PrivacyPlan(enabled=False, sampling_rate=q, steps_per_epoch=steps_per_epoch,
                       total_steps=total, l2_norm_clip=None, noise_multiplier=0.0,
                       delta=requested, accountant=dp.accountant,
                       overflow_probability=dp.overflow_probability
                       or sampling.DEFAULT_OVERFLOW_PROBABILITY)
  sigma = dp.noise_multiplier
  if dp.target_epsilon is not None:
    # The target wins over a sigma inherited from the config file, so that
    # `--config.dp.target_epsilon=1` works from the command line; said aloud.
    sigma = accounting.calibrate_noise_multiplier(
        dp.target_epsilon, q, total, delta, dp.accountant,
        progress=accounting.progress_printer(
            f"calibrating the noise multiplier to epsilon <= {dp.target_epsilon} over {total} "
            "updates", write=say))
    say(f"noise multiplier calibrated to {sigma:.4f} for epsilon <= {dp.target_epsilon} "
        f"over {total} updates" + (f" (dp.noise_multiplier={dp.noise_multiplier} ignored)"
                                   if dp.noise_multiplier is not None else ""))
  if dp.max_epsilon is not None:  # refused before any update, not after an empty run
    first = accounting.compute_epsilon(float(sigma), q, 1, delta, dp.accountant)
    if first > dp.max_epsilon:
      raise errors.ConfigError(
          f"dp.max_epsilon={dp.max_epsilon} is below what a single update costs: epsilon "
          f"{first:.6g} (sigma {float(sigma):.4g}, q {q:.4g}, delta {delta:g}); no update fits."
          f" Raise dp.max_epsilon above {first:.6g}, or make each update cheaper (a larger "
          "dp.noise_multiplier or a smaller batch_size)")
  # The overflow term grows with e^epsilon: the epsilon the run can reach (a calibrated
  # sigma reaches the target; a fixed one its plan's, or the cap).
  if dp.target_epsilon is not None:
    bound = float(dp.target_epsilon)
  else:
    bound = accounting.compute_epsilon(float(sigma), q, total, delta, dp.accountant)
  if dp.max_epsilon is not None:
    bound = min(bound, float(dp.max_epsilon))
  p_over = dp.overflow_probability
  if p_over is None:
    p_over = sampling.automatic_overflow_probability(requested, total, num_devices, bound)
  overflow = overflow_term(p_over, total, num_devices, bound, requested,
                           "dp.overflow_probability")
  warning = None
  if requested >= 1 / num_examples:
    # A mechanism that publishes a random row outright is (0, 1/N)-DP: delta >= 1/N allows it.
    warning = (f"delta={requested:g} is not below 1/N: the guarantee allows releasing a whole "
               f"row; unset dp.delta for the default {release.default_delta(num_examples):g}")
    say(f"WARNING: {warning}")
  return PrivacyPlan(enabled=True, sampling_rate=q, steps_per_epoch=steps_per_epoch,
                     total_steps=total, l2_norm_clip=float(dp.l2_norm_clip),
                     noise_multiplier=float(sigma), delta=delta, accountant=dp.accountant,
                     overflow_probability=p_over, overflow_delta=overflow,
                     epsilon_bound=bound, delta_warning=warning)


def overflow_term(overflow_probability: float, total_steps: int, num_devices: int,
                  epsilon: float, requested_delta: float, what: str) -> float:
  """The overflow's term in delta, refused when above its share of the requested delta.

  Raises:
    ConfigError: ``what`` (the overflow probability's source) is too large for the delta.
  """
  term = sampling.overflow_delta(overflow_probability, total_steps, num_devices, epsilon)
  if term > sampling.OVERFLOW_SHARE * requested_delta * (1 + 1e-9):
    most = sampling.automatic_overflow_probability(requested_delta, total_steps, num_devices,
                                                   epsilon)
    raise errors.ConfigError(
        f"{what}={overflow_probability:g} makes the overflow's term in delta {term:.3g}, above "
        f"{sampling.OVERFLOW_SHARE:g} of delta={requested_delta:g}; use at most {most:.3g}")
  return term


def noise_warning(plan: PrivacyPlan, num_params: int, batch_size: int,
                  target_epsilon: float | None) -> str | None:
  """A warning when the noise drowns any possible signal (the model cannot learn).

  Per update, the noise on the mean gradient has norm about sigma * C * sqrt(d) / B, and the
  mean of clipped gradients has norm at most C: their ratio sigma * sqrt(d) / B above 10
  means the noise is an order of magnitude above the largest possible signal.
  """
  if not plan.enabled:
    return None
  ratio = plan.noise_multiplier * np.sqrt(num_params) / batch_size
  if ratio <= 10:
    return None
  why = (f" (calibrated to dp.target_epsilon={target_epsilon})"
         if target_epsilon is not None else "")
  return (f"noise multiplier {plan.noise_multiplier:.4g}{why}: the noise norm per update is "
          f"{ratio:.3g} times the largest possible mean clipped gradient; the model is "
          "unlikely to learn. Raise the target epsilon, the batch size or lower the number "
          "of updates")


def stop_at(max_epsilon: float | None, plan: PrivacyPlan,
             ledger: accounting.PrivacyLedger) -> int:
  """The last update count within ``dp.max_epsilon`` (the plan's total without a cap)."""
  if not plan.enabled or max_epsilon is None:
    return plan.total_steps
  more = ledger.steps_within(max_epsilon, plan.noise_multiplier, plan.sampling_rate,
                             plan.total_steps - ledger.steps,
                             progress=accounting.progress_printer(
                                 f"privacy budget: finding the last update within "
                                 f"dp.max_epsilon={max_epsilon}", unit="updates", write=say))
  stop = ledger.steps + more
  if stop < plan.total_steps:
    say(f"privacy budget: dp.max_epsilon={max_epsilon} allows {stop} of "
        f"{plan.total_steps} updates")
  return stop

"""Privacy accounting of DP-SGD with Poisson sampling, through Google's ``dp_accounting``.

One optimizer update is one ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; a run of T
updates is their self-composition. Nothing here re-implements RDP or PLD arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import math
import time
from collections.abc import Callable
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

from fastdp_jax import errors

ACCOUNTANTS = ("pld", "rdp")
# Smallest noise multiplier calibration searches; below it the PLD discretisation explodes and
# DP-SGD gives no meaningful guarantee anyway.
_MIN_SIGMA = 0.3
# Below this sigma the PLD accountant's loss distribution grows without bound (one update at
# sigma 0.05 takes 20 s, at 0.01 it does not finish; 1e-9 fails at once with "Maximum allowed
# size exceeded"), and one update already costs epsilon in the tens.
MIN_PLD_NOISE_MULTIPLIER = 0.1
# Largest sigma calibration returns: beyond it the noise drowns any gradient of a batch of
# realistic size, and PLD evaluations over the (many) updates that need it take minutes each.
MAX_CALIBRATED_NOISE_MULTIPLIER = 100.0

# The bracket's RDP orders: the integer ones of dp_accounting's defaults. At an integer order
# A_alpha is a finite sum, which always converges; the fractional orders' series does not
# converge at small sigma and large q (sigma 0.3, q 0.05: alpha 1.1-1.3), where dp_accounting
# logs "_compute_log_a_frac failed to converge" once per order and drops the order. The bracket
# only needs an upper bound of the PLD epsilon, which any set of orders gives.
_BRACKET_RDP_ORDERS = tuple(
    o for o in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if float(o).is_integer())
_DIVERGENT_ORDER = "_compute_log_a_frac failed to converge"

# Called after each accountant evaluation of a search: (sigma or number of updates tried,
# its epsilon, or None while the library's search keeps it to itself).
Progress = Callable[[float, "float | None"], None]


class CalibrationError(errors.UserError):
  """``dp.target_epsilon`` cannot be met with a noise multiplier in the sane range."""


class AccountingError(errors.UserError):
  """The accountant cannot compute epsilon for these parameters."""


def progress_printer(what: str, unit: str = "sigma", every_s: float = 5.0,
                     write: Callable[[str], None] | None = None) -> Progress:
  """A :data:`Progress` callback writing ``what`` and the latest evaluation, at most once
  every ``every_s`` seconds (so quick searches stay silent and slow ones are visible).

  Args:
    write: where the line goes (default: stdout; the trainer passes its process-0 printer).
  """
  start = last = time.monotonic()
  count = 0

  def report(value: float, epsilon: float | None) -> None:
    nonlocal last, count
    count += 1
    now = time.monotonic()
    if now - last >= every_s:
      last = now
      found = f" -> epsilon {epsilon:.4g}" if epsilon is not None else ""
      line = f"{what}: {count} evaluations ({now - start:.0f} s), {unit} {value:.6g}{found}"
      (write or (lambda text: print(text, flush=True)))(line)

  return report


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


# A pure function of its arguments, and 0.2-0.5 s with PLD: every trial of fastdp-tune
# plans the same (sigma, q, T, delta) and asks for it once.
@functools.lru_cache(maxsize=1024)
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

  Example::

    >>> round(compute_epsilon(4.0, 1024 / 50000, 10000, 1e-5), 4)  # jax_privacy's 2.09245
    2.0925
    >>> round(compute_epsilon(1.3, 150 / 60000, 6000, 1e-5, "rdp"), 4)  # TF Privacy's 0.72
    0.7242
  """
  _check(sampling_rate, steps, delta, accountant)
  if steps == 0:
    return 0.0
  if noise_multiplier <= 0:
    return float("inf")
  acc = make_accountant(accountant)
  try:
    acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))
  except (ValueError, MemoryError, OverflowError) as e:  # PLD at a tiny sigma
    raise AccountingError(
        f"the {accountant.upper()} accountant cannot compute epsilon for sigma "
        f"{noise_multiplier:g}, q {sampling_rate:.4g}, {steps} updates ({e}); a sigma this "
        f"small gives no meaningful guarantee: use sigma >= {MIN_PLD_NOISE_MULTIPLIER}, the "
        "rdp accountant, or no DP") from e


# The largest unit group_epsilon accepts: the spec's max_rows_per_unit bound (1..64).
MAX_ROWS_PER_UNIT = 64


def group_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                  rows_per_unit: int) -> float:
  """Epsilon that a ROW-level run gives a unit (person, household) of ``rows_per_unit`` rows.

  A row-level run samples each row independently with probability q and clips each row, so a
  unit of k rows puts Binomial(k, q) clipped vectors into an update: under adding or removing
  the whole unit, one update is a mixture of Gaussians with sensitivities 0..k (in units of C)
  weighted by Binomial(k, q) (Ganesh 2024, arXiv:2401.10294), which dp_accounting's PLD
  accountant composes tightly (``MixtureOfGaussiansDpEvent``; PLD only: the pinned RDP
  accountant does not support it). This is the comparison figure for a unit-level run, never
  its guarantee: a unit-level run's epsilon is :func:`compute_epsilon` at q = units sampled /
  units, whatever k is. At k = 1 it is the row-level epsilon.

  Args:
    noise_multiplier: sigma of the row-level run.
    sampling_rate: q, the row-level Poisson rate.
    steps: T, the updates run.
    delta: the delta at which to state epsilon (the unit-level delta).
    rows_per_unit: k, the most rows one unit has (1..MAX_ROWS_PER_UNIT).

  Returns:
    The unit's epsilon (0 for zero steps, ``inf`` for sigma 0).

  Raises:
    ValueError: a parameter out of range.
    AccountingError: the PLD accountant cannot compute it (a tiny sigma).
  """
  _check(sampling_rate, steps, delta, "pld")
  if not 1 <= rows_per_unit <= MAX_ROWS_PER_UNIT:
    raise ValueError(f"{rows_per_unit=} must be in 1..{MAX_ROWS_PER_UNIT}")
  if steps == 0:
    return 0.0
  if noise_multiplier <= 0:
    return float("inf")
  k, q = int(rows_per_unit), float(sampling_rate)
  weights = [math.comb(k, i) * q ** i * (1 - q) ** (k - i) for i in range(k + 1)]
  event = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
      float(noise_multiplier), [float(i) for i in range(k + 1)], weights)
  acc = pld.PLDAccountant()  # neighbouring relation: add or remove one (unit)
  try:
    acc.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    return float(acc.get_epsilon(delta))
  except (ValueError, MemoryError, OverflowError) as e:
    raise AccountingError(
        f"the PLD accountant cannot compute a {k}-row unit's epsilon for sigma "
        f"{noise_multiplier:g}, q {sampling_rate:.4g}, {steps} updates ({e}); use sigma >= "
        f"{MIN_PLD_NOISE_MULTIPLIER}") from e


class _OneNoteForDivergentOrders(std_logging.Filter):
  """Turns dp_accounting's per-order convergence warnings into one note per process.

  With ``dp.accountant='rdp'`` (or a ledger of several segments, composed by RDP) at small
  sigma and large q, the RDP accountant warns once per fractional order whose series does not
  converge, and leaves that order out. Leaving an order out is sound: epsilon is a minimum
  over orders, each of which bounds it, so the result is still an upper bound (at most a
  little looser). Six such warnings per evaluation read like a failure; one line says what
  they mean.
  """

  def __init__(self) -> None:
    super().__init__()
    self.noted = False

  def filter(self, record: std_logging.LogRecord) -> bool:
    if not str(record.msg).startswith(_DIVERGENT_ORDER):
      return True
    if self.noted:
      return False
    self.noted = True
    args = record.args if isinstance(record.args, tuple) else ()
    where = (f" (first at q={args[1]:g}, sigma={args[2]:g}, alpha={args[3]:g})"
             if len(args) == 4 else "")
    record.msg = ("dp_accounting's RDP accountant left out the fractional orders whose series "
                  f"does not converge{where}; epsilon is the minimum over the other orders, "
                  "still a valid upper bound (this note is shown once)")
    record.args = ()
    record.levelno, record.levelname = std_logging.INFO, "INFO"
    return True


def _install_note_filter() -> None:
  # dp_accounting logs through absl, whose records go to the Python logger "absl".
  logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _OneNoteForDivergentOrders) for f in logger.filters):
    logger.addFilter(_OneNoteForDivergentOrders())


_install_note_filter()


def _bracket_accountant() -> dp_accounting.PrivacyAccountant:
  return rdp.RdpAccountant(_BRACKET_RDP_ORDERS)


def _rdp_epsilon(sigma: float, sampling_rate: float, steps: int, delta: float) -> float:
  """An upper bound of the PLD epsilon by RDP at integer orders (no convergence warnings)."""
  acc = _bracket_accountant()
  acc.compose(dp_event(sigma, sampling_rate, steps))
  return float(acc.get_epsilon(delta))


class _DropDivergentOrders(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_DIVERGENT_ORDER)


def _rdp_epsilon_all_orders(sigma: float, sampling_rate: float, steps: int,
                            delta: float) -> float:
  """The same upper bound over all of dp_accounting's default orders, fractional ones too.

  Tighter than :func:`_rdp_epsilon` at small sigma, where the refusal of a target reached
  below the smallest sigma needs it; orders whose series does not converge are left out by
  the library (still an upper bound), and their warnings are dropped: this is an internal
  check, not a figure the run states.
  """
  logger, drop = std_logging.getLogger("absl"), _DropDivergentOrders()
  logger.addFilter(drop)
  try:
    return compute_epsilon(sigma, sampling_rate, steps, delta, "rdp")
  finally:
    logger.removeFilter(drop)


def _bracket(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
             accountant: str, progress: Progress) -> dp_accounting.ExplicitBracketInterval:
  """An interval holding the calibrated sigma, found with cheap RDP evaluations.

  PLD evaluations at small sigma are slow (wide loss distributions), so the search for a
  bracket starts from the RDP calibration, which is fast and never below the PLD sigma.
  Targets outside ``[_MIN_SIGMA, MAX_CALIBRATED_NOISE_MULTIPLIER]`` are refused first, with
  two RDP evaluations (milliseconds), before any slow search.
  """
  where = f"dp.target_epsilon={target_epsilon:g} over {steps} updates at q={sampling_rate:.4g}"
  at_min = _rdp_epsilon_all_orders(_MIN_SIGMA, sampling_rate, steps, delta)
  if at_min <= target_epsilon:  # PLD <= RDP: the PLD sigma is below _MIN_SIGMA too
    raise CalibrationError(
        f"{where} is reached with a noise multiplier below {_MIN_SIGMA} (sigma {_MIN_SIGMA} "
        f"already gives epsilon {at_min:.4g}): at such a target DP-SGD gives no meaningful "
        "guarantee; set a smaller target, or dp.noise_multiplier yourself")
  top = MAX_CALIBRATED_NOISE_MULTIPLIER
  at_max = _rdp_epsilon(top, sampling_rate, steps, delta)
  if at_max > target_epsilon:  # by RDP, an upper bound (a PLD evaluation here takes minutes)
    raise CalibrationError(
        f"{where} needs a noise multiplier above {top:g} (sigma {top:g} gives epsilon "
        f"{at_max:.4g} by RDP): the noise would drown any gradient; use fewer updates "
        "(num_epochs), a larger dp.target_epsilon, or set dp.noise_multiplier yourself")
  hi = float(dp_accounting.calibrate_dp_mechanism(
      _bracket_accountant, lambda s: dp_event(s, sampling_rate, steps), target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(_MIN_SIGMA, top)))

  def eps(s: float) -> float:
    e = compute_epsilon(s, sampling_rate, steps, delta, accountant)
    progress(s, e)
    return e

  while eps(hi) > target_epsilon:
    hi *= 1.25
  lo = hi
  while lo > _MIN_SIGMA:
    lo = max(_MIN_SIGMA, lo * 0.8)
    if eps(lo) > target_epsilon:
      break
  else:
    raise CalibrationError(f"{where} needs a noise multiplier below {_MIN_SIGMA}: DP-SGD gives "
                           "no meaningful guarantee there; set a smaller target")
  return dp_accounting.ExplicitBracketInterval(lo, hi)


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: str = "pld",
                               progress: Progress | None = None) -> float:
  """The smallest noise multiplier (to the search tolerance) whose epsilon <= target.

  The returned sigma is checked: ``compute_epsilon(sigma, ...) <= target_epsilon``.

  Args:
    progress: called with ``(sigma, epsilon)`` after each evaluation of the accountant (each
      can take seconds for PLD over many updates); see :func:`progress_printer`.

  Raises:
    CalibrationError: the target needs sigma below 0.3 or above
      :data:`MAX_CALIBRATED_NOISE_MULTIPLIER` (said within milliseconds, before the search).
  """
  _check(sampling_rate, steps, delta, accountant)
  if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise CalibrationError(f"{target_epsilon=} must be a positive finite number")
  if steps == 0:
    raise ValueError("cannot calibrate noise for zero steps")
  report = progress or (lambda sigma, epsilon: None)
  bracket = _bracket(target_epsilon, sampling_rate, steps, delta, accountant, report)

  def event(s: float) -> dp_accounting.DpEvent:
    report(s, None)  # Brent's evaluation at s starts (its epsilon stays inside the library)
    return dp_event(s, sampling_rate, steps)

  sigma = float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant), event,
      target_epsilon, delta, bracket_interval=bracket, tol=1e-5 * bracket.endpoint_2))
  # Brent's search brackets the root; step up until the target is met for certain.
  while compute_epsilon(sigma, sampling_rate, steps, delta, accountant) > target_epsilon:
    sigma *= 1 + 1e-6
  return sigma


# --- the privacy ledger ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment:
  """``steps`` consecutive updates with the same privacy parameters (one ledger entry)."""

  noise_multiplier: float
  sampling_rate: float
  steps: int


class _SegmentCurve:
  """Epsilon after T updates of one (sigma, q) segment, cheap enough to log often.

  ``dp_accounting``'s PLD accountant rebuilds the privacy loss distribution of one
  Poisson-subsampled Gaussian update at every call (0.2-1.5 s on a 2-core CPU). This builds
  it once and self-composes it T times, exactly the computation the accountant performs, so
  the values are bit-identical to :func:`compute_epsilon` (tested). RDP is cheap: called
  directly.
  """

  def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float,
               accountant: str):
    self.noise_multiplier, self.sampling_rate = float(noise_multiplier), float(sampling_rate)
    self.delta, self.accountant = float(delta), accountant
    self._one_update: Any = None  # the PLD of one update, built on first use
    # epsilon by T: ledgers that share this curve (fastdp_jax.trials' side-by-side trials,
    # all at the same update) ask for the same T once each.
    self._values: dict[int, float] = {}

  def __call__(self, steps: int) -> float:
    if int(steps) not in self._values:
      self._values[int(steps)] = self._epsilon(steps)
    return self._values[int(steps)]

  def _epsilon(self, steps: int) -> float:
    if self.noise_multiplier <= 0:
      return float("inf")
    if self.accountant != "pld" or steps <= 0:
      return compute_epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta,
                             self.accountant)
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    interval = 1e-4  # PLDAccountant's default value_discretization_interval
    if self._one_update is None:
      self._one_update = pld_lib.from_gaussian_mechanism(
          standard_deviation=self.noise_multiplier, value_discretization_interval=interval,
          sampling_prob=self.sampling_rate)
    composed = pld_lib.identity(value_discretization_interval=interval).compose(
        self._one_update.self_compose(int(steps)))
    return float(composed.get_epsilon_for_delta(self.delta))


class PrivacyLedger:
  """Every update a run has made, by segment, and every accounting question about them.

  One segment (the usual run) is accounted with the configured accountant, through a cached
  curve for frequent logging. Several segments (a resume with ``checkpoint.allow_changes``,
  whose parameters may have been chosen after seeing earlier results) are composed with RDP,
  which holds under adaptive choice of each segment's parameters when the total is compared
  with a budget fixed in advance (``dp.max_epsilon``: a Renyi filter, Feldman & Zrnic 2021).

  Args:
    delta: the accountant's delta.
    accountant: ``'pld'`` or ``'rdp'``.
    segments: the segments so far.

  Example::

    >>> ledger = PrivacyLedger(1e-5).add(4.0, 1024 / 50000, 10000)
    >>> round(ledger.epsilon(), 4), ledger.steps
    (2.0925, 10000)
    >>> ledger.add(2.0, 0.01, 500).composition  # a later segment, chosen after the first
    'rdp (adaptive)'
  """

  def __init__(self, delta: float, accountant: str = "pld",
               segments: tuple[Segment, ...] = ()):
    self.delta, self.accountant = float(delta), accountant
    self.segments = tuple(s for s in segments if s.steps > 0)
    self._curves: dict[tuple[float, float], _SegmentCurve] = {}

  @property
  def steps(self) -> int:
    return sum(s.steps for s in self.segments)

  @property
  def composition(self) -> str:
    """How the segments are composed: the accountant, or ``'rdp (adaptive)'``."""
    return self.accountant if len(self.segments) <= 1 else "rdp (adaptive)"

  def add(self, noise_multiplier: float, sampling_rate: float, steps: int) -> PrivacyLedger:
    """The ledger after ``steps`` more updates (merged into the last segment if it matches)."""
    segments = self.segments
    last = segments[-1] if segments else None
    if steps <= 0:
      pass
    elif last and (last.noise_multiplier, last.sampling_rate) == (noise_multiplier,
                                                                  sampling_rate):
      segments = segments[:-1] + (dataclasses.replace(last, steps=last.steps + steps),)
    else:
      segments += (Segment(noise_multiplier=float(noise_multiplier),
                           sampling_rate=float(sampling_rate), steps=int(steps)),)
    out = PrivacyLedger(self.delta, self.accountant, segments)
    out._curves = self._curves  # the cached curves stay valid: same delta and accountant
    return out

  def epsilon(self, extra_steps: int = 0, noise_multiplier: float | None = None,
              sampling_rate: float | None = None) -> float:
    """Epsilon of the ledger, plus ``extra_steps`` more updates at (sigma, q) if given."""
    segments = list(self.segments)
    if extra_steps > 0:
      segments.append(Segment(noise_multiplier=float(noise_multiplier),
                              sampling_rate=float(sampling_rate), steps=int(extra_steps)))
      if len(segments) > 1 and (segments[-2].noise_multiplier, segments[-2].sampling_rate) == (
          noise_multiplier, sampling_rate):
        merged = dataclasses.replace(segments[-2], steps=segments[-2].steps + extra_steps)
        segments = segments[:-2] + [merged]
    if not segments:
      return 0.0
    if any(s.noise_multiplier <= 0 for s in segments):
      return float("inf")
    if len(segments) == 1:
      s = segments[0]
      key = (s.noise_multiplier, s.sampling_rate)
      if key not in self._curves:
        self._curves[key] = _SegmentCurve(*key, self.delta, self.accountant)
      return self._curves[key](s.steps)
    acc = make_accountant("rdp")
    for s in segments:
      acc.compose(dp_event(s.noise_multiplier, s.sampling_rate, s.steps))
    return float(acc.get_epsilon(self.delta))

  def steps_within(self, max_epsilon: float | None, noise_multiplier: float,
                   sampling_rate: float, max_steps: int,
                   progress: Progress | None = None) -> int:
    """The most further updates at (sigma, q), up to ``max_steps``, within ``max_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` with ``discrete=True`` (the largest number
    of steps within a budget) on the ledger's composition. ``progress`` is called with
    ``(updates tried, epsilon or None)`` after each evaluation.
    """
    if max_epsilon is None or max_steps <= 0:
      return max(0, max_steps)
    if noise_multiplier <= 0:
      return 0
    report = progress or (lambda steps, epsilon: None)

    def fits(k: int) -> bool:
      e = self.epsilon(k, noise_multiplier, sampling_rate)
      report(k, e)
      return e <= max_epsilon

    if fits(max_steps):
      return max_steps
    if not fits(1):
      return 0
    done = self.steps
    if all((s.noise_multiplier, s.sampling_rate) == (noise_multiplier, sampling_rate)
           for s in self.segments):
      accountant = self.accountant  # one segment after the new updates: self-composition
      event = lambda k: dp_event(noise_multiplier, sampling_rate, done + int(k))
    else:
      accountant = "rdp"  # several segments: RDP composition (see the class docstring)
      past = [dp_event(s.noise_multiplier, s.sampling_rate, s.steps) for s in self.segments]
      event = lambda k: dp_accounting.ComposedDpEvent(
          past + [dp_event(noise_multiplier, sampling_rate, int(k))])

    def reported(k):
      report(int(k), None)
      return event(k)

    k = int(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant), reported, max_epsilon, self.delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1, max_steps), discrete=True))
    # The calibration's accountant can differ from the ledger's (merged segments): settle on
    # the ledger's own answer around k.
    while k > 0 and not fits(k):
      k -= 1
    while k < max_steps and fits(k + 1):
      k += 1
    return k

  def to_json(self) -> dict:
    return dict(delta=self.delta, accountant=self.accountant,
                segments=[dataclasses.asdict(s) for s in self.segments])

  @classmethod
  def from_json(cls, d: dict) -> PrivacyLedger:
    return cls(d["delta"], d["accountant"], tuple(Segment(**s) for s in d["segments"]))

"""The number of training rows the run publishes: a DP estimate of N, or a declared figure.

q = batch_size / N, the number of updates T = epochs * round(N / batch_size) and the default
delta are published (``model/model.json``, the card). Computed from the exact N they give N
away (T to within batch_size / 2; epsilon at full precision inverts the accountant for q), and N
is a statistic of the private rows. So by default the run first draws a noisy count,

    N_hat = max(1, round(N + Laplace(1 / dp.count_epsilon))),

which is ``dp.count_epsilon``-DP for adding or removing one training row (the count's
sensitivity is 1; the rounding and the floor are post-processing), and q, T, delta and
everything published derive from N_hat, never from N. In ``dp_accounting`` terms the count is
``LaplaceDpEvent(1 / dp.count_epsilon)`` (:func:`count_event`); its epsilon adds to the run's
like the calibration's (basic composition, :func:`fastdp_jax.dp.calibration.total_epsilon`).

The user may instead declare N public: ``data.public_num_examples`` gives the figure,
``data.num_examples_public`` declares the dataset's own row count public (the card says "N
declared public by the user"); no count is drawn then.

The estimate is drawn once per workdir and kept in ``WORKDIR/num_examples.json`` (private,
owner-only): a resume reuses it, so q and T stay the run's and no second count of the same rows
is spent. With ``dp.noise_seed`` fixed (a reproducibility run, not private) the count's noise
derives from that public seed, so such runs repeat exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import dp_accounting
import jax
import numpy as np

from fastdp_jax import atomic
from fastdp_jax import config as config_lib
from fastdp_jax import distributed
from fastdp_jax import errors

COUNT_FILE = "num_examples.json"  # the drawn estimate, private, in the workdir
DP_ESTIMATE = "dp estimate"
DECLARED = "declared public by the user"
_NOISE_STREAM = 3  # the count's stream of a public noise seed (calibration's is 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowCount:
  """The N a run plans with, and how it is known.

  Attributes:
    value: the figure q, T and delta derive from: the DP estimate or the declared one.
    epsilon: the count's epsilon (0 when N is declared public or DP is off).
    source: :data:`DP_ESTIMATE`, :data:`DECLARED` (with the key that declared it), or
      'dp off'.
  """

  value: int
  epsilon: float
  source: str

  @property
  def estimated(self) -> bool:
    return self.source == DP_ESTIMATE


def count_event(epsilon: float) -> dp_accounting.DpEvent:
  """The count as a ``dp_accounting`` event: Laplace noise of scale 1 / epsilon on a sum of
  sensitivity 1 (``noise_multiplier`` is the scale over the sensitivity)."""
  return dp_accounting.LaplaceDpEvent(1.0 / float(epsilon))


def noisy_count(num_examples: int, epsilon: float, rng: np.random.Generator) -> int:
  """``max(1, round(N + Laplace(1 / epsilon)))``: an ``epsilon``-DP estimate of N.

  Args:
    num_examples: N, the training rows.
    epsilon: the count's epsilon (> 0).
    rng: the mechanism's randomness; secret for the guarantee to hold.
  """
  if not epsilon > 0:
    raise ValueError(f"{epsilon=} must be positive")
  return max(1, int(np.rint(num_examples + rng.laplace(0.0, 1.0 / float(epsilon)))))


def _rng(noise_seed: int | None) -> np.random.Generator:
  """The OS's entropy, or (a reproducibility run) a stream of the public noise seed."""
  if noise_seed is None:
    return np.random.default_rng()
  return np.random.default_rng([int(noise_seed) & 0xFFFFFFFF, _NOISE_STREAM])


def _saved(workdir: str, digest: str) -> tuple[int, float] | None:
  """``(estimate, its epsilon)`` kept in ``workdir`` for the same rows, or None.

  A changed ``dp.count_epsilon`` does not draw again: a second count of the same rows would
  spend a second epsilon that the run's total would not state.
  """
  path = os.path.join(workdir, COUNT_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if saved["data_digest"] == digest:
      return int(saved["estimate"]), float(saved["epsilon"])
  except (ValueError, KeyError, TypeError, OSError):
    pass
  return None


def resolve(workdir: str | None, num_examples: int, dp: config_lib.DPSettings,
            data: config_lib.DataSettings, digest: str | None) -> RowCount:
  """The run's N: declared, or the workdir's estimate, or a new one (saved before use).

  Args:
    workdir: the run's directory (None: nothing kept, e.g. a benchmark without one).
    num_examples: N, the training rows of all processes (never published).
    dp: the ``dp`` settings (``count_epsilon``, ``noise_seed``, ``enabled``).
    data: the ``data`` settings (a declared N).
    digest: the training rows' digest: an estimate is reused only for the same rows.

  Returns:
    The same :class:`RowCount` on every process.
  """
  if data.public_num_examples is not None:
    return RowCount(value=int(data.public_num_examples), epsilon=0.0,
                    source=f"{DECLARED} (data.public_num_examples)")
  if data.num_examples_public:
    return RowCount(value=int(num_examples), epsilon=0.0,
                    source=f"{DECLARED} (data.num_examples_public)")
  if not dp.enabled:
    return RowCount(value=int(num_examples), epsilon=0.0, source="dp off")
  eps, estimate = float(dp.count_epsilon), -1
  workdir = workdir if workdir and os.path.isdir(workdir) else None
  if jax.process_index() == 0:
    kept = _saved(workdir, str(digest)) if workdir else None
    if kept is not None:
      estimate, eps = kept
    else:
      estimate = noisy_count(num_examples, eps, _rng(dp.noise_seed))
      if workdir:
        atomic.write_private_file(os.path.join(workdir, COUNT_FILE), json.dumps(
            dict(estimate=estimate, epsilon=eps, data_digest=str(digest))))
  # int32 travels exactly (a count beyond it is not a table this trainer holds in memory);
  # the epsilon as float64's two uint32 halves (JAX without x64 would round it).
  words = np.concatenate([np.array([estimate], np.int64).view(np.uint32),
                          np.array([eps], np.float64).view(np.uint32)])
  words = np.asarray(distributed.broadcast_from_process_0(words), np.uint32)
  return RowCount(value=int(words[:2].copy().view(np.int64)[0]),
                  epsilon=float(words[2:].copy().view(np.float64)[0]), source=DP_ESTIMATE)


def check_estimate(count: RowCount, batch_size: int) -> None:
  """Refuses an estimate below the batch size (q = batch_size / N_hat would exceed 1).

  Raises:
    ConfigError: naming the way out (more rows, a smaller batch, or a declared N).
  """
  if count.estimated and count.value < batch_size:
    raise errors.ConfigError(
        f"the DP estimate of N, the training rows (units, with a privacy unit) "
        f"({count.value}, dp.count_epsilon="
        f"{count.epsilon:g}) is below batch_size={batch_size}, so q = batch_size / N would "
        "exceed 1: lower batch_size, raise dp.count_epsilon (less noise), or declare N public "
        "(data.num_examples_public=True)")

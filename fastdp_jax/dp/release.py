"""What a run releases, in one place: every output with its privacy status.

The guarantee is about an adversary who sees everything public and knows every training row
but one. Public: the code, the config, ``WORKDIR/model/`` (the exported artefact) and what the
model card states. Everything else a run writes is as private as the training data (see
``docs/privacy.md``, which lists the same table for people).

Training-row diagnostics (the training loss, the clipped fraction, the count of non-finite
per-example gradients, the model-inversion and membership-inference attacks on training rows)
are computed from training rows without noise: no accountant covers them. They are written
under names that say so (``nonprivate_*``), stay in the private workdir and never enter
``model/``.
"""

from __future__ import annotations

import math
from typing import Any


# Output -> privacy status. "public": may be released; "private": as private as the data.
OUTPUTS = {
    "model/ (params.npz, model.json, MODEL_CARD.md, MANIFEST.sha256)": "public: parameters, "
    "architecture, feature names, privacy parameters from the DP estimate of N (or a declared "
    "N), epsilon/delta, the files' digests; test metrics only with export_test_metrics, marked "
    "as not covered",
    "num_examples.json": "private: the DP estimate of N bound to the rows' digest (its value "
    "is published), reused by a resume",
    "keys.json": "secret: the sampling and noise keys (owner-only); deleting it ends "
    "resumability",
    "checkpoints/": "private: parameters before the end, optimizer state, the ledger",
    "metrics.jsonl (eval, epoch and summary records), TensorBoard events": "private: "
    "nonprivate_* training-row diagnostics; test metrics",
    "summary.json, final_params.npz, report/, profile/": "private: N, data digest, "
    "diagnostics, timings",
    ".lock, KEYS_DELETED": "private: the process id holding the workdir; the mark that the "
    "keys were deleted",
    "console and log lines": "private: same as metrics.jsonl",
    "dataset directories (manifest.json, shards, rejects/)": "private: the data itself",
    "batch directories (preprocessing.poisson_batches)": "private: the rows of every update "
    "and, in private/, the sampling key",
    "Spark staging directories (.NAME.staging-*)": "private: rows being written",
}

# Record keys computed on training rows without noise (not covered by the guarantee).
NONPRIVATE_PREFIX = "nonprivate_"
TRAIN_LOSS = NONPRIVATE_PREFIX + "train_loss"
CLIPPED_FRACTION = NONPRIVATE_PREFIX + "clipped_fraction"
NONFINITE_EXAMPLES = NONPRIVATE_PREFIX + "nonfinite_examples"
ATTACK_ACCURACY = NONPRIVATE_PREFIX + "attack_accuracy"
NONPRIVATE_NOTE = ("nonprivate_* values are computed on training rows without noise: no "
                   "accountant covers them; they stay in the private workdir")

# The reason a run whose settings were chosen on its own data (tuning.private_data
# 'unaccounted') is not private: that choice is a use of the rows no accountant covers.
UNACCOUNTED_TUNING = ("hyperparameters chosen on this data without accounting "
                      "(tuning.private_data='unaccounted')")

# Precision of q in the export: enough to reproduce the accounting to three digits, not
# enough to recover N exactly from batch_size / q.
PUBLIC_Q_DIGITS = 3


def public_sampling_rate(q: float) -> float:
  """q rounded to :data:`PUBLIC_Q_DIGITS` significant digits (what the export states)."""
  if q <= 0 or not math.isfinite(q):
    return q
  return float(f"{q:.{PUBLIC_Q_DIGITS}g}")


# Test metrics in model/ (export_test_metrics): exact statistics of private held-out rows
# (an accuracy is k / n_test at full precision, so it carries the test size), which no
# accountant covers. Left out by default; included, they are rounded to what a reader needs
# and marked.
PUBLIC_METRIC_DIGITS = 4
TEST_METRICS_NOTE = ("computed on held-out private test rows and released without noise "
                     "(export_test_metrics=True), rounded to 4 significant digits: NOT covered "
                     "by the privacy guarantee")
TEST_METRICS_LEFT_OUT = ("test metrics not exported: they are exact statistics of private "
                         "held-out rows that no accountant covers, kept in the private workdir "
                         "(summary.json); export_test_metrics=True includes them, marked as not "
                         "covered by the privacy guarantee")


def public_metric(value: Any) -> Any:
  """A test metric as an export states it: a float to :data:`PUBLIC_METRIC_DIGITS`
  significant digits (what a reader needs; rounding makes a test size harder to read back
  from it, not private: the metric stays marked as not covered); anything else (the task, a
  flag) as it is."""
  if isinstance(value, float) and math.isfinite(value):
    return float(f"{value:.{PUBLIC_METRIC_DIGITS}g}")
  return value


def default_delta(num_examples: int) -> float:
  """The largest power of ten at most 1 / (10 N): delta well below 1/N."""
  return 10.0 ** math.floor(math.log10(1.0 / (10.0 * max(1, num_examples))))


def privacy_status(*, dp_enabled: bool, noise_fixed: bool, sampling_fixed: bool,
                   tuning: Any = None) -> tuple[bool, str | None]:
  """``(private, note)``: private only with DP on, both keys from the OS's entropy, and
  settings not chosen on this data without accounting.

  Args:
    tuning: the ``tuning`` settings (:class:`fastdp_jax.config.TuningSettings`): with
      ``private_data='unaccounted'`` the run is not private, and the note says why.
  """
  if not dp_enabled:
    return False, "DP is off (dp.enabled=False): no clipping, no noise, no guarantee"
  tuned = None
  if tuning is not None and tuning.private_data == "unaccounted":
    tuned = (UNACCOUNTED_TUNING + (f": {tuning.note}" if tuning.note else "")
             + "; epsilon covers the training run alone")
  fixed = [name for name, f in (("dp.sampling_seed", sampling_fixed),
                                ("dp.noise_seed", noise_fixed)) if f]
  if fixed:
    return False, (f"reproducibility run: {' and '.join(fixed)} fixed the "
                   f"{'batches' if sampling_fixed else ''}"
                   f"{' and ' if sampling_fixed and noise_fixed else ''}"
                   f"{'noise' if noise_fixed else ''} from a public seed, so the run has no "
                   "privacy guarantee; epsilon is the accountant's value for the mechanism "
                   "as configured, for comparison only" + (f"; also {tuned}" if tuned else ""))
  if tuned:
    return False, tuned
  return True, None

"""Empirical privacy evaluation: membership inference and a one-run epsilon lower bound.

Two measurements complement the accountant's epsilon (an upper bound that holds for every
attacker):

* **Loss-threshold membership inference** (Yeom et al. 2018): the attacker guesses "member"
  when a row's loss is below a threshold. Training rows (members) against held-out test rows
  (non-members), the same number of each; reported as the ROC AUC (0.5 = no better than a
  coin) and the true-positive rate at a 1 % false-positive rate (Carlini et al. 2022, which
  argues the low-FPR regime is what matters). It measures what one simple attack achieves on
  THIS model, not a guarantee. The statistics are ``jax_privacy.auditing.CanaryScoreAuditor``'s:
  the ROC of an attacker that may randomise between two thresholds (the convex hull of the
  empirical ROC), so its AUC and TPR are at least those of one fixed threshold.
* **A canary audit in one training run** (Steinke, Nasr, Jagielski 2023): ``m`` canary rows
  are made up, each put into the training set independently with probability 1/2; after
  training, the auditor guesses from the canaries' losses which were included (lowest losses:
  "in", highest: "out", abstains on the rest). If the training were (eps, delta)-DP, the number
  of correct guesses could exceed a Binomial tail only with small probability; the largest
  eps that the observed count rejects at significance ``significance`` is an empirical LOWER
  bound on the true epsilon. It must not exceed the accountant's epsilon (except with
  probability ``significance``); a larger value means the implementation leaks more than it
  claims. From the same guesses, the f-DP one-run bound (Mahloujifar, Melis, Chaudhuri 2024)
  is the largest eps whose GAUSSIAN trade-off curve (mu-GDP with that (eps, delta)) the
  guesses reject: tighter, but a lower bound on epsilon only for a mechanism whose privacy is
  that Gaussian curve (it exceeds the true epsilon of randomised response, for one), so the
  comparison with the accountant uses the first bound. Both are computed by
  ``jax_privacy.auditing``.

Canaries change the training set, so they live in a separate *audit dataset*: a copy of a
dataset plus one shard of the included canaries, with every canary and its inclusion bit in
``canaries.npz`` beside it (the auditor's secret; the manifest's ``extra`` points at it)::

  python -m fastdp_jax.dp.privacy_eval make-audit-dataset --data data/generated/capums \
      --output data/generated/capums-audit --canaries 1000
  python main.py --config=configs/seq.py --config.data.path=data/generated/capums-audit

The default canaries are *Dirac* canaries (:func:`make_dirac_canaries`): the audit dataset
has ``m`` more columns, zero in every real row, and canary c is a large value in column
``d + c`` alone, with a random label. No other row's gradient touches canary c's first-layer
weights, so without noise they move exactly when canary c is sampled: with the noise removed
the audit reports a lower bound of about 4 to 5 (m = 1000), far above any useful epsilon,
while with the noise on those weights are drowned in it. Canaries drawn in the data's own
feature space (``kind='gaussian'``) interfere with each other and with the data; on tabular
data they show almost nothing unless the model memorises. The widened model is the audited
training *procedure* (clipping, noise, sampling) applied to a slightly different model: the
audit checks the implementation; audit runs' models are not for release.

Training on an audit dataset runs the audit at the end automatically (the summary's
``privacy_eval.canary_audit``).

References:
  Yeom, Giacomelli, Fredrikson, Jha. Privacy risk in machine learning: analyzing the
    connection to overfitting. CSF 2018.
  Carlini, Chien, Nasr, Song, Terzis, Tramer. Membership inference attacks from first
    principles. IEEE S&P 2022.
  Steinke, Nasr, Jagielski. Privacy auditing with one (1) training run. NeurIPS 2023,
    arXiv:2305.08846 (Algorithm 1, Theorem 3.1 and the p-value computation of its appendix).
  Mahloujifar, Melis, Chaudhuri. Auditing f-differential privacy in one run. ICML 2025,
    arXiv:2410.22235.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax_privacy import auditing

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib

# The guess budgets' sizes tried by the audit, as fractions of the canaries guessed on (see
# guess_budgets). Fixed before seeing any score, and the significance is split over the
# budgets (Bonferroni), so taking the best one stays valid.
DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CANARIES_FILE = "canaries.npz"
CANARY_SHARD = "train-canaries.h5"
CANARY_KINDS = ("dirac", "gaussian")  # see make_audit_dataset
# The Dirac canaries' value in their own column: large enough that a canary's gradient is
# clipped (|p - y| * scale > C for any C up to a few) and almost all of it lies along the
# canary's own column, so that the shared bias carries a negligible share of it.
DIRAC_SCALE = 10.0


# ---------------------------------------------------------------- membership inference
@dataclasses.dataclass(frozen=True, kw_only=True)
class MembershipResult:
  """Result of the loss-threshold membership-inference attack.

  Attributes:
    auc: area under the ROC curve of "member if loss < threshold", thresholds randomised
      between two neighbours allowed (the convex hull of the empirical ROC; 0.5: chance).
    tpr_at_low_fpr: the highest true-positive rate at false-positive rate ``low_fpr`` of such
      a (possibly randomised) threshold.
    low_fpr: the false-positive rate of ``tpr_at_low_fpr`` (0.01).
    advantage: max over thresholds of TPR - FPR (membership advantage, Yeom et al.).
    num_members: training rows attacked.
    num_nonmembers: held-out rows attacked.
    num_nonfinite: attacked rows whose loss under the trained model was not finite (a
      diverged model); each was scored as the largest loss (:func:`membership_inference`).
  """

  auc: float
  tpr_at_low_fpr: float
  low_fpr: float
  advantage: float
  num_members: int
  num_nonmembers: int
  num_nonfinite: int = 0

  def to_dict(self) -> dict[str, float | int]:
    return dataclasses.asdict(self)


def loss_threshold_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, *,
                          low_fpr: float = 0.01) -> MembershipResult:
  """The loss-threshold attack: lower loss -> more likely a training row.

  Args:
    member_losses: [n_in] per-example losses of training rows.
    nonmember_losses: [n_out] per-example losses of rows not trained on.
    low_fpr: the false-positive rate at which the TPR is reported.

  Returns:
    A :class:`MembershipResult` (``jax_privacy.auditing.CanaryScoreAuditor``'s AUC, TPR at
    ``low_fpr`` and, from its best balanced accuracy, the advantage max(TPR - FPR)).

  Example:
    >>> r = loss_threshold_attack(np.array([0.1, 0.2, 0.9]), np.array([0.5, 1.0, 2.0]))
    >>> round(r.auc, 4), round(r.advantage, 4)
    (0.8889, 0.6667)
  """
  pos = -np.asarray(member_losses, np.float64)  # score: higher = "member"
  neg = -np.asarray(nonmember_losses, np.float64)
  if pos.size == 0 or neg.size == 0:
    raise ValueError(f"need members and non-members, got {pos.size} and {neg.size}")
  if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
    raise ValueError("non-finite losses given to the membership-inference attack")
  auditor = auditing.CanaryScoreAuditor(pos, neg)
  # Accuracy at prevalence 1/2 is (TPR + 1 - FPR) / 2, so its maximum gives the advantage.
  advantage = 2 * float(auditor.max_accuracy(prevalence=0.5)) - 1
  return MembershipResult(auc=float(auditor.attack_auroc()),
                          tpr_at_low_fpr=float(auditor.tpr_at_given_fpr(low_fpr)),
                          low_fpr=low_fpr, advantage=advantage,
                          num_members=int(pos.size), num_nonmembers=int(neg.size))


def membership_inference(example_losses: Callable[[np.ndarray, np.ndarray], np.ndarray],
                         train: tuple[np.ndarray, np.ndarray],
                         test: tuple[np.ndarray, np.ndarray], *, num_rows: int,
                         seed: int = 0, low_fpr: float = 0.01) -> MembershipResult:
  """Runs the loss-threshold attack on up to ``num_rows`` training and as many test rows.

  Both sides get the same number of rows (a balanced attack, so AUC 0.5 is chance).

  Args:
    example_losses: ``(features [n, d], labels [n]) -> losses [n]`` of the trained model.
    train: ``(features, labels)`` of the training rows (members).
    test: ``(features, labels)`` of held-out rows (non-members).
    num_rows: rows per side (capped by the smaller split).
    seed: which rows are drawn.
    low_fpr: see :func:`loss_threshold_attack`.
  """
  n = min(int(num_rows), len(train[1]), len(test[1]))
  if n <= 0:
    raise ValueError(f"membership inference needs rows on both sides; {num_rows=}, "
                     f"train {len(train[1])}, test {len(test[1])}")
  rng = np.random.default_rng(seed)
  rows_in = rng.choice(len(train[1]), size=n, replace=False)
  rows_out = rng.choice(len(test[1]), size=n, replace=False)
  losses_in = np.asarray(example_losses(train[0][rows_in], train[1][rows_in]), np.float64)
  losses_out = np.asarray(example_losses(test[0][rows_out], test[1][rows_out]), np.float64)
  # A non-finite loss (a diverged model) is scored as the largest loss, never an error: the
  # run must not stop, or not, according to whether some sampled training row's loss
  # overflows (halting may not depend on one row). The count stays in the private summary.
  bad = int((~np.isfinite(losses_in)).sum() + (~np.isfinite(losses_out)).sum())
  worst = np.finfo(np.float64).max
  losses_in, losses_out = (np.where(np.isfinite(v), v, worst) for v in (losses_in, losses_out))
  result = loss_threshold_attack(losses_in, losses_out, low_fpr=low_fpr)
  return dataclasses.replace(result, num_nonfinite=bad)


# ---------------------------------------------------------------- canaries
@dataclasses.dataclass(frozen=True, kw_only=True)
class Canaries:
  """Made-up training rows for the one-run audit.

  Attributes:
    features: [m, d] float32.
    labels: [m] float32 in {0, 1}.
    included: [m] bool: which canaries go into the training set (secret until the audit).
  """

  features: np.ndarray
  labels: np.ndarray
  included: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def make_canaries(num_canaries: int, num_features: int, *, seed: int,
                  scale: float = 2.0) -> Canaries:
  """Random canaries: Gaussian features of std ``scale``, random labels, included w.p. 1/2.

  Off-distribution features (the real rows are 0/1) and labels unrelated to them make each
  canary's own gradient the main thing that moves its loss, which is what the audit detects.

  Args:
    num_canaries: m.
    num_features: d, the width of the training rows.
    seed: the canaries and their inclusion are a function of (m, d, seed, scale).
    scale: standard deviation of the canaries' features.
  """
  if num_canaries <= 0:
    raise ValueError(f"{num_canaries=} must be positive")
  if not scale > 0:
    raise ValueError(f"{scale=} must be positive")
  rng = np.random.default_rng([int(seed), 0xCA7A])
  return Canaries(
      features=(scale * rng.standard_normal((num_canaries, num_features))).astype(np.float32),
      labels=rng.integers(0, 2, num_canaries).astype(np.float32),
      included=rng.random(num_canaries) < 0.5)


def make_dirac_canaries(num_canaries: int, num_features: int, *, seed: int,
                        scale: float = DIRAC_SCALE) -> Canaries:
  """Dirac canaries: canary c is ``scale`` in its own extra column ``d + c``, 0 elsewhere.

  The audit dataset appends ``m`` columns to the data, zero in every real row (train and
  test): a corner of the feature space that no real row uses. Canary c's gradient on the
  first layer then touches only the weights of column ``d + c``, which no other row's
  gradient touches: without noise, those weights move exactly when canary c is sampled, and
  its loss drops far below that of an excluded canary. With the noise on, only the noise
  moves the weights of an excluded canary's column. This is the input-space counterpart of
  the Dirac gradient canaries of Steinke et al. (one coordinate per canary), and it is what
  gives the one-run audit its power: the canaries do not interfere with each other or with
  the data. Labels are random (the model cannot fit the canaries by one rule).

  Args:
    num_canaries: m (also the number of columns added).
    num_features: d, the width of the real rows.
    seed: the canaries' labels and inclusion are a function of (m, seed).
    scale: the canary's value in its own column (the declared upper bound of the canary
      columns). Larger values make a canary's gradient clipped to C point almost entirely
      along its own column (the bias's share is 1/scale of it).

  Returns:
    :class:`Canaries` with [m, d + m] features.
  """
  if num_canaries <= 0:
    raise ValueError(f"{num_canaries=} must be positive")
  if not scale > 0:
    raise ValueError(f"{scale=} must be positive")
  rng = np.random.default_rng([int(seed), 0xD1AC])
  features = np.zeros((num_canaries, num_features + num_canaries), np.float32)
  features[np.arange(num_canaries), num_features + np.arange(num_canaries)] = scale
  return Canaries(features=features,
                  labels=rng.integers(0, 2, num_canaries).astype(np.float32),
                  included=rng.random(num_canaries) < 0.5)


def add_canaries(features: np.ndarray, labels: np.ndarray,
                 canaries: Canaries) -> tuple[np.ndarray, np.ndarray]:
  """The training rows followed by the included canaries."""
  keep = canaries.included
  return (np.concatenate([features, canaries.features[keep].astype(features.dtype)]),
          np.concatenate([labels, canaries.labels[keep].astype(labels.dtype)]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditResult:
  """Result of the one-run canary audit.

  Attributes:
    epsilon_lower_bound: the empirical lower bound of Steinke et al. (0: nothing shown): valid
      for every (eps, delta)-DP training; the one compared with the accountant.
    epsilon_lower_bound_fdp: the f-DP one-run bound of Mahloujifar et al. (positive guesses
      at every threshold, Bonferroni over them): the largest eps whose Gaussian (mu-GDP)
      trade-off curve the scores reject. A lower bound on epsilon only if the training's
      privacy is that Gaussian curve; not compared with the accountant. None: not computed.
    num_canaries: m.
    num_included: canaries in the training set.
    num_guesses: r of the best guess budget (of the first bound).
    num_correct: v of the best guess budget (of the first bound).
    significance: total significance of each bound (split over its guesses' choices).
    delta: the delta at which the bounds are stated.
  """

  epsilon_lower_bound: float
  epsilon_lower_bound_fdp: float | None
  num_canaries: int
  num_included: int
  num_guesses: int
  num_correct: int
  significance: float
  delta: float

  def to_dict(self) -> dict[str, float | int | None]:
    return dataclasses.asdict(self)


def guess_budgets(num_canaries: int,
                  guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS
                  ) -> list[tuple[int, int]]:
  """The ``(k_in, k_out)`` guess budgets of the audit, fixed before any score is seen.

  For each fraction f: ``f m / 2`` "in" and as many "out" guesses, and ``f m / 2`` "in"
  guesses alone. Guessing "in" only matters under Poisson sampling: an included canary that
  was never sampled looks excluded, so the lowest scores hold some of them, while the highest
  scores hold included, sampled canaries only (Steinke et al. 2023 guess positives only, k- =
  0, for the same reason).
  """
  m = int(num_canaries)
  budgets = []
  for frac in guess_fractions:
    half = min(max(1, int(round(frac * m / 2))), m // 2)
    if half == 0:
      continue
    for b in ((half, half), (half, 0)):
      if b not in budgets:
        budgets.append(b)
  return budgets


def audit_scores(scores: np.ndarray, included: np.ndarray, *, delta: float,
                 significance: float = 0.05,
                 guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
                 fdp: bool = True) -> AuditResult:
  """The one-run audit from per-canary scores (higher = "more likely included").

  For each guess budget ``(k_in, k_out)`` of :func:`guess_budgets` (fixed in advance), guess
  "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest, count the correct
  guesses and compute the lower bound at ``significance / number of budgets``; report the
  largest (a union bound keeps the overall significance). The f-DP bound is
  ``CanaryScoreAuditor.epsilon_one_run_fdp``'s (its own choice of thresholds).

  Args:
    scores: [m] attack scores of the canaries (e.g. minus their loss).
    included: [m] bool, the truth (both included and excluded canaries are needed).
    delta: the delta of the DP claim tested (the run's delta), in (0, 1].
    significance: probability that a correct implementation gets a bound above its true
      epsilon.
    guess_fractions: the guess budgets' sizes (see :func:`guess_budgets`).
    fdp: also compute the f-DP bound (None otherwise): a search over every threshold, about
      0.2 to 0.5 s for 1000 canaries, against a few hundredths for the first bound.
  """
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  m = scores.size
  if m == 0 or included.shape != scores.shape:
    raise ValueError(f"scores {scores.shape} and included {included.shape} must be [m], m > 0")
  if not np.isfinite(scores).all():
    raise ValueError("non-finite canary scores")
  if included.all() or not included.any():
    raise ValueError(f"the audit needs included and excluded canaries; {included.sum()} of "
                     f"{m} are included")
  # Ties broken at random (seeded by the scores' count only), never by the truth. The auditor
  # sees each canary's rank, so that a threshold on it holds exactly the guesses of a budget.
  order = np.lexsort((np.random.default_rng(m).random(m), scores))  # ascending
  rank = np.empty(m)
  rank[order] = np.arange(m)
  auditor = auditing.CanaryScoreAuditor(rank[included], rank[~included])
  budgets = guess_budgets(m, guess_fractions)
  per_budget = significance / len(budgets)
  bounds = []
  for k_in, k_out in budgets:
    r = k_in + k_out
    v = int(included[order[m - k_in:]].sum() + (~included[order[:k_out]]).sum())
    if k_out == 0:  # "in" for the k_in highest ranks: the auditor's threshold m - k_in
      top = auditing.Explicit(threshold=m - k_in)
      eps = auditor.epsilon_one_run(per_budget, delta, threshold_strategy=top)
    else:
      # The auditor's methods take positive guesses only (one threshold). Steinke et al.'s
      # theorem counts right guesses of either sign, and its bound depends on (m, r, v) alone:
      # the function that epsilon_one_run calls with a threshold's counts gives it (private
      # to jax_privacy, whose version is pinned exactly).
      one_run = auditing._epsilon_one_run  # pylint: disable=protected-access
      eps = one_run(0.0, m, r, v, per_budget, delta)
    bounds.append((float(eps), r, v))
  eps, r, v = max(bounds, key=lambda b: b[0])  # the first of equal bounds, as before
  # The f-DP bound with the auditor's own threshold search (every threshold of the ROC's
  # frontier, Bonferroni over them; positive guesses only).
  eps_fdp = float(auditor.epsilon_one_run_fdp(significance, delta)) if fdp else None
  return AuditResult(epsilon_lower_bound=eps, epsilon_lower_bound_fdp=eps_fdp, num_canaries=m,
                     num_included=int(included.sum()), num_guesses=r, num_correct=v,
                     significance=significance, delta=delta)


def audit_canaries(example_losses: Callable[[np.ndarray, np.ndarray], np.ndarray],
                   canaries: Canaries, *, delta: float,
                   significance: float = 0.05) -> AuditResult:
  """Audits a trained model with its canaries: score = minus the canary's loss."""
  losses = np.asarray(example_losses(canaries.features, canaries.labels))
  return audit_scores(-losses, canaries.included, delta=delta, significance=significance)


# ---------------------------------------------------------------- audit datasets
def make_audit_dataset(source: str, output: str, *, num_canaries: int, seed: int = 0,
                       kind: str = "dirac", scale: float | None = None,
                       overwrite: bool = False) -> Canaries:
  """Copies a dataset and adds the included canaries as one more training shard.

  Two kinds of canaries (:data:`CANARY_KINDS`):

  * ``'dirac'`` (default): :func:`make_dirac_canaries`. The copy gets ``num_canaries`` more
    columns (``canary_0``, ...), zero in every real row of both splits, declared bounded by
    ``[0, scale]``; every shard is rewritten. The audit then has power: with the noise
    removed it reports a lower bound far above any useful epsilon. The copy holds
    N (d + m) values (the trainer holds them as float32): to audit a large dataset, audit a
    subset of it; the audit checks the implementation, not the data.
  * ``'gaussian'``: :func:`make_canaries`, in the data's own feature space (the shards are
    copied as they are). Weak on tabular data: a bound above 0 only for models that memorise.

  Args:
    source: a dataset directory (manifest.json) that declares its feature bounds (required
      for ``'dirac'``: the widened dataset declares the union).
    output: the audit dataset directory to create.
    num_canaries: m; about half of them end up in the training set.
    seed: the canaries and their inclusion are a function of (m, d, seed, kind, scale).
    kind: ``'dirac'`` or ``'gaussian'``.
    scale: the Dirac canaries' value (default :data:`DIRAC_SCALE`), or the Gaussian
      canaries' standard deviation (default 2).
    overwrite: replace ``output`` if it exists.

  Returns:
    The canaries (also in ``output/canaries.npz``).

  Raises:
    ValueError: an unknown kind, or a Dirac audit of a source without declared bounds or
      with a column already named like a canary column.
  """
  if kind not in CANARY_KINDS:
    raise ValueError(f"canary {kind=} must be one of {CANARY_KINDS}")
  if scale is None:
    scale = DIRAC_SCALE if kind == "dirac" else 2.0
  manifest = manifest_lib.read_manifest(source)
  if kind == "dirac":
    _check_dirac_source(source, manifest, num_canaries)
  if os.path.exists(output):
    if not overwrite:
      raise FileExistsError(f"output {output} exists; pass overwrite to replace it")
    shutil.rmtree(output)
  staging = output + ".staging"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  stage = _stage_dirac if kind == "dirac" else _stage_gaussian
  canaries, shards, feature_names, bounds = stage(source, staging, manifest, num_canaries,
                                                  seed=seed, scale=scale)
  keep = canaries.included
  shards.append(data_lib.write_shard(
      staging, CANARY_SHARD, "train", canaries.features[keep], canaries.labels[keep],
      feature_bounds=bounds or (-8.0 * scale, 8.0 * scale), feature_names=feature_names))
  _write_audit_manifest(source, staging, manifest, canaries, shards, feature_names, bounds,
                        seed=seed, kind=kind, scale=scale)
  os.replace(staging, output)
  return canaries


def _check_dirac_source(source: str, manifest: manifest_lib.Manifest, num_canaries: int) -> None:
  """Refuses a Dirac audit of a source without declared bounds or with canary-like names."""
  if manifest.feature_bounds is None:
    raise ValueError(f"{source}: the manifest declares no feature bounds; the Dirac audit "
                     "dataset must declare the real columns' bounds (rewrite the data with "
                     "the shard writer's feature_bounds)")
  names = {f"canary_{c}" for c in range(num_canaries)}
  if clash := names & set(manifest.feature_names):
    raise ValueError(f"{source}: columns {sorted(clash)} clash with the canary columns")


# What a staging function returns: the canaries, the real shards written or copied into the
# staging directory, the audit dataset's feature names and its declared bounds (or None).
_Staged = tuple[Canaries, list, tuple, list | None]


def _stage_dirac(source: str, staging: str, manifest: manifest_lib.Manifest, num_canaries: int,
                 *, seed: int, scale: float) -> _Staged:
  """Every real shard rewritten with ``num_canaries`` more columns, zero in every real row."""
  canaries = make_dirac_canaries(num_canaries, manifest.num_features, seed=seed, scale=scale)
  feature_names = manifest.feature_names + tuple(f"canary_{c}" for c in range(num_canaries))
  bounds = list(manifest.feature_bounds) + [(0.0, float(scale))] * num_canaries
  shards = []
  for info in manifest.shards:
    x, y = data_lib.read_shard(source, info)
    x = np.concatenate([x, np.zeros((len(y), num_canaries), x.dtype)], axis=1)
    shards.append(data_lib.write_shard(staging, info.file, info.split, x, y,
                                       feature_bounds=bounds, feature_names=feature_names))
  return canaries, shards, feature_names, bounds


def _stage_gaussian(source: str, staging: str, manifest: manifest_lib.Manifest, num_canaries: int,
                    *, seed: int, scale: float) -> _Staged:
  """The real shards copied as they are; canaries in the data's own feature space."""
  canaries = make_canaries(num_canaries, manifest.num_features, seed=seed, scale=scale)
  shards = []
  for info in manifest.shards:
    shutil.copyfile(os.path.join(source, info.file), os.path.join(staging, info.file))
    shards.append(info)
  # Public bounds of the canaries: +-8 standard deviations (a canary value is clipped there,
  # probability about 1e-15); the audit dataset declares their union with the source's.
  reach = 8.0 * scale
  canaries = dataclasses.replace(canaries, features=np.clip(canaries.features, -reach, reach))
  bounds = None if manifest.feature_bounds is None else [
      (min(lo, -reach), max(hi, reach)) for lo, hi in manifest.feature_bounds]
  return canaries, shards, manifest.feature_names, bounds


def _write_audit_manifest(source: str, staging: str, manifest: manifest_lib.Manifest,
                          canaries: Canaries, shards: list, feature_names: tuple,
                          bounds: list | None, *, seed: int, kind: str, scale: float) -> None:
  """``canaries.npz`` (the auditor's secret) and the manifest that points at it."""
  np.savez(os.path.join(staging, CANARIES_FILE), features=canaries.features,
           labels=canaries.labels, included=canaries.included)
  added = int(canaries.included.sum())
  extra = dict(manifest.extra, canaries=CANARIES_FILE,
               canaries_sha256=data_lib.sha256_file(os.path.join(staging, CANARIES_FILE)),
               canary_seed=int(seed), canary_kind=kind, canary_scale=float(scale),
               num_canaries=len(canaries), audit_of=os.path.abspath(source))
  manifest_lib.write_manifest(staging, feature_names=feature_names,
                              label_name=manifest.label_name, shards=shards,
                              provenance=manifest_lib.Provenance(
                              rows_read=manifest.provenance.rows_read + added,
                              kept=manifest.provenance.kept + added,
                              dropped_na=manifest.provenance.dropped_na,
                              rejected=manifest.provenance.rejected),
                              feature_bounds=bounds, extra=extra)


def load_canaries(data_path: str) -> Canaries | None:
  """The canaries of an audit dataset, or None for an ordinary dataset (or a .h5 file).

  The canary file is inside the trust boundary of the dataset directory, like a shard: a
  plain file name in the directory (no ``..``, no absolute path, no symlink out), checked
  against the sha256 the manifest records. The trainer loads it before the first update.

  Raises:
    data.ShardError: naming the file, if it is outside the directory, missing or altered.
  """
  if not os.path.isdir(data_path):
    return None
  extra = manifest_lib.read_manifest(data_path).extra
  name = extra.get("canaries")
  if not name:
    return None
  where = f"{data_path}: canaries"
  manifest_lib.check_file_name(name, where)
  path = os.path.join(data_path, name)
  real_dir, real = os.path.realpath(data_path), os.path.realpath(path)
  if os.path.dirname(real) != real_dir:
    raise manifest_lib.ShardError(f"{where}: {name!r} points outside the dataset directory")
  if not os.path.isfile(path):
    raise manifest_lib.ShardError(f"{where}: {name!r} is missing (the audit needs it; rebuild "
                                  "with python -m fastdp_jax.dp.privacy_eval make-audit-dataset)")
  want = extra.get("canaries_sha256")
  if not want:
    raise manifest_lib.ShardError(f"{where}: the manifest records no canaries_sha256; rebuild the "
                                  "audit dataset")
  if data_lib.sha256_file(path) != want:
    raise manifest_lib.ShardError(f"{where}: {name!r} does not match the manifest's sha256 "
                                  "(corrupt or replaced file)")
  with np.load(path) as f:
    return Canaries(features=f["features"].astype(np.float32),
                    labels=f["labels"].astype(np.float32), included=f["included"].astype(bool))


# ---------------------------------------------------------------- after training
def batched_losses(apply_fn: Callable, params: Any,
                   chunk: int = 65_536) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """``(features [n, d], labels [n]) -> per-example BCE losses [n]`` of a trained model."""
  import jax  # local: the statistics above need no JAX
  import optax

  @jax.jit
  def losses(params, x, y):
    return optax.sigmoid_binary_cross_entropy(apply_fn(params, x), y)

  def fn(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.float32)
    out = [np.asarray(losses(params, features[lo:lo + chunk], labels[lo:lo + chunk]))
           for lo in range(0, len(labels), chunk)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  return fn


def evaluate_privacy(example_losses: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                     train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                     membership_rows: int, seed: int, canaries: Canaries | None = None,
                     delta: float | None = None, epsilon: float | None = None,
                     significance: float = 0.05) -> tuple[dict[str, Any], list[str]]:
  """The end-of-training privacy evaluation.

  Args:
    example_losses: see :func:`batched_losses`.
    train: ``(features, labels)`` of the training rows.
    test: ``(features, labels)`` of the held-out rows.
    membership_rows: rows per side of the membership-inference attack (0: skip it).
    seed: which rows are attacked.
    canaries: the audit dataset's canaries (None: no audit).
    delta: the run's delta (the audit states its bound at it; None: 1e-5).
    epsilon: the accountant's epsilon, to compare the audit with (inf or None: non-private).
    significance: of the audit.

  Returns:
    ``(results, lines)``: a JSON-able dict with ``membership_inference`` and
    ``canary_audit`` (when run), and human-readable lines for the console.
  """
  results: dict[str, Any] = {}
  lines = []
  if membership_rows > 0:
    mia = membership_inference(example_losses, train, test, num_rows=membership_rows,
                               seed=seed)
    results["membership_inference"] = mia.to_dict()
    lines.append(f"membership inference (loss threshold, {mia.num_members} train vs "
                 f"{mia.num_nonmembers} test rows): AUC {mia.auc:.4f}, TPR "
                 f"{mia.tpr_at_low_fpr:.4f} at FPR {mia.low_fpr:g}")
  if canaries is not None:
    audit = audit_canaries(example_losses, canaries,
                           delta=1e-5 if delta is None else delta, significance=significance)
    res = audit.to_dict()
    bounded = epsilon is not None and np.isfinite(epsilon)
    res["accountant_epsilon"] = float(epsilon) if bounded else None
    res["consistent"] = (audit.epsilon_lower_bound <= epsilon) if bounded else None
    results["canary_audit"] = res
    lines.append(f"canary audit ({audit.num_canaries} canaries, {audit.num_included} "
                 f"included): empirical epsilon >= {audit.epsilon_lower_bound:.4f} at "
                 f"delta {audit.delta:g} ({audit.num_correct}/{audit.num_guesses} guesses "
                 f"right, {100 * (1 - significance):g}% confidence); f-DP one-run bound "
                 f"{audit.epsilon_lower_bound_fdp:.4f} if the training is Gaussian-DP"
                 + (f"; accountant epsilon {epsilon:.4f}" if bounded else ""))
    if bounded and audit.epsilon_lower_bound > epsilon:
      lines.append("WARNING: the empirical lower bound exceeds the accountant's epsilon: "
                   "the training leaks more than it claims (or a 1-in-"
                   f"{1 / significance:g} chance); check the clipping, noise and sampling")
  return results, lines


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fastdp_jax.dp.privacy_eval",
                                   description="Privacy evaluation tools.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("make-audit-dataset",
                     help="copy a dataset and add canaries for the one-run audit")
  p.add_argument("--data", required=True, help="source dataset directory")
  p.add_argument("--output", required=True, help="audit dataset directory to create")
  p.add_argument("--canaries", type=int, default=1000, help="number of canaries m")
  p.add_argument("--seed", type=int, default=0,
                 help="the canaries and which of them are included (default 0)")
  p.add_argument("--kind", choices=CANARY_KINDS, default="dirac",
                 help="dirac: one extra column per canary (powerful; the default); gaussian: "
                 "canaries in the data's own feature space")
  p.add_argument("--scale", type=float, default=None,
                 help=f"the Dirac canaries' value (default {DIRAC_SCALE:g}) or the Gaussian "
                 "canaries' standard deviation (default 2)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --output directory")
  args = parser.parse_args(argv)
  try:
    canaries = make_audit_dataset(args.data, args.output, num_canaries=args.canaries,
                                  seed=args.seed, kind=args.kind, scale=args.scale,
                                  overwrite=args.overwrite)
  except (FileExistsError, FileNotFoundError, ValueError, manifest_lib.ShardError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}: {len(canaries)} canaries, {int(canaries.included.sum())} in the "
        f"training set; train on it and the audit runs at the end")
  return 0


if __name__ == "__main__":
  sys.exit(main())

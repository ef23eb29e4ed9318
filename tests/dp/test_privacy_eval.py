"""Membership inference and the one-run canary audit: statistics, validity, end to end."""

import json
import os

import numpy as np
import pytest
from scipy import optimize, special, stats

from fastdp_jax.dp import accounting
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.dp import privacy_eval as pe


# ---------------------------------------------------------------- the previous statistics
# fastdp_jax.dp.privacy_eval now takes these from jax_privacy.auditing. This is the code it
# replaced, kept here as the reference the new numbers are checked against.
def _old_roc_points(pos, neg):
  pos, neg = np.sort(pos), np.sort(neg)
  thresholds = np.concatenate([np.unique(np.concatenate([pos, neg])), [np.inf]])
  tpr = 1 - np.searchsorted(pos, thresholds, side="left") / pos.size
  fpr = 1 - np.searchsorted(neg, thresholds, side="left") / neg.size
  return tpr, fpr


def _old_roc_auc(pos, neg):  # Mann-Whitney U / pairs: the area under the empirical ROC
  ranks = stats.rankdata(np.concatenate([pos, neg]))
  return (ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size)


def _old_tpr_at_fpr(pos, neg, fpr):  # one fixed threshold
  tprs, fprs = _old_roc_points(pos, neg)
  return tprs[fprs <= fpr].max()


def _old_one_run_p_value(m, r, v, epsilon, delta):
  q = special.expit(epsilon)
  beta = stats.binom.sf(v - 1, r, q)
  if delta == 0 or v == 0:
    return float(min(beta, 1.0))
  i = np.arange(1, v + 1)
  alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i))
  return float(min(beta + alpha * delta * 2 * m, 1.0))


def _old_epsilon_lower_bound(m, r, v, *, delta, significance=0.05):
  gap = lambda eps: significance - _old_one_run_p_value(m, r, v, eps, delta)
  if gap(0.0) <= 0:
    return 0.0
  lo, hi = 0.0, 1.0
  while gap(hi) > 0:
    lo, hi = hi, 2 * hi
    if hi > 1e3:
      return lo
  return float(optimize.brentq(gap, lo, hi, xtol=1e-6))


def _old_audit_scores(scores, included, *, delta, significance=0.05):
  m = scores.size
  order = np.lexsort((np.random.default_rng(m).random(m), scores))
  budgets = pe.guess_budgets(m)
  best = (0.0, 0, 0)
  for k_in, k_out in budgets:
    v = int(included[order[m - k_in:]].sum() + (~included[order[:k_out]]).sum())
    eps = _old_epsilon_lower_bound(m, k_in + k_out, v, delta=delta,
                                   significance=significance / len(budgets))
    if eps > best[0] or best[1] == 0:
      best = (eps, k_in + k_out, v)
  return best


# Both bounds come from scipy.optimize.brentq with xtol=1e-6 on the same p-value, started
# from different brackets: each lands within xtol + 4 eps |x| of the root (brentq's stopping
# rule; eps = 2**-52), so they differ by at most twice that.
def _brentq_tolerance(x):
  return 2 * (1e-6 + 4 * np.finfo(float).eps * abs(x))


def _upper_hull_roc(pos, neg):
  """An independent computation of the randomised-threshold ROC: the upper concave hull of
  the empirical ROC points (Andrew's monotone chain), as (fpr, tpr) vertices."""
  tpr, fpr = _old_roc_points(pos, neg)
  pts = sorted(set(zip(fpr.tolist(), tpr.tolist())))
  hull = []
  for p in pts:
    while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                              - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
      hull.pop()
    hull.append(p)
  return np.array(hull)


# ---------------------------------------------------------------- statistics
def test_membership_statistics_are_the_randomised_threshold_roc_with_ties():
  rng = np.random.default_rng(0)
  pos = rng.integers(0, 6, 40).astype(float)  # many ties
  neg = rng.integers(0, 5, 50).astype(float)
  res = pe.loss_threshold_attack(-pos, -neg)  # losses: lower = member
  assert res.num_members == 40 and res.num_nonmembers == 50
  hull = _upper_hull_roc(pos, neg)
  # The area and the TPR at an FPR of the hull, by the trapezoid rule and interpolation on
  # a handful of vertices: float64 sums of a few terms of size <= 1, so 1e-12 is generous.
  area = float(np.sum((hull[1:, 0] - hull[:-1, 0]) * (hull[1:, 1] + hull[:-1, 1]) / 2))
  assert res.auc == pytest.approx(area, abs=1e-12)
  for fpr in (0.0, 0.01, 0.1, 0.5, 1.0):
    r = pe.loss_threshold_attack(-pos, -neg, low_fpr=fpr)
    assert r.tpr_at_low_fpr == pytest.approx(np.interp(fpr, hull[:, 0], hull[:, 1]), abs=1e-12)
    # A randomised threshold does at least as well as the best fixed one (the old figure).
    assert r.tpr_at_low_fpr >= _old_tpr_at_fpr(pos, neg, fpr) - 1e-12
  # ... so the AUC is at least the Mann-Whitney AUC of the empirical ROC (the old figure),
  # and the advantage is the same: a linear objective peaks at a vertex of the hull.
  assert res.auc >= _old_roc_auc(pos, neg)
  tprs, fprs = _old_roc_points(pos, neg)
  assert res.advantage == pytest.approx(float(np.max(tprs - fprs)), abs=1e-12)


def test_membership_statistics_equal_the_old_ones_where_the_roc_is_concave():
  # Scores whose empirical ROC is already concave (every member above every non-member but
  # one block of ties): the hull is the ROC itself, so the AUC is the old one, and so is the
  # TPR at the ROC's own vertices (FPR 0 and 0.2); between them the randomised threshold
  # interpolates (the old figure stays at the last vertex).
  pos = np.array([5.0, 4.0, 3.0, 2.0])
  neg = np.array([2.0, 1.0, 0.0, -1.0, -2.0])
  res = pe.loss_threshold_attack(-pos, -neg)
  assert res.auc == pytest.approx(_old_roc_auc(pos, neg), abs=1e-12)
  for fpr in (0.0, 0.2):
    r = pe.loss_threshold_attack(-pos, -neg, low_fpr=fpr)
    assert r.tpr_at_low_fpr == pytest.approx(_old_tpr_at_fpr(pos, neg, fpr), abs=1e-12)


def test_identical_distributions_give_chance_and_separated_ones_give_one():
  rng = np.random.default_rng(1)
  same = pe.loss_threshold_attack(rng.random(20_000), rng.random(20_000))
  assert abs(same.auc - 0.5) < 0.01 and same.tpr_at_low_fpr < 0.02
  apart = pe.loss_threshold_attack(rng.random(500), 2 + rng.random(500))
  assert apart.auc == 1.0 and apart.tpr_at_low_fpr == 1.0


def test_one_run_p_value_and_bound_are_the_old_ones():
  from jax_privacy import auditing
  for m, r, v in ((100, 50, 40), (1000, 500, 500), (1000, 100, 93), (100, 50, 25), (10, 4, 0)):
    for eps in (0.0, 0.5, 1.0, 2.0, 4.0):
      for delta in (0.0, 1e-5, 1e-3):
        # The same formula, operation for operation: the same float.
        assert auditing._one_run_p_value(m, r, v, eps, delta) == _old_one_run_p_value(
            m, r, v, eps, delta)
    for delta in (1e-5, 1e-3):
      new = auditing._epsilon_one_run(0.0, m, r, v, 0.05, delta)
      old = _old_epsilon_lower_bound(m, r, v, delta=delta)
      assert abs(new - old) <= _brentq_tolerance(old), (m, r, v, new, old)
  assert _old_epsilon_lower_bound(100, 50, 25, delta=1e-5) == 0.0  # chance: nothing shown
  q = special.expit(1.0)
  assert auditing._one_run_p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(
      stats.binom.sf(39, 50, q))


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0, 3.0])
def test_audit_gives_the_old_bound_on_the_same_scores(mu):
  rng = np.random.default_rng(11)
  included = rng.random(1000) < 0.5
  scores = mu * included + rng.standard_normal(1000)
  res = pe.audit_scores(scores, included, delta=1e-5)
  eps, r, v = _old_audit_scores(scores, included, delta=1e-5)
  assert abs(res.epsilon_lower_bound - eps) <= _brentq_tolerance(eps), (res, eps)
  assert (res.num_guesses, res.num_correct) == (r, v)
  assert res.epsilon_lower_bound_fdp >= 0


def _gaussian_epsilon(mu, delta):
  """Epsilon of one Gaussian mechanism with sensitivity 1 and std 1/mu (dp_accounting)."""
  return accounting.compute_epsilon(1 / mu, 1.0, 1, delta)


# Trials whose f-DP bound is computed too (it costs about 0.2 to 0.5 s a trial).
FDP_TRIALS = {"randomized_response": 40, "gaussian": 100}


@pytest.fixture(scope="module")
def repeated_audits():
  """The bounds over 200 independent runs of two exactly (eps, delta)-DP mechanisms, each
  canary's score depending only on its own inclusion bit: the theorems' setting. The f-DP
  bound is computed in the first FDP_TRIALS of them (NaN in the others)."""
  rng = np.random.default_rng(2024)
  m, trials, delta = 1000, 200, 1e-5
  out = {}
  for mechanism in ("randomized_response", "gaussian"):
    true_eps = 1.0 if mechanism == "randomized_response" else _gaussian_epsilon(1.0, delta)
    bounds = []
    for t in range(trials):
      included = rng.random(m) < 0.5
      s = np.where(included, 1.0, -1.0)
      if mechanism == "randomized_response":
        keep = rng.random(m) < special.expit(true_eps)
        scores = np.where(keep, s, -s) + 1e-3 * rng.standard_normal(m)
      else:  # mu-GDP with mu = 1
        scores = (s + 1) / 2 + rng.standard_normal(m)
      res = pe.audit_scores(scores, included, delta=delta, fdp=t < FDP_TRIALS[mechanism])
      fdp = np.nan if res.epsilon_lower_bound_fdp is None else res.epsilon_lower_bound_fdp
      bounds.append((res.epsilon_lower_bound, fdp))
    out[mechanism] = true_eps, np.array(bounds)
  return out


@pytest.mark.parametrize("mechanism", ["randomized_response", "gaussian"])
def test_audit_bound_exceeds_the_true_epsilon_at_most_at_the_significance(repeated_audits,
                                                                         mechanism):
  # Over many independent runs the bound may exceed the true epsilon in at most a
  # `significance` fraction of them.
  true_eps, bounds = repeated_audits[mechanism]
  exceed = int((bounds[:, 0] > true_eps).sum())
  # Binomial(200, 0.05) exceeds 20 with probability about 0.1 %.
  assert exceed <= 20, (exceed, true_eps, bounds[:, 0].max())
  # ...and the audit has power: it usually shows a good part of the true epsilon (the
  # one-run bound is known to be loose for Gaussian noise at small delta: about a third).
  assert np.median(bounds[:, 0]) > 0.3 * true_eps, (np.median(bounds[:, 0]), true_eps)


def test_fdp_bound_holds_for_a_gaussian_mechanism_and_is_tighter(repeated_audits):
  true_eps, bounds = repeated_audits["gaussian"]
  both = bounds[:FDP_TRIALS["gaussian"]]
  exceed = int((both[:, 1] > true_eps).sum())
  # Binomial(100, 0.05) exceeds 12 with probability about 0.15 %.
  assert exceed <= 12, (exceed, true_eps, both[:, 1].max())
  assert np.median(both[:, 1]) > np.median(both[:, 0])  # what it is for


def test_fdp_bound_is_no_epsilon_bound_for_a_non_gaussian_mechanism(repeated_audits):
  """Why the accountant is compared with the first bound only: the f-DP bound tests a
  Gaussian trade-off curve, and randomised response at eps = 1 is (1, 0)-DP but not the
  Gaussian with that (eps, delta): its f-DP bound exceeds 1 far more often than 5 %."""
  true_eps, bounds = repeated_audits["randomized_response"]
  fdp = bounds[:FDP_TRIALS["randomized_response"], 1]
  assert (fdp > true_eps).mean() > 0.25, np.median(fdp)


def test_positive_guesses_keep_the_power_when_included_canaries_go_unsampled():
  # Poisson sampling: an included canary that is never sampled looks excluded. Here every
  # sampled canary scores 1 and every other one 0 (ties broken by tiny noise), and about 13 %
  # of the included canaries (e^-2: two epochs at rate q) were never sampled. "Out" guesses on
  # the lowest scores then hold unsampled included canaries; "in" guesses on the highest hold
  # none, so the best budget must be a positive-only one with every guess right.
  rng = np.random.default_rng(7)
  m, delta = 1000, 1e-5
  included = rng.random(m) < 0.5
  sampled = included & (rng.random(m) > np.exp(-2.0))
  scores = sampled + 1e-3 * rng.standard_normal(m)
  budgets = pe.guess_budgets(m)
  k = max(k for k, out in budgets if out == 0 and k <= sampled.sum())
  assert included[np.argsort(scores)[:k]].any()  # the premise: some "out" guesses are wrong
  res = pe.audit_scores(scores, included, delta=delta)
  assert res.num_guesses == res.num_correct == k, res
  want = _old_epsilon_lower_bound(m, k, k, delta=delta, significance=0.05 / len(budgets))
  assert abs(res.epsilon_lower_bound - want) <= _brentq_tolerance(want)


def test_audit_refuses_canaries_all_on_one_side():
  with pytest.raises(ValueError, match="included and excluded"):
    pe.audit_scores(np.arange(5.0), np.ones(5, bool), delta=1e-5)


def test_canaries_are_deterministic_and_half_included():
  a = pe.make_canaries(2000, 9, seed=3)
  b = pe.make_canaries(2000, 9, seed=3)
  assert np.array_equal(a.features, b.features) and np.array_equal(a.included, b.included)
  assert abs(a.included.mean() - 0.5) < 0.05
  assert not np.array_equal(a.included, pe.make_canaries(2000, 9, seed=4).included)
  x, y = pe.add_canaries(np.zeros((5, 9), np.float32), np.zeros(5, np.float32), a)
  assert len(y) == 5 + a.included.sum()


# ---------------------------------------------------------------- end to end
def _continuous_dataset(path, rows=800, dims=10, seed=0):
  """Raw continuous features, noisy labels, half train and half test: easy to memorise."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, dims)).astype(np.float32)
  w = rng.standard_normal(dims)
  y = (rng.random(rows) < special.expit(0.5 * x @ w)).astype(np.uint8)
  with data_lib.DatasetWriter(path, feature_names=[f"x{i}" for i in range(dims)],
                              label_name="y", feature_bounds=(-8, 8)) as writer:  # N(0, 1)
    writer.add("train", x[:rows // 2], y[:rows // 2])
    writer.add("test", x[rows // 2:], y[rows // 2:])
  return path


@pytest.fixture(scope="module")
def audit_runs(tmp_path_factory):
  """A wide MLP trained without and with DP on the same audit dataset (fixed seeds), with
  canaries in the data's own feature space."""
  from configs import test as test_config
  from fastdp_jax import train
  root = tmp_path_factory.mktemp("audit")
  data = _continuous_dataset(str(root / "data"))
  canaries = pe.make_audit_dataset(data, str(root / "audit"), num_canaries=200, seed=0,
                                   kind="gaussian")
  runs = {}
  for name, dp in (("non_private", False), ("dp", True)):
    cfg = test_config.get_config()
    cfg.data.path = str(root / "audit")
    cfg.data.attack_column = ""
    cfg.model.hidden_sizes = (256, 256)
    cfg.optimizer.name = "adam"
    cfg.optimizer.learning_rate = 0.003
    cfg.batch_size = 8
    cfg.num_epochs = 10
    cfg.dp.enabled = dp
    cfg.dp.l2_norm_clip = 1.0
    cfg.steps_per_call = 64
    cfg.log_every_steps = 0
    cfg.checkpoint.enabled = False
    cfg.export_model = False
    runs[name] = train.train_and_evaluate(cfg, str(root / name))
  return runs, canaries, root


def test_audit_dataset_holds_the_included_canaries(audit_runs):
  _, canaries, root = audit_runs
  base = data_lib.load_split(str(root / "data"), "train")
  audit = data_lib.load_split(str(root / "audit"), "train")
  assert len(audit) == len(base) + canaries.included.sum()
  assert np.array_equal(audit.features[len(base):], canaries.features[canaries.included])
  assert np.array_equal(data_lib.load_split(str(root / "audit"), "test").labels,
                        data_lib.load_split(str(root / "data"), "test").labels)
  loaded = pe.load_canaries(str(root / "audit"))
  assert np.array_equal(loaded.included, canaries.included)
  assert pe.load_canaries(str(root / "data")) is None


def test_membership_inference_separates_overfit_from_private(audit_runs):
  runs, _, _ = audit_runs
  overfit = runs["non_private"].privacy_eval["membership_inference"]
  private = runs["dp"].privacy_eval["membership_inference"]
  assert overfit["num_members"] == overfit["num_nonmembers"] == 400
  assert overfit["auc"] > 0.62, overfit
  assert private["auc"] < 0.57, private
  assert overfit["auc"] - private["auc"] > 0.1
  assert overfit["advantage"] > private["advantage"]


def test_gaussian_canary_audit_detects_memorisation_and_stays_below_the_accountant(
    audit_runs):
  runs, _, root = audit_runs
  overfit = runs["non_private"].privacy_eval["canary_audit"]
  private = runs["dp"].privacy_eval["canary_audit"]
  assert overfit["epsilon_lower_bound"] > 0.3  # memorisation is detected
  assert overfit["accountant_epsilon"] is None  # non-private: nothing to compare with
  eps = runs["dp"].epsilon
  assert private["accountant_epsilon"] == eps and np.isfinite(eps)
  assert private["epsilon_lower_bound"] <= eps and private["consistent"] is True
  with open(os.path.join(root, "dp", "summary.json")) as f:
    assert json.load(f)["privacy_eval"]["canary_audit"] == private


def test_dirac_audit_dataset_adds_one_column_per_canary_zero_in_every_real_row(tmp_path):
  from tests.conftest import make_dataset
  src = make_dataset(str(tmp_path / "d"), rows=600)
  out = str(tmp_path / "a")
  canaries = pe.make_audit_dataset(src, out, num_canaries=50, seed=1)
  d, m = 9, 50
  # Canary c is DIRAC_SCALE in column d + c and zero everywhere else.
  expected = np.zeros((m, d + m), np.float32)
  expected[np.arange(m), d + np.arange(m)] = pe.DIRAC_SCALE
  np.testing.assert_array_equal(canaries.features, expected)
  manifest = manifest_lib.read_manifest(out)
  assert manifest.num_features == d + m
  assert manifest.feature_bounds == ((0.0, 1.0),) * d + ((0.0, pe.DIRAC_SCALE),) * m
  assert manifest.extra["canary_kind"] == "dirac"
  for split in ("train", "test"):
    base = data_lib.load_split(src, split)
    audit = data_lib.load_split(out, split)  # the loader checks every value against bounds
    n = len(base)
    np.testing.assert_array_equal(audit.features[:n, :d], base.features)
    assert not audit.features[:n, d:].any()  # no real row touches a canary column
    np.testing.assert_array_equal(audit.labels[:n], base.labels)
  n = len(data_lib.load_split(src, "train"))
  train_rows = data_lib.load_split(out, "train")  # the canary shard comes last
  assert len(train_rows) == n + canaries.included.sum()
  np.testing.assert_array_equal(train_rows.features[n:], canaries.features[canaries.included])
  np.testing.assert_array_equal(train_rows.labels[n:], canaries.labels[canaries.included])
  assert np.array_equal(pe.load_canaries(out).included, canaries.included)
  assert pe.load_canaries(src) is None


# The Dirac audit end to end: configs/test.py's MLP (ghost clipping) on 1500 generated rows
# and 1000 Dirac canaries, 10 epochs at expected batch 32 (about 540 updates, each canary
# sampled about 10 times when included), sigma 2: the accountant's epsilon is about 0.88 at
# the default delta 1e-5. Learning rate 2 makes one sampled canary's clipped step move its
# own logit by lr * C * scale / B = 0.6, well beyond the spread of the canaries' initial
# logits (scale / sqrt(fan_in) = 0.3).
AUDIT_CANARIES = 1000
AUDIT_SIGMA = 2.0


@pytest.fixture(scope="module")
def dirac_audit(tmp_path_factory):
  """The same audit dataset and config, trained as configured and with the noise removed."""
  import jax
  import jax.numpy as jnp

  from fastdp_jax import train
  from fastdp_jax.dp import noise
  from tests.conftest import make_config, make_dataset
  root = tmp_path_factory.mktemp("dirac")
  src = make_dataset(str(root / "data"), rows=1500)
  canaries = pe.make_audit_dataset(src, str(root / "audit"), num_canaries=AUDIT_CANARIES,
                                   seed=0)
  cfg = make_config(str(root / "audit"), **{
      "dp.noise_multiplier": AUDIT_SIGMA, "dp.l2_norm_clip": 1.0,
      "optimizer.learning_rate": 2.0, "batch_size": 32, "num_epochs": 10,
      "privacy_eval.membership_rows": 0, "data.attack_column": "",
      "checkpoint.enabled": False, "export_model": False, "log_every_steps": 0,
      "steps_per_call": 64})
  runs = {"noise": train.train_and_evaluate(cfg, str(root / "noise"))}
  # The broken implementation the audit must catch: the loop adds no noise at all while the
  # accountant still reports the epsilon of sigma 2.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(noise, "gaussian_noise",
               lambda key, count, like: jax.tree_util.tree_map(jnp.zeros_like, like))
    runs["noise_removed"] = train.train_and_evaluate(cfg, str(root / "noise_removed"))
  return runs, canaries, root


def test_canary_audit_detects_missing_noise(dirac_audit):
  runs, canaries, _ = dirac_audit
  summary = runs["noise_removed"]
  claimed = summary.epsilon
  assert claimed == accounting.compute_epsilon(AUDIT_SIGMA, summary.sampling_rate,
                                               summary.steps, summary.accountant_delta)
  audit = summary.privacy_eval["canary_audit"]
  assert audit["num_canaries"] == AUDIT_CANARIES
  assert audit["num_included"] == canaries.included.sum()
  # "Far above": at least three times the claim. Perfect guessing of 500 "in" guesses gives
  # pe.epsilon_lower_bound(1000, 500, 500, delta=1e-5, significance=0.05 / 12) = 4.39 and
  # 20 wrong of them still give 2.59 > 3 * 0.88, so this needs near-perfect separation,
  # not perfection; with the noise on (below) the bound is near 0.
  assert audit["epsilon_lower_bound"] > 3 * claimed, (audit, claimed)
  assert audit["consistent"] is False
  # The f-DP bound of the same scores is in the summary too, and rejects the claim as well.
  assert audit["epsilon_lower_bound_fdp"] > 3 * claimed, (audit, claimed)


def test_canary_audit_stays_below_accountant_epsilon(dirac_audit):
  runs, canaries, root = dirac_audit
  summary = runs["noise"]
  eps = summary.epsilon
  audit = summary.privacy_eval["canary_audit"]
  assert audit["num_canaries"] == AUDIT_CANARIES
  assert audit["num_included"] == canaries.included.sum()
  assert audit["accountant_epsilon"] == eps and np.isfinite(eps)
  assert audit["delta"] == summary.accountant_delta
  assert audit["epsilon_lower_bound"] <= eps and audit["consistent"] is True, audit
  with open(os.path.join(root, "noise", "summary.json")) as f:
    assert json.load(f)["privacy_eval"]["canary_audit"] == audit


# The audit's own mutant (`audit_sigma_quarter` in tests/mutation/mutants.py: the loop adds
# sigma C / 4 while sigma is reported) must push the audit's lower bound above the accountant's
# epsilon. Measured (issue 24) with configs/test.py's MLP on 1,500 generated rows, sigma 2,
# 10 epochs, the expected batch scaled with N to keep q near 0.075: with the noise at sigma / 4,
# 1,000 Dirac canaries give a bound of 1.67 against the accountant's 1.93, 2,000 give 1.60
# against 1.96, and 4,000 (2,049 included) give 2.23 against 1.95; with the noise as
# configured, 4,000 give 0.39. The runs are seeded, so these numbers are what this test sees.
POWER_CANARIES = 4000
POWER_Q = 0.075


def test_canary_audit_with_the_power_to_see_a_quarter_of_the_noise_stays_below_the_accountant(
    tmp_path):
  from fastdp_jax import train
  from tests.conftest import make_config, make_dataset
  src = make_dataset(str(tmp_path / "data"), rows=1500)
  canaries = pe.make_audit_dataset(src, str(tmp_path / "audit"), num_canaries=POWER_CANARIES,
                                   seed=0)
  n = len(data_lib.load_split(str(tmp_path / "audit"), "train"))
  cfg = make_config(str(tmp_path / "audit"), **{
      "dp.noise_multiplier": AUDIT_SIGMA, "dp.l2_norm_clip": 1.0,
      "optimizer.learning_rate": 2.0, "batch_size": max(1, round(POWER_Q * n)),
      "num_epochs": 10, "privacy_eval.membership_rows": 0, "data.attack_column": "",
      "checkpoint.enabled": False, "export_model": False, "log_every_steps": 0,
      "steps_per_call": 64})
  summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  audit = summary.privacy_eval["canary_audit"]
  assert audit["num_canaries"] == POWER_CANARIES
  assert audit["num_included"] == canaries.included.sum()
  eps = summary.epsilon
  assert audit["accountant_epsilon"] == eps and np.isfinite(eps)
  assert audit["epsilon_lower_bound"] <= eps and audit["consistent"] is True, (audit, eps)


def test_make_audit_dataset_cli(tmp_path, capsys):
  from tests.conftest import make_dataset
  src = make_dataset(str(tmp_path / "d"), rows=500)
  assert pe.main(["make-audit-dataset", "--data", src, "--output", str(tmp_path / "a"),
                  "--canaries", "50"]) == 0
  assert "50 canaries" in capsys.readouterr().out
  assert pe.main(["make-audit-dataset", "--data", src, "--output", str(tmp_path / "a"),
                  "--canaries", "50"]) == 2  # exists: refuses without --overwrite
  manifest = manifest_lib.read_manifest(str(tmp_path / "a"))
  assert manifest.extra["num_canaries"] == 50 and manifest.extra["canaries"] == pe.CANARIES_FILE
  assert manifest.num_features == 9 + 50  # Dirac by default
  assert pe.main(["make-audit-dataset", "--data", src, "--output", str(tmp_path / "g"),
                  "--canaries", "50", "--kind", "gaussian"]) == 0
  assert manifest_lib.read_manifest(str(tmp_path / "g")).num_features == 9


def test_membership_inference_scores_nonfinite_losses_as_the_worst_without_stopping():
  # A diverged model's overflowing losses must not stop the run (halting may not depend on
  # whether a sampled training row's loss overflows): they are scored as the largest loss
  # and counted.
  rng = np.random.default_rng(3)
  train = (rng.normal(size=(30, 2)), np.zeros(30))
  test = (rng.normal(size=(30, 2)), np.zeros(30))

  def losses(x, y):
    out = np.abs(x[:, 0])
    out[x[:, 1] > 1.0] = np.inf  # some rows overflow
    out[x[:, 1] < -1.5] = np.nan
    return out

  res = pe.membership_inference(losses, train, test, num_rows=30)
  bad = int((train[0][:, 1] > 1.0).sum() + (train[0][:, 1] < -1.5).sum()
            + (test[0][:, 1] > 1.0).sum() + (test[0][:, 1] < -1.5).sum())
  assert bad > 0 and res.num_nonfinite == bad
  worst = np.finfo(np.float64).max
  expected = pe.loss_threshold_attack(*(np.where(np.isfinite(v), v, worst) for v in
                                        (losses(*train), losses(*test))))
  assert res.auc == expected.auc and res.advantage == expected.advantage

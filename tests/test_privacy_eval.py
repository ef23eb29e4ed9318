"""Membership inference and the one-run canary audit: statistics, validity, end to end."""

import json
import os

import numpy as np
import pytest
from scipy import special, stats

from fastdp_jax import accounting
from fastdp_jax import data as data_lib
from fastdp_jax import privacy_eval as pe


# ---------------------------------------------------------------- statistics
def test_auc_and_tpr_match_brute_force_with_ties():
  rng = np.random.default_rng(0)
  pos = rng.integers(0, 6, 40).astype(float)  # many ties
  neg = rng.integers(0, 5, 50).astype(float)
  pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
  assert pe.roc_auc(pos, neg) == pytest.approx(pairs, abs=1e-12)
  for fpr in (0.0, 0.01, 0.1, 0.5, 1.0):
    best = max((pos >= t).mean() for t in np.concatenate([pos, neg, [np.inf]])
               if (neg >= t).mean() <= fpr)
    assert pe.tpr_at_fpr(pos, neg, fpr) == pytest.approx(best)
  res = pe.loss_threshold_attack(-pos, -neg)  # losses: lower = member
  assert res.auc == pytest.approx(pairs) and res.num_members == 40
  assert res.advantage == pytest.approx(max(
      (pos >= t).mean() - (neg >= t).mean() for t in np.concatenate([pos, neg])))


def test_identical_distributions_give_chance_and_separated_ones_give_one():
  rng = np.random.default_rng(1)
  same = pe.loss_threshold_attack(rng.random(20_000), rng.random(20_000))
  assert abs(same.auc - 0.5) < 0.01 and same.tpr_at_low_fpr < 0.02
  apart = pe.loss_threshold_attack(rng.random(500), 2 + rng.random(500))
  assert apart.auc == 1.0 and apart.tpr_at_low_fpr == 1.0


def test_p_value_is_the_binomial_tail_and_grows_with_delta_and_epsilon():
  q = special.expit(1.0)
  assert pe.one_run_p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, q))
  with_delta = pe.one_run_p_value(100, 50, 40, 1.0, 1e-3)
  assert with_delta > pe.one_run_p_value(100, 50, 40, 1.0, 0.0)
  ps = [pe.one_run_p_value(100, 50, 40, e, 1e-5) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
  assert ps == sorted(ps)
  eps = pe.epsilon_lower_bound(100, 50, 40, delta=1e-5, significance=0.05)
  assert pe.one_run_p_value(100, 50, 40, eps, 1e-5) == pytest.approx(0.05, abs=1e-4)
  assert pe.epsilon_lower_bound(100, 50, 25, delta=1e-5) == 0.0  # chance: nothing shown
  with pytest.raises(ValueError):
    pe.one_run_p_value(10, 20, 5, 1.0, 0.0)


def _gaussian_epsilon(mu, delta):
  """Epsilon of one Gaussian mechanism with sensitivity 1 and std 1/mu (dp_accounting)."""
  return accounting.compute_epsilon(1 / mu, 1.0, 1, delta)


@pytest.mark.parametrize("mechanism", ["randomized_response", "gaussian"])
def test_audit_bound_exceeds_the_true_epsilon_at_most_at_the_significance(mechanism):
  # Canaries whose scores come from an exactly (eps, delta)-DP mechanism, each canary's score
  # depending only on its own inclusion bit: the theorem's setting. Over many independent
  # runs the bound may exceed the true epsilon in at most a `significance` fraction of them.
  rng = np.random.default_rng(2024)
  m, trials, delta = 1000, 200, 1e-5
  if mechanism == "randomized_response":
    true_eps = 1.0
  else:
    mu = 1.0
    true_eps = _gaussian_epsilon(mu, delta)
  bounds = []
  for _ in range(trials):
    included = rng.random(m) < 0.5
    s = np.where(included, 1.0, -1.0)
    if mechanism == "randomized_response":
      keep = rng.random(m) < special.expit(true_eps)
      scores = np.where(keep, s, -s) + 1e-3 * rng.standard_normal(m)
    else:
      scores = mu * (s + 1) / 2 + rng.standard_normal(m)
    bounds.append(pe.audit_scores(scores, included, delta=delta).epsilon_lower_bound)
  bounds = np.array(bounds)
  exceed = int((bounds > true_eps).sum())
  # Binomial(200, 0.05) exceeds 20 with probability about 0.1 %.
  assert exceed <= 20, (exceed, true_eps, bounds.max())
  # ...and the audit has power: it usually shows a good part of the true epsilon (the
  # one-run bound is known to be loose for Gaussian noise at small delta: about a third).
  assert np.median(bounds) > 0.3 * true_eps, (np.median(bounds), true_eps)


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
  assert res.epsilon_lower_bound == pytest.approx(pe.epsilon_lower_bound(
      m, k, k, delta=delta, significance=0.05 / len(budgets)))


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
  overfit = runs["non_private"]["privacy_eval"]["membership_inference"]
  private = runs["dp"]["privacy_eval"]["membership_inference"]
  assert overfit["num_members"] == overfit["num_nonmembers"] == 400
  assert overfit["auc"] > 0.62, overfit
  assert private["auc"] < 0.57, private
  assert overfit["auc"] - private["auc"] > 0.1
  assert overfit["advantage"] > private["advantage"]


def test_gaussian_canary_audit_detects_memorisation_and_stays_below_the_accountant(
    audit_runs):
  runs, _, root = audit_runs
  overfit = runs["non_private"]["privacy_eval"]["canary_audit"]
  private = runs["dp"]["privacy_eval"]["canary_audit"]
  assert overfit["epsilon_lower_bound"] > 0.3  # memorisation is detected
  assert overfit["accountant_epsilon"] is None  # non-private: nothing to compare with
  eps = runs["dp"]["epsilon"]
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
  manifest = data_lib.read_manifest(out)
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

  from fastdp_jax import noise, train
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
  claimed = summary["epsilon"]
  assert claimed == accounting.compute_epsilon(AUDIT_SIGMA, summary["sampling_rate"],
                                               summary["steps"], summary["accountant_delta"])
  audit = summary["privacy_eval"]["canary_audit"]
  assert audit["num_canaries"] == AUDIT_CANARIES
  assert audit["num_included"] == canaries.included.sum()
  # "Far above": at least three times the claim. Perfect guessing of 500 "in" guesses gives
  # pe.epsilon_lower_bound(1000, 500, 500, delta=1e-5, significance=0.05 / 12) = 4.39 and
  # 20 wrong of them still give 2.59 > 3 * 0.88, so this needs near-perfect separation,
  # not perfection; with the noise on (below) the bound is near 0.
  assert audit["epsilon_lower_bound"] > 3 * claimed, (audit, claimed)
  assert audit["consistent"] is False


def test_canary_audit_stays_below_accountant_epsilon(dirac_audit):
  runs, canaries, root = dirac_audit
  summary = runs["noise"]
  eps = summary["epsilon"]
  audit = summary["privacy_eval"]["canary_audit"]
  assert audit["num_canaries"] == AUDIT_CANARIES
  assert audit["num_included"] == canaries.included.sum()
  assert audit["accountant_epsilon"] == eps and np.isfinite(eps)
  assert audit["delta"] == summary["accountant_delta"]
  assert audit["epsilon_lower_bound"] <= eps and audit["consistent"] is True, audit
  with open(os.path.join(root, "noise", "summary.json")) as f:
    assert json.load(f)["privacy_eval"]["canary_audit"] == audit


def test_make_audit_dataset_cli(tmp_path, capsys):
  from tests.conftest import make_dataset
  src = make_dataset(str(tmp_path / "d"), rows=500)
  assert pe.main(["make-audit-dataset", "--data", src, "--output", str(tmp_path / "a"),
                  "--canaries", "50"]) == 0
  assert "50 canaries" in capsys.readouterr().out
  assert pe.main(["make-audit-dataset", "--data", src, "--output", str(tmp_path / "a"),
                  "--canaries", "50"]) == 2  # exists: refuses without --overwrite
  manifest = data_lib.read_manifest(str(tmp_path / "a"))
  assert manifest.extra["num_canaries"] == 50 and manifest.extra["canaries"] == pe.CANARIES_FILE
  assert manifest.num_features == 9 + 50  # Dirac by default
  assert pe.main(["make-audit-dataset", "--data", src, "--output", str(tmp_path / "g"),
                  "--canaries", "50", "--kind", "gaussian"]) == 0
  assert data_lib.read_manifest(str(tmp_path / "g")).num_features == 9

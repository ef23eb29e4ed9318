"""fastdp-tune: private random search whose whole cost is one (epsilon, delta).

The accounting is checked against ``dp_accounting``'s ``RepeatAndSelectDpEvent`` built here
from the library's own events (not through fastdp_jax.dp.tuning), on the parameters the trials
themselves recorded.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from fastdp_jax import inputs as inputs_lib
from fastdp_jax import tune
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import tuning
from fastdp_jax.export import predictor
from tests.conftest import ROOT, make_config, make_dataset, make_unit_dataset

SCORE_SIGMA = 40.0
CAL_EPS = 0.1


def _library_epsilon(sigma, q, steps, mean, shape, delta, *, score_sigma=SCORE_SIGMA,
                     calibration_epsilon=CAL_EPS, count_epsilon=0.0):
  """The procedure's epsilon straight from dp_accounting: the Laplace count of N (if any),
  then K trials, the best released, each trial Poisson-sampled Gaussian updates, a Gaussian
  score and (eps^2/2-zCDP) the temperature's exponential mechanism."""
  events = [dp_event.SelfComposedDpEvent(
      dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps),
            dp_event.GaussianDpEvent(score_sigma)]
  if calibration_epsilon:
    events.append(dp_event.ZCDpEvent(calibration_epsilon ** 2 / 2))
  acc = rdp_lib.RdpAccountant()
  if count_epsilon:
    acc.compose(dp_event.LaplaceDpEvent(1 / count_epsilon))
  acc.compose(dp_event.RepeatAndSelectDpEvent(dp_event.ComposedDpEvent(events), mean, shape))
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("distribution,shape,event_shape", [
    ("poisson", None, math.inf), ("geometric", None, 1.0), ("logarithmic", None, 0.0),
    ("truncated_negative_binomial", 0.5, 0.5)])
def test_calibrated_sigma_meets_the_total_and_is_tight(distribution, shape, event_shape):
  count = tuning.TrialCount(distribution=distribution, mean=5.0, shape=shape)
  q, steps, delta, target = 0.02, 400, 1e-6, 2.0
  plan = tuning.calibrate(target, delta, count, sampling_rate=q, steps=steps,
                          score_noise_multiplier=SCORE_SIGMA, calibration_epsilon=CAL_EPS)
  total = _library_epsilon(plan.noise_multiplier, q, steps, 5.0, event_shape, delta)
  assert total == tuning.total_epsilon(plan, count, delta) <= target
  # Tight: 0.1 % less noise exceeds the target (the search's tolerance is far finer).
  assert _library_epsilon(plan.noise_multiplier * 0.999, q, steps, 5.0, event_shape,
                          delta) > target


def test_a_budget_the_score_alone_exceeds_is_refused():
  count = tuning.TrialCount(distribution="poisson", mean=10.0)
  with pytest.raises(tuning.TuningError, match="alone take epsilon"):
    tuning.calibrate(0.2, 1e-6, count, sampling_rate=0.01, steps=100,
                     score_noise_multiplier=2.0)


@pytest.mark.parametrize("distribution,shape", [
    ("poisson", None), ("geometric", None), ("logarithmic", None),
    ("truncated_negative_binomial", 0.5)])
def test_the_trial_count_has_the_accounted_mean(distribution, shape):
  count = tuning.TrialCount(distribution=distribution, mean=4.0, shape=shape)
  draws = np.array([count.draw(np.random.default_rng(i)) for i in range(4000)])
  # Within 5 standard errors of E[K] (a false failure has probability below 1e-6).
  assert abs(draws.mean() - 4.0) < 5 * draws.std() / math.sqrt(len(draws))
  assert draws.min() >= (0 if distribution == "poisson" else 1)


def test_row_scores_lie_in_zero_to_the_sensitivity():
  rng = np.random.default_rng(0)
  for logits, labels, classes in ((rng.normal(0, 30, 500), rng.integers(0, 2, 500), 2),
                                  (rng.normal(0, 30, (500, 4)), rng.integers(0, 4, 500), 4)):
    for metric in tuning.SCORES:
      s = tuning.row_scores(logits, labels, metric)
      assert s.min() >= 0 and s.max() <= tuning.score_sensitivity(metric, classes)
  # Binary Brier: S - (p - y)^2 with S = 1.
  p = 1 / (1 + np.exp(-np.array([0.0, 2.0])))
  assert tuning.row_scores(np.array([0.0, 2.0]), np.array([1, 0]), "brier") == pytest.approx(
      1 - (p - np.array([1, 0])) ** 2)


def test_a_private_search_may_not_change_the_privacy_event():
  space = (("batch_size", "choice", (32, 64)),)
  with pytest.raises(tuning.TuningError, match="batch_size"):
    tune._check_space(space, private=True)  # pylint: disable=protected-access
  assert tune._check_space(space, private=False)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=3000, seed=5)


def _private_config(path, **more):
  return make_config(path, **{"dp.noise_seed": None, "dp.sampling_seed": None,
                              "dp.target_epsilon": 4.0, "data.validation_fraction": 0.25,
                              "calibration.epsilon": CAL_EPS, "num_epochs": 1,
                              "data.attack_column": "", **more})


def _seed_with(count, k):
  return next(s for s in range(1000) if count.draw(np.random.default_rng(s)) == k)


def test_tuning_releases_the_best_private_trial_and_accounts_for_all(dataset, tmp_path,
                                                                      monkeypatch):
  search = tune.default_search()
  search.trials.mean = 2.0
  count = tuning.TrialCount(distribution="poisson", mean=2.0)
  # The secret generator is the only source of K: replaced by a known one, it alone fixes K
  # (the config's seeds are the same as in any other run).
  seed = _seed_with(count, 2)
  calls = []
  monkeypatch.setattr(tuning, "secret_rng",
                      lambda: calls.append(1) or np.random.default_rng(seed))
  workdir = str(tmp_path / "w")
  # N as by default: one DP count for all the trials, in the total.
  summary = tune.tune(_private_config(dataset, **{"data.num_examples_public": False}), search,
                      workdir)
  assert calls == [1]
  with open(os.path.join(workdir, "trials.json")) as f:
    records = json.load(f)
  trials = records["trials"]
  assert len(trials) == 2
  best = max(trials, key=lambda r: r["noisy_score"])
  assert records["released"] == best["trial"]
  released = np.load(os.path.join(workdir, "model", "params.npz"))
  kept = np.load(os.path.join(best["workdir"], "final_params.npz"))
  assert sorted(released) == sorted(kept)
  assert all(np.array_equal(released[k], kept[k]) for k in kept)
  # The total, from the trials' own records, by dp_accounting directly.
  with open(os.path.join(best["workdir"], "summary.json")) as f:
    trial = json.load(f)
  count_eps = summary.count_epsilon
  assert count_eps == 0.01 and summary.num_examples_source == "dp estimate"
  assert trial["sampling_rate"] == 64 / summary.planned_num_examples  # q from the estimate
  total = _library_epsilon(trial["noise_multiplier"], trial["sampling_rate"], trial["steps"],
                           2.0, math.inf, summary.accountant_delta, count_epsilon=count_eps)
  assert summary.epsilon == pytest.approx(total, rel=1e-9) and summary.epsilon <= 4.0
  assert summary.delta == summary.accountant_delta + summary.overflow_delta
  # The temperature's epsilon is inside: without its event the procedure costs less.
  assert _library_epsilon(trial["noise_multiplier"], trial["sampling_rate"], trial["steps"],
                          2.0, math.inf, summary.accountant_delta, calibration_epsilon=0.0,
                          count_epsilon=count_eps) < summary.epsilon - 1e-3
  assert summary.tuning["calibration_epsilon"] == CAL_EPS
  assert summary.private and summary.tuning["accounted"]
  assert summary.training_epsilon == pytest.approx(trial["training_epsilon"])
  # What is public states the procedure; no trial left a model or its keys behind.
  model = predictor.load_model(os.path.join(workdir, "model"))
  del model
  with open(os.path.join(workdir, "model", "MODEL_CARD.md")) as f:
    card = f.read()
  assert "Tuned inside the budget" in card and "K ~ poisson (mean 2)" in card
  for r in trials:
    assert not os.path.exists(os.path.join(r["workdir"], "model"))
    assert not os.path.exists(os.path.join(r["workdir"], "keys.json"))


def test_a_seeded_search_is_declared_non_private(dataset, tmp_path):
  search = tune.default_search()
  search.trials.distribution = "geometric"
  search.trials.mean = 1.0  # K = 1: one trial
  search.trials.seed = 0
  summary = tune.tune(_private_config(dataset), search, str(tmp_path / "w"))
  assert summary.private is False and "search.trials.seed" in summary.privacy_note
  with pytest.raises(tuning.TuningError, match="holds a tuning run"):
    tune.tune(_private_config(dataset), search, str(tmp_path / "w"))


def test_a_public_proxy_costs_nothing(dataset, tmp_path):
  proxy = make_dataset(str(tmp_path / "proxy"), rows=3000, seed=6)
  search = tune.default_search()
  search.trials.mean = 1.0
  search.space = search.space + (("num_epochs", "choice", (1,)),)  # a proxy may vary it
  summary = tune.tune(_private_config(dataset), search, str(tmp_path / "w"), proxy=proxy)
  # One private run with the whole budget: its own epsilon, calibration included.
  assert summary.tuning["method"] == "public proxy" and summary.tuning["trials"] == 1
  assert summary.epsilon == pytest.approx(summary.training_epsilon + CAL_EPS)
  assert summary.epsilon <= 4.0 + 1e-9 and summary.private
  predictor.load_model(os.path.join(str(tmp_path / "w"), "model"))


def test_the_command_refuses_a_tuning_without_a_total(dataset, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.tune", "--config=configs/test.py",
       f"--config.data.path={dataset}", f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: fastdp-tune needs "
                                                        "dp.target_epsilon")


def test_a_unit_datasets_score_weighs_each_unit_as_one_row(tmp_path, monkeypatch):
  # One household is up to k validation rows (bounded like the training units): each trial's
  # Gaussian score is the sum over units of their rows' mean score, so one unit moves it by at
  # most one row's sensitivity S, and the noise is S's.
  data = make_unit_dataset(str(tmp_path / "units"), units=900, max_rows=3, max_size=5, seed=1)
  search = tune.default_search()
  search.trials.mean = 2.0  # side by side by default: a unit dataset's trials run alone
  count = tuning.TrialCount(distribution="poisson", mean=2.0)
  seed = _seed_with(count, 2)
  monkeypatch.setattr(tuning, "secret_rng", lambda: np.random.default_rng(seed))
  sensitivities = []
  real = tuning.noisy_score
  totals = []
  monkeypatch.setattr(tuning, "noisy_score", lambda scores, sensitivity, *a: (
      sensitivities.append(sensitivity) or totals.append(np.sum(scores))
      or real(scores, sensitivity, *a)))
  tune.tune(_private_config(data, **{"batch_size": 64}), search, str(tmp_path / "w"))
  s = tuning.score_sensitivity("brier", 2)
  assert sensitivities == [s] * 2
  # The validation units (held out whole by their keys) each add at most S to the sum; their
  # rows' own scores summed (2.4 rows a unit on average, a Brier score averaging 0.75 or more
  # for any model at least as good as p = 0.5) would add about 1.8 S a unit.
  keys = data_lib.load_split(data, "train").unit_keys
  held = units_lib.is_validation_unit(np.unique(keys), 0.25, seed=inputs_lib.VALIDATION_SEED)
  assert all(0 < total <= s * int(held.sum()) for total in totals), (totals, int(held.sum()))

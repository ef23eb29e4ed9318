"""Private temperature scaling: the mechanism, its sensitivity, and its epsilon in the total."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from fastdp_jax import config as config_lib
from fastdp_jax import train
from fastdp_jax.dp import accounting
from fastdp_jax.dp import calibration
from fastdp_jax.export import layout
from fastdp_jax.export import predictor as predictor_lib
from tests.conftest import make_config, make_dataset


def _overconfident(n, seed=0):
  rng = np.random.default_rng(seed)
  true_logit = rng.normal(0, 1.5, n)
  labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
  return 3.0 * true_logit, labels  # the model's logits: three times too large


def test_one_row_moves_every_score_by_at_most_the_sensitivity():
  logits, labels = _overconfident(500)
  # ... and all in the same direction (the score is monotone: the mechanism's epsilon / L).
  extreme = np.array([80.0, -80.0, 0.0])  # confident and wrong, or undecided
  for x, y in zip(extreme, (0.0, 1.0, 1.0)):
    more = calibration.scores(np.append(logits, x), np.append(labels, y))
    diff = more - calibration.scores(logits, labels)
    assert np.all(diff >= 0) and np.all(diff <= calibration.SENSITIVITY + 1e-9)


def _unit_scores(logits, labels, units):
  """The units' score computed unit by unit: the sum over units of their rows' mean loss."""
  return np.array([sum(np.mean(calibration.row_losses(logits[units == u], labels[units == u], t))
                       for u in np.unique(units)) for t in calibration.TEMPERATURES])


@pytest.mark.parametrize("by_unit", [False, True], ids=["rows", "units"])
def test_the_selection_is_the_exponential_mechanism(by_unit):
  # Frequencies of 20,000 draws against softmax(-epsilon * score / L) (the monotone score's
  # mechanism), an independent computation of its distribution; chi-square at the 1e-4 level.
  # By unit (about 3 rows each), the score is the units' mean losses, computed unit by unit.
  logits, labels = _overconfident(300, seed=1)
  units = np.random.default_rng(3).integers(0, 100, 300) if by_unit else None
  eps = 0.5
  score = (_unit_scores(logits, labels, units) if by_unit
           else calibration.scores(logits, labels))
  utility = -score * eps / calibration.SENSITIVITY
  expected = np.exp(utility - utility.max())
  expected /= expected.sum()
  rng = np.random.default_rng(2)
  draws = [calibration.select_temperature(logits, labels, eps, rng, units=units)
           for _ in range(20_000)]
  counts = np.array([draws.count(t) for t in calibration.TEMPERATURES])
  keep = expected * 20_000 >= 5  # chi-square needs expected counts of 5 or more
  observed = np.append(counts[keep], counts[~keep].sum())
  want = np.append(expected[keep], expected[~keep].sum()) * 20_000
  if want[-1] == 0:
    observed, want = observed[:-1], want[:-1]
  assert stats.chisquare(observed, want).pvalue > 1e-4
  # With a large budget it finds the temperature that undoes the factor of 3.
  best = calibration.choose_temperature(logits, labels, None, rng)
  assert 2.3 <= best <= 3.6


def test_a_budget_smaller_than_the_calibration_is_refused():
  dp = config_lib.settings(make_config("unused", **{
      "dp.target_epsilon": 0.05, "data.validation_fraction": 0.1,
      "calibration.epsilon": 0.05})).dp
  with pytest.raises(config_lib.ConfigError, match="leaves nothing for training"):
    calibration.training_budget(dp, 0.05)


def test_calibration_needs_validation_rows():
  with pytest.raises(config_lib.ConfigError, match="validation_fraction"):
    config_lib.settings(make_config("unused", **{"calibration.epsilon": 0.1}))


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("calibrated")
  data = make_dataset(str(base / "data"), rows=6000)
  cfg = make_config(data, num_epochs=2, **{
      "dp.target_epsilon": 2.0, "data.validation_fraction": 0.2,
      "calibration.epsilon": 0.1, "optimizer.learning_rate": 0.5})
  return train.train_and_evaluate(cfg, str(base / "run")), cfg


def test_the_calibration_epsilon_is_in_the_total_through_the_real_loop(calibrated_run):
  s, cfg = calibrated_run
  # Training's epsilon is dp_accounting's for its own sigma, q and T; the total adds the
  # selection's, and meets the target.
  assert s.training_epsilon == pytest.approx(accounting.compute_epsilon(
      s.noise_multiplier, s.sampling_rate, s.steps, s.accountant_delta), rel=1e-9)
  assert s.calibration_epsilon == 0.1
  assert s.epsilon == pytest.approx(s.training_epsilon + 0.1, rel=1e-12)
  assert s.epsilon <= cfg.dp.target_epsilon * (1 + 1e-9)
  assert s.temperature in calibration.TEMPERATURES


def test_the_exported_model_applies_the_temperature(calibrated_run, tmp_path):
  s, _ = calibrated_run
  model = predictor_lib.load_model(s.model_dir)
  with open(os.path.join(s.model_dir, layout.SPEC_FILE)) as f:
    spec = json.load(f)
  assert spec["model"]["temperature"] == s.temperature
  assert spec["privacy"]["calibration_epsilon"] == 0.1
  x = np.random.default_rng(3).integers(0, 2, (50, 9)).astype(np.float32)
  expected = 1 / (1 + np.exp(-model.logits(x).astype(np.float64) / s.temperature))
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
  card = open(os.path.join(s.model_dir, layout.CARD_FILE)).read()
  assert "temperature" in card and "exponential mechanism" in card


def test_the_reported_test_loss_is_the_calibrated_models(calibrated_run):
  # The summary's log-loss is that of the exported probabilities, recomputed here.
  s, cfg = calibrated_run
  from fastdp_jax.data import shards
  test = shards.load_split(cfg.data.path, "test")
  p = np.clip(predictor_lib.load_model(s.model_dir)(test.features).astype(np.float64), 1e-12,
              1 - 1e-12)
  y = test.labels
  log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
  assert s.test_loss == pytest.approx(log_loss, rel=1e-4)

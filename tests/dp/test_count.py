"""The DP count of the training rows (fastdp_jax.dp.count): its noise, its epsilon, its reuse."""

import json
import math
import os

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

from configs import test as test_config
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax.dp import calibration
from fastdp_jax.dp import count as count_lib


def _settings(**overrides):
  cfg = test_config.get_config()
  cfg.data.path = "unused"
  cfg.data.num_examples_public = False
  cfg.dp.noise_seed = None
  for key, value in overrides.items():
    group, name = key.split(".")
    cfg[group][name] = value
  return config_lib.settings(cfg)


def test_the_count_is_laplace_noise_of_scale_one_over_epsilon_around_n():
  n, eps, draws = 20_000, 0.05, 20_000
  rng = np.random.default_rng(1)
  noise = np.array([count_lib.noisy_count(n, eps, rng) for _ in range(draws)]) - n
  # Laplace(b = 1 / eps): mean 0, E|X| = b, Var = 2 b^2 (the rounding adds at most 1/12).
  b = 1 / eps
  se_mean = math.sqrt((2 * b * b + 1 / 12) / draws)
  assert abs(noise.mean()) < 5 * se_mean
  se_abs = math.sqrt((2 * b * b - b * b) / draws)  # Var|X| = E X^2 - (E|X|)^2 = b^2
  assert abs(np.abs(noise).mean() - b) < 5 * se_abs + 0.5
  assert np.all(noise == np.rint(noise))  # an integer (post-processing)
  # The floor at one row: a count of 1 row at a tiny epsilon is never 0 or negative.
  assert min(count_lib.noisy_count(1, 0.001, rng) for _ in range(200)) == 1


def test_dp_accounting_gives_the_count_epsilon_of_its_event():
  for eps in (0.01, 0.05, 1.0):
    acc = pld.PLDAccountant()
    acc.compose(count_lib.count_event(eps))
    assert acc.get_epsilon(1e-12) == pytest.approx(eps, rel=1e-6)
    assert isinstance(count_lib.count_event(eps), dp_accounting.LaplaceDpEvent)


def test_an_estimate_is_drawn_once_per_workdir_and_reused(tmp_path):
  rc = _settings()
  first = count_lib.resolve(str(tmp_path), 5000, rc.dp, rc.data, "digest")
  assert first.estimated and first.epsilon == rc.dp.count_epsilon == 0.01
  saved = json.loads((tmp_path / count_lib.COUNT_FILE).read_text())
  assert saved["estimate"] == first.value
  assert os.stat(tmp_path / count_lib.COUNT_FILE).st_mode & 0o077 == 0  # owner-only
  # A resume (same rows, same epsilon) reuses it: the same q and T, no second count spent.
  for _ in range(3):
    assert count_lib.resolve(str(tmp_path), 5000, rc.dp, rc.data, "digest") == first
  # A changed count_epsilon reuses the estimate with its own epsilon: a second count of the
  # same rows would spend an epsilon the total would not state.
  wider = _settings(**{"dp.count_epsilon": 0.5})
  assert count_lib.resolve(str(tmp_path), 5000, wider.dp, wider.data, "digest") == first
  # Other rows get their own estimate, saved for them.
  other = count_lib.resolve(str(tmp_path), 5000, wider.dp, wider.data, "other rows")
  assert other.epsilon == 0.5
  saved = json.loads((tmp_path / count_lib.COUNT_FILE).read_text())
  assert (saved["estimate"], saved["epsilon"]) == (other.value, 0.5)


def test_a_public_noise_seed_repeats_the_estimate_and_entropy_does_not():
  rc = _settings(**{"dp.noise_seed": 5})
  values = {count_lib.resolve(None, 5000, rc.dp, rc.data, "d").value for _ in range(3)}
  assert len(values) == 1
  rc = _settings()
  values = {count_lib.resolve(None, 5000, rc.dp, rc.data, "d").value for _ in range(20)}
  assert len(values) > 1  # 20 draws of scale 100 agreeing: probability below 1e-30


def test_a_declared_n_is_used_as_it_is_and_costs_nothing():
  rc = _settings(**{"data.public_num_examples": 4321})
  n = count_lib.resolve(None, 5000, rc.dp, rc.data, "d")
  assert (n.value, n.epsilon, n.estimated) == (4321, 0.0, False)
  assert n.source == f"{count_lib.DECLARED} (data.public_num_examples)"
  rc = _settings(**{"data.num_examples_public": True})
  n = count_lib.resolve(None, 5000, rc.dp, rc.data, "d")
  assert (n.value, n.epsilon) == (5000, 0.0) and "data.num_examples_public" in n.source
  rc = _settings(**{"dp.enabled": False})
  assert count_lib.resolve(None, 5000, rc.dp, rc.data, "d").epsilon == 0.0


def test_the_count_comes_out_of_the_budget_and_bad_settings_are_refused():
  rc = _settings(**{"dp.target_epsilon": 1.0})
  budget = calibration.training_budget(rc.dp, 0.01, "dp.count_epsilon")
  assert budget.target_epsilon == pytest.approx(0.99)
  with pytest.raises(errors.ConfigError, match="after dp.count_epsilon=1.5"):
    calibration.training_budget(rc.dp, 1.5, "dp.count_epsilon")
  with pytest.raises(errors.ConfigError, match="below batch_size=64"):
    count_lib.check_estimate(count_lib.RowCount(value=50, epsilon=0.01,
                                                source=count_lib.DP_ESTIMATE), 64)
  with pytest.raises(errors.ConfigError, match="data.batches were drawn"):
    _settings(**{"data.batches": "somewhere"})
  with pytest.raises(errors.ConfigError, match="set one of them"):
    _settings(**{"data.num_examples_public": True, "data.public_num_examples": 10})

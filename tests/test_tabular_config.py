"""configs/tabular.py, the starting config for any table: it validates, and it trains.

On tiny generated data (a few updates, not a measurement): a binary table gives a private,
calibrated model within the target epsilon; a regression table is refused until the
calibration is set to 0, as the config's docstring says, and then trains.
"""

import math

import numpy as np
import pytest

from configs import tabular
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax import train
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import split as split_lib
from tests.conftest import make_dataset


def _config(path, **overrides):
  cfg = tabular.get_config()
  cfg.data.path = path
  cfg.num_epochs = 2  # a few updates: this checks that it runs, not what it reaches
  cfg.checkpoint.enabled = False
  cfg.privacy_eval.membership_rows = 200
  for key, value in overrides.items():
    group, name = key.split(".")
    cfg[group][name] = value
  return cfg


def test_the_config_validates_as_it_is():
  rc = config_lib.settings(tabular.get_config())
  assert rc.dp.target_epsilon == 1.0 and rc.calibration.epsilon < rc.dp.target_epsilon
  assert rc.data.validation_fraction > 0  # the calibration's rows exist


def test_it_trains_a_private_calibrated_binary_model(tmp_path):
  path = make_dataset(str(tmp_path / "data"), rows=4000, seed=1)
  cfg = _config(path)
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert summary.private is True and summary.steps > 0
  target = cfg.dp.target_epsilon
  # The total (training, the private count of N, the calibration) stays within the target.
  assert summary.epsilon <= target * (1 + 1e-9)
  assert summary.calibration_epsilon == cfg.calibration.epsilon
  assert summary.temperature is not None and math.isfinite(summary.temperature)
  assert 0 <= summary.test_accuracy <= 1
  card = (tmp_path / "w" / "model" / "MODEL_CARD.md").read_text()
  assert card.startswith("# Model card: DP-SGD binary classifier of `employed`")


def _regression_data(path, rows=4000, seed=2):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (rows, 4)).astype(np.float32)
  y = np.clip(5 + 2 * x @ rng.normal(size=4) + rng.normal(size=rows) * 0.3, 0, 10)
  test = split_lib.is_test_row(np.arange(rows))
  with data_lib.DatasetWriter(path, feature_names=("a", "b", "c", "d"), label_name="y",
                              feature_bounds=(-1, 1),
                              task=manifest_lib.Task("regression", bounds=(0.0, 10.0))) as w:
    w.add("train", x[~test], y[~test].astype(np.float32))
    w.add("test", x[test], y[test].astype(np.float32))
  return path


def test_a_regression_table_trains_once_the_calibration_is_off(tmp_path):
  path = _regression_data(str(tmp_path / "data"))
  with pytest.raises(errors.ConfigError, match="calibration.epsilon applies to classifiers"):
    train.train_and_evaluate(_config(path), str(tmp_path / "refused"))
  summary = train.train_and_evaluate(_config(path, **{"calibration.epsilon": 0.0}),
                                     str(tmp_path / "w"))
  assert summary.private is True and summary.steps > 0
  assert summary.epsilon <= tabular.get_config().dp.target_epsilon * (1 + 1e-9)
  assert math.isfinite(summary.test_rmse)

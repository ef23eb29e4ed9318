"""Calibration metrics of fastdp_jax.metrics against independent computations."""

import numpy as np
import pytest

from fastdp_jax import metrics as metrics_lib
from fastdp_jax import models
from fastdp_jax.data import shards as data_lib


def test_brier_score_is_the_mean_squared_error_of_the_probabilities():
  p, y = np.array([0.9, 0.2, 0.6, 0.0]), np.array([1, 0, 0, 1])
  expected = ((0.9 - 1) ** 2 + 0.2 ** 2 + 0.6 ** 2 + 1.0) / 4
  assert metrics_lib.brier_score(p, y) == pytest.approx(expected)
  # Multiclass: the squared error summed over the classes, averaged over the rows.
  pm, ym = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), np.array([0, 1])
  assert metrics_lib.brier_score(pm, ym) == pytest.approx(
      ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.1 ** 2 + 0.9 ** 2 + 0.8 ** 2)) / 2)


def test_ece_by_hand_and_near_zero_for_calibrated_probabilities():
  # Two bins hit: [0.0, 1/15) holds 0.05 twice (one positive), [14/15, 1] holds 0.95 twice
  # (both positive): ECE = (2 |0.5 - 0.05| + 2 |1 - 0.95|) / 4.
  p, y = np.array([0.05, 0.05, 0.95, 0.95]), np.array([1, 0, 1, 1])
  assert metrics_lib.expected_calibration_error(p, y) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)
  bins = metrics_lib.reliability_bins(p, y)
  assert bins == [(pytest.approx(0.05), 0.5, 2), (pytest.approx(0.95), 1.0, 2)]
  # Outcomes drawn with the stated probabilities: the expected ECE shrinks like 1/sqrt(n)
  # per bin; 15 bins of about 13k rows each give a standard error near 0.004.
  rng = np.random.default_rng(0)
  q = rng.random(200_000)
  assert metrics_lib.expected_calibration_error(q, rng.random(q.size) < q) < 0.01
  # Overconfident probabilities (pushed towards 0 and 1) are not.
  sharp = 1 / (1 + np.exp(-4 * np.log(q / (1 - q))))
  assert metrics_lib.expected_calibration_error(sharp, rng.random(q.size) < q) > 0.1


def test_split_metrics_report_log_loss_brier_ece_and_the_base_rate():
  rng = np.random.default_rng(1)
  labels = (rng.random(1000) < 0.3).astype(np.float32)
  metrics = metrics_lib.split_metrics(models.BINARY, "test", 0.5, 0.7, np.full(1000, 0.3),
                                   labels)
  assert set(metrics) >= {"test_loss", "test_accuracy", "test_auc", "test_brier", "test_ece",
                          "test_reliability"}
  split = data_lib.Split(features=np.zeros((1000, 1), np.float32), labels=labels,
                         feature_names=("a",), label_name="y", digest="")
  base = metrics_lib.baseline(split, models.BINARY)
  rate = float(labels.mean())
  assert base["base_rate_log_loss"] == pytest.approx(
      -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)))

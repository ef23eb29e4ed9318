"""The original system's model-inversion attack, its only privacy metric.

For training rows, the attacker knows every feature but one (``englishability`` in the
original) and the label. It sets the hidden column to 0 and to 1, and guesses the value whose
predicted probability is closer to the true label. The metric is the fraction guessed right;
compare it with the base rate of the column (guessing its majority value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def model_inversion_accuracy(predict_proba: Callable[[np.ndarray], np.ndarray],
                             features: np.ndarray, labels: np.ndarray, column: int,
                             num_rows: int = 10_000, seed: int = 0) -> float:
  """Accuracy of the model-inversion attack on a hidden binary column.

  Args:
    predict_proba: maps features [n, d] to P(label = 1) [n].
    features: [N, d] training features (the attacked rows are drawn from these).
    labels: [N] training labels in {0, 1}.
    column: index of the hidden binary feature.
    num_rows: number of rows attacked (the original used 10,000).
    seed: which rows are attacked.

  Returns:
    The fraction of attacked rows whose hidden value is guessed right.
  """
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(labels), size=min(num_rows, len(labels)), replace=False)
  x, y = features[rows], labels[rows]
  x0, x1 = x.copy(), x.copy()
  x0[:, column], x1[:, column] = 0, 1
  p0 = np.asarray(predict_proba(x0))
  p1 = np.asarray(predict_proba(x1))
  guess = (np.abs(p1 - y) < np.abs(p0 - y)).astype(x.dtype)
  return float(np.mean(guess == x[:, column]))


def inversion_accuracy_of(apply_fn: Callable, params: Any, features: np.ndarray,
                          labels: np.ndarray, column: int, num_rows: int, seed: int) -> float:
  """:func:`model_inversion_accuracy` of a binary model given by its ``apply_fn`` (logits)."""
  import jax  # local: the attack itself is NumPy

  def predict_proba(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.sigmoid(apply_fn(params, jax.numpy.asarray(x))))
  return model_inversion_accuracy(predict_proba, features, labels, column, num_rows, seed=seed)

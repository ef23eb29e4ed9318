"""Metrics: a model's metrics on a split, the constant baseline it must beat, and their intervals.

(The public ``fastdp_jax.evaluate(model_dir, data)`` recomputes a model's test metrics with
these formulas: :mod:`fastdp_jax.evaluation`.)

Every figure here is computed on held-out private rows (test or validation) without noise;
what may leave the machine is decided by :mod:`fastdp_jax.dp.release`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastdp_jax import models
from fastdp_jax import profiling
from fastdp_jax.data import batch_stream
from fastdp_jax.data import shards as data_lib
from fastdp_jax.dp import privacy_eval



def build_eval(apply_fn: Callable, head: models.TaskHead = models.BINARY) -> Callable:
  """Jitted ``evaluate(params, x, y, mask) -> (loss_sum, correct, predictions)`` of a chunk.

  ``predictions`` are :meth:`fastdp_jax.models.TaskHead.predict`'s (what an exported model
  returns); ``correct`` counts right classes (binary: logit > 0, as the trainer always did;
  multiclass: the arg-max; 0 for regression). A calibrated classifier's loss is that of its
  probabilities: of the logits divided by the head's temperature. The same ``apply_fn`` and
  an equal ``head`` give the same function (compiled once).
  """
  # Kept on the model function itself (collected with it): trials that share one model
  # function (fastdp_jax.trials) and end with the same calibrated head compile it once.
  by_head = getattr(apply_fn, "_fastdp_evals", None)
  if by_head is None:
    by_head = {}
    try:
      apply_fn._fastdp_evals = by_head  # type: ignore[attr-defined]
    except AttributeError:  # a callable without attributes: no cache
      return _build_eval(apply_fn, head)
  if head not in by_head:
    by_head[head] = _build_eval(apply_fn, head)
  return by_head[head]


def _build_eval(apply_fn: Callable, head: models.TaskHead) -> Callable:
  scale = head.temperature if head.kind != "regression" else 1.0

  @jax.jit
  def evaluate(params, x, y, mask):
    outputs = apply_fn(params, x)
    losses = head.losses(outputs if scale == 1.0 else outputs / scale, y)
    if head.kind == "binary":
      correct = (outputs > 0) == (y > 0.5)
    elif head.kind == "multiclass":
      correct = jnp.argmax(outputs, axis=-1) == y.astype(jnp.int32)
    else:
      correct = jnp.zeros(y.shape, bool)
    return (jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct & mask),
            head.predict(outputs))
  return evaluate


def evaluate_split(evaluate: Callable, params, x: np.ndarray, y: np.ndarray,
                   chunk: int) -> tuple[float, float, np.ndarray]:
  """Mean loss, accuracy and every row's prediction over a split, in fixed-size padded
  chunks (one compilation).

  Returns:
    ``(mean loss, accuracy, predictions [n] or [n, K])`` (accuracy 0 for regression).
  """
  chunk = min(chunk, len(y))
  loss, correct, preds = 0.0, 0, []
  for lo in range(0, len(y), chunk):
    xb, yb = x[lo:lo + chunk], y[lo:lo + chunk]
    n = len(yb)
    mask = np.arange(chunk) < n
    if n < chunk:
      xb = np.concatenate([xb, np.zeros((chunk - n, x.shape[1]), x.dtype)])
      yb = np.concatenate([yb, np.zeros((chunk - n,), y.dtype)])
    l, c, p = evaluate(params, xb, yb, mask)
    loss += float(l)
    correct += int(c)
    preds.append(np.asarray(p)[:n])
  return loss / len(y), correct / len(y), np.concatenate(preds)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a random positive > a random negative), ties 1/2.

  The Mann-Whitney statistic from average ranks (tied scores share their mean rank); NaN when
  one class is absent.
  """
  scores, pos = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
  # Average rank (1-based) of each group of equal scores.
  ends = np.cumsum(counts)
  ranks = np.empty(len(scores))
  ranks[order] = (ends - (counts - 1) / 2)[inverse]
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
  """Unweighted mean of the per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that
  occur in the labels or the predictions (scikit-learn's ``f1_score(average='macro')``)."""
  predicted, labels = np.asarray(predicted, np.int64), np.asarray(labels, np.int64)
  f1 = []
  for c in np.union1d(predicted, labels):
    tp = int(np.sum((predicted == c) & (labels == c)))
    fp = int(np.sum((predicted == c) & (labels != c)))
    fn = int(np.sum((predicted != c) & (labels == c)))
    f1.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1)) if f1 else float("nan")


ECE_BINS = 15  # equal-width bins of the predicted probability (Guo et al. 2017's choice)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
  """Mean squared error of the predicted probabilities against the outcomes.

  Args:
    probabilities: [n] P(y = 1) (binary) or [n, K] class probabilities (multiclass, where the
      score sums the squared errors over the K classes).
    labels: [n] 0/1 or class indices.
  """
  p = np.asarray(probabilities, np.float64)
  y = np.asarray(labels)
  if p.ndim == 1:
    return float(np.mean((p - (y > 0.5)) ** 2))
  onehot = np.eye(p.shape[1])[y.astype(np.int64)]
  return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray,
                     num_bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
  """``(mean predicted probability, observed frequency, rows)`` per equal-width bin.

  Binary: the bins are of P(y = 1) and the frequency is that of y = 1. Multiclass: the bins
  are of the top class's probability and the frequency is that of the top class being right.
  Empty bins are left out.
  """
  p = np.asarray(probabilities, np.float64)
  y = np.asarray(labels)
  if p.ndim == 1:
    conf, hit = p, (y > 0.5).astype(np.float64)
  else:
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y.astype(np.int64)).astype(np.float64)
  which = np.minimum((conf * num_bins).astype(np.int64), num_bins - 1)
  out = []
  for b in range(num_bins):
    sel = which == b
    if sel.any():
      out.append((float(conf[sel].mean()), float(hit[sel].mean()), int(sel.sum())))
  return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  """Rows-weighted mean |observed frequency - mean predicted probability| over the bins of
  :func:`reliability_bins` (0: perfectly calibrated)."""
  bins = reliability_bins(probabilities, labels, num_bins)
  n = sum(c for _, _, c in bins)
  return float(sum(c * abs(f - m) for m, f, c in bins) / n) if n else float("nan")


def split_metrics(head: models.TaskHead, prefix: str, loss: float, accuracy: float,
                  predictions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """The task's metrics of one split, named ``{prefix}_loss``, ``{prefix}_accuracy``, ...

  binary: loss (BCE: the log-loss), accuracy, AUC, Brier score, expected calibration error;
  multiclass: loss (cross-entropy), accuracy, macro-F1, Brier score, expected calibration
  error (of the top class), and the reliability diagram's bins (:func:`reliability_bins`);
  regression: loss (squared or Huber, in units of half the public
  label range), RMSE and MAE in the label's units.
  """
  out: dict[str, Any] = {f"{prefix}_loss": loss}
  if head.kind == "binary":
    out[f"{prefix}_accuracy"] = accuracy
    out[f"{prefix}_auc"] = binary_auc(predictions, labels)
    out[f"{prefix}_brier"] = brier_score(predictions, labels)
    out[f"{prefix}_ece"] = expected_calibration_error(predictions, labels)
    out[f"{prefix}_reliability"] = reliability_bins(predictions, labels)
  elif head.kind == "multiclass":
    out[f"{prefix}_accuracy"] = accuracy
    out[f"{prefix}_macro_f1"] = macro_f1(np.argmax(predictions, axis=-1), labels)
    out[f"{prefix}_brier"] = brier_score(predictions, labels)
    out[f"{prefix}_ece"] = expected_calibration_error(predictions, labels)
    out[f"{prefix}_reliability"] = reliability_bins(predictions, labels)
  else:
    err = np.asarray(predictions, np.float64) - np.asarray(labels, np.float64)
    out[f"{prefix}_rmse"] = float(np.sqrt(np.mean(err ** 2)))
    out[f"{prefix}_mae"] = float(np.mean(np.abs(err)))
  return out


def _entropy(frequencies: Any) -> float:
  f = np.asarray(frequencies, np.float64)
  f = f[f > 0]
  return float(-np.sum(f * np.log(f)))


def baseline(test: data_lib.Split, head: models.TaskHead = models.BINARY, *,
             streamed_from: str | None = None, chunk_rows: int = 65_536) -> dict[str, float]:
  """The task's constant baseline, computed on the TEST rows (a test metric, like accuracy).

  binary and multiclass: ``majority_class_rate`` (the test rows' most frequent class) and
  ``base_rate_log_loss`` (the log-loss of predicting the test rows' class frequencies for
  every row: a model above it predicts worse than knowing nothing about the row);
  regression: ``baseline_rmse`` and ``baseline_mae`` of predicting the test rows' mean.
  A baseline from the training rows would be an unaccounted statistic of them.

  Args:
    test: the test rows (a bounded sample when they are streamed).
    head: the task.
    streamed_from: a dataset directory whose test shards are read a chunk at a time instead
      of ``test`` (materialised batches: the test split is not held in memory).
    chunk_rows: rows per chunk when streaming.
  """
  streamed = streamed_from is not None
  chunks = ([test.labels] if not streamed else
            [y for _, y in batch_stream.iter_split(streamed_from, "test",
                                                   chunk_rows=chunk_rows)])
  if head.kind == "binary":
    if not streamed:
      rate = float(test.labels.mean())
    else:
      ones = total = 0.0
      for y in chunks:
        ones, total = ones + float(y.sum()), total + len(y)
      rate = ones / max(total, 1.0)
    return {"majority_class_rate": max(rate, 1 - rate),
            "base_rate_log_loss": _entropy(np.array([rate, 1 - rate]))}
  total = max(sum(len(y) for y in chunks), 1)
  if head.kind == "multiclass":
    counts = sum(np.bincount(np.asarray(y, np.int64), minlength=head.num_classes)
                 for y in chunks)
    return {"majority_class_rate": float(np.max(counts)) / total,
            "base_rate_log_loss": _entropy(counts / total)}
  mean = sum(float(np.sum(y, dtype=np.float64)) for y in chunks) / total
  sq = sum(float(np.sum((np.asarray(y, np.float64) - mean) ** 2)) for y in chunks)
  ab = sum(float(np.sum(np.abs(np.asarray(y, np.float64) - mean))) for y in chunks)
  return {"baseline_rmse": float(np.sqrt(sq / total)), "baseline_mae": ab / total}


def example_losses(apply_fn: Callable, params: Any, head: models.TaskHead,
                   chunk: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """Per-example losses of a trained model (membership inference and the canary audit)."""
  if head.kind == "binary":
    return profiling.books("privacy evaluation")(
        privacy_eval.batched_losses(apply_fn, params, chunk))
  losses = jax.jit(lambda p, x, y: head.losses(apply_fn(p, x), y))

  @profiling.books("privacy evaluation")
  def fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    step = chunk
    return np.concatenate([np.asarray(losses(params, x[i:i + step], y[i:i + step]))
                           for i in range(0, len(y), step)] or [np.zeros(0, np.float32)])

  return fn


@profiling.books("evaluation")  # inside the loop's own "evaluation" phase: booked once
def split_metrics_of(evaluate: Callable, params: Any, head: models.TaskHead, prefix: str, *,
                     rows: data_lib.Split | None = None, streamed_from: str | None = None,
                     chunk: int = 65_536) -> dict[str, Any]:
  """The task's metrics (:func:`split_metrics`) of the rows in memory, or of a dataset's test
  shards read a chunk at a time (``streamed_from``: materialised batches keep no test split
  in memory).

  Args:
    evaluate: :func:`build_eval`'s function.
    params: the model's parameters, on the host.
    head: the task.
    prefix: ``"test"`` or ``"validation"``: the metrics' names start with it.
    rows: the split in memory.
    streamed_from: a dataset directory whose test shards are read instead.
    chunk: rows per evaluation call.
  """
  if streamed_from is None:
    return split_metrics(head, prefix, *evaluate_split(evaluate, params, rows.features,
                                                       rows.labels, chunk), rows.labels)
  loss = correct = n = 0.0
  preds, labels = [], []
  for x, y in batch_stream.iter_split(streamed_from, "test", chunk_rows=chunk):
    chunk_loss, chunk_acc, p = evaluate_split(evaluate, params, x, y, chunk)
    loss, correct, n = loss + chunk_loss * len(y), correct + chunk_acc * len(y), n + len(y)
    preds.append(p)
    labels.append(y)
  return split_metrics(head, prefix, loss / n, correct / n, np.concatenate(preds),
                       np.concatenate(labels))


@profiling.books("evaluation")  # the calibration's pass over the validation rows
def outputs_of(apply_fn: Callable, params: Any, x: np.ndarray, chunk: int) -> np.ndarray:
  """The model's raw outputs (logits for a classifier) of rows ``x``, a chunk at a time."""
  fn = jax.jit(apply_fn)
  return np.concatenate([np.asarray(fn(params, x[i:i + chunk]))
                         for i in range(0, len(x), chunk)])

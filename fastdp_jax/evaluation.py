"""``fastdp_jax.evaluate``: a model's test metrics recomputed with public functions, with intervals.

::

  >>> result = fastdp_jax.evaluate("runs/eps1", "data/fulton")           # doctest: +SKIP
  >>> result["accuracy"]                                                   # doctest: +SKIP
  Interval(value=0.8038, low=0.7927, high=0.8146, method='clopper-pearson')

Everything it uses is public: :func:`fastdp_jax.load_model` (the exported model), the dataset's
shards (:func:`fastdp_jax.load_split`) or, for a raw CSV, the model's feature spec and the split
rule :func:`fastdp_jax.data.split.is_test_row` of each cleaned row's row key (its content and
its occurrence among the identical kept rows before it, :func:`fastdp_jax.data.split.row_keys`;
the seed and fraction are the dataset's, recorded in its manifest's ``extra["split"]``), and
the formulas of :mod:`fastdp_jax.metrics`. On the dataset the run
trained on it gives the run's test metrics (``summary.json``): accuracy exactly, the others to
float precision (the run computes them in float32 on the device).

Intervals (two-sided, ``level`` 0.95): accuracy's is the exact Clopper-Pearson interval of a
binomial proportion; every other metric's is the percentile bootstrap over the rows,
:data:`BOOTSTRAP_RESAMPLES` resamples drawn with the fixed seed :data:`BOOTSTRAP_SEED`, so the
same call gives the same interval. They describe the sampling error of the test rows only (not
the training's randomness). A percentile interval need not contain the value: a statistic
that resampling biases upward, such as ECE (duplicated rows make the bins noisier, and ECE is
never below 0), can get an interval above it.

Privacy: the metrics are statistics of private rows and no mechanism covers them; they are as
private as the rows (``docs/privacy.md``).
"""

from __future__ import annotations

import dataclasses
import gzip
import bz2
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import special
from scipy import stats

from fastdp_jax import errors
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import units as units_lib

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
SPLITS = ("test", "train")
_CSV_BLOCK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Interval:
  """A metric and its two-sided interval at the evaluation's level."""

  value: float
  low: float
  high: float
  method: str  # 'clopper-pearson' or 'bootstrap'

  def __str__(self) -> str:
    return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What :func:`evaluate` returns.

  Attributes:
    task: ``'binary'``, ``'multiclass'`` or ``'regression'``.
    split: the rows evaluated (``'test'`` or ``'train'``).
    rows: how many rows (private, like the metrics).
    metrics: name -> :class:`Interval`, named as the run's summary without ``test_``:
      binary ``accuracy, loss (log-loss), auc, brier, ece``; multiclass ``accuracy, loss,
      macro_f1, brier, ece``; regression ``rmse, mae`` (on the scale of the dataset's labels,
      as the run's).
    level: the intervals' coverage.
    resamples: the bootstrap's number of resamples.
  """

  task: str
  split: str
  rows: int
  metrics: dict[str, Interval]
  level: float = LEVEL
  resamples: int = BOOTSTRAP_RESAMPLES

  def __getitem__(self, name: str) -> Interval:
    return self.metrics[name]

  def lines(self) -> list[str]:
    """One line per metric: ``accuracy 0.8038 [0.7927, 0.8146] (clopper-pearson)``."""
    return [f"{name} {iv} ({iv.method})" for name, iv in self.metrics.items()]


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
  """The exact (Clopper-Pearson) two-sided interval of a binomial proportion.

  >>> [round(v, 4) for v in clopper_pearson(8, 10)]
  [0.4439, 0.9748]
  """
  if trials <= 0 or not 0 <= successes <= trials:
    raise ValueError(f"{successes=} of {trials=}: need 0 <= successes <= trials, trials > 0")
  alpha = 1 - level
  low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes,
                                                        trials - successes + 1))
  high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1,
                                                              trials - successes))
  return low, high


def evaluate(model_dir: str | os.PathLike, data: str | os.PathLike, split: str = "test", *,
             split_seed: int | None = None, test_fraction: float | None = None,
             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
             level: float = LEVEL, key: bytes | str | None = None) -> Evaluation:
  """A model's metrics on a split of a dataset directory or a raw CSV, with intervals.

  Args:
    model_dir: the exported model (``WORKDIR/model``) or the workdir that holds it.
    data: a dataset directory (its ``split`` shards are read) or a raw CSV file (plain,
      gzip or bzip2) with a header: its rows are cleaned and encoded with the model's feature
      spec, as the Spark job does, and put in splits by
      :func:`fastdp_jax.data.split.is_test_row` of their row keys.
    split: ``'test'`` (the run's test metrics) or ``'train'``.
    split_seed: for a CSV: the dataset's split seed (its manifest's ``extra["split"]["seed"]``;
      default the pipeline's default, 69).
    test_fraction: for a CSV: the dataset's test fraction (default 0.2).
    resamples: bootstrap resamples (default :data:`BOOTSTRAP_RESAMPLES`).
    seed: the bootstrap's seed (default :data:`BOOTSTRAP_SEED`).
    level: the intervals' coverage (default 0.95).
    key: the key the model was signed with, if any (as :func:`fastdp_jax.load_model`).

  Raises:
    UserError: no such split, a CSV for a model without a feature spec, or no rows.
  """
  from fastdp_jax.export import predictor as predictor_lib  # local: JAX only when used
  if split not in SPLITS:
    raise errors.UserError(f"split={split!r}: expected one of {SPLITS}")
  model = predictor_lib.load_model(os.fspath(model_dir), key=key)
  path = os.fspath(data)
  if os.path.isdir(path):
    if split_seed is not None or test_fraction is not None:
      raise errors.UserError("split_seed and test_fraction are for a CSV; a dataset directory "
                             "holds its splits already")
    from fastdp_jax.data import shards  # pylint: disable=g-import-not-at-top
    rows = shards.load_split(path, split)
    x, y = rows.features, rows.labels
  else:
    x, y = csv_split(model.feature_spec, path, split,
                     split_lib.DEFAULT_SPLIT_SEED if split_seed is None else split_seed,
                     split_lib.DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction)
  if len(y) == 0:
    raise errors.UserError(f"{path}: no {split} rows to evaluate")
  task = model.task
  if task == "regression":
    outputs = np.asarray(model.model_values(x), np.float64)
  else:
    outputs = np.asarray(model.logits(x), np.float64) / float(model.model.get("temperature", 1.0))
  return _with_intervals(task, split, outputs, np.asarray(y), resamples, seed, level)


def csv_split(spec: Any, path: str, split: str, split_seed: int,
              test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """The encoded ``(features, labels)`` of a raw CSV's ``split`` rows, as the Spark job makes them.

  A kept row's split is decided by its row key: its encoded content and its occurrence among
  the identical kept rows before it in the file (one counter over the file's blocks, as the
  pipeline counts over the whole input); rows with a missing value or a malformed line are
  left out, as the pipeline leaves them out of the shards. A spec naming a ``privacy_unit`` splits by unit
  key instead (:func:`fastdp_jax.data.units.is_test_unit`), as the pipeline does.

  Raises:
    UserError: the model has no feature spec (pass its dataset directory instead).
  """
  if spec is None:
    raise errors.UserError(f"{path}: this model has no feature spec to encode raw rows with; "
                           "pass its dataset directory instead")
  from fastdp_jax.data import cleaning  # pylint: disable=g-import-not-at-top
  xs, ys = [], []
  seen: dict[int, int] = {}  # kept rows of each content key in the blocks before
  with _open_text(path) as f:
    cleaner = cleaning.LineCleaner(spec, cleaning.parse_header(f.readline().rstrip("\n")))
    for _, lines in _blocks(f):
      result = cleaner.clean(lines)
      x, y = spec.encode(result.values)
      if result.units is not None:  # a unit spec: the producers split by unit key
        test = units_lib.is_test_unit(units_lib.keys_of_ids(result.units), split_seed,
                                      test_fraction)
      else:
        content = split_lib.value_keys(result.values)
        test = split_lib.is_test_row(split_lib.row_keys(content, split_lib.occurrences(
            content, seen)), split_seed, test_fraction)
      keep = test == (split == "test")
      xs.append(np.asarray(x)[keep])
      ys.append(np.asarray(y)[keep])
  if not xs:
    return np.zeros((0, spec.num_features), np.float32), np.zeros(0, np.float32)
  return np.concatenate(xs), np.concatenate(ys)


def _open_text(path: str) -> io.TextIOBase:
  with open(path, "rb") as f:
    head = f.read(3)
  opener = gzip.open if head[:2] == b"\x1f\x8b" else bz2.open if head == b"BZh" else open
  # Universal newlines and undecodable bytes as U+FFFD: the pipeline's line readers.
  return opener(path, "rt", encoding="utf-8", errors="replace", newline=None)


def _blocks(f: Any) -> Iterator[tuple[int, list[str]]]:
  first = 0
  while True:
    lines = [line.rstrip("\n") for _, line in zip(range(_CSV_BLOCK), f)]
    if not lines:
      return
    yield first, lines
    first += len(lines)


def _point_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The run's metrics from the model's outputs (temperature-scaled logits, or values)."""
  from fastdp_jax import metrics  # pylint: disable=g-import-not-at-top
  if task == "regression":
    err = outputs - labels.astype(np.float64)
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}
  if task == "binary":
    y = labels > 0.5
    p = special.expit(outputs)
    loss = np.where(y, np.logaddexp(0.0, -outputs), np.logaddexp(0.0, outputs))
    # AUC ranks the probabilities as the run does, in float32: two rows whose float64
    # probabilities round to one float32 value tie there (half a pair each), and a whole
    # group of such pairs would move the AUC by far more than float32 precision.
    return {"accuracy": float(np.mean((outputs > 0) == y)), "loss": float(np.mean(loss)),
            "auc": metrics.binary_auc(p.astype(np.float32), y),
            "brier": metrics.brier_score(p, y),
            "ece": metrics.expected_calibration_error(p, y)}
  y = labels.astype(np.int64)
  log_p = outputs - special.logsumexp(outputs, axis=1, keepdims=True)
  p = np.exp(log_p)
  predicted = np.argmax(outputs, axis=1)
  return {"accuracy": float(np.mean(predicted == y)),
          "loss": float(-np.mean(log_p[np.arange(len(y)), y])),
          "macro_f1": metrics.macro_f1(predicted, y), "brier": metrics.brier_score(p, y),
          "ece": metrics.expected_calibration_error(p, y)}


def _with_intervals(task: str, split: str, outputs: np.ndarray, labels: np.ndarray,
                    resamples: int, seed: int, level: float) -> Evaluation:
  point = _point_metrics(task, outputs, labels)
  n = len(labels)
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {name: [] for name in point if name != "accuracy"}
  for _ in range(resamples):
    idx = rng.integers(0, n, n)
    for name, value in _point_metrics(task, outputs[idx], labels[idx]).items():
      if name in draws:
        draws[name].append(value)
  alpha = 1 - level
  out: dict[str, Interval] = {}
  for name, value in point.items():
    if name == "accuracy":
      low, high = clopper_pearson(int(round(value * n)), n, level)
      out[name] = Interval(value, low, high, "clopper-pearson")
    else:
      low, high = np.nanquantile(np.asarray(draws[name], np.float64), [alpha / 2, 1 - alpha / 2])
      out[name] = Interval(value, float(low), float(high), "bootstrap")
  return Evaluation(task=task, split=split, rows=n, metrics=out, level=level,
                    resamples=resamples)

"""The private-model peers' quality, for ``benchmarks/utility.py``: DP-EBM, DP logistic
regression, non-private logistic regression and gradient boosting, the base rate.

Runs in the peers' virtual environment (``bash benchmarks/utility_venv.sh``: interpret-core,
diffprivlib, scikit-learn 1.6), never in the project's. Reads the encoded feature CSVs that
``benchmarks/utility.py`` exports from the project's dataset (``fastdp_jax.load_split``: the
same rows, the same split, the same encoded features as the project's own run), fits one
method on ALL the training rows, predicts P(label = 1) for the test rows and prints one JSON
line: the fit's seconds and the test metrics, each with a 95 % bootstrap interval.

Methods (``--method``):

* ``dp-ebm``: interpret's ``DPExplainableBoostingClassifier`` with its default
  hyper-parameters, ``epsilon`` = E (total), ``delta`` = ``--delta``; the feature types and the
  continuous features' ``privacy_bounds`` are the spec's public ones (``--bounds``), so no
  bound is taken from the data.
* ``dp-ebm-lr0.2``: the same with ``learning_rate=0.2``, a value chosen on the training rows
  (that tuning is NOT accounted for in E).
* ``dp-lr``: diffprivlib's ``LogisticRegression`` (pure epsilon-DP, epsilon = E),
  ``data_norm`` = the largest L2 norm a row can have under the spec's public bounds (one-hot
  groups count once); diffprivlib's other defaults.
* ``lr``, ``hgb``: scikit-learn's ``LogisticRegression(max_iter=1000)`` and
  ``HistGradientBoostingClassifier`` (defaults), non-private.
* ``base-rate``: every test row gets the training rows' frequency of label 1 (non-private).

The metrics (accuracy at 0.5, ROC AUC, log-loss, Brier score, ECE over 15 equal-width bins)
are the formulas of ``fastdp_jax.metrics`` (``binary_auc``, ``brier_score``,
``reliability_bins``/``expected_calibration_error``), re-implemented here in NumPy because this
venv has no fastdp_jax; ``benchmarks/utility.py`` scores the project's model with THESE
functions too (one code path) and checks them against fastdp_jax's on every run.

Usage::

  /work/utility-peer-venv/bin/python benchmarks/utility_peers.py --train train.csv \\
      --test test.csv --label employed --features sex,latino,... --bounds bounds.json \\
      --epsilon 1 --seed 0 --method dp-ebm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20261201  # public and fixed: every method gets the same resampled rows
LOG_LOSS_EPS = 1e-15  # probabilities clipped to [eps, 1 - eps] for the log-loss
METRICS = ("accuracy", "auc", "log_loss", "brier", "ece")
METHODS = ("dp-ebm", "dp-ebm-lr0.2", "dp-lr", "lr", "hgb", "base-rate")
PRIVATE = {"dp-ebm": True, "dp-ebm-lr0.2": True, "dp-lr": True, "lr": False, "hgb": False,
           "base-rate": False}


# --- the metrics: fastdp_jax.metrics's formulas, in NumPy ---------------------------------
def auc(p: np.ndarray, y: np.ndarray) -> float:
  """P(score of a random positive > a random negative), ties 1/2 (average ranks)."""
  scores, pos = np.asarray(p, np.float64), np.asarray(y) > 0.5
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  ranks = np.empty(len(scores))
  ranks[order] = (ends - (counts - 1) / 2)[inverse]
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(p: np.ndarray, y: np.ndarray) -> float:
  """Mean squared error of P(y = 1) against the 0/1 outcome."""
  return float(np.mean((np.asarray(p, np.float64) - (np.asarray(y) > 0.5)) ** 2))


def ece(p: np.ndarray, y: np.ndarray, num_bins: int = ECE_BINS) -> float:
  """Rows-weighted mean |frequency of y = 1 - mean P(y = 1)| over equal-width bins of P
  (bin = min(floor(p * bins), bins - 1); empty bins left out)."""
  p = np.asarray(p, np.float64)
  hit = (np.asarray(y) > 0.5).astype(np.float64)
  which = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
  rows = np.bincount(which, minlength=num_bins)
  conf = np.bincount(which, weights=p, minlength=num_bins)
  freq = np.bincount(which, weights=hit, minlength=num_bins)
  full = rows > 0
  if not full.any():
    return float("nan")
  gaps = np.abs(freq[full] / rows[full] - conf[full] / rows[full])
  return float(np.sum(rows[full] * gaps) / rows[full].sum())


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
  """Mean binary cross-entropy of the probabilities (clipped to [1e-15, 1 - 1e-15])."""
  p = np.clip(np.asarray(p, np.float64), LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
  t = np.asarray(y) > 0.5
  return float(-np.mean(np.where(t, np.log(p), np.log1p(-p))))


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
  """Share of rows whose class at P > 0.5 is the label (fastdp_jax: logit > 0)."""
  return float(np.mean((np.asarray(p, np.float64) > 0.5) == (np.asarray(y) > 0.5)))


FUNCTIONS = {"accuracy": accuracy, "auc": auc, "log_loss": log_loss, "brier": brier,
             "ece": ece}


def bootstrap_indices(n: int) -> np.ndarray:
  """[resamples, n] row indices drawn with replacement from the fixed public seed."""
  rng = np.random.default_rng(BOOTSTRAP_SEED)
  return rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def metrics(p: np.ndarray, y: np.ndarray, idx: np.ndarray | None = None) -> dict:
  """``{metric: {"value": v, "ci95": [lo, hi]}}`` on the test rows; the interval is the
  2.5 and 97.5 percentiles over the bootstrap resamples of the rows."""
  p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
  idx = bootstrap_indices(len(y)) if idx is None else idx
  out = {}
  for name in METRICS:
    f = FUNCTIONS[name]
    boot = np.array([f(p[i], y[i]) for i in idx])
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    out[name] = {"value": f(p, y), "ci95": [float(lo), float(hi)]}
  return out


# --- the data ---------------------------------------------------------------------------
def read_csv(path: str, label: str, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, d] float64 in ``features`` order, labels [n]) from a headed CSV."""
  with open(path, encoding="utf-8") as f:
    header = f.readline().strip().split(",")
  data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
  cols = {name: j for j, name in enumerate(header)}
  missing = [c for c in [*features, label] if c not in cols]
  if missing:
    raise SystemExit(f"error: {path} has no column(s) {missing}")
  return data[:, [cols[c] for c in features]], data[:, cols[label]]


def read_bounds(arg: str) -> dict:
  """The public bounds: a JSON file or an inline JSON object (see ``utility.py``)."""
  if os.path.isfile(arg):
    with open(arg, encoding="utf-8") as f:
      return json.load(f)
  return json.loads(arg)


def data_norm(bounds: dict, features: list[str]) -> float:
  """The largest L2 norm a row can have under the public bounds: each feature contributes
  max(lo^2, hi^2), except that the features of a one-hot group (at most one is non-zero)
  contribute their group's largest term once."""
  by_name = {f["name"]: f for f in bounds["features"]}
  total, groups = 0.0, {}
  for name in features:
    f = by_name[name]
    term = max(f["lo"] ** 2, f["hi"] ** 2)
    if f.get("group"):
      groups[f["group"]] = max(groups.get(f["group"], 0.0), term)
    else:
      total += term
  return float(np.sqrt(total + sum(groups.values())))


# --- the methods ------------------------------------------------------------------------
def _dp_ebm(args, bounds, features, learning_rate=None):
  from interpret.privacy import DPExplainableBoostingClassifier
  by_name = {f["name"]: f for f in bounds["features"]}
  types = ["continuous" if by_name[n]["kind"] == "numeric" else "nominal" for n in features]
  privacy_bounds = {j: (by_name[n]["lo"], by_name[n]["hi"]) for j, n in enumerate(features)
                    if by_name[n]["kind"] == "numeric"}
  kw = {} if learning_rate is None else {"learning_rate": learning_rate}
  return DPExplainableBoostingClassifier(
      feature_names=features, feature_types=types, epsilon=args.epsilon, delta=args.delta,
      privacy_bounds=privacy_bounds, random_state=args.seed, n_jobs=args.jobs, **kw)


def build(args, bounds, features):
  """The method's estimator (``fit``, ``predict_proba``) and its settings as a dict."""
  m = args.method
  if m == "dp-ebm":
    return _dp_ebm(args, bounds, features), {"delta": args.delta}
  if m == "dp-ebm-lr0.2":
    return _dp_ebm(args, bounds, features, 0.2), {
        "delta": args.delta, "learning_rate": 0.2,
        "note": "learning_rate chosen on the training rows: that tuning is unaccounted"}
  if m == "dp-lr":
    from diffprivlib.models import LogisticRegression
    norm = data_norm(bounds, features)
    return (LogisticRegression(epsilon=args.epsilon, data_norm=norm, random_state=args.seed),
            {"data_norm": norm, "delta": 0.0})
  if m == "lr":
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=1000, random_state=args.seed), {}
  if m == "hgb":
    from sklearn.ensemble import HistGradientBoostingClassifier
    return HistGradientBoostingClassifier(random_state=args.seed), {}
  if m == "base-rate":
    return None, {}
  raise SystemExit(f"error: unknown method {m!r}; expected one of {METHODS}")


def run(args) -> dict:
  features = args.features.split(",")
  bounds = read_bounds(args.bounds)
  x_train, y_train = read_csv(args.train, args.label, features)
  x_test, y_test = read_csv(args.test, args.label, features)
  model, settings = build(args, bounds, features)
  t0 = time.perf_counter()
  if model is None:
    rate = float(np.mean(y_train > 0.5))
  else:
    import warnings
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # diffprivlib / sklearn chatter (convergence, bounds)
      model.fit(x_train, y_train.astype(np.int64))
  fit_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  if model is None:
    p = np.full(len(y_test), rate)
  else:
    proba = model.predict_proba(x_test)
    p = proba[:, list(model.classes_).index(1)]
  predict_s = time.perf_counter() - t0
  if args.save_predictions:
    np.save(args.save_predictions, p.astype(np.float64))
  return {"method": args.method, "epsilon": args.epsilon if PRIVATE[args.method] else None,
          "seed": args.seed, "private": PRIVATE[args.method], "settings": settings,
          "train_rows": int(len(y_train)), "test_rows": int(len(y_test)),
          "fit_s": round(fit_s, 3), "predict_s": round(predict_s, 3),
          "metrics": metrics(p, y_test), "versions": versions()}


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("interpret-core", "diffprivlib", "scikit-learn", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--train", required=True)
  p.add_argument("--test", required=True)
  p.add_argument("--label", required=True)
  p.add_argument("--features", required=True, help="comma-separated, in the model's order")
  p.add_argument("--bounds", required=True, help="JSON file or inline JSON (utility.py)")
  p.add_argument("--epsilon", type=float, default=1.0, help="total epsilon (DP methods)")
  p.add_argument("--delta", type=float, default=1e-6, help="DP-EBM's delta")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--method", required=True, choices=METHODS)
  p.add_argument("--jobs", type=int, default=-2, help="DP-EBM's n_jobs (its default -2)")
  p.add_argument("--save-predictions", help="write the test rows' P(label = 1) (.npy)")
  args = p.parse_args(argv)
  print(json.dumps(run(args)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

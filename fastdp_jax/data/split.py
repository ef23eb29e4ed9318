"""Column names of the original system's data and the deterministic train/test split.

The split is a pure function of (seed, row id): every producer (the direct writer, the Spark
job on any number of partitions, the Hadoop-streaming path) puts a row in the same split.
"""

from __future__ import annotations

import numpy as np

# The original system's CaPUMS5full.csv: 12 binary columns with a quoted header.
CAPUMS_COLUMNS = ("sex", "married", "black", "asian", "collegedegree", "employed",
                  "militaryservice", "uscitizen", "disability", "englishability",
                  "blackfemale", "targetted")
# Its 9 features: every column but the label and the two derived ones (`blackfemale` is
# derived; `targetted` is a function of the label and leaks it).
CAPUMS_FEATURES = ("sex", "married", "black", "asian", "collegedegree", "militaryservice",
                   "uscitizen", "disability", "englishability")
CAPUMS_LABEL = "employed"

DEFAULT_SPLIT_SEED = 69
DEFAULT_TEST_FRACTION = 0.2

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser of each uint64 (the split's mixer; also the unit keys' rank)."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return x & _M64


def is_test_row(row_ids: np.ndarray, seed: int = DEFAULT_SPLIT_SEED,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> np.ndarray:
  """Whether each row goes to the test split: a hash of (seed, row id), nothing else.

  Args:
    row_ids: [n] non-negative integers identifying rows (their line number in the input).
    seed: split seed (the original used 69).
    test_fraction: expected fraction of test rows.

  Returns:
    [n] bool.
  """
  row_ids = np.asarray(row_ids, dtype=np.uint64)
  with np.errstate(over="ignore"):
    h = splitmix64(row_ids ^ splitmix64(np.asarray(seed, dtype=np.uint64)))
  u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
  return u < test_fraction

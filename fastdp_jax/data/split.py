"""Column names of the original system's data and the deterministic train/test split.

A row's split is a pure function of (seed, row key), and the row key of its content (its
cleaned values in the spec's columns: :func:`value_keys`) and its occurrence among the identical rows
before it (:func:`occurrences`, :func:`row_keys`). Every producer (the direct writer, the
Spark job on any number of partitions, the Hadoop-streaming path) puts a row in the same
split, and removing, adding or reordering rows moves no other row between splits: a split
keyed by row POSITION would move a third of the rows after a removed line (a new hash each),
so that neighbouring tables would train on sets far apart. A dataset with a privacy unit is
split by unit key instead (:mod:`fastdp_jax.data.units`).
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
  """Whether each row goes to the test split: a hash of (seed, row key), nothing else.

  Args:
    row_ids: [n] uint64 row keys (:func:`row_keys`; a unit's key for a unit dataset). Any
      integers work: the validation rule of a dataset written before rows had keys applies
      it to row numbers.
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


def content_keys(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """A 64-bit hash of each encoded row (its float32 features and label).

  Rows are hashed as the loader holds them (float32), so the key of a row does not depend on
  how a shard stored it (uint8 or float32): rows the model cannot tell apart share a key (the
  tie-break of a unit's rank, :func:`fastdp_jax.data.units.group`).

  Args:
    features: [n, d] numeric.
    labels: [n] numeric.

  Returns:
    [n] uint64.
  """
  x = np.asarray(features, np.float32)
  # An explicit width, not -1: a shard may hold no rows of a split.
  x = x.reshape(len(labels), int(np.prod(x.shape[1:])))
  y = np.asarray(labels, np.float32).reshape(-1, 1)
  # + 0.0 turns -0.0 into 0.0: equal values, equal words.
  return _hash_rows((np.concatenate([x, y], axis=1) + np.float32(0.0)).view(np.uint32))


def value_keys(values: np.ndarray) -> np.ndarray:
  """A 64-bit hash of each cleaned row: its float64 values in the spec's used columns.

  The content a producer splits a row by (:func:`row_keys`). It is taken before encoding, so
  two specs over the same columns (``pums_raw`` and ``pums_binned``) split a table alike, and
  the CSV and Parquet readers (the same cleaned values) agree.

  Args:
    values: [n, k] the cleaned values (``cleaning.CleanResult.values``).

  Returns:
    [n] uint64.
  """
  v = np.ascontiguousarray(np.asarray(values, np.float64) + 0.0)  # -0.0 -> 0.0
  words = v.view(np.uint64).reshape(v.shape[0], int(np.prod(v.shape[1:])))
  lo, hi = words & np.uint64(0xFFFFFFFF), words >> np.uint64(32)
  return _hash_rows(np.stack([lo, hi], axis=2).reshape(v.shape[0], 2 * words.shape[1]))


def _hash_rows(words: np.ndarray) -> np.ndarray:
  """[n] uint64 hash of each row of [n, w] 32-bit words, chained column by column."""
  words = np.asarray(words).astype(np.uint64)
  h = np.full(words.shape[0], np.uint64(words.shape[1]), np.uint64)
  with np.errstate(over="ignore"):
    for j in range(words.shape[1]):
      # Chained per column (not a sum), so that swapping two columns' values changes the key.
      h = splitmix64(h ^ (words[:, j] + (np.uint64(j) << np.uint64(32))))
  return h & _M64


def occurrences(keys: np.ndarray, seen: dict[int, int] | None = None) -> np.ndarray:
  """Each key's occurrence among equal keys: 0 for the first, 1 for the second, ...

  Args:
    keys: [n] uint64 content keys, in the order the rows come.
    seen: how many rows of each key came before these (a key absent: none); updated in place
      to count these rows too, so that consecutive blocks of one input number their rows as
      one array would.

  Returns:
    [n] int64.
  """
  keys = np.asarray(keys, np.uint64)
  n = keys.shape[0]
  if n == 0:
    return np.zeros(0, np.int64)
  order = np.argsort(keys, kind="stable")
  sorted_keys = keys[order]
  starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
  sizes = np.diff(np.r_[starts, n])
  rank = np.arange(n) - np.repeat(starts, sizes)
  if seen is not None:
    uniq = sorted_keys[starts]
    base = np.fromiter((seen.get(int(k), 0) for k in uniq), np.int64, len(uniq))
    for k, b, s in zip(uniq.tolist(), base.tolist(), sizes.tolist()):
      seen[k] = b + s
    rank = rank + np.repeat(base, sizes)
  out = np.empty(n, np.int64)
  out[order] = rank
  return out


def row_keys(content: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
  """The key a row's split is decided by: its content key and its occurrence among identical
  rows, mixed (:func:`is_test_row` takes it).

  Removing or adding a row changes no other row's key but those of rows identical to it,
  and among those only which copy is the last: the multiset of keys of every other content,
  and so the rows of each split, stay as they were. Reordering the input changes nothing.
  """
  with np.errstate(over="ignore"):
    occ = splitmix64(np.asarray(occurrence, np.uint64) + np.uint64(0x5851F42D4C957F2D))
    return splitmix64(np.asarray(content, np.uint64) ^ occ)


def rows_in_test(values: np.ndarray, seed: int = DEFAULT_SPLIT_SEED,
                 test_fraction: float = DEFAULT_TEST_FRACTION) -> np.ndarray:
  """Which rows of a whole table go to the test split.

  The rule every producer applies to a row-level dataset, for a table held in memory.

  Args:
    values: [n, k] the rows' cleaned values in the spec's used columns, in row-id order
      (``cleaning.CleanResult.values``).
    seed: the split seed.
    test_fraction: the expected test fraction.

  Returns:
    [n] bool.
  """
  content = value_keys(values)
  return is_test_row(row_keys(content, occurrences(content)), seed, test_fraction)

"""Privacy units: which rows belong to one person or household, and the rules that key on them.

A feature spec may name a ``privacy_unit`` (one or more raw columns, e.g. ``SERIALNO`` for a
PUMS household) and a public ``max_rows_per_unit`` k. The guarantee then covers adding or
removing one whole unit, which needs three things from the data side, all here and all pure
NumPy so that every producer (the Spark job, the local engine, the Hadoop-streaming mapper)
and the trainer share one implementation:

* a 64-bit **unit key** per row (:func:`unit_keys`), a stable hash of the canonicalised unit
  id, the same on every platform and engine; distinct ids sharing a key are refused
  (:func:`check_no_collision`), since colliding units would share one split and one sampling
  coin;
* a **split by unit** (:func:`is_test_unit`, :func:`is_validation_unit`): a rule of the key
  alone, so each unit lies wholly in one split and adding, removing or reordering other rows
  or units never moves it;
* the **bound** (:func:`group`): at most k rows per unit, chosen by a seeded hash rank of the
  unit's own rows (:func:`row_content_keys`), never by file order, so the kept rows of a unit
  depend on that unit's rows alone.

Canonical ids: each value is stripped of surrounding whitespace and one pair of double quotes
(as the cleaner reads tokens, so a CSV's ``"H1"`` is Parquet's ``H1``); a value that is a decimal
number is written in one canonical form (``"007"``, ``"7"``, ``"7.0"``, ``"7e0"`` and ``" 7 "``
are all ``"7"``; ``"0.50"`` is ``"0.5"``), because the same id column arrives as text from a
CSV, as an inferred double from Spark and as an integer from Parquet. Merging ids that differ
only by zero-padding errs on the safe side: it can only make units larger, and a larger unit
is still covered (the bound k applies to it). Any other value is kept as its stripped text,
case-sensitive. An empty id is refused: rows without a unit cannot be bounded.
"""

from __future__ import annotations

import decimal
import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fastdp_jax import errors
from fastdp_jax.data import split as split_lib

# The seed of the bound's rank (:func:`group`). Public on purpose: the kept rows depend only
# on the unit's own rows, so user-level DP holds whether or not the seed is known; the seeded
# hash only avoids the bias of "first k in file order" (e.g. PUMS SPORDER 1, the householder).
BOUND_SEED = 0x5EED_B0D0
MAX_ROWS_PER_UNIT = 64  # the largest public k a spec may declare (shapes grow with k)

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,4})?")
_MAX_NUMBER_CHARS = 64  # longer digit strings are ids (hashed as text), not numbers
_SEP = "\x1f"  # ASCII unit separator between the columns of a multi-column id


class Grouping(NamedTuple):
  """The rows a unit dataset trains on, each unit's rows together (:func:`group`).

  Attributes:
    order: [m] int64 indices of the kept rows; each unit's rows are contiguous, units in
      ascending key order, a unit's rows in rank order.
    offsets: [U + 1] int64; unit u's rows are ``order[offsets[u]:offsets[u + 1]]``.
    dropped_rows: rows left out by the bound (``n - m``); private, like every count.
  """

  order: np.ndarray
  offsets: np.ndarray
  dropped_rows: int


def canonical_value(value: object) -> str:
  """One unit-id value in canonical form (see the module docstring).

  Args:
    value: a raw cell (text, or a number from a typed reader such as Spark's or Parquet's).

  Returns:
    The stripped text, or the canonical decimal form of a number.
  """
  text = str(value).strip()
  if len(text) >= 2 and text[0] == text[-1] == '"':  # one pair of quotes, as the cleaner's
    text = text[1:-1].strip()                        # tokens (spec_values.normalize_token)
  if len(text) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(text):
    return text
  number = decimal.Decimal(text)
  if number == number.to_integral_value():
    return str(int(number))  # "007", "7.0", "7e0" -> "7"; "-0" -> "0"
  return format(number.normalize(), "f")  # "0.50" -> "0.5"


def canonical_ids(columns: Sequence[Sequence[object]]) -> list[str]:
  """Each row's canonical unit id: its canonical values joined by a separator.

  Args:
    columns: the unit columns, one sequence of n raw values per column (column-major, as a
      reader hands them over).

  Returns:
    n strings.

  Raises:
    PipelineError: if the columns differ in length, or a row's id is empty (names the row).
  """
  if not columns:
    raise errors.PipelineError("a privacy unit needs at least one id column")
  lengths = {len(c) for c in columns}
  if len(lengths) != 1:
    raise errors.PipelineError(f"privacy-unit columns have different lengths {sorted(lengths)}")
  out = []
  for i, values in enumerate(zip(*columns)):
    uid = canonical_id(values)
    if uid is None:
      raise errors.PipelineError(f"row {i}: empty privacy-unit id; every row needs a unit "
                                 "(drop or fill such rows before preprocessing)")
    out.append(uid)
  return out


def canonical_id(cells: Sequence[object], na_tokens: Sequence[str] = ()) -> str | None:
  """One row's canonical unit id from its raw unit cells; None when a cell is missing.

  A cell is missing when it is None, a float NaN (a typed reader's null), empty after
  stripping, or one of ``na_tokens``: such a row has no unit, and producers reject it (a
  partial id could merge it into another unit or leave it unbounded).

  Args:
    cells: the row's values of the unit columns, in the spec's order.
    na_tokens: the spec's texts that mean "missing".

  Returns:
    The canonical values joined by a separator, or None.
  """
  parts = []
  for cell in cells:
    if cell is None or (isinstance(cell, float) and cell != cell):
      return None
    text = canonical_value(cell)
    if not text or text in na_tokens or str(cell).strip() in na_tokens:
      return None
    parts.append(text)
  return _SEP.join(parts)


def _hash64(text: str) -> int:
  # blake2b-8: standard-library, the same bytes on every platform and engine (unlike Python's
  # salted hash() or Spark's hash()), and well mixed for the split and the rank.
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def keys_of_ids(ids: Sequence[str]) -> np.ndarray:
  """The 64-bit key of each canonical id (:func:`canonical_ids`).

  Returns:
    [n] uint64.
  """
  return np.fromiter((_hash64(s) for s in ids), dtype=np.uint64, count=len(ids))


def unit_keys(columns: Sequence[Sequence[object]]) -> np.ndarray:
  """The 64-bit key of each row's canonicalised unit id (blake2b-8 of the canonical id).

  Args:
    columns: the unit columns, one sequence of n raw values per column.

  Returns:
    [n] uint64.

  Raises:
    PipelineError: as :func:`canonical_ids`.
  """
  return keys_of_ids(canonical_ids(columns))


def check_no_collision(ids: Sequence[str], keys: np.ndarray,
                       seen: dict[int, str] | None = None) -> None:
  """Refuses distinct unit ids that share a key.

  Colliding units would share one split and one sampling coin, which breaks the independence
  the Poisson analysis assumes; at 64 bits it takes about 10^9 units to make one likely.

  Args:
    ids: [n] canonical ids (:func:`canonical_ids`), one per row (repeats are fine).
    keys: [n] their keys.
    seen: key -> id of the rows checked before (updated), to check a stream block by block.

  Raises:
    PipelineError: naming the two ids (the message goes to the producer's operator, the data
      owner, who needs them to rename one; it is written to no output).
  """
  keys = np.asarray(keys, np.uint64)
  if len(ids) != keys.shape[0]:
    raise ValueError(f"{len(ids)} ids but {keys.shape[0]} keys")
  seen = {} if seen is None else seen
  for key, uid in zip(keys.tolist(), ids):
    other = seen.setdefault(key, uid)
    if other != uid:
      raise errors.PipelineError(
          f"privacy-unit ids {other!r} and {uid!r} share the 64-bit key {key:#018x}; rename "
          "one of them (or add a column to privacy_unit) and run again")


def is_test_unit(keys: np.ndarray, seed: int = split_lib.DEFAULT_SPLIT_SEED,
                 test_fraction: float = split_lib.DEFAULT_TEST_FRACTION) -> np.ndarray:
  """Whether each row's unit goes to the test split: a hash of (seed, unit key), nothing else.

  The row-level rule (:func:`fastdp_jax.data.split.is_test_row`) applied to the unit key
  instead of the row id: every row of a unit gets the same answer, and no other row or unit
  can change it.

  Args:
    keys: [n] uint64 unit keys.
    seed: split seed.
    test_fraction: expected fraction of test UNITS.

  Returns:
    [n] bool.
  """
  return split_lib.is_test_row(np.asarray(keys, np.uint64), seed=seed,
                               test_fraction=test_fraction)


def is_validation_unit(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Which training rows are validation rows in a unit dataset: by unit, like the test split.

  The trainer's hook (its ``data.validation_fraction`` with its validation seed): the same
  rule as :func:`is_test_unit`, so that no unit has rows in both training and validation.

  Args:
    keys: [n] uint64 unit keys of the training rows.
    fraction: expected fraction of validation units (0: none).
    seed: the validation seed (the trainer's, distinct from the test split's).

  Returns:
    [n] bool.
  """
  if not fraction:
    return np.zeros(np.shape(keys)[0], bool)
  return is_test_unit(keys, seed=seed, test_fraction=float(fraction))


def key_and_split(ids: Sequence[str], seed: int = split_lib.DEFAULT_SPLIT_SEED,
                  test_fraction: float = split_lib.DEFAULT_TEST_FRACTION,
                  seen: dict[int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """What a producer does with its rows' canonical ids: key, check, split.

  Args:
    ids: [n] canonical unit ids (a cleaner's ``CleanResult.units``).
    seed: the split seed.
    test_fraction: expected fraction of test units.
    seen: as :func:`check_no_collision` (a producer that writes block by block).

  Returns:
    ``(keys [n] uint64, test [n] bool)``.

  Raises:
    PipelineError: two distinct ids share a key.
  """
  keys = keys_of_ids(ids)
  check_no_collision(ids, keys, seen)
  return keys, is_test_unit(keys, seed=seed, test_fraction=test_fraction)


# A row's content key (its encoded float32 features and label): the rank's tie-break within a
# unit, the same key the row-level split uses.
row_content_keys = split_lib.content_keys


def _rank(unit_keys_: np.ndarray, row_keys: np.ndarray, seed: int) -> np.ndarray:
  with np.errstate(over="ignore"):
    mix = split_lib.splitmix64
    return mix(mix(unit_keys_ ^ mix(np.asarray(seed, np.uint64))) ^ row_keys)


def group(unit_keys: np.ndarray, row_keys: np.ndarray, max_rows_per_unit: int,
          seed: int = BOUND_SEED) -> Grouping:
  """Groups rows by unit and keeps at most k rows of each, by a seeded rank of their content.

  Within a unit the rows are ordered by ``hash(seed, unit key, row key)`` and the first k are
  kept. The choice is a function of the unit's own rows (as a multiset) and the public seed:
  never of file order, nor of any other unit. Identical rows share a rank; they are
  interchangeable, so which of them is kept does not matter.

  Args:
    unit_keys: [n] uint64 unit keys.
    row_keys: [n] uint64 row content keys (:func:`row_content_keys`).
    max_rows_per_unit: the public bound k (>= 1).
    seed: the rank's seed (:data:`BOUND_SEED`).

  Returns:
    A :class:`Grouping`.
  """
  if not 1 <= int(max_rows_per_unit):
    raise ValueError(f"max_rows_per_unit={max_rows_per_unit} must be >= 1")
  units = np.asarray(unit_keys, np.uint64)
  rows = np.asarray(row_keys, np.uint64)
  if units.shape != rows.shape or units.ndim != 1:
    raise ValueError(f"unit keys {units.shape} and row keys {rows.shape} must be [n] each")
  n = units.shape[0]
  rank = _rank(units, rows, seed)
  # Sorted by unit, then rank, then row key: a total order on content (the index is only the
  # last tie-break, between rows whose rank and content key are equal, i.e. identical rows).
  perm = np.lexsort((rows, rank, units)).astype(np.int64)
  sorted_units = units[perm]
  starts = np.flatnonzero(np.r_[True, sorted_units[1:] != sorted_units[:-1]]) if n else \
      np.zeros(0, np.int64)
  sizes = np.diff(np.r_[starts, n])
  position = np.arange(n) - np.repeat(starts, sizes)
  keep = position < int(max_rows_per_unit)
  order = perm[keep]
  kept = np.minimum(sizes, int(max_rows_per_unit))
  offsets = np.r_[0, np.cumsum(kept)].astype(np.int64)
  return Grouping(order=order, offsets=offsets, dropped_rows=int(n - order.shape[0]))


def bound_counts(unit_keys: np.ndarray, max_rows_per_unit: int) -> dict[str, int]:
  """What the bound k does to a split: its units, rows, and the rows it drops.

  The trainer keeps ``min(rows, k)`` rows of each unit (:func:`group`), so the counts need the
  unit keys alone. They are statistics of private rows: the manifest (private) records them.

  Returns:
    ``{'units', 'rows', 'rows_dropped_by_bound'}``.
  """
  _, counts = np.unique(np.asarray(unit_keys, np.uint64), return_counts=True)
  k = int(max_rows_per_unit)
  return {"units": int(counts.shape[0]), "rows": int(counts.sum()),
          "rows_dropped_by_bound": int(np.maximum(counts - k, 0).sum())}


def check_unit_bound(max_rows_per_unit: object, where: str) -> int:
  """A declared k: an integer in ``[1, MAX_ROWS_PER_UNIT]``.

  Raises:
    UserError: naming ``where``.
  """
  if (isinstance(max_rows_per_unit, bool)
      or not isinstance(max_rows_per_unit, (int, np.integer))
      or not 1 <= max_rows_per_unit <= MAX_ROWS_PER_UNIT):
    raise errors.UserError(f"{where}: max_rows_per_unit={max_rows_per_unit!r} must be an "
                           f"integer in [1, {MAX_ROWS_PER_UNIT}], fixed from public knowledge "
                           "(e.g. published household sizes), never from the data")
  return int(max_rows_per_unit)


def normalize_unit(privacy_unit: object, max_rows_per_unit: object,
                   where: str) -> tuple[tuple[str, ...] | None, int | None]:
  """A declared ``(privacy_unit, max_rows_per_unit)`` in typed form; both None when unset.

  A str names one column; a sequence names several. k is required with a unit and refused
  without one.

  Raises:
    UserError: naming ``where`` and what to declare.
  """
  if privacy_unit is None or privacy_unit == () or privacy_unit == []:
    if max_rows_per_unit is not None:
      raise errors.UserError(f"{where}: max_rows_per_unit is set but privacy_unit is not; "
                             "name the unit's id column(s) or remove max_rows_per_unit")
    return None, None
  cols = (privacy_unit,) if isinstance(privacy_unit, str) else privacy_unit
  if (not isinstance(cols, (tuple, list)) or not all(isinstance(c, str) and c for c in cols)
      or len(set(cols)) != len(cols)):
    raise errors.UserError(f"{where}: privacy_unit={privacy_unit!r} must be a column name or "
                           "a list of distinct column names")
  if max_rows_per_unit is None:
    raise errors.UserError(f"{where}: the unit {list(cols)} needs max_rows_per_unit, the "
                           "public bound k on rows kept per unit (e.g. 8 for households)")
  return tuple(cols), check_unit_bound(max_rows_per_unit, where)


def unit_column_indices(privacy_unit: Sequence[str], header: Sequence[str]) -> tuple[int, ...]:
  """Positions of the unit's id columns in an input header (found by name, any order).

  Producers call it before reading any row, so that a spec naming a column the input lacks
  fails at once.

  Raises:
    PipelineError: naming the missing or repeated column(s).
  """
  header = list(header)
  missing = [c for c in privacy_unit if c not in header]
  if missing:
    raise errors.PipelineError(f"privacy_unit column(s) {missing} are not in the input's "
                               f"header ({len(header)} columns); name the unit's id "
                               "column(s) as the header spells them")
  dupes = [c for c in privacy_unit if header.count(c) > 1]
  if dupes:
    raise errors.PipelineError(f"the input's header names the privacy_unit column(s) {dupes} "
                               "more than once")
  return tuple(header.index(c) for c in privacy_unit)


def unit_weights(units: np.ndarray) -> np.ndarray:
  """[n] float64: each row's weight, 1 / the number of these rows in its unit (``units`` [n]
  each row's unit, any labels). A sum of per-row values in [0, S] weighted so is the sum over
  units of each unit's mean, which one whole unit moves by at most S whatever its rows."""
  _, inverse, counts = np.unique(np.asarray(units), return_inverse=True, return_counts=True)
  return 1.0 / counts[inverse.ravel()]

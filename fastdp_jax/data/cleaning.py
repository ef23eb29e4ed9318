"""The cleaning rules, shared by every producer: all keep, drop and reject the same rows.

The Spark job (per partition), the Hadoop-streaming mapper (per block of stdin lines) and the
direct writer of the generator call the functions here and nothing else to decide the fate of
a row. Each row ends in exactly one of three outcomes:

* **kept**: every used column holds a valid value; the row becomes a training/test example;
* **dropped for NA**: well formed, but a used column is missing (a token from the spec's
  ``na_tokens``, ``NA`` and the empty cell by default); counted per column;
* **rejected** (malformed), with a reason code and a detail naming the column and token:

  ===================  =======================================================================
  ``blank_line``       the line is empty or whitespace only
  ``repeated_header``  the header line again after the first line of a file
  ``wrong_arity``      not as many comma-separated fields as the header
  ``non_numeric``      a used number column's token is not a number (``abc``, ``nan``, ...)
  ``out_of_domain``    a number outside the column's domain (binary not 0/1, a category not in
                       the public list, a numeric value outside its hard ``domain``, an
                       embedding code outside its vocabulary unless ``unknown='extra_id'``, a
                       multiclass label code in no class)
  ``out_of_bounds``    a regression label outside its public bounds, when the spec says
                       ``out_of_bounds='reject'`` (with ``'clip'`` it is clipped and counted)
  ``missing_unit``     a spec naming a ``privacy_unit``: the row's unit id is missing (an NA
                       token, empty); its unit columns need not be used columns
  ===================  =======================================================================

Structural problems are checked first (blank, header, arity), then the tokens from left to
right (``non_numeric``), then the values from left to right (``out_of_domain``, then a
regression label's ``out_of_bounds``); a row with a malformed token and an ``NA`` is rejected,
not dropped. Columns the spec does not use are neither parsed nor checked; columns are found by
name, in any order.

A predictor cleans raw rows with the same functions, without the label (``with_label=False``).

A string column (``categories=("northeast", "south")``, ``values=("no", "yes")``, a label's
``positive="yes"``; :mod:`fastdp_jax.data.spec_values`) matches its cells exactly after
:func:`normalize_token`; a string it does not list is ``out_of_domain`` like an unlisted number
(an embedding with ``unknown='extra_id'`` gives it the extra id), never ``non_numeric``.

Tokens may carry surrounding spaces and one pair of double quotes (``"1"``); numbers are
decimal literals (``1``, ``-3.5``, ``1e3``), never ``nan``, ``inf``, ``1_000`` or hex.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax.data import features as features_lib
from fastdp_jax.data import spec_values
from fastdp_jax.data import units as units_lib

# Every spec can meet these (the generator's malformed lines cover them all) ...
REASONS = ("blank_line", "repeated_header", "wrong_arity", "non_numeric", "out_of_domain")
# ... and a regression label declared with out_of_bounds='reject' adds this one.
LABEL_REASONS = ("out_of_bounds",)
# ... and a spec naming a privacy_unit this one (a row without its unit id).
UNIT_REASONS = ("missing_unit",)
_NAN = float("nan")
_MAX_TOKEN_TEXT = 40
_LUT_LIMIT = 1 << 16
_LINE_CACHE_LIMIT = 1 << 16
# Lines longer than this are not cached: the cache is for short repeated lines, and 65536
# long ones (a wide ignored column) would hold gigabytes.
_LINE_CACHE_MAX_CHARS = 4096
# The longest header either path accepts (bytes of UTF-8): the Spark job reads a local file's
# first line up to this length, and a header longer than this is refused alike by both paths.
MAX_HEADER_BYTES = 1 << 20


# The number grammar and the token rule (defined with the spec checks, which need them too):
# a string category matches a cell exactly after normalize_token.
parse_number = spec_values.parse_number
normalize_token = spec_values.normalize_token


def open_csv(path: str) -> Any:
  """A CSV file as text lines: plain, ``.gz`` or ``.bz2`` by its name; UTF-8 with undecodable
  bytes as U+FFFD; ``\\n``, ``\\r\\n`` and ``\\r`` end a line."""
  opener: Any = {".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(path)[1], open)
  return opener(path, "rt", encoding="utf-8", errors="replace", newline=None)


def parse_header(line: str) -> tuple[str, ...]:
  """Column names of a header line (quoted or not; a UTF-8 byte-order mark is ignored).

  Raises:
    SpecError: the line is longer than :data:`MAX_HEADER_BYTES` (the same limit, and the
      same message, in the Spark job and the streaming path).
  """
  if len(line) > MAX_HEADER_BYTES // 4 and len(line.encode("utf-8")) > MAX_HEADER_BYTES:
    raise features_lib.SpecError(f"it is longer than {MAX_HEADER_BYTES} bytes (1 MiB), the "
                                 "longest header accepted; is it a header at all?")
  return tuple(normalize_token(t) for t in line.lstrip("\ufeff").split(","))


def _show(token: str) -> str:
  return repr(token if len(token) <= _MAX_TOKEN_TEXT else token[:_MAX_TOKEN_TEXT] + "...")


class _NumericLUT(dict):
  """token -> value cache for a numeric column; a miss parses, an invalid token raises KeyError."""

  def __missing__(self, token: str) -> float:
    v = parse_number(token)
    if v is None:
      raise KeyError(token)
    if len(self) < _LUT_LIMIT:
      self[token] = v
    return v


@dataclasses.dataclass(frozen=True)
class CleanResult:
  """The outcome of cleaning a block of rows.

  Attributes:
    kept: [m] int64 indices (into the block) of kept rows, increasing.
    values: [m, k] float64 validated values of the used columns of the kept rows (features
      then label).
    dropped_na: [a] int64 indices of rows dropped for a missing value.
    na_cells: [a, k] bool, which used columns are missing in each dropped row.
    rejects: ``(index, reason, detail)`` for each malformed row, by index.
    reject_columns: index -> the column that rejected the row (absent for structural
      reasons: blank line, header, arity).
    units: the canonical privacy-unit id of each kept row (:mod:`fastdp_jax.data.units`), in
      ``kept`` order, when the spec names a ``privacy_unit``; None otherwise. The producer
      keys and splits by it (the raw id goes no further).
  """

  kept: np.ndarray
  values: np.ndarray
  dropped_na: np.ndarray
  na_cells: np.ndarray
  rejects: list[tuple[int, str, str]]
  reject_columns: dict[int, str] = dataclasses.field(default_factory=dict)
  units: list[str] | None = None

  @property
  def na_by_column(self) -> np.ndarray:
    """[k] int64: for the dropped rows, how many had each used column missing."""
    return self.na_cells.sum(axis=0).astype(np.int64)


def classify_values(spec: features_lib.FeatureSpec, values: np.ndarray, index: np.ndarray,
                    rejects: list[tuple[int, str, str]],
                    reject_columns: Mapping[int, str] | None = None,
                    with_label: bool = True) -> CleanResult:
  """Stage 2: checks parsed values against the columns' domains, then looks for NA.

  Args:
    spec: the feature spec.
    values: [m, k] float64 values of the used columns, NaN for a missing cell.
    index: [m] the rows' indices in the block.
    rejects: rows already rejected by stage 1 (tokens); extended and sorted here.
    reject_columns: the column of each stage-1 reject that has one.
    with_label: the values end with the label (producers); a predictor's do not.

  Returns:
    The block's :class:`CleanResult`.
  """
  cols = spec.input_specs(with_label)
  values = np.asarray(values, np.float64).reshape(len(index), len(cols))
  index = np.asarray(index, np.int64)
  present = ~np.isnan(values)
  bad = np.zeros(len(index), bool)
  rejects = list(rejects)
  where = dict(reject_columns or {})

  def reject(rows: np.ndarray, reason: str, col: features_lib.ColumnSpec, what: str) -> None:
    bad[rows] = True
    for r in rows.tolist():
      rejects.append((int(index[r]), reason, f"column {col.name!r}: "
                      f"{col.show(values[r, j])} is not {what}"))
      where[int(index[r])] = col.name

  for j, col in enumerate(cols):
    viol = np.flatnonzero(present[:, j] & ~col.accepts(values[:, j]) & ~bad)
    if viol.size:
      reject(viol, "out_of_domain", col, col.domain_text())
  target = spec.target
  if with_label and target.kind == "regression" and target.out_of_bounds == "reject":
    j = len(cols) - 1
    viol = np.flatnonzero(present[:, j] & target.outside_bounds(values[:, j]) & ~bad)
    if viol.size:
      lo, hi = (features_lib.format_number(b) for b in target.bounds or ())
      reject(viol, "out_of_bounds", cols[j], f"inside the label's bounds [{lo}, {hi}]")
  na_rows = ~bad & ~present.all(axis=1)
  keep = ~bad & ~na_rows
  rejects.sort(key=lambda r: r[0])
  return CleanResult(kept=index[keep], values=values[keep], dropped_na=index[na_rows],
                     na_cells=~present[na_rows], rejects=rejects, reject_columns=where)


def attach_units(spec: features_lib.FeatureSpec, result: CleanResult,
                 cells: Callable[[int], Sequence[object]]) -> CleanResult:
  """Adds the canonical unit id of each kept row; a kept row without one is rejected.

  A row whose unit id is missing (:func:`fastdp_jax.data.units.canonical_id`) is rejected
  (``missing_unit``), not dropped for NA: its unit columns need not be used columns, and it
  can be bounded in no unit.

  Args:
    spec: the feature spec (names ``privacy_unit``; without one, ``result`` is returned).
    result: the block's cleaning outcome.
    cells: block index -> that row's raw cells of the unit columns.
  """
  if not spec.privacy_unit:
    return result
  ids = [units_lib.canonical_id(cells(i), spec.na_tokens) for i in result.kept.tolist()]
  missing = [j for j, u in enumerate(ids) if u is None]
  if not missing:
    return dataclasses.replace(result, units=ids)
  ok = np.ones(len(ids), bool)
  ok[missing] = False
  col = spec.privacy_unit[0] if len(spec.privacy_unit) == 1 else list(spec.privacy_unit)
  rejects = result.rejects + [(int(result.kept[j]), "missing_unit",
                               f"privacy_unit {col!r}: the unit id is missing")
                              for j in missing]
  rejects.sort(key=lambda r: r[0])
  return dataclasses.replace(result, kept=result.kept[ok], values=result.values[ok],
                             rejects=rejects, units=[u for u in ids if u is not None])


class LineCleaner:
  """Cleans CSV lines (without their line terminator) against a header and a spec.

  Example::

    cleaner = LineCleaner(spec, parse_header(first_line))
    result = cleaner.clean(lines)          # a CleanResult; indices are positions in `lines`
    x, y = spec.encode(result.values)
  """

  def __init__(self, spec: features_lib.FeatureSpec, header: Sequence[str],
               with_label: bool = True):
    self.spec = spec
    self.header = tuple(header)
    self.with_label = with_label
    self.indices = spec.column_indices(self.header, with_label)
    # A producer finds the unit's id columns up front: a header without them fails at once.
    self.unit_indices = (units_lib.unit_column_indices(spec.privacy_unit, self.header)
                         if with_label and spec.privacy_unit else ())
    self.columns = spec.input_specs(with_label)
    self.num_fields = len(self.header)
    self._na = frozenset(spec.na_tokens)
    self._getters = []
    for idx, col in zip(self.indices, self.columns):
      lut: dict[str, float]
      if col.tokens:  # a string column: never raises (an unlisted string has its value)
        lut = spec_values.TokenMap(col.tokens, col.other, spec.na_tokens)
      elif col.kind in ("numeric", "embedding"):
        lut = _NumericLUT()
      else:
        valid = (0.0, 1.0) if col.kind == "binary" else col.categories
        lut = {features_lib.format_number(v): float(v) for v in valid}
      for t in spec.na_tokens:
        lut[t] = _NAN
      self._getters.append((idx, lut.__getitem__))
    # Binary data has few distinct lines (CaPUMS: a few thousand), so whole lines repeat.
    self._line_cache: dict[str, tuple[float, ...]] = {}

  def is_header(self, line: str) -> bool:
    """Whether a data line repeats the header (a bad row, ``repeated_header``).

    A line over :data:`MAX_HEADER_BYTES` cannot be the header (the first line would have been
    refused): it is a data line, and whatever is wrong with it makes it one bad row, never
    the refusal of the whole input that :func:`parse_header` gives a first line that long.
    """
    if len(line) > MAX_HEADER_BYTES // 4 and len(line.encode("utf-8")) > MAX_HEADER_BYTES:
      return False
    return parse_header(line) == self.header

  def _tokens(self, line: str, parts: list[str]) -> list[float] | tuple[str, str, str]:
    """Stage 1, careful path: the used columns' values, or ``(reason, detail, column)``."""
    if not line.strip():
      return ("blank_line", "empty line", "")
    if len(parts) != self.num_fields:
      return ("wrong_arity", f"{len(parts)} fields, expected {self.num_fields}", "")
    if self.is_header(line):
      return ("repeated_header", "the header line again", "")
    out = []
    for (idx, lookup), col in zip(self._getters, self.columns):
      token = normalize_token(parts[idx])
      if token in self._na:
        out.append(_NAN)
        continue
      v = lookup(token) if col.tokens else parse_number(token)
      if v is None:
        return ("non_numeric", f"column {col.name!r}: {_show(parts[idx])} is not a number",
                col.name)
      out.append(v)
    return out

  def clean(self, lines: Sequence[str]) -> CleanResult:
    """Cleans a block of lines; see the module docstring for the rules."""
    k = len(self.indices)
    getters = self._getters
    nf = self.num_fields
    cache = self._line_cache
    flat: list[float] = []
    ok: list[int] = []
    rejects: list[tuple[int, str, str]] = []
    where: dict[int, str] = {}
    for i, line in enumerate(lines):
      hit = cache.get(line)
      if hit is not None:  # tokens are a pure function of the line: reuse them
        flat.extend(hit)
        ok.append(i)
        continue
      parts = line.split(",")
      if len(parts) == nf:
        try:
          vals = tuple([g(parts[j]) for j, g in getters])
          flat.extend(vals)
          ok.append(i)
          if len(cache) < _LINE_CACHE_LIMIT and len(line) <= _LINE_CACHE_MAX_CHARS:
            cache[line] = vals
          continue
        except KeyError:
          pass
      r = self._tokens(line, parts)
      if isinstance(r, tuple):
        rejects.append((i, r[0], r[1]))
        if r[2]:
          where[i] = r[2]
      else:
        flat.extend(r)
        ok.append(i)
    values = np.array(flat, np.float64).reshape(len(ok), k)
    result = classify_values(self.spec, values, np.array(ok, np.int64), rejects, where,
                             self.with_label)
    if not self.unit_indices:
      return result
    ui = self.unit_indices
    return attach_units(self.spec, result, lambda i: [lines[i].split(",")[j] for j in ui])


def clean_columns(spec: features_lib.FeatureSpec, columns: Mapping[str, Sequence | np.ndarray],
                  with_label: bool = True) -> CleanResult:
  """Cleans rows given column-wise (Parquet batches, the generator's arrays, a predictor's rows).

  Numeric arrays are taken as they are (NaN and None mean missing); object arrays hold
  tokens (str) or numbers and go through the same token rules as CSV cells (a bool or any
  other type is ``non_numeric``).

  Args:
    spec: the feature spec.
    columns: at least the used columns, each [n]; others are ignored.
    with_label: read the label too (producers); a predictor reads the features only.

  Returns:
    The :class:`CleanResult`, indices being row positions.
  """
  names = [c.name for c in spec.input_specs(with_label)]
  missing = [c for c in names if c not in columns]
  if missing:
    raise features_lib.SpecError(f"columns {missing} that spec {spec.name!r} uses are absent "
                                 f"(have {sorted(columns)})")
  n = len(columns[names[0]])
  values = np.empty((n, len(names)), np.float64)
  bad: dict[int, tuple[str, str, str]] = {}
  for j, name in enumerate(names):
    if len(columns[name]) != n:
      raise features_lib.SpecError(f"column {name!r} has {len(columns[name])} values, column "
                                   f"{names[0]!r} {n}")
    col = spec.input_specs(with_label)[j]
    if col.tokens:
      values[:, j] = _text_values(columns[name], spec_values.TokenMap(
          col.tokens, col.other, spec.na_tokens))
    else:
      values[:, j] = _column_values(name, columns[name], frozenset(spec.na_tokens), bad)
  rejects = sorted((i, r, d) for i, (r, d, _) in bad.items())
  good = np.setdiff1d(np.arange(n), np.array(sorted(bad), np.int64))
  result = classify_values(spec, values[good], good, rejects,
                           {i: c for i, (_, _, c) in bad.items()}, with_label)
  if not (with_label and spec.privacy_unit):
    return result
  absent = [c for c in spec.privacy_unit if c not in columns]
  if absent:
    raise features_lib.SpecError(f"privacy_unit column(s) {absent} of spec {spec.name!r} are "
                                 f"absent (have {sorted(columns)})")
  unit_cols = [columns[c] for c in spec.privacy_unit]
  return attach_units(spec, result, lambda i: [c[i] for c in unit_cols])


def _text_values(col: Sequence | np.ndarray, tokens: spec_values.TokenMap) -> np.ndarray:
  """A string column's cells -> [n] float64 values (NaN = missing).

  Text cells go through the token rule; a number cell (a numeric Parquet or DataFrame
  column) is matched by its shortest text (``3`` for 3.0), None and NaN are missing.
  """
  values = np.empty(len(col), np.float64)
  for i, cell in enumerate(np.asarray(col, dtype=object).tolist()):
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
      values[i] = _NAN
    elif isinstance(cell, (int, float)) and not isinstance(cell, bool):
      values[i] = tokens.value(features_lib.format_number(cell))
    else:
      values[i] = tokens[str(cell)]
  return values


def _column_values(name: str, col: Sequence | np.ndarray, na: frozenset[str],
                   bad: dict[int, tuple[str, str, str]]) -> np.ndarray:
  """One column's cells -> [n] float64 (NaN = missing); malformed cells go into ``bad``."""
  arr = np.asarray(col)
  if arr.dtype.kind in "biuf":
    values = arr.astype(np.float64)
    for i in np.flatnonzero(np.isinf(values)).tolist():
      bad.setdefault(i, ("non_numeric", f"column {name!r}: {values[i]!r} is not a finite "
                                        "number", name))
    return values
  values = np.empty(len(arr), np.float64)
  for i, cell in enumerate(arr.tolist()):
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
      values[i] = _NAN
    elif isinstance(cell, (int, float)) and not isinstance(cell, bool):
      values[i] = float(cell)
      if math.isinf(values[i]):
        bad.setdefault(i, ("non_numeric", f"column {name!r}: {cell!r} is not a finite number",
                           name))
    elif isinstance(cell, bool):  # True is an int to Python, not a number to a spec
      bad.setdefault(i, ("non_numeric", f"column {name!r}: {cell!r} (a bool) is not a number",
                         name))
      values[i] = _NAN
    else:  # text, or a type whose text is a number (a Parquet decimal)
      token = normalize_token(str(cell))
      v = _NAN if token in na else parse_number(token)
      if v is None:
        bad.setdefault(i, ("non_numeric", f"column {name!r}: {_show(str(cell))} is not a "
                                          "number", name))
        v = _NAN
      values[i] = v
  return values

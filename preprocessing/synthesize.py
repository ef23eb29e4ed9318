"""Realistic synthetic census data: the raw PUMS person schema and the original CaPUMS export.

The original system's ``CaPUMS5full.csv`` (California, 1.22 M rows) is not obtainable any
more. This generator draws people from a chain of conditional models, each a logistic (or
log-normal) link on the variables before it::

  age -> sex -> black, asian, latino -> uscitizen -> englishability -> educ -> married
      -> divorced, children, militaryservice, disability -> employed -> income -> puma

The coefficients were fitted once, offline, to the real Fulton County file
(``../shared/data/FultonPUMS5full.csv``, public-use census microdata); the generator never
reads that file. What it reproduces (measured by ``tests/preprocessing/test_synthesize.py`` and in
``docs/data_pipeline.md``): the README's means, and the accuracy of logistic regression for
``employed`` on the 9 binary CaPUMS features (0.667 on the real file) and on the raw features
(0.826).

Two schemas:

* ``raw``: ``state, puma, sex, age, educ, income, latino, black, asian, married, divorced,
  uscitizen, children, disability, militaryservice, employed, englishability, fips``
  (integers, as in the Fulton file: state 13, fips 13121, ages 18..93 with 93 the top code).
* ``capums``: the 12 binary columns of ``CaPUMS5full.csv`` with a quoted header:
  ``collegedegree = educ >= 13``, ``blackfemale = black and sex`` (sex 1 = female, as in the
  raw file), ``targetted = employed`` (a deterministic function of the label, as in the
  original), and a configurable fraction of ``NA`` cells.

The output is a deterministic function of ``(rows, seed, na_fraction)``; rows are drawn in
blocks of 2**18 with one RNG stream per block, so the first N rows are the same for every
larger size.

Usage::

  python -m preprocessing.synthesize --rows 1223992 --schema capums --seed 0 \
      --output data/generated/CaPUMS5full.csv
  python -m preprocessing.synthesize --rows 100000 --schema raw --output raw.csv
  python -m preprocessing.synthesize --rows 100000 --output-shards data/capums  # no Spark
  python -m preprocessing.synthesize --rows 200000 --malformed 500 --output bad.csv
  python -m preprocessing.synthesize --households 50000 --output households.csv

Households (``--households``, :func:`synthesize_households`): the raw schema's persons grouped
into households of the published US size distribution, with ``SERIALNO``, ``SPORDER``, ``NP``
and ``HINCP`` (:mod:`preprocessing.households`), for the spec ``pums_households``. Without
``--households`` every output is as before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping

import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib
from fastdp_jax.data import units as units_lib
from preprocessing import households as households_lib

RAW_COLUMNS = ("state", "puma", "sex", "age", "educ", "income", "latino", "black", "asian",
               "married", "divorced", "uscitizen", "children", "disability", "militaryservice",
               "employed", "englishability", "fips")
CAPUMS_COLUMNS = split_lib.CAPUMS_COLUMNS
SCHEMAS = ("capums", "raw")
DEFAULT_NA_FRACTION = {"capums": 0.001, "raw": 0.0}
BLOCK_ROWS = 1 << 18

# --- The conditional models (fitted offline to the Fulton file; see the module docstring). ---
# Age: probability of each bracket [18,20), [20,25), ..., [85,90), [90,94); uniform inside a
# bracket; 90 and over are top-coded to 93 as in the census file.
_AGE_EDGES = (18, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 94)
_AGE_PROBS = (0.0414, 0.1006, 0.1211, 0.1152, 0.1152, 0.1035, 0.0966, 0.0834, 0.0598, 0.0417,
              0.0309, 0.0298, 0.0261, 0.0184, 0.0104, 0.0057)
_AGE_TOP_CODE = 93
# Logistic models: logit P(column = 1) = intercept + sum(coef * term). Terms: a1..a3 are powers
# of (age - 45) / 15, r60 = max(age - 60, 0) / 10, r25 = max(25 - age, 0) / 5,
# educ_s = (educ - 10) / 3, college = educ >= 13, hsgrad = educ >= 9, and products (x_y).
_LOGIT = {
    "sex": {"intercept": 0.049, "a1": 0.047, "a2": 0.048, "a3": 0.006, "r60": 0.069,
            "r25": -0.076},
    "black": {"intercept": -0.533, "a1": 0.164, "a2": 0.071, "a3": -0.027, "r60": -0.291,
              "r25": 0.43, "sex": 0.329},
    "asian": {"intercept": -2.979, "a1": -0.327, "a2": -0.026, "a3": -0.02, "r60": 0.08,
              "sex": -0.068, "black": -2.174},
    "latino": {"intercept": -2.735, "a1": -0.84, "a2": 0.135, "a3": 0.007, "r60": 0.03,
               "r25": -0.25, "sex": -0.379, "black": -2.114, "asian": -1.008},
    "uscitizen": {"intercept": 3.045, "a1": 0.507, "a2": 0.077, "a3": -0.03, "r60": 0.074,
                  "r25": 0.399, "black": 0.79, "asian": -2.457, "latino": -3.198},
    "englishability": {"intercept": 2.108, "a1": -0.046, "a2": -0.067, "a3": 0.021,
                       "r60": -0.09, "r25": -0.138, "uscitizen": 2.482, "latino": -2.301,
                       "asian": -0.904, "black": 0.567},
    "married": {"intercept": 1.156, "a1": 0.484, "a2": -0.505, "a3": 0.018, "r60": 0.35,
                "r25": 0.514, "sex": -0.213, "black": -0.878, "asian": 0.429, "latino": 0.354,
                "uscitizen": -0.487, "educ_s": 0.178, "college": 0.182},
    # Among the not married (married and divorced exclude each other).
    "divorced": {"intercept": -0.331, "a1": 0.993, "a2": -0.793, "a3": 0.136, "r60": -0.603,
                 "r25": 0.128, "sex": 0.273, "black": -0.296, "educ_s": 0.179},
    "children": {"intercept": -4.9, "a1": -1.992, "a2": -1.729, "a3": 0.025, "r60": 0.015,
                 "r25": 0.247, "sex": 3.629, "married": -0.008, "black": 0.674,
                 "latino": -0.032, "educ_s": -0.204, "sex_married": 1.515},
    "militaryservice": {"intercept": -2.481, "a1": 0.985, "a2": 0.04, "a3": -0.094,
                        "r60": 0.114, "r25": -0.473, "sex": -2.196, "black": 0.418,
                        "educ_s": 0.19, "uscitizen": 1.104},
    "disability": {"intercept": -0.922, "a1": 0.323, "a2": 0.053, "a3": 0.096, "r60": -0.435,
                   "r25": -0.143, "sex": -0.161, "black": 0.52, "educ_s": -0.413,
                   "college": -0.274, "uscitizen": -0.155, "englishability": -0.137,
                   "married": -0.465},
    "employed": {"intercept": 1.507, "a1": -0.611, "a2": -0.387, "a3": 0.071, "r60": -0.577,
                 "r25": -0.685, "sex": 0.016, "black": -0.243, "asian": -0.5, "latino": 0.175,
                 "uscitizen": -0.164, "englishability": -0.166, "educ_s": 0.382,
                 "college": 0.316, "hsgrad": 0.112, "married": 0.279, "divorced": 0.201,
                 "children": -0.3, "disability": -0.497, "militaryservice": 0.058,
                 "sex_married": -0.888, "sex_children": -0.3},
    # P(income > 0).
    "income_positive": {"intercept": 1.273, "a1": 0.495, "a2": 0.233, "a3": -0.134,
                        "r60": 0.709, "r25": -0.775, "employed": 2.566, "sex": -0.542,
                        "black": 0.109, "asian": -0.334, "latino": -0.285, "educ_s": 0.191,
                        "college": -0.125, "married": -0.443, "disability": 0.302,
                        "employed_a1": 0.049, "employed_a2": -0.112, "employed_sex": 0.562,
                        "employed_educ_s": 0.423},
}
# Education 1..16 as a continuation-ratio model: logit P(educ > k | educ >= k) = cut[k-1] +
# (low or high, for k < 9 or k >= 9) . terms.
_EDUC_CUTS = (2.791, 3.886, 3.086, 2.776, 2.671, 2.194, 1.96, 1.703, 2.494, 3.657, 2.168, 3.17,
              0.292, 0.212, 0.154)
_EDUC_LOW = {"a1": -0.484, "a2": -0.134, "a3": 0.066, "r60": -0.244, "r25": -0.713,
             "sex": 0.188, "black": -1.289, "asian": 0.07, "latino": -0.735, "uscitizen": 0.901,
             "englishability": 1.44}
_EDUC_HIGH = {"a1": 0.018, "a2": -0.112, "a3": 0.02, "r60": -0.159, "r25": -0.981,
              "sex": -0.159, "black": -1.022, "asian": 0.01, "latino": -0.854,
              "uscitizen": -0.29, "englishability": -0.23}
# log(income) for positive incomes: linear mean; residual from a two-normal mixture (a heavier
# left tail, as in the data) scaled by a standard deviation that depends on employment.
_LOG_INCOME = {"intercept": 9.714, "a1": 0.171, "a2": -0.029, "a3": 0.006, "r60": 0.03,
               "r25": -0.665, "employed": 0.892, "sex": -0.42, "black": -0.298,
               "asian": -0.327, "latino": -0.111, "educ_s": 0.221, "college": 0.284,
               "married": 0.079, "disability": -0.162, "employed_a1": -0.014,
               "employed_a2": -0.083, "employed_sex": 0.011, "employed_educ_s": 0.047}
_LOG_INCOME_SD = (1.177, 0.877)  # not employed, employed
_RESIDUAL_MIX = ((0.9, 0.12, 0.8), (0.1, -1.1, 1.6))  # (weight, mean, sd) in units of the sd
_INCOME_MAX = 999_999
_INCOME_NEGATIVE = 0.0089  # P(income < 0 | income <= 0); losses are bottom-coded at -10,000
_INCOME_ROUNDING = ((0.55, 1000), (0.37, 100), (0.08, 10))  # incomes are reported rounded
# Public-use microdata areas of Fulton County; residential segregation makes them depend on race.
_PUMA_CODES = (1101, 1102, 1103, 1104, 1105, 1106, 1107)
_PUMA_PROBS = {0: (0.205, 0.349, 0.22, 0.124, 0.049, 0.007, 0.047),
               1: (0.016, 0.051, 0.042, 0.175, 0.22, 0.287, 0.21)}
_STATE, _FIPS = 13, 13121


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-z))


def _linear(coefs: dict[str, float], terms: dict[str, np.ndarray], n: int) -> np.ndarray:
  z = np.full(n, coefs.get("intercept", 0.0))
  for name, c in coefs.items():
    if name != "intercept":
      z += c * terms[name]
  return z


def _bernoulli(rng: np.random.Generator, coefs: dict[str, float],
               terms: dict[str, np.ndarray], n: int,
               offset: np.ndarray | float = 0.0) -> np.ndarray:
  # offset: a household's shared effect on the logit (0 adds nothing: the same draws).
  return (rng.random(n) < _sigmoid(_linear(coefs, terms, n) + offset)).astype(np.float64)


def _fix(values: np.ndarray, fixed: Mapping[str, np.ndarray] | None, name: str) -> np.ndarray:
  """``values`` with ``fixed[name]``'s non-NaN entries put in (a household's shared or
  related values, :mod:`preprocessing.households`); ``values`` itself when none are fixed.

  The draw behind ``values`` is made either way, so every later draw is unchanged.
  """
  if not fixed or name not in fixed:
    return values
  return np.where(np.isnan(fixed[name]), values, fixed[name])


def _streams(entropy: list[int]) -> Iterator[np.random.Generator]:
  """Independent generators, one per draw: the first k rows never depend on n >= k."""
  seq = np.random.SeedSequence(entropy)
  while True:
    yield from (np.random.default_rng(s) for s in seq.spawn(8))


def _raw_block(entropy: list[int], n: int,
               fixed: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Draws n people of the raw schema (int64 columns, RAW_COLUMNS order).

  Every random draw takes n values (or n rows) from its own stream, so the first k people
  are the same for every n >= k.

  ``fixed`` (households, :mod:`preprocessing.households`): [n] float arrays of values that
  replace the drawn ones where not NaN (``age``, ``sex``, ``black``, ``asian``, ``latino``,
  ``married``, ``puma``; later columns are drawn given them), and ``employed_offset``, added
  to the employment logit. Without it the draws are those of every earlier version.
  """
  rng = _streams(entropy).__next__  # a fresh stream per call
  bracket = rng().choice(len(_AGE_PROBS), size=n, p=np.asarray(_AGE_PROBS) / sum(_AGE_PROBS))
  lo = np.asarray(_AGE_EDGES[:-1])[bracket]
  hi = np.asarray(_AGE_EDGES[1:])[bracket]
  age = np.floor(lo + rng().random(n) * (hi - lo))
  age = _fix(np.where(age >= 90, _AGE_TOP_CODE, age), fixed, "age")
  a = (age - 45.0) / 15.0
  t = {"a1": a, "a2": a * a, "a3": a * a * a, "r60": np.maximum(age - 60.0, 0) / 10.0,
       "r25": np.maximum(25.0 - age, 0) / 5.0}
  for col in ("sex", "black", "asian", "latino", "uscitizen", "englishability"):
    t[col] = _fix(_bernoulli(rng(), _LOGIT[col], t, n), fixed, col)
  educ = np.ones(n)
  alive = np.ones(n, bool)
  low, high = _linear(_EDUC_LOW, t, n), _linear(_EDUC_HIGH, t, n)
  u = rng().random((n, len(_EDUC_CUTS)))
  for k, cut in enumerate(_EDUC_CUTS, start=1):
    alive &= u[:, k - 1] < _sigmoid(cut + (low if k < 9 else high))
    educ += alive
  t["educ_s"] = (educ - 10.0) / 3.0
  t["college"] = (educ >= 13).astype(np.float64)
  t["hsgrad"] = (educ >= 9).astype(np.float64)
  t["married"] = _fix(_bernoulli(rng(), _LOGIT["married"], t, n), fixed, "married")
  t["divorced"] = _bernoulli(rng(), _LOGIT["divorced"], t, n) * (1 - t["married"])
  t["sex_married"] = t["sex"] * t["married"]
  for col in ("children", "militaryservice", "disability"):
    t[col] = _bernoulli(rng(), _LOGIT[col], t, n)
  t["sex_children"] = t["sex"] * t["children"]
  t["employed"] = _bernoulli(rng(), _LOGIT["employed"], t, n,
                             (fixed or {}).get("employed_offset", 0.0))
  for name in ("a1", "a2", "sex", "educ_s"):
    t[f"employed_{name}"] = t["employed"] * t[name]
  positive = _bernoulli(rng(), _LOGIT["income_positive"], t, n).astype(bool)
  comp = rng().choice(len(_RESIDUAL_MIX), size=n, p=[m[0] for m in _RESIDUAL_MIX])
  mix = np.asarray(_RESIDUAL_MIX)
  resid = mix[comp, 1] + mix[comp, 2] * rng().standard_normal(n)
  sd = np.where(t["employed"] == 1, _LOG_INCOME_SD[1], _LOG_INCOME_SD[0])
  income = np.exp(np.minimum(_linear(_LOG_INCOME, t, n) + sd * resid, np.log(_INCOME_MAX)))
  step = np.asarray([s for _, s in _INCOME_ROUNDING])[
      rng().choice(len(_INCOME_ROUNDING), size=n, p=[p for p, _ in _INCOME_ROUNDING])]
  income = np.clip(np.round(income / step) * step, 10, _INCOME_MAX)
  loss = -np.round(rng().uniform(100, 10_000, n) / 10) * 10
  income = np.where(positive, income, np.where(rng().random(n) < _INCOME_NEGATIVE, loss, 0))
  p_puma = np.asarray([_PUMA_PROBS[0], _PUMA_PROBS[1]])
  cum = np.cumsum(p_puma / p_puma.sum(axis=1, keepdims=True), axis=1)[t["black"].astype(int)]
  puma = np.asarray(_PUMA_CODES)[(rng().random(n)[:, None] > cum[:, :-1]).sum(axis=1)]
  puma = _fix(puma.astype(np.float64), fixed, "puma")
  cols = {"state": np.full(n, _STATE), "puma": puma, "age": age, "educ": educ,
          "income": income, "fips": np.full(n, _FIPS)}
  return {c: np.asarray(cols[c] if c in cols else t[c]).astype(np.int64) for c in RAW_COLUMNS}


def raw_to_capums(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The CaPUMS export of raw columns: 12 binary float32 columns in CAPUMS_COLUMNS order.

  NaN in a raw column propagates to the columns derived from it.
  """
  f = {k: np.asarray(v, np.float64) for k, v in raw.items()}
  out = {c: f[c] for c in ("sex", "married", "black", "asian", "employed", "militaryservice",
                           "uscitizen", "disability", "englishability")}
  out["collegedegree"] = np.where(np.isnan(f["educ"]), np.nan, f["educ"] >= 13)
  out["blackfemale"] = f["black"] * f["sex"]
  out["targetted"] = f["employed"].copy()  # a function of the label: it leaks it.
  return {c: out[c].astype(np.float32) for c in CAPUMS_COLUMNS}


def _add_na(columns: dict[str, np.ndarray], entropy: list[int],
            fraction: float) -> dict[str, np.ndarray]:
  """Blanks each cell independently with probability ``fraction`` (NaN, written as NA)."""
  if fraction <= 0:
    return columns
  out = {}
  for name, col, rng in zip(columns, columns.values(), _streams(entropy)):
    col = np.asarray(col, np.float32 if col.dtype == np.float32 else np.float64)
    mask = rng.random(len(col)) < fraction
    out[name] = np.where(mask, np.nan, col).astype(col.dtype)
  return out


def iter_blocks(rows: int, *, schema_name: str = "capums", seed: int = 0,
                na_fraction: float | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields the columns of consecutive blocks of at most BLOCK_ROWS rows.

  Args:
    rows: total number of rows.
    schema_name: ``'capums'`` (float32 0/1/NaN) or ``'raw'`` (int64; float64 with NaN when
      ``na_fraction > 0``).
    seed: non-negative seed.
    na_fraction: probability that a cell is NA; default 0.001 for capums, 0 for raw.
  """
  if schema_name not in SCHEMAS:
    raise ValueError(f"{schema_name=} must be one of {SCHEMAS}")
  if rows < 0 or seed < 0:
    raise ValueError(f"{rows=} and {seed=} must be non-negative")
  if na_fraction is None:
    na_fraction = DEFAULT_NA_FRACTION[schema_name]
  if not 0 <= na_fraction <= 1:
    raise ValueError(f"{na_fraction=} must be in [0, 1]")
  for block, lo in enumerate(range(0, rows, BLOCK_ROWS)):
    n = min(BLOCK_ROWS, rows - lo)
    raw = _raw_block([seed, block], n)
    cols = raw_to_capums(raw) if schema_name == "capums" else raw
    yield _add_na(cols, [seed, block, 1], na_fraction)


def synthesize(rows: int, *, schema_name: str = "capums", seed: int = 0,
               na_fraction: float | None = None) -> dict[str, np.ndarray]:
  """All columns of ``rows`` generated rows (see :func:`iter_blocks`)."""
  names = CAPUMS_COLUMNS if schema_name == "capums" else RAW_COLUMNS
  blocks = list(iter_blocks(rows, schema_name=schema_name, seed=seed, na_fraction=na_fraction))
  if not blocks:
    return {c: np.zeros(0, np.float32 if schema_name == "capums" else np.int64) for c in names}
  return {c: np.concatenate([b[c] for b in blocks]) for c in names}


def synthesize_raw(rows: int, seed: int = 0, na_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """Raw-schema columns (int64, or float64 with NaN when ``na_fraction > 0``)."""
  return synthesize(rows, schema_name="raw", seed=seed, na_fraction=na_fraction)


def synthesize_capums(rows: int, seed: int = 0,
                      na_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """CaPUMS-schema columns.

  Args:
    rows: number of rows.
    seed: RNG seed; the output is a deterministic function of (rows, seed, na_fraction).
    na_fraction: probability that any cell is missing (``NaN``, written as ``NA``).

  Returns:
    Column name -> [rows] float32 array of 0/1 with NaN for missing, in CAPUMS_COLUMNS order.
  """
  return synthesize(rows, schema_name="capums", seed=seed, na_fraction=na_fraction)


# --- Households: persons of this generator grouped into households (preprocessing.households).

HOUSEHOLD_COLUMNS = (households_lib.HOUSEHOLD_IDS + RAW_COLUMNS
                     + households_lib.HOUSEHOLD_VARIABLES)


def iter_household_blocks(households: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields the rows of consecutive blocks of households (HOUSEHOLD_COLUMNS, int64)."""
  if households < 0 or seed < 0:
    raise ValueError(f"{households=} and {seed=} must be non-negative")
  size = households_lib.HOUSEHOLD_BLOCK
  for block, lo in enumerate(range(0, households, size)):
    yield households_lib.household_block(_raw_block, _streams, RAW_COLUMNS, seed, block,
                                         min(size, households - lo))


def synthesize_households(households: int, seed: int = 0) -> dict[str, np.ndarray]:
  """All rows of ``households`` synthetic households: the raw person schema with each
  person's ``SERIALNO`` and ``SPORDER`` and the household's ``NP`` and ``HINCP``.

  Household sizes follow the published US distribution, and members share their PUMA,
  household income and a household effect on employment (:mod:`preprocessing.households`);
  the spec ``pums_households`` trains on them with the household as the privacy unit.

  Returns:
    HOUSEHOLD_COLUMNS -> [rows] int64, rows grouped by household.
  """
  blocks = list(iter_household_blocks(households, seed))
  if not blocks:
    return {c: np.zeros(0, np.int64) for c in HOUSEHOLD_COLUMNS}
  return {c: np.concatenate([b[c] for b in blocks]) for c in HOUSEHOLD_COLUMNS}


def write_households_csv(path: str, households: int, *, seed: int = 0,
                         line_ending: str = "\n") -> tuple[int, int]:
  """Writes the households block by block (constant memory); returns (rows, bytes)."""
  rows = 0
  with atomic.replacing(path) as f:  # a full disk or a kill leaves no truncated CSV
    f.write(header_line(HOUSEHOLD_COLUMNS, line_ending))
    for block in iter_household_blocks(households, seed):
      rows += len(block["SERIALNO"])
      f.write(format_csv_rows(block, line_ending))
    size = f.tell()
  return rows, size


# --- CSV, vectorised: each column becomes a fixed-width byte matrix; the padding is removed. ---

def header_line(names: list[str] | tuple[str, ...], line_ending: str = "\n") -> bytes:
  """A quoted header (R ``write.csv`` style)."""
  return (",".join(f'"{n}"' for n in names) + line_ending).encode()


def _column_bytes(col: np.ndarray) -> np.ndarray:
  """[n] numbers -> [n, w] uint8 of their decimal text, zero-padded on the right; NaN -> NA."""
  col = np.asarray(col)
  n = len(col)
  na = np.isnan(col) if col.dtype.kind == "f" else np.zeros(n, bool)
  filled = np.where(na, 0, col)
  if col.dtype.kind == "f" and not np.array_equal(filled, np.round(filled)):
    text = np.array(["NA" if m else repr(float(v)) for v, m in zip(filled, na)], dtype="S")
  else:
    ints = filled.astype(np.int64)
    lo, hi = (int(ints.min()), int(ints.max())) if n else (0, 0)
    if lo >= 0 and hi < 256:
      lut = np.array([str(i).encode() for i in range(hi + 1)] + [b"NA"])
      text = lut[np.where(na, hi + 1, ints)]
    else:
      width = max(len(str(lo)), len(str(hi)), 2 if na.any() else 1)
      text = ints.astype(f"S{width}")
      text[na] = b"NA"
  return text.view(np.uint8).reshape(n, text.dtype.itemsize)


def format_csv_rows(columns: dict[str, np.ndarray], line_ending: str = "\n") -> bytes:
  """The data lines (no header) of columns of numbers, NaN written as ``NA``."""
  parts = [_column_bytes(c) for c in columns.values()]
  if not parts or not len(parts[0]):
    return b""
  n = parts[0].shape[0]
  ending = np.frombuffer(line_ending.encode(), np.uint8)
  width = sum(p.shape[1] for p in parts) + len(parts) - 1 + len(ending)
  mat = np.zeros((n, width), np.uint8)
  j = 0
  for i, p in enumerate(parts):
    mat[:, j:j + p.shape[1]] = p
    j += p.shape[1]
    if i < len(parts) - 1:
      mat[:, j] = ord(",")
      j += 1
  mat[:, j:] = ending
  return mat[mat != 0].tobytes()


def write_csv(columns: dict[str, np.ndarray], path: str, line_ending: str = "\n") -> None:
  """Writes columns as CSV with a quoted header and ``NA`` for NaN (R write.csv style)."""
  with atomic.replacing(path) as f:
    f.write(header_line(list(columns), line_ending))
    f.write(format_csv_rows(columns, line_ending))


def write_csv_file(path: str, rows: int, *, schema_name: str = "capums", seed: int = 0,
                   na_fraction: float | None = None, line_ending: str = "\n") -> int:
  """Generates and writes ``rows`` rows block by block (constant memory); returns bytes."""
  names = CAPUMS_COLUMNS if schema_name == "capums" else RAW_COLUMNS
  with atomic.replacing(path) as f:  # a full disk or a kill leaves no truncated CSV
    f.write(header_line(names, line_ending))
    for block in iter_blocks(rows, schema_name=schema_name, seed=seed, na_fraction=na_fraction):
      f.write(format_csv_rows(block, line_ending))
    size = f.tell()
  return size


# --- Malformed lines, for tests and demonstrations of the pipeline's bad-input handling. ---

@dataclasses.dataclass(frozen=True)
class InjectedLine:
  """A malformed line added by :func:`inject_malformed` (line: 1-based, in the new file)."""

  line: int
  reason: str
  text: str


def _malformed_line(rng: np.random.Generator, kind: str, header: str, fields: list[str],
                    spec: features_lib.FeatureSpec) -> str:
  header_cols = cleaning.parse_header(header)
  if kind == "repeated_header":
    return header
  if kind == "blank_line":
    return ""
  if kind == "wrong_arity":
    f = list(fields)
    if rng.random() < 0.5 and len(f) > 1:
      del f[int(rng.integers(len(f)))]
    else:
      f.insert(int(rng.integers(len(f) + 1)), "1")
    return ",".join(f)
  col = spec.used_specs[int(rng.integers(len(spec.used_specs)))]
  j = header_cols.index(col.name)
  f = list(fields)
  if kind == "non_numeric":
    f[j] = str(rng.choice(["abc", "nan", "inf", "1_0", "yes", "0x1", "--1"]))
  else:  # out_of_domain
    if col.kind == "binary":
      f[j] = str(rng.choice(["2", "-1", "0.5", "7"]))
    elif col.kind == "categorical":
      f[j] = str(int(max(col.categories)) + 1 + int(rng.integers(5)))
    elif col.domain is not None:
      f[j] = str(int(col.domain[1]) + 1 + int(rng.integers(100)))
    else:  # a numeric column without a hard domain accepts any number
      f[j] = str(rng.choice(["abc", "inf"]))
      kind = "non_numeric"
  return ",".join(f)


def inject_malformed(src: str, dst: str, count: int, *, seed: int = 0,
                     spec: features_lib.FeatureSpec | None = None) -> list[InjectedLine]:
  """Copies a CSV file, inserting ``count`` malformed lines at random places after the header.

  The kinds cycle through ``wrong_arity, non_numeric, out_of_domain, repeated_header,
  blank_line``; each new line is built from a neighbouring valid line, so only the injected
  defect makes it malformed (for spec ``spec``, default: capums or pums_raw by header).

  Returns:
    The injected lines, by line number in ``dst``, with the reason the pipeline must report.
  """
  with open(src, encoding="utf-8") as f:  # universal newlines, as the pipeline reads lines
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if not lines:
    raise ValueError(f"{src} is empty")
  header, body = lines[0], lines[1:]
  if spec is None:
    cols = cleaning.parse_header(header)
    spec = features_lib.load_spec("capums" if cols == CAPUMS_COLUMNS else "pums_raw")
  rng = np.random.default_rng(seed)
  kinds = ("wrong_arity", "non_numeric", "out_of_domain", "repeated_header", "blank_line")
  positions = np.sort(rng.integers(0, len(body) + 1, size=count))
  out, injected = [header], []
  k = 0
  for i in range(len(body) + 1):
    while k < count and positions[k] == i:
      kind = kinds[k % len(kinds)]
      neighbour = body[min(i, len(body) - 1)] if body else ",".join(["0"] * len(spec.used_columns))
      text = _malformed_line(rng, kind, header, neighbour.split(","), spec)
      out.append(text)
      injected.append(InjectedLine(line=len(out), reason=kind, text=text))
      k += 1
    if i < len(body):
      out.append(body[i])
  with open(dst, "w", encoding="utf-8", newline="") as f:
    f.write("\n".join(out) + "\n")
  # The reason actually reported is re-derived with the pipeline's own rules: e.g. a numeric
  # column without a domain turns an out-of-domain attempt into non_numeric.
  cleaner = cleaning.LineCleaner(spec, cleaning.parse_header(header))
  result = cleaner.clean([i.text for i in injected])
  reasons = {i: r for i, r, _ in result.rejects}
  if len(reasons) != len(injected):
    raise AssertionError("an injected line is not malformed under the spec")
  return [dataclasses.replace(x, reason=reasons[i]) for i, x in enumerate(injected)]


# --- Direct writer: generated columns -> shard dataset, with the pipeline's cleaning rules. ---

def write_shards(columns: dict[str, np.ndarray], output: str, *,
                 spec: features_lib.FeatureSpec | None = None,
                 split_seed: int = split_lib.DEFAULT_SPLIT_SEED,
                 test_fraction: float = split_lib.DEFAULT_TEST_FRACTION,
                 overwrite: bool = False,
                 max_rows_per_shard: int = 500_000) -> manifest_lib.Manifest:
  """Cleans columns with the pipeline's rules and writes them as a shard dataset.

  Row ``i`` of the columns has row id ``i`` (as the ``i``-th data line of the CSV that
  :func:`write_csv` would write, for the Spark job and the streaming path), and its split is
  decided by its row key (:func:`fastdp_jax.data.split.rows_in_test`: its cleaned content and
  its occurrence among the identical kept rows before it), so all producers put it in the
  same split. With a spec's ``privacy_unit`` (``pums_households``), every row is
  keyed by its unit and each unit lands wholly in one split, by its key alone.

  Args:
    columns: column name -> [n] numbers, NaN for missing (at least the spec's used columns).
    output: the dataset directory.
    spec: feature spec; default the CaPUMS one.
    split_seed: seed of the hash split (:func:`fastdp_jax.data.split.is_test_row`).
    test_fraction: expected fraction of test rows.
    overwrite: replace an existing dataset.
    max_rows_per_shard: shard size bound.

  Returns:
    The written manifest.

  Raises:
    ValueError: if a value is malformed (out of its column's domain).
  """
  spec = spec or features_lib.load_spec("capums")
  result = cleaning.clean_columns(spec, columns)
  if result.rejects:
    i, reason, detail = result.rejects[0]
    raise ValueError(f"row {i}: {reason}: {detail} ({len(result.rejects)} malformed rows); "
                     "the direct writer only takes clean columns")
  n = len(columns[spec.used_columns[0]])
  x, y = spec.encode(result.values)
  keys, row_keys = None, None
  if spec.privacy_unit:  # each unit wholly in one split, by its key alone (as the Spark job)
    keys, test = units_lib.key_and_split(result.units or [], seed=split_seed,
                                         test_fraction=test_fraction)
  else:  # split_lib.rows_in_test, keeping the row keys for the shards
    content = split_lib.value_keys(result.values)
    row_keys = split_lib.row_keys(content, split_lib.occurrences(content))
    test = split_lib.is_test_row(row_keys, seed=split_seed, test_fraction=test_fraction)
  extra = {"producer": "preprocessing.synthesize", "spec": spec.to_dict(),
           "split": {"seed": split_seed, "test_fraction": test_fraction,
                     "row_key": "fastdp_jax.data.split.row_keys of the cleaned row's content "
                                "key and its occurrence among identical kept rows in row "
                                "order; in each shard's row_keys"} if keys is None else
           {"seed": split_seed, "test_fraction": test_fraction,
            "unit": "fastdp_jax.data.units.is_test_unit of the unit key: each unit in one "
                    "split"},
           "dropped_na_by_column": dict(zip(spec.used_columns,
                                            result.na_by_column.tolist()))}
  if keys is not None:  # what the trainer's bound k will keep, per split (as the Spark job)
    extra["units"] = {"train": units_lib.bound_counts(keys[~test], spec.max_rows_per_unit),
                      "test": units_lib.bound_counts(keys[test], spec.max_rows_per_unit)}
  # The spec's task and embeddings, as the Spark job and the streaming path record them: a
  # multiclass or regression label, or an embedded id column, is then trained as declared.
  with data_lib.DatasetWriter(output, feature_names=spec.feature_names,
                              label_name=spec.label, feature_bounds=spec.feature_bounds,
                              task=spec.task, embeddings=spec.embeddings,
                              overwrite=overwrite,
                              max_rows_per_shard=max_rows_per_shard, extra=extra,
                              privacy_unit=spec.privacy_unit,
                              max_rows_per_unit=spec.max_rows_per_unit) as w:
    for split, rows in (("train", ~test), ("test", test)):
      w.add(split, x[rows], y[rows], unit_keys=None if keys is None else keys[rows],
            row_keys=None if row_keys is None else row_keys[rows])
    w.set_provenance(manifest_lib.Provenance(rows_read=n, kept=len(result.kept),
                                             dropped_na=len(result.dropped_na)))
  return manifest_lib.read_manifest(output)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m preprocessing.synthesize",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=100_000, help="number of rows (default 100000)")
  p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
  p.add_argument("--schema", choices=SCHEMAS, default="capums",
                 help="capums: the 12 binary columns of CaPUMS5full.csv; raw: the raw PUMS "
                 "person schema")
  p.add_argument("--na-fraction", type=float, default=None,
                 help="probability that a cell is NA (default 0.001 capums, 0 raw)")
  p.add_argument("--output", help="CSV file to write")
  p.add_argument("--crlf", action="store_true", help="end lines with CRLF")
  p.add_argument("--malformed", type=int, default=0,
                 help="insert this many malformed lines into --output (listed in "
                 "OUTPUT.injected.jsonl)")
  p.add_argument("--output-shards", help="dataset directory to write directly (no Spark)")
  p.add_argument("--spec", help="feature spec for --output-shards (default by --schema)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --output-shards dataset")
  p.add_argument("--households", type=int, default=None, metavar="N",
                 help="write N households instead of --rows people: the raw PUMS schema with "
                 "SERIALNO, SPORDER, NP and HINCP (--schema and --rows do not apply; "
                 "--output-shards uses the spec pums_households, household-level privacy)")
  args = p.parse_args(argv)
  if not (args.output or args.output_shards):
    p.error("give --output FILE.csv and/or --output-shards DIR")
  if args.households is not None and args.na_fraction:
    p.error("--households writes no NA cells: drop --na-fraction")
  households = args.households is not None
  if args.malformed and not args.output:
    p.error("--malformed needs --output")
  try:
    t0 = time.perf_counter()
    if args.output:
      os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
      ending = "\r\n" if args.crlf else "\n"
      if households:
        rows, size = write_households_csv(args.output, args.households, seed=args.seed,
                                          line_ending=ending)
        what = f"{rows} rows ({args.households} households, {size / 1e6:.1f} MB"
      else:
        size = write_csv_file(args.output, args.rows, schema_name=args.schema, seed=args.seed,
                              na_fraction=args.na_fraction, line_ending=ending)
        what = f"{args.rows} rows ({size / 1e6:.1f} MB, schema {args.schema}"
      print(f"wrote {what}) to {args.output} in {time.perf_counter() - t0:.1f} s")
      if args.malformed:
        with atomic.replacing_path(args.output) as tmp:
          injected = inject_malformed(
              args.output, tmp, args.malformed, seed=args.seed,
              spec=features_lib.load_spec("pums_households") if households else None)
        atomic.write_text(args.output + ".injected.jsonl", "".join(
            json.dumps(dataclasses.asdict(x)) + "\n" for x in injected))
        print(f"inserted {len(injected)} malformed lines (list: "
              f"{args.output}.injected.jsonl)")
    if args.output_shards:
      spec = features_lib.load_spec(args.spec or (
          "pums_households" if households else
          "capums" if args.schema == "capums" else "pums_raw"))
      cols = (synthesize_households(args.households, seed=args.seed) if households else
              synthesize(args.rows, schema_name=args.schema, seed=args.seed,
                         na_fraction=args.na_fraction))
      m = write_shards(cols, args.output_shards, spec=spec, overwrite=args.overwrite)
      print(f"wrote {m.rows('train')} train / {m.rows('test')} test rows to "
            f"{args.output_shards} (dropped {m.provenance.dropped_na} rows with NA)")
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

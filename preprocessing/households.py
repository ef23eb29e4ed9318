"""Synthetic households for the raw PUMS schema: data to develop household-level DP on.

Each household gets a ``SERIALNO`` (its id, 1-based, as the numeric serial numbers of the
2000 PUMS), a size drawn from the published US household-size distribution, and one row per
person (``SPORDER`` 1 is the householder), in the raw person schema of
:mod:`preprocessing.synthesize` plus the household's ``NP`` (persons) and ``HINCP``
(household income). Persons are drawn by the synthesizer's conditional models, given what
they share or inherit:

* shared by the whole household: the PUMA, ``NP``, ``HINCP`` (the sum of its members'
  positive incomes), and a household effect on the employment logit, so the label is
  correlated within a household (as work status is, through local labour markets and
  household economics);
* the householder's spouse (in a share of households of 2 or more): married, like the
  householder, usually of the other sex, and of an age close to the householder's;
* the other members: adults whose age follows the householder's (a grown child of an older
  householder; a relative or housemate of similar age of a younger one), and who share the
  householder's race and ethnicity with a high probability.

The raw schema is an adults-only person file (ages 18 to 93, as the Fulton County file the
models were fitted to), so every member is an adult: a household's rows are its persons, and
rows per household follow the published persons-per-household distribution. Households of 9
or 10 persons are kept (1 in 500), so a spec's public bound of 8 rows per unit drops a few rows.

This module draws the household structure; the persons come from the generator it is given
(:func:`preprocessing.synthesize.synthesize_households` gives the synthesizer's, which keeps
this module free of an import of it). The output is a deterministic function of
``(households, seed)``; households are drawn in blocks of :data:`HOUSEHOLD_BLOCK` with their
own streams, so the first H households are the same for every larger number.

Usage::

  python -m preprocessing.synthesize --households 50000 --output households.csv
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

# The person generator: (entropy, n, fixed values or None) -> the raw schema's int64 columns
# (preprocessing.synthesize._raw_block, whose ``fixed`` argument documents the names).
People = Callable[[list[int], int, "Mapping[str, np.ndarray] | None"], dict[str, np.ndarray]]
# One generator per random draw, from an entropy list (preprocessing.synthesize._streams).
Streams = Callable[[list[int]], Iterator[np.random.Generator]]

HOUSEHOLD_IDS = ("SERIALNO", "SPORDER")  # before the person columns
HOUSEHOLD_VARIABLES = ("NP", "HINCP")  # after them
HOUSEHOLD_BLOCK = 1 << 16  # households per block (one set of random streams each)

# Persons per household, 1..10. The US Census Bureau's published distribution (American
# Community Survey and Current Population Survey tables of households by size, recent years),
# rounded to whole percent: 1 person 28 %, 2 persons 34 %, 3 persons 15 %, 4 persons 13 %,
# 5 persons 6 %, 6 persons 2 %, 7 or more 1 % (mean about 2.5). Our choice, not published:
# how the 1 % of 7 or more splits over 7..10 (0.5, 0.3, 0.1, 0.1 %).
HOUSEHOLD_SIZES = tuple(range(1, 11))
HOUSEHOLD_SIZE_PROBS = (0.28, 0.34, 0.15, 0.13, 0.06, 0.02, 0.005, 0.003, 0.001, 0.001)
# Our modelling choices (round figures, not fitted): about half of all US households are
# married couples, i.e. about 2/3 of those of 2 or more persons; a spouse is of the other sex
# in about 97 % of couples, and within a few years of the householder's age.
_SPOUSE = 0.65
_OTHER_SEX = 0.97
_SPOUSE_AGE_SD = 4.0
_SAME_RACE = 0.9  # a member shares the householder's race and ethnicity
_EMPLOYED_EFFECT_SD = 0.8  # sd of the household's effect on the employment logit
_HINCP_MAX = 9_999_999
_AGE_TOP_CODE = 93  # the census top code of age, as the person generator's
_SALT = 0x4855  # "HU": household streams, distinct from the row generator's


def _member_ages(rng: Callable[[], np.random.Generator], head_age: np.ndarray) -> np.ndarray:
  """Ages of non-spouse members given their householder's: a grown child (householder 40 or
  older: 18 to 35 years younger, at least 18) or a housemate of similar age.

  Each draw takes its own stream (``rng()``), so the first members do not depend on how many
  follow.
  """
  n = head_age.shape[0]
  child = head_age - rng().integers(18, 36, size=n)
  child = np.where(child < 18, 18 + rng().integers(0, 5, size=n), child)
  peer = head_age + np.round(rng().normal(0.0, 6.0, size=n))
  return np.clip(np.where(head_age >= 40, child, peer), 18, _AGE_TOP_CODE)


def _members(people: People, streams: Streams, entropy: list[int], head: dict[str, np.ndarray],
             size: np.ndarray, spouse: np.ndarray,
             effect: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """The persons after the householder: (columns, household index, SPORDER)."""
  rng = streams(entropy).__next__
  hh = np.repeat(np.arange(size.shape[0]), size - 1)
  first = np.concatenate([[0], np.cumsum(size - 1)[:-1]])
  order = np.arange(hh.shape[0]) - first[hh] + 2  # SPORDER 2, 3, ...
  is_spouse = (order == 2) & spouse[hh]
  m = hh.shape[0]
  head_age = head["age"][hh].astype(np.float64)
  spouse_age = np.clip(head_age + np.round(rng().normal(0.0, _SPOUSE_AGE_SD, size=m)), 18,
                       _AGE_TOP_CODE)
  other = rng().random(m) < _OTHER_SEX
  same_race = rng().random(m) < _SAME_RACE
  nan = np.full(m, np.nan)
  fixed = {"age": np.where(is_spouse, spouse_age, _member_ages(rng, head_age)),
           "sex": np.where(is_spouse, np.where(other, 1 - head["sex"][hh], head["sex"][hh]),
                           nan),
           "married": np.where(is_spouse, 1.0, nan),
           "puma": head["puma"][hh].astype(np.float64),
           "employed_offset": effect[hh]}
  for col in ("black", "asian", "latino"):
    fixed[col] = np.where(same_race, head[col][hh], nan)
  return people(entropy + [1], m, fixed), hh, order


def household_block(people: People, streams: Streams, person_columns: Sequence[str],
                    seed: int, block: int, households: int) -> dict[str, np.ndarray]:
  """The rows of ``households`` households of block ``block``: int64 columns, the ids, the
  ``person_columns`` of ``people``'s output, then the household variables.

  Rows are grouped by household (SERIALNO ascending), the householder first.
  """
  entropy = [seed, block, _SALT]
  rng = streams(entropy).__next__
  p = np.asarray(HOUSEHOLD_SIZE_PROBS)
  size = np.asarray(HOUSEHOLD_SIZES)[rng().choice(len(p), size=households, p=p / p.sum())]
  spouse = (size >= 2) & (rng().random(households) < _SPOUSE)
  effect = rng().normal(0.0, _EMPLOYED_EFFECT_SD, size=households)
  # A householder without a spouse in the household is not married (a spouse absent is rare).
  head = people(entropy + [0], households,
                {"married": spouse.astype(np.float64), "employed_offset": effect})
  rest, hh, order = _members(people, streams, entropy + [2], head, size, spouse, effect)
  hh_all = np.concatenate([np.arange(households), hh])
  rows = np.lexsort((np.concatenate([np.ones(households, np.int64), order]), hh_all))
  cols = {c: np.concatenate([head[c], rest[c]])[rows] for c in person_columns}
  hh_sorted = hh_all[rows]
  income = np.zeros(households)
  np.add.at(income, hh_sorted, np.maximum(cols["income"], 0))
  out = {"SERIALNO": block * HOUSEHOLD_BLOCK + hh_sorted + 1,
         "SPORDER": np.concatenate([np.ones(households, np.int64), order])[rows], **cols,
         "NP": size[hh_sorted], "HINCP": np.minimum(income, _HINCP_MAX)[hh_sorted]}
  names = HOUSEHOLD_IDS + tuple(person_columns) + HOUSEHOLD_VARIABLES
  return {c: np.asarray(out[c]).astype(np.int64) for c in names}

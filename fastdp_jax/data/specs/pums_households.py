"""Feature spec of PUMS persons in households, trained with the HOUSEHOLD as the privacy unit.

The raw PUMS person schema (``pums_raw``) with each person's household: ``SERIALNO`` (the
household's serial number), ``SPORDER`` (the person's number in it), and two household
variables every member's row repeats, ``NP`` (persons in the household) and ``HINCP``
(household income). ``synthesize --households`` writes this schema
(:mod:`preprocessing.households`).

Why the household is the unit: the persons of a household share PUMA, NP and HINCP (and are
alike in much else), so a guarantee per person row would let the household's variables leak
once per member. With ``privacy_unit = ("SERIALNO",)``, (epsilon, delta) bound what the model
reveals about a whole household: the producers key every row by its household, put each
household wholly in one split, and the trainer samples households and clips the sum of each
household's row gradients (:mod:`fastdp_jax.data.units`; README, "The privacy unit").

``max_rows_per_unit = 8`` is public knowledge, never a statistic of the data: in the Census
Bureau's published household-size distribution about 1 % of households have 7 or more
persons, so 8 rows keep all but a very small share of persons; rows beyond 8 of a larger
household are dropped by a seeded rank of its own rows (the manifest counts them).

Features as ``pums_raw`` (binaries, education one-hot, age and log income clipped to public
bounds), plus the household's variables:

* ``NP``: persons in the household, clipped to [1, 8] (the bound above), scaled; counts up to
  20 are accepted, larger ones are malformed.
* ``HINCP``: household income in dollars, clipped to [0, 2,000,000] (a public round bound,
  twice the person income's), then log1p and scaled, as ``income``.

``SERIALNO`` and ``SPORDER`` are identifiers, not features. Command::

  python -m preprocessing.synthesize --households 50000 --output data/households.csv
  python -m preprocessing.spark_job --input data/households.csv --output data/households \\
      --spec pums_households
"""

import ml_collections

from fastdp_jax.data.specs import pums_raw

INPUT_COLUMNS = ("SERIALNO", "SPORDER") + pums_raw.INPUT_COLUMNS + ("NP", "HINCP")


def get_config():
  config = pums_raw.get_config()
  config.name = "pums_households"  # recorded in the manifest
  config.description = ("PUMS persons in households (household-level privacy): binaries, "
                        "one-hot education, age, log income, household size and income")
  config.input_columns = INPUT_COLUMNS
  config.features = tuple(config.features) + ("NP", "HINCP")
  # Persons in the household: public bounds 1..8 (the unit bound), a hard domain 1..20.
  config.columns.NP = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (1, 8), "domain": (1, 20), "transform": "identity"})
  # Household income in dollars: clipped to [0, 2e6] (public bounds), log1p, scaled to [0, 1].
  config.columns.HINCP = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (0, 2_000_000), "domain": None, "transform": "log1p"})
  # The privacy unit: one household, all of its rows, at most 8 of them (public: above).
  config.privacy_unit = ("SERIALNO",)
  config.max_rows_per_unit = 8
  return config

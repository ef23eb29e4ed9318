"""Feature spec of the raw PUMS person schema (FultonPUMS5full.csv and the generator's `raw`).

Features: the 11 binary columns, education one-hot over its 16 public codes, age and income
clipped to public bounds and scaled to [0, 1] (income on a log scale). Label: `employed`.
`state`, `puma` and `fips` are geography and not used.

Every bound below is public and fixed in advance (census coding and common sense), never
computed from the data: a min/max/mean of the private file would leak it.

* `age`: the 2000 PUMS person file covers ages 0..93 (93 = top code); we clip to [16, 93].
  Ages outside [0, 130] are malformed and rejected.
* `income`: total personal income in dollars; the 2000 PUMS bottom code is -10,000 and top
  codes are in the hundreds of thousands. Clipped to [0, 1,000,000] (losses count as 0), then
  log1p and scaled, so 0 -> 0 and 1,000,000 -> 1. Any finite number is accepted.
* `educ`: codes 1..16 of the codebook (1 none ... 16 doctorate); other codes are rejected.

Command (real data, ../shared/data/FultonPUMS5full.csv)::

  python -m preprocessing.spark_job --input ../shared/data/FultonPUMS5full.csv \
      --output data/fulton --spec pums_raw
"""

import ml_collections

# The raw PUMS schema, in file order (FultonPUMS5full.csv, `synthesize --schema raw`).
INPUT_COLUMNS = ("state", "puma", "sex", "age", "educ", "income", "latino", "black", "asian",
                 "married", "divorced", "uscitizen", "children", "disability",
                 "militaryservice", "employed", "englishability", "fips")
BINARY = ("sex", "latino", "black", "asian", "married", "divorced", "uscitizen", "children",
          "disability", "militaryservice", "englishability")


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "pums_raw"  # recorded in the manifest
  config.description = "raw PUMS person schema: binaries, one-hot education, age, log income"
  config.input_columns = INPUT_COLUMNS  # the usual header (columns are matched by name)
  config.features = BINARY + ("educ", "age", "income")  # output order
  config.columns = ml_collections.ConfigDict()
  for name in BINARY:
    config.columns[name] = ml_collections.ConfigDict({"kind": "binary"})
  # Education codes 1..16 (codebook), one feature per code.
  config.columns.educ = ml_collections.ConfigDict(
      {"kind": "categorical", "categories": tuple(range(1, 17))})
  # Age in years: public clipping bounds (adults; 93 is the census top code) and a hard domain.
  config.columns.age = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (16, 93), "domain": (0, 130), "transform": "identity"})
  # Income in dollars: clipped to [0, 1e6] (public bounds), then log1p, scaled to [0, 1].
  config.columns.income = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (0, 1_000_000), "domain": None, "transform": "log1p"})
  config.label = "employed"  # 1 = employed (incl. armed forces)
  config.na_tokens = ("NA", "")  # missing cells
  return config

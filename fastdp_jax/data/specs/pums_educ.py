"""Feature spec: education level of the raw PUMS person schema, a 4-class task (multiclass).

Label: `educ`, the codebook's codes 1..16 in four PUBLIC buckets fixed by the codebook (not by
the data): less than high school (1..8: none to 12th grade without diploma), high-school
graduate (9), some college (10..12: some college, no degree, associate degree) and bachelor's
or more (13..16: bachelor's, master's, professional, doctorate). A code outside 1..16 is in
no class: the row is rejected (`out_of_domain`) with its line and reason.

Features: the 11 binary columns of `pums_raw`, age and income clipped to the same public
bounds as `pums_raw` (income on a log scale); no education column (it is the label). `state`,
`puma`, `fips` and `employed` are not used (ignored, listed in the manifest).

Command (real data, ../shared/data/FultonPUMS5full.csv)::

  python -m preprocessing.spark_job --input ../shared/data/FultonPUMS5full.csv \
      --output data/fulton_educ --spec pums_educ
"""

import ml_collections

from fastdp_jax.data.specs import pums_raw

CLASSES = (
    ("less_than_high_school", tuple(range(1, 9))),  # none .. 12th grade, no diploma
    ("high_school_graduate", (9,)),
    ("some_college", (10, 11, 12)),  # < 1 year, no degree, associate degree
    ("bachelors_or_more", (13, 14, 15, 16)),  # bachelor's, master's, professional, doctorate
)


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "pums_educ"  # recorded in the manifest
  config.description = "raw PUMS person schema: education in four public buckets"
  config.input_columns = pums_raw.INPUT_COLUMNS  # the usual header (matched by name)
  config.features = pums_raw.BINARY + ("age", "income")  # output order
  config.columns = ml_collections.ConfigDict()
  for name in pums_raw.BINARY:
    config.columns[name] = ml_collections.ConfigDict({"kind": "binary"})
  # The same public bounds as pums_raw (see its docstring for where they come from).
  config.columns.age = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (16, 93), "domain": (0, 130), "transform": "identity"})
  config.columns.income = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (0, 1_000_000), "domain": None, "transform": "log1p"})
  config.label = "educ"
  config.task = ml_collections.ConfigDict({"kind": "multiclass", "classes": CLASSES})
  config.na_tokens = ("NA", "")  # missing cells
  return config

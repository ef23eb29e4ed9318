"""Feature spec: log income of the raw PUMS person schema, a regression task.

Label: `income`, total personal income in dollars, clipped to the PUBLIC bounds
[0, 1,000,000] (the 2000 PUMS bottom code is -10,000, so losses count as 0; top codes are in
the hundreds of thousands) and then log1p-transformed: the label is log1p(clip(income)), in
[0, log1p(1e6)] = [0, 13.8155]. Values outside the bounds are clipped and counted in the
manifest (`extra["adjusted_by_column"]["label_clipped:income"]`), as `out_of_bounds='clip'`
declares; `out_of_bounds='reject'` would reject them instead. Any finite number is accepted.

Features: the 11 binary columns of `pums_raw`, education one-hot over its 16 codes and age
(public bounds as in `pums_raw`); no income column (it is the label). `state`, `puma`, `fips`
and `employed` are not used (ignored, listed in the manifest).

Command (real data, ../shared/data/FultonPUMS5full.csv)::

  python -m preprocessing.spark_job --input ../shared/data/FultonPUMS5full.csv \
      --output data/fulton_income --spec pums_income
"""

import ml_collections

from fastdp_jax.data.specs import pums_raw


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "pums_income"  # recorded in the manifest
  config.description = "raw PUMS person schema: log1p income clipped to [0, 1e6] (regression)"
  config.input_columns = pums_raw.INPUT_COLUMNS  # the usual header (matched by name)
  config.features = pums_raw.BINARY + ("educ", "age")  # output order
  config.columns = ml_collections.ConfigDict()
  for name in pums_raw.BINARY:
    config.columns[name] = ml_collections.ConfigDict({"kind": "binary"})
  config.columns.educ = ml_collections.ConfigDict(
      {"kind": "categorical", "categories": tuple(range(1, 17))})
  config.columns.age = ml_collections.ConfigDict(
      {"kind": "numeric", "bounds": (16, 93), "domain": (0, 130), "transform": "identity"})
  config.label = "income"
  config.task = ml_collections.ConfigDict(
      {"kind": "regression", "bounds": (0, 1_000_000), "transform": "log1p",
       "out_of_bounds": "clip", "domain": None})
  config.na_tokens = ("NA", "")  # missing cells
  return config

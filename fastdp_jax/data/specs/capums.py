"""Feature spec of the original system: CaPUMS5full.csv, 9 binary features, label `employed`.

The input is the published 12-column file (quoted header, `NA` for missing). `blackfemale` is
derived from `black` and `sex`, and `targetted` is a function of the label (it leaks it): both
are in the header but not used, so an `NA` there does not drop the row.

Commands::

  python -m preprocessing.spark_job --input CaPUMS5full.csv --output data/capums \
      --spec capums
  python -m preprocessing.synthesize --rows 1223992 --schema capums --output CaPUMS5full.csv
"""

import ml_collections

from fastdp_jax.data import split as split_lib

# One column list for the project: the 12 columns of CaPUMS5full.csv in file order, and the 9
# features (every column but the label and the two derived ones) in output order.
INPUT_COLUMNS = split_lib.CAPUMS_COLUMNS
FEATURES = split_lib.CAPUMS_FEATURES


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "capums"  # recorded in the manifest
  config.description = "CaPUMS5full.csv: the original system's 9 binary features"
  config.input_columns = INPUT_COLUMNS  # the header must be exactly this
  config.features = FEATURES  # output order of the features
  config.columns = ml_collections.ConfigDict()
  for name in FEATURES:  # every feature is 0/1
    config.columns[name] = ml_collections.ConfigDict({"kind": "binary"})
  config.label = split_lib.CAPUMS_LABEL  # employed: 1 = employed
  config.na_tokens = ("NA", "")  # R's write.csv writes NA; other tools an empty cell
  return config

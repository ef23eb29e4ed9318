"""Feature spec: `pums_raw` plus the person's PUMA as an embedding input (employment, binary).

The features of `pums_raw` (11 binary columns, education one-hot, age, log income; see its
docstring for the public bounds), and `puma`, the Public Use Microdata Area code, as an
integer id looked up in an embedding table (`kind="embedding"`).

The vocabulary is public by definition and fixed without reading any data: a PUMA code is a
5-digit number, so the vocabulary is every code 0..99,999 (100,000 ids; a code outside it is
malformed and the row rejected). The table is large (100,000 x `model.embedding_dim`
parameters) but only the rows of codes that occur are ever looked up; the others receive
noise only, which no prediction reads. A narrower list would need the public PUMA list of the
state, not the codes seen in the file (those would be a statistic of the data).

Command (real data, ../shared/data/FultonPUMS5full.csv)::

  python -m preprocessing.spark_job --input ../shared/data/FultonPUMS5full.csv \
      --output data/fulton_puma --spec pums_puma
"""

import ml_collections

from fastdp_jax.data.specs import pums_raw


def get_config():
  config = pums_raw.get_config()
  config.name = "pums_puma"  # recorded in the manifest
  config.description = "raw PUMS person schema with the PUMA code as an embedding input"
  config.features = pums_raw.BINARY + ("educ", "age", "income", "puma")  # output order
  config.columns.puma = ml_collections.ConfigDict({"kind": "embedding", "range": (0, 99_999)})
  return config

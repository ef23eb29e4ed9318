"""Feature spec: the raw PUMS person schema with age and income over PUBLIC brackets.

The same rows, label (`employed`), binaries and education as ``pums_raw``; age and income are
encoded over public cut points instead of one scaled value each, so that a linear model (and
an MLP after few private updates) can fit the employment-by-age and by-income curves, the way
DP-EBM models each column over bins. The cut points are the census's own published brackets,
fixed before looking at any data:

* `age`: the age groups of the census employment-status tables (ACS B23001: 16-19, 20-21,
  22-24, 25-29, 30-34, 35-44, 45-54, 55-59, 60-61, 62-64, 65-69, 70-74, 75+), inside the same
  public bounds as ``pums_raw`` (16, 93).
* `income`: the census personal earnings brackets (ACS B20001: $1-2,499, 2,500-4,999, ...,
  75,000-99,999, 100,000+), with a first cut at $1 so that "no income" is its own bin, inside
  the bounds (0, 1,000,000).

``encoding='pwl'`` (piecewise-linear ramps) keeps the order of values inside a bracket;
``'onehot'`` treats each bracket as a category. Both give the same fit to a non-private
logistic regression on Fulton; BENCHMARKS.md ("Model quality") has the private figures.

Command (real data, ../shared/data/FultonPUMS5full.csv)::

  python -m preprocessing.spark_job --input ../shared/data/FultonPUMS5full.csv \
      --output data/fulton_binned --spec pums_binned
"""

from fastdp_jax.data.specs import pums_raw

AGE_CUTS = (20, 22, 25, 30, 35, 45, 55, 60, 62, 65, 70, 75)
INCOME_CUTS = (1, 2500, 5000, 7500, 10000, 15000, 20000, 25000, 35000, 50000, 75000, 100000)


def get_config():
  config = pums_raw.get_config()
  config.name = "pums_binned"  # recorded in the manifest
  config.description = ("raw PUMS person schema: binaries, one-hot education, age and income "
                        "over public census brackets")
  config.columns.age.bins = AGE_CUTS
  config.columns.age.encoding = "pwl"
  config.columns.income.bins = INCOME_CUTS
  config.columns.income.encoding = "pwl"
  return config

"""Household-level DP-SGD on synthetic PUMS households: (epsilon, delta) for a whole household.

The spec ``pums_households`` names the privacy unit, ``SERIALNO`` (one household), with a
public bound of 8 rows per household (``fastdp_jax/data/specs/pums_households.py``). The
producers put each household wholly in one split; the trainer samples HOUSEHOLDS, each with
probability q = batch_size / training households, clips the sum of each sampled household's
row gradients to C as one vector, and adds the noise once, so the accountant's (epsilon, delta)
hold for adding or removing one whole household (README, "The privacy unit").

Data (50,000 synthetic households, about 123,000 persons; the local engine needs no Spark)::

  .venv/bin/python -m preprocessing.synthesize --households 50000 --output data/households.csv
  .venv/bin/python -m preprocessing.spark_job --engine local --input data/households.csv \\
      --output data/households --spec pums_households

Training::

  .venv/bin/python -m fastdp_jax --config=configs/households.py --workdir=runs/households

Measured figures (household level against row level on the same rows): BENCHMARKS.md,
"Privacy units".
"""

from configs import seq


def get_config():
  config = seq.get_config()
  config.data.path = "data/households"  # where the commands above write.
  # batch_size counts HOUSEHOLDS: the expected number of households per update, so
  # q = 512 / training households (about 40,000 here), and an update holds about 1,250 person
  # rows (2.45 persons per household on average; at most 8 rows each, the spec's bound).
  config.batch_size = 512
  config.num_epochs = 20  # epochs over households: about 1,560 updates.
  # A small table's run takes seconds: a checkpoint (and its fsyncs) at each epoch end would
  # cost more than the work it saves. Save at most once a minute (and at the last update).
  config.checkpoint.min_interval_s = 60.0
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.01
  config.dp.l2_norm_clip = 0.5  # bounds the SUM of a household's row gradients.
  config.dp.noise_multiplier = None
  config.dp.target_epsilon = 1.0  # sigma calibrated so the household-level epsilon is 1.
  # A private temperature chosen on 10 % of the households, held out whole: epsilon 0.1 of
  # the total 1 (training gets 0.9). Each household is scored by its rows' mean loss, so one
  # household moves the selection's score by at most a row's bound, whatever its size
  # (BENCHMARKS.md, "Privacy units": the log-loss with and without the temperature).
  config.data.validation_fraction = 0.1
  config.calibration.epsilon = 0.1
  return config

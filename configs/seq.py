"""The original system's sequential DP-SGD run, with per-example clipping and accounting.

Defaults of the original's ``seq_train.json``: 10 epochs, C = 3, sigma = 0.9, expected batch
256, plain SGD with learning rate 0.01, the 9-50-1 MLP; delta is the default (below 1/N).

Command (the demo data comes from `make data`)::

  .venv/bin/python -m fastdp_jax --config=configs/seq.py --config.data.path=data/generated/capums

Measured by `make demo` (2-core CPU shared with other jobs, secret OS-entropy keys): on the
full-scale generated data (969,359 training rows, 3,787 updates per epoch, 37,870 updates)
test accuracy 0.6766 (majority class 0.6227) at epsilon 0.370 (PLD, at the default delta
1.01e-7); the whole `make demo`, data included, took 50 s.
"""

from fastdp_jax import base_config


def get_config():
  config = base_config()
  config.dp.noise_multiplier = 0.9
  return config

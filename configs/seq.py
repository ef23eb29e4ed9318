"""The original system's sequential DP-SGD run, with per-example clipping and accounting.

Defaults of the original's ``seq_train.json``: 10 epochs, C = 3, sigma = 0.9, expected batch
256, plain SGD with learning rate 0.01, delta = 1e-5, the 9-50-1 MLP.

Command (the demo data comes from `make data`)::

  python main.py --config=configs/seq.py --config.data.path=data/generated/capums

On the full-scale generated data (979k training rows, 38,240 updates) this runs in about a
minute on a 2-core CPU and reaches test accuracy about 0.66 (majority class about 0.6) at
epsilon about 0.28 (PLD, delta 1e-5).
"""

from fastdp_jax.config import base_config


def get_config():
  config = base_config()
  config.dp.noise_multiplier = 0.9
  return config

"""A tiny configuration for tests: 2 epochs of a small MLP, fixed batches and noise.

A reproducibility configuration: ``dp.sampling_seed`` and ``dp.noise_seed`` are set, so its
runs say ``private: false`` (tests that need a private run unset both). The generated data's
row count is declared public (``data.num_examples_public``), so that runs compare exactly and
q = batch_size / N; tests of the default DP estimate of N set it back to False.

Command (tests create the data)::

  python main.py --config=configs/test.py --config.data.path=DIR --workdir=W
"""

from fastdp_jax import base_config


def get_config():
  config = base_config()
  config.num_epochs = 2
  config.batch_size = 64
  config.model.hidden_sizes = (8,)
  config.optimizer.learning_rate = 0.05
  config.dp.noise_multiplier = 1.0
  config.dp.noise_seed = 0
  config.dp.sampling_seed = 0
  config.data.num_examples_public = True  # generated data: N is public (see above)
  config.data.attack_rows = 500
  config.steps_per_call = 8
  config.eval_batch_size = 1024
  return config

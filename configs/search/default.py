"""The default search space of ``fastdp-tune`` (the one used without ``--search``).

Copy this file to change the space; every key is documented in
:func:`fastdp_jax.tune.default_search`. Command::

  fastdp-tune --config=configs/fulton.py --search=configs/search/default.py \\
      --search.trials.mean=5 --config.dp.target_epsilon=1 --workdir=runs/fulton-tune
"""

from fastdp_jax import tune


def get_config():
  return tune.default_search()

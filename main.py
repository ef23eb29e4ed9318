"""Trains a model with DP-SGD: ``python main.py --config=configs/seq.py [--workdir=DIR]``.

The same as ``python -m fastdp_jax`` and the installed ``fastdp-train`` (fastdp_jax/__main__.py).
"""

from fastdp_jax.__main__ import run

if __name__ == "__main__":
  run()

"""fastdp_jax: differentially private SGD for tabular data in JAX/Flax.

The public API (everything else is internal and may change):

* training: :func:`train_and_evaluate`, :func:`base_config`, and the reusable pieces of a
  run, :func:`setup`, :func:`train`, :func:`finalize` (a :class:`Trainer`);
* the mechanism: :func:`make_clipped_sum` (per-example clipping, ghost or vmap),
  :class:`PoissonSampler` (per-example Poisson sampling), :func:`privatize` (the noise, as an
  optax transform);
* accounting: :func:`compute_epsilon`, :func:`calibrate_noise_multiplier`,
  :class:`PrivacyLedger`;
* the exported model: :func:`load_model`.

Example::

  >>> import fastdp_jax
  >>> round(fastdp_jax.compute_epsilon(4.0, 1024 / 50000, 10000, 1e-5), 2)
  2.09

Names load lazily, so ``import fastdp_jax`` does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train_and_evaluate": "fastdp_jax.train",
    "setup": "fastdp_jax.train",
    "train": "fastdp_jax.train",
    "finalize": "fastdp_jax.train",
    "Trainer": "fastdp_jax.train",
    "base_config": "fastdp_jax.config",
    "make_clipped_sum": "fastdp_jax.ghost",
    "PoissonSampler": "fastdp_jax.sampling",
    "privatize": "fastdp_jax.noise",
    "compute_epsilon": "fastdp_jax.accounting",
    "calibrate_noise_multiplier": "fastdp_jax.accounting",
    "PrivacyLedger": "fastdp_jax.accounting",
    "load_model": "fastdp_jax.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'fastdp_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__

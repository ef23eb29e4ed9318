"""fastdp_jax: differentially private SGD for tabular data in JAX/Flax.

The public API is what this package names (``__all__``), plus the commands (``python -m``);
the folders are the architecture (``docs/architecture.md``): ``data/`` the data contract,
``dp/`` the mechanism and its record, ``export/`` the exported model, and the trainer's
modules at the top.

* training: :func:`train_and_evaluate` (a run from a config and a workdir, returning a frozen
  :class:`RunSummary`), :func:`base_config` (every key, its default and a comment),
  :func:`settings` (a config validated into a typed :class:`RunConfig`), and the run's three
  sections for benchmarks and notebooks: :func:`setup` (a :class:`Trainer` of typed parts),
  ``train.train`` (the loop; ``fastdp_jax.train`` names the module, as in
  ``from fastdp_jax import train``) and :func:`finalize` (the summary and the outputs);
* the mechanism: :func:`make_clipped_sum` (per-example clipping, ghost or vmap),
  :class:`PoissonSampler` (per-example Poisson sampling), :func:`privatize` (the noise, as an
  optax transform);
* accounting (through ``dp_accounting``): :func:`compute_epsilon`,
  :func:`calibrate_noise_multiplier`, and :class:`PrivacyLedger` (every update of a run and
  every question about them);
* the exported model: :func:`load_model`; its metrics recomputed on a dataset directory or a
  raw CSV, with 95 % intervals: :func:`evaluate` (an :class:`Evaluation`); the train/test
  split rule: :func:`is_test_row`; a dataset split: :func:`load_split`; the error every
  bad input raises (a one-line message, exit status 2 on the command line): :class:`UserError`;
  what :func:`train_and_evaluate` raises after a SIGTERM made it checkpoint and stop (exit
  status 143 on the command line; the same call resumes): :class:`Preempted`; the
  TensorBoard tag of each recorded metric: ``TENSORBOARD_TAGS``;
* the report and the audit dataset: ``fastdp_jax.report`` (:func:`~fastdp_jax.report.write_report`)
  and ``fastdp_jax.dp.privacy_eval`` (:func:`~fastdp_jax.dp.privacy_eval.make_audit_dataset`), which
  are also commands (``python -m``).

Examples (run by ``make test``, ``tests/test_doctests.py``). Accounting::

  >>> import jax, numpy as np
  >>> import fastdp_jax
  >>> round(fastdp_jax.compute_epsilon(4.0, 1024 / 50000, 10000, 1e-5), 2)
  2.09
  >>> sigma = fastdp_jax.calibrate_noise_multiplier(2.0, 1024 / 50000, 10000, 1e-5)
  >>> bool(fastdp_jax.compute_epsilon(sigma, 1024 / 50000, 10000, 1e-5) <= 2.0)
  True
  >>> ledger = fastdp_jax.PrivacyLedger(1e-5).add(4.0, 1024 / 50000, 10000)
  >>> round(ledger.epsilon(), 2), ledger.steps
  (2.09, 10000)

The mechanism: which rows an update samples, each example's gradient clipped to C, the noise::

  >>> key = np.array([1, 2], np.uint64)  # a fixed key: reproducible, not secret
  >>> sampler = fastdp_jax.PoissonSampler(1000, 10, key)
  >>> sampler.batches(0, 3).mask.shape == (3, 1, sampler.capacity)
  True
  >>> from fastdp_jax import models
  >>> model = models.create_model(3, (4,), seed=0)
  >>> apply_fn, params = models.functional(model)
  >>> loss_fn = models.example_loss(apply_fn)
  >>> clipped_sum = fastdp_jax.make_clipped_sum("vmap", model, loss_fn, 1.0)
  >>> x, y = np.ones((5, 3), np.float32), np.ones(5, np.float32)
  >>> grads, stats = clipped_sum(params, (x, y), np.ones(5, bool))
  >>> norm = np.sqrt(sum(float((g ** 2).sum()) for g in jax.tree.leaves(grads)))
  >>> bool(norm <= 5 * 1.0 * (1 + 1e-6))  # 5 examples, each within C = 1
  True
  >>> tx = fastdp_jax.privatize(1.0, 1.1, 5, np.zeros(4, np.uint32))
  >>> type(tx).__name__
  'GradientTransformation'

A run, end to end (a tiny generated dataset; fixed seeds, so ``private`` is false)::

  >>> import contextlib, io, tempfile
  >>> from fastdp_jax.data import shards, split
  >>> root = tempfile.mkdtemp()
  >>> rng = np.random.default_rng(0)
  >>> features = (rng.random((600, 3)) < 0.5).astype(np.uint8)
  >>> labels = features[:, 0] ^ (rng.random(600) < 0.1)
  >>> test = split.rows_in_test(np.c_[features, labels])
  >>> with shards.DatasetWriter(f"{root}/data", feature_names=["a", "b", "c"],
  ...                         label_name="y", feature_bounds=(0, 1)) as w:
  ...   w.add("train", features[~test], labels[~test])
  ...   w.add("test", features[test], labels[test])
  >>> cfg = fastdp_jax.base_config()
  >>> cfg.data.path, cfg.num_epochs, cfg.batch_size = f"{root}/data", 1, 50
  >>> cfg.model.hidden_sizes, cfg.dp.noise_multiplier = (4,), 1.0
  >>> cfg.dp.sampling_seed, cfg.dp.noise_seed = 0, 0
  >>> with contextlib.redirect_stdout(io.StringIO()):  # the progress lines
  ...   summary = fastdp_jax.train_and_evaluate(cfg, f"{root}/run")
  >>> summary.steps, summary.private, bool(0 < summary.epsilon < float("inf"))
  (13, False, True)

(13 updates where the exact row count would give 10: q and T come from a DP estimate of the
training rows, whose noise here follows the public noise seed; ``data.num_examples_public=True``
would declare N public instead.)

  >>> predict = fastdp_jax.load_model(f"{root}/run/model")
  >>> predict(features[:2]).shape
  (2,)
  >>> result = fastdp_jax.evaluate(f"{root}/run", f"{root}/data")  # the test metrics again
  >>> result["accuracy"].value == summary.test_accuracy, result["accuracy"].method
  (True, 'clopper-pearson')
  >>> bool(result["accuracy"].low <= summary.test_accuracy <= result["accuracy"].high)
  True

The same run in its three sections (what :func:`train_and_evaluate` does inside, less its
checks of the workdir)::

  >>> from fastdp_jax import train
  >>> settings = fastdp_jax.settings(cfg)  # validated once, typed and frozen
  >>> settings.dp.noise_multiplier, settings.model.hidden_sizes
  (1.0, (4,))
  >>> with contextlib.ExitStack() as cleanup, contextlib.redirect_stdout(io.StringIO()):
  ...   trainer = fastdp_jax.setup(settings, f"{root}/run2", cleanup)
  ...   train.train(trainer)
  ...   again = fastdp_jax.finalize(trainer)
  >>> again.steps, again.epsilon == summary.epsilon
  (13, True)

Names load lazily, so ``import fastdp_jax`` does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the internal module that defines it.
_EXPORTS = {
    "train_and_evaluate": "fastdp_jax.train",
    "setup": "fastdp_jax.train",
    "finalize": "fastdp_jax.train",
    "Trainer": "fastdp_jax.train",
    "base_config": "fastdp_jax.config",
    "settings": "fastdp_jax.config",
    "RunConfig": "fastdp_jax.config",
    "RunSummary": "fastdp_jax.summary",
    "make_clipped_sum": "fastdp_jax.dp.clipping",
    "PoissonSampler": "fastdp_jax.dp.sampling",
    "privatize": "fastdp_jax.dp.noise",
    "compute_epsilon": "fastdp_jax.dp.accounting",
    "calibrate_noise_multiplier": "fastdp_jax.dp.accounting",
    "PrivacyLedger": "fastdp_jax.dp.accounting",
    "load_model": "fastdp_jax.export.predictor",
    "load_split": "fastdp_jax.data.shards",
    "is_test_row": "fastdp_jax.data.split",
    "evaluate": "fastdp_jax.evaluation",
    "Evaluation": "fastdp_jax.evaluation",
    "UserError": "fastdp_jax.errors",
    "Preempted": "fastdp_jax.preemption",
    "TENSORBOARD_TAGS": "fastdp_jax.sinks",
}

# The public module: ``fastdp_jax.train`` is the trainer module, never its ``train`` function
# (a submodule's import binds its name in the package, whatever ``__getattr__`` returns).
_MODULES = ("train",)

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  if name in _MODULES:
    return importlib.import_module(f"fastdp_jax.{name}")
  raise AttributeError(f"module 'fastdp_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__

"""Shared fixtures: small generated data sets (tests never need data from elsewhere)."""

import os
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

# Runs started by the tests (in process or as commands, which inherit it) keep their JAX
# compilation cache (config key compilation_cache_dir, default under ~/.cache) in a directory
# of this session's: never the user's own cache, never shared with a suite running beside it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastdp-tests-cache-")


def make_dataset(path, rows=6000, seed=0, num_features=9, **kw):
  """A CaPUMS-like dataset directory written through the project's shard writer."""
  from fastdp_jax.data import shards as data_lib
  from fastdp_jax.data import split as split_lib
  rng = np.random.default_rng(seed)
  x = (rng.random((rows, num_features)) < 0.4).astype(np.uint8)
  w = rng.normal(size=num_features)
  y = (rng.random(rows) < 1 / (1 + np.exp(-(x @ w - w.sum() * 0.4)))).astype(np.uint8)
  names = (split_lib.CAPUMS_FEATURES if num_features == len(split_lib.CAPUMS_FEATURES)
           else tuple(f"f{i}" for i in range(num_features)))
  test = split_lib.is_test_row(np.arange(rows))
  kw.setdefault("feature_bounds", (0, 1))  # binary features
  with data_lib.DatasetWriter(path, feature_names=names, label_name="employed", **kw) as wr:
    wr.add("train", x[~test], y[~test])
    wr.add("test", x[test], y[test])
  return path


def make_unit_dataset(path, units=1500, max_rows=4, seed=0, num_features=9, max_size=None,
                      **kw):
  """A household-like unit dataset (privacy_unit ``household``) through the shard writer.

  Unit u (id ``H000u``) has 1..``max_size`` rows (default ``max_rows``: none dropped by the
  bound); its rows share a unit effect, and the whole unit lies in the split
  ``units.is_test_unit`` gives its key, as every producer writes it.
  """
  from fastdp_jax.data import shards as data_lib
  from fastdp_jax.data import units as units_lib
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, (max_size or max_rows) + 1, size=units)
  ids = np.repeat([f"H{u:06d}" for u in range(units)], sizes)
  keys = units_lib.unit_keys([list(ids)])
  shared = np.repeat(rng.random((units, num_features)) < 0.4, sizes, axis=0)
  own = rng.random((len(ids), num_features)) < 0.2  # each person differs a little
  x = (shared ^ own).astype(np.uint8)
  w = rng.normal(size=num_features)
  y = (rng.random(len(ids)) < 1 / (1 + np.exp(-(x @ w - w.sum() * 0.4)))).astype(np.uint8)
  names = tuple(f"f{i}" for i in range(num_features))
  test = units_lib.is_test_unit(keys)
  kw.setdefault("feature_bounds", (0, 1))
  with data_lib.DatasetWriter(path, feature_names=names, label_name="employed",
                              privacy_unit="household", max_rows_per_unit=max_rows, **kw) as wr:
    wr.add("train", x[~test], y[~test], unit_keys=keys[~test])
    wr.add("test", x[test], y[test], unit_keys=keys[test])
  return path


def make_config(path, **overrides):
  """configs/test.py on ``path``, with dotted-key overrides (``**{"dp.delta": 1e-6}``)."""
  from configs import test as test_cfg
  cfg = test_cfg.get_config()
  cfg.data.path = path
  for key, value in overrides.items():
    node = cfg
    *head, last = key.split(".")
    for h in head:
      node = node[h]
    node[last] = value
  return cfg


@pytest.fixture
def small_dataset(tmp_path):
  return make_dataset(str(tmp_path / "data"))

"""Shared fixtures: small generated data sets (tests never need data from elsewhere)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


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

"""Public-bin encodings of numeric columns (fastdp_jax/data/bins.py and the spec hooks)."""

import numpy as np
import pytest

from fastdp_jax.data import bins
from fastdp_jax.data import features

BOUNDS = (16.0, 93.0)
CUTS = (20.0, 30.0, 65.0)


def _spec(encoding, cuts=CUTS, **extra):
  cfg = {"name": "t", "features": ("x", "age"), "label": "y",
         "columns": {"x": {"kind": "binary"},
                     "age": {"kind": "numeric", "bounds": BOUNDS, "domain": (0, 130),
                             "bins": cuts, "encoding": encoding, **extra}}}
  return features.spec_from_config(cfg)


def test_onehot_puts_each_value_in_its_one_interval():
  v = np.array([-5.0, 16.0, 19.99, 20.0, 29.0, 30.0, 64.9, 65.0, 93.0, 120.0])
  # Independent: interval i holds [e_i, e_{i+1}), the last one closed; values clipped first.
  e = [16.0, 20.0, 30.0, 65.0, 93.0]
  expect = np.zeros((len(v), 4))
  for r, x in enumerate(np.clip(v, 16.0, 93.0)):
    i = next(i for i in range(4) if e[i] <= x < e[i + 1] or (i == 3 and x == 93.0))
    expect[r, i] = 1
  np.testing.assert_array_equal(bins.encode(v, BOUNDS, CUTS, "onehot"), expect)


def test_pwl_spans_the_piecewise_linear_functions_with_knots_at_the_edges():
  rng = np.random.default_rng(0)
  v = rng.uniform(0, 130, 500)
  ramps = bins.encode(v, BOUNDS, CUTS, "pwl")
  assert ramps.min() >= 0 and ramps.max() <= 1
  # Any continuous piecewise-linear function on the edges is a + ramps @ w with w its slopes
  # times the interval widths: check against np.interp of random knot values.
  e = np.array([16.0, 20.0, 30.0, 65.0, 93.0])
  knots = rng.normal(size=5)
  w = np.diff(knots)
  np.testing.assert_allclose(knots[0] + ramps @ w, np.interp(np.clip(v, 16, 93), e, knots),
                             rtol=0, atol=1e-12)


@pytest.mark.parametrize("encoding", ["onehot", "pwl"])
def test_spec_encodes_bins_with_names_bounds_and_a_stable_canonical_form(encoding):
  spec = _spec(encoding)
  assert spec.num_features == 1 + len(CUTS) + 1
  assert len(spec.feature_names) == len(spec.feature_bounds) == spec.num_features
  assert spec.feature_names[1].startswith("age") and spec.feature_names[-1].endswith("93]")
  rows = np.array([[0, 25.0, 1], [1, 70.0, 0]])
  x, _ = spec.encode(rows)
  # Features are stored as float32: the same value, rounded once.
  np.testing.assert_array_equal(
      x[:, 1:], bins.encode(rows[:, 1], BOUNDS, CUTS, encoding).astype(np.float32))
  again = features.spec_from_dict(spec.to_dict())
  assert again.digest == spec.digest
  np.testing.assert_array_equal(again.encode(rows)[0], x)


def test_a_scaled_column_keeps_its_canonical_form():
  cfg = {"name": "t", "features": ("age",), "label": "y",
         "columns": {"age": {"kind": "numeric", "bounds": BOUNDS}}}
  d = features.spec_from_config(cfg).to_dict()
  assert "bins" not in d["features"][0] and "encoding" not in d["features"][0]


@pytest.mark.parametrize("cuts, encoding, words", [
    ((30.0, 20.0), "pwl", "strictly increasing"),
    ((16.0, 30.0), "pwl", "strictly inside the bounds"),
    ((30.0, 93.0), "onehot", "strictly inside the bounds"),
    ((), "onehot", "non-empty"),
    ((float("nan"),), "pwl", "finite"),
    (CUTS, "spline", "must be one of"),
])
def test_bad_bins_are_refused_naming_the_key(cuts, encoding, words):
  with pytest.raises(features.SpecError, match=words) as e:
    _spec(encoding, cuts)
  assert "columns.age" in str(e.value)


def test_bins_without_an_encoding_default_to_onehot_and_scaled_refuses_bins():
  cfg = {"name": "t", "features": ("age",), "label": "y",
         "columns": {"age": {"kind": "numeric", "bounds": BOUNDS, "bins": CUTS}}}
  assert features.spec_from_config(cfg).features[0].encoding == "onehot"
  cfg["columns"]["age"]["encoding"] = "scaled"
  with pytest.raises(features.SpecError, match="needs encoding"):
    features.spec_from_config(cfg)


def test_the_built_in_binned_spec_uses_only_its_declared_public_cuts():
  spec = features.load_spec("pums_binned")
  raw = features.load_spec("pums_raw")
  from fastdp_jax.data.specs import pums_binned
  age = next(c for c in spec.features if c.name == "age")
  assert age.cuts == tuple(map(float, pums_binned.AGE_CUTS))
  assert spec.label == raw.label and spec.num_features == raw.num_features - 2 + (
      len(pums_binned.AGE_CUTS) + 1 + len(pums_binned.INCOME_CUTS) + 1)

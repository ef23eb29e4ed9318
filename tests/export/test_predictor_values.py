"""Values are checked wherever rows enter: the exported predictor's encoded-feature API.

A row of encoded features with a NaN or inf, a value outside the model's declared feature
bounds or an embedding id outside its vocabulary has no meaningful output (a NaN probability
reads as class 0): the predictor refuses the call naming the rows, ``check_features`` lists
them without raising, and the raw-row paths (``predict_rows``, the predict command) report such
a row as a bad row and predict the others.
"""

import csv

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax import models
from fastdp_jax import predict
from fastdp_jax.data import features as features_lib
from fastdp_jax.export import model_dir
from fastdp_jax.export import predictor as predictor_lib

NAMES = tuple(f"x{i}" for i in range(9))
SPEC = {
    "name": "t", "features": ("flag", "size", "region"), "label": "level",
    "columns": {"flag": {"kind": "binary"},
                "size": {"kind": "numeric", "bounds": (0, 100), "domain": (0, 1000)},
                "region": {"kind": "embedding", "codes": (11, 22, 33), "unknown": "extra_id"}},
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """A binary model of 9 encoded features, without a feature spec."""
  _, params = models.functional(models.create_model(len(NAMES), (5,), seed=0))
  return model_dir.export_model(str(tmp_path_factory.mktemp("plain") / "model"),
                                params=params, feature_names=NAMES, label_name="y",
                                hidden_sizes=(5,))


@pytest.fixture(scope="module")
def with_spec(tmp_path_factory):
  """A binary model with a feature spec: bounds [0, 1], an embedding of 4 ids."""
  spec = features_lib.spec_from_config(SPEC)
  names = spec.feature_names
  emb = models.embedding_inputs(names, spec.embeddings, 2)
  _, params = models.functional(models.create_model(len(names), (4,), seed=1, embeddings=emb))
  return model_dir.export_model(str(tmp_path_factory.mktemp("spec") / "model"),
                                params=params, feature_names=names, label_name="level",
                                hidden_sizes=(4,), feature_spec=spec.to_dict())


def test_values_checked_wherever_rows_enter_encoded_predictor_nan(plain):
  predictor = fastdp_jax.load_model(plain)
  for call in (predictor.predict, predictor, predictor.logits):
    with pytest.raises(predictor_lib.RowInputError, match=r"row 0: column 'x0': nan is not "
                       "a finite number") as info:
      call(np.full((1, 9), np.nan))
    assert [(e.row, e.column, e.reason) for e in info.value.errors] == [(0, "x0", "non_finite")]
  x = np.zeros((4, 9), np.float32)
  x[1, 3], x[3, 8] = np.inf, -np.inf
  with pytest.raises(predictor_lib.RowInputError, match=r"2 row\(s\).*row 1: column 'x3'"):
    predictor.predict(x)
  assert [(e.row, e.column, e.reason) for e in predictor.check_features(x)] == [
      (1, "x3", "non_finite"), (3, "x8", "non_finite")]
  # The other rows predict as they would alone; a model without a feature spec declares no
  # bounds, so any finite value is taken.
  keep = [0, 2]
  assert predictor.check_features(x[keep] + 5) == []
  assert predictor.predict(x[keep]).shape == (2,)


def test_values_checked_wherever_rows_enter_encoded_predictor_bounds(with_spec):
  predictor = fastdp_jax.load_model(with_spec)
  assert predictor.feature_bounds == ((0.0, 1.0), (0.0, 1.0), (0.0, 3.0))
  x = np.array([[1, 0.5, 2], [1, 1.5, 2], [0, 0.5, 3.5], [0, 0.5, 7], [1, -0.1, 0],
                [0, 1, 3]], np.float32)
  got = [(e.row, e.column, e.reason) for e in predictor.check_features(x)]
  assert got == [(1, "size", "out_of_bounds"), (2, "region", "out_of_bounds"),
                 (3, "region", "out_of_bounds"), (4, "size", "out_of_bounds")]
  with pytest.raises(predictor_lib.RowInputError, match=r"row 1: column 'size': 1.5 is "
                     r"outside the model's feature bounds \[0, 1\]"):
    predictor(x)
  assert predictor.predict(x[[0, 5]]).shape == (2,)


def test_values_checked_wherever_rows_enter_predict_cli(with_spec, tmp_path, monkeypatch):
  """An encoder that disagrees with the model (here: a NaN for one row) gives bad rows."""
  real = features_lib.FeatureSpec.encode_features

  def faulty(self, values):
    out = real(self, values).astype(np.float32)
    out[values[:, 1] == 42, 1] = np.nan  # the rows whose size is 42
    return out

  monkeypatch.setattr(features_lib.FeatureSpec, "encode_features", faulty)
  data = tmp_path / "in.csv"
  data.write_text("flag,size,region\n1,5,11\n0,42,22\n1,7,33\n")
  out, errs = tmp_path / "p.csv", tmp_path / "e.csv"
  assert predict.main(["--model", with_spec, "--input", str(data), "--output", str(out),
                       "--errors", str(errs)]) == 0
  with open(out) as f:
    assert [int(r["row"]) for r in csv.DictReader(f)] == [0, 2]
  with open(errs) as f:
    assert [(r["row"], r["line"], r["column"], r["reason"]) for r in csv.DictReader(f)] == [
        ("1", "3", "size", "non_finite")]
  result = fastdp_jax.load_model(with_spec).predict_rows(
      [{"flag": 1, "size": 42, "region": 11}, {"flag": 1, "size": 3, "region": 11}])
  assert result.rows.tolist() == [1]
  assert [(e.row, e.line, e.reason) for e in result.errors] == [(0, None, "non_finite")]

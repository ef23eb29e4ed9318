"""``predict`` handles a bad line as a bad row whatever its length.

Only the header may refuse an input as a whole; a data line of 1 MiB or more is one bad row,
named with its row, line and reason, on the local path and the Spark path alike, and the
other rows are predicted.
"""

import csv

import numpy as np
import pytest

from fastdp_jax import models
from fastdp_jax import predict
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib
from fastdp_jax.export import model_dir
from tests import preprocessing_helpers as T

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

SPEC = {
    "name": "t", "features": ("flag", "size", "region"), "label": "level",
    "columns": {"flag": {"kind": "binary"},
                "size": {"kind": "numeric", "bounds": (0, 100), "domain": (0, 1000)},
                "region": {"kind": "embedding", "codes": (11, 22, 33), "unknown": "extra_id"}},
}
LONG = cleaning.MAX_HEADER_BYTES + 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  spec = features_lib.spec_from_config(SPEC)
  names = spec.feature_names
  emb = models.embedding_inputs(names, spec.embeddings, 2)
  _, params = models.functional(models.create_model(len(names), (4,), seed=1, embeddings=emb))
  return model_dir.export_model(str(tmp_path_factory.mktemp("m") / "model"), params=params,
                                feature_names=names, label_name="level", hidden_sizes=(4,),
                                feature_spec=spec.to_dict())


def _input(tmp_path):
  path = tmp_path / "in.csv"
  path.write_text("flag,size,region,note\n"
                  f"1,{'x' * LONG},11,a\n"         # a 1 MiB token in a used column
                  "0,5,22,b\n"
                  f"1,{'1' * LONG},33,c\n"         # a 1 MiB number: not finite
                  f"1,7,33,{'n' * LONG}\n"         # a 1 MiB value in an ignored column
                  f"{'flag,' * (LONG // 5)}\n"     # a 1 MiB line of the wrong arity
                  "1,9,11,d\n")
  return str(path)


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _check(out, errs):
  assert [r["line"] for r in _read(out)] == ["3", "5", "7"]
  assert [(r["row"], r["line"], r["column"], r["reason"]) for r in _read(errs)] == [
      ("0", "2", "size", "non_numeric"), ("2", "4", "size", "non_numeric"),
      ("4", "6", "", "wrong_arity")]
  assert all(len(r["detail"]) < 200 for r in _read(errs))  # the value is shown shortened


def test_predict_handles_a_bad_line_as_a_bad_row_whatever_its_length(model, tmp_path, capsys):
  data = _input(tmp_path)
  out, errs = tmp_path / "p.csv", tmp_path / "e.csv"
  assert predict.main(["--model", model, "--input", data, "--output", str(out),
                       "--errors", str(errs)]) == 0
  assert "6 rows, 3 predicted" in capsys.readouterr().out
  _check(out, errs)


def test_a_header_over_the_limit_is_still_refused_whole(model, tmp_path, capsys):
  path = tmp_path / "long_header.csv"
  path.write_text(f"flag,size,region,{'h' * LONG}\n1,5,11,a\n")
  assert predict.main(["--model", model, "--input", str(path), "--output",
                       str(tmp_path / "p.csv")]) == 2
  assert "longest header accepted" in capsys.readouterr().err
  assert not (tmp_path / "p.csv").exists()


def test_predict_handles_a_bad_line_as_a_bad_row_whatever_its_length_spark(model, tmp_path):
  why_not = T.spark_available()
  if why_not is not None:
    pytest.skip(str(why_not))
  session = T.spark_session("test_predict_long_lines")
  spark = next(session)
  try:
    data = _input(tmp_path)
    out, errs = tmp_path / "p.csv", tmp_path / "e.csv"
    counts = predict.predict_csv(model, data, str(out), str(errs), spark=spark)
    assert counts[:3] == (6, 3, 3)
    _check(out, errs)
    local_out, local_errs = tmp_path / "lp.csv", tmp_path / "le.csv"
    predict.predict_csv(model, data, str(local_out), str(local_errs))
    assert out.read_bytes() == local_out.read_bytes()
    assert errs.read_bytes() == local_errs.read_bytes()
  finally:
    session.close()
  assert np.isfinite([float(r["probability"]) for r in _read(out)]).all()

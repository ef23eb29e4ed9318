"""The exported model predicts raw rows: raw CSV -> Spark job -> training -> export ->
``python -m fastdp_jax.predict`` gives the trainer's own evaluation of the same rows, and every
bad row is reported with its row, column and reason instead of a number.

One SparkSession (local[2]) serves the module; the data are generated (a few thousand rows).
"""

import contextlib
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax import metrics as metrics_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.export import layout
from fastdp_jax.export import predictor as predictor_lib
from fastdp_jax import models
from fastdp_jax import predict
from fastdp_jax.data import split as split_lib
from fastdp_jax import train
from fastdp_jax.data import features as features_lib
from preprocessing import synthesize as S
from tests import preprocessing_helpers as T

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WHY_NOT = T.spark_available()
ROWS = 3000


@pytest.fixture(scope="module")
def spark():
  if _WHY_NOT is not None:
    pytest.skip(str(_WHY_NOT))
  yield from T.spark_session("test_predict")


@pytest.fixture(scope="module")
def raw_csv(tmp_path_factory):
  """Generated raw-schema rows (a few NA cells: those rows are dropped, and not predicted)."""
  path = str(tmp_path_factory.mktemp("raw") / "raw.csv")
  S.write_csv_file(path, ROWS, schema_name="raw", seed=3, na_fraction=0.002)
  return path


def _trained(spark, raw_csv, tmp_path, spec_name):
  """Spark job, then a short reproducible training (configs/test.py) with its export."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  data = str(tmp_path / "data")
  spark_job.run_job(spark, raw_csv, data, spec_name)
  cfg = test_config.get_config()
  cfg.data.path = data
  cfg.num_epochs = 1
  cfg.checkpoint.enabled = False
  workdir = str(tmp_path / "w")
  summary = train.train_and_evaluate(cfg, workdir)
  return cfg, data, workdir, summary


def _trainer_evaluation(cfg, workdir, test):
  """The trainer's own evaluation code (build_eval + evaluate_split) on the test shards."""
  with open(os.path.join(workdir, "model", layout.SPEC_FILE)) as f:
    model_dict = json.load(f)["model"]
  head = models.TaskHead(kind=model_dict["task"], num_classes=len(model_dict["classes"]),
                         bounds=None if model_dict["bounds"] is None else
                         tuple(model_dict["bounds"]))
  manifest = manifest_lib.read_manifest(cfg.data.path)
  tables = models.embedding_inputs(manifest.feature_names, manifest.embeddings,
                                   cfg.model.embedding_dim)
  net = models.create_model(test.features.shape[1], cfg.model.hidden_sizes, seed=0,
                            num_outputs=head.num_outputs, embeddings=tables)
  apply_fn, template = models.functional(net)
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  final = np.load(os.path.join(workdir, "final_params.npz"))
  params = jax.tree_util.tree_unflatten(
      treedef, [final["/".join(str(getattr(k, "key", k)) for k in p)] for p, _ in leaves])
  _, accuracy, preds = metrics_lib.evaluate_split(metrics_lib.build_eval(apply_fn, head), params,
                                               test.features, test.labels, cfg.eval_batch_size)
  return accuracy, preds


@contextlib.contextmanager
def _small_splits(spark, max_bytes=20_000):
  """Input splits of ``max_bytes``: a few thousand rows come in several partitions."""
  key = "spark.sql.files.maxPartitionBytes"
  spark.conf.set(key, str(max_bytes))
  try:
    yield
  finally:
    spark.conf.unset(key)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("spec_name", ["pums_raw", "pums_educ", "pums_income", "pums_puma"])
def test_cli_on_the_raw_csv_equals_the_trainers_evaluation(spark, raw_csv, tmp_path,
                                                           spec_name):
  cfg, data, workdir, summary = _trained(spark, raw_csv, tmp_path, spec_name)
  out, errs = str(tmp_path / "pred.csv"), str(tmp_path / "errors.csv")
  run = subprocess.run([sys.executable, "-m", "fastdp_jax.predict", "--model", workdir,
                        "--input", raw_csv, "--output", out, "--errors", errs],
                       capture_output=True, text=True, cwd=ROOT, check=False, timeout=600)
  assert run.returncode == 0, run.stderr
  manifest = manifest_lib.read_manifest(data)
  pv = manifest.provenance
  predicted, bad = _read_csv(out), _read_csv(errs)
  # The predictor needs the features, not the label: it predicts every row whose features
  # are all present (the Spark job also dropped the rows without a label), and reports the
  # others, naming a missing feature column.
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = pd.read_csv(raw_csv)
  spec = features_lib.load_spec(spec_name)
  na_features = frame[list(spec.used_columns[:-1])].isna().any(axis=1).to_numpy()
  na_label = frame[spec.label].isna().to_numpy()
  assert pv.kept == int((~na_features & ~na_label).sum()) and na_features.any()
  assert f"{ROWS} rows, {int((~na_features).sum())} predicted" in run.stdout
  rows = np.array([int(r["row"]) for r in predicted])
  np.testing.assert_array_equal(rows, np.flatnonzero(~na_features))
  assert [int(r["row"]) for r in bad] == np.flatnonzero(na_features).tolist()
  assert {r["reason"] for r in bad} == {"missing"}
  assert all(r["column"] in spec.used_columns[:-1] for r in bad)
  # The test rows are the kept (labelled) rows that the row-level rule puts in the test
  # split: each encoded row's content and its occurrence among the identical kept rows
  # before it (the Spark job's row id of a single file's row is its data-row position).
  with open(raw_csv, encoding="utf-8") as f:
    lines = f.read().splitlines()
  labelled = cleaning.LineCleaner(spec, cleaning.parse_header(lines[0])).clean(lines[1:])
  in_test = split_lib.rows_in_test(labelled.values,
                                   seed=manifest.extra["split"]["seed"],
                                   test_fraction=manifest.extra["split"]["test_fraction"])
  test_ids = set(np.asarray(labelled.kept)[in_test].tolist())
  test = data_lib.load_split(data, "test")
  mine = [r for r in predicted if int(r["row"]) in test_ids]
  assert len(mine) == len(test)
  accuracy, expected = _trainer_evaluation(cfg, workdir, test)
  if spec_name == "pums_educ":
    classes = manifest.task.classes
    got = np.array([[float(r[f"p_{c}"]) for c in classes] for r in mine])
    labels = np.array([classes.index(r["prediction"]) for r in mine])
  elif spec_name in ("pums_raw", "pums_puma"):  # binary (pums_puma: an embedding input)
    got = np.array([float(r["probability"]) for r in mine])
    labels = np.array([int(r["prediction"]) for r in mine])
  else:
    # The CLI writes income in its own units (expm1 of the model's log1p-scale value, in
    # float32); back on the model's scale it is the trainer's value.
    got = np.log1p(np.array([float(r["prediction"]) for r in mine]))
  # Same float32 inputs (one encoder) and the same float32 parameters through the same
  # forward: only the accumulation order of the matrix products may differ with the batch
  # shape, a few float32 ulps (eps = 1.2e-7) on outputs of order 1 (regression: up to
  # log1p(1e6) = 13.8, hence the relative part; the float32 rounding of expm1's value adds
  # eps / 2 to log1p's value, within it).
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  if spec_name != "pums_income":
    # The reported test accuracy is a ratio of counts: it is recomputed exactly.
    assert np.mean(labels == test.labels) == pytest.approx(summary.test_accuracy, abs=1e-12)
    assert accuracy == pytest.approx(summary.test_accuracy, abs=1e-12)
  # The export carries the spec: the same rows through the Python API agree with the CLI.
  predictor = fastdp_jax.load_model(workdir)
  assert predictor.feature_spec.name == spec_name
  api = predictor.predict_rows(raw_csv)
  np.testing.assert_array_equal(api.rows, np.array([int(r["row"]) for r in predicted]))
  assert len(api.errors) == len(bad)
  # Through Spark (several input splits): the same bytes, for every task.
  with _small_splits(spark):
    predict.predict_csv(workdir, raw_csv, str(tmp_path / "s.csv"), str(tmp_path / "se.csv"),
                        spark=spark)
  assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "pred.csv").read_bytes()
  assert (tmp_path / "se.csv").read_bytes() == (tmp_path / "errors.csv").read_bytes()


@pytest.fixture(scope="module")
def raw_model(spark, raw_csv, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("raw_model")
  _, _, workdir, _ = _trained(spark, raw_csv, tmp, "pums_raw")
  return fastdp_jax.load_model(workdir), workdir


GOOD = {"state": 13, "puma": 1101, "sex": 1, "age": 51, "educ": 11, "income": 2200,
        "latino": 0, "black": 0, "asian": 0, "married": 1, "divorced": 0, "uscitizen": 1,
        "children": 0, "disability": 0, "militaryservice": 0, "employed": 0,
        "englishability": 1, "fips": 13121}


def test_each_bad_input_is_reported_with_row_and_column(raw_model, tmp_path):
  predictor, _ = raw_model
  bad_rows = [
      ("age", "abc", "non_numeric"),            # wrong type (text)
      ("age", True, "non_numeric"),             # wrong type (a bool)
      ("income", float("nan"), "missing"),      # NaN
      ("income", float("inf"), "non_numeric"),  # non-finite
      ("educ", 17, "out_of_domain"),            # unknown category
      ("sex", 2, "out_of_domain"),              # a binary column that is not 0/1
      ("age", 200, "out_of_domain"),            # outside the hard domain [0, 130]
      ("married", None, "missing"),             # no value
      ("disability", "NA", "missing"),          # an NA token
  ]
  rows = [dict(GOOD)]
  for column, value, _ in bad_rows:
    rows.append(dict(GOOD, **{column: value}))
  rows.append({k: v for k, v in GOOD.items() if k != "asian"})  # a row without the column
  rows.append(dict(GOOD, age=93.5, extra_column="ignored"))
  result = predictor.predict_rows(rows)
  assert result.num_rows == len(rows)
  np.testing.assert_array_equal(result.rows, [0, len(rows) - 1])
  got = [(e.row, e.column, e.reason) for e in result.errors]
  expected = [(i + 1, c, r) for i, (c, _, r) in enumerate(bad_rows)]
  expected.append((len(rows) - 2, "asian", "missing"))
  assert got == expected
  for e in result.errors:
    assert e.column in e.detail
  # The good rows get the numbers the encoded features give (the same encoder as Spark).
  spec = features_lib.load_spec("pums_raw")
  x = spec.encode_features(np.array([[GOOD[c] for c in spec.used_columns[:-1]],
                                     [dict(GOOD, age=93.5)[c] for c in spec.used_columns[:-1]]],
                                    np.float64))
  np.testing.assert_array_equal(result.outputs, predictor(x))
  # Calling the predictor on bad raw rows raises, naming the first bad row and column.
  with pytest.raises(predictor_lib.RowInputError, match=r"row 0: column 'age': 'abc' is not"):
    predictor(rows[1:2])
  # A DataFrame in another column order gives the same outputs as the dicts.
  pd = pytest.importorskip("pandas")
  frame = pd.DataFrame([GOOD, dict(GOOD, educ=17)])[sorted(GOOD)[::-1]]
  df_result = predictor.predict_rows(frame)
  # Another batch shape (1 row, not 2) may change the matmul's accumulation order: a few
  # float32 ulps (eps 1.2e-7) on a probability.
  np.testing.assert_allclose(df_result.outputs, result.outputs[:1], rtol=1e-6, atol=1e-6)
  assert [(e.row, e.column, e.reason) for e in df_result.errors] == [(1, "educ",
                                                                      "out_of_domain")]


def test_csv_errors_name_the_line_and_a_missing_column_is_unusable(raw_model, tmp_path):
  predictor, workdir = raw_model
  cols = list(GOOD)[::-1]  # another column order
  good = ",".join(str(GOOD[c]) for c in cols)
  lines = [",".join(cols), good, good.replace("13121", "13121,5"), "",
           ",".join("x" if c == "income" else str(GOOD[c]) for c in cols), good]
  path = tmp_path / "in.csv"
  path.write_text("\n".join(lines) + "\n")
  out, errs = tmp_path / "p.csv", tmp_path / "e.csv"
  assert predict.main(["--model", workdir, "--input", str(path), "--output", str(out),
                       "--errors", str(errs)]) == 0
  assert [int(r["line"]) for r in _read_csv(out)] == [2, 6]
  assert [(r["line"], r["column"], r["reason"]) for r in _read_csv(errs)] == [
      ("3", "", "wrong_arity"), ("4", "", "blank_line"), ("5", "income", "non_numeric")]
  p = predictor.predict_rows([GOOD])
  # 2 rows against 1: a few float32 ulps apart at most (see above).
  np.testing.assert_allclose([float(r["probability"]) for r in _read_csv(out)],
                             [float(p.outputs[0])] * 2, rtol=1e-6, atol=1e-6)
  # A header without a column the model needs: unusable input, exit status 2, one line.
  (tmp_path / "short.csv").write_text(",".join(c for c in cols if c != "age") + "\n")
  run = subprocess.run([sys.executable, "-m", "fastdp_jax.predict", "--model", workdir,
                        "--input", str(tmp_path / "short.csv"), "--output",
                        str(tmp_path / "q.csv")], capture_output=True, text=True, cwd=ROOT,
                       check=False, timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().count("\n") == 0 and "missing ['age']" in run.stderr
  assert not (tmp_path / "q.csv").exists()


def _dirty_copy(raw_csv, path):
  """The raw CSV with bad lines among the good ones (and CRLF, CR and invalid UTF-8 bytes)."""
  with open(raw_csv, "rb") as f:
    lines = f.read().split(b"\n")[:-1]
  header = lines[0].split(b",")
  age = header.index(b'"age"')
  out = [lines[0]]
  for i, line in enumerate(lines[1:]):
    if i % 97 == 5:
      out.append(line + b",extra")                       # wrong arity
    elif i % 89 == 7:
      out.append(b"")                                    # blank line
    elif i % 83 == 3:
      fields = line.split(b",")
      fields[age] = b"\xff\xfeold"                       # undecodable, then non-numeric
      out.append(b",".join(fields))
    elif i % 79 == 2:
      out.append(line + b"\r")                           # CRLF
    elif i % 71 == 1:
      out.append(line + b"\r" + lines[1 + (i + 1) % (len(lines) - 1)])  # CR ends a line
    else:
      out.append(line)
  path.write_bytes(b"\n".join(out) + b"\n")
  return str(path)


def _outputs(tmp_path, name, workdir, data, **kwargs):
  out, errs = tmp_path / f"{name}.csv", tmp_path / f"{name}-errors.csv"
  counts = predict.predict_csv(workdir, data, str(out), str(errs), **kwargs)
  assert oct(os.stat(out).st_mode & 0o777) == oct(0o600)
  return counts[:3], out.read_bytes(), errs.read_bytes()


@pytest.mark.parametrize("block_rows", [97, predict.BLOCK_ROWS])
def test_spark_path_writes_the_local_paths_bytes(spark, raw_model, raw_csv, tmp_path,
                                                 block_rows):
  _, workdir = raw_model
  data = _dirty_copy(raw_csv, tmp_path / "dirty.csv")
  local = _outputs(tmp_path, "local", workdir, data, block_rows=block_rows)
  with _small_splits(spark):
    assert spark.read.text(data).rdd.getNumPartitions() >= 5  # the order is exercised
    remote = _outputs(tmp_path, "spark", workdir, data, spark=spark, block_rows=block_rows)
  assert remote[0] == local[0] and local[0][2] > 40  # rows read, predicted, with errors
  reasons = {r["reason"] for r in _read_csv(tmp_path / "local-errors.csv")}
  assert {"wrong_arity", "blank_line", "non_numeric", "missing"} <= reasons
  assert remote[1] == local[1]
  assert remote[2] == local[2]


def test_spark_cli_and_a_missing_column_before_spark(spark, raw_model, raw_csv, tmp_path,
                                                     monkeypatch, capsys):
  _, workdir = raw_model
  cols = list(GOOD)
  (tmp_path / "short.csv").write_text(",".join(c for c in cols if c != "age") + "\n")
  args = ["--model", workdir, "--input", str(tmp_path / "short.csv"), "--output",
          str(tmp_path / "q.csv")]
  assert predict.main(args) == 2
  local_err = capsys.readouterr().err
  from fastdp_jax.data import spark as spark_lib  # pylint: disable=g-import-not-at-top

  def no_spark(*_, **__):
    raise AssertionError("Spark was started for an input refused by its header")

  monkeypatch.setattr(spark_lib, "create_session", no_spark)
  assert predict.main([*args, "--spark"]) == 2
  assert capsys.readouterr().err == local_err and "missing ['age']" in local_err
  assert not (tmp_path / "q.csv").exists()
  # The command line, in its own process (its own session, stopped at the end).
  out = tmp_path / "cli.csv"
  run = subprocess.run([sys.executable, "-m", "fastdp_jax.predict", "--model", workdir,
                        "--input", raw_csv, "--output", str(out), "--spark", "--master",
                        "local[2]"], capture_output=True, text=True, cwd=ROOT, check=False,
                       timeout=600)
  assert run.returncode == 0, run.stderr
  local = _outputs(tmp_path, "local", workdir, raw_csv)
  assert f"{local[0][0]} rows, {local[0][1]} predicted" in run.stdout
  assert out.read_bytes() == local[1]

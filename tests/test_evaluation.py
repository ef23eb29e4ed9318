"""``fastdp_jax.evaluate``: the run's test metrics recomputed from public functions, with
intervals; the same rows from the dataset directory and from the raw CSV."""

import contextlib
import io

import numpy as np
import pytest

import fastdp_jax
from conftest import make_config
from fastdp_jax import evaluation
from tests import preprocessing_helpers as T

# The run computes its metrics in float32 on the device, evaluate() in float64 from the
# exported model's float32 outputs: they agree to float32's precision on an O(1) metric,
# summed over ~1,000 rows.
FLOAT32_TOLERANCE = 1e-5


def _check_intervals(result):
  """What holds of every interval: the exact one contains its proportion; a bootstrap one
  is a proper interval (a biased statistic's, such as ECE's, which resampling inflates, may
  lie above the value: percentile intervals do not promise to contain it)."""
  acc = result["accuracy"] if "accuracy" in result.metrics else None
  if acc is not None:
    assert acc.low <= acc.value <= acc.high
  for name, interval in result.metrics.items():
    assert np.isfinite([interval.low, interval.high]).all(), name
    assert interval.low < interval.high, name  # over 500 rows: never a single point


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A CaPUMS CSV with malformed lines -> the streaming pipeline -> a tiny training run."""
  from preprocessing.mapreduce import local  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("evaluation")
  csv = T.dirty_capums(root, 6000, seed=4, malformed=15, malformed_seed=2)["dirty"]
  data = str(root / "data")
  local.run_local(csv, data, "capums")
  cfg = make_config(data, num_epochs=3)
  with contextlib.redirect_stdout(io.StringIO()):
    summary = fastdp_jax.train_and_evaluate(cfg, str(root / "run"))
  return {"csv": csv, "data": data, "workdir": str(root / "run"), "summary": summary}


def test_evaluate_gives_the_runs_test_metrics_with_intervals_around_them(run):
  s = run["summary"]
  result = fastdp_jax.evaluate(run["workdir"], run["data"])
  assert (result.task, result.split, result.rows) == ("binary", "test", s.test_examples)
  assert result["accuracy"].value == s.test_accuracy  # a count over the same rows: exact
  assert result["accuracy"].method == "clopper-pearson"
  for name in ("loss", "auc", "brier", "ece"):
    assert result[name].value == pytest.approx(getattr(s, f"test_{name}"),
                                               abs=FLOAT32_TOLERANCE), name
    assert result[name].method == "bootstrap"
  _check_intervals(result)
  assert result.resamples == evaluation.BOOTSTRAP_RESAMPLES
  assert fastdp_jax.evaluate(run["workdir"], run["data"]) == result  # a fixed seed


def test_the_raw_csv_and_the_public_split_rule_give_the_same_rows(run):
  from_dataset = fastdp_jax.evaluate(run["workdir"], run["data"])
  from_csv = fastdp_jax.evaluate(run["workdir"], run["csv"], split_seed=69, test_fraction=0.2)
  assert from_csv == from_dataset
  other = fastdp_jax.evaluate(run["workdir"], run["csv"], split_seed=70, resamples=10)
  assert other.rows != from_dataset.rows or other["accuracy"] != from_dataset["accuracy"]


def test_clopper_pearson_matches_the_exact_binomial_interval():
  # R: binom.test(8, 10)$conf.int = 0.4439045 0.9747893; the ends are exact at 0 and n.
  low, high = evaluation.clopper_pearson(8, 10)
  assert (round(low, 7), round(high, 7)) == (0.4439045, 0.9747893)
  assert evaluation.clopper_pearson(0, 10)[0] == 0.0
  assert evaluation.clopper_pearson(10, 10)[1] == 1.0
  # Its coverage is at least the level: the binomial probability of the successes whose
  # interval contains p, for a few p.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = 40
  for p in (0.05, 0.3, 0.5, 0.9):
    covered = [k for k in range(n + 1)
               if (lambda iv: iv[0] <= p <= iv[1])(evaluation.clopper_pearson(k, n))]
    assert stats.binom.pmf(np.array(covered), n, p).sum() >= 0.95


def test_a_split_that_does_not_exist_is_a_user_error(run):
  with pytest.raises(fastdp_jax.UserError, match="validation"):
    fastdp_jax.evaluate(run["workdir"], run["data"], split="validation")


def test_the_report_shows_the_intervals(run, tmp_path):
  from fastdp_jax import report  # pylint: disable=g-import-not-at-top
  path = report.write_report([run["workdir"]], str(tmp_path / "report"), data=run["data"])
  text = open(path, encoding="utf-8").read()
  result = fastdp_jax.evaluate(run["workdir"], run["data"])
  acc = result["accuracy"]
  # The table's exact interval, from the summary's counts, is evaluate()'s.
  assert f"[{acc.low:.4g}, {acc.high:.4g}]" in text.split("## Test metrics")[0]
  section = text.split("## Test metrics")[1]
  for name, iv in result.metrics.items():
    assert f"| {name} | {iv.value:.4g} | [{iv.low:.4g}, {iv.high:.4g}] | {iv.method} |" in section


@pytest.mark.parametrize("kind,exact,close", [
    ("multiclass", ("accuracy",), ("loss", "macro_f1", "brier", "ece")),
    ("regression", (), ("rmse", "mae")),
])
def test_multiclass_and_regression_metrics_are_the_runs(kind, exact, close, tmp_path):
  from tests.test_tasks import _config, _write  # pylint: disable=g-import-not-at-top
  data = _write(str(tmp_path / "data"), kind, rows=3000)
  with contextlib.redirect_stdout(io.StringIO()):
    s = fastdp_jax.train_and_evaluate(_config(data, num_epochs=2), str(tmp_path / "run"))
  result = fastdp_jax.evaluate(str(tmp_path / "run"), data, resamples=200)
  assert sorted(result.metrics) == sorted(exact + close)
  for name in exact:
    assert result[name].value == getattr(s, f"test_{name}"), name
  for name in close:
    # RMSE and MAE are in the label's units (0-10 here): float32's relative precision.
    assert result[name].value == pytest.approx(getattr(s, f"test_{name}"),
                                               rel=FLOAT32_TOLERANCE, abs=FLOAT32_TOLERANCE)
  _check_intervals(result)

"""Your own table, end to end: a raw CSV with R's row names, string categories and a yes/no
label -> ``fastdp-spec init --epsilon 0.5`` -> the streaming data command -> a tiny training
(configs/test.py) -> an exported model whose card states the task and the total epsilon
(training plus the spec's estimates) -> predictions from the same raw CSV, equal to the model
on the rows the trainer saw.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax import train
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.export import layout
from preprocessing.mapreduce import local
from tests.conftest import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 4000
EPSILON = 0.5
REGIONS = ("northeast", "south", "west")


def _raw_table(path):
  """R's write.csv of a table: row names in an unnamed first column, strings quoted."""
  rng = np.random.default_rng(7)
  age = rng.integers(18, 80, ROWS)
  region = rng.integers(0, len(REGIONS), ROWS)
  smoker = rng.random(ROWS) < 0.3
  logit = -1.5 + 0.04 * (age - 45) + 1.8 * smoker + 0.6 * (region == 1)
  label = rng.random(ROWS) < 1 / (1 + np.exp(-logit))
  yn = np.array(["no", "yes"])
  with open(path, "w") as f:
    f.write('"","age","region","smoker","high_cost"\n')
    for i in range(ROWS):
      f.write(f'"{i + 1}",{age[i]},"{REGIONS[region[i]]}","{yn[int(smoker[i])]}",'
              f'"{yn[int(label[i])]}"\n')
  return str(path)


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("own")
  raw = _raw_table(tmp / "insurance.csv")
  spec_path = str(tmp / "insurance_spec.py")
  done = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.data.spec_init", "init", raw, "--label", "high_cost",
       "--epsilon", str(EPSILON), "--output", spec_path],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  data = str(tmp / "data")
  local.run_local(raw, data, spec_path)
  summary = train.train_and_evaluate(make_config(data), str(tmp / "work"))
  return raw, spec_path, data, summary


def test_the_spec_is_private_estimates_of_the_table(own_model):
  _, spec_path, data, _ = own_model
  spec = features_lib.load_spec(spec_path)
  assert spec.label == "high_cost" and "unnamed_0" not in [c.name for c in spec.features]
  assert spec.target.kind == "binary" and spec.target.positive == "yes"
  assert spec.estimate_epsilon in (EPSILON, 0.4 * EPSILON)  # 0.4: no numeric column found
  assert spec.estimate_delta > 0
  manifest = json.load(open(os.path.join(data, "manifest.json")))
  assert manifest["extra"]["spec"]["private_estimates"]["epsilon"] == spec.estimate_epsilon


def test_the_card_states_the_task_and_the_total_epsilon(own_model):
  _, spec_path, _, summary = own_model
  spec = features_lib.load_spec(spec_path)
  assert summary.task == "binary"
  assert summary.spec_epsilon == spec.estimate_epsilon
  assert summary.epsilon == pytest.approx(summary.training_epsilon + spec.estimate_epsilon,
                                          rel=1e-12)
  assert summary.delta == pytest.approx(summary.accountant_delta
                                        + (summary.overflow_delta or 0)
                                        + spec.estimate_delta, rel=1e-12)
  model = fastdp_jax.load_model(summary.model_dir)  # its consistency checks pass
  with open(os.path.join(summary.model_dir, layout.CARD_FILE)) as f:
    card = f.read()
  assert "binary classification of `high_cost`" in card.lower() or (
      "binary classifier of `high_cost`" in card.lower())
  assert "the spec's estimates" in card and "fastdp-spec init --epsilon" in card
  priv = json.load(open(os.path.join(summary.model_dir, "model.json")))["privacy"]
  assert priv["spec_epsilon"] == spec.estimate_epsilon
  assert priv["epsilon"] == pytest.approx(summary.epsilon)
  assert model.task == "binary"


def test_predictions_from_the_same_raw_csv(own_model):
  raw, spec_path, data, summary = own_model
  spec = features_lib.load_spec(spec_path)
  model = fastdp_jax.load_model(summary.model_dir)
  got = model.predict_rows(raw)
  assert got.num_rows == ROWS
  # Every row the spec's released values describe is predicted; the others are reported.
  with open(raw) as f:
    lines = f.read().splitlines()
  kept = cleaning.LineCleaner(spec, cleaning.parse_header(lines[0]),
                              with_label=False).clean(lines[1:]).kept
  np.testing.assert_array_equal(got.rows, kept)
  assert len(got.errors) == ROWS - len(kept)
  # The test rows' predictions are the model on the test shards the trainer evaluated (the
  # label is always yes or no here, so every predicted row is a kept row of the shards, in
  # row order, and its split is the row-level rule on the encoded rows).
  labelled = cleaning.LineCleaner(spec, cleaning.parse_header(lines[0])).clean(lines[1:])
  np.testing.assert_array_equal(labelled.kept, got.rows)
  test_rows = got.rows[split_lib.rows_in_test(labelled.values)]
  shard = data_lib.load_split(data, "test")
  assert len(test_rows) == len(shard.labels)
  outputs = dict(zip(got.rows.tolist(), got.outputs))
  np.testing.assert_allclose([outputs[r] for r in test_rows.tolist()], model(shard.features),
                             rtol=1e-5, atol=1e-6)


def test_an_export_whose_total_leaves_out_the_spec_estimate_is_refused(tmp_path):
  from fastdp_jax import models  # pylint: disable=g-import-not-at-top
  from fastdp_jax import summary as summary_lib  # pylint: disable=g-import-not-at-top
  from fastdp_jax.export import model_dir  # pylint: disable=g-import-not-at-top
  _, params = models.functional(models.create_model(2, (3,), seed=0))
  base = summary_lib.RunSummary(dp_enabled=True, epsilon=1.25, training_epsilon=1.25,
                                delta=1e-5, accountant_delta=1e-5)
  composed = summary_lib.with_spec_estimate(base, 0.5, 1e-6)
  assert (composed.epsilon, composed.delta) == (1.75, 1e-5 + 1e-6)
  assert summary_lib.with_spec_estimate(base, 0.0, 0.0) is base
  kw = dict(params=params, feature_names=("a", "b"), label_name="y", hidden_sizes=(3,))
  model_dir.export_model(str(tmp_path / "ok"), summary=composed, **kw)
  for wrong in ({"epsilon": 1.25}, {"delta": 1e-5}):
    with pytest.raises(model_dir.ModelIntegrityError, match="privacy.(epsilon|delta)"):
      model_dir.export_model(str(tmp_path / "bad"), summary=dataclasses.replace(
          composed, **wrong), **kw)


def test_a_target_is_the_total_with_the_spec_estimate_taken_out_of_training(own_model, tmp_path):
  # dp.target_epsilon is the run's total: training is calibrated to the target less the
  # spec's (and the count's) epsilon, so the stated total meets the target.
  _, spec_path, data, _ = own_model
  spec = features_lib.load_spec(spec_path)
  target = 2.0
  s = train.train_and_evaluate(
      make_config(data, **{"dp.noise_multiplier": None, "dp.target_epsilon": target}),
      str(tmp_path / "work"))
  assert s.spec_epsilon == spec.estimate_epsilon > 0
  assert s.epsilon <= target * (1 + 1e-9)
  assert s.training_epsilon <= target - spec.estimate_epsilon + 1e-9

"""The model card describes its own model, and a regression predicts in the label's units.

A card of a binary, a multiclass and a regression model each states its task, its label (the
positive class, the classes, or the bounds and the unit of the prediction), the data by the
spec's name and description, and the privacy unit, and never words of another task. The
regression predictor undoes the spec's label transform (log1p -> expm1).
"""

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax.data import features as features_lib
from fastdp_jax.export import card as card_lib
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir
from fastdp_jax import models
from fastdp_jax import summary as summary_lib

DESCRIPTION = "a made-up survey of 3 columns for the card test"
COLUMNS = {"flag": {"kind": "binary"},
           "size": {"kind": "numeric", "bounds": (0, 100), "domain": (0, 1000)},
           "region": {"kind": "categorical", "categories": (11, 22, 33)}}
TASKS = {
    "binary": ("employed", None),
    "multiclass": ("level", {"kind": "multiclass",
                             "classes": (("low", (1, 2)), ("mid", (3,)), ("high", (4,)))}),
    "regression": ("income", {"kind": "regression", "bounds": (0, 1e6), "transform": "log1p",
                              "out_of_bounds": "clip"}),
}
# Words that only a card of another task would hold: a card holding one of them describes a
# model it is not.
# (Compared in lower case; "binary" alone is a column kind in the raw-row table.)
FOREIGN = {
    "binary": ("multi-class", "regression", "softmax", "own units", "most probable class"),
    "multiclass": ("binary classif", "regression", "logit of p(", "positive class",
                   "decision threshold", "own units"),
    "regression": ("binary classif", "multi-class", "classifier", "logit", "positive class",
                   "probabilit", "threshold", "most probable class"),
}
METRICS = {"binary": dict(test_accuracy=0.81, test_auc=0.86),
           "multiclass": dict(test_accuracy=0.55, test_macro_f1=0.41),
           "regression": dict(test_rmse=1.25, test_mae=0.93)}


def _spec(task, description=DESCRIPTION):
  label, task_cfg = TASKS[task]
  cfg = {"name": f"card_{task}", "features": tuple(COLUMNS), "columns": COLUMNS,
         "label": label, "description": description}
  if task_cfg is not None:
    cfg["task"] = task_cfg
  return features_lib.spec_from_config(cfg)


def _export(tmp_path, task, *, with_spec=True, description=DESCRIPTION, transform=None):
  """Exports a random MLP of ``task``; returns (path, spec, apply_fn, params)."""
  spec = _spec(task, description)
  if transform is not None:
    body = spec.to_dict()
    body["task"]["transform"] = transform
    spec = features_lib.spec_from_dict(body)
  outputs = len(spec.task.classes) if task == "multiclass" else 1
  net = models.create_model(spec.num_features, (6,), seed=2, num_outputs=outputs)
  apply_fn, params = models.functional(net)
  head = models.TaskHead(kind=task, num_classes=outputs if task == "multiclass" else 1,
                         bounds=spec.task.bounds)
  summary = summary_lib.RunSummary(dp_enabled=False, epsilon=float("inf"), **METRICS[task])
  path = model_dir.export_model(
      str(tmp_path / task / "model"), params=params, feature_names=spec.feature_names,
      label_name=spec.label, hidden_sizes=(6,), summary=summary,
      model=models.model_spec(hidden_sizes=(6,), head=head, classes=spec.task.classes,
                              feature_names=spec.feature_names),
      feature_spec=spec.to_dict() if with_spec else None, include_test_metrics=True)
  return path, spec, apply_fn, params


def _card(path):
  with open(f"{path}/{layout.CARD_FILE}") as f:
    return f.read()


@pytest.mark.parametrize("task", list(TASKS))
def test_the_card_states_the_task_label_data_and_unit_of_its_own_model(tmp_path, task):
  path, spec, _, _ = _export(tmp_path, task)
  card = _card(path)
  label = spec.label
  assert card.startswith(f"# Model card: DP-SGD {card_lib._TASK_NOUNS[task]} of `{label}`")
  if task == "binary":
    assert f"- Task: binary classification of `{label}`; the positive class is `{label}` = 1." \
        in card
    assert f"output: the logit of P(`{label}` = 1)" in card
  elif task == "multiclass":
    assert (f"- Task: multi-class classification of `{label}` into 3 classes, in output order: "
            "`low` (codes 1, 2); `mid` (code 3); `high` (code 4).") in card
    assert f"perceptron {spec.num_features}-6-3 (ReLU)" in card  # K outputs, not 1
  else:
    assert f"- Task: regression of `{label}`: public bounds [0, 1000000] of the raw label" in card
    assert f"The prediction is in `{label}`'s own units" in card and "expm1" in card
    assert f"RMSE, MAE and the baselines are on the scale the model learns, log1p(`{label}`)" \
        in card
  # The data by the spec's public name and description, and nothing else claimed about them.
  assert f"- Data: `card_{task}` ({DESCRIPTION})." in card
  assert f"- Trained on `card_{task}` ({DESCRIPTION})" in card
  assert "census-style" not in card and "synthetic" not in card
  assert "- Privacy unit: one row of the training table" in card
  # The metric table is the task's, and no word of another task appears.
  for name, key in card_lib._CARD_METRICS[task]:
    if key in METRICS[task]:
      assert f"| {name} | {card_lib._fmt(METRICS[task][key])} |" in card
  for word in FOREIGN[task]:
    assert word not in card.lower(), (task, word)


def test_a_card_without_a_spec_description_or_spec_claims_no_data_name(tmp_path):
  path, _, _, _ = _export(tmp_path, "binary", description="")
  assert "- Data: `card_binary` (the spec gives no description)." in _card(path)
  path, _, _, _ = _export(tmp_path / "nospec", "regression", with_spec=False)
  card = _card(path)
  assert "- Data: a dataset without a feature spec" in card
  # Its labels are on the dataset's scale (log1p(0), log1p(1e6) here): no unit is claimed.
  assert "the prediction is on the scale of those labels" in card
  assert "own units" not in card and "expm1" not in card


def test_the_privacy_unit_is_read_from_the_export():
  spec = {"privacy": {"privacy_unit": "household"}}
  assert card_lib.privacy_unit(spec) == "household"
  assert card_lib.privacy_unit({"privacy": {}}) == card_lib.privacy_unit({}) == "row"


def _encoded_rows(spec, n=64, seed=0):
  rng = np.random.default_rng(seed)
  raw = np.stack([rng.integers(0, 2, n), rng.uniform(0, 100, n),
                  rng.choice([11, 22, 33], n)], axis=1).astype(np.float64)
  return raw, spec.encode_features(raw)


def test_the_regression_predictor_returns_the_labels_units(tmp_path):
  path, spec, apply_fn, params = _export(tmp_path, "regression")
  predictor = fastdp_jax.load_model(path)
  assert predictor.label_transform == "log1p"
  raw, x = _encoded_rows(spec)
  # The raw network output v is in half-ranges of the log1p-scale bounds: the model's value is
  # mid + half * v, and the label's units are expm1 of that.
  lo, hi = np.log1p(0.0), np.log1p(1e6)
  v = np.asarray(apply_fn(params, x), np.float64).reshape(-1)
  expected = np.expm1((lo + hi) / 2 + (hi - lo) / 2 * v)
  got = predictor(x)
  assert got.dtype == np.float32 and got.shape == (len(x),)
  # The same float32 forward, in another batch shape: a few float32 ulps (1.2e-7) on v of order
  # 1, times half = 6.9 on the log scale, i.e. a relative error of that size after expm1 (and
  # 6e-8 from rounding the result to float32): 1e-5 holds it with room.
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(predictor.model_values(x), np.log1p(expected), rtol=1e-5, atol=1e-5)
  # Raw rows get the same values, and predict() is the value.
  rows = {"flag": raw[:, 0], "size": raw[:, 1], "region": raw[:, 2]}
  result = predictor.predict_rows(rows)
  np.testing.assert_array_equal(result.outputs, got)
  np.testing.assert_array_equal(result.predictions, got)
  np.testing.assert_array_equal(predictor.predict(x), got)


def test_an_identity_regression_and_a_classifier_are_unchanged(tmp_path):
  path, spec, _, _ = _export(tmp_path, "regression", transform="identity")
  predictor = fastdp_jax.load_model(path)
  _, x = _encoded_rows(spec)
  assert predictor.label_transform == "identity"
  np.testing.assert_array_equal(predictor(x), predictor.model_values(x))
  assert "own units, not clipped" in _card(path) and "expm1" not in _card(path)
  path, spec, _, _ = _export(tmp_path, "binary")
  predictor = fastdp_jax.load_model(path)
  assert predictor.label_transform == "identity"
  np.testing.assert_array_equal(predictor(x), predictor.model_values(x))


def test_the_inverse_transform_undoes_the_transform():
  v = np.array([0.0, 1e-9, 0.5, 13.8])
  np.testing.assert_allclose(features_lib.inverse_transform("log1p", v), np.expm1(v), rtol=0)
  np.testing.assert_allclose(np.log1p(features_lib.inverse_transform("log1p", v)), v,
                             rtol=1e-15, atol=1e-24)
  assert features_lib.inverse_transform("identity", v) is v
  with pytest.raises(features_lib.SpecError, match="transform='sqrt'"):
    features_lib.inverse_transform("sqrt", v)


def test_a_string_positive_class_is_named_on_the_card(tmp_path):
  spec = features_lib.spec_from_config(
      {"name": "yes_no", "features": tuple(COLUMNS), "columns": COLUMNS, "label": "employed",
       "task": {"kind": "binary", "positive": "yes"}})
  net = models.create_model(spec.num_features, (), seed=0)
  _, params = models.functional(net)
  path = model_dir.export_model(str(tmp_path / "model"), params=params,
                                feature_names=spec.feature_names, label_name=spec.label,
                                hidden_sizes=(), feature_spec=spec.to_dict())
  card = _card(path)
  assert '- Task: binary classification of `employed`; the positive class is `employed` = "yes".' \
      in card
  assert 'output: the logit of P(`employed` = "yes")' in card

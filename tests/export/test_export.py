"""Model export: WORKDIR/model/ with parameters, feature spec and card; load_model."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import fastdp_jax
from fastdp_jax.data import shards as data_lib
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir
from fastdp_jax.export import predictor as predictor_lib
from fastdp_jax import models
from fastdp_jax import summary as summary_lib

NAMES = ("a", "b", "c", "d", "e")


def _export(tmp_path, summary=None, hidden=(7,), include_test_metrics=False):
  model = models.create_model(len(NAMES), hidden, seed=3)
  apply_fn, params = models.functional(model)
  path = model_dir.export_model(str(tmp_path / "model"), params=params, feature_names=NAMES,
                                label_name="employed", hidden_sizes=hidden, summary=summary,
                                include_test_metrics=include_test_metrics)
  return path, apply_fn, params


def test_loaded_model_reproduces_the_trained_function(tmp_path):
  path, apply_fn, params = _export(tmp_path)
  x = np.random.default_rng(0).normal(size=(33, len(NAMES))).astype(np.float32)
  predictor = fastdp_jax.load_model(path)
  expected = np.asarray(apply_fn(params, x))
  np.testing.assert_allclose(predictor.logits(x), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(predictor(x), jax.nn.sigmoid(expected), rtol=1e-5, atol=1e-6)
  assert np.array_equal(predictor.predict(x), (expected >= 0).astype(np.int32))
  # Columns by name, in any order, give the same answer; a single row works too.
  columns = {n: x[:, i] for i, n in reversed(list(enumerate(NAMES)))}
  np.testing.assert_array_equal(predictor(columns), predictor(x))
  assert predictor(x[0]).shape == (1,)
  assert predictor.feature_names == NAMES and predictor.label_name == "employed"
  # The workdir holding model/ is accepted as well.
  assert fastdp_jax.load_model(str(tmp_path)).feature_names == NAMES


def test_wrong_inputs_and_damaged_files_fail_loudly(tmp_path):
  path, _, _ = _export(tmp_path)
  predictor = predictor_lib.load_model(path)
  with pytest.raises(ValueError, match=r"expected \[n, 5\]"):
    predictor(np.zeros((2, 4)))
  with pytest.raises(KeyError, match="lack columns"):
    predictor({"a": [1.0]})
  with pytest.raises(FileNotFoundError):
    predictor_lib.load_model(str(tmp_path / "nowhere"))
  params_path = os.path.join(path, layout.PARAMS_FILE)
  saved = dict(np.load(params_path))
  saved["layers/0/bias"] = saved["layers/0/bias"] + 1
  np.savez(params_path, **saved)
  with pytest.raises(ValueError, match="sha256"):
    predictor_lib.load_model(path)


def test_spec_and_card_state_privacy_and_hold_no_training_data(tmp_path):
  summary = summary_lib.RunSummary(
      private=True, dp_enabled=True, epsilon=0.2768, delta=1.0001e-7,
      accountant_delta=1e-7, overflow_delta=1e-11, accountant="pld",
      noise_multiplier=0.9, l2_norm_clip=3.0, sampling_rate=256 / 969204,
      steps=37860, noise="os entropy", sampling="os entropy", test_accuracy=0.6766,
      majority_class_rate=0.6234, train_examples=969204,
      nonprivate_attack_accuracy=0.61, data_digest="ab" * 32,
      privacy_eval={"membership_inference": dict(
          auc=0.5039, tpr_at_low_fpr=0.0051, low_fpr=0.01, advantage=0.01,
          num_members=10, num_nonmembers=10)})
  path, _, _ = _export(tmp_path, summary, include_test_metrics=True)
  with open(os.path.join(path, layout.SPEC_FILE)) as f:
    spec = json.load(f)
  assert [f["name"] for f in spec["features"]] == list(NAMES)
  assert spec["architecture"]["hidden_sizes"] == [7] and spec["num_params"] == 5 * 7 + 7 + 8
  assert spec["privacy"]["epsilon"] == 0.2768 and spec["privacy"]["accountant"] == "pld"
  card = open(os.path.join(path, layout.CARD_FILE)).read()
  # No N (nor q precise enough to give it back), data digest or training-row statistic.
  text = json.dumps(spec) + card
  for leak in ("969204", "train_examples", "ab" * 32, "data_digest", "0.5039", "0.61",
               "tpr_at_low_fpr", "privacy_eval"):
    assert leak not in text, leak
  assert spec["privacy"]["sampling_rate"] == 0.000264
  assert round(256 / spec["privacy"]["sampling_rate"]) != 969204
  # epsilon on the card rounded up to 3 digits; the included metrics marked as not covered.
  for text in ("(epsilon, delta) = (0.277, 1e-07)", "C = 3", "sigma = 0.9",
               "| 4 | `e` |", "load_model", "0.6766", "Private: **true**",
               "held-out private test rows", "**not covered by the privacy guarantee**"):
    assert text in card, text
  assert "no privacy guarantee" not in card
  assert spec["metrics"]["covered_by_guarantee"] is False
  assert "NOT covered by the privacy guarantee" in spec["metrics"]["note"]
  # By default the test metrics stay out of model/ and the card says why.
  default, _, _ = _export(tmp_path / "default", summary)
  with open(os.path.join(default, layout.SPEC_FILE)) as f:
    metrics = json.load(f)["metrics"]
  default_card = open(os.path.join(default, layout.CARD_FILE)).read()
  assert set(metrics) == {"task", "note"} and "0.6766" not in default_card
  assert "Test metrics are not part of this export" in default_card
  public, _, _ = _export(tmp_path / "np",
                         summary_lib.RunSummary(dp_enabled=False, epsilon=float("inf")))
  public_card = open(os.path.join(public, layout.CARD_FILE)).read()
  assert "**Not private**" in public_card and "no privacy guarantee" in public_card
  repro, _, _ = _export(tmp_path / "r", dataclasses.replace(
      summary, private=False, privacy_note="reproducibility run: ..."))
  repro_card = open(os.path.join(repro, layout.CARD_FILE)).read()
  assert repro_card.splitlines()[2].startswith("**This model has no privacy guarantee**")


def test_training_exports_a_model_that_scores_the_reported_accuracy(tmp_path):
  from configs import test as test_config
  from fastdp_jax import train
  from tests.conftest import make_dataset
  cfg = test_config.get_config()
  cfg.data.path = make_dataset(str(tmp_path / "data"), rows=2000, seed=5)
  cfg.num_epochs = 1
  cfg.checkpoint.enabled = False
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert summary.model_dir == str(tmp_path / "w" / "model")
  predictor = fastdp_jax.load_model(str(tmp_path / "w"))
  test = data_lib.load_split(cfg.data.path, "test")
  accuracy = np.mean(predictor.predict(test.features) == test.labels)
  assert accuracy == pytest.approx(summary.test_accuracy, abs=1e-9)
  final = np.load(tmp_path / "w" / "final_params.npz")
  exported = np.load(tmp_path / "w" / "model" / layout.PARAMS_FILE)
  assert sorted(final) == sorted(exported)
  for k in final:
    np.testing.assert_array_equal(final[k], exported[k])
  assert predictor.spec["privacy"]["epsilon"] == summary.epsilon
  assert predictor.spec["privacy"]["private"] is summary.private is False


# --- The feature spec in the export: raw rows, tasks, embeddings -----------------------------

RAW_SPEC = {
    "name": "t", "features": ("flag", "size", "region"), "label": "level",
    "columns": {"flag": {"kind": "binary"},
                "size": {"kind": "numeric", "bounds": (0, 100), "domain": (0, 1000)},
                "region": {"kind": "embedding", "codes": (11, 22, 33), "unknown": "extra_id"}},
    "task": {"kind": "multiclass", "classes": (("low", (1,)), ("mid", (2,)), ("high", (3,)))},
}


def _export_raw(tmp_path):
  from fastdp_jax.data import features as features_lib  # pylint: disable=g-import-not-at-top
  spec = features_lib.spec_from_config(RAW_SPEC)
  names = spec.feature_names
  emb = models.embedding_inputs(names, spec.embeddings, 3)
  net = models.create_model(len(names), (6,), seed=1, num_outputs=3, embeddings=emb)
  _, params = models.functional(net)
  path = model_dir.export_model(str(tmp_path / "model"), params=params, feature_names=names,
                                label_name="level", hidden_sizes=(6,),
                                feature_spec=spec.to_dict())
  return spec, path, params


def test_raw_rows_are_encoded_by_the_exported_spec(tmp_path):
  spec, path, params = _export_raw(tmp_path)
  predictor = fastdp_jax.load_model(path)
  # The model dict was derived from the spec and the parameters' shapes.
  assert predictor.model["task"] == "multiclass" and predictor.classes == ("low", "mid", "high")
  assert predictor.model["embeddings"] == [{"feature": "region", "index": 2, "vocab_size": 4,
                                            "dim": 3}]
  rows = [{"flag": 1, "size": 250, "region": 22}, {"flag": 0, "size": -3, "region": 11},
          {"flag": 1, "size": 5.5, "region": 44}, {"flag": 1, "size": 5, "region": "22x"}]
  result = predictor.predict_rows(rows)
  np.testing.assert_array_equal(result.rows, [0, 2])  # size -3 is outside the domain
  assert [(e.row, e.column, e.reason) for e in result.errors] == [
      (1, "size", "out_of_domain"), (3, "region", "non_numeric")]
  # Encoded by hand: size clipped to [0, 100] and scaled; 44 is unknown: the extra id 3.
  x = np.array([[1, 1.0, 1], [1, 0.055, 3]], np.float32)
  np.testing.assert_array_equal(spec.encode_features(np.array([[1, 250, 22], [1, 5.5, 44]])), x)
  expected = models.apply_exported(models.flatten_params(params), x, predictor.model)
  np.testing.assert_array_equal(result.outputs, expected)
  assert result.outputs.shape == (2, 3)
  np.testing.assert_allclose(result.outputs.sum(axis=1), 1, rtol=1e-6)  # float32 softmax
  np.testing.assert_array_equal(result.predictions, np.argmax(expected, axis=1))
  card = open(os.path.join(path, layout.CARD_FILE)).read()
  assert "| `region` | embedding | embedding id of 3 public codes (unknown code: extra_id) |" \
      in card and "python -m fastdp_jax.predict" in card


def test_a_model_without_a_spec_refuses_raw_rows(tmp_path):
  path, _, _ = _export(tmp_path)
  predictor = fastdp_jax.load_model(path)
  with pytest.raises(predictor_lib.RowInputError, match="no feature spec"):
    predictor.predict_rows([{"a": 1}])


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["feature_spec"]["features"][2].update(codes=[11, 22]),
     "feature_spec declares the embeddings"),
    (lambda s: s["feature_spec"]["task"].update(classes=[["low", [1]], ["high", [2, 3]]]),
     "feature_spec.task"),
    (lambda s: s["feature_spec"].update(label="other"), "feature_spec.label"),
    (lambda s: s["feature_spec"]["features"][1].update(kind="categorical"),
     "feature_spec is not a valid feature spec"),
    (lambda s: s["model"]["embeddings"][0].update(index=1), r"model.embeddings\[0\]"),
    (lambda s: s["model"].update(task="regression"), "model.classes"),
], ids=["vocabulary", "classes", "label", "kind", "embedding_index", "task"])
def test_an_edited_feature_spec_or_model_is_refused(tmp_path, edit, match):
  _, path, _ = _export_raw(tmp_path)
  _reseal(path, edit)  # edited, and resealed by a forger
  with pytest.raises(model_dir.ModelIntegrityError, match=match):
    fastdp_jax.load_model(path)


def test_the_dataset_feature_spec_is_taken_only_when_it_describes_the_features(tmp_path):
  from fastdp_jax.data import features as features_lib  # pylint: disable=g-import-not-at-top
  spec = features_lib.load_spec("capums")
  for name, names in (("same", spec.feature_names),
                      ("canaries", spec.feature_names + ("canary_0",))):
    with data_lib.DatasetWriter(str(tmp_path / name), feature_names=names,
                                label_name=spec.label, feature_bounds=(0, 1),
                                extra={"spec": spec.to_dict()}) as w:
      w.add("train", np.zeros((4, len(names)), np.uint8), np.zeros(4, np.uint8))
  assert model_dir.dataset_feature_spec(str(tmp_path / "same")) == spec.to_dict()
  assert model_dir.dataset_feature_spec(str(tmp_path / "canaries")) is None
  assert model_dir.dataset_feature_spec(str(tmp_path / "nowhere")) is None


def _reseal(path, edit):
  spec_path = os.path.join(path, layout.SPEC_FILE)
  with open(spec_path) as f:
    spec = json.load(f)
  edit(spec)
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  with open(os.path.join(path, layout.MANIFEST_FILE), "w") as f:
    f.write(model_dir._manifest_text(path))  # pylint: disable=protected-access


def test_a_version_2_export_still_loads_as_a_binary_model(tmp_path):
  path, apply_fn, params = _export(tmp_path)

  def as_version_2(spec):  # what the previous format wrote
    spec["format_version"] = 2
    del spec["model"], spec["feature_spec"], spec["label"]["task"]
  _reseal(path, as_version_2)
  predictor = fastdp_jax.load_model(path)
  assert predictor.task == "binary" and predictor.feature_spec is None
  x = np.random.default_rng(1).normal(size=(4, len(NAMES))).astype(np.float32)
  np.testing.assert_allclose(predictor.logits(x), apply_fn(params, x), rtol=1e-6, atol=1e-6)


def test_a_compressed_csv_of_raw_rows_is_read(tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top
  _, path, _ = _export_raw(tmp_path)
  predictor = fastdp_jax.load_model(path)
  text = "region,flag,size,other\n22,1,250,x\n44,0,abc,y\n"
  plain, packed = tmp_path / "rows.csv", tmp_path / "rows.csv.gz"
  plain.write_text(text)
  with gzip.open(packed, "wt") as f:
    f.write(text)
  a, b = predictor.predict_rows(str(plain)), predictor.predict_rows(str(packed))
  np.testing.assert_array_equal(a.outputs, b.outputs)
  assert a.rows.tolist() == b.rows.tolist() == [0]
  assert [(e.row, e.line, e.column, e.reason) for e in b.errors] == [
      (1, 3, "size", "non_numeric")]

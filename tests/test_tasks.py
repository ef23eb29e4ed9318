"""Tasks and embeddings end to end: binary, multiclass and regression data written with
DatasetWriter (an embedding column included), trained by the real train_and_evaluate, checked
against the task's baseline, dp_accounting's epsilon and the exported model's predictions;
the manifest's task and embedding fields and their value checks; logistic regression; the
validation split.
"""

import json
import os

import dp_accounting
import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from fastdp_jax.export import card as card_lib
from fastdp_jax import inputs
from fastdp_jax.export import predictor as predictor_lib
from fastdp_jax import models
from fastdp_jax.data import split as split_lib
from fastdp_jax import summary as summary_lib
from fastdp_jax import train
from tests.conftest import make_config

NAMES = ("a", "region", "b", "c", "d")  # the embedding column is not the last one
VOCAB = 6
CLASSES = ("low", "mid", "high")
BOUNDS = (0.0, 10.0)
TASKS = {"binary": manifest_lib.BINARY,
         "multiclass": manifest_lib.Task("multiclass", classes=CLASSES),
         "regression": manifest_lib.Task("regression", bounds=BOUNDS)}
EMBEDDINGS = (manifest_lib.Embedding("region", VOCAB),)
FEATURE_BOUNDS = [(-1, 1), (0, VOCAB - 1), (-1, 1), (-1, 1), (-1, 1)]


def _rows(kind, rows, seed):
  """An easy problem where the region id carries as much signal as the dense columns."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (rows, len(NAMES))).astype(np.float32)
  ids = rng.integers(0, VOCAB, rows)
  x[:, 1] = ids
  dense = x[:, [0, 2, 3, 4]]
  if kind == "multiclass":
    w = rng.normal(size=(4, 3)) * 2
    effect = rng.normal(size=(VOCAB, 3)) * 2
    y = np.argmax(dense @ w + effect[ids] + rng.gumbel(size=(rows, 3)) * 0.3, axis=1)
    return x, y.astype(np.uint8)
  if kind == "regression":
    w = rng.normal(size=4)
    effect = rng.uniform(-2, 2, VOCAB)
    y = 5 + 1.5 * (dense @ w) + effect[ids] + rng.normal(size=rows) * 0.3
    return x, np.clip(y, *BOUNDS).astype(np.float32)  # the spec's clipping into the bounds
  w = rng.normal(size=4) * 2
  effect = rng.normal(size=VOCAB) * 2
  y = (dense @ w + effect[ids] + rng.logistic(size=rows) * 0.3 > 0)
  return x, y.astype(np.uint8)


def _write(path, kind, rows=6000, seed=0, **kw):
  x, y = _rows(kind, rows, seed)
  test = split_lib.is_test_row(np.arange(rows))
  with data_lib.DatasetWriter(path, feature_names=NAMES, label_name="y",
                              feature_bounds=FEATURE_BOUNDS, task=TASKS[kind],
                              embeddings=EMBEDDINGS, **kw) as w:
    w.add("train", x[~test], y[~test])
    w.add("test", x[test], y[test])
  return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  return {kind: _write(str(root / kind), kind) for kind in TASKS}


def _config(path, **overrides):
  base = {"num_epochs": 3, "model.embedding_dim": 4, "optimizer.name": "adam",
          "optimizer.learning_rate": 0.02, "dp.l2_norm_clip": 1.0,
          "privacy_eval.membership_rows": 500}
  return make_config(path, **{**base, **overrides})


def _dp_accounting_epsilon(sigma, q, steps, delta):
  """Independently of fastdp_jax.dp.accounting: dp_accounting's PLD accountant on the event."""
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
              steps)
  return acc.get_epsilon(delta)


def _auc_by_pairs(p, y):
  """AUC by its definition: the fraction of (positive, negative) pairs ranked right."""
  pos, neg = p[y == 1][:, None], p[y == 0][None, :]
  return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _macro_f1(pred, y):
  f1 = []
  for c in sorted(set(pred) | set(y)):
    tp = np.sum((pred == c) & (y == c))
    f1.append(2 * tp / (2 * tp + np.sum((pred == c) & (y != c)) + np.sum((pred != c) & (y == c))))
  return float(np.mean(f1))


# Tolerance of "the export reproduces the trainer's evaluation": the same parameters through
# the same jitted forward pass, compiled for another batch shape; XLA may reassociate the
# float32 dot products (a few ulps, 2**-23 ~ 1.2e-7 each, on values of order 1), so every
# prediction agrees to 1e-5 and a metric averaged over them likewise.
PRED_RTOL = 1e-5


@pytest.mark.parametrize("kind", list(TASKS))
def test_each_task_end_to_end_beats_its_baseline_and_exports(kind, datasets, tmp_path):
  path = datasets[kind]
  cfg = _config(path)
  cfg.export_test_metrics = True  # the card's evaluation lines are checked below
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary.task == kind
  # epsilon is dp_accounting's for this run's q, T and delta.
  n = manifest_lib.read_manifest(path).rows("train")
  q, steps = cfg.batch_size / n, cfg.num_epochs * round(n / cfg.batch_size)
  assert summary.steps == steps and summary.train_examples == n
  assert summary.epsilon == pytest.approx(
      _dp_accounting_epsilon(cfg.dp.noise_multiplier, q, steps, summary.accountant_delta),
      rel=1e-12)
  test = data_lib.load_split(path, "test")
  y = test.labels
  # The exported model (embedding table included) reproduces the trainer's evaluation.
  predictor = predictor_lib.load_model(str(tmp_path / "model"))
  assert predictor.model["task"] == kind
  assert predictor.model["embeddings"] == [
      {"feature": "region", "index": 1, "vocab_size": VOCAB, "dim": 4}]
  out = np.asarray(predictor(test.features), np.float64)
  if kind == "binary":
    assert all(getattr(summary, k) is not None
               for k in ("test_accuracy", "test_auc", "majority_class_rate"))
    assert summary.majority_class_rate == max(y.mean(), 1 - y.mean())
    assert summary.test_accuracy > summary.majority_class_rate + 0.1
    assert summary.test_accuracy == np.mean((out >= 0.5) == (y == 1))
    assert summary.test_auc == pytest.approx(_auc_by_pairs(out, y), rel=PRED_RTOL)
    assert summary.test_auc > 0.8
  elif kind == "multiclass":
    assert out.shape == (len(y), 3)
    np.testing.assert_allclose(out.sum(axis=1), 1, rtol=PRED_RTOL)
    majority = np.bincount(y.astype(int)).max() / len(y)
    assert summary.majority_class_rate == pytest.approx(majority, rel=1e-12)
    assert summary.test_accuracy > majority + 0.15
    assert summary.test_accuracy == np.mean(np.argmax(out, axis=1) == y)
    assert summary.test_macro_f1 == pytest.approx(_macro_f1(np.argmax(out, 1), y.astype(int)),
                                                  rel=PRED_RTOL)
    assert summary.classes == list(CLASSES)
  else:
    mean = y.astype(np.float64).mean()
    assert summary.baseline_rmse == pytest.approx(np.sqrt(np.mean((y - mean) ** 2)), rel=1e-9)
    assert summary.baseline_mae == pytest.approx(np.mean(np.abs(y - mean)), rel=1e-9)
    assert summary.test_rmse < 0.6 * summary.baseline_rmse
    assert summary.test_mae < 0.6 * summary.baseline_mae
    assert summary.below_baseline is False
    assert summary.test_rmse == pytest.approx(np.sqrt(np.mean((out - y) ** 2)), rel=PRED_RTOL)
    assert summary.test_mae == pytest.approx(np.mean(np.abs(out - y)), rel=PRED_RTOL)
  # models.apply_exported on the raw params.npz is the predictor's forward pass.
  with np.load(tmp_path / "model" / "params.npz") as f:
    flat = {k: f[k] for k in f.files}
  assert flat["tables/0/embedding"].shape == (VOCAB, 4)
  np.testing.assert_allclose(models.apply_exported(flat, test.features, predictor.model), out,
                             rtol=PRED_RTOL, atol=PRED_RTOL)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  epochs = [r for r in records if r.get("kind") == "epoch"]
  assert len(epochs) == cfg.num_epochs and all("test_loss" in r for r in epochs)
  # The card's evaluation lines are the task's, with the summary's values.
  card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
  key, name = {"binary": ("test_auc", "test AUC"), "multiclass": ("test_macro_f1", "test macro-F1"),
               "regression": ("test_rmse", "test RMSE")}[kind]
  assert f"| {name} | {card_lib._fmt(getattr(summary, key))} |" in card


@pytest.mark.parametrize("kind", list(TASKS))
def test_logistic_regression_is_hidden_sizes_empty_with_ghost(kind, datasets, tmp_path):
  """model.hidden_sizes = (): one dense layer after the embedding, clipped by ghost norms."""
  cfg = _config(datasets[kind], **{"model.hidden_sizes": (), "dp.clipping": "ghost"})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  params = np.load(tmp_path / "final_params.npz")
  k = 3 if kind == "multiclass" else 1
  assert {n: params[n].shape for n in params.files} == {
      "layers/0/kernel": (4 + 4, k), "layers/0/bias": (k,), "tables/0/embedding": (VOCAB, 4)}
  if kind == "regression":
    assert summary.test_rmse < summary.baseline_rmse
  else:
    assert summary.test_accuracy > summary.majority_class_rate


def test_validation_split_is_held_out_and_n_counts_the_rest(datasets, tmp_path):
  path = datasets["multiclass"]
  cfg = _config(path, **{"data.validation_fraction": 0.25, "num_epochs": 2})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  # The validation rows: the train/test split's rule on the rows' keys (the writer stored
  # them), with another seed: not the test rows' rule.
  keys = data_lib.load_split(path, "train").row_keys
  assert keys is not None and len(keys) == manifest_lib.read_manifest(path).rows("train")
  held = split_lib.is_test_row(keys, seed=inputs.VALIDATION_SEED, test_fraction=0.25)
  assert not np.array_equal(held, split_lib.is_test_row(keys))
  n = int((~held).sum())
  assert summary.train_examples == n and summary.validation_examples == int(held.sum())
  q, steps = cfg.batch_size / n, cfg.num_epochs * round(n / cfg.batch_size)
  assert summary.sampling_rate == q and summary.steps == steps
  assert summary.epsilon == pytest.approx(
      _dp_accounting_epsilon(cfg.dp.noise_multiplier, q, steps, summary.accountant_delta),
      rel=1e-12)
  # Validation metrics: the exported model's on exactly the held-out training rows.
  rows = data_lib.load_split(path, "train")
  predictor = predictor_lib.load_model(str(tmp_path / "model"))
  out = predictor(rows.features[held])
  assert summary.validation_accuracy == np.mean(np.argmax(out, 1) == rows.labels[held])
  epochs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  epochs = [r for r in epochs if r.get("kind") == "epoch"]
  assert all({"validation_loss", "validation_accuracy", "validation_macro_f1"} <= set(r)
             for r in epochs)
  # Private like the other workdir metrics: not in the exported card or model.json (the
  # config, public, does name data.validation_fraction).
  for name in os.listdir(tmp_path / "model"):
    if name.endswith((".md", ".json")):
      text = (tmp_path / "model" / name).read_text()
      assert not any(k in text for k in ("validation_loss", "validation_accuracy",
                                         "validation_macro_f1", "validation_examples"))


def test_config_task_must_match_the_manifest(datasets, tmp_path):
  cfg = _config(datasets["regression"], **{"model.task": "binary"})
  with pytest.raises(errors.ConfigError, match="model.task='binary' contradicts the dataset's "
                                                "task 'regression'"):
    train.train_and_evaluate(cfg, str(tmp_path))
  cfg = _config(datasets["regression"], **{"model.task": "multi"})
  with pytest.raises(errors.ConfigError, match="model.task='multi' must be one of"):
    train.train_and_evaluate(cfg, str(tmp_path / "b"))


# --- the manifest's task and embeddings -------------------------------------------------------

def test_manifest_records_task_and_embeddings_and_old_manifests_read_as_binary(tmp_path):
  for kind, task in TASKS.items():
    m = manifest_lib.read_manifest(_write(str(tmp_path / kind), kind, rows=200))
    assert m.task == task and m.embeddings == EMBEDDINGS
    body = json.load(open(tmp_path / kind / "manifest.json"))
    assert body["task"] == task.to_json() and body["embeddings"] == [
        {"feature": "region", "vocab_size": VOCAB}]
  assert json.load(open(tmp_path / "multiclass" / "manifest.json"))["task"] == {
      "kind": "multiclass", "classes": list(CLASSES)}
  assert json.load(open(tmp_path / "regression" / "manifest.json"))["task"] == {
      "kind": "regression", "bounds": list(BOUNDS)}
  # A manifest from before tasks: no "task", no "embeddings" -> binary, none.
  path = tmp_path / "binary" / "manifest.json"
  body = json.load(open(path))
  del body["task"], body["embeddings"]
  path.write_text(json.dumps(body))
  old = manifest_lib.read_manifest(str(tmp_path / "binary"))
  assert old.task == manifest_lib.BINARY and old.embeddings == ()
  # Regression labels are stored as float32, class indices as uint8.
  split = data_lib.load_split(str(tmp_path / "regression"), "train")
  assert split.labels.dtype == np.float32 and split.task.bounds == BOUNDS


@pytest.mark.parametrize("kind,bad,message", [
    ("multiclass", 3.0, r"label\(s\) that are not a class index 0..2 of 3 classes, first at "
                        "row 7"),
    ("multiclass", 1.5, r"label\(s\) that are not a class index"),
    ("binary", 2.0, r"label\(s\) outside \{0, 1\}, first at row 7"),
    ("regression", 10.5, r"label\(s\) non-finite or outside the regression bounds \[0, 10\], "
                         "first at row 7"),
    ("regression", np.nan, r"label\(s\) non-finite or outside the regression bounds"),
])
def test_bad_labels_are_refused_naming_shard_and_row(kind, bad, message, tmp_path):
  x, y = _rows(kind, 50, 1)
  y = y.astype(np.float32)
  y[7] = bad
  with pytest.raises(manifest_lib.ShardError, match="shard train-00000.h5: 1 " + message):
    with data_lib.DatasetWriter(str(tmp_path / "d"), feature_names=NAMES, label_name="y",
                                feature_bounds=FEATURE_BOUNDS, task=TASKS[kind],
                                embeddings=EMBEDDINGS) as w:
      w.add("train", x, y)


@pytest.mark.parametrize("bad", [2.5, -1.0, float(VOCAB)])
def test_bad_embedding_ids_are_refused_naming_column_and_row(bad, tmp_path):
  x, y = _rows("binary", 50, 2)
  x[11, 1] = bad
  # Out of the vocabulary is also outside the column's bounds (0, vocab - 1); a non-integer
  # inside them is refused by the embedding check.
  with pytest.raises(manifest_lib.ShardError, match=r"shard train-00000.h5: (embedding )?column "
                                                r"'region' has 1 .*first at row 11"):
    data_lib.write_shard(str(tmp_path), "train-00000.h5", "train", x, y,
                         feature_bounds=FEATURE_BOUNDS, feature_names=NAMES,
                         embeddings=EMBEDDINGS)


def test_embedding_declarations_are_checked(tmp_path):
  with pytest.raises(manifest_lib.ShardError, match=r"embedding column 'region' has feature bounds "
                                                r"\[0.0, 9.0\]; .* \[0, 5\]"):
    data_lib.DatasetWriter(str(tmp_path / "a"), feature_names=NAMES, label_name="y",
                           feature_bounds=[(-1, 1), (0, 9), (-1, 1), (-1, 1), (-1, 1)],
                           embeddings=EMBEDDINGS)
  with pytest.raises(errors.UserError, match="embedding feature 'zone' is not one of"):
    data_lib.DatasetWriter(str(tmp_path / "b"), feature_names=NAMES, label_name="y",
                           feature_bounds=FEATURE_BOUNDS,
                           embeddings=(manifest_lib.Embedding("zone", 3),))
  with pytest.raises(errors.UserError, match="vocab_size=0 must be an integer"):
    manifest_lib.Embedding("region", 0)
  with pytest.raises(errors.UserError, match="multiclass task needs 2 or more distinct"):
    manifest_lib.Task("multiclass", classes=("a", "a"))
  with pytest.raises(errors.UserError, match="regression task needs public label bounds"):
    manifest_lib.Task("regression")
  with pytest.raises(errors.UserError, match="must be finite with lo < hi"):
    manifest_lib.Task("regression", bounds=(3, 3))
  with pytest.raises(errors.UserError, match="task kind 'ordinal' must be one of"):
    manifest_lib.Task("ordinal")


def test_two_processes_with_embeddings_and_validation_give_the_one_process_model(tmp_path):
  """Each process drops its own validation rows (the hash of the global row number) and
  embeds its own rows: the same N, epsilon and model as one process."""
  import subprocess
  import sys
  from tests.conftest import ROOT
  # Six train shards: the two processes' row ranges are cut inside a shard.
  path = _write(str(tmp_path / "data"), "multiclass", rows=6000, seed=5,
                max_rows_per_shard=800)
  overrides = {"num_epochs": 2, "model.embedding_dim": 4, "data.validation_fraction": 0.2,
               "privacy_eval.membership_rows": 0, "checkpoint.enabled": False}
  ref = train.train_and_evaluate(make_config(path, **overrides), str(tmp_path / "one"))
  work = tmp_path / "two"
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
       "--devices_per_process=2", "--", "--config=configs/test.py",
       f"--config.data.path={path}", f"--workdir={work}",
       *(f"--config.{k}={v}" for k, v in overrides.items())],
      cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  two = summary_lib.read_summary(str(work))
  assert two.num_processes == 2 and two.num_devices == 4
  for key in ("steps", "train_examples", "validation_examples", "sampling_rate", "epsilon"):
    assert getattr(two, key) == getattr(ref, key), key
  # The same clipped per-example gradients summed over 4 devices instead of 1: float32 sums
  # of the same terms in another order, relative error ~ (terms per sum) * 2**-24 ~ 1e-6 per
  # update, compounded over 150 updates: 1e-5 of each leaf's norm (as tests/reliability's
  # two-process test).
  a, b = np.load(tmp_path / "one" / "final_params.npz"), np.load(work / "final_params.npz")
  assert sorted(a) == sorted(b) and "tables/0/embedding" in a
  for k in a:
    assert np.linalg.norm(a[k] - b[k]) <= 1e-5 * np.linalg.norm(a[k]), k
  # Parameters equal to 1e-5 can only flip a row whose top two logits are that close: allow
  # two such rows among the validation rows.
  assert two.validation_accuracy == pytest.approx(
      ref.validation_accuracy, abs=2.5 / ref.validation_examples)


def test_huber_delta_sets_the_regression_loss(datasets, tmp_path):
  """model.huber_delta: the reported test loss is the Huber loss of the exported predictions
  in units of half the label range (computed here from its definition)."""
  delta = 0.1
  cfg = _config(datasets["regression"], **{"model.huber_delta": delta, "num_epochs": 1})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  test = data_lib.load_split(datasets["regression"], "test")
  mid, half = (BOUNDS[0] + BOUNDS[1]) / 2, (BOUNDS[1] - BOUNDS[0]) / 2
  out = np.asarray(predictor_lib.load_model(str(tmp_path / "model"))(test.features), np.float64)
  r = np.abs((out - mid) / half - (test.labels - mid) / half)
  huber = np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta))
  # float32 evaluation against this float64 recomputation: PRED_RTOL, as above.
  assert summary.test_loss == pytest.approx(huber.mean(), rel=PRED_RTOL)
  assert summary.test_loss != pytest.approx(np.mean(0.5 * r ** 2), rel=1e-2)


def test_validation_split_is_refused_with_materialised_batches(datasets, tmp_path):
  # The batches were drawn from every training row: holding some out would not remove them.
  cfg = _config(datasets["binary"], **{"data.validation_fraction": 0.1,
                                       "data.batches": str(tmp_path / "batches")})
  with pytest.raises(errors.ConfigError, match="data.validation_fraction needs the training "
                                                "rows read from data.path"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  with pytest.raises(errors.ConfigError, match=r"data.validation_fraction=1.0 must be in "
                                                r"\[0, 1\)"):
    train.train_and_evaluate(_config(datasets["binary"], **{"data.validation_fraction": 1.0}),
                             str(tmp_path / "w2"))


def test_removing_one_training_row_moves_no_other_between_training_and_validation(tmp_path):
  # Rows from 3 binary columns (8 contents, so identical rows abound): the validation rule is
  # keyed by each row's content and occurrence, so the table without row 17 has the same
  # validation rows (as a multiset) but possibly one copy of row 17's content.
  rng = np.random.default_rng(4)
  x = rng.integers(0, 2, (600, 3)).astype(np.float32)
  y = x[:, 0].copy()

  def held_out(xs, ys, name):
    path = str(tmp_path / name)
    with data_lib.DatasetWriter(path, feature_names=("a", "b", "c"), label_name="y",
                                feature_bounds=(0, 1)) as w:
      w.add("train", xs, ys)
      w.add("test", xs[:10], ys[:10])
    held = inputs.validation_rows(0.3, path)(np.arange(len(ys)))
    return split_lib.content_keys(xs[held], ys[held]), held

  full, held_full = held_out(x, y, "full")
  less, _ = held_out(np.delete(x, 17, 0), np.delete(y, 17), "less")
  removed = int(split_lib.content_keys(x[17:18], y[17:18])[0])
  a, b = np.unique(full, return_counts=True), np.unique(less, return_counts=True)
  diff = {int(k): c for k, c in zip(*a)}
  for k, c in zip(*b):
    diff[int(k)] = diff.get(int(k), 0) - int(c)
  moved = {k: c for k, c in diff.items() if c}
  assert moved in ({}, {removed: 1})  # at most one copy of the removed row's content
  # By row number instead, a third of the rows after row 17 would change sides.
  by_number = split_lib.is_test_row(np.arange(len(y)), seed=inputs.VALIDATION_SEED,
                                    test_fraction=0.3)
  assert not np.array_equal(by_number, held_full)

"""Exported models: ``WORKDIR/model/`` and :func:`load_model`, a callable predictor.

The directory holds everything needed to use the model without the training code's state::

    model/
      params.npz            # parameters by path ('layers/0/kernel', ...), float32
      model.json            # architecture ("model": task, embeddings), the feature spec (the
                            # public encoding of raw rows), label, threshold, privacy, metrics
      MODEL_CARD.md         # for people: what it is, how private, how good, how to load it
      MANIFEST.sha256       # the sha256 of each file above (``sha256sum -c`` reads it)
      MANIFEST.sha256.hmac  # optional: HMAC-SHA256 of the manifest with a user's secret key

Integrity: :func:`load_model` refuses a model unless the manifest lists exactly these files
and every digest matches; the model's digest (sha256 of the manifest, :attr:`Predictor.digest`)
covers every file, so one value pins the whole model (``expected_digest=``). Without a key this
detects corruption and any edit that did not also rewrite the manifest; a signature
(``python -m fastdp_jax.export sign``, checked with ``key=``) detects any edit by someone
without the key. Before any allocation the architecture is checked against the array shapes in
``params.npz``'s headers (so the parameter count is bounded by what the file holds), and
``model.json`` against itself: the feature list, a threshold in [0, 1], the parameter count and
epsilon recomputed from the stated sigma, q and steps. Nothing executes (no pickles).

Only public values go into the export (:mod:`fastdp_jax.dp.release`): the configuration, the
privacy parameters (q at a public precision), the accountant's result, whether the run is
private, and test-set metrics labelled as computed on held-out private rows that the guarantee
does not cover. No training row, no statistic of training rows (losses, attack figures), no
row count and no data digest is written.

Example::

  predictor = fastdp_jax.load_model('runs/demo/model')
  p_employed = predictor(features)             # [n, d] array of ENCODED features
  labels = predictor.predict(features)         # 0/1 at the exported threshold
  result = predictor.predict_rows(rows)        # RAW rows: list of dicts, {column: values},
                                               # a pandas DataFrame, or a CSV file's path
  result.outputs, result.rows, result.errors   # good rows' outputs; a RowError per bad row

A model trained on a Spark-job dataset carries its feature spec, so raw rows are encoded by
the same code as the job (``fastdp_jax.data.features`` and ``fastdp_jax.data.cleaning``); a row
with a missing column value, an unknown category or vocabulary code, a wrong type, a NaN or
an out-of-domain value gets an error naming its row, column and reason, never a number.
``python -m fastdp_jax.predict`` does this for CSV files.

  python -m fastdp_jax.export verify runs/demo/model [--key-file KEY] [--digest HEX]
  python -m fastdp_jax.export sign runs/demo/model --key-file KEY
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import datetime
import gzip
import hashlib
import hmac
import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax import errors
from fastdp_jax.dp import release

FORMAT = "fastdp_jax.model"
# 2: MANIFEST.sha256 covers every file (1 had the parameters' digest only); 3: "model" (task,
# embeddings) and "feature_spec" (raw-row encoding). Version 2 exports still load (binary).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
TASKS = ("binary", "multiclass", "regression")
MODEL_DIR = "model"
PARAMS_FILE = "params.npz"
SPEC_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"
MANIFEST_FILE = "MANIFEST.sha256"
SIGNATURE_FILE = MANIFEST_FILE + ".hmac"
COVERED_FILES = (CARD_FILE, SPEC_FILE, PARAMS_FILE)  # what the manifest lists, sorted
_ALL_FILES = (*COVERED_FILES, MANIFEST_FILE, SIGNATURE_FILE)
# Read before any digest is checked, so bounded: a manifest of three lines, a model.json and
# card of public values (the config included).
_MAX_MANIFEST_BYTES = 4096
_MAX_TEXT_BYTES = 8 << 20
_MAX_LAYERS = 256
_MAX_EMBEDDING_DIM = 4096
_MIN_KEY_BYTES = 16
_EPSILON_RTOL = 1e-2  # q is exported to 3 significant digits: epsilon moves by < 0.1 %
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64})  ([A-Za-z0-9_.\-]+)$")


class ModelIntegrityError(errors.UserError):
  """An exported model is corrupt, tampered with or inconsistent (names file and field)."""


def _flat_params(params: Any) -> dict[str, np.ndarray]:
  from fastdp_jax import models  # local: keeps `import fastdp_jax` light
  return {k: np.asarray(v, np.float32) for k, v in models.flatten_params(params).items()}


def _versions() -> dict[str, str]:
  from importlib import metadata
  out = {}
  for name in ("fastdp-jax", "jax", "flax", "optax", "dp-accounting"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def export_model(directory: str, *, params: Any, feature_names: Sequence[str], label_name: str,
                 hidden_sizes: Sequence[int], summary: Mapping[str, Any] | None = None,
                 threshold: float = 0.5, signing_key: bytes | None = None,
                 model: Mapping[str, Any] | None = None,
                 feature_spec: Mapping[str, Any] | None = None) -> str:
  """Writes an exported model into ``directory`` (created; an old export is replaced).

  The directory appears whole: its files are written into a hidden staging directory beside
  it (``.NAME.staging-*``), then renamed into place, so a crash or a full disk leaves the
  previous export (or none), never a mix.

  Args:
    directory: usually ``WORKDIR/model``.
    params: the trained parameter pytree of :class:`fastdp_jax.models.MLP`.
    feature_names: the d input columns, in the order the model reads them.
    label_name: what the model predicts (P(label = 1)).
    hidden_sizes: the MLP's hidden widths.
    summary: the run's summary (privacy, metrics, config); public values only.
    threshold: the decision threshold on the probability for :meth:`Predictor.predict`.
    signing_key: also sign the manifest (HMAC-SHA256, ``MANIFEST.sha256.hmac``) with this
      secret key (at least 16 bytes); :func:`load_model` with the same key checks it.
    model: the ``"model"`` dict (:func:`fastdp_jax.models.model_spec`: hidden_sizes, task,
      classes, bounds, embeddings). Default: taken from ``feature_spec`` (its task and
      embedding columns, each table's width read off ``params``), else a binary MLP.
    feature_spec: the dataset's feature spec in canonical form (the manifest's
      ``extra["spec"]``, :meth:`fastdp_jax.data.features.FeatureSpec.to_dict`): the public
      encoding that lets the predictor take raw rows. None: encoded features only.

  Returns:
    ``directory``.

  Raises:
    ModelIntegrityError: ``directory`` holds files that are not an export (not replaced).
    fastdp_jax.atomic.DiskFullError: the disk filled up (the previous export is intact).
  """
  flat = _flat_params(params)
  names = [str(n) for n in feature_names]
  if len(set(names)) != len(names) or not all(names):
    raise ValueError(f"feature names {names} must be distinct and non-empty")
  if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
    raise ValueError(f"{threshold=} must be a number in [0, 1]")
  model_dict = _model_dict(model, hidden_sizes, flat, feature_spec, names)
  directory = os.path.abspath(directory)
  _check_replaceable(directory)
  summary = dict(summary or {})
  name = os.path.basename(directory)
  with atomic.disk_full_is_user_error(directory, f"the previous {name}/ (if any) is intact",
                                      restate=True):
    # The model is public: the staging directory gets the default mode, not owner-only.
    staging = atomic.make_staging(directory, mode=0o777, report=None)
    try:
      params_path = os.path.join(staging, PARAMS_FILE)
      atomic.write_npz(params_path, flat)
      spec = _model_json(names, hidden_sizes, model_dict, feature_spec, label_name,
                         threshold, data_lib.sha256_file(params_path), flat, summary)
      text = json.dumps(spec, indent=1, default=float)
      _check_spec(json.loads(text), staging)  # load_model's checks: no export is refused
      atomic.write_text(os.path.join(staging, SPEC_FILE), text)
      atomic.write_text(os.path.join(staging, CARD_FILE), model_card(spec))
      manifest = _manifest_text(staging)
      atomic.write_text(os.path.join(staging, MANIFEST_FILE), manifest)
      if signing_key is not None:
        atomic.write_text(os.path.join(staging, SIGNATURE_FILE),
                          _signature_line(_check_key(signing_key), manifest))
      atomic.publish(staging, directory)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  return directory


def _model_json(names: Sequence[str], hidden_sizes: Sequence[int], model: dict[str, Any],
                feature_spec: Mapping[str, Any] | None, label_name: str, threshold: float,
                params_sha256: str, flat: Mapping[str, np.ndarray],
                summary: Mapping[str, Any]) -> dict[str, Any]:
  """The contents of ``model.json`` (public values only)."""
  return dict(
      format=FORMAT, format_version=FORMAT_VERSION,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      architecture=dict(type="MLP", num_features=len(names),
                        hidden_sizes=[int(h) for h in hidden_sizes], activation="relu",
                        output=_OUTPUTS[model["task"]]),
      model=model,
      feature_spec=None if feature_spec is None else dict(feature_spec),
      features=[dict(name=n, index=i, dtype="float32") for i, n in enumerate(names)],
      label=_label_of(label_name, model),
      threshold=float(threshold),
      params_sha256=params_sha256,
      num_params=int(sum(v.size for v in flat.values())),
      privacy=_privacy_of(summary),
      metrics=_metrics_of(summary),
      config=summary.get("config"),
      versions=_versions())


def _check_replaceable(directory: str) -> None:
  """Refuses to replace a directory that holds anything but an export's files."""
  if not os.path.lexists(directory):
    return
  if not os.path.isdir(directory) or os.path.islink(directory):
    raise ModelIntegrityError(f"refusing to replace {directory}: it is not a directory")
  # Temporary files of an interrupted export (this version's or the first one's) go too.
  others = sorted(n for n in set(os.listdir(directory)) - set(_ALL_FILES)
                  if not re.search(r"\.tmp(\.npz)?$|\.tmp-\d+-", n))
  if others:
    raise ModelIntegrityError(f"refusing to replace {directory}: it holds {others[:5]}, which "
                              "are not files of an exported model; choose another directory")


_OUTPUTS = {"binary": "logit of P(label = 1)",
            "multiclass": "logits of the K classes (softmax: their probabilities)",
            "regression": "the label scaled to [-1, 1] over the task's bounds"}


def _model_dict(model: Mapping[str, Any] | None, hidden_sizes: Sequence[int],
                flat: Mapping[str, np.ndarray], feature_spec: Mapping[str, Any] | None,
                names: Sequence[str]) -> dict[str, Any]:
  """The ``"model"`` dict: as given, else from the feature spec and the parameters' shapes."""
  if model is not None:
    given = json.loads(json.dumps(dict(model), default=float))
    if [int(h) for h in given.get("hidden_sizes", ())] != [int(h) for h in hidden_sizes]:
      raise ValueError(f"model hidden_sizes {given.get('hidden_sizes')} != "
                       f"{list(hidden_sizes)}")
    return given
  out: dict[str, Any] = {"hidden_sizes": [int(h) for h in hidden_sizes], "task": "binary",
                         "classes": [], "bounds": None, "embeddings": []}
  if feature_spec is None:
    return out
  from fastdp_jax.data import features as features_lib  # local: only specs need it
  spec = features_lib.spec_from_dict(feature_spec)
  task = spec.task
  out.update(task=task.kind, classes=list(task.classes),
             bounds=None if task.bounds is None else list(task.bounds))
  for k, e in enumerate(spec.embeddings):
    table = flat.get(f"tables/{k}/embedding")
    if table is None or table.ndim != 2:
      raise ValueError(f"params have no embedding table tables/{k}/embedding for "
                       f"{e.feature!r}; pass model=")
    out["embeddings"].append({"feature": e.feature, "index": list(names).index(e.feature),
                              "vocab_size": e.vocab_size, "dim": int(table.shape[1])})
  return out


def _label_of(label_name: str, model: Mapping[str, Any]) -> dict[str, Any]:
  if model["task"] == "binary":
    return dict(name=label_name, task="binary", positive_class=1)
  if model["task"] == "multiclass":
    return dict(name=label_name, task="multiclass", classes=list(model["classes"]))
  return dict(name=label_name, task="regression", bounds=list(model["bounds"]))


def dataset_feature_spec(path: Any) -> dict[str, Any] | None:
  """The feature spec a dataset directory's manifest records (Spark job, streaming path).

  None for data without one (``DatasetWriter`` datasets, the original's ``.h5`` files), and
  for data whose features are no longer the spec's (an audit dataset adds canary columns to a
  copy of a Spark-job manifest): raw rows encoded by it would not be the model's inputs.
  """
  if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(
      os.path.join(path, data_lib.MANIFEST)):
    return None
  manifest = data_lib.read_manifest(path)
  spec = manifest.extra.get("spec")
  if not isinstance(spec, dict):
    return None
  from fastdp_jax.data import features as features_lib  # local: only specs need it
  try:
    typed = features_lib.spec_from_dict(spec)
  except errors.UserError:
    return None
  if typed.feature_names != manifest.feature_names or typed.label != manifest.label_name:
    return None
  return dict(spec)


def _privacy_of(summary: Mapping[str, Any]) -> dict[str, Any]:
  keys = ("private", "privacy_note", "dp_enabled", "epsilon", "delta", "accountant_delta",
          "overflow_delta", "delta_warning", "accountant", "noise_multiplier", "l2_norm_clip",
          "steps", "noise", "sampling", "max_epsilon", "budget_exhausted", "ledger_composition")
  out = {k: summary[k] for k in keys if k in summary}
  if "sampling_rate" in summary:
    out["sampling_rate"] = release.public_sampling_rate(summary["sampling_rate"])
  return out


def _metrics_of(summary: Mapping[str, Any]) -> dict[str, Any]:
  # Held-out test rows only; the training-row diagnostics (nonprivate_*) stay in the workdir.
  keys = ("task", "test_accuracy", "test_loss", "test_auc", "test_macro_f1", "test_rmse",
          "test_mae", "majority_class_rate", "below_majority_class", "baseline_rmse",
          "baseline_mae", "below_baseline")
  out = {k: summary[k] for k in keys if k in summary}
  if out:
    out["note"] = ("computed on held-out private test rows; not covered by the privacy "
                   "guarantee")
  return out


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return f"{value:.{digits}g}" if np.isfinite(value) else str(value)
  return str(value)


# The card's evaluation rows per task (the summary keys of fastdp_jax.train._task_summary).
_CARD_METRICS = {
    "binary": (("test accuracy", "test_accuracy"), ("test AUC", "test_auc"),
               ("majority-class rate", "majority_class_rate"), ("test loss (BCE)", "test_loss")),
    "multiclass": (("test accuracy", "test_accuracy"), ("test macro-F1", "test_macro_f1"),
                   ("majority-class rate", "majority_class_rate"),
                   ("test loss (cross-entropy)", "test_loss")),
    "regression": (("test RMSE", "test_rmse"), ("test MAE", "test_mae"),
                   ("baseline RMSE (predicting the test rows' mean)", "baseline_rmse"),
                   ("baseline MAE (the same)", "baseline_mae"),
                   ("test loss (squared or Huber, in half-ranges of the label bounds)",
                    "test_loss")),
}


_TASK_WORDS = {"binary": "Binary classification", "multiclass": "Multi-class classification",
               "regression": "Regression"}


def model_card(spec: Mapping[str, Any]) -> str:
  """The ``MODEL_CARD.md`` text of an exported model's ``model.json`` contents."""
  arch, priv, met = spec["architecture"], spec.get("privacy", {}), spec.get("metrics", {})
  sizes = [arch["num_features"], *arch["hidden_sizes"], 1]
  lines = [f"# Model card: DP-SGD classifier of `{spec['label']['name']}`", ""]
  if not priv.get("private", False):
    lines += [f"**This model has no privacy guarantee**: "
              f"{priv.get('privacy_note') or 'trained without DP'}.", ""]
  lines += [
      f"Exported {spec['created']} by fastdp_jax "
      f"{spec.get('versions', {}).get('fastdp-jax', '(version not installed)')} with "
      + ", ".join(f"{k} {v}" for k, v in spec.get("versions", {}).items()
                  if k != "fastdp-jax") + ".", "",
      "## Model", "",
      f"- Multi-layer perceptron {'-'.join(map(str, sizes))} (ReLU), "
      f"{spec['num_params']} parameters; output: the logit of "
      f"P({spec['label']['name']} = 1).",
      f"- Decision threshold: predict 1 when the probability is at least {spec['threshold']}.",
      f"- Parameters: `{PARAMS_FILE}` (sha256 `{spec['params_sha256'][:16]}...`); every file's "
      f"sha256 is in `{MANIFEST_FILE}`, checked on load (`sha256sum -c {MANIFEST_FILE}` "
      "also works).", "",
      "## Inputs", "",
      f"{arch['num_features']} numeric features, float32, in this order "
      "(pass an array of shape [n, d] in this order, or a mapping from name to column):", "",
      "| # | feature |", "|---|---|",
      *[f"| {f['index']} | `{f['name']}` |" for f in spec["features"]], "",
      *_raw_input_lines(spec.get("feature_spec")),
      "## Privacy", "",
  ]
  if priv.get("dp_enabled"):
    lines += [
        f"Trained with DP-SGD: per-example gradients clipped to L2 norm "
        f"C = {_fmt(priv.get('l2_norm_clip'))}, Gaussian noise of std sigma * C with "
        f"sigma = {_fmt(priv.get('noise_multiplier'))} added once per update to the sum, "
        f"Poisson sampling at rate q = {_fmt(priv.get('sampling_rate'))}, "
        f"{priv.get('steps')} updates.", "",
        f"**(epsilon, delta) = ({_fmt(priv.get('epsilon'))}, {_fmt(priv.get('delta'), 3)})"
        f"** by the {str(priv.get('accountant', '')).upper()} accountant (dp_accounting), "
        "for adding or removing one training row with q held fixed (delta includes "
        f"{_fmt(priv.get('overflow_delta'), 2)} for a batch overflowing its capacity). "
        f"Private: **{str(priv.get('private', False)).lower()}** (sampling: "
        f"{priv.get('sampling', 'n/a')}; noise: {priv.get('noise', 'n/a')}).", "",
        *([f"Warning: {priv['delta_warning']}.", ""] if priv.get("delta_warning") else []),
        "What the guarantee covers: the trained parameters, hence every prediction. What it "
        "does not cover: the held-out test set behind the metrics below, the choice of "
        "hyperparameters if they were tuned on the same data, and any data-dependent "
        "preprocessing before training.",
    ]
  else:
    lines += ["**Not private**: trained with plain SGD (no clipping, no noise). Do not "
              "release it if the training data are sensitive."]
  lines += ["", "## Evaluation (held-out test split)", "",
            "Computed on held-out private test rows, released without noise: not covered by "
            "the privacy guarantee above.", "",
            "| metric | value |", "|---|---|",
            *(f"| {name} | {_fmt(met.get(key))} |"
              for name, key in _CARD_METRICS[met.get("task", "binary")])]
  lines += [
      "", "Attacks on training rows (model inversion, membership inference) and the training "
      "loss are statistics of the training data that no accountant covers: they stay in the "
      "private workdir and are not part of this export.", "",
      "## Intended use and limits", "",
      f"- {_TASK_WORDS[met.get('task', 'binary')]} of rows with exactly the features above; "
      "inputs outside the "
      "training distribution (e.g. values other than those seen in training) give "
      "unreliable predictions.",
      "- Trained on synthetic or census-style data; the accuracy above is for its test split.",
      "- Differential privacy limits what the model reveals about any one training row; it "
      "does not make predictions fair or correct.", "",
      *_loading_lines(bool(spec.get("feature_spec")))]
  return "\n".join(lines)


def _loading_lines(raw: bool) -> list[str]:
  """The card's "Loading" section (raw rows too when the model carries a feature spec)."""
  return ["## Loading", "", "```python",
          "import fastdp_jax",
          "predictor = fastdp_jax.load_model('PATH/TO/model')",
          "probabilities = predictor(features)   # [n, d] float array or {name: column}",
          "labels = predictor.predict(features)",
          *(["result = predictor.predict_rows('raw.csv')  # raw rows; bad rows in "
             "result.errors"] if raw else []),
          "```", "",
          *(["From the command line: `python -m fastdp_jax.predict --model PATH/TO/model "
             "--input raw.csv --output predictions.csv --errors errors.csv`.", ""]
            if raw else [])]


def _raw_input_lines(feature_spec: Mapping[str, Any] | None) -> list[str]:
  """The card's account of the public encoding of raw rows (when the model carries one)."""
  if not feature_spec:
    return []
  rows = []
  for f in feature_spec["features"]:
    kind = f["kind"]
    if kind == "binary":
      how = "0 or 1"
    elif kind == "categorical":
      how = f"one of {len(f['categories'])} public categories, one-hot"
    elif kind == "numeric":
      how = (f"number{' in ' + str(f['domain']) if f.get('domain') else ''}, clipped to "
             f"{f['bounds']}, {f['transform']}, scaled to [0, 1]")
    else:
      vocab = (f"codes {f['range'][0]}..{f['range'][1]}" if "range" in f
               else f"{len(f['codes'])} public codes")
      how = f"embedding id of {vocab} (unknown code: {f['unknown']})"
    rows.append(f"| `{f['name']}` | {kind} | {how} |")
  return ["Raw rows (`predict_rows`, `python -m fastdp_jax.predict`) are encoded by the "
          f"feature spec `{feature_spec.get('name')}` (public: no statistic of the data), "
          "columns by name in any order; a row with a missing value, an unknown category or "
          "code, a non-number or a value outside the domain is reported, not predicted:", "",
          "| column | kind | encoding |", "|---|---|---|", *rows, ""]


@dataclasses.dataclass(frozen=True)
class RowError:
  """Why one raw row could not be predicted.

  Attributes:
    row: the row's 0-based position in the input (data rows; a CSV's header is not a row).
    column: the column at fault ('' for a structural problem: blank line, wrong arity).
    reason: a code of :mod:`fastdp_jax.data.cleaning` (``non_numeric``, ``out_of_domain``,
      ``wrong_arity``, ...) or ``missing`` (no value: absent, None, NaN or an NA token).
    detail: the message, naming the column and the value.
    line: the 1-based line in the CSV file (None for other inputs).
  """

  row: int
  column: str
  reason: str
  detail: str
  line: int | None = None


@dataclasses.dataclass(frozen=True)
class RowPredictions:
  """The outcome of predicting raw rows: every row is in ``rows`` or in ``errors``.

  Attributes:
    rows: [m] int64 positions (0-based) of the rows that were predicted.
    outputs: the model's outputs for them: probabilities [m] (binary), [m, K] (multiclass),
      or values [m] (regression).
    predictions: [m] 0/1 at the threshold (binary), the class index (multiclass) or the value
      (regression).
    errors: one :class:`RowError` per row that was not predicted, by row.
    num_rows: how many rows the input held.
  """

  rows: np.ndarray
  outputs: np.ndarray
  predictions: np.ndarray
  errors: list[RowError]
  num_rows: int


class RowInputError(errors.UserError):
  """Raw rows that cannot all be predicted; the message lists the first bad rows."""


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A loaded model: ``predictor(features) -> P(label = 1)`` (binary), class probabilities
  (multiclass) or values (regression).

  Attributes:
    feature_names: the encoded inputs, in order.
    label_name: what is predicted.
    threshold: the decision threshold of :meth:`predict` (binary).
    digest: sha256 of ``MANIFEST.sha256``: one value covering every file of the model.
    signed: whether a signature was checked against a key.
    spec: the full ``model.json`` contents (privacy, metrics, config).
    model: the ``"model"`` dict (task, classes, bounds, embeddings, hidden sizes).
    feature_spec: the public encoding of raw rows (None for a model trained on data without
      a feature spec: it takes encoded features only).
  """

  feature_names: tuple[str, ...]
  label_name: str
  threshold: float
  digest: str
  signed: bool
  spec: dict[str, Any] = dataclasses.field(repr=False)
  _apply: Any = dataclasses.field(repr=False)
  _params: Any = dataclasses.field(repr=False)
  model: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
  feature_spec: Any = dataclasses.field(repr=False, default=None)
  _flat: Any = dataclasses.field(repr=False, default=None)

  @property
  def task(self) -> str:
    return self.model.get("task", "binary")

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(self.model.get("classes") or ())

  @property
  def raw_columns(self) -> tuple[str, ...]:
    """The raw input columns :meth:`predict_rows` needs (empty without a feature spec)."""
    return () if self.feature_spec is None else self.feature_spec.used_columns[:-1]

  def features_array(self, features: Any) -> np.ndarray:
    """ENCODED features as a [n, d] float32 array, from an array or a mapping name -> column."""
    if _is_row_list(features):
      return self._raise_on_errors(self.encode_rows(features))[0]
    if hasattr(features, "keys") and not isinstance(features, np.ndarray):
      if self.feature_spec is not None:
        return self._raise_on_errors(self.encode_rows(features))[0]
      missing = [n for n in self.feature_names if n not in features.keys()]
      if missing:
        raise KeyError(f"features lack columns {missing}; the model needs "
                       f"{list(self.feature_names)}")
      x = np.stack([np.asarray(features[n], np.float32) for n in self.feature_names], axis=-1)
    else:
      x = np.asarray(features, np.float32)
    if x.ndim == 1:
      x = x[None]
    if x.ndim != 2 or x.shape[1] != len(self.feature_names):
      raise ValueError(f"features of shape {x.shape}; expected [n, {len(self.feature_names)}]"
                       f" in the order {list(self.feature_names)}")
    return x

  def logits(self, features: Any) -> np.ndarray:
    """The network's raw outputs: [n] (binary, regression) or [n, K] (multiclass)."""
    return np.asarray(self._apply(self._params, self.features_array(features)))

  def __call__(self, features: Any) -> np.ndarray:
    """Probabilities [n] (binary: P(label = 1)), [n, K] (multiclass) or values [n].

    ``features``: a [n, d] array of encoded features; or, for a model with a feature spec,
    raw rows (a mapping column -> values, a list of dicts, a pandas DataFrame), which must
    all be valid (else :class:`RowInputError`; :meth:`predict_rows` reports them per row).
    """
    x = self.features_array(features)
    from fastdp_jax import models  # local: JAX only when predicting
    return np.asarray(models.apply_exported(self._flat, x, self.model))

  def _decide(self, outputs: np.ndarray) -> np.ndarray:
    if self.task == "binary":
      return (outputs >= self.threshold).astype(np.int32)
    if self.task == "multiclass":
      return np.argmax(outputs, axis=-1).astype(np.int32)
    return outputs

  def predict(self, features: Any) -> np.ndarray:
    """[n] labels: 0/1 at ``threshold`` (binary), class indices (multiclass), values."""
    return self._decide(self(features))

  def encode_rows(self, rows: Any) -> tuple[np.ndarray, np.ndarray, list[RowError], int]:
    """Raw rows -> ``(features [m, d], positions [m], errors, n)`` with the Spark job's code.

    Args:
      rows: a mapping column -> [n] values, a list of dicts (one per row), a pandas
        DataFrame, or a CSV file's path (``str`` or ``os.PathLike``; header first).

    Raises:
      RowInputError: the model has no feature spec, or the input lacks a column the model
        needs (every row would fail: the message names the columns).
    """
    spec = self._need_spec()
    if isinstance(rows, (str, os.PathLike)):
      results = list(_csv_blocks(spec, os.fspath(rows)))
      xs = [r[0] for r in results] or [np.zeros((0, spec.num_features), np.float32)]
      return (np.concatenate(xs), np.concatenate([r[1] for r in results] or [np.zeros(0, int)]),
              [e for r in results for e in r[2]], sum(r[3] for r in results))
    return _encode_columns(spec, _as_columns(rows, spec))

  def predict_rows(self, rows: Any) -> RowPredictions:
    """Predicts raw rows (see :meth:`encode_rows`); bad rows are reported, never predicted."""
    x, kept, errs, n = self.encode_rows(rows)
    return self._predictions(x, kept, errs, n)

  def predict_csv_blocks(self, path: str, block_rows: int = 1 << 16):
    """Yields :class:`RowPredictions` for consecutive blocks of a CSV file's rows."""
    for x, kept, errs, n in _csv_blocks(self._need_spec(), os.fspath(path), block_rows):
      yield self._predictions(x, kept, errs, n)

  def csv_header(self, path: str) -> str:
    """The first line of a CSV file, checked as :meth:`predict_csv_blocks` checks it.

    Raises:
      RowInputError: an empty file, or a header lacking a column the model needs.
    """
    with _open_csv(os.fspath(path)) as f:
      header_line = _read_csv_header(f)
    self.csv_cleaner(path, header_line)
    return header_line

  def csv_cleaner(self, path: str, header_line: str):
    """The line cleaner of a CSV file whose first line is ``header_line`` (see
    :meth:`csv_header`); ``path`` names the file in errors."""
    return _csv_cleaner(self._need_spec(), os.fspath(path), header_line)

  def predict_csv_lines(self, cleaner, lines: Sequence[str], row: int) -> RowPredictions:
    """Predicts consecutive data lines of a CSV file (without line terminators), the first
    being data row ``row``: a block of :meth:`predict_csv_blocks`, by the same code."""
    return self._predictions(*_encode_csv_lines(self._need_spec(), cleaner, lines, row))

  def _predictions(self, x, kept, errs, n) -> RowPredictions:
    k = len(self.classes) if self.task == "multiclass" else 0
    outputs = (self(x) if len(x) else np.zeros((0, k) if k else (0,), np.float32))
    return RowPredictions(rows=np.asarray(kept, np.int64), outputs=outputs,
                          predictions=self._decide(outputs), errors=errs, num_rows=n)

  def _need_spec(self):
    if self.feature_spec is None:
      raise RowInputError(f"this model has no feature spec (its data had none), so it takes "
                          f"encoded features only: a [n, {len(self.feature_names)}] array in "
                          f"the order {list(self.feature_names)[:8]}...")
    return self.feature_spec

  @staticmethod
  def _raise_on_errors(encoded):
    x, _, errs, _ = encoded
    if errs:
      shown = "; ".join(f"row {e.row}: {e.detail}" for e in errs[:5])
      raise RowInputError(f"{len(errs)} row(s) cannot be predicted: {shown}"
                          + ("; ..." if len(errs) > 5 else "")
                          + " (predict_rows reports every row)")
    return x, encoded[1]


def _is_row_list(rows: Any) -> bool:
  return (isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and len(rows) > 0
          and all(isinstance(r, Mapping) for r in rows))


def _as_columns(rows: Any, spec) -> dict[str, Any]:
  """Raw rows as {column: [n] values}; a missing column is a :class:`RowInputError`."""
  needed = spec.used_columns[:-1]
  if type(rows).__module__.startswith("pandas") and hasattr(rows, "columns"):
    have = [str(c) for c in rows.columns]
    columns = {str(c): rows[c].to_numpy() for c in rows.columns if str(c) in needed}
  elif isinstance(rows, Mapping):
    have = [str(c) for c in rows]
    columns = {c: rows[c] for c in needed if c in rows}
  elif _is_row_list(rows):
    have = sorted({str(c) for r in rows for c in r})
    columns = {c: np.array([r.get(c) for r in rows], dtype=object) for c in needed
               if c in have}
  else:
    raise RowInputError(f"raw rows of type {type(rows).__name__}: expected a list of dicts, "
                        "a mapping column -> values, a pandas DataFrame or a CSV path")
  try:
    spec.column_indices(have, with_label=False)
  except errors.UserError as e:
    raise RowInputError(f"the input cannot be predicted: {e}") from e
  return columns


def _errors_of(spec, result, positions: np.ndarray, lines: np.ndarray | None) -> list[RowError]:
  """A :class:`RowError` per rejected or NA row of a cleaning result, by row."""
  names = spec.used_columns[:-1]
  out = []
  for i, reason, detail in result.rejects:
    out.append(RowError(row=int(positions[i]), column=result.reject_columns.get(i, ""),
                        reason=reason, detail=detail,
                        line=None if lines is None else int(lines[i])))
  for i, cells in zip(result.dropped_na.tolist(), result.na_cells):
    cols = [names[j] for j in np.flatnonzero(cells)]
    out.append(RowError(row=int(positions[i]), column=cols[0], reason="missing",
                        detail=f"column(s) {cols}: no value (absent, None, NaN or an NA token)",
                        line=None if lines is None else int(lines[i])))
  return sorted(out, key=lambda e: e.row)


def _encode_columns(spec, columns: Mapping[str, Any]):
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  try:
    result = cleaning.clean_columns(spec, columns, with_label=False)
  except errors.UserError as e:
    raise RowInputError(f"the input cannot be predicted: {e}") from e
  n = len(next(iter(columns.values()))) if columns else 0
  positions = np.arange(n, dtype=np.int64)
  x = spec.encode_features(result.values).astype(np.float32)
  return x, result.kept, _errors_of(spec, result, positions, None), n


def _open_csv(path: str):
  """A CSV file as text lines: plain, ``.gz`` or ``.bz2`` (\\n, \\r\\n and \\r end a line)."""
  opener: Any = {".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(path)[1], open)
  return opener(path, "rt", encoding="utf-8", errors="replace", newline=None)


def _read_csv_header(f) -> str:
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  return f.readline(cleaning.MAX_HEADER_BYTES + 1)  # one more: a longer header is refused


def _csv_cleaner(spec, path: str, header_line: str):
  """The line cleaner of a CSV file's first line ('': an empty file), checked against ``spec``."""
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  if not header_line:
    raise RowInputError(f"{path}: empty file (expected a header naming the columns "
                        f"{list(spec.used_columns[:-1])})")
  try:
    return cleaning.LineCleaner(spec, cleaning.parse_header(header_line.rstrip("\n")),
                                with_label=False)
  except errors.UserError as e:
    raise RowInputError(f"{path}: the first line is taken as the header: {e}") from e


def _encode_csv_lines(spec, cleaner, lines: Sequence[str], row: int):
  """``(features, positions, errors, rows)`` of consecutive data lines from data row ``row`` on.

  The one encoder of CSV lines: the local blocks and the Spark path's blocks both call it, so
  their encodings, error reasons and row and line numbers are the same by construction.
  """
  result = cleaner.clean(lines)
  positions = np.arange(row, row + len(lines), dtype=np.int64)
  x = spec.encode_features(result.values).astype(np.float32)
  # A data row's line: after the header, one row per line.
  return x, positions[result.kept], _errors_of(spec, result, positions, positions + 2), len(lines)


def _csv_blocks(spec, path: str, block_rows: int = 1 << 16):
  """``(features, positions, errors, rows)`` per block of a CSV file's data lines."""
  with _open_csv(path) as f:
    cleaner = _csv_cleaner(spec, path, _read_csv_header(f))
    row = 0
    while True:
      lines = [line.rstrip("\n") for _, line in zip(range(block_rows), f)]
      if not lines:
        return
      yield _encode_csv_lines(spec, cleaner, lines, row)
      row += len(lines)


def load_model(path: str, *, key: bytes | str | None = None, expected_digest: str | None = None,
               check_epsilon: bool = True) -> Predictor:
  """Loads an exported model (``WORKDIR/model`` or the workdir that holds it), checked first.

  Args:
    path: the model directory, or a workdir holding ``model/``.
    key: the secret key the model was signed with: the signature must exist and match.
    expected_digest: the model digest (:attr:`Predictor.digest`) the files must have.
    check_epsilon: recompute epsilon from the stated sigma, q and steps (a fraction of a
      second; skipped for runs whose ledger composed several segments).

  Raises:
    FileNotFoundError: no export at ``path``.
    ModelIntegrityError: a missing, extra, corrupt or edited file, a bad signature or digest,
      or a ``model.json`` that is inconsistent with itself or with ``params.npz``; nothing
      large is allocated before the architecture has been checked against the file.
  """
  path = _model_dir(os.fspath(path))
  spec_path = os.path.join(path, SPEC_FILE)
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(f"{path}: no {SPEC_FILE} (not an exported model; training writes "
                            f"one to WORKDIR/{MODEL_DIR})")
  digests, digest, signed = verify_files(path, key=key, expected_digest=expected_digest)
  spec = _read_spec(spec_path, digests[SPEC_FILE])
  _check_spec(spec, path, check_epsilon=check_epsilon)
  if spec["params_sha256"] != digests[PARAMS_FILE]:
    raise ModelIntegrityError(f"{spec_path}: params_sha256 differs from {MANIFEST_FILE}'s "
                              f"digest of {PARAMS_FILE}")
  arch, model = spec["architecture"], model_of(spec)
  params_path = os.path.join(path, PARAMS_FILE)
  loaded = _load_params(params_path, expected_shapes(arch["num_features"], model))
  import jax  # local: only loading needs JAX
  from fastdp_jax import models
  emb = tuple(models.EmbeddingInput(index=e["index"], vocab_size=e["vocab_size"],
                                    dim=e["dim"]) for e in model["embeddings"])
  outputs = len(model["classes"]) if model["task"] == "multiclass" else 1
  net = models.create_model(arch["num_features"], arch["hidden_sizes"], seed=0,
                            num_outputs=outputs, embeddings=emb)
  apply_fn, template = models.functional(net)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves_with_paths]
  params = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(loaded[n]) for n in names])
  feature_spec = None
  if spec.get("feature_spec") is not None:
    from fastdp_jax.data import features as features_lib  # local: only specs need it
    feature_spec = features_lib.spec_from_dict(spec["feature_spec"], source=spec_path)
  return Predictor(feature_names=tuple(f["name"] for f in spec["features"]),
                   label_name=spec["label"]["name"], threshold=float(spec["threshold"]),
                   digest=digest, signed=signed, spec=spec, _apply=jax.jit(apply_fn),
                   _params=params, model=model, feature_spec=feature_spec, _flat=loaded)


def _load_params(params_path: str, expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """The arrays of ``params.npz`` once their headers match ``expected`` (bounded allocation)."""
  found = _npz_shapes(params_path)  # headers only: nothing allocated yet
  if set(found) != set(expected):
    raise ModelIntegrityError(f"{params_path}: arrays {sorted(found)} do not match the "
                              f"architecture's {sorted(expected)}")
  for name, shape in expected.items():
    if found[name] != shape:
      raise ModelIntegrityError(f"{params_path}: {name} has shape {found[name]}, the "
                                f"architecture in {SPEC_FILE} needs {shape}")
  # The architecture now matches arrays the file really holds: allocating it is bounded by
  # the file's size.
  with np.load(params_path, allow_pickle=False) as saved:
    loaded = {k: saved[k] for k in saved.files}
  for name, value in loaded.items():
    if not np.all(np.isfinite(value)):
      raise ModelIntegrityError(f"{params_path}: {name} holds non-finite values")
  return loaded


# ---------------------------------------------------------------------------------------------
# Integrity: the manifest, its digest and its signature.


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _manifest_text(directory: str) -> str:
  """``sha256  name`` for every covered file, sorted by name (the ``sha256sum`` format)."""
  return "".join(f"{_file_digest(os.path.join(directory, n))}  {n}\n" for n in COVERED_FILES)


def model_digest(manifest: str | bytes) -> str:
  """The model's digest: sha256 of its ``MANIFEST.sha256`` (covers every file)."""
  return hashlib.sha256(manifest.encode() if isinstance(manifest, str) else manifest).hexdigest()


def _check_key(key: bytes | str) -> bytes:
  key = key.encode() if isinstance(key, str) else bytes(key)
  if len(key) < _MIN_KEY_BYTES:
    raise errors.UserError(f"a signing key must hold at least {_MIN_KEY_BYTES} bytes (it has "
                           f"{len(key)}); e.g. head -c 32 /dev/urandom > KEY")
  return key


def _signature_line(key: bytes, manifest: str) -> str:
  return "hmac-sha256 " + hmac.new(key, manifest.encode(), hashlib.sha256).hexdigest() + "\n"


def _read_bounded(path: str, limit: int) -> bytes:
  with open(path, "rb") as f:
    data = f.read(limit + 1)
  if len(data) > limit:
    raise ModelIntegrityError(f"{path}: larger than {limit} bytes; not a file of an export")
  return data


def verify_files(path: str, *, key: bytes | str | None = None,
                 expected_digest: str | None = None) -> tuple[dict[str, str], str, bool]:
  """Checks the manifest (and signature) of the model directory ``path``.

  Returns:
    ``({file: sha256}, model digest, signed)``.

  Raises:
    ModelIntegrityError: naming the file that is missing, extra, changed or badly signed.
  """
  manifest_path = os.path.join(path, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    raise ModelIntegrityError(
        f"{path}: no {MANIFEST_FILE}, so its files cannot be checked (exports before format "
        f"version {FORMAT_VERSION} had none: export the model again with this version)")
  raw = _read_bounded(manifest_path, _MAX_MANIFEST_BYTES)
  digests: dict[str, str] = {}
  for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
    m = _MANIFEST_LINE.match(line)
    if not m or m.group(2) in digests:
      raise ModelIntegrityError(f"{manifest_path}: line {n} is not 'SHA256  FILE' for a new "
                                "file")
    digests[m.group(2)] = m.group(1)
  if sorted(digests) != sorted(COVERED_FILES):
    raise ModelIntegrityError(f"{manifest_path}: lists {sorted(digests)}; an export has "
                              f"exactly {sorted(COVERED_FILES)}")
  extra = sorted(set(os.listdir(path)) - set(_ALL_FILES))
  if extra:
    raise ModelIntegrityError(f"{path}: {extra[:5]} are not files of an exported model")
  digest = model_digest(raw)
  if expected_digest is not None and not hmac.compare_digest(digest, expected_digest.lower()):
    raise ModelIntegrityError(f"{path}: model digest {digest[:16]}... is not the expected "
                              f"{expected_digest[:16]}...")
  signed = False
  signature_path = os.path.join(path, SIGNATURE_FILE)
  if key is not None:
    if not os.path.isfile(signature_path):
      raise ModelIntegrityError(f"{path}: not signed (no {SIGNATURE_FILE}); a key was given")
    expected = _signature_line(_check_key(key), raw.decode("utf-8", "replace"))
    if not hmac.compare_digest(_read_bounded(signature_path, 256), expected.encode()):
      raise ModelIntegrityError(f"{signature_path}: the signature does not match (another key, "
                                "or the model was changed after signing)")
    signed = True
  for name in COVERED_FILES:
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path) or os.path.islink(file_path):
      raise ModelIntegrityError(f"{file_path}: missing (or not a regular file)")
    found = _file_digest(file_path)
    if found != digests[name]:
      raise ModelIntegrityError(f"{file_path}: sha256 {found[:12]}... does not match "
                                f"{MANIFEST_FILE}'s {digests[name][:12]}... (corrupt, edited or "
                                "replaced file)")
  return digests, digest, signed


def sign_model(path: str, key: bytes | str) -> str:
  """Signs an existing export (after checking it); returns its digest."""
  path = _model_dir(os.fspath(path))
  predictor = load_model(path)
  raw = _read_bounded(os.path.join(path, MANIFEST_FILE), _MAX_MANIFEST_BYTES).decode()
  atomic.write_text(os.path.join(path, SIGNATURE_FILE), _signature_line(_check_key(key), raw))
  return predictor.digest


def _model_dir(path: str) -> str:
  """``path``, or ``path/model`` when ``path`` is a workdir holding an export."""
  if not os.path.isfile(os.path.join(path, SPEC_FILE)) and os.path.isfile(
      os.path.join(path, MODEL_DIR, SPEC_FILE)):
    return os.path.join(path, MODEL_DIR)
  return path


# ---------------------------------------------------------------------------------------------
# Consistency of model.json and params.npz, checked before any allocation.


def _read_spec(spec_path: str, digest: str) -> dict[str, Any]:
  raw = _read_bounded(spec_path, _MAX_TEXT_BYTES)
  if hashlib.sha256(raw).hexdigest() != digest:  # the bytes parsed are the bytes checked
    raise ModelIntegrityError(f"{spec_path}: changed while being read")
  try:
    spec = json.loads(raw)
  except ValueError as e:
    raise ModelIntegrityError(f"{spec_path}: not JSON ({e})") from e
  if not isinstance(spec, dict):
    raise ModelIntegrityError(f"{spec_path}: not a JSON object")
  return spec


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _expected_shapes(num_features: int, hidden_sizes: Sequence[int]) -> dict[str, tuple]:
  sizes = [num_features, *hidden_sizes, 1]
  out: dict[str, tuple] = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    out[f"layers/{i}/kernel"] = (a, b)
    out[f"layers/{i}/bias"] = (b,)
  return out


def _check_spec(spec: Mapping[str, Any], where: str, check_epsilon: bool = False) -> None:
  """Checks ``model.json``'s contents against themselves (no array is touched)."""
  where = os.path.join(where, SPEC_FILE)

  def bad(field: str, why: str) -> ModelIntegrityError:
    return ModelIntegrityError(f"{where}: {field}{'' if why.startswith('=') else ' '}{why}")

  if spec.get("format") != FORMAT or spec.get("format_version") not in READABLE_VERSIONS:
    raise bad("format", f"is {spec.get('format')!r} version {spec.get('format_version')!r}; "
              f"expected {FORMAT!r} {' or '.join(map(str, READABLE_VERSIONS))}")
  arch = spec.get("architecture")
  if not isinstance(arch, dict) or arch.get("type") != "MLP" or arch.get("activation") != "relu":
    raise bad("architecture", "must be an MLP with relu activations")
  d, hidden = arch.get("num_features"), arch.get("hidden_sizes")
  if not (_is_int(d) and d >= 1):
    raise bad("architecture.num_features", f"={d!r} must be a positive integer")
  if not (isinstance(hidden, list) and len(hidden) <= _MAX_LAYERS
          and all(_is_int(h) and h >= 1 for h in hidden)):
    raise bad("architecture.hidden_sizes", f"={str(hidden)[:80]} must be at most "
              f"{_MAX_LAYERS} positive integers")
  model = model_of(spec)
  _check_model(model, hidden, spec.get("features"), bad)
  count = sum(math.prod(s) for s in expected_shapes(d, model).values())
  if spec.get("num_params") != count:
    raise bad("num_params", f"={spec.get('num_params')!r} but the architecture has {count}")
  features = spec.get("features")
  if not (isinstance(features, list) and len(features) == d):
    raise bad("features", f"must list the {d} input features")
  names = []
  for i, f in enumerate(features):
    if not (isinstance(f, dict) and f.get("index") == i and isinstance(f.get("name"), str)
            and f["name"]):
      raise bad(f"features[{i}]", "must be {name: a non-empty string, index: " + f"{i}}}")
    names.append(f["name"])
  if len(set(names)) != len(names):
    raise bad("features", "repeat a name")
  label = spec.get("label")
  if not (isinstance(label, dict) and isinstance(label.get("name"), str) and label["name"]):
    raise bad("label", "must be {name: a non-empty string, ...}")
  if label.get("task", "binary") != model["task"]:
    raise bad("label.task", f"={label.get('task')!r} is not the model's task")
  if model["task"] == "binary" and label.get("positive_class") != 1:
    raise bad("label.positive_class", "must be 1 for a binary task")
  _check_feature_spec(spec.get("feature_spec"), names, label["name"], model, bad)
  t = spec.get("threshold")
  if not (_is_real(t) and 0 <= t <= 1):  # NaN fails both comparisons
    raise bad("threshold", f"={t!r} must be a number in [0, 1]")
  if not (isinstance(spec.get("params_sha256"), str)
          and re.fullmatch(r"[0-9a-f]{64}", spec["params_sha256"])):
    raise bad("params_sha256", "must be a sha256 hex digest")
  _check_privacy(spec.get("privacy"), bad, check_epsilon)


def model_of(spec: Mapping[str, Any]) -> dict[str, Any]:
  """The ``"model"`` dict of a ``model.json`` (a version 2 export: its binary MLP)."""
  if spec.get("format_version") == 2 or "model" not in spec:
    arch = spec.get("architecture") or {}
    return {"hidden_sizes": arch.get("hidden_sizes"), "task": "binary", "classes": [],
            "bounds": None, "embeddings": []}
  model = spec["model"]
  return model if isinstance(model, dict) else {"invalid": model}


def expected_shapes(num_features: int, model: Mapping[str, Any]) -> dict[str, tuple]:
  """Parameter names and shapes of a (checked) model dict; nothing is allocated."""
  if model["task"] == "binary" and not model["embeddings"]:
    return _expected_shapes(num_features, model["hidden_sizes"])
  from fastdp_jax import models  # local: JAX only when the model needs it
  return models.param_shapes(num_features, model)


def _check_model(model: Mapping[str, Any], hidden: Any, features: Any, bad) -> None:
  """The ``"model"`` dict: the architecture's widths, a known task, sane embeddings."""
  if set(model) != {"hidden_sizes", "task", "classes", "bounds", "embeddings"}:
    raise bad("model", "must hold hidden_sizes, task, classes, bounds and embeddings")
  if model["hidden_sizes"] != hidden:
    raise bad("model.hidden_sizes", f"={model['hidden_sizes']!r} differs from the "
              "architecture's")
  task, classes, bounds = model["task"], model["classes"], model["bounds"]
  if task not in TASKS:
    raise bad("model.task", f"={task!r} must be one of {TASKS}")
  if not (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)
          and len(set(classes)) == len(classes)
          and (len(classes) >= 2 if task == "multiclass" else not classes)):
    raise bad("model.classes", "must be 2 or more distinct names for a multiclass task, else "
              "empty")
  if (task == "regression") != (bounds is not None) or (bounds is not None and not (
      isinstance(bounds, list) and len(bounds) == 2 and all(_is_real(b) for b in bounds)
      and math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1])):
    raise bad("model.bounds", f"={bounds!r} must be finite (lo, hi) for a regression task "
              "only")
  embeddings = model["embeddings"]
  if not (isinstance(embeddings, list) and isinstance(features, list)
          and len(embeddings) <= len(features)):
    raise bad("model.embeddings", "must be a list (at most one per feature)")
  seen = set()
  for k, e in enumerate(embeddings):
    ok = (isinstance(e, dict) and set(e) == {"feature", "index", "vocab_size", "dim"}
          and _is_int(e["index"]) and 0 <= e["index"] < len(features)
          and e["index"] not in seen and isinstance(features[e["index"]], dict)
          and features[e["index"]].get("name") == e["feature"]
          and _is_int(e["vocab_size"]) and 1 <= e["vocab_size"] <= data_lib.MAX_VOCAB
          and _is_int(e["dim"]) and 1 <= e["dim"] <= _MAX_EMBEDDING_DIM)
    if not ok:
      raise bad(f"model.embeddings[{k}]", "must be {feature: the name of features[index], "
                f"index, vocab_size in [1, {data_lib.MAX_VOCAB}], dim in [1, "
                f"{_MAX_EMBEDDING_DIM}]}} (each column once)")
    seen.add(e["index"])


def _check_feature_spec(body: Any, names: Sequence[str], label: str,
                        model: Mapping[str, Any], bad) -> None:
  """The raw-row encoding agrees with the model's inputs, label, task and embeddings."""
  if body is None:
    return
  from fastdp_jax.data import features as features_lib  # local: only specs need it
  try:
    spec = features_lib.spec_from_dict(body)
  except errors.UserError as e:
    raise bad("feature_spec", f"is not a valid feature spec ({e})") from e
  if list(spec.feature_names) != list(names):
    raise bad("feature_spec", f"encodes the features {list(spec.feature_names)[:8]}..., not "
              "the model's features")
  if spec.label != label:
    raise bad("feature_spec.label", f"={spec.label!r} is not the model's label {label!r}")
  task = spec.task
  if (task.kind != model["task"] or list(task.classes) != list(model["classes"])
      or (task.bounds is not None and not np.allclose(task.bounds, model["bounds"],
                                                      rtol=1e-12, atol=0))):
    raise bad("feature_spec.task", f"={task.to_json()} is not the model's task")
  declared = [(e.feature, e.vocab_size) for e in spec.embeddings]
  if declared != [(e["feature"], e["vocab_size"]) for e in model["embeddings"]]:
    raise bad("feature_spec", f"declares the embeddings {declared}, not the model's")


def _check_privacy(priv: Any, bad, check_epsilon: bool) -> None:
  """The privacy section agrees with itself: types, ranges, and epsilon with sigma, q, T."""
  from fastdp_jax.dp import accounting  # local: dp_accounting is slow to import
  if not isinstance(priv, dict):
    raise bad("privacy", "must be an object")
  for key in ("private", "dp_enabled"):
    if key in priv and not isinstance(priv[key], bool):
      raise bad(f"privacy.{key}", f"={priv[key]!r} must be true or false")
  eps = priv.get("epsilon")
  if eps is not None and not (_is_real(eps) and eps >= 0):  # inf: no guarantee
    raise bad("privacy.epsilon", f"={eps!r} must be a non-negative number")
  if not priv.get("dp_enabled", False):
    if priv.get("private", False):
      raise bad("privacy.private", "is true for a model trained without DP")
    return
  if priv.get("private", False) and (priv.get("noise") != "os entropy"
                                     or priv.get("sampling") != "os entropy"):
    raise bad("privacy.private", "is true but the noise or batches came from a fixed seed")
  sigma, clip = priv.get("noise_multiplier"), priv.get("l2_norm_clip")
  q, steps, delta = priv.get("sampling_rate"), priv.get("steps"), priv.get("accountant_delta")
  for key, value, ok in (("noise_multiplier", sigma, _is_real(sigma) and 0 < sigma < math.inf),
                         ("l2_norm_clip", clip, _is_real(clip) and 0 < clip < math.inf),
                         ("sampling_rate", q, _is_real(q) and 0 < q <= 1),
                         ("steps", steps, _is_int(steps) and steps >= 0),
                         ("accountant_delta", delta, delta is None or (_is_real(delta)
                                                                       and 0 < delta < 1))):
    if key in priv and not ok:
      raise bad(f"privacy.{key}", f"={value!r} is out of range")
  if priv.get("accountant", "pld") not in accounting.ACCOUNTANTS:
    raise bad("privacy.accountant", f"={priv.get('accountant')!r} is not one of "
              f"{accounting.ACCOUNTANTS}")
  total, overflow = priv.get("delta"), priv.get("overflow_delta") or 0.0
  if _is_real(total) and _is_real(delta) and _is_real(overflow) and not math.isclose(
      total, delta + overflow, rel_tol=1e-9):
    raise bad("privacy.delta", f"={total!r} is not accountant_delta + overflow_delta")
  single = priv.get("ledger_composition", priv.get("accountant")) == priv.get("accountant")
  if (check_epsilon and single and _is_real(eps) and None not in (sigma, q, steps, delta)):
    recomputed = accounting.compute_epsilon(float(sigma), float(q), int(steps), float(delta),
                                            priv.get("accountant", "pld"))
    if not math.isclose(eps, recomputed, rel_tol=_EPSILON_RTOL, abs_tol=1e-9):
      raise bad("privacy.epsilon", f"={eps!r} but sigma {sigma}, q {q} and {steps} updates "
                f"give {recomputed:.6g} at delta {delta}")


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """``{name: shape}`` of the float32 arrays of an uncompressed ``.npz``, from headers only.

  Each member's stored size must equal its header plus the data its shape declares, so the
  shapes returned describe bytes that are really in the file.
  """
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ModelIntegrityError(f"{path}: not a readable .npz ({e})") from e
  shapes = {}
  with archive:
    members = archive.infolist()
    if len(members) > 2 * _MAX_LAYERS + 2:
      raise ModelIntegrityError(f"{path}: {len(members)} arrays; an export has at most "
                                f"{2 * _MAX_LAYERS + 2}")
    for info in members:
      name = info.filename[:-4] if info.filename.endswith(".npy") else None
      if name is None or info.compress_type != zipfile.ZIP_STORED:
        raise ModelIntegrityError(f"{path}: member {info.filename!r} is not an uncompressed "
                                  ".npy array")
      with archive.open(info) as f:
        try:
          version = np.lib.format.read_magic(f)
          shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
        except ValueError as e:
          raise ModelIntegrityError(f"{path}: {name}: bad array header ({e})") from e
        header = f.tell()
      if dtype != np.dtype("<f4") or fortran:
        raise ModelIntegrityError(f"{path}: {name} is {dtype}, not float32")
      if info.file_size != header + 4 * math.prod(shape):
        raise ModelIntegrityError(f"{path}: {name} declares shape {shape}, but the file holds "
                                  f"{info.file_size - header} bytes of it")
      shapes[name] = tuple(int(n) for n in shape)
  return shapes


# ---------------------------------------------------------------------------------------------
# Command line.


def _read_key(path: str) -> bytes:
  with open(path, "rb") as f:  # every byte, a final newline included (as load_model gets it)
    return f.read()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m fastdp_jax.export",
                              description="check or sign an exported model directory")
  sub = p.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="check every file, the consistency and the signature")
  v.add_argument("path", help="the model directory (or the workdir holding model/)")
  v.add_argument("--key-file", help="the secret key it was signed with")
  v.add_argument("--digest", help="the model digest it must have")
  s = sub.add_parser("sign", help="check, then sign the manifest with a secret key")
  s.add_argument("path")
  s.add_argument("--key-file", required=True, help="a file of at least 16 secret bytes")
  args = p.parse_args(argv)
  try:
    key = _read_key(args.key_file) if args.key_file else None
    if args.command == "sign":
      digest = sign_model(args.path, key)
      print(f"{args.path}: signed ({SIGNATURE_FILE}), digest {digest}")
    else:
      predictor = load_model(args.path, key=key, expected_digest=args.digest)
      print(f"{args.path}: ok, digest {predictor.digest}"
            f"{', signature ok' if predictor.signed else ''}")
  except (errors.UserError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  return 0


if __name__ == "__main__":
  sys.exit(main())

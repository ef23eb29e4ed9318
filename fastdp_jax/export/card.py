"""The model card: ``MODEL_CARD.md``, an exported model described for people.

Written from ``model.json``'s contents alone (:func:`model_card`), so the card states exactly
what the export holds: the architecture, the privacy guarantee and what it does not cover, the
held-out metrics, the raw-row encoding when there is one, and how to load the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fastdp_jax.export import layout


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return f"{value:.{digits}g}" if np.isfinite(value) else str(value)
  return str(value)


# The card's evaluation rows per task (fields of fastdp_jax.summary.RunSummary).
_CARD_METRICS = {
    "binary": (("test accuracy", "test_accuracy"), ("test AUC", "test_auc"),
               ("majority-class rate", "majority_class_rate"),
               ("test log-loss", "test_loss"),
               ("log-loss of predicting the base rate", "base_rate_log_loss"),
               ("test Brier score", "test_brier"),
               ("test expected calibration error (15 bins)", "test_ece")),
    "multiclass": (("test accuracy", "test_accuracy"), ("test macro-F1", "test_macro_f1"),
                   ("majority-class rate", "majority_class_rate"),
                   ("test log-loss (cross-entropy)", "test_loss"),
                   ("log-loss of predicting the class frequencies", "base_rate_log_loss"),
                   ("test Brier score", "test_brier"),
                   ("test expected calibration error (top class, 15 bins)", "test_ece")),
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
      f"- Parameters: `{layout.PARAMS_FILE}` (sha256 `{spec['params_sha256'][:16]}...`); "
      f"every file's sha256 is in `{layout.MANIFEST_FILE}`, checked on load "
      f"(`sha256sum -c {layout.MANIFEST_FILE}` also works).", "",
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
        *([f"The probabilities are calibrated: the logits are divided by the temperature "
           f"{_fmt(priv.get('temperature'))}, chosen on held-out validation rows by the "
           f"exponential mechanism with epsilon {_fmt(priv.get('calibration_epsilon'))}; "
           f"epsilon above is training's {_fmt(priv.get('training_epsilon'))} plus that "
           "(basic composition).", ""] if priv.get("calibration_epsilon") is not None else []),
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

"""The model card: ``MODEL_CARD.md``, an exported model described for people.

Written from ``model.json``'s contents alone (:func:`model_card`), so the card states exactly
what the export holds: the model (:func:`model_section`: its task, label, classes or bounds and
the unit of its predictions, the data's name from the feature spec, the privacy unit), the
architecture, the privacy guarantee and what it does not cover, the held-out metrics, the
raw-row encoding when there is one, and how to load the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastdp_jax import summary as summary_lib
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
  task = task_of(spec)
  lines = [f"# Model card: DP-SGD {_TASK_NOUNS[task]} of `{spec['label']['name']}`", ""]
  if not priv.get("private", False):
    lines += [f"**This model has no privacy guarantee**: "
              f"{priv.get('privacy_note') or 'trained without DP'}.", ""]
  lines += [
      f"Exported {spec['created']} by fastdp_jax "
      f"{spec.get('versions', {}).get('fastdp-jax', '(version not installed)')} with "
      + ", ".join(f"{k} {v}" for k, v in spec.get("versions", {}).items()
                  if k != "fastdp-jax") + ".", "",
      *model_section(spec),
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
        f"Trained with DP-SGD: {_clipped_words(priv)} clipped to L2 norm "
        f"C = {_fmt(priv.get('l2_norm_clip'))}, Gaussian noise of std sigma * C with "
        f"sigma = {_fmt(priv.get('noise_multiplier'))} added once per update to the sum, "
        f"Poisson sampling of {_units_noun(priv)} at rate q = "
        f"{_fmt(priv.get('sampling_rate'))}, {priv.get('steps')} updates.", "",
        f"**(epsilon, delta) = ({_up(priv.get('epsilon'))}, {_fmt(priv.get('delta'), 3)})"
        f"** by the {_stated_accountant(priv)} accountant (dp_accounting), "
        f"for adding or removing {_one_unit_words(priv)} with q held fixed (delta includes "
        f"{_fmt(priv.get('overflow_delta'), 2)} for a batch overflowing its capacity). "
        f"Private: **{str(priv.get('private', False)).lower()}** (sampling: "
        f"{priv.get('sampling', 'n/a')}; noise: {priv.get('noise', 'n/a')}).", "",
        *_unit_lines(priv),
        *([f"Warning: {priv['delta_warning']}.", ""] if priv.get("delta_warning") else []),
        *_row_count_lines(priv),
        *([f"The probabilities are calibrated: the logits are divided by the temperature "
           f"{_fmt(priv.get('temperature'))}, chosen on held-out validation rows by the "
           f"exponential mechanism with epsilon {_fmt(priv.get('calibration_epsilon'))}; "
           f"epsilon above includes that and training's {_fmt(priv.get('training_epsilon'))} "
           "(basic composition).", ""] if priv.get("calibration_epsilon") is not None
          and not _tuned(priv) else []),
        *_spec_estimate_lines(priv),
        *tuning_lines(priv),
        "What the guarantee covers: the trained parameters, hence every prediction. What it "
        "does not cover: the held-out test set behind the metrics below, "
        + ("" if _tuned(priv) else "the choice of hyperparameters if they were tuned on the "
           "same data, ") + "and any data-dependent preprocessing before training.",
    ]
  else:
    lines += ["**Not private**: trained with plain SGD (no clipping, no noise). Do not "
              "release it if the training data are sensitive."]
  lines += ["", "## Evaluation (held-out test split)", "", *_evaluation_lines(spec, met, task)]
  lines += [
      "", "Attacks on training rows (model inversion, membership inference) and the training "
      "loss are statistics of the training data that no accountant covers: they stay in the "
      "private workdir and are not part of this export.", "",
      "## Intended use and limits", "",
      f"- {_TASK_WORDS[task]} of rows with exactly the features above; "
      "inputs outside the "
      "training distribution (e.g. values other than those seen in training) give "
      "unreliable predictions.",
      f"- Trained on {_data_words(spec)}"
      + ("; the metrics above are for its test split only." if _has_metrics(met) else "."),
      f"- Differential privacy limits what the model reveals about {_one_unit_words(priv)}; it "
      "does not make predictions fair or correct.", "",
      *_loading_lines(bool(spec.get("feature_spec")), task)]
  return "\n".join(lines)


def _up(value: Any, digits: int = 3) -> str:
  """A figure rounded UP to ``digits`` significant digits (an epsilon: the card never states
  less than the accountant's); ``_fmt`` for anything but a positive finite number."""
  if not (isinstance(value, float) and np.isfinite(value) and value > 0):
    return _fmt(value)
  scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
  return f"{math.ceil(value / scale - 1e-9) * scale:.{digits}g}"


def _row_count_lines(priv: Mapping[str, Any]) -> list[str]:
  """How the N behind q, the updates and delta is known: a DP estimate or a declaration."""
  n, source = priv.get("planned_num_examples"), str(priv.get("num_examples_source") or "")
  if n is None:
    return []
  what = f"training {_units_noun(priv)}"
  if priv.get("count_epsilon"):
    return [f"q, the number of updates and delta derive from N = {n} {what}, a DP "
            f"estimate (a Laplace count with epsilon {_fmt(priv['count_epsilon'])}, included "
            f"in epsilon above); the exact number of {what} is not published.", ""]
  return [f"q, the number of updates and delta derive from N = {n} {what}, {source}: "
          "the guarantee treats this figure as public.", ""]


def _is_unit(priv: Mapping[str, Any]) -> bool:
  """Whether the run's unit is not the row (its model.json names unit columns)."""
  return summary_lib.unit_name(priv.get("privacy_unit")) != summary_lib.ROW_UNIT


def _units_noun(priv: Mapping[str, Any]) -> str:
  """What was sampled and counted: ``'rows'``, or ``'units'`` in a unit-level run."""
  return "units" if _is_unit(priv) else "rows"


def _clipped_words(priv: Mapping[str, Any]) -> str:
  """What the clipping bounds: each row's gradient, or the sum over a unit's rows."""
  if _is_unit(priv):
    return "the sum of each unit's row gradients (one vector per unit)"
  return "per-example gradients"


def _one_unit_words(priv: Mapping[str, Any]) -> str:
  """The neighbouring relation's object: one training row, or one whole unit."""
  if _is_unit(priv):
    return f"one whole {summary_lib.unit_name(priv.get('privacy_unit'))} and all of its rows"
  return "one training row"


def _unit_lines(priv: Mapping[str, Any]) -> list[str]:
  """The unit (epsilon, delta) hold for, as every output states it, and what it implies."""
  said = summary_lib.unit_statement(priv.get("privacy_unit"), priv.get("max_rows_per_unit"))
  if not _is_unit(priv):
    return [f"In short: {said}. A person or household with several rows is protected only "
            "as a group of rows (group privacy: a weaker guarantee for several rows).", ""]
  return [f"In short: {said}. The bound of {priv.get('max_rows_per_unit')} rows per unit is "
          "public, fixed before seeing the data; a unit's rows beyond it were left out of "
          "training, and each unit lies wholly in one split.", ""]


def _spec_estimate_lines(priv: Mapping[str, Any]) -> list[str]:
  """The feature spec's private estimates, and the total they are part of (when it has any)."""
  if not priv.get("spec_epsilon"):
    return []
  parts = [("training", priv.get("training_epsilon")),
           ("calibration", priv.get("calibration_epsilon")),
           ("N's estimate", priv.get("count_epsilon")),
           ("the spec's estimates", priv.get("spec_epsilon"))]
  return [f"The feature spec's kinds, bounds and categories are private estimates from the "
          f"table's rows (`fastdp-spec init --epsilon`), with (epsilon, delta) = "
          f"({_up(priv['spec_epsilon'])}, {_fmt(priv.get('spec_delta'), 3)}), included above "
          "(basic composition): epsilon = " + " + ".join(
              f"{name} {_up(v)}" for name, v in parts if v is not None)
          + f" = {_up(priv.get('epsilon'))}.", ""]


def _has_metrics(met: Mapping[str, Any]) -> bool:
  return any(k.startswith("test_") for k in met)


def _evaluation_lines(spec: Mapping[str, Any], met: Mapping[str, Any], task: str) -> list[str]:
  """The test metrics when the export includes them (marked as not covered), else why not."""
  if not _has_metrics(met):
    return ["Test metrics are not part of this export: they are exact statistics of private "
            "held-out rows that no accountant covers (they stay in the private workdir; "
            "`export_test_metrics=True` includes them, marked as not covered)."]
  return ["Computed on held-out private test rows, released without noise and rounded to 4 "
          "significant digits: **not covered by the privacy guarantee** above.", "",
          "| metric | value |", "|---|---|",
          *(f"| {name} | {_fmt(met.get(key))} |" for name, key in _CARD_METRICS[task]),
          *_metric_scale_lines(spec)]


def _loading_lines(raw: bool, task: str = "binary") -> list[str]:
  """The card's "Loading" section (raw rows too when the model carries a feature spec)."""
  outputs = "values" if task == "regression" else "probabilities"
  return ["## Loading", "", "```python",
          "import fastdp_jax",
          "predictor = fastdp_jax.load_model('PATH/TO/model')",
          f"{outputs} = predictor(features)   # [n, d] float array or {{name: column}}",
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
      how = "{!r} (0) or {!r} (1)".format(*f["values"]) if f.get("values") else "0 or 1"
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
          f"feature spec `{feature_spec.get('name')}` ("
          + ("its values privately estimated from the rows, see Privacy" if
             feature_spec.get("private_estimates") else "public: no statistic of the data")
          + "), "
          "columns by name in any order; a row with a missing value, an unknown category or "
          "code, a non-number or a value outside the domain is reported, not predicted:", "",
          "| column | kind | encoding |", "|---|---|---|", *rows, ""]


# ---------------------------------------------------------------------------------------------
# The "Model" section: what the model predicts, from what data, and for which privacy unit.

_TASK_NOUNS = {"binary": "binary classifier", "multiclass": "multi-class classifier",
               "regression": "regression model"}
# What the guarantee protects, by model.json's privacy.privacy_unit ("row" or absent: the
# sampler and the clipping work on rows; a list of columns: on units, see _unit_model_line).
_PRIVACY_UNITS = {
    "row": "one row of the training table: (epsilon, delta) bounds what the model reveals "
           "about any one row. A person or household with several rows is protected as a "
           "group of rows (group privacy: a weaker guarantee), not by (epsilon, delta) itself."}
_MAX_CODES_SHOWN = 8


def _unit_model_line(spec: Mapping[str, Any], unit: str) -> str:
  """The Model section's privacy-unit entry: a row, or a unit with its public bound."""
  if unit in _PRIVACY_UNITS:
    return _PRIVACY_UNITS[unit]
  k = (spec.get("privacy") or {}).get("max_rows_per_unit")
  bound = f", at most {k}, a public bound" if k is not None else ""
  return (f"one {unit}: all of its rows{bound}. (epsilon, delta) bound what the model "
          "reveals about any one unit, whatever it contributed.")


def task_of(spec: Mapping[str, Any]) -> str:
  """The task of a ``model.json``: its model dict's, else its label's (version 2: binary)."""
  model = spec.get("model")
  if isinstance(model, Mapping) and model.get("task") in _TASK_NOUNS:
    return str(model["task"])
  return str((spec.get("label") or {}).get("task", "binary"))


def privacy_unit(spec: Mapping[str, Any]) -> str:
  """The unit the guarantee protects, in words: ``'household (SERIALNO)'`` for a
  ``privacy.privacy_unit`` of ``['SERIALNO']``, ``'row'`` when it is absent or ``'row'``."""
  return summary_lib.unit_name((spec.get("privacy") or {}).get("privacy_unit"))


def model_section(spec: Mapping[str, Any]) -> list[str]:
  """The card's "Model" section: task, label, data, privacy unit, architecture, decision.

  Every statement follows the model's own task (a regression model is never described as a
  classifier), and the data are named by the feature spec's name and description only.
  """
  task, label = task_of(spec), spec["label"]["name"]
  arch, model = spec["architecture"], spec.get("model") or {}
  outputs = len(model.get("classes") or ()) if task == "multiclass" else 1
  sizes = [arch["num_features"], *arch["hidden_sizes"], outputs]
  unit = privacy_unit(spec)
  lines = ["## Model", "", f"- Task: {_task_words(spec, task, label)}",
           f"- Data: {_data_words(spec)}.",
           f"- Privacy unit: {_unit_model_line(spec, unit)}",
           f"- Multi-layer perceptron {'-'.join(map(str, sizes))} (ReLU), "
           f"{spec['num_params']} parameters; output: {_output_words(spec, task, label)}."]
  if task == "binary":
    lines.append(f"- Decision threshold: predict the positive class when the probability is "
                 f"at least {spec['threshold']}.")
  elif task == "multiclass":
    lines.append("- Decision: the most probable class.")
  return lines


def _label_task(spec: Mapping[str, Any]) -> Mapping[str, Any]:
  """The feature spec's task entry (empty without a feature spec, or for a binary spec)."""
  return (spec.get("feature_spec") or {}).get("task") or {}


def _num(v: Any) -> str:
  return _fmt(int(v)) if isinstance(v, float) and v.is_integer() else _fmt(v)


def _positive(spec: Mapping[str, Any]) -> str:
  """The positive class of a binary label, as the spec names it (1 unless it names one)."""
  positive = _label_task(spec).get("positive", spec["label"].get("positive_class", 1))
  return f'"{positive}"' if isinstance(positive, str) else _num(positive)


def _task_words(spec: Mapping[str, Any], task: str, label: str) -> str:
  if task == "binary":
    return (f"binary classification of `{label}`; the positive class is `{label}` = "
            f"{_positive(spec)}.")
  if task == "multiclass":
    coded = {str(c[0]): c[1] for c in _label_task(spec).get("classes") or ()}
    names = [str(c) for c in (spec.get("model") or {}).get("classes") or ()]
    return (f"multi-class classification of `{label}` into {len(names)} classes, in output "
            "order: " + "; ".join(f"`{n}`{_codes_words(coded.get(n))}" for n in names) + ".")
  return f"regression of `{label}`: {_regression_words(spec, label)}"


def _codes_words(codes: Any) -> str:
  if not codes:
    return ""
  shown = ", ".join(_num(c) for c in list(codes)[:_MAX_CODES_SHOWN])
  more = f", ... ({len(codes)} codes)" if len(codes) > _MAX_CODES_SHOWN else ""
  return f" (code{'s' if len(codes) > 1 else ''} {shown}{more})"


def _regression_words(spec: Mapping[str, Any], label: str) -> str:
  """The label's public bounds, and the unit and scale of the prediction."""
  fs_task = _label_task(spec)
  if not fs_task:  # a dataset without a feature spec: its labels' scale is all that is known
    lo, hi = (spec.get("model") or {}).get("bounds") or ("n/a", "n/a")
    return (f"public bounds [{_num(lo)}, {_num(hi)}] of the dataset's labels; the prediction "
            "is on the scale of those labels (the data carried no feature spec: a transform "
            "applied before they were written is not known, so not undone).")
  lo, hi = fs_task["bounds"]
  policy = ("values outside are clipped to them for training" if
            fs_task.get("out_of_bounds") == "clip" else "rows outside are left out of training")
  text = f"public bounds [{_num(lo)}, {_num(hi)}] of the raw label ({policy}). "
  if fs_task.get("transform", "identity") == "log1p":
    return text + (f"The prediction is in `{label}`'s own units: the model learns "
                   f"log1p(`{label}`) and the predictor returns expm1 of its estimate, i.e. "
                   f"an estimate of exp(E[log(1 + {label})]) - 1, which lies below the mean "
                   f"of `{label}` when its spread is large; it is not clipped to the bounds.")
  return text + f"The prediction is in `{label}`'s own units, not clipped to the bounds."


def _output_words(spec: Mapping[str, Any], task: str, label: str) -> str:
  if task == "binary":
    return f"the logit of P(`{label}` = {_positive(spec)})"
  if task == "multiclass":
    return "one logit per class (softmax: the class probabilities)"
  lo, hi = (spec.get("model") or {}).get("bounds") or ("n/a", "n/a")
  scale = ("log1p" if _label_task(spec).get("transform") == "log1p" else "")
  learnt = f"{scale}(`{label}`)" if scale else f"`{label}`"
  return (f"one value v, {learnt} = mid + half * v over the bounds [{_fmt(lo)}, {_fmt(hi)}] "
          "of the scale the model learns (mid, half: their midpoint and half-width)")


def _data_words(spec: Mapping[str, Any]) -> str:
  """The data, as the feature spec names and describes them (public text of the spec)."""
  fs = spec.get("feature_spec") or {}
  if not fs.get("name"):
    return ("a dataset without a feature spec (its name and description are not recorded in "
            "the export)")
  description = str(fs.get("description") or "").strip().rstrip(".")
  return f"`{fs['name']}`" + (f" ({description})" if description else
                              " (the spec gives no description)")


def _metric_scale_lines(spec: Mapping[str, Any]) -> list[str]:
  """For regression: the scale the test metrics are on (the model's, before the inverse)."""
  if task_of(spec) != "regression":
    return []
  label = spec["label"]["name"]
  fs_task = _label_task(spec)
  if not fs_task:
    return ["", "RMSE and MAE are on the scale of the dataset's labels."]
  if fs_task.get("transform", "identity") == "log1p":
    return ["", f"RMSE, MAE and the baselines are on the scale the model learns, "
            f"log1p(`{label}`), not in `{label}`'s units (the predictor's `model_values` "
            "gives that scale; calling the predictor gives the label's units)."]
  return ["", f"RMSE, MAE and the baselines are in `{label}`'s units."]


def _tuned(priv: Mapping[str, Any]) -> bool:
  """Whether ``fastdp-tune`` chose the hyperparameters, its cost accounted."""
  return bool((priv.get("tuning") or {}).get("accounted"))


def _stated_accountant(priv: Mapping[str, Any]) -> str:
  """The accountant behind the stated epsilon: a private tuning's is RDP (the procedure's)."""
  if _tuned(priv) and (priv.get("tuning") or {}).get("epsilon") is not None:
    return "RDP"
  return str(priv.get("accountant", "")).upper()


def tuning_lines(priv: Mapping[str, Any]) -> list[str]:
  """The card's paragraph on how the hyperparameters were chosen (``fastdp-tune``), if so."""
  t = priv.get("tuning")
  if not t or not _tuned(priv):
    return []
  if t.get("method") == "public proxy":
    return [f"Hyperparameters chosen by `fastdp-tune` on public data (`{t.get('proxy')}`, "
            f"{t.get('trials')} trials), then one private run on the training data: the "
            "choice costs no privacy and (epsilon, delta) above covers the whole procedure.",
            ""]
  shape = (f", eta {_fmt(t.get('trials_shape'))}" if t.get("trials_shape") is not None
           else "")
  cal = (f"; temperature {_fmt(priv.get('temperature'))} chosen in each trial by the "
         f"exponential mechanism with epsilon {_fmt(t.get('calibration_epsilon'))}, "
         "composed as zCDP" if t.get("calibration_epsilon") else "")
  counted = (f"; before the trials, one Laplace count of N (epsilon "
             f"{_fmt(t.get('count_epsilon'))}) that every trial's q and T derive from"
             if t.get("count_epsilon") else "")
  return [
      "**Tuned inside the budget** (`fastdp-tune`): random search over a public search "
      f"space; a secret number K of trials, K ~ {t.get('trials_distribution')} (mean "
      f"{_fmt(t.get('trials_mean'))}{shape}); K and the other trials are not released. Each "
      f"trial: DP-SGD with sigma = {_fmt(t.get('noise_multiplier'))}, q = "
      f"{_fmt(t.get('sampling_rate'))}, T = {t.get('steps')} updates, and a private score "
      f"({t.get('score')} on validation rows, Gaussian noise of {_fmt(t.get('score_noise_multiplier'))} "
      f"times its sensitivity){cal}{counted}. Only the best-scoring trial is released "
      "(Papernot & "
      "Steinke 2022), and **epsilon above is the whole procedure's**, "
      f"{_fmt(t.get('epsilon'))} by dp_accounting's RDP accountant (RepeatAndSelectDpEvent); "
      f"the released trial's training alone is {_fmt(priv.get('training_epsilon'))} by "
      f"the {str(priv.get('accountant', '')).upper()} accountant. The choice of "
      "hyperparameters is covered.", ""]

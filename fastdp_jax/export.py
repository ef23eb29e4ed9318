"""Exported models: ``WORKDIR/model/`` and :func:`load_model`, a callable predictor.

The directory holds everything needed to use the model without the training code's state::

    model/
      params.npz      # parameters by path ('layers/0/kernel', ...), float32
      model.json      # architecture, feature spec, label, threshold, privacy, metrics, sha256
      MODEL_CARD.md   # for people: what it is, how private, how good, how to load it

Only public values go into the export (:mod:`fastdp_jax.release`): the configuration, the
privacy parameters (q at a public precision), the accountant's result, whether the run is
private, and test-set metrics labelled as computed on held-out private rows that the guarantee
does not cover. No training row, no statistic of training rows (losses, attack figures), no
row count and no data digest is written.

Example::

  predictor = fastdp_jax.load_model('runs/demo/model')
  p_employed = predictor(features)             # [n, d] array, or {feature name: [n] column}
  labels = predictor.predict(features)         # 0/1 at the exported threshold
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax import data as data_lib
from fastdp_jax import release

FORMAT = "fastdp_jax.model"
FORMAT_VERSION = 1
MODEL_DIR = "model"
PARAMS_FILE = "params.npz"
SPEC_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"


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
                 threshold: float = 0.5) -> str:
  """Writes an exported model into ``directory`` (created; an old export is replaced).

  Args:
    directory: usually ``WORKDIR/model``.
    params: the trained parameter pytree of :class:`fastdp_jax.models.MLP`.
    feature_names: the d input columns, in the order the model reads them.
    label_name: what the model predicts (P(label = 1)).
    hidden_sizes: the MLP's hidden widths.
    summary: the run's summary (privacy, metrics, config); public values only.
    threshold: the decision threshold on the probability for :meth:`Predictor.predict`.

  Returns:
    ``directory``.
  """
  flat = _flat_params(params)
  os.makedirs(directory, exist_ok=True)
  params_path = os.path.join(directory, PARAMS_FILE)
  tmp = params_path + ".tmp.npz"
  np.savez(tmp, **flat)  # type: ignore[arg-type]  # the stub fears ** sets allow_pickle
  os.replace(tmp, params_path)
  summary = dict(summary or {})
  spec = dict(
      format=FORMAT, format_version=FORMAT_VERSION,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      architecture=dict(type="MLP", num_features=len(feature_names),
                        hidden_sizes=[int(h) for h in hidden_sizes], activation="relu",
                        output="logit of P(label = 1)"),
      features=[dict(name=n, index=i, dtype="float32") for i, n in enumerate(feature_names)],
      label=dict(name=label_name, positive_class=1),
      threshold=float(threshold),
      params_sha256=data_lib.sha256_file(params_path),
      num_params=int(sum(v.size for v in flat.values())),
      privacy=_privacy_of(summary),
      metrics=_metrics_of(summary),
      config=summary.get("config"),
      versions=_versions())
  _write_text(os.path.join(directory, SPEC_FILE), json.dumps(spec, indent=1, default=float))
  _write_text(os.path.join(directory, CARD_FILE), model_card(spec))
  return directory


def _write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


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
  keys = ("test_accuracy", "test_loss", "majority_class_rate", "below_majority_class")
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
      f"- Parameters: `{PARAMS_FILE}` (sha256 `{spec['params_sha256'][:16]}...`, checked on "
      "load).", "",
      "## Inputs", "",
      f"{arch['num_features']} numeric features, float32, in this order "
      "(pass an array of shape [n, d] in this order, or a mapping from name to column):", "",
      "| # | feature |", "|---|---|",
      *[f"| {f['index']} | `{f['name']}` |" for f in spec["features"]], "",
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
            f"| test accuracy | {_fmt(met.get('test_accuracy'))} |",
            f"| majority-class rate | {_fmt(met.get('majority_class_rate'))} |",
            f"| test loss (BCE) | {_fmt(met.get('test_loss'))} |"]
  lines += [
      "", "Attacks on training rows (model inversion, membership inference) and the training "
      "loss are statistics of the training data that no accountant covers: they stay in the "
      "private workdir and are not part of this export.", "",
      "## Intended use and limits", "",
      "- Binary classification of rows with exactly the features above; inputs outside the "
      "training distribution (e.g. values other than those seen in training) give "
      "unreliable predictions.",
      "- Trained on synthetic or census-style data; the accuracy above is for its test split.",
      "- Differential privacy limits what the model reveals about any one training row; it "
      "does not make predictions fair or correct.", "",
      "## Loading", "", "```python",
      "import fastdp_jax",
      "predictor = fastdp_jax.load_model('PATH/TO/model')",
      "probabilities = predictor(features)   # [n, d] float array or {name: column}",
      "labels = predictor.predict(features)",
      "```", ""]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A loaded model: ``predictor(features) -> P(label = 1)``.

  Attributes:
    feature_names: the inputs, in order.
    label_name: what is predicted.
    threshold: the decision threshold of :meth:`predict`.
    spec: the full ``model.json`` contents (privacy, metrics, config).
  """

  feature_names: tuple[str, ...]
  label_name: str
  threshold: float
  spec: dict[str, Any] = dataclasses.field(repr=False)
  _apply: Any = dataclasses.field(repr=False)
  _params: Any = dataclasses.field(repr=False)

  def features_array(self, features: Any) -> np.ndarray:
    """Features as a [n, d] float32 array, from an array or a mapping name -> column."""
    if hasattr(features, "keys") and not isinstance(features, np.ndarray):
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
    """[n] logits."""
    return np.asarray(self._apply(self._params, self.features_array(features)))

  def __call__(self, features: Any) -> np.ndarray:
    """[n] probabilities P(label = 1)."""
    from scipy import special
    return special.expit(self.logits(features).astype(np.float64)).astype(np.float32)

  def predict(self, features: Any) -> np.ndarray:
    """[n] int labels: 1 where the probability is at least ``threshold``."""
    return (self(features) >= self.threshold).astype(np.int32)


def load_model(path: str) -> Predictor:
  """Loads an exported model (``WORKDIR/model`` or the workdir that holds it).

  Raises:
    FileNotFoundError: no export at ``path``.
    ValueError: the files do not match (format, checksum, parameter shapes).
  """
  import jax  # local: only loading needs JAX
  from fastdp_jax import models
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, SPEC_FILE)) and os.path.isfile(
      os.path.join(path, MODEL_DIR, SPEC_FILE)):
    path = os.path.join(path, MODEL_DIR)
  spec_path = os.path.join(path, SPEC_FILE)
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(f"{path}: no {SPEC_FILE} (not an exported model; training writes "
                            f"one to WORKDIR/{MODEL_DIR})")
  with open(spec_path) as f:
    spec = json.load(f)
  if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{spec_path}: format {spec.get('format')!r} version "
                     f"{spec.get('format_version')!r}; expected {FORMAT!r} {FORMAT_VERSION}")
  params_path = os.path.join(path, PARAMS_FILE)
  if (digest := data_lib.sha256_file(params_path)) != spec["params_sha256"]:
    raise ValueError(f"{params_path}: sha256 {digest[:12]}... does not match model.json's "
                     f"{spec['params_sha256'][:12]}... (corrupt or replaced file)")
  arch = spec["architecture"]
  model = models.create_model(arch["num_features"], arch["hidden_sizes"], seed=0)
  apply_fn, template = models.functional(model)
  with np.load(params_path) as saved:
    loaded = {k: saved[k] for k in saved.files}
  flat = models.flatten_params(template)
  if set(flat) != set(loaded):
    raise ValueError(f"{params_path}: parameters {sorted(loaded)} do not match the "
                     f"architecture's {sorted(flat)}")
  for name, leaf in flat.items():
    if tuple(leaf.shape) != loaded[name].shape:
      raise ValueError(f"{params_path}: {name} has shape {loaded[name].shape}, the "
                       f"architecture needs {tuple(leaf.shape)}")
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves_with_paths]
  params = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(loaded[n]) for n in names])
  return Predictor(feature_names=tuple(f["name"] for f in spec["features"]),
                   label_name=spec["label"]["name"], threshold=float(spec["threshold"]),
                   spec=spec, _apply=jax.jit(apply_fn), _params=params)

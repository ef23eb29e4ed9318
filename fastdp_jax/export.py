"""Exported models: ``WORKDIR/model/`` and :func:`load_model`, a callable predictor.

The directory holds everything needed to use the model without the training code's state::

    model/
      params.npz            # parameters by path ('layers/0/kernel', ...), float32
      model.json            # architecture, feature spec, label, threshold, privacy, metrics
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

Only public values go into the export (:mod:`fastdp_jax.release`): the configuration, the
privacy parameters (q at a public precision), the accountant's result, whether the run is
private, and test-set metrics labelled as computed on held-out private rows that the guarantee
does not cover. No training row, no statistic of training rows (losses, attack figures), no
row count and no data digest is written.

Example::

  predictor = fastdp_jax.load_model('runs/demo/model')
  p_employed = predictor(features)             # [n, d] array, or {feature name: [n] column}
  labels = predictor.predict(features)         # 0/1 at the exported threshold

  python -m fastdp_jax.export verify runs/demo/model [--key-file KEY] [--digest HEX]
  python -m fastdp_jax.export sign runs/demo/model --key-file KEY
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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
from fastdp_jax import data as data_lib
from fastdp_jax import errors
from fastdp_jax import release

FORMAT = "fastdp_jax.model"
FORMAT_VERSION = 2  # 2: MANIFEST.sha256 covers every file (1 had the parameters' digest only)
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
                 threshold: float = 0.5, signing_key: bytes | None = None) -> str:
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
      spec = dict(
          format=FORMAT, format_version=FORMAT_VERSION,
          created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          architecture=dict(type="MLP", num_features=len(names),
                            hidden_sizes=[int(h) for h in hidden_sizes], activation="relu",
                            output="logit of P(label = 1)"),
          features=[dict(name=n, index=i, dtype="float32") for i, n in enumerate(names)],
          label=dict(name=label_name, positive_class=1),
          threshold=float(threshold),
          params_sha256=data_lib.sha256_file(params_path),
          num_params=int(sum(v.size for v in flat.values())),
          privacy=_privacy_of(summary),
          metrics=_metrics_of(summary),
          config=summary.get("config"),
          versions=_versions())
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
      f"- Parameters: `{PARAMS_FILE}` (sha256 `{spec['params_sha256'][:16]}...`); every file's "
      f"sha256 is in `{MANIFEST_FILE}`, checked on load (`sha256sum -c {MANIFEST_FILE}` "
      "also works).", "",
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
    digest: sha256 of ``MANIFEST.sha256``: one value covering every file of the model.
    signed: whether a signature was checked against a key.
    spec: the full ``model.json`` contents (privacy, metrics, config).
  """

  feature_names: tuple[str, ...]
  label_name: str
  threshold: float
  digest: str
  signed: bool
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
  arch = spec["architecture"]
  expected = _expected_shapes(arch["num_features"], arch["hidden_sizes"])
  params_path = os.path.join(path, PARAMS_FILE)
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
  import jax  # local: only loading needs JAX
  from fastdp_jax import models
  with np.load(params_path, allow_pickle=False) as saved:
    loaded = {k: saved[k] for k in saved.files}
  for name, value in loaded.items():
    if not np.all(np.isfinite(value)):
      raise ModelIntegrityError(f"{params_path}: {name} holds non-finite values")
  model = models.create_model(arch["num_features"], arch["hidden_sizes"], seed=0)
  apply_fn, template = models.functional(model)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves_with_paths]
  params = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(loaded[n]) for n in names])
  return Predictor(feature_names=tuple(f["name"] for f in spec["features"]),
                   label_name=spec["label"]["name"], threshold=float(spec["threshold"]),
                   digest=digest, signed=signed, spec=spec, _apply=jax.jit(apply_fn),
                   _params=params)


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

  if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
    raise bad("format", f"is {spec.get('format')!r} version {spec.get('format_version')!r}; "
              f"expected {FORMAT!r} {FORMAT_VERSION}")
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
  count = sum(math.prod(s) for s in _expected_shapes(d, hidden).values())
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
  if not (isinstance(label, dict) and isinstance(label.get("name"), str) and label["name"]
          and label.get("positive_class") == 1):
    raise bad("label", "must be {name: a non-empty string, positive_class: 1}")
  t = spec.get("threshold")
  if not (_is_real(t) and 0 <= t <= 1):  # NaN fails both comparisons
    raise bad("threshold", f"={t!r} must be a number in [0, 1]")
  if not (isinstance(spec.get("params_sha256"), str)
          and re.fullmatch(r"[0-9a-f]{64}", spec["params_sha256"])):
    raise bad("params_sha256", "must be a sha256 hex digest")
  _check_privacy(spec.get("privacy"), bad, check_epsilon)


def _check_privacy(priv: Any, bad, check_epsilon: bool) -> None:
  """The privacy section agrees with itself: types, ranges, and epsilon with sigma, q, T."""
  from fastdp_jax import accounting  # local: dp_accounting is slow to import
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

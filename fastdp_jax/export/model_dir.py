"""Writing and checking a model directory: :func:`export_model`, the manifest, the signature.

:func:`export_model` writes ``WORKDIR/model/`` whole (staged, then renamed into place) with
public values only (:mod:`fastdp_jax.dp.release`): the configuration, the privacy parameters (q
at a public precision), the accountant's result, whether the run is private, and test-set
metrics labelled as computed on held-out private rows that the guarantee does not cover. No
training row, no statistic of training rows (losses, attack figures), no row count and no data
digest is written.

Integrity (:func:`verify_files`): the manifest must list exactly the covered files and every
digest must match; the model's digest (sha256 of the manifest, :func:`model_digest`) covers
every file, so one value pins the whole model. Without a key this detects corruption and any
edit that did not also rewrite the manifest; a signature (:func:`sign_model`, an HMAC with a
user's secret key) detects any edit by someone without the key.

Consistency (:func:`read_checked`): before any allocation the architecture is checked against
the array shapes in ``params.npz``'s headers (so the parameter count is bounded by what the
file holds), and ``model.json`` against itself: the feature list, a threshold in [0, 1], the
parameter count and epsilon recomputed from the stated sigma, q and steps. Nothing executes
(no pickles).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import math
import os
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from fastdp_jax import profiling
from fastdp_jax import summary as summary_lib
from fastdp_jax.dp import release
from fastdp_jax.export import card
from fastdp_jax.export import layout

FORMAT = "fastdp_jax.model"
# The versions this code reads: 2 (a binary MLP; the manifest covers every file) and 3, which
# adds "model" (task, embeddings) and "feature_spec" (the raw-row encoding).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
TASKS = ("binary", "multiclass", "regression")
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


@profiling.books("export")  # a phase of the run's profile (profile_steps > 0)
def export_model(directory: str, *, params: Any, feature_names: Sequence[str], label_name: str,
                 hidden_sizes: Sequence[int], summary: summary_lib.RunSummary | None = None,
                 threshold: float = 0.5, signing_key: bytes | None = None,
                 model: Mapping[str, Any] | None = None,
                 feature_spec: Mapping[str, Any] | None = None,
                 include_test_metrics: bool = False) -> str:
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
    threshold: the decision threshold on the probability for
      :meth:`~fastdp_jax.export.predictor.Predictor.predict`.
    signing_key: also sign the manifest (HMAC-SHA256, ``MANIFEST.sha256.hmac``) with this
      secret key (at least 16 bytes); :func:`~fastdp_jax.export.predictor.load_model` with
      the same key checks it.
    model: the ``"model"`` dict (:func:`fastdp_jax.models.model_spec`: hidden_sizes, task,
      classes, bounds, embeddings). Default: taken from ``feature_spec`` (its task and
      embedding columns, each table's width read off ``params``), else a binary MLP.
    feature_spec: the dataset's feature spec in canonical form (the manifest's
      ``extra["spec"]``, :meth:`fastdp_jax.data.features.FeatureSpec.to_dict`): the public
      encoding that lets the predictor take raw rows. None: encoded features only.
    include_test_metrics: also state ``summary``'s test metrics (``export_test_metrics``),
      rounded and marked as not covered by the guarantee; by default they stay out: exact
      statistics of private held-out rows (their count among them) that no accountant covers.

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
  name = os.path.basename(directory)
  with atomic.disk_full_is_user_error(directory, f"the previous {name}/ (if any) is intact",
                                      restate=True):
    # The model is public: the staging directory gets the default mode, not owner-only.
    staging = atomic.make_staging(directory, mode=0o777, report=None)
    try:
      params_path = os.path.join(staging, layout.PARAMS_FILE)
      atomic.write_npz(params_path, flat)
      spec = _model_json(names, hidden_sizes, model_dict, feature_spec, label_name,
                         threshold, data_lib.sha256_file(params_path), flat, summary,
                         include_test_metrics)
      text = json.dumps(spec, indent=1, default=float)
      _check_spec(json.loads(text), staging)  # load_model's checks: no export is refused
      atomic.write_text(os.path.join(staging, layout.SPEC_FILE), text)
      atomic.write_text(os.path.join(staging, layout.CARD_FILE), card.model_card(spec))
      manifest = _manifest_text(staging)
      atomic.write_text(os.path.join(staging, layout.MANIFEST_FILE), manifest)
      if signing_key is not None:
        atomic.write_text(os.path.join(staging, layout.SIGNATURE_FILE),
                          _signature_line(_check_key(signing_key), manifest))
      atomic.publish(staging, directory)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  return directory


def _model_json(names: Sequence[str], hidden_sizes: Sequence[int], model: dict[str, Any],
                feature_spec: Mapping[str, Any] | None, label_name: str, threshold: float,
                params_sha256: str, flat: Mapping[str, np.ndarray],
                summary: summary_lib.RunSummary | None,
                include_test_metrics: bool = False) -> dict[str, Any]:
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
      metrics=_metrics_of(summary, include_test_metrics),
      config=(summary.config or None) if summary is not None else None,
      versions=_versions())


def _check_replaceable(directory: str) -> None:
  """Refuses to replace a directory that holds anything but an export's files."""
  if not os.path.lexists(directory):
    return
  if not os.path.isdir(directory) or os.path.islink(directory):
    raise ModelIntegrityError(f"refusing to replace {directory}: it is not a directory")
  # Leftovers of an interrupted export (its temporary files, by the names atomic writers give
  # them) are not the user's files: they go too.
  others = sorted(n for n in set(os.listdir(directory)) - set(layout.ALL_FILES)
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
  for data whose features differ from the spec's (an audit dataset adds canary columns to a
  copy of a Spark-job manifest): raw rows encoded by it would not be the model's inputs.
  """
  if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(
      os.path.join(path, manifest_lib.MANIFEST)):
    return None
  manifest = manifest_lib.read_manifest(path)
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


def _privacy_of(summary: summary_lib.RunSummary | None) -> dict[str, Any]:
  if summary is None:
    return {}
  out = summary.privacy_record()
  if summary.sampling_rate is not None:
    out["sampling_rate"] = release.public_sampling_rate(summary.sampling_rate)
  return out


def _metrics_of(summary: summary_lib.RunSummary | None, include: bool) -> dict[str, Any]:
  """The task and, only if ``include``, the test metrics (rounded, marked as not covered).

  Held-out test rows only; the training-row diagnostics (nonprivate_*) stay in the workdir.
  """
  out = summary.test_record() if summary is not None else {}
  if out and not include:
    return {"task": out["task"], "note": release.TEST_METRICS_LEFT_OUT}
  if out:
    out = {k: release.public_metric(v) for k, v in out.items()}
    out.update(note=release.TEST_METRICS_NOTE, covered_by_guarantee=False)
  return out


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
  return "".join(f"{_file_digest(os.path.join(directory, n))}  {n}\n"
                 for n in layout.COVERED_FILES)


def model_digest(manifest: str | bytes) -> str:
  """The model's digest: sha256 of its ``MANIFEST.sha256`` (covers every file)."""
  return hashlib.sha256(manifest.encode() if isinstance(manifest, str) else manifest).hexdigest()


def _check_key(key: bytes | str) -> bytes:
  key = key.encode() if isinstance(key, str) else bytes(key)
  if len(key) < _MIN_KEY_BYTES:
    raise errors.UserError(f"a signing key must hold at least {_MIN_KEY_BYTES} bytes (it has "
                           f"{len(key)}); e.g. head -c 32 /dev/urandom > KEY")
  return key


def read_key_file(path: str) -> bytes:
  """The signing key in a file: every byte, a final newline included, as ``sign`` used it.

  The commands (``python -m fastdp_jax.export``, ``python -m fastdp_jax.predict``) read
  ``--key-file`` through this one function, so a key signs and checks alike everywhere.
  """
  with open(path, "rb") as f:
    return f.read()


def is_signed(path: str) -> bool:
  """Whether the model directory ``path`` (or the workdir holding it) carries a signature."""
  return os.path.isfile(os.path.join(_model_dir(os.fspath(path)), layout.SIGNATURE_FILE))


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
  manifest_path = os.path.join(path, layout.MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    raise ModelIntegrityError(
        f"{path}: no {layout.MANIFEST_FILE}, so its files cannot be checked (exports before "
        f"format version {FORMAT_VERSION} had none: export the model again with this version)")
  raw = _read_bounded(manifest_path, _MAX_MANIFEST_BYTES)
  digests: dict[str, str] = {}
  for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
    m = _MANIFEST_LINE.match(line)
    if not m or m.group(2) in digests:
      raise ModelIntegrityError(f"{manifest_path}: line {n} is not 'SHA256  FILE' for a new "
                                "file")
    digests[m.group(2)] = m.group(1)
  if sorted(digests) != sorted(layout.COVERED_FILES):
    raise ModelIntegrityError(f"{manifest_path}: lists {sorted(digests)}; an export has "
                              f"exactly {sorted(layout.COVERED_FILES)}")
  extra = sorted(set(os.listdir(path)) - set(layout.ALL_FILES))
  if extra:
    raise ModelIntegrityError(f"{path}: {extra[:5]} are not files of an exported model")
  digest = model_digest(raw)
  if expected_digest is not None and not hmac.compare_digest(digest, expected_digest.lower()):
    raise ModelIntegrityError(f"{path}: model digest {digest[:16]}... is not the expected "
                              f"{expected_digest[:16]}...")
  signed = False
  signature_path = os.path.join(path, layout.SIGNATURE_FILE)
  if key is not None:
    if not os.path.isfile(signature_path):
      raise ModelIntegrityError(f"{path}: not signed (no {layout.SIGNATURE_FILE}); a key was "
                                "given")
    expected = _signature_line(_check_key(key), raw.decode("utf-8", "replace"))
    if not hmac.compare_digest(_read_bounded(signature_path, 256), expected.encode()):
      raise ModelIntegrityError(f"{signature_path}: the signature does not match (another key, "
                                "or the model was changed after signing)")
    signed = True
  for name in layout.COVERED_FILES:
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path) or os.path.islink(file_path):
      raise ModelIntegrityError(f"{file_path}: missing (or not a regular file)")
    found = _file_digest(file_path)
    if found != digests[name]:
      raise ModelIntegrityError(f"{file_path}: sha256 {found[:12]}... does not match "
                                f"{layout.MANIFEST_FILE}'s {digests[name][:12]}... (corrupt, "
                                "edited or replaced file)")
  return digests, digest, signed


def sign_model(path: str, key: bytes | str) -> str:
  """Signs an existing export (after checking it); returns its digest."""
  checked = read_checked(path)  # every check load_model makes: only a sound model is signed
  raw = _read_bounded(os.path.join(checked.path, layout.MANIFEST_FILE),
                      _MAX_MANIFEST_BYTES).decode()
  atomic.write_text(os.path.join(checked.path, layout.SIGNATURE_FILE),
                    _signature_line(_check_key(key), raw))
  return checked.digest


def _model_dir(path: str) -> str:
  """``path``, or ``path/model`` when ``path`` is a workdir holding an export."""
  if not os.path.isfile(os.path.join(path, layout.SPEC_FILE)) and os.path.isfile(
      os.path.join(path, layout.MODEL_DIR, layout.SPEC_FILE)):
    return os.path.join(path, layout.MODEL_DIR)
  return path


@dataclasses.dataclass(frozen=True)
class CheckedModel:
  """An export that passed every check of :func:`read_checked`.

  Attributes:
    path: the model directory.
    spec: the ``model.json`` contents, consistent with themselves and with ``params.npz``.
    model: the ``"model"`` dict (:func:`model_of`: task, classes, bounds, embeddings).
    params: the arrays of ``params.npz`` by path ('layers/0/kernel', ...): float32, finite,
      of the shapes the architecture needs.
    digest: sha256 of ``MANIFEST.sha256``: one value covering every file of the model.
    signed: whether a signature was checked against a key.
  """

  path: str
  spec: dict[str, Any]
  model: dict[str, Any]
  params: dict[str, np.ndarray]
  digest: str
  signed: bool


def read_checked(path: str, *, key: bytes | str | None = None,
                 expected_digest: str | None = None,
                 check_epsilon: bool = True) -> CheckedModel:
  """Reads an exported model (``WORKDIR/model`` or the workdir that holds it), checked whole.

  The files against the manifest (and the signature, the digest), ``model.json`` against
  itself, then the architecture against the array headers of ``params.npz`` before its arrays
  are read: what :func:`fastdp_jax.export.predictor.load_model` builds a predictor from.

  Args:
    path: the model directory, or a workdir holding ``model/``.
    key: the secret key the model was signed with: the signature must exist and match.
    expected_digest: the model digest the files must have.
    check_epsilon: recompute epsilon from the stated sigma, q and steps.

  Raises:
    FileNotFoundError: no export at ``path``.
    ModelIntegrityError: a missing, extra, corrupt or edited file, a bad signature or digest,
      or a ``model.json`` that is inconsistent with itself or with ``params.npz``.
  """
  path = _model_dir(os.fspath(path))
  spec_path = os.path.join(path, layout.SPEC_FILE)
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(f"{path}: no {layout.SPEC_FILE} (not an exported model; training "
                            f"writes one to WORKDIR/{layout.MODEL_DIR})")
  digests, digest, signed = verify_files(path, key=key, expected_digest=expected_digest)
  spec = _read_spec(spec_path, digests[layout.SPEC_FILE])
  _check_spec(spec, path, check_epsilon=check_epsilon)
  if spec["params_sha256"] != digests[layout.PARAMS_FILE]:
    raise ModelIntegrityError(f"{spec_path}: params_sha256 differs from "
                              f"{layout.MANIFEST_FILE}'s digest of {layout.PARAMS_FILE}")
  model = model_of(spec)
  params = _load_params(os.path.join(path, layout.PARAMS_FILE),
                        expected_shapes(spec["architecture"]["num_features"], model))
  return CheckedModel(path=path, spec=spec, model=model, params=params, digest=digest,
                      signed=signed)


# ---------------------------------------------------------------------------------------------
# Consistency of model.json and params.npz, checked before any allocation.


def _load_params(params_path: str, expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """The arrays of ``params.npz`` once their headers match ``expected`` (bounded allocation)."""
  found = _npz_shapes(params_path)  # headers only: nothing allocated yet
  if set(found) != set(expected):
    raise ModelIntegrityError(f"{params_path}: arrays {sorted(found)} do not match the "
                              f"architecture's {sorted(expected)}")
  for name, shape in expected.items():
    if found[name] != shape:
      raise ModelIntegrityError(f"{params_path}: {name} has shape {found[name]}, the "
                                f"architecture in {layout.SPEC_FILE} needs {shape}")
  # From here the architecture matches arrays the file really holds: allocating it is bounded by
  # the file's size.
  with np.load(params_path, allow_pickle=False) as saved:
    loaded = {k: saved[k] for k in saved.files}
  for name, value in loaded.items():
    if not np.all(np.isfinite(value)):
      raise ModelIntegrityError(f"{params_path}: {name} holds non-finite values")
  return loaded


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
  where = os.path.join(where, layout.SPEC_FILE)

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
  if set(model) - {"temperature"} != {"hidden_sizes", "task", "classes", "bounds",
                                       "embeddings"}:
    raise bad("model", "must hold hidden_sizes, task, classes, bounds and embeddings (and a "
              "classifier's temperature)")
  if "temperature" in model and not (
      model["task"] in ("binary", "multiclass") and _is_real(model["temperature"])
      and 1e-3 <= model["temperature"] <= 1e3):
    raise bad("model.temperature", f"={model['temperature']!r} must be a number in "
              "[0.001, 1000], for a classifier only")
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
          and _is_int(e["vocab_size"]) and 1 <= e["vocab_size"] <= manifest_lib.MAX_VOCAB
          and _is_int(e["dim"]) and 1 <= e["dim"] <= _MAX_EMBEDDING_DIM)
    if not ok:
      raise bad(f"model.embeddings[{k}]", "must be {feature: the name of features[index], "
                f"index, vocab_size in [1, {manifest_lib.MAX_VOCAB}], dim in [1, "
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
  if (unit_problem := summary_lib.unit_record_problem(priv)) is not None:
    raise bad("privacy.privacy_unit", unit_problem)
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
  spec_delta = priv.get("spec_delta") or 0.0  # the feature spec's private estimates
  if _is_real(total) and _is_real(delta) and _is_real(overflow) and not (_is_real(
      spec_delta) and math.isclose(total, delta + overflow + spec_delta, rel_tol=1e-9)):
    raise bad("privacy.delta", f"={total!r} is not accountant_delta + overflow_delta + "
              "spec_delta")
  # With a calibration, epsilon is training's plus the selection's (basic composition); after
  # a private tuning (fastdp-tune) it is the whole procedure's, stated in the tuning record.
  trained, calibrated = priv.get("training_epsilon", eps), priv.get("calibration_epsilon")
  counted = priv.get("count_epsilon")  # the DP count of N (fastdp_jax.dp.count), likewise
  tuned = priv.get("tuning")
  if isinstance(tuned, dict) and tuned.get("accounted") and "epsilon" in tuned:
    if not (_is_real(eps) and math.isclose(eps, tuned["epsilon"], rel_tol=1e-9)):
      raise bad("privacy.epsilon", f"={eps!r} is not the tuning procedure's "
                f"{tuned['epsilon']!r}")
    calibrated = counted = None  # inside each trial's event, not added to epsilon
  spec_eps = priv.get("spec_epsilon")  # the feature spec's private estimates, likewise
  added = [e for e in (calibrated, counted, spec_eps) if e is not None]
  if added and not (
      all(_is_real(e) and e >= 0 for e in added) and _is_real(trained) and _is_real(eps)
      and math.isclose(eps, trained + sum(added), rel_tol=1e-9)):
    raise bad("privacy.epsilon", f"={eps!r} is not training_epsilon {trained!r} + "
              f"calibration_epsilon {calibrated!r} + count_epsilon {counted!r} + "
              f"spec_epsilon {spec_eps!r}")
  single = priv.get("ledger_composition", priv.get("accountant")) == priv.get("accountant")
  if (check_epsilon and single and _is_real(trained) and None not in (sigma, q, steps, delta)):
    recomputed = accounting.compute_epsilon(float(sigma), float(q), int(steps), float(delta),
                                            priv.get("accountant", "pld"))
    if not math.isclose(trained, recomputed, rel_tol=_EPSILON_RTOL, abs_tol=1e-9):
      raise bad("privacy.epsilon", f"={trained!r} but sigma {sigma}, q {q} and {steps} updates "
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

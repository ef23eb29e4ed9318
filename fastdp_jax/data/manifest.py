"""The manifest of a dataset: its typed values, the one value check, and ``manifest.json``.

A dataset directory holds one HDF5 file per shard (:mod:`fastdp_jax.data.shards`) and a
``manifest.json`` that records the format version, the feature and label names, each feature's
PUBLIC bounds ``[lo, hi]`` (declared by the producer from the feature spec, never computed from
the data), each shard's split, row count, feature width and sha256, and the provenance counts
of the producer (rows read, kept, dropped for ``NA``, rejected as malformed;
``read = kept + dropped_na + rejected``). Its ``task`` says what the labels are (binary 0/1, a
multiclass class index, a regression value inside public bounds; absent: binary) and
``embeddings`` which integer-id columns the model embeds.

The dataset directory is a trust boundary. The manifest lists its shards as plain file names
inside the directory (no ``..``, no absolute paths), each once (a shard listed twice would
count its people twice), with a known split: :func:`read_manifest` and :func:`write_manifest`
refuse anything else. Values are checked by one function, :func:`check_values` (finite, inside
the declared bounds, labels valid for the task, integer embedding ids), which the shard writer
runs before a row is written, the loader on every row before training, and the reader of
materialised batches (:mod:`fastdp_jax.data.batch_stream`) on every real row it reads; it names
the column and the row, never the value.

Data that declares no bounds (a manifest without ``feature_bounds``, the original system's
single-file layouts) takes them from the config (``data.feature_bounds``) or is refused
(:func:`resolve_bounds`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fastdp_jax import atomic
from fastdp_jax import errors
from fastdp_jax.data import units as units_lib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
LABELS = (0, 1)  # the label set of a binary task
TASK_KINDS = ("binary", "multiclass", "regression")
MAX_VOCAB = 1 << 24  # ids up to this are exact in float32 (they travel as features)

Bounds = tuple[tuple[float, float], ...]

HOW_TO_DECLARE_BOUNDS = (
    "declare the public bounds of the features: --config.data.feature_bounds='(0, 1)' (one "
    "(lo, hi) for every feature) or one (lo, hi) pair per feature, written down from what the "
    "columns can be (never computed from the data); or rewrite the dataset with the shard "
    "writer, which records the feature spec's bounds")


class ShardError(errors.UserError):
  """A data set on disk does not match its manifest or its contract; names the shard."""


@dataclasses.dataclass(frozen=True)
class Task:
  """What the labels are: the learning task, declared by the feature spec (public).

  Attributes:
    kind: ``'binary'`` (labels 0/1), ``'multiclass'`` (labels the class index 0..K-1 of
      ``classes``) or ``'regression'`` (float labels inside ``bounds``, already transformed
      and clipped by the spec).
    classes: the K >= 2 public class names of a multiclass task (empty otherwise).
    bounds: the public ``(lo, hi)`` of a regression task's labels (None otherwise).
  """

  kind: str
  classes: tuple[str, ...] = ()
  bounds: tuple[float, float] | None = None

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise errors.UserError(f"task kind {self.kind!r} must be one of {TASK_KINDS}")
    object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
    if self.kind == "multiclass":
      if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
        raise errors.UserError(f"a multiclass task needs 2 or more distinct class names, got "
                               f"{list(self.classes)}")
    elif self.classes:
      raise errors.UserError(f"a {self.kind} task has no class list (got "
                             f"{list(self.classes)})")
    if self.kind == "regression":
      try:
        lo, hi = (float(v) for v in self.bounds)  # type: ignore[union-attr]
      except (TypeError, ValueError):
        raise errors.UserError(f"a regression task needs public label bounds (lo, hi), got "
                               f"{self.bounds!r}") from None
      if not (np.isfinite([lo, hi]).all() and lo < hi):
        raise errors.UserError(f"regression label bounds {self.bounds!r} must be finite with"
                               " lo < hi")
      object.__setattr__(self, "bounds", (lo, hi))
    elif self.bounds is not None:
      raise errors.UserError(f"a {self.kind} task has no label bounds (got {self.bounds!r})")

  @property
  def num_outputs(self) -> int:
    """Width of the model's output layer: K for multiclass, else 1."""
    return len(self.classes) if self.kind == "multiclass" else 1

  def to_json(self) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": self.kind}
    if self.classes:
      body["classes"] = list(self.classes)
    if self.bounds is not None:
      body["bounds"] = list(self.bounds)
    return body

  @classmethod
  def from_json(cls, body: Any) -> Task:
    if not isinstance(body, dict) or set(body) - {"kind", "classes", "bounds"}:
      raise errors.UserError(f"task {body!r} must be an object with kind, and classes or "
                             "bounds")
    return cls(body.get("kind"), tuple(body.get("classes", ())),
               None if body.get("bounds") is None else tuple(body["bounds"]))


BINARY = Task("binary")


@dataclasses.dataclass(frozen=True)
class Embedding:
  """A feature column holding an integer id 0..vocab_size-1 that the model embeds.

  The id travels as one float32 feature (exact up to 2**24); its feature bound is
  ``(0, vocab_size - 1)`` and non-integer ids are refused like out-of-bounds values.

  Attributes:
    feature: the column's name (one of the manifest's feature names).
    vocab_size: the size of the PUBLIC vocabulary (never counted from the data).
  """

  feature: str
  vocab_size: int

  def __post_init__(self):
    if not isinstance(self.feature, str) or not self.feature:
      raise errors.UserError(f"embedding feature {self.feature!r} must be a column name")
    if (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, (int, np.integer))
        or not 1 <= self.vocab_size <= MAX_VOCAB):
      raise errors.UserError(f"embedding {self.feature!r}: vocab_size={self.vocab_size!r} must "
                             f"be an integer in [1, {MAX_VOCAB}]")
    object.__setattr__(self, "vocab_size", int(self.vocab_size))

  def to_json(self) -> dict[str, Any]:
    return {"feature": self.feature, "vocab_size": self.vocab_size}

  @classmethod
  def from_json(cls, body: Any) -> Embedding:
    if not isinstance(body, dict) or set(body) != {"feature", "vocab_size"}:
      raise errors.UserError(f"embedding {body!r} must be an object with feature and "
                             "vocab_size")
    return cls(body["feature"], body["vocab_size"])


def embedding_columns(embeddings: Sequence[Embedding],
                      feature_names: Sequence[str]) -> tuple[int, ...]:
  """The column index of each embedding's feature; refuses unknown or repeated columns.

  Raises:
    UserError: naming the embedding.
  """
  names = list(feature_names)
  out = []
  for e in embeddings:
    if e.feature not in names:
      raise errors.UserError(f"embedding feature {e.feature!r} is not one of the feature "
                             f"columns {names}")
    out.append(names.index(e.feature))
  if len(set(out)) != len(out):
    raise errors.UserError(f"embeddings {[e.feature for e in embeddings]} name a column twice")
  return tuple(out)


def check_embedding_bounds(embeddings: Sequence[Embedding], feature_names: Sequence[str],
                           bounds: Bounds | None, where: str) -> None:
  """An embedding column's declared bounds must be ``(0, vocab_size - 1)``."""
  cols = embedding_columns(embeddings, feature_names)
  if bounds is None:
    return
  for e, j in zip(embeddings, cols):
    if tuple(bounds[j]) != (0.0, float(e.vocab_size - 1)):
      raise ShardError(f"{where}: embedding column {e.feature!r} has feature bounds "
                       f"{list(bounds[j])}; an embedding column's bounds are "
                       f"[0, vocab_size - 1] = [0, {e.vocab_size - 1}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardInfo:
  """What the manifest records about one shard file.

  Attributes:
    file: plain file name inside the dataset directory.
    split: ``'train'`` or ``'test'``.
    rows: number of examples in the shard.
    num_features: width of its ``features`` dataset.
    sha256: hex digest of the file's bytes.
  """

  file: str
  split: str
  rows: int
  num_features: int
  sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Provenance:
  """Row counts of the producer; ``rows_read == kept + dropped_na + rejected``."""

  rows_read: int
  kept: int
  dropped_na: int = 0
  rejected: int = 0

  def __post_init__(self):
    if self.rows_read != self.kept + self.dropped_na + self.rejected:
      raise ValueError(
          f"provenance does not reconcile: rows_read={self.rows_read} != kept={self.kept}"
          f" + dropped_na={self.dropped_na} + rejected={self.rejected}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
  """The parsed ``manifest.json`` of a dataset directory.

  Attributes:
    feature_bounds: each feature's public ``(lo, hi)``; None for a manifest that declares
      none (the config must then declare them).
    task: what the labels are (a manifest without one is binary).
    embeddings: the integer-id columns the model embeds (a manifest without them has none).
    privacy_unit: the raw column(s) whose value identifies a privacy unit (person,
      household); None: every row is its own unit. A unit dataset's shards carry
      ``unit_keys`` (:mod:`fastdp_jax.data.units`); a row-level dataset's carry ``row_keys``
      (:func:`fastdp_jax.data.split.row_keys`), optional on read (older datasets lack them).
    max_rows_per_unit: the public bound k on rows a unit trains with (set with
      ``privacy_unit``); the trainer applies it (:func:`fastdp_jax.data.units.group`).
  """

  format_version: int
  feature_names: tuple[str, ...]
  label_name: str
  shards: tuple[ShardInfo, ...]
  provenance: Provenance
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  feature_bounds: Bounds | None = None
  task: Task = BINARY
  embeddings: tuple[Embedding, ...] = ()
  privacy_unit: tuple[str, ...] | None = None
  max_rows_per_unit: int | None = None

  @property
  def num_features(self) -> int:
    return len(self.feature_names)

  def rows(self, split: str) -> int:
    return sum(s.rows for s in self.shards if s.split == split)

  def shards_of(self, split: str) -> tuple[ShardInfo, ...]:
    return tuple(s for s in self.shards if s.split == split)

  def digest(self) -> str:
    """A hash identifying the data (the shards' checksums, names and widths)."""
    ident: dict[str, Any] = {"features": self.feature_names, "label": self.label_name,
                             "shards": [dataclasses.asdict(s) for s in self.shards]}
    # Only when not the defaults: a binary dataset without embeddings has one digest whether
    # or not its manifest records the task (checkpoints and batch files are bound to it).
    if self.task != BINARY:
      ident["task"] = self.task.to_json()
    if self.embeddings:
      ident["embeddings"] = [e.to_json() for e in self.embeddings]
    if self.privacy_unit is not None:  # a unit dataset trains differently from its rows
      ident["privacy_unit"] = [list(self.privacy_unit), self.max_rows_per_unit]
    body = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


# ------------------------------------------------------------------ bounds and value checks

def normalize_bounds(bounds: Any, num_features: int, *, what: str = "feature_bounds") -> Bounds:
  """Turns ``(lo, hi)`` (every feature) or ``d`` pairs (one per feature) into ``d`` pairs.

  Args:
    bounds: one ``(lo, hi)`` pair, or a sequence of ``num_features`` pairs; finite, lo <= hi.
    num_features: d.
    what: the name given in the error message (e.g. ``'data.feature_bounds'``).

  Returns:
    ``num_features`` ``(lo, hi)`` float pairs.

  Raises:
    UserError: naming ``what``, if the bounds are not of that form.
  """
  try:
    arr = np.asarray(bounds, dtype=np.float64)
  except (TypeError, ValueError):
    arr = None
  if arr is not None and arr.shape == (2,):
    arr = np.tile(arr, (num_features, 1))
  if arr is None or arr.shape != (num_features, 2) or isinstance(bounds, (str, bytes)):
    raise errors.UserError(f"{what}={bounds!r} must be one (lo, hi) pair for every feature or "
                           f"{num_features} (lo, hi) pairs, one per feature")
  if not np.isfinite(arr).all() or (arr[:, 0] > arr[:, 1]).any():
    raise errors.UserError(f"{what}={bounds!r}: bounds must be finite with lo <= hi")
  return tuple((float(lo), float(hi)) for lo, hi in arr)


def resolve_bounds(declared: Bounds | None, configured: Any, num_features: int,
                   where: str) -> Bounds:
  """The bounds a dataset is validated against: its own, else the config's, else refused.

  Args:
    declared: the manifest's bounds (None: not declared).
    configured: ``data.feature_bounds`` (None: not set); used only when nothing is declared.
    num_features: d.
    where: the dataset, for the message.

  Raises:
    ConfigError: if ``configured`` is malformed.
    ShardError: if neither declares bounds, saying how to declare them.
  """
  if declared is not None:
    return declared
  if configured is None:
    raise ShardError(f"{where}: no feature bounds declared; {HOW_TO_DECLARE_BOUNDS}")
  try:
    return normalize_bounds(configured, num_features, what="data.feature_bounds")
  except errors.UserError as e:
    raise errors.ConfigError(str(e)) from e


def _column(names: Sequence[str] | None, j: int) -> str:
  return repr(names[j]) if names is not None and j < len(names) else f"{j}"


def _first(bad: np.ndarray, first_row: int, row_name: Callable[[int], str] | None) -> str:
  """Names the first offending row: ``row N`` (offset by ``first_row``) or ``row_name``'s."""
  i = int(np.argmax(bad))
  return f"row {first_row + i}" if row_name is None else row_name(i)


def check_values(features: np.ndarray, labels: np.ndarray, *, bounds: Bounds | None,
                 feature_names: Sequence[str] | None, where: str, first_row: int = 0,
                 task: Task = BINARY, embeddings: Sequence[Embedding] = (),
                 row_name: Callable[[int], str] | None = None) -> None:
  """The one value check of the writer and the loader: finite, inside bounds, valid labels.

  Values are compared in float32, the precision the trainer uses, against the bounds rounded
  to float32 (rounding is monotone, so a float64 value inside its bounds stays inside).
  Labels are checked per task: binary 0/1, multiclass an integer class index 0..K-1,
  regression finite and inside the task's bounds; embedding ids must be integers.

  Args:
    features: [n, d] numeric.
    labels: [n] numeric.
    bounds: d ``(lo, hi)`` pairs, or None to check finiteness and labels only.
    feature_names: the d column names, for the message.
    where: what the rows are, e.g. ``'shard train-00000.h5'``.
    first_row: row number of ``features[0]`` in ``where`` (for the message).
    task: the labels' task (default binary).
    embeddings: the embedding columns (their ids must be integers; their range is their
      bounds). Requires ``feature_names``.
    row_name: ``i -> text`` naming row ``i`` of ``features`` where a row number does not
      (a materialised batch's ``'update 12, slot 3'``); overrides ``first_row``.

  Raises:
    ShardError: naming ``where``, the column and the first offending row (never the value:
      it is private data).
  """
  x = np.asarray(features, np.float32)
  finite = np.isfinite(x)
  if not finite.all():
    j = int(np.flatnonzero(~finite.all(axis=0))[0])
    bad = ~finite[:, j]
    raise ShardError(f"{where}: column {_column(feature_names, j)} has {int(bad.sum())} "
                     f"non-finite value(s) (NaN or inf), first at "
                     f"{_first(bad, first_row, row_name)}")
  if bounds is not None and x.size:
    b = np.asarray(bounds, np.float64).astype(np.float32)
    outside = (x < b[:, 0]) | (x > b[:, 1])
    if outside.any():
      j = int(np.flatnonzero(outside.any(axis=0))[0])
      bad = outside[:, j]
      lo, hi = bounds[j]
      raise ShardError(f"{where}: column {_column(feature_names, j)} has {int(bad.sum())} "
                       f"value(s) outside its declared bounds [{lo:g}, {hi:g}], first at "
                       f"{_first(bad, first_row, row_name)}")
  if embeddings:
    for e, j in zip(embeddings, embedding_columns(embeddings, feature_names or ())):
      col = x[:, j]
      bad = (col != np.round(col)) | (col < 0) | (col > e.vocab_size - 1)
      if bad.any():
        raise ShardError(f"{where}: embedding column {e.feature!r} has {int(bad.sum())} "
                         f"id(s) that are not integers in [0, {e.vocab_size - 1}], first at "
                         f"{_first(bad, first_row, row_name)}")
  y = np.asarray(labels)
  if task.kind == "binary":
    bad, what = ~np.isin(y, LABELS), "outside {0, 1}"
  elif task.kind == "multiclass":
    k = len(task.classes)
    yf = y.astype(np.float64)
    bad = ~np.isfinite(yf) | (yf != np.round(yf)) | (yf < 0) | (yf > k - 1)
    what = f"that are not a class index 0..{k - 1} of {k} classes"
  else:
    assert task.bounds is not None
    lo, hi = np.asarray(task.bounds, np.float64).astype(np.float32)
    yf = y.astype(np.float32)
    bad = ~np.isfinite(yf) | (yf < lo) | (yf > hi)
    what = f"non-finite or outside the regression bounds [{task.bounds[0]:g}, " \
           f"{task.bounds[1]:g}]"
  if bad.any():
    raise ShardError(f"{where}: {int(bad.sum())} label(s) {what}, first at "
                     f"{_first(bad, first_row, row_name)}")


# ------------------------------------------------------------------ manifest.json

def check_file_name(file: Any, where: str = "manifest") -> str:
  """A shard's name must be a plain file name: no directory part, no ``..``, not absolute."""
  if (not isinstance(file, str) or not file or file in (".", "..") or "/" in file
      or "\\" in file or "\0" in file or os.path.isabs(file)):
    raise ShardError(f"{where}: shard name {file!r} is not a plain file name inside the dataset"
                     " directory (no '/', '..' or absolute paths)")
  return file


def _check_shard_list(shards: Sequence[ShardInfo], num_features: int, where: str) -> None:
  """Plain names, each listed once, known splits, non-negative counts, the manifest's width."""
  seen = set()
  for s in shards:
    check_file_name(s.file, where)
    if s.file in seen:
      raise ShardError(f"{where}: shard {s.file} is listed more than once (its rows would "
                       "count twice)")
    seen.add(s.file)
    if s.split not in SPLITS:
      raise ShardError(f"{where}: shard {s.file} has split {s.split!r}; known splits are "
                       f"{SPLITS}")
    for key in ("rows", "num_features"):
      value = getattr(s, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShardError(f"{where}: shard {s.file} has {key}={value!r}, not a count")
    if not isinstance(s.sha256, str):
      raise ShardError(f"{where}: shard {s.file} has sha256={s.sha256!r}, not a hex digest")
    if s.num_features != num_features:
      raise ShardError(f"shard {s.file}: feature width {s.num_features} != the "
                       f"{num_features} feature names of the manifest")


def write_manifest(directory: str | os.PathLike, *, feature_names: Sequence[str],
                   label_name: str, shards: Sequence[ShardInfo], provenance: Provenance,
                   feature_bounds: Any, extra: dict[str, Any] | None = None,
                   task: Task = BINARY, embeddings: Sequence[Embedding] = (),
                   privacy_unit: Sequence[str] | str | None = None,
                   max_rows_per_unit: int | None = None) -> Manifest:
  """Writes ``manifest.json`` last, atomically (temporary file + rename).

  Args:
    feature_bounds: the features' public bounds (see :func:`normalize_bounds`), recorded for
      the loader; None writes a manifest without bounds (the config must then declare them).
    task: what the labels are, recorded as ``"task"`` (default binary).
    embeddings: the integer-id columns, recorded as ``"embeddings"``.
    privacy_unit: the unit's id column(s), recorded (with ``max_rows_per_unit``) only when
      set, so that a row-level dataset's manifest and digest are as before.
    max_rows_per_unit: the public bound k, required with ``privacy_unit``.
  """
  unit, bound = units_lib.normalize_unit(privacy_unit, max_rows_per_unit, f"{directory}")
  bounds = (None if feature_bounds is None else
            normalize_bounds(feature_bounds, len(feature_names), what="feature_bounds"))
  embeddings = tuple(embeddings)
  check_embedding_bounds(embeddings, feature_names, bounds, f"{directory}")
  manifest = Manifest(format_version=FORMAT_VERSION, feature_names=tuple(feature_names),
                      label_name=label_name, shards=tuple(sorted(shards, key=lambda s: s.file)),
                      provenance=provenance, extra=dict(extra or {}), feature_bounds=bounds,
                      task=task, embeddings=embeddings, privacy_unit=unit,
                      max_rows_per_unit=bound)
  _check_shard_list(manifest.shards, manifest.num_features, f"{directory}")
  body = {
      "format_version": manifest.format_version,
      "feature_names": list(manifest.feature_names),
      "label_name": manifest.label_name,
      "shards": [dataclasses.asdict(s) for s in manifest.shards],
      "provenance": dataclasses.asdict(manifest.provenance),
      "extra": manifest.extra,
      "task": task.to_json(),
  }
  if embeddings:
    body["embeddings"] = [e.to_json() for e in embeddings]
  if bounds is not None:
    body["feature_bounds"] = [list(b) for b in bounds]
  if unit is not None:
    body["privacy_unit"] = list(unit)
    body["max_rows_per_unit"] = bound
  atomic.write_json(os.path.join(directory, MANIFEST), body, mode=0o600)
  return manifest


def read_manifest(directory: str | os.PathLike) -> Manifest:
  """Parses and checks ``DIRECTORY/manifest.json``.

  Raises:
    ShardError: if it is missing or malformed, lists a shard that is not a plain file name
      or lists one twice, names an unknown split, or declares malformed bounds.
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ShardError(f"{directory}: no {MANIFEST} (not a complete fastdp_jax dataset; create "
                     "one with `python -m preprocessing.synthesize` or the Spark job)")
  try:
    with open(path) as f:
      body = json.load(f)
    if body["format_version"] != FORMAT_VERSION:
      raise ShardError(f"{path}: format_version {body['format_version']} is not "
                       f"{FORMAT_VERSION}")
    manifest = Manifest(format_version=body["format_version"],
                        feature_names=tuple(body["feature_names"]),
                        label_name=body["label_name"],
                        shards=tuple(ShardInfo(**s) for s in body["shards"]),
                        provenance=Provenance(**body["provenance"]),
                        extra=body.get("extra", {}))
    declared = body.get("feature_bounds")
    # Optional keys, so that a dataset written without them stays readable: binary, no
    # embeddings.
    task_body, emb_body = body.get("task"), body.get("embeddings", [])
    unit_body, bound_body = body.get("privacy_unit"), body.get("max_rows_per_unit")
  except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
    raise ShardError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
  _check_shard_list(manifest.shards, manifest.num_features, path)
  try:
    task = BINARY if task_body is None else Task.from_json(task_body)
    if not isinstance(emb_body, list):
      raise errors.UserError(f"embeddings {emb_body!r} must be a list")
    embeddings = tuple(Embedding.from_json(e) for e in emb_body)
    embedding_columns(embeddings, manifest.feature_names)
    bounds = (None if declared is None else  # None: the config must declare them
              normalize_bounds(declared, manifest.num_features, what="feature_bounds"))
    check_embedding_bounds(embeddings, manifest.feature_names, bounds, path)
    if unit_body is not None and not isinstance(unit_body, list):
      raise errors.UserError(f"privacy_unit {unit_body!r} must be a list of column names")
    unit, bound = units_lib.normalize_unit(unit_body, bound_body, "privacy unit")
  except errors.UserError as e:
    raise ShardError(f"{path}: malformed manifest ({e})") from e
  return dataclasses.replace(manifest, feature_bounds=bounds, task=task, embeddings=embeddings,
                             privacy_unit=unit, max_rows_per_unit=bound)


def spec_estimate(directory: Any) -> tuple[float, float]:
  """``(epsilon, delta)`` that the dataset's feature spec spent on private estimates of its
  kinds, bounds and categories (``extra["spec"]["private_estimates"]``, written by
  ``fastdp-spec init --epsilon``); ``(0, 0)`` for a spec of public values only, or a path
  without a manifest. A model trained on the dataset adds them to its own (basic
  composition, as for the calibration's epsilon).
  """
  if not isinstance(directory, (str, os.PathLike)) or not os.path.isfile(
      os.path.join(directory, MANIFEST)):
    return 0.0, 0.0
  spec = read_manifest(directory).extra.get("spec")
  est = spec.get("private_estimates") if isinstance(spec, dict) else None
  if not isinstance(est, dict):
    return 0.0, 0.0
  return float(est.get("epsilon", 0.0)), float(est.get("delta", 0.0))

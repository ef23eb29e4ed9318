"""The shard format: the contract between every data producer and the trainer.

A dataset is a directory holding one HDF5 file per shard and a ``manifest.json``::

    DATASET/
      manifest.json
      train-00000.h5      # datasets: features [n, d], labels [n]
      test-00000.h5
      ...

The manifest records the format version, the feature and label names, each feature's PUBLIC
bounds ``[lo, hi]`` (declared by the producer from the feature spec, never computed from the
data), each shard's split, row count, feature width and sha256, and the provenance counts of
the producer (rows read, kept, dropped for ``NA``, rejected as malformed;
``read = kept + dropped_na + rejected``).

The dataset directory is a trust boundary. Shards are plain file names inside the directory
(no ``..``, no absolute paths, no symlink leading outside), each listed once (a shard listed
twice would count its people twice), with a known split. Values are checked where they enter:
:func:`write_shard` refuses non-numeric or boolean features, wrong shapes, non-finite values,
values outside the declared bounds and labels outside the task's, naming the column; the loader
checks the same again on every row before training. The manifest's ``task`` says what the
labels are (binary 0/1, a multiclass class index, a regression value inside public bounds;
absent: binary) and ``embeddings`` which integer-id columns the model embeds.

Every producer (the built-in generator, the Spark job, the streaming converter) writes through
:func:`write_shard` and :func:`write_manifest` (or the :class:`DatasetWriter` that wraps
them), and the trainer reads only through :func:`load_split`, which checks the files against
the manifest and names the offending shard and column on any mismatch.

The training rows of a dataset are the train shards concatenated in manifest order: a row's
global id is its offset in that order. :func:`load_split` can read any range of global rows
(HDF5 slices across shard boundaries), which is how each process of a multi-process run reads
its share (:func:`process_row_ranges`).

The original system's single-file layouts (``dataset.h5`` with ``x_train, y_train, x_test,
y_test`` and ``dataset_package.h5`` with ``train, test``, label last) are read by
:func:`load_split` too. They declare no bounds, nor do manifests written before bounds were
recorded: for those, the bounds come from the config (``data.feature_bounds``) or the data is
refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from fastdp_jax import atomic
from fastdp_jax import errors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
LABELS = (0, 1)  # the label set of a binary task
TASK_KINDS = ("binary", "multiclass", "regression")
MAX_VOCAB = 1 << 24  # ids up to this are exact in float32 (they travel as features)
_HASH_CHUNK = 1 << 20
_NUMERIC_KINDS = "iuf"  # signed, unsigned, float; not bool, complex, strings or objects
_READ_ROWS = 1 << 18  # rows per HDF5 read when validating a large shard

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
    feature_bounds: each feature's public ``(lo, hi)``; None for a manifest written before
      bounds were recorded (the config must then declare them).
    task: what the labels are (a manifest without one is binary).
    embeddings: the integer-id columns the model embeds (none in an older manifest).
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
    # Only when not the defaults: a binary dataset keeps the digest it had before tasks.
    if self.task != BINARY:
      ident["task"] = self.task.to_json()
    if self.embeddings:
      ident["embeddings"] = [e.to_json() for e in self.embeddings]
    body = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      h.update(chunk)
  return h.hexdigest()


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


def _column(names: Sequence[str] | None, j: int) -> str:
  return repr(names[j]) if names is not None and j < len(names) else f"{j}"


def check_values(features: np.ndarray, labels: np.ndarray, *, bounds: Bounds | None,
                 feature_names: Sequence[str] | None, where: str, first_row: int = 0,
                 task: Task = BINARY, embeddings: Sequence[Embedding] = ()) -> None:
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
                     f"non-finite value(s) (NaN or inf), first at row "
                     f"{first_row + int(np.argmax(bad))}")
  if bounds is not None and x.size:
    b = np.asarray(bounds, np.float64).astype(np.float32)
    outside = (x < b[:, 0]) | (x > b[:, 1])
    if outside.any():
      j = int(np.flatnonzero(outside.any(axis=0))[0])
      bad = outside[:, j]
      lo, hi = bounds[j]
      raise ShardError(f"{where}: column {_column(feature_names, j)} has {int(bad.sum())} "
                       f"value(s) outside its declared bounds [{lo:g}, {hi:g}], first at row "
                       f"{first_row + int(np.argmax(bad))}")
  if embeddings:
    for e, j in zip(embeddings, embedding_columns(embeddings, feature_names or ())):
      col = x[:, j]
      bad = (col != np.round(col)) | (col < 0) | (col > e.vocab_size - 1)
      if bad.any():
        raise ShardError(f"{where}: embedding column {e.feature!r} has {int(bad.sum())} "
                         f"id(s) that are not integers in [0, {e.vocab_size - 1}], first at "
                         f"row {first_row + int(np.argmax(bad))}")
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
    raise ShardError(f"{where}: {int(bad.sum())} label(s) {what}, first at row "
                     f"{first_row + int(np.argmax(bad))}")


def _check_arrays(features: np.ndarray, labels: np.ndarray, *, num_features: int | None,
                  where: str) -> None:
  """Dtypes and shapes: numeric (not bool, complex or text) [n, d] features and [n] labels."""
  for name, a in (("features", features), ("labels", labels)):
    if a.dtype.kind not in _NUMERIC_KINDS:
      raise ShardError(f"{where}: {name} have dtype {a.dtype}; they must be integer or float "
                       "numbers (not bool, complex or text)")
  if features.ndim != 2:
    raise ShardError(f"{where}: features have shape {features.shape}, expected [rows, "
                     "features]")
  if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
    raise ShardError(f"{where}: labels have shape {labels.shape}, expected "
                     f"({features.shape[0]},) for {features.shape[0]} feature rows")
  if num_features is not None and features.shape[1] != num_features:
    raise ShardError(f"{where}: {features.shape[1]} features, expected {num_features}")


def check_file_name(file: Any, where: str = "manifest") -> str:
  """A shard's name must be a plain file name: no directory part, no ``..``, not absolute."""
  if (not isinstance(file, str) or not file or file in (".", "..") or "/" in file
      or "\\" in file or "\0" in file or os.path.isabs(file)):
    raise ShardError(f"{where}: shard name {file!r} is not a plain file name inside the dataset"
                     " directory (no '/', '..' or absolute paths)")
  return file


def _compact(features: np.ndarray) -> np.ndarray:
  """Stores 0/1 features as uint8 (8x smaller than float64); everything else as float32."""
  if features.dtype == np.uint8:
    return features
  if features.size and np.isin(features, (0, 1)).all():
    return features.astype(np.uint8)
  return features.astype(np.float32)


# ------------------------------------------------------------------ writing

def label_dtype(task: Task) -> np.dtype:
  """How a task's labels are stored: uint8 (binary, up to 256 classes), uint16, float32."""
  if task.kind == "regression":
    return np.dtype(np.float32)
  return np.dtype(np.uint8 if len(task.classes) <= 256 else np.uint16)


def write_shard(directory: str | os.PathLike, file: str, split: str, features: np.ndarray,
                labels: np.ndarray, *, feature_bounds: Any,
                feature_names: Sequence[str] | None = None, task: Task = BINARY,
                embeddings: Sequence[Embedding] = ()) -> ShardInfo:
  """Writes one shard file, after checking its values, and returns its manifest entry.

  Args:
    directory: the dataset directory (or a staging directory that becomes it).
    file: the shard's plain file name, e.g. ``'train-00003.h5'``.
    split: ``'train'`` or ``'test'``.
    features: [n, d] integer or float array; 0/1 data is stored as uint8, other data as
      float32.
    labels: [n] labels of ``task``: 0/1 or class indices (stored as uint8, uint16 above
      256 classes) or regression values (float32).
    feature_bounds: the features' public bounds (see :func:`normalize_bounds`), the same that
      go into the manifest; None only for data whose bounds are declared elsewhere (the
      config): then only finiteness and labels are checked.
    feature_names: the d column names, for error messages (required with embeddings).
    task: what the labels are (default binary).
    embeddings: the integer-id columns (their bounds must be ``(0, vocab_size - 1)``).

  Returns:
    The :class:`ShardInfo` to put in the manifest.

  Raises:
    ShardError: naming the shard and column, for a non-numeric or boolean dtype, a wrong
      shape, a non-finite value, a value outside the bounds, a non-integer embedding id or a
      label outside the task's labels.
  """
  if split not in SPLITS:
    raise ShardError(f"shard {file}: {split=} must be one of {SPLITS}")
  check_file_name(file, f"shard {file!r}")
  features = np.asarray(features)
  labels = np.asarray(labels)
  where = f"shard {file}"
  _check_arrays(features, labels, num_features=None if feature_names is None else
                len(feature_names), where=where)
  bounds = (None if feature_bounds is None else
            normalize_bounds(feature_bounds, features.shape[1], what=f"{where}: feature_bounds"))
  if embeddings:
    if feature_names is None:
      raise ShardError(f"{where}: embeddings need the feature names")
    check_embedding_bounds(embeddings, feature_names, bounds, where)
  stored = _compact(features)
  check_values(stored, labels, bounds=bounds, feature_names=feature_names, where=where,
               task=task, embeddings=embeddings)
  path = os.path.join(directory, file)
  with h5py.File(path, "w") as f:
    f.create_dataset("features", data=stored)
    f.create_dataset("labels", data=labels.astype(label_dtype(task)))
  return ShardInfo(file=file, split=split, rows=int(features.shape[0]),
                   num_features=int(features.shape[1]), sha256=sha256_file(path))


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
                   task: Task = BINARY, embeddings: Sequence[Embedding] = ()) -> Manifest:
  """Writes ``manifest.json`` last, atomically (temporary file + rename).

  Args:
    feature_bounds: the features' public bounds (see :func:`normalize_bounds`), recorded for
      the loader; None writes a manifest without bounds (the config must then declare them).
    task: what the labels are, recorded as ``"task"`` (default binary).
    embeddings: the integer-id columns, recorded as ``"embeddings"``.
  """
  bounds = (None if feature_bounds is None else
            normalize_bounds(feature_bounds, len(feature_names), what="feature_bounds"))
  embeddings = tuple(embeddings)
  check_embedding_bounds(embeddings, feature_names, bounds, f"{directory}")
  manifest = Manifest(format_version=FORMAT_VERSION, feature_names=tuple(feature_names),
                      label_name=label_name, shards=tuple(sorted(shards, key=lambda s: s.file)),
                      provenance=provenance, extra=dict(extra or {}), feature_bounds=bounds,
                      task=task, embeddings=embeddings)
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
  atomic.write_json(os.path.join(directory, MANIFEST), body, mode=0o600)
  return manifest


class DatasetWriter:
  """Writes a dataset directory that appears atomically when :meth:`close` succeeds.

  Shards go to a staging directory beside the target; the manifest is written last and the
  directory renamed into place, so a crashed producer never leaves a directory that looks
  complete. Every row is checked against the declared bounds as it is added.

  Example::

    with DatasetWriter(out, feature_names=names, label_name='employed',
                       feature_bounds=(0, 1)) as w:
      w.add('train', x_train, y_train)
      w.add('test', x_test, y_test)
      w.set_provenance(Provenance(rows_read=n, kept=n))

  Args:
    directory: the dataset directory to create.
    feature_names: the d column names.
    label_name: the label column's name.
    feature_bounds: the features' PUBLIC bounds, one ``(lo, hi)`` for every feature or d
      pairs (e.g. a feature spec's ``feature_bounds``); never computed from the data.
    max_rows_per_shard: shard size bound.
    overwrite: replace an existing directory.
    extra: producer-specific manifest entries.
    task: what the labels are (default binary: 0/1).
    embeddings: integer-id feature columns the model embeds (their bounds must be
      ``(0, vocab_size - 1)``).
  """

  def __init__(self, directory: str | os.PathLike, *, feature_names: Sequence[str],
               label_name: str, feature_bounds: Any, max_rows_per_shard: int = 500_000,
               overwrite: bool = False, extra: dict[str, Any] | None = None,
               task: Task = BINARY, embeddings: Sequence[Embedding] = ()):
    self.feature_names = list(feature_names)
    self.feature_bounds = normalize_bounds(feature_bounds, len(self.feature_names),
                                           what="feature_bounds")
    self.task = task
    self.embeddings = tuple(embeddings)
    check_embedding_bounds(self.embeddings, self.feature_names, self.feature_bounds,
                           f"{directory}")
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not overwrite:
      raise FileExistsError(f"output {self.directory} exists; pass overwrite to replace it")
    # .NAME.staging-HOST-PID-*: removed by the next writer if this process is killed.
    self.staging = atomic.make_staging(self.directory)
    self.label_name = label_name
    self.max_rows_per_shard = max_rows_per_shard
    self.extra = extra
    self.overwrite = overwrite
    self._shards: list[ShardInfo] = []
    self._counts = {s: 0 for s in SPLITS}
    self._provenance: Provenance | None = None

  def add(self, split: str, features: np.ndarray, labels: np.ndarray) -> None:
    """Adds rows of a split, cut into shards of at most ``max_rows_per_shard``.

    Raises:
      ShardError: naming the shard and column, if a value breaks the shard contract.
    """
    if split not in SPLITS:
      raise ShardError(f"{split=} must be one of {SPLITS}")
    features, labels = np.asarray(features), np.asarray(labels)
    for lo in range(0, max(len(labels), 1), self.max_rows_per_shard):
      name = f"{split}-{self._counts[split]:05d}.h5"
      self._counts[split] += 1
      self._shards.append(write_shard(self.staging, name, split,
                                      features[lo:lo + self.max_rows_per_shard],
                                      labels[lo:lo + self.max_rows_per_shard],
                                      feature_bounds=self.feature_bounds,
                                      feature_names=self.feature_names, task=self.task,
                                      embeddings=self.embeddings))

  def set_provenance(self, provenance: Provenance) -> None:
    self._provenance = provenance

  def close(self) -> Manifest:
    kept = sum(s.rows for s in self._shards)
    prov = self._provenance or Provenance(rows_read=kept, kept=kept)
    if prov.kept != kept:
      raise ValueError(f"provenance says kept={prov.kept} but the shards hold {kept} rows")
    manifest = write_manifest(self.staging, feature_names=self.feature_names,
                              label_name=self.label_name, shards=self._shards,
                              provenance=prov, feature_bounds=self.feature_bounds,
                              extra=self.extra, task=self.task, embeddings=self.embeddings)
    atomic.publish(self.staging, self.directory, self.overwrite)
    return manifest

  def abort(self) -> None:
    shutil.rmtree(self.staging, ignore_errors=True)

  def __enter__(self) -> DatasetWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


# ------------------------------------------------------------------ reading

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
    # A manifest written before tasks and embeddings: binary, no embeddings.
    task_body, emb_body = body.get("task"), body.get("embeddings", [])
  except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
    raise ShardError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
  _check_shard_list(manifest.shards, manifest.num_features, path)
  try:
    task = BINARY if task_body is None else Task.from_json(task_body)
    if not isinstance(emb_body, list):
      raise errors.UserError(f"embeddings {emb_body!r} must be a list")
    embeddings = tuple(Embedding.from_json(e) for e in emb_body)
    embedding_columns(embeddings, manifest.feature_names)
    bounds = (None if declared is None else  # None: written before bounds were recorded
              normalize_bounds(declared, manifest.num_features, what="feature_bounds"))
    check_embedding_bounds(embeddings, manifest.feature_names, bounds, path)
  except errors.UserError as e:
    raise ShardError(f"{path}: malformed manifest ({e})") from e
  return dataclasses.replace(manifest, feature_bounds=bounds, task=task, embeddings=embeddings)


def shard_path(directory: str | os.PathLike, info: ShardInfo) -> str:
  """The shard's file, resolved; it must be a regular file inside the dataset directory.

  Raises:
    ShardError: if the name is not plain, the file is missing, or it (through a symlink)
      lies outside the directory.
  """
  check_file_name(info.file, f"{directory}")
  path = os.path.join(directory, info.file)
  if not os.path.isfile(path):
    raise ShardError(f"shard {info.file}: file missing from {directory}")
  real_dir = os.path.realpath(directory)
  real = os.path.realpath(path)
  if os.path.dirname(real) != real_dir:
    raise ShardError(f"shard {info.file}: a symlink leading outside the dataset directory "
                     f"{directory}; copy the file in instead")
  return real


def _check_distinct_files(directory: str | os.PathLike, manifest: Manifest) -> None:
  """Two manifest entries must not be the same file (e.g. one a symlink to the other)."""
  seen: dict[str, str] = {}
  for info in manifest.shards:
    path = os.path.join(directory, info.file)
    if not os.path.lexists(path):
      continue  # reported as missing when (and if) it is read
    real = os.path.realpath(path)
    if real in seen:
      raise ShardError(f"shard {info.file}: the same file as shard {seen[real]} (a symlink); "
                       "its rows would count twice")
    seen[real] = info.file


def _h5_dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
  """One numeric HDF5 dataset, or a ShardError saying what is there instead."""
  obj = f.get(name)
  if obj is None:
    raise ShardError(f"{where}: no {name!r} dataset (the file has {sorted(f.keys())})")
  if not isinstance(obj, h5py.Dataset):
    raise ShardError(f"{where}: {name!r} is not a dataset (a {type(obj).__name__})")
  if obj.dtype.kind not in _NUMERIC_KINDS:
    raise ShardError(f"{where}: {name!r} is not numeric (dtype {obj.dtype}; integer or float "
                     "numbers expected, not bool, complex or text)")
  return obj


def read_shard(directory: str | os.PathLike, info: ShardInfo, *, start: int = 0,
               stop: int | None = None,
               verify_checksum: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads rows ``start:stop`` of one shard, checking the file against its manifest entry.

  The whole file is hashed (when ``verify_checksum``) and its structure checked; only the
  requested rows are read (an HDF5 slice). Values are checked by :func:`check_values`.

  Returns:
    ``(features [stop - start, d] float32, labels [stop - start] float32)``.

  Raises:
    ShardError: naming the shard, if the file is missing, outside the directory, unreadable,
      or differs from the manifest in checksum, structure, dtype, row count or width.
  """
  path = shard_path(directory, info)
  stop = info.rows if stop is None else stop
  if not 0 <= start <= stop <= info.rows:
    raise ValueError(f"rows {start}:{stop} outside shard {info.file} of {info.rows} rows")
  if verify_checksum and (digest := sha256_file(path)) != info.sha256:
    raise ShardError(f"shard {info.file}: sha256 {digest[:12]}... does not match the "
                     f"manifest's {info.sha256[:12]}... (corrupt or replaced file)")
  where = f"shard {info.file}"
  try:
    with h5py.File(path, "r") as f:
      fx = _h5_dataset(f, "features", where)
      fy = _h5_dataset(f, "labels", where)
      if len(fx.shape) != 2 or fx.shape[1] != info.num_features:
        raise ShardError(f"{where}: feature width {fx.shape[1:]} != manifest's "
                         f"{info.num_features}")
      if len(fy.shape) != 1:
        raise ShardError(f"{where}: labels have shape {fy.shape}, expected one label per row "
                         f"({info.rows},)")
      if fx.shape[0] != info.rows or fy.shape[0] != info.rows:
        raise ShardError(f"{where}: {fx.shape[0]} feature rows and {fy.shape[0]} labels, "
                         f"manifest says {info.rows}")
      x = fx[start:stop]
      y = fy[start:stop]
  except (OSError, KeyError) as e:
    raise ShardError(f"{where}: unreadable ({e})") from e
  return x.astype(np.float32), y.astype(np.float32)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
  """One split of a dataset (or a process's rows of it) in host memory.

  Attributes:
    features: [n, d] float32.
    labels: [n] float32: 0/1 (binary), the class index (multiclass) or the value
      (regression).
    feature_names: the d column names.
    label_name: the label column's name.
    digest: identifies the whole data set (manifest digest or file checksum).
    feature_bounds: the d public ``(lo, hi)`` bounds every row was checked against.
    task: what the labels are.
    embeddings: the integer-id columns the model embeds.
  """

  features: np.ndarray
  labels: np.ndarray
  feature_names: tuple[str, ...]
  label_name: str
  digest: str
  feature_bounds: Bounds | None = None
  task: Task = BINARY
  embeddings: tuple[Embedding, ...] = ()

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def _load_original(path: str, split: str, feature_bounds: Any) -> Split:
  """Reads the original system's ``dataset.h5`` or ``dataset_package.h5``."""
  try:
    with h5py.File(path, "r") as f:
      if f"x_{split}" in f or f"y_{split}" in f:
        x = _h5_dataset(f, f"x_{split}", path)[...]
        y = _h5_dataset(f, f"y_{split}", path)[...]
      elif split in f:
        table = _h5_dataset(f, split, path)[...]
        if table.ndim != 2 or table.shape[1] < 2:
          raise ShardError(f"{path}: {split!r} has shape {table.shape}; the dataset_package.h5 "
                           "layout is a 2-D table [n, features + 1] with the label last")
        x, y = table[:, :-1], table[:, -1]
      else:
        raise ShardError(f"{path}: neither x_{split}/y_{split} (dataset.h5 layout) nor "
                         f"{split} (dataset_package.h5 layout)")
  except OSError as e:
    raise ShardError(f"{path}: unreadable HDF5 file ({e})") from e
  if y.ndim == 2 and y.shape[1] == 1:  # the original wrote y as a column
    y = y[:, 0]
  if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise ShardError(f"{path}: {split} features {x.shape} and labels {y.shape} do not match")
  from fastdp_jax.data import split as split_lib  # local: avoids a cycle at import time
  names = split_lib.CAPUMS_FEATURES if x.shape[1] == len(split_lib.CAPUMS_FEATURES) else tuple(
      f"x{i}" for i in range(x.shape[1]))
  where = f"{path} ({split})"
  check_values(x, y, bounds=None, feature_names=names, where=where)
  bounds = resolve_bounds(None, feature_bounds, x.shape[1],
                          f"{path} (an original single-file layout)")
  check_values(x, y, bounds=bounds, feature_names=names, where=where)
  return Split(features=np.asarray(x, np.float32), labels=np.asarray(y, np.float32),
               feature_names=tuple(names), label_name="employed", digest=sha256_file(path),
               feature_bounds=bounds)


def _slices(shards: Sequence[ShardInfo], start: int,
            stop: int) -> list[tuple[ShardInfo, int, int]]:
  """``(shard, lo, hi)`` for the shards holding global rows ``start:stop`` (manifest order).

  Empty shards at the range's offsets are included, so that every shard is checked by the
  process whose range starts or ends at it.
  """
  out, offset = [], 0
  for s in shards:
    lo, hi = max(start, offset), min(stop, offset + s.rows)
    if lo < hi or (s.rows == 0 and start <= offset <= stop):
      out.append((s, lo - offset, max(lo, hi) - offset))
    offset += s.rows
  return out


def load_split(path: str | os.PathLike, split: str, *, rows: tuple[int, int] | None = None,
               verify_checksum: bool = True, feature_bounds: Any = None) -> Split:
  """Loads (rows of) a split into host memory, verifying every row before it is used.

  Each row read is checked: the shard against its manifest entry (checksum, structure,
  dtypes, shapes) and its values with :func:`check_values` (finite, inside the manifest's
  declared bounds, labels in {0, 1}).

  Args:
    path: a dataset directory, or an original-layout ``.h5`` file.
    split: ``'train'`` or ``'test'``.
    rows: ``(start, stop)``: read only these global rows of the split (the split's shards
      concatenated in manifest order; a process's share); default all.
    verify_checksum: check the sha256 of each shard that is read (on by default; costs one
      read of the file).
    feature_bounds: ``data.feature_bounds``: the bounds of data that declares none (an
      original ``.h5`` file, a manifest written before bounds were recorded); ignored when
      the manifest declares its own.

  Returns:
    A :class:`Split`.

  Raises:
    ShardError: naming the shard (and column) on any mismatch or bad value, or if the data
      declares no bounds and none are configured.
    FileNotFoundError: if ``path`` does not exist.
  """
  path = os.fspath(path)
  if split not in SPLITS:
    raise ValueError(f"{split=} must be one of {SPLITS}")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"data set {path} does not exist; create the default one with `make data` or "
        f"`python -m preprocessing.synthesize --rows 100000 --output-shards {path}`")
  if os.path.isfile(path):
    full = _load_original(path, split, feature_bounds)
    if rows is None:
      return full
    return dataclasses.replace(full, features=full.features[rows[0]:rows[1]],
                               labels=full.labels[rows[0]:rows[1]])
  manifest = read_manifest(path)
  _check_distinct_files(path, manifest)
  shards = manifest.shards_of(split)
  if not shards:
    raise ShardError(f"{path}: no {split} shards in the manifest")
  bounds = resolve_bounds(manifest.feature_bounds, feature_bounds, manifest.num_features,
                          f"{path} (a manifest without feature_bounds)")
  total = manifest.rows(split)
  start, stop = (0, total) if rows is None else (int(rows[0]), int(rows[1]))
  if not 0 <= start <= stop <= total:
    raise ValueError(f"rows {start}:{stop} outside the {total} {split} rows of {path}")
  xs = [np.zeros((0, manifest.num_features), np.float32)]
  ys = [np.zeros((0,), np.float32)]
  for info, lo, hi in _slices(shards, start, stop):
    x, y = read_shard(path, info, start=lo, stop=hi, verify_checksum=verify_checksum)
    check_values(x, y, bounds=bounds, feature_names=manifest.feature_names,
                 where=f"shard {info.file}", first_row=lo, task=manifest.task,
                 embeddings=manifest.embeddings)
    xs.append(x)
    ys.append(y)
  return Split(features=np.concatenate(xs), labels=np.concatenate(ys),
               feature_names=manifest.feature_names, label_name=manifest.label_name,
               digest=manifest.digest(), feature_bounds=bounds, task=manifest.task,
               embeddings=manifest.embeddings)


def process_row_ranges(num_rows: int, device_counts: Sequence[int]) -> list[tuple[int, int]]:
  """Each process's contiguous range of global rows, in proportion to its devices.

  With ``D`` devices in all, process p (with devices ``c_p .. c_p + k_p - 1`` of the mesh)
  holds rows ``[c_p * N // D, (c_p + k_p) * N // D)``: every process holds its share within
  one row whatever the number of shards (with the same number of devices each, process p of
  P holds ``[p * N // P, (p + 1) * N // P)``, N/P rows plus or minus one).

  Args:
    num_rows: N, the rows of the split.
    device_counts: mesh devices of each process, in process order.

  Returns:
    ``[(start, stop)]``, one per process.
  """
  total = sum(device_counts)
  if total <= 0 or any(k < 0 for k in device_counts):
    raise ValueError(f"{device_counts=} must be non-negative with a positive sum")
  cuts = np.cumsum([0] + list(device_counts))
  return [(int(a) * num_rows // total, int(b) * num_rows // total)
          for a, b in zip(cuts[:-1], cuts[1:])]

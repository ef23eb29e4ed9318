"""The shard files: the contract between every data producer and the trainer.

A dataset is a directory holding one HDF5 file per shard and a ``manifest.json`` (its values,
checks, reader and writer: :mod:`fastdp_jax.data.manifest`)::

    DATASET/
      manifest.json
      train-00000.h5      # datasets: features [n, d], labels [n], and row_keys [n] or
      test-00000.h5       #   (a unit dataset) unit_keys [n], both uint64
      ...

A row-level dataset's shards carry each row's key (:func:`fastdp_jax.data.split.row_keys`: its
content and its occurrence among identical rows), the key its split was decided by;
:func:`load_split` returns them as :attr:`Split.row_keys`. They are optional on read: a
dataset written before rows had keys loads with ``row_keys`` None.

The dataset directory is a trust boundary: a shard must be a regular file inside it (no
symlink leading outside), and no two manifest entries may be the same file. Values are checked
where they enter: :func:`write_shard` refuses non-numeric or boolean features, wrong shapes,
non-finite values, values outside the declared bounds and labels outside the task's, naming the
column; the loader checks the same again on every row before training.

Every producer (the built-in generator, the Spark job, the streaming converter) writes through
:func:`write_shard` and :func:`fastdp_jax.data.manifest.write_manifest` (or the
:class:`DatasetWriter` that wraps them), and the trainer reads only through :func:`load_split`,
which checks the files against the manifest and names the offending shard and column on any
mismatch.

The training rows of a dataset are the train shards concatenated in manifest order: a row's
global id is its offset in that order. :func:`load_split` can read any range of global rows
(HDF5 slices across shard boundaries), which is how each process of a multi-process run reads
its share (:func:`process_row_ranges`).

The original system's single-file layouts (``dataset.h5`` with ``x_train, y_train, x_test,
y_test`` and ``dataset_package.h5`` with ``train, test``, label last) are read by
:func:`load_split` too. They declare no bounds: the bounds come from the config
(``data.feature_bounds``) or the data is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import units as units_lib

_HASH_CHUNK = 1 << 20
_NUMERIC_KINDS = "iuf"  # signed, unsigned, float; not bool, complex, strings or objects


def sha256_file(path: str | os.PathLike) -> str:
  """The hex sha256 of a file's bytes (read in 1 MiB chunks: shards can exceed memory)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _check_arrays(features: np.ndarray, labels: np.ndarray, *, num_features: int | None,
                  where: str) -> None:
  """Dtypes and shapes: numeric (not bool, complex or text) [n, d] features and [n] labels."""
  for name, a in (("features", features), ("labels", labels)):
    if a.dtype.kind not in _NUMERIC_KINDS:
      raise manifest_lib.ShardError(f"{where}: {name} have dtype {a.dtype}; they must be "
                                    "integer or float numbers (not bool, complex or text)")
  if features.ndim != 2:
    raise manifest_lib.ShardError(f"{where}: features have shape {features.shape}, expected "
                                  "[rows, features]")
  if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
    raise manifest_lib.ShardError(f"{where}: labels have shape {labels.shape}, expected "
                                  f"({features.shape[0]},) for {features.shape[0]} feature rows")
  if num_features is not None and features.shape[1] != num_features:
    raise manifest_lib.ShardError(f"{where}: {features.shape[1]} features, expected "
                                  f"{num_features}")


def _compact(features: np.ndarray) -> np.ndarray:
  """Stores 0/1 features as uint8 (8x smaller than float64); everything else as float32."""
  if features.dtype == np.uint8:
    return features
  if features.size and np.isin(features, (0, 1)).all():
    return features.astype(np.uint8)
  return features.astype(np.float32)


# ------------------------------------------------------------------ writing

def _checked_keys(keys: np.ndarray | None, name: str, shape: tuple[int, ...],
                  where: str) -> np.ndarray | None:
  """One uint64 key per row (or None), as a shard stores its ``unit_keys`` / ``row_keys``."""
  if keys is None:
    return None
  keys = np.asarray(keys)
  if keys.dtype != np.uint64 or keys.shape != shape:
    raise manifest_lib.ShardError(f"{where}: {name} have dtype {keys.dtype} and shape "
                                  f"{keys.shape}; expected uint64 ({shape[0]},), one key per "
                                  "row")
  return keys


def label_dtype(task: manifest_lib.Task) -> np.dtype:
  """How a task's labels are stored: uint8 (binary, up to 256 classes), uint16, float32."""
  if task.kind == "regression":
    return np.dtype(np.float32)
  return np.dtype(np.uint8 if len(task.classes) <= 256 else np.uint16)


def write_shard(directory: str | os.PathLike, file: str, split: str, features: np.ndarray,
                labels: np.ndarray, *, feature_bounds: Any,
                feature_names: Sequence[str] | None = None,
                task: manifest_lib.Task = manifest_lib.BINARY,
                embeddings: Sequence[manifest_lib.Embedding] = (),
                unit_keys: np.ndarray | None = None,
                row_keys: np.ndarray | None = None) -> manifest_lib.ShardInfo:
  """Writes one shard file, after checking its values, and returns its manifest entry.

  Args:
    directory: the dataset directory (or a staging directory that becomes it).
    file: the shard's plain file name, e.g. ``'train-00003.h5'``.
    split: ``'train'`` or ``'test'``.
    features: [n, d] integer or float array; 0/1 data is stored as uint8, other data as
      float32.
    labels: [n] labels of ``task``: 0/1 or class indices (stored as uint8, uint16 above
      256 classes) or regression values (float32).
    feature_bounds: the features' public bounds (see
      :func:`~fastdp_jax.data.manifest.normalize_bounds`), the same that go into the manifest;
      None only for data whose bounds are declared elsewhere (the config): then only
      finiteness and labels are checked.
    feature_names: the d column names, for error messages (required with embeddings).
    task: what the labels are (default binary).
    embeddings: the integer-id columns (their bounds must be ``(0, vocab_size - 1)``).
    unit_keys: [n] uint64 privacy-unit keys of a unit dataset's rows
      (:func:`fastdp_jax.data.units.unit_keys`), stored as the ``unit_keys`` dataset; None
      for a row-level dataset (no such dataset, the file as before).
    row_keys: [n] uint64 row keys of a row-level dataset's rows
      (:func:`fastdp_jax.data.split.row_keys`: the keys its train/test split was decided
      by), stored as the ``row_keys`` dataset; None: no such dataset (a unit dataset, or a
      file as written before rows had keys).

  Returns:
    The :class:`~fastdp_jax.data.manifest.ShardInfo` to put in the manifest.

  Raises:
    ShardError: naming the shard and column, for a non-numeric or boolean dtype, a wrong
      shape, a non-finite value, a value outside the bounds, a non-integer embedding id or a
      label outside the task's labels.
  """
  if split not in manifest_lib.SPLITS:
    raise manifest_lib.ShardError(f"shard {file}: {split=} must be one of "
                                  f"{manifest_lib.SPLITS}")
  manifest_lib.check_file_name(file, f"shard {file!r}")
  features = np.asarray(features)
  labels = np.asarray(labels)
  where = f"shard {file}"
  _check_arrays(features, labels, num_features=None if feature_names is None else
                len(feature_names), where=where)
  bounds = (None if feature_bounds is None else
            manifest_lib.normalize_bounds(feature_bounds, features.shape[1],
                                          what=f"{where}: feature_bounds"))
  if embeddings:
    if feature_names is None:
      raise manifest_lib.ShardError(f"{where}: embeddings need the feature names")
    manifest_lib.check_embedding_bounds(embeddings, feature_names, bounds, where)
  stored = _compact(features)
  unit_keys = _checked_keys(unit_keys, "unit_keys", labels.shape, where)
  row_keys = _checked_keys(row_keys, "row_keys", labels.shape, where)
  manifest_lib.check_values(stored, labels, bounds=bounds, feature_names=feature_names,
                            where=where, task=task, embeddings=embeddings)
  path = os.path.join(directory, file)
  with h5py.File(path, "w") as f:
    f.create_dataset("features", data=stored)
    f.create_dataset("labels", data=labels.astype(label_dtype(task)))
    if unit_keys is not None:
      f.create_dataset("unit_keys", data=unit_keys)
    if row_keys is not None:
      f.create_dataset("row_keys", data=row_keys)
  return manifest_lib.ShardInfo(file=file, split=split, rows=int(features.shape[0]),
                                num_features=int(features.shape[1]), sha256=sha256_file(path))


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
      w.set_provenance(manifest_lib.Provenance(rows_read=n, kept=n))

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
    privacy_unit: the raw column(s) identifying a privacy unit; set, every :meth:`add` must
      give each row's unit key (:mod:`fastdp_jax.data.units`). None: a row-level dataset.
    max_rows_per_unit: the public bound k (required with ``privacy_unit``), recorded in the
      manifest for the trainer, which applies it.
  """

  def __init__(self, directory: str | os.PathLike, *, feature_names: Sequence[str],
               label_name: str, feature_bounds: Any, max_rows_per_shard: int = 500_000,
               overwrite: bool = False, extra: dict[str, Any] | None = None,
               task: manifest_lib.Task = manifest_lib.BINARY,
               embeddings: Sequence[manifest_lib.Embedding] = (),
               privacy_unit: Sequence[str] | str | None = None,
               max_rows_per_unit: int | None = None):
    self.feature_names = list(feature_names)
    self.privacy_unit, self.max_rows_per_unit = units_lib.normalize_unit(
        privacy_unit, max_rows_per_unit, f"{directory}")
    self.feature_bounds = manifest_lib.normalize_bounds(
        feature_bounds, len(self.feature_names), what="feature_bounds")
    self.task = task
    self.embeddings = tuple(embeddings)
    manifest_lib.check_embedding_bounds(self.embeddings, self.feature_names,
                                        self.feature_bounds, f"{directory}")
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not overwrite:
      raise FileExistsError(f"output {self.directory} exists; pass overwrite to replace it")
    # .NAME.staging-HOST-PID-*: removed by the next writer if this process is killed.
    self.staging = atomic.make_staging(self.directory)
    self.label_name = label_name
    self.max_rows_per_shard = max_rows_per_shard
    self.extra = extra
    self.overwrite = overwrite
    self._shards: list[manifest_lib.ShardInfo] = []
    self._counts = {s: 0 for s in manifest_lib.SPLITS}
    # Rows of each content key added to each split so far: the occurrences of row keys that
    # :meth:`add` computes itself.
    self._seen: dict[str, dict[int, int]] = {s: {} for s in manifest_lib.SPLITS}
    self._provenance: manifest_lib.Provenance | None = None

  def add(self, split: str, features: np.ndarray, labels: np.ndarray,
          unit_keys: np.ndarray | None = None, row_keys: np.ndarray | None = None) -> None:
    """Adds rows of a split, cut into shards of at most ``max_rows_per_shard``.

    Args:
      split: ``'train'`` or ``'test'``.
      features: [n, d] rows.
      labels: [n] labels.
      unit_keys: [n] uint64 unit keys: required for a unit dataset, refused otherwise.
      row_keys: [n] uint64 row keys of a row-level dataset (refused for a unit dataset):
        those its producer split the rows by (:func:`fastdp_jax.data.split.row_keys`). When
        not given, each row's key is that of its content and its occurrence among the
        identical rows added to ``split`` so far (this writer counts them over its calls).

    Raises:
      ShardError: naming the shard and column, if a value breaks the shard contract.
    """
    if split not in manifest_lib.SPLITS:
      raise manifest_lib.ShardError(f"{split=} must be one of {manifest_lib.SPLITS}")
    if (unit_keys is None) != (self.privacy_unit is None):
      raise manifest_lib.ShardError(
          f"{self.directory}: " + ("a unit dataset's rows need their unit_keys"
                                   if unit_keys is None else
                                   "unit_keys given for a dataset without privacy_unit"))
    features, labels = np.asarray(features), np.asarray(labels)
    unit_keys = None if unit_keys is None else np.asarray(unit_keys)
    if self.privacy_unit is not None:
      if row_keys is not None:
        raise manifest_lib.ShardError(f"{self.directory}: row_keys given for a unit dataset "
                                      "(it is split by unit key)")
    elif row_keys is None:
      # Dtypes and shapes first: the keys hash the values (write_shard checks them again).
      _check_arrays(features, labels, num_features=len(self.feature_names),
                    where=f"shard {split}-{self._counts[split]:05d}.h5")
      content = split_lib.content_keys(features, labels)
      row_keys = split_lib.row_keys(content, split_lib.occurrences(content, self._seen[split]))
    for lo in range(0, max(len(labels), 1), self.max_rows_per_shard):
      name = f"{split}-{self._counts[split]:05d}.h5"
      self._counts[split] += 1
      self._shards.append(write_shard(self.staging, name, split,
                                      features[lo:lo + self.max_rows_per_shard],
                                      labels[lo:lo + self.max_rows_per_shard],
                                      feature_bounds=self.feature_bounds,
                                      feature_names=self.feature_names, task=self.task,
                                      embeddings=self.embeddings,
                                      unit_keys=None if unit_keys is None else
                                      unit_keys[lo:lo + self.max_rows_per_shard],
                                      row_keys=None if row_keys is None else
                                      row_keys[lo:lo + self.max_rows_per_shard]))

  def set_provenance(self, provenance: manifest_lib.Provenance) -> None:
    self._provenance = provenance

  def close(self) -> manifest_lib.Manifest:
    kept = sum(s.rows for s in self._shards)
    prov = self._provenance or manifest_lib.Provenance(rows_read=kept, kept=kept)
    if prov.kept != kept:
      raise ValueError(f"provenance says kept={prov.kept} but the shards hold {kept} rows")
    manifest = manifest_lib.write_manifest(
        self.staging, feature_names=self.feature_names, label_name=self.label_name,
        shards=self._shards, provenance=prov, feature_bounds=self.feature_bounds,
        extra=self.extra, task=self.task, embeddings=self.embeddings,
        privacy_unit=self.privacy_unit, max_rows_per_unit=self.max_rows_per_unit)
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

def shard_path(directory: str | os.PathLike, info: manifest_lib.ShardInfo) -> str:
  """The shard's file, resolved; it must be a regular file inside the dataset directory.

  Raises:
    ShardError: if the name is not plain, the file is missing, or it (through a symlink)
      lies outside the directory.
  """
  manifest_lib.check_file_name(info.file, f"{directory}")
  path = os.path.join(directory, info.file)
  if not os.path.isfile(path):
    raise manifest_lib.ShardError(f"shard {info.file}: file missing from {directory}")
  real_dir = os.path.realpath(directory)
  real = os.path.realpath(path)
  if os.path.dirname(real) != real_dir:
    raise manifest_lib.ShardError(f"shard {info.file}: a symlink leading outside the dataset "
                                  f"directory {directory}; copy the file in instead")
  return real


def _check_distinct_files(directory: str | os.PathLike,
                          manifest: manifest_lib.Manifest) -> None:
  """Two manifest entries must not be the same file (e.g. one a symlink to the other)."""
  seen: dict[str, str] = {}
  for info in manifest.shards:
    path = os.path.join(directory, info.file)
    if not os.path.lexists(path):
      continue  # reported as missing when (and if) it is read
    real = os.path.realpath(path)
    if real in seen:
      raise manifest_lib.ShardError(f"shard {info.file}: the same file as shard {seen[real]} "
                                    "(a symlink); its rows would count twice")
    seen[real] = info.file


def _h5_dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
  """One numeric HDF5 dataset, or a ShardError saying what is there instead."""
  obj = f.get(name)
  if obj is None:
    raise manifest_lib.ShardError(f"{where}: no {name!r} dataset (the file has "
                                  f"{sorted(f.keys())})")
  if not isinstance(obj, h5py.Dataset):
    raise manifest_lib.ShardError(f"{where}: {name!r} is not a dataset (a {type(obj).__name__})")
  if obj.dtype.kind not in _NUMERIC_KINDS:
    raise manifest_lib.ShardError(f"{where}: {name!r} is not numeric (dtype {obj.dtype}; integer "
                                  "or float numbers expected, not bool, complex or text)")
  return obj


def read_shard(directory: str | os.PathLike, info: manifest_lib.ShardInfo, *, start: int = 0,
               stop: int | None = None,
               verify_checksum: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads rows ``start:stop`` of one shard, checking the file against its manifest entry.

  The whole file is hashed (when ``verify_checksum``) and its structure checked; only the
  requested rows are read (an HDF5 slice). Values are checked by
  :func:`~fastdp_jax.data.manifest.check_values`.

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
    raise manifest_lib.ShardError(f"shard {info.file}: sha256 {digest[:12]}... does not match "
                                  f"the manifest's {info.sha256[:12]}... (corrupt or replaced "
                                  "file)")
  where = f"shard {info.file}"
  try:
    with h5py.File(path, "r") as f:
      fx = _h5_dataset(f, "features", where)
      fy = _h5_dataset(f, "labels", where)
      if len(fx.shape) != 2 or fx.shape[1] != info.num_features:
        raise manifest_lib.ShardError(f"{where}: feature width {fx.shape[1:]} != manifest's "
                                      f"{info.num_features}")
      if len(fy.shape) != 1:
        raise manifest_lib.ShardError(f"{where}: labels have shape {fy.shape}, expected one "
                                      f"label per row ({info.rows},)")
      if fx.shape[0] != info.rows or fy.shape[0] != info.rows:
        raise manifest_lib.ShardError(f"{where}: {fx.shape[0]} feature rows and {fy.shape[0]} "
                                      f"labels, manifest says {info.rows}")
      x = fx[start:stop]
      y = fy[start:stop]
  except (OSError, KeyError) as e:
    raise manifest_lib.ShardError(f"{where}: unreadable ({e})") from e
  return x.astype(np.float32), y.astype(np.float32)


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
    unit_keys: [n] uint64 privacy-unit key of each row (a unit dataset), or None (every row
      its own unit).
    row_keys: [n] uint64 row key of each row of a row-level dataset
      (:func:`fastdp_jax.data.split.row_keys`), or None: a unit dataset, an original
      single-file layout, or rows of which some shard has no keys (written before rows had
      keys, or added by hand).
    privacy_unit: the unit's id column(s) (None: row-level).
    max_rows_per_unit: the public bound k the trainer applies (None: row-level).
  """

  features: np.ndarray
  labels: np.ndarray
  feature_names: tuple[str, ...]
  label_name: str
  digest: str
  feature_bounds: manifest_lib.Bounds | None = None
  task: manifest_lib.Task = manifest_lib.BINARY
  embeddings: tuple[manifest_lib.Embedding, ...] = ()
  unit_keys: np.ndarray | None = None
  row_keys: np.ndarray | None = None
  privacy_unit: tuple[str, ...] | None = None
  max_rows_per_unit: int | None = None

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, index: np.ndarray | slice) -> "Split":
    """These rows (a mask, indices or a slice), with their unit and row keys."""
    pick = lambda a: None if a is None else a[index]  # noqa: E731
    return dataclasses.replace(self, features=self.features[index], labels=self.labels[index],
                               unit_keys=pick(self.unit_keys), row_keys=pick(self.row_keys))


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
          raise manifest_lib.ShardError(f"{path}: {split!r} has shape {table.shape}; the "
                                        "dataset_package.h5 layout is a 2-D table "
                                        "[n, features + 1] with the label last")
        x, y = table[:, :-1], table[:, -1]
      else:
        raise manifest_lib.ShardError(f"{path}: neither x_{split}/y_{split} (dataset.h5 layout) "
                                      f"nor {split} (dataset_package.h5 layout)")
  except OSError as e:
    raise manifest_lib.ShardError(f"{path}: unreadable HDF5 file ({e})") from e
  if y.ndim == 2 and y.shape[1] == 1:  # the original wrote y as a column
    y = y[:, 0]
  if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise manifest_lib.ShardError(f"{path}: {split} features {x.shape} and labels {y.shape} do "
                                  "not match")
  names = split_lib.CAPUMS_FEATURES if x.shape[1] == len(split_lib.CAPUMS_FEATURES) else tuple(
      f"x{i}" for i in range(x.shape[1]))
  where = f"{path} ({split})"
  manifest_lib.check_values(x, y, bounds=None, feature_names=names, where=where)
  bounds = manifest_lib.resolve_bounds(None, feature_bounds, x.shape[1],
                                       f"{path} (an original single-file layout)")
  manifest_lib.check_values(x, y, bounds=bounds, feature_names=names, where=where)
  return Split(features=np.asarray(x, np.float32), labels=np.asarray(y, np.float32),
               feature_names=tuple(names), label_name="employed", digest=sha256_file(path),
               feature_bounds=bounds)


def read_unit_keys(directory: str | os.PathLike, info: manifest_lib.ShardInfo, *,
                   start: int = 0, stop: int | None = None) -> np.ndarray:
  """Reads the unit keys of rows ``start:stop`` of a unit dataset's shard.

  Call it after :func:`read_shard` of the same rows, which verified the file's checksum.

  Returns:
    [stop - start] uint64.

  Raises:
    ShardError: naming the shard, if it has no ``unit_keys`` of one uint64 per row.
  """
  keys = _read_keys(directory, info, "unit_keys", start, stop, optional=False)
  assert keys is not None  # not optional: a shard without them raised
  return keys


def read_row_keys(directory: str | os.PathLike, info: manifest_lib.ShardInfo, *,
                  start: int = 0, stop: int | None = None) -> np.ndarray | None:
  """Reads the row keys of rows ``start:stop`` of a row-level dataset's shard.

  Call it after :func:`read_shard` of the same rows, which verified the file's checksum.

  Returns:
    [stop - start] uint64, or None for a shard without a ``row_keys`` dataset (written
    before rows had keys).

  Raises:
    ShardError: naming the shard, if its ``row_keys`` are not one uint64 per row.
  """
  return _read_keys(directory, info, "row_keys", start, stop, optional=True)


def _read_keys(directory: str | os.PathLike, info: manifest_lib.ShardInfo, name: str,
               start: int, stop: int | None, *, optional: bool) -> np.ndarray | None:
  """Rows ``start:stop`` of the shard's uint64 dataset ``name`` (None: absent and optional)."""
  stop = info.rows if stop is None else stop
  where = f"shard {info.file}"
  try:
    with h5py.File(shard_path(directory, info), "r") as f:
      if optional and name not in f:
        return None
      keys = _h5_dataset(f, name, where)
      if keys.dtype != np.uint64 or keys.shape != (info.rows,):
        raise manifest_lib.ShardError(f"{where}: {name} have dtype {keys.dtype} and shape "
                                      f"{keys.shape}; expected uint64 ({info.rows},)")
      return np.asarray(keys[start:stop], np.uint64)
  except OSError as e:
    raise manifest_lib.ShardError(f"{where}: unreadable ({e})") from e


def _slices(shards: Sequence[manifest_lib.ShardInfo], start: int,
            stop: int) -> list[tuple[manifest_lib.ShardInfo, int, int]]:
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
  dtypes, shapes) and its values with :func:`~fastdp_jax.data.manifest.check_values` (finite,
  inside the manifest's declared bounds, labels valid for its task).

  Args:
    path: a dataset directory, or an original-layout ``.h5`` file.
    split: ``'train'`` or ``'test'``.
    rows: ``(start, stop)``: read only these global rows of the split (the split's shards
      concatenated in manifest order; a process's share); default all.
    verify_checksum: check the sha256 of each shard that is read (on by default; costs one
      read of the file).
    feature_bounds: ``data.feature_bounds``: the bounds of data that declares none (an
      original ``.h5`` file, a manifest without ``feature_bounds``); ignored when the
      manifest declares its own.

  Returns:
    A :class:`Split`.

  Raises:
    ShardError: naming the shard (and column) on any mismatch or bad value, or if the data
      declares no bounds and none are configured.
    FileNotFoundError: if ``path`` does not exist.
  """
  path = os.fspath(path)
  if split not in manifest_lib.SPLITS:
    raise ValueError(f"{split=} must be one of {manifest_lib.SPLITS}")
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
  manifest = manifest_lib.read_manifest(path)
  _check_distinct_files(path, manifest)
  shards = manifest.shards_of(split)
  if not shards:
    raise manifest_lib.ShardError(f"{path}: no {split} shards in the manifest")
  bounds = manifest_lib.resolve_bounds(manifest.feature_bounds, feature_bounds,
                                       manifest.num_features,
                                       f"{path} (a manifest without feature_bounds)")
  total = manifest.rows(split)
  start, stop = (0, total) if rows is None else (int(rows[0]), int(rows[1]))
  if not 0 <= start <= stop <= total:
    raise ValueError(f"rows {start}:{stop} outside the {total} {split} rows of {path}")
  xs = [np.zeros((0, manifest.num_features), np.float32)]
  ys = [np.zeros((0,), np.float32)]
  ks = [np.zeros((0,), np.uint64)]
  rks: list[np.ndarray | None] = []
  for info, lo, hi in _slices(shards, start, stop):
    x, y = read_shard(path, info, start=lo, stop=hi, verify_checksum=verify_checksum)
    manifest_lib.check_values(x, y, bounds=bounds, feature_names=manifest.feature_names,
                              where=f"shard {info.file}", first_row=lo, task=manifest.task,
                              embeddings=manifest.embeddings)
    xs.append(x)
    ys.append(y)
    if manifest.privacy_unit is not None:
      ks.append(read_unit_keys(path, info, start=lo, stop=hi))
    else:
      rks.append(read_row_keys(path, info, start=lo, stop=hi))
  return Split(features=np.concatenate(xs), labels=np.concatenate(ys),
               feature_names=manifest.feature_names, label_name=manifest.label_name,
               digest=manifest.digest(), feature_bounds=bounds, task=manifest.task,
               embeddings=manifest.embeddings,
               unit_keys=None if manifest.privacy_unit is None else np.concatenate(ks),
               row_keys=_all_or_none(rks),
               privacy_unit=manifest.privacy_unit,
               max_rows_per_unit=manifest.max_rows_per_unit)


def _all_or_none(keys: list[np.ndarray | None]) -> np.ndarray | None:
  """The row keys of the shards read, concatenated; None unless every one has them (an old
  dataset, a unit one, or one with shards added by hand, as the canary audit's dataset: its
  canary shard has no keys)."""
  if not keys or any(k is None for k in keys):
    return None
  return np.concatenate([np.zeros((0,), np.uint64)] + [k for k in keys if k is not None])


def count_rows(path: str | os.PathLike, split: str) -> int | None:
  """The rows of ``split`` that :func:`load_split` would read, without reading any.

  A directory's from its manifest; an original ``.h5`` file's from its labels' shape (HDF5
  metadata). None when ``path`` is neither (missing, unreadable): :func:`load_split` then
  says what is wrong with it.

  Raises:
    ShardError: a directory whose manifest is missing or malformed.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return manifest_lib.read_manifest(path).rows(split)
  try:
    with h5py.File(path, "r") as f:
      obj = f.get(f"y_{split}", f.get(split))  # dataset.h5, else dataset_package.h5
      if isinstance(obj, h5py.Dataset) and obj.ndim >= 1:
        return int(obj.shape[0])
  except OSError:
    pass
  return None


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

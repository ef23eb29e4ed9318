"""The shard format: the contract between every data producer and the trainer.

A dataset is a directory holding one HDF5 file per shard and a ``manifest.json``::

    DATASET/
      manifest.json
      train-00000.h5      # datasets: features [n, d], labels [n]
      test-00000.h5
      ...

The manifest records the format version, the feature and label names, each shard's split,
row count, feature width and sha256, and the provenance counts of the producer (rows read,
kept, dropped for ``NA``, rejected as malformed; ``read = kept + dropped_na + rejected``).

Every producer (the built-in generator, the Spark job, the streaming converter) writes through
:func:`write_shard` and :func:`write_manifest` (or the :class:`DatasetWriter` that wraps
them), and the trainer reads only through :func:`load_split`, which checks the files against
the manifest and names the offending shard on any mismatch.

The original system's single-file layouts (``dataset.h5`` with ``x_train, y_train, x_test,
y_test`` and ``dataset_package.h5`` with ``train, test``, label last) are read by
:func:`load_split` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from fastdp_jax import errors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
_HASH_CHUNK = 1 << 20


class ShardError(errors.UserError):
  """A data set on disk does not match its manifest; the message names the shard."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardInfo:
  """What the manifest records about one shard file.

  Attributes:
    file: file name relative to the dataset directory.
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
  """The parsed ``manifest.json`` of a dataset directory."""

  format_version: int
  feature_names: tuple[str, ...]
  label_name: str
  shards: tuple[ShardInfo, ...]
  provenance: Provenance
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_features(self) -> int:
    return len(self.feature_names)

  def rows(self, split: str) -> int:
    return sum(s.rows for s in self.shards if s.split == split)

  def shards_of(self, split: str) -> tuple[ShardInfo, ...]:
    return tuple(s for s in self.shards if s.split == split)

  def digest(self) -> str:
    """A hash identifying the data (the shards' checksums, names and widths)."""
    body = json.dumps({"features": self.feature_names, "label": self.label_name,
                       "shards": [dataclasses.asdict(s) for s in self.shards]},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _compact(features: np.ndarray) -> np.ndarray:
  """Stores 0/1 features as uint8 (8x smaller than float64); everything else as float32."""
  if features.dtype == np.uint8:
    return features
  if features.size and np.isin(features, (0, 1)).all():
    return features.astype(np.uint8)
  return features.astype(np.float32)


def write_shard(directory: str | os.PathLike, file: str, split: str, features: np.ndarray,
                labels: np.ndarray) -> ShardInfo:
  """Writes one shard file and returns its manifest entry.

  Args:
    directory: the dataset directory (or a staging directory that becomes it).
    file: the shard's file name, e.g. ``'train-00003.h5'``.
    split: ``'train'`` or ``'test'``.
    features: [n, d] numeric array; 0/1 data is stored as uint8, other data as float32.
    labels: [n] array of 0/1 labels.

  Returns:
    The :class:`ShardInfo` to put in the manifest.
  """
  if split not in SPLITS:
    raise ValueError(f"{split=} must be one of {SPLITS}")
  features = np.asarray(features)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
    raise ValueError(f"shard {file}: features {features.shape} and labels {labels.shape} do not"
                     " form [n, d] and [n]")
  path = os.path.join(directory, file)
  with h5py.File(path, "w") as f:
    f.create_dataset("features", data=_compact(features))
    f.create_dataset("labels", data=labels.astype(np.uint8))
  return ShardInfo(file=file, split=split, rows=int(features.shape[0]),
                   num_features=int(features.shape[1]), sha256=sha256_file(path))


def write_manifest(directory: str | os.PathLike, *, feature_names: Sequence[str],
                   label_name: str, shards: Sequence[ShardInfo], provenance: Provenance,
                   extra: dict[str, Any] | None = None) -> Manifest:
  """Writes ``manifest.json`` last, atomically (temporary file + rename)."""
  manifest = Manifest(format_version=FORMAT_VERSION, feature_names=tuple(feature_names),
                      label_name=label_name, shards=tuple(sorted(shards, key=lambda s: s.file)),
                      provenance=provenance, extra=dict(extra or {}))
  for s in manifest.shards:
    if s.num_features != manifest.num_features:
      raise ShardError(f"shard {s.file}: {s.num_features} features, manifest names "
                       f"{manifest.num_features}")
  body = {
      "format_version": manifest.format_version,
      "feature_names": list(manifest.feature_names),
      "label_name": manifest.label_name,
      "shards": [dataclasses.asdict(s) for s in manifest.shards],
      "provenance": dataclasses.asdict(manifest.provenance),
      "extra": manifest.extra,
  }
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1)
  os.replace(tmp, os.path.join(directory, MANIFEST))
  return manifest


class DatasetWriter:
  """Writes a dataset directory that appears atomically when :meth:`close` succeeds.

  Shards go to a staging directory beside the target; the manifest is written last and the
  directory renamed into place, so a crashed producer never leaves a directory that looks
  complete.

  Example::

    with DatasetWriter(out, feature_names=names, label_name='employed') as w:
      w.add('train', x_train, y_train)
      w.add('test', x_test, y_test)
      w.set_provenance(Provenance(rows_read=n, kept=n))
  """

  def __init__(self, directory: str | os.PathLike, *, feature_names: Sequence[str],
               label_name: str, max_rows_per_shard: int = 500_000, overwrite: bool = False,
               extra: dict[str, Any] | None = None):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not overwrite:
      raise FileExistsError(f"output {self.directory} exists; pass overwrite to replace it")
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    self.staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    self.feature_names = list(feature_names)
    self.label_name = label_name
    self.max_rows_per_shard = max_rows_per_shard
    self.extra = extra
    self.overwrite = overwrite
    self._shards: list[ShardInfo] = []
    self._counts = {s: 0 for s in SPLITS}
    self._provenance: Provenance | None = None

  def add(self, split: str, features: np.ndarray, labels: np.ndarray) -> None:
    """Adds rows of a split, cut into shards of at most ``max_rows_per_shard``."""
    for lo in range(0, max(len(labels), 1), self.max_rows_per_shard):
      name = f"{split}-{self._counts[split]:05d}.h5"
      self._counts[split] += 1
      self._shards.append(write_shard(self.staging, name, split,
                                      features[lo:lo + self.max_rows_per_shard],
                                      labels[lo:lo + self.max_rows_per_shard]))

  def set_provenance(self, provenance: Provenance) -> None:
    self._provenance = provenance

  def close(self) -> Manifest:
    kept = sum(s.rows for s in self._shards)
    prov = self._provenance or Provenance(rows_read=kept, kept=kept)
    if prov.kept != kept:
      raise ValueError(f"provenance says kept={prov.kept} but the shards hold {kept} rows")
    manifest = write_manifest(self.staging, feature_names=self.feature_names,
                              label_name=self.label_name, shards=self._shards,
                              provenance=prov, extra=self.extra)
    if os.path.exists(self.directory):
      shutil.rmtree(self.directory)
    os.replace(self.staging, self.directory)
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


def read_manifest(directory: str | os.PathLike) -> Manifest:
  """Parses and checks ``DIRECTORY/manifest.json``."""
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
    return Manifest(format_version=body["format_version"],
                    feature_names=tuple(body["feature_names"]), label_name=body["label_name"],
                    shards=tuple(ShardInfo(**s) for s in body["shards"]),
                    provenance=Provenance(**body["provenance"]), extra=body.get("extra", {}))
  except (KeyError, TypeError, json.JSONDecodeError) as e:
    raise ShardError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e


def read_shard(directory: str | os.PathLike, info: ShardInfo, *,
               verify_checksum: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads one shard, checking it against its manifest entry.

  Returns:
    ``(features [rows, d] float32, labels [rows] float32)``.

  Raises:
    ShardError: naming the shard, if the file is missing, unreadable, or differs from the
      manifest in checksum, row count or feature width.
  """
  path = os.path.join(directory, info.file)
  if not os.path.isfile(path):
    raise ShardError(f"shard {info.file}: file missing from {directory}")
  if verify_checksum and (digest := sha256_file(path)) != info.sha256:
    raise ShardError(f"shard {info.file}: sha256 {digest[:12]}... does not match the "
                     f"manifest's {info.sha256[:12]}... (corrupt or replaced file)")
  try:
    with h5py.File(path, "r") as f:
      x = f["features"][...]
      y = f["labels"][...]
  except (OSError, KeyError) as e:
    raise ShardError(f"shard {info.file}: unreadable ({e})") from e
  if x.ndim != 2 or x.shape[1] != info.num_features:
    raise ShardError(f"shard {info.file}: feature width {x.shape[1:]} != manifest's "
                     f"{info.num_features}")
  if x.shape[0] != info.rows or y.shape != (info.rows,):
    raise ShardError(f"shard {info.file}: {x.shape[0]} feature rows and {y.shape[0]} labels,"
                     f" manifest says {info.rows}")
  return x.astype(np.float32), y.astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
  """One split of a dataset in host memory.

  Attributes:
    features: [n, d] float32.
    labels: [n] float32 in {0, 1}.
    feature_names: the d column names.
    label_name: the label column's name.
    digest: identifies the data (manifest digest or file checksum).
  """

  features: np.ndarray
  labels: np.ndarray
  feature_names: tuple[str, ...]
  label_name: str
  digest: str

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def _original_dataset(f: h5py.File, name: str, path: str) -> np.ndarray:
  """Reads one numeric dataset of an original-layout file, or raises a ShardError."""
  obj = f.get(name)
  if obj is None:
    raise ShardError(f"{path}: no {name!r} dataset (the file has {sorted(f.keys())})")
  if not isinstance(obj, h5py.Dataset):
    raise ShardError(f"{path}: {name!r} is not a dataset (a {type(obj).__name__})")
  arr = obj[...]
  if arr.dtype.kind not in "biuf":
    raise ShardError(f"{path}: {name!r} is not numeric (dtype {arr.dtype})")
  return arr


def _load_original(path: str, split: str) -> Split:
  """Reads the original system's ``dataset.h5`` or ``dataset_package.h5``."""
  try:
    with h5py.File(path, "r") as f:
      if f"x_{split}" in f or f"y_{split}" in f:
        x = _original_dataset(f, f"x_{split}", path)
        y = _original_dataset(f, f"y_{split}", path)
      elif split in f:
        table = _original_dataset(f, split, path)
        if table.ndim != 2 or table.shape[1] < 2:
          raise ShardError(f"{path}: {split!r} has shape {table.shape}; the dataset_package.h5 "
                           "layout is a 2-D table [n, features + 1] with the label last")
        x, y = table[:, :-1], table[:, -1]
      else:
        raise ShardError(f"{path}: neither x_{split}/y_{split} (dataset.h5 layout) nor "
                         f"{split} (dataset_package.h5 layout)")
  except OSError as e:
    raise ShardError(f"{path}: unreadable HDF5 file ({e})") from e
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32).reshape(-1)
  if x.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ShardError(f"{path}: {split} features {x.shape} and labels {y.shape} do not match")
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ShardError(f"{path}: {split} holds non-finite values (NaN or inf)")
  if not np.isin(y, (0, 1)).all():
    raise ShardError(f"{path}: {split} labels must be 0 or 1, found "
                     f"{np.unique(y)[:5].tolist()}")
  from fastdp_jax import schema  # local: avoids a cycle at import time
  names = schema.CAPUMS_FEATURES if x.shape[1] == len(schema.CAPUMS_FEATURES) else tuple(
      f"x{i}" for i in range(x.shape[1]))
  return Split(features=x, labels=y, feature_names=tuple(names), label_name="employed",
               digest=sha256_file(path))


def load_split(path: str | os.PathLike, split: str, *, shard_files: Sequence[str] | None = None,
               verify_checksum: bool = True) -> Split:
  """Loads a split of a dataset into host memory, verifying it against its manifest.

  Args:
    path: a dataset directory, or an original-layout ``.h5`` file.
    split: ``'train'`` or ``'test'``.
    shard_files: read only these shards of the split (a process's share); default all.
    verify_checksum: check each shard's sha256 (on by default; costs one read of the file).

  Returns:
    A :class:`Split`.

  Raises:
    ShardError: naming the shard or file on any mismatch.
    FileNotFoundError: if ``path`` does not exist.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"data set {path} does not exist; create the default one with `make data` or "
        f"`python -m preprocessing.synthesize --rows 100000 --output-shards {path}`")
  if os.path.isfile(path):
    return _load_original(path, split)
  manifest = read_manifest(path)
  shards = manifest.shards_of(split)
  if shard_files is not None:
    wanted = set(shard_files)
    shards = tuple(s for s in shards if s.file in wanted)
  if not shards:
    raise ShardError(f"{path}: no {split} shards in the manifest")
  xs, ys = [], []
  for info in shards:
    x, y = read_shard(path, info, verify_checksum=verify_checksum)
    if x.shape[1] != manifest.num_features:
      raise ShardError(f"shard {info.file}: width {x.shape[1]} != {manifest.num_features}"
                       " feature names in the manifest")
    xs.append(x)
    ys.append(y)
  return Split(features=np.concatenate(xs), labels=np.concatenate(ys),
               feature_names=manifest.feature_names, label_name=manifest.label_name,
               digest=manifest.digest())


def assign_shards(shards: Sequence[ShardInfo], num_parts: int) -> list[tuple[ShardInfo, ...]]:
  """Splits shards into ``num_parts`` contiguous groups balanced by rows (one per process).

  Groups are contiguous in the given (manifest) order, so group p holds the global rows
  ``sum(rows of groups < p)`` onward and every process can compute everyone's range from the
  manifest alone. The largest group is as small as a contiguous split allows; a group is
  empty only when there are fewer shards than parts.

  Args:
    shards: the shards of one split, in manifest order.
    num_parts: number of groups (processes), positive.

  Returns:
    ``num_parts`` tuples of shards.
  """
  if num_parts <= 0:
    raise ValueError(f"{num_parts=} must be positive")
  rows = [s.rows for s in shards]

  def fits(limit: int) -> bool:  # can a greedy left-to-right cut keep every group <= limit?
    groups, load = 1, 0
    for r in rows:
      if load + r > limit and load > 0:
        groups, load = groups + 1, 0
      load += r
    return groups <= num_parts

  lo, hi = max(rows, default=0), sum(rows)
  while lo < hi:  # smallest feasible largest-group size
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
  parts: list[list[ShardInfo]] = [[] for _ in range(num_parts)]
  p, load = 0, 0
  for i, s in enumerate(shards):
    # Close the group when the next shard would overflow it, or when every remaining group
    # needs one of the remaining shards (no empty groups while shards last).
    if parts[p] and p < num_parts - 1 and (load + s.rows > lo or
                                           len(shards) - i <= num_parts - 1 - p):
      p, load = p + 1, 0
    parts[p].append(s)
    load += s.rows
  return [tuple(g) for g in parts]

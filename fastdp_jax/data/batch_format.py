"""The on-disk format of materialised Poisson batches: layout, manifests, shards, key file.

``python -m preprocessing.poisson_batches`` (a Spark job) evaluates the sampler's inclusion
function (:func:`fastdp_jax.dp.sampling.inclusions`) row by row, groups the rows by update and
writes every update's batch at a fixed capacity with a mask; :mod:`fastdp_jax.data.batch_stream`
reads them back in update order. This module is what the two sides share.

Layout of a batch directory (as private as the training data: it holds rows and the key)::

  BATCHES/                           mode 0700
    batches.json                     the run: q, updates, capacity, dataset identity, ...
    private/sampling_key.json        the sampling key (0600, directory 0700)
    epochs-0000-0010/                a block of consecutive updates (one job run)
      block.json                     its shards, the updates each holds, their sha256
      updates-000000000.h5           features [k, capacity, F] float32,
      updates-000000512.h5           labels [k, capacity] float32, mask [k, capacity] bool

Labels are float32 whatever the dataset's task (0/1, a class index, a regression value): the
format is the same for every task, and the dataset digest the run records covers the task.

Slot order: inside an update the real rows come first in increasing global row id (the order
of :meth:`fastdp_jax.dp.sampling.PoissonSampler.global_indices`), then padding (mask False,
zeros).

Both manifests carry a ``digest`` of their own contents (a hand edit is refused), every block
names the run it belongs to (``run_digest``), and the run records a commitment (a hash) of
the sampling key, checked against the key file when it is present. :func:`read_run`,
:func:`read_block` and :func:`verify_block` check all of this, naming the file at fault.

The key file's reading and writing live here, not in :mod:`fastdp_jax.dp.keys`: the run
manifest commits to the key and :func:`read_run` checks the file against that commitment, so
the file is part of what the producer and every reader must agree on, which is what the data
contract is for; and the producer, a preprocessing job, builds on the data contract rather
than on the trainer's modules. :mod:`fastdp_jax.dp.keys` generates and forgets a run's keys
and reads a batch directory's key through :func:`read_key`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import h5py
import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors

# Format 2 stores labels as float32 (every task); format 1's uint8 labels held binary tasks only.
FORMAT_VERSION = 2
RUN_MANIFEST = "batches.json"
BLOCK_MANIFEST = "block.json"
PRIVATE_DIR = "private"
KEY_FILE = "sampling_key.json"
_BLOCK_RE = re.compile(r"^epochs-(\d{4,})-(\d{4,})$")
_COMMITMENT_TAG = b"fastdp-jax sampling key commitment v1\0"


class BatchError(errors.UserError):
  """A batch directory is missing, corrupt, or does not match its manifests; names the file."""


class BatchMismatchError(BatchError):
  """A batch directory was made for another dataset, batch size, epochs, ... than asked."""


class MissingUpdatesError(BatchError):
  """The updates asked for are in no block of the batch directory (not yet written, or
  deleted)."""


# ------------------------------------------------------------------ names and digests

def block_name(first_epoch: int, end_epoch: int) -> str:
  """The directory of the block holding epochs ``[first_epoch, end_epoch)``."""
  return f"epochs-{first_epoch:04d}-{end_epoch:04d}"


def parse_block_name(name: str) -> tuple[int, int] | None:
  """``(first_epoch, end_epoch)`` of a block directory's name, or None if it is not one."""
  found = _BLOCK_RE.match(name)
  return None if found is None else (int(found.group(1)), int(found.group(2)))


def shard_name(first_update: int) -> str:
  """The file of the batch shard whose first update is ``first_update``."""
  return f"updates-{first_update:09d}.h5"


def body_digest(body: dict[str, Any]) -> str:
  """sha256 of a manifest's canonical JSON, without its ``digest`` entry."""
  rest = {k: v for k, v in body.items() if k != "digest"}
  text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def key_commitment(key: np.ndarray) -> str:
  """A hash of the 128-bit sampling key: names the key without revealing it."""
  words = np.asarray(key, np.uint64)
  if words.shape != (2,):
    raise ValueError(f"sampling key must be uint64[2], got shape {words.shape}")
  return hashlib.sha256(_COMMITMENT_TAG + words.astype("<u8").tobytes()).hexdigest()


# ------------------------------------------------------------------ privacy-unit layout
# The slot order of privacy-unit batches (``RunInfo.slot_order``): a reader refuses any other
# (an older layout gave every sampled unit k slots).
UNIT_SLOT_ORDER = ("the sampled units' kept rows packed contiguously, units in ascending unit "
                   "key (each unit's rows in fastdp_jax.data.units.group's order); mask int8: "
                   "2 at a unit's first row, 1 at its further rows, 0 for the padding after")
UNIT_FIRST, UNIT_MORE = 2, 1  # mask values of a unit's first and further rows


def unit_blocks(rows: int, block: int, k: int) -> int:
  """The blocks of ``block`` slots that next-fit packing (:func:`unit_positions`) always
  suffices with for at most ``rows`` rows in units of 1..k rows.

  Next-fit opens a new block only when the next unit (s <= k rows) does not fit, so a block
  it leaves holds more than ``block - s >= block - k`` rows, and the rows before the unit that
  would open block n + 1 number at least ``(n - 1)(block - k + 1) + block - s + 1``, plus its
  own s: more than ``(n - 1)(block - k + 1) + block``. So n blocks hold any sample of at most
  ``rows`` rows once ``(n - 1)(block - k + 1) + block >= rows``.
  """
  if block < k:
    raise ValueError(f"a block of {block} slots cannot hold a unit of k={k} rows")
  return 1 + -(-max(0, rows - block) // (block - k + 1))


def unit_positions(sizes: np.ndarray, block: int, num_blocks: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Next-fit packing of units into blocks, vectorised over the leading axes.

  Args:
    sizes: [..., U] int, each unit slot's kept rows in packing order (0 for an unused slot,
      after the used ones).
    block: slots per block: no unit straddles a multiple of it.
    num_blocks: the blocks available (the capacity is ``block * num_blocks``).

  Returns:
    ``(first [..., U], fits [...])``: each unit's first slot (its rows follow it; unused
    slots get some position, to be ignored) and whether every unit found room.
  """
  sizes = np.asarray(sizes, np.int64)
  ends = np.cumsum(sizes, axis=-1)
  starts = ends - sizes
  if num_blocks == 1:
    return starts, ends[..., -1] <= block
  first = np.zeros_like(sizes)
  base = np.zeros(sizes.shape[:-1], np.int64)  # rows of the units placed so far
  for b in range(num_blocks):
    # The units that fit in block b: those ending within ``block`` rows of ``base``.
    here = (starts >= base[..., None]) & (ends <= base[..., None] + block)
    first = np.where(here, b * block + starts - base[..., None], first)
    base = np.max(np.where(ends <= base[..., None] + block, ends, 0), axis=-1)
  return first, base == ends[..., -1]


def bytes_per_slot(num_features: int) -> int:
  """Disk bytes of one slot: features (float32), label (float32), mask (bool)."""
  return 4 * num_features + 4 + 1


# ------------------------------------------------------------------ manifests

@dataclasses.dataclass(frozen=True, kw_only=True)
class RunInfo:
  """The run manifest ``batches.json``: how the batches were drawn (written once).

  Attributes:
    dataset_digest: the source dataset's ``Manifest.digest()``.
    num_examples: N, the dataset's training rows (global row ids 0..N-1).
    batch_size: B, the expected batch size; ``sampling_rate = B / N``.
    epochs: E; ``total_updates = E * steps_per_epoch``.
    steps_per_epoch: ``max(1, round(N / B))``.
    total_updates: T, the updates of the whole run (all blocks).
    sampling_rate: q.
    expected_batch_size: ``q * N``.
    capacity: slots per update, ``sampling.capacity_for(N, q, overflow_probability)``.
    overflow_probability: per-update probability that a batch exceeds the capacity (the
      run's delta must include ``T * overflow_probability``).
    feature_names, label_name: the dataset's columns.
    sampling_fixed: True when the key came from ``--sampling-seed``: the batches are public
      and training from them has no privacy guarantee (``private: false``).
    key_commitment: :func:`key_commitment` of the sampling key.
    max_rows_per_unit: None for row-level batches (each row sampled on its own). For a
      privacy-unit dataset, its public bound k: the UNITS are sampled (``num_examples`` is
      U, the training units, and q = B / U), the sampled units' kept rows are packed
      contiguously in ascending unit key (:data:`UNIT_SLOT_ORDER`; the mask is int8: 2 at a
      unit's first row, 1 at its further rows, 0 for padding), and ``capacity`` counts row
      slots (:func:`fastdp_jax.dp.sampling.row_capacity_for` of the units' sizes). Written
      only when set, so a row-level manifest (and its digest) is as before.
    digest: :func:`body_digest` of the rest.
  """

  format_version: int
  dataset_digest: str
  num_examples: int
  batch_size: int
  epochs: int
  steps_per_epoch: int
  total_updates: int
  sampling_rate: float
  expected_batch_size: float
  capacity: int
  overflow_probability: float
  feature_names: tuple[str, ...]
  label_name: str
  sampling_fixed: bool
  key_commitment: str
  slot_order: str = ("rows of an update in increasing global row id (the train shards "
                     "concatenated in manifest order), then padding with mask False")
  inclusion: str = ("fastdp_jax.dp.sampling.inclusions: row i is in update t iff t is a partial "
                    "sum of row i's Geometric(q) gaps (Threefry-2x64-20 keyed by the sampling "
                    "key, counter (i, j))")
  producer: str = "preprocessing.poisson_batches"
  max_rows_per_unit: int | None = None
  digest: str = ""

  @property
  def num_features(self) -> int:
    return len(self.feature_names)

  @property
  def unit_size(self) -> int:
    """Slots per sampled example: k for unit batches, 1 for row-level ones."""
    return self.max_rows_per_unit or 1

  def to_json(self) -> dict[str, Any]:
    body = dataclasses.asdict(self)
    if self.max_rows_per_unit is None:  # a row-level run's manifest, unchanged
      del body["max_rows_per_unit"]
    body["feature_names"] = list(self.feature_names)
    body["digest"] = body_digest(body)
    return body

  @classmethod
  def from_json(cls, body: dict[str, Any], where: str) -> RunInfo:
    _check_digest(body, where)
    try:
      body = dict(body, feature_names=tuple(body["feature_names"]))
      run = cls(**body)
    except (KeyError, TypeError) as e:
      raise BatchError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
    _check_format(run.format_version, where)
    return run


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardEntry:
  """One batch shard: updates ``[first_update, first_update + num_updates)``."""

  file: str
  first_update: int
  num_updates: int
  sha256: str
  bytes: int

  @property
  def end_update(self) -> int:
    return self.first_update + self.num_updates


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockInfo:
  """A block manifest ``block.json``: the shards of updates ``[first_update, end_update)``.

  Attributes:
    name: the block's directory name (``epochs-FFFF-EEEE``).
    run_digest: the digest of the run manifest it belongs to.
    first_epoch, end_epoch: the epochs it holds, ``[first_epoch, end_epoch)``.
    first_update, end_update: ``first_epoch * steps_per_epoch`` and
      ``end_epoch * steps_per_epoch``.
    shards: in update order, tiling ``[first_update, end_update)``.
    extra: producer notes (Spark version, partitions, seconds).
  """

  name: str
  run_digest: str
  first_epoch: int
  end_epoch: int
  first_update: int
  end_update: int
  shards: tuple[ShardEntry, ...]
  format_version: int = FORMAT_VERSION
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  digest: str = ""

  def to_json(self) -> dict[str, Any]:
    body = dataclasses.asdict(self)
    body["shards"] = [dataclasses.asdict(s) for s in self.shards]
    body["digest"] = body_digest(body)
    return body

  @classmethod
  def from_json(cls, body: dict[str, Any], where: str) -> BlockInfo:
    _check_digest(body, where)
    try:
      shards = tuple(ShardEntry(**s) for s in body["shards"])
      block = cls(**dict(body, shards=shards))
    except (KeyError, TypeError) as e:
      raise BatchError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
    _check_format(block.format_version, where)
    return block


def _check_format(version: Any, where: str) -> None:
  """Refuses a manifest of another format version, saying how to get this one."""
  if version == FORMAT_VERSION:
    return
  if isinstance(version, int) and version < FORMAT_VERSION:
    # Not read as is: version 1's uint8 labels hold binary tasks only; rewriting is one job.
    raise BatchError(f"{where}: format_version {version} (an older preprocessing."
                     f"poisson_batches), this reader needs {FORMAT_VERSION}; rerun `python -m "
                     "preprocessing.poisson_batches` to write them again (a new --output, or "
                     "--overwrite of the whole directory)")
  raise BatchError(f"{where}: format_version {version!r} is not {FORMAT_VERSION} (written by "
                   "another version of fastdp_jax?); rerun `python -m "
                   "preprocessing.poisson_batches` with this version")


def _check_digest(body: Any, where: str) -> None:
  if not isinstance(body, dict) or not isinstance(body.get("digest"), str):
    raise BatchError(f"{where}: malformed manifest (no digest)")
  if body_digest(body) != body["digest"]:
    raise BatchError(f"{where}: contents do not match the manifest's digest (edited by hand or "
                     "corrupt); regenerate the batches with preprocessing.poisson_batches")


def _read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise BatchError(f"{os.path.dirname(path)}: no {os.path.basename(path)} (not a complete "
                     f"{what}; create it with `python -m preprocessing.poisson_batches`)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BatchError(f"{path}: unreadable manifest ({e})") from e


def write_json(path: str, body: dict[str, Any]) -> None:
  """Writes a manifest atomically (owner-only: a batch directory is as private as the data)."""
  atomic.write_json(path, body, mode=0o600)


def read_run(path: str | os.PathLike) -> RunInfo:
  """Parses and checks ``BATCHES/batches.json`` (and the key file against its commitment)."""
  path = os.fspath(path)
  where = os.path.join(path, RUN_MANIFEST)
  run = RunInfo.from_json(_read_json(where, "batch directory"), where)
  key_path = os.path.join(path, PRIVATE_DIR, KEY_FILE)
  if os.path.exists(key_path):
    key, _ = read_key(path)
    if key_commitment(key) != run.key_commitment:
      raise BatchError(f"{key_path}: the key does not match the commitment in {where} (a key "
                       "from another batch directory?)")
  return run


def read_block(path: str | os.PathLike, name: str, run: RunInfo) -> BlockInfo:
  """Parses and checks one block manifest against its run (not the shard files)."""
  where = os.path.join(os.fspath(path), name, BLOCK_MANIFEST)
  block = BlockInfo.from_json(_read_json(where, "batch block"), where)
  if block.name != name:
    raise BatchError(f"{where}: names block {block.name!r}, found in directory {name!r}")
  if block.run_digest != run.digest:
    raise BatchError(f"{where}: belongs to another run (run digest {block.run_digest[:12]}..., "
                     f"this directory's {run.digest[:12]}...); do not mix batch directories")
  spe = run.steps_per_epoch
  if not (0 <= block.first_epoch < block.end_epoch <= run.epochs
          and block.first_update == block.first_epoch * spe
          and block.end_update == block.end_epoch * spe):
    raise BatchError(f"{where}: epochs [{block.first_epoch}, {block.end_epoch}) and updates "
                     f"[{block.first_update}, {block.end_update}) do not fit the run's "
                     f"{run.epochs} epochs of {spe} updates")
  at = block.first_update
  for s in block.shards:
    manifest_lib.check_file_name(s.file, where)
    if s.file != shard_name(s.first_update) or s.first_update != at or s.num_updates < 1:
      raise BatchError(f"{where}: shard {s.file} (updates {s.first_update}+{s.num_updates}) "
                       f"does not continue at update {at}")
    at = s.end_update
  if at != block.end_update:
    raise BatchError(f"{where}: the shards end at update {at}, the block at {block.end_update}")
  return block


def write_key(directory: str, key: np.ndarray, fixed: bool) -> None:
  """Writes ``DIRECTORY/private/sampling_key.json`` (0600 in a 0700 directory)."""
  private = os.path.join(directory, PRIVATE_DIR)
  atomic.make_private_dir(private)
  words = [f"{int(w):016x}" for w in np.asarray(key, np.uint64)]
  atomic.write_private_file(os.path.join(private, KEY_FILE), json.dumps(
      {"key_words_hex": words, "fixed": bool(fixed), "commitment": key_commitment(key)}))


def read_key(directory: str | os.PathLike) -> tuple[np.ndarray, bool]:
  """The sampling key of a batch directory: ``(uint64[2], fixed)``."""
  path = os.path.join(os.fspath(directory), PRIVATE_DIR, KEY_FILE)
  body = _read_json(path, "batch directory's key file")
  try:
    key = np.array([int(w, 16) for w in body["key_words_hex"]], np.uint64)
    fixed = bool(body["fixed"])
  except (KeyError, TypeError, ValueError) as e:
    raise BatchError(f"{path}: malformed key file ({type(e).__name__})") from e
  if key.shape != (2,) or key_commitment(key) != body.get("commitment"):
    raise BatchError(f"{path}: malformed key file (commitment does not match)")
  return key, fixed


# ------------------------------------------------------------------ shard files

def write_shard(directory: str, first_update: int, features: np.ndarray, labels: np.ndarray,
                mask: np.ndarray) -> ShardEntry:
  """Writes one batch shard atomically (temporary name, then rename) and returns its entry.

  Args:
    directory: the block directory (a staging directory until it is published).
    first_update: the shard's first update.
    features: [k, capacity, F] float32.
    labels: [k, capacity] the task's labels (0/1, class indices or values), stored float32.
    mask: [k, capacity] bool, True for real rows; int8 in a privacy-unit run
      (:data:`UNIT_SLOT_ORDER`).

  Raises:
    OSError: if the file cannot be written (a full disk: ENOSPC, a file size limit: EFBIG);
      no partial file is left.
  """
  k, cap = mask.shape
  if features.shape[:2] != (k, cap) or labels.shape != (k, cap):
    raise ValueError(f"features {features.shape}, labels {labels.shape} and mask {mask.shape}"
                     " must share [updates, capacity]")
  name = shard_name(first_update)
  try:
    # The errno stays an OSError (the job reports it); a fresh staging directory holds no
    # killed writer's temporary files.
    with atomic.replacing_path(os.path.join(directory, name), 0o600, disk_full_error=False,
                               stale=False) as tmp:
      with h5py.File(tmp, "w") as f:
        f.attrs["first_update"] = np.int64(first_update)
        f.create_dataset("features", data=np.asarray(features, np.float32))
        f.create_dataset("labels", data=np.asarray(labels, np.float32))
        # int8 in a privacy-unit run (it marks each unit's first row), bool otherwise.
        f.create_dataset("mask", data=mask if mask.dtype == np.int8 else np.asarray(mask, bool))
      digest = data_lib.sha256_file(tmp)
      size = os.path.getsize(tmp)
  except BaseException as e:
    # h5py reports a write that fails while the file is closed (the disk filled) as a
    # RuntimeError carrying the errno: make it the OSError it is.
    found = re.search(r"errno = (\d+)", str(e)) if isinstance(e, RuntimeError) else None
    if found:
      raise OSError(int(found.group(1)), f"writing {name}: {os.strerror(int(found.group(1)))}"
                    ) from e
    raise
  return ShardEntry(file=name, first_update=int(first_update), num_updates=int(k),
                    sha256=digest, bytes=int(size))


def _check_shard_file(block_dir: str, entry: ShardEntry, run: RunInfo) -> None:
  """The file exists, its sha256 is the manifest's, its datasets have the manifest's shapes."""
  path = os.path.join(block_dir, entry.file)
  where = f"batch shard {os.path.join(os.path.basename(block_dir), entry.file)}"
  if not os.path.isfile(path):
    raise BatchError(f"{where}: file missing from {block_dir}")
  if os.path.dirname(os.path.realpath(path)) != os.path.realpath(block_dir):
    raise BatchError(f"{where}: a symlink leading outside its block directory")
  digest = data_lib.sha256_file(path)
  if digest != entry.sha256:
    size = os.path.getsize(path)
    raise BatchError(f"{where}: sha256 {digest[:12]}... does not match the manifest's "
                     f"{entry.sha256[:12]}... ({size} bytes, manifest says {entry.bytes}: "
                     "truncated, corrupt or replaced file)")
  shapes = {"features": ((entry.num_updates, run.capacity, run.num_features), np.float32),
            "labels": ((entry.num_updates, run.capacity), np.float32),
            "mask": ((entry.num_updates, run.capacity),
                     np.int8 if run.max_rows_per_unit else np.bool_)}
  try:
    with h5py.File(path, "r") as f:
      for name, (shape, dtype) in shapes.items():
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype != dtype:
          got = (ds.shape, ds.dtype) if isinstance(ds, h5py.Dataset) else "missing"
          raise BatchError(f"{where}: {name} is {got}, expected {shape} {np.dtype(dtype)}")
      if int(f.attrs.get("first_update", -1)) != entry.first_update:
        raise BatchError(f"{where}: holds updates from {f.attrs.get('first_update')}, the "
                         f"manifest says {entry.first_update}")
  except OSError as e:
    raise BatchError(f"{where}: unreadable ({e})") from e


def verify_block(path: str, block: BlockInfo, run: RunInfo, *, threads: int = 4) -> None:
  """Checks every shard file of a block (sha256 and structure); names the first bad one."""
  block_dir = os.path.join(path, block.name)
  # hashlib releases the GIL on large buffers: a few threads read several shards at once.
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    futures = [pool.submit(_check_shard_file, block_dir, s, run) for s in block.shards]
    for fut in futures:
      fut.result()


def block_dirs(path: str) -> list[str]:
  """The block directories (``epochs-FFFF-EEEE``) of the batch directory ``path``, by name."""
  return sorted(n for n in os.listdir(path)
                if parse_block_name(n) and os.path.isdir(os.path.join(path, n)))

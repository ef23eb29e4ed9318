"""Materialised Poisson batches on disk, and the reader that streams them in constant memory.

``python -m preprocessing.poisson_batches`` (a Spark job) evaluates the sampler's inclusion
function (:func:`fastdp_jax.dp.sampling.inclusions`) row by row, groups the rows by update and
writes every update's batch at a fixed capacity with a mask. Training then reads the batches
in update order, sequentially, instead of gathering a few hundred random rows per update: a
table larger than the memory of all hosts trains with the same Poisson sampling (and the
same epsilon) as the in-memory sampler, whose batch of update t holds the same rows.

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
zeros). A device's part of an update is a fixed slot range (:func:`split_for_devices`): a
public function of the slot order alone, never of the data.

Both manifests carry a ``digest`` of their own contents (a hand edit is refused), every block
names the run it belongs to (``run_digest``), and the run records a commitment (a hash) of
the sampling key, checked against the key file when it is present. :func:`open_batches`
checks all of this and every shard's sha256 before it returns, naming the shard at fault.
Blocks appended later (``--first-epoch``) are found and verified when the stream first needs
them; a consumed block may be deleted (``rm -rf BATCHES/epochs-0000-0002``) to bound disk.

The test split is not copied: evaluation streams the dataset's own test shards in row order
with :func:`iter_split` (no sampling is involved, so nothing needs materialising).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax import errors
from fastdp_jax.dp import release

# 2: labels are float32 (every task); version 1 stored them as uint8 (binary only).
FORMAT_VERSION = 2
RUN_MANIFEST = "batches.json"
BLOCK_MANIFEST = "block.json"
PRIVATE_DIR = "private"
KEY_FILE = "sampling_key.json"
_BLOCK_RE = re.compile(r"^epochs-(\d{4,})-(\d{4,})$")
_SHARD_RE = re.compile(r"^updates-(\d{9,})\.h5$")
_COMMITMENT_TAG = b"fastdp-jax sampling key commitment v1\0"
DEFAULT_READ_BYTES = 8 << 20  # bytes per background read (a piece); bounds host memory
DEFAULT_PREFETCH = 4  # pieces read ahead
# Keys ``open_batches(expected=...)`` may check, with what each one means.
EXPECTED_KEYS = {
    "dataset_digest": "the source dataset's identity (data.Manifest.digest())",
    "num_examples": "N, the training rows q and the updates were derived from",
    "batch_size": "the expected batch size B (q = B / N)",
    "epochs": "the number of epochs",
    "sampling_rate": "q",
    "total_updates": "T = epochs * max(1, round(N / B))",
    "overflow_probability": "the per-update overflow probability behind the capacity",
    "feature_names": "the feature columns",
    "label_name": "the label column",
}


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
  digest: str = ""

  @property
  def num_features(self) -> int:
    return len(self.feature_names)

  def to_json(self) -> dict[str, Any]:
    body = dataclasses.asdict(self)
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
    data_lib.check_file_name(s.file, where)
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
  release.make_private_dir(private)
  words = [f"{int(w):016x}" for w in np.asarray(key, np.uint64)]
  release.write_private_file(os.path.join(private, KEY_FILE), json.dumps(
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
    mask: [k, capacity] bool, True for real rows.

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
        f.create_dataset("mask", data=np.asarray(mask, bool))
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
            "mask": ((entry.num_updates, run.capacity), np.bool_)}
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


# ------------------------------------------------------------------ devices

def padded_capacity(capacity: int, num_devices: int) -> int:
  """The capacity rounded up to a multiple of ``num_devices``."""
  if num_devices < 1:
    raise ValueError(f"{num_devices=} must be positive")
  return -(-capacity // num_devices) * num_devices


def device_slots(capacity: int, num_devices: int, devices: tuple[int, int]) -> tuple[int, int]:
  """The slot range ``[lo, hi)`` of devices ``devices[0] .. devices[1] - 1`` of ``num_devices``.

  Device d holds slots ``[d * c, (d + 1) * c)`` with ``c = padded_capacity / num_devices``;
  a process passes its devices' range as ``device_slice`` to read only its part.
  """
  first, last = devices
  if not 0 <= first <= last <= num_devices:
    raise ValueError(f"{devices=} must be a range inside 0..{num_devices}")
  per = padded_capacity(capacity, num_devices) // num_devices
  return first * per, last * per


def split_for_devices(features: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                      num_devices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits the slots of a chunk among devices: device d gets ``[d*c, (d+1)*c)``.

  The slot axis is padded (mask False, zeros) to a multiple of ``num_devices``; which rows a
  device gets is a function of the slot order only (real rows by global row id, then
  padding), which is public. The Poisson batch is the union of the devices' parts.

  Args:
    features: [k, slots, F].
    labels: [k, slots].
    mask: [k, slots] bool.
    num_devices: D.

  Returns:
    ``(features [k, D, c, F], labels [k, D, c], mask [k, D, c])``, ``c = ceil(slots / D)``.
  """
  k, slots = mask.shape
  pad = padded_capacity(slots, num_devices) - slots
  if pad:
    features = np.pad(features, ((0, 0), (0, pad), (0, 0)))
    labels = np.pad(labels, ((0, 0), (0, pad)))
    mask = np.pad(mask, ((0, 0), (0, pad)))
  c = (slots + pad) // num_devices
  return (features.reshape(k, num_devices, c, features.shape[-1]),
          labels.reshape(k, num_devices, c), mask.reshape(k, num_devices, c))


# ------------------------------------------------------------------ the stream

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]


def dataset_identity(dataset: str | os.PathLike) -> dict[str, Any]:
  """What a trainer passes as ``open_batches(expected=...)`` for its dataset (plus B, E)."""
  m = data_lib.read_manifest(dataset)
  return {"dataset_digest": m.digest(), "num_examples": m.rows("train"),
          "feature_names": tuple(m.feature_names), "label_name": m.label_name}


def _scan_blocks(path: str) -> list[str]:
  return sorted(n for n in os.listdir(path)
                if parse_block_name(n) and os.path.isdir(os.path.join(path, n)))


class BatchStream:
  """A verified batch directory; reads any range of updates (use :func:`open_batches`).

  Attributes:
    path: the batch directory.
    run: its :class:`RunInfo`.
  """

  def __init__(self, path: str, run: RunInfo, blocks: Sequence[BlockInfo]):
    self.path = path
    self.run = run
    self._lock = threading.Lock()
    self._blocks: dict[str, BlockInfo] = {}
    for b in blocks:
      self._add_block(b)

  def __repr__(self) -> str:
    return (f"BatchStream({self.path!r}, q={self.q:.4g}, updates={self.total_updates}, "
            f"capacity={self.capacity}, available={self.available})")

  # Public values of the run (what the trainer configures from).
  q = property(lambda self: self.run.sampling_rate, doc="the sampling rate q")
  total_updates = property(lambda self: self.run.total_updates, doc="T, all blocks")
  capacity = property(lambda self: self.run.capacity, doc="slots per update")
  batch_size = property(lambda self: self.run.batch_size, doc="the expected batch size B")
  epochs = property(lambda self: self.run.epochs)
  steps_per_epoch = property(lambda self: self.run.steps_per_epoch)
  num_examples = property(lambda self: self.run.num_examples, doc="N (private)")
  overflow_probability = property(lambda self: self.run.overflow_probability)
  sampling_fixed = property(lambda self: self.run.sampling_fixed,
                            doc="True: batches from a public seed, the run is not private")
  key_commitment = property(lambda self: self.run.key_commitment)
  feature_names = property(lambda self: self.run.feature_names)
  label_name = property(lambda self: self.run.label_name)
  num_features = property(lambda self: self.run.num_features)
  dataset_digest = property(lambda self: self.run.dataset_digest)

  @property
  def available(self) -> tuple[tuple[int, int], ...]:
    """The update ranges ``[first, end)`` of the blocks verified so far."""
    with self._lock:
      return tuple((b.first_update, b.end_update)
                   for b in sorted(self._blocks.values(), key=lambda b: b.first_update))

  def _add_block(self, block: BlockInfo) -> None:
    for other in self._blocks.values():
      if block.first_update < other.end_update and other.first_update < block.end_update:
        raise BatchError(f"{self.path}: blocks {other.name} and {block.name} overlap")
    self._blocks[block.name] = block

  def refresh(self) -> None:
    """Finds blocks appended since the stream was opened and verifies them."""
    with self._lock:
      for name in _scan_blocks(self.path):
        if name not in self._blocks:
          block = read_block(self.path, name, self.run)
          verify_block(self.path, block, self.run)
          self._add_block(block)

  def _locate(self, update: int) -> tuple[BlockInfo, ShardEntry]:
    for attempt in range(2):
      with self._lock:
        for b in self._blocks.values():
          if b.first_update <= update < b.end_update:
            i = np.searchsorted([s.first_update for s in b.shards], update, side="right") - 1
            return b, b.shards[int(i)]
      if attempt == 0:
        self.refresh()
    spe = self.steps_per_epoch
    epoch = update // spe
    raise MissingUpdatesError(
        f"{self.path}: update {update} (epoch {epoch}) is in no block (present: "
        f"{list(self.available) or 'none'}); write it with `python -m "
        f"preprocessing.poisson_batches ... --first-epoch {epoch} --num-epochs-block G`")

  def _check_range(self, first_update: int, num_updates: int) -> None:
    if num_updates < 0 or first_update < 0 or first_update + num_updates > self.total_updates:
      raise ValueError(f"updates [{first_update}, {first_update + num_updates}) outside the "
                       f"run's {self.total_updates}")

  def _slice(self, device_slice: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = (0, self.capacity) if device_slice is None else map(int, device_slice)
    if not 0 <= lo <= hi:
      raise ValueError(f"{device_slice=} must be a slot range 0 <= lo <= hi")
    return lo, hi

  def piece_length(self, update: int, end: int, max_updates: int) -> int:
    """How many updates from ``update`` one read takes: at most ``max_updates``, within one
    shard, before ``end``."""
    _, shard = self._locate(update)
    return max(1, min(max_updates, shard.end_update - update, end - update))

  def read(self, first_update: int, num_updates: int, *,
           device_slice: tuple[int, int] | None = None, out: Chunk | None = None) -> Chunk:
    """Reads updates ``[first_update, first_update + num_updates)`` now (no prefetching).

    Args:
      first_update: the first update (any update: a resumed run seeks to it).
      num_updates: k.
      device_slice: ``(lo, hi)``, the slots to read (default all): a process's devices'
        part (:func:`device_slots`). Slots at or past the capacity are padding.
      out: arrays to read into (their first k rows), shaped as the result with at least k
        rows; default new ones.

    Returns:
      ``(features [k, hi - lo, F] float32, labels [k, hi - lo] float32,
      mask [k, hi - lo] bool)`` (views of ``out`` when given).

    Raises:
      MissingUpdatesError: if an update is in no block.
      BatchError: naming the shard, if a file cannot be read.
    """
    self._check_range(first_update, num_updates)
    lo, hi = self._slice(device_slice)
    width, real_hi = hi - lo, min(hi, self.capacity)
    if out is None:
      features = np.zeros((num_updates, width, self.num_features), np.float32)
      labels = np.zeros((num_updates, width), np.float32)
      mask = np.zeros((num_updates, width), bool)
    else:
      features, labels, mask = (a[:num_updates] for a in out)
      if (features.shape != (num_updates, width, self.num_features)
          or labels.shape != mask.shape or mask.shape != (num_updates, width)):
        raise ValueError(f"out arrays {[a.shape for a in out]} do not fit {num_updates} "
                         f"updates of {width} slots")
      pad = max(0, real_hi - lo)
      features[:, pad:] = 0
      labels[:, pad:] = 0
      mask[:, pad:] = False
    t, end = first_update, first_update + num_updates
    while t < end:
      block, shard = self._locate(t)
      n = min(end, shard.end_update) - t
      a, i = t - shard.first_update, t - first_update
      if real_hi > lo:
        path = os.path.join(self.path, block.name, shard.file)
        if not os.path.isfile(path):
          raise BatchError(f"batch shard {block.name}/{shard.file}: file missing (the block "
                           "was deleted after the stream was opened?)")
        try:
          with h5py.File(path, "r") as f:
            f["features"].read_direct(features, np.s_[a:a + n, lo:real_hi],
                                      np.s_[i:i + n, :real_hi - lo])
            labels[i:i + n, :real_hi - lo] = f["labels"][a:a + n, lo:real_hi]
            f["mask"].read_direct(mask, np.s_[a:a + n, lo:real_hi],
                                  np.s_[i:i + n, :real_hi - lo])
        except (OSError, KeyError) as e:
          raise BatchError(f"batch shard {block.name}/{shard.file}: unreadable ({e})") from e
      t += n
    return features, labels, mask

  def reader(self, first_update: int, end_update: int | None = None, *,
             device_slice: tuple[int, int] | None = None, prefetch: int = DEFAULT_PREFETCH,
             read_bytes: int = DEFAULT_READ_BYTES) -> Prefetcher:
    """A background reader of updates ``[first_update, end_update)`` (default: to the end).

    Take variable-length chunks in order with :meth:`Prefetcher.take`; close it (or use it
    as a context manager) when done.
    """
    end = self.total_updates if end_update is None else int(end_update)
    self._check_range(first_update, end - first_update)
    return Prefetcher(self, first_update, end, device_slice=self._slice(device_slice),
                      prefetch=prefetch, read_bytes=read_bytes)

  def chunks(self, first_update: int, num_updates: int, *, updates_per_chunk: int = 1,
             device_slice: tuple[int, int] | None = None,
             prefetch: int = DEFAULT_PREFETCH) -> Iterator[Chunk]:
    """Chunks of ``updates_per_chunk`` consecutive updates (the last may be shorter), read
    ahead by a background thread in a bounded queue.

    Yields:
      ``(features [k, w, F] float32, labels [k, w] float32, mask [k, w] bool)``, ``w`` the
      width of ``device_slice`` (default the capacity).
    """
    if updates_per_chunk < 1:
      raise ValueError(f"{updates_per_chunk=} must be positive")
    with self.reader(first_update, first_update + num_updates, device_slice=device_slice,
                     prefetch=prefetch) as r:
      left = num_updates
      while left:
        k = min(updates_per_chunk, left)
        yield r.take(k)
        left -= k


class Prefetcher:
  """Reads pieces of consecutive updates on a background thread into a fixed set of buffers.

  The thread fills ``prefetch + 1`` preallocated buffers of ``read_updates`` updates (about
  ``read_bytes`` each) in update order; :meth:`take` copies the updates asked for out of
  them and hands a buffer back once it is consumed. Host memory is therefore those buffers
  plus the chunk being taken: it depends on the capacity, the slot range and the number of
  features, never on N. Errors of the background thread are raised by :meth:`take` at the
  update where they occurred.
  """

  def __init__(self, stream: BatchStream, first_update: int, end_update: int, *,
               device_slice: tuple[int, int], prefetch: int, read_bytes: int):
    if prefetch < 1:
      raise ValueError(f"{prefetch=} must be positive")
    self._stream = stream
    self._slice = device_slice
    self.position = first_update  # the next update take() returns
    self.end_update = end_update
    width = device_slice[1] - device_slice[0]
    per_update = max(1, width * (4 * stream.num_features + 4 + 1))
    self.read_updates = max(1, min(int(read_bytes) // per_update, end_update - first_update))
    self.num_buffers = prefetch + 1
    self._free: queue.Queue = queue.Queue()
    for _ in range(self.num_buffers):
      self._free.put((np.zeros((self.read_updates, width, stream.num_features), np.float32),
                      np.zeros((self.read_updates, width), np.float32),
                      np.zeros((self.read_updates, width), bool)))
    self._filled: queue.Queue = queue.Queue()
    self._stop = threading.Event()
    self._pending: tuple[Chunk, int] | None = None  # (buffer, updates in it)
    self._offset = 0
    self._thread = threading.Thread(target=self._run, name="fastdp-batch-prefetch",
                                    daemon=True)
    self._thread.start()

  def _run(self) -> None:
    t = self.position
    try:
      while t < self.end_update:
        buf = None
        while buf is None:
          if self._stop.is_set():
            return
          try:
            buf = self._free.get(timeout=0.1)
          except queue.Empty:
            pass
        n = self._stream.piece_length(t, self.end_update, self.read_updates)
        self._stream.read(t, n, device_slice=self._slice, out=buf)
        self._filled.put(("data", buf, n))
        t += n
    except BaseException as e:  # pylint: disable=broad-except
      self._filled.put(("error", e, 0))

  def buffered_updates(self) -> int:
    """Updates read ahead and not yet taken (at most ``num_buffers * read_updates``)."""
    queued = sum(item[2] for item in list(self._filled.queue))
    pending = 0 if self._pending is None else self._pending[1] - self._offset
    return queued + pending

  def take(self, k: int) -> Chunk:
    """The next ``k`` updates: ``(features [k, w, F], labels [k, w], mask [k, w])``.

    The arrays are new (the caller may keep them); the reader's buffers are reused.
    """
    if self._stop.is_set():
      raise ValueError("take() on a closed reader")
    if k < 1 or self.position + k > self.end_update:
      raise ValueError(f"take({k}) at update {self.position}: the reader ends at "
                       f"{self.end_update}")
    width = self._slice[1] - self._slice[0]
    out = (np.empty((k, width, self._stream.num_features), np.float32),
           np.empty((k, width), np.float32), np.empty((k, width), bool))
    done = 0
    while done < k:
      if self._pending is None:
        kind, body, n = self._filled.get()
        if kind == "error":
          self.close()
          raise body
        self._pending, self._offset = (body, n), 0
      buf, n = self._pending
      c = min(k - done, n - self._offset)
      for dst, src in zip(out, buf):
        dst[done:done + c] = src[self._offset:self._offset + c]
      self._offset += c
      done += c
      if self._offset == n:
        self._free.put(buf)
        self._pending = None
    self.position += k
    return out

  def close(self) -> None:
    """Stops the background thread and drops what it read ahead."""
    self._stop.set()
    self._thread.join(timeout=30)
    self._pending = None

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _compare(run: RunInfo, expected: dict[str, Any]) -> list[str]:
  unknown = sorted(set(expected) - set(EXPECTED_KEYS))
  if unknown:
    raise ValueError(f"open_batches(expected=...): unknown keys {unknown}; known: "
                     f"{sorted(EXPECTED_KEYS)}")
  diffs = []
  for key, want in expected.items():
    have = getattr(run, key)
    if key == "feature_names":
      have, want = tuple(have), tuple(want)
    if have != want:
      shown = (lambda v: f"{v[:12]}...") if key == "dataset_digest" else repr
      diffs.append(f"{key}={shown(have)} (the run asks {shown(want)})")
  return diffs


def open_batches(path: str | os.PathLike, *, expected: dict[str, Any] | None = None,
                 threads: int = 4) -> BatchStream:
  """Opens a batch directory after verifying it completely.

  Checks, before returning (so before training starts): the run manifest (its digest, the key
  file against the key commitment), every block manifest (digest, run, update ranges, no
  overlap), every shard file (present, sha256, shapes), and the run against ``expected``.

  Args:
    path: the batch directory written by ``preprocessing.poisson_batches``.
    expected: what the trainer asks for: any of :data:`EXPECTED_KEYS` (e.g.
      ``dict(batch_stream.dataset_identity(dataset), batch_size=B, epochs=E)``); a run that
      differs is refused, naming every difference.
    threads: shards hashed at once.

  Returns:
    A :class:`BatchStream`.

  Raises:
    FileNotFoundError: no such directory.
    BatchMismatchError: the batches were made for another dataset, batch size, epochs, ...
    BatchError: naming the file, for a missing, truncated, corrupt or hand-edited file.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"batch directory {path} does not exist; write it with "
                            "`python -m preprocessing.poisson_batches --dataset DATASET --output "
                            f"{path} --batch-size B --epochs E`")
  run = read_run(path)
  if expected:
    diffs = _compare(run, expected)
    if diffs:
      raise BatchMismatchError(f"{path} was made for another run: " + "; ".join(diffs)
                               + "; write batches for this run with preprocessing.poisson_batches")
  blocks = [read_block(path, name, run) for name in _scan_blocks(path)]
  if not blocks:
    raise BatchError(f"{path}: no block of updates (epochs-*/); write one with "
                     "preprocessing.poisson_batches")
  for b in blocks:
    verify_block(path, b, run, threads=threads)
  return BatchStream(path, run, blocks)


def iter_split(dataset: str | os.PathLike, split: str = "test", *, chunk_rows: int = 65536,
               rows: tuple[int, int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streams a split of a dataset in row order, ``chunk_rows`` rows at a time (evaluation).

  Every shard of the split is checked against its sha256 once, first; each chunk is read as
  an HDF5 slice and its values checked (:func:`fastdp_jax.data.shards.load_split`), so host memory
  is one chunk whatever the split's size.

  Args:
    dataset: a dataset directory.
    split: ``'test'`` (or ``'train'``).
    chunk_rows: rows per chunk.
    rows: ``(start, stop)`` global rows of the split (a process's share); default all.

  Yields:
    ``(features [n, F] float32, labels [n] float32)``, ``n <= chunk_rows``.
  """
  dataset = os.fspath(dataset)
  m = data_lib.read_manifest(dataset)
  for info in m.shards_of(split):
    path = data_lib.shard_path(dataset, info)
    if data_lib.sha256_file(path) != info.sha256:
      raise data_lib.ShardError(f"shard {info.file}: sha256 does not match the manifest "
                                "(corrupt or replaced file)")
  start, stop = (0, m.rows(split)) if rows is None else rows
  for lo in range(start, stop, chunk_rows):
    part = data_lib.load_split(dataset, split, rows=(lo, min(stop, lo + chunk_rows)),
                               verify_checksum=False)
    yield part.features, part.labels

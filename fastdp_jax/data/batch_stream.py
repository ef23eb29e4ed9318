"""The reader of materialised Poisson batches: constant memory, in update order.

Training reads the batches that ``python -m preprocessing.poisson_batches`` wrote (the format
is :mod:`fastdp_jax.data.batch_format`'s) in update order, sequentially, instead of gathering a
few hundred random rows per update: a table larger than the memory of all hosts trains with
the same Poisson sampling (and the same epsilon) as the in-memory sampler, whose batch of
update t holds the same rows.

:func:`open_batches` checks the manifests, the key file against the run's key commitment and
every shard's sha256 before it returns, naming the shard at fault. Given the dataset the batches
were drawn from, every real row (mask True) is then checked as it is read, by the rule the
in-memory loader applies (:func:`fastdp_jax.data.manifest.check_values`: finite, inside the
dataset manifest's declared bounds, labels in its task's domain): a digest proves a shard is the
one its manifest names, not that whoever wrote the manifest wrote sound rows. Blocks appended later
(``--first-epoch``) are found and verified when the stream first needs them; a consumed block
may be deleted (``rm -rf BATCHES/epochs-0000-0002``) to bound disk. A shard file that changes
after it was verified (written to or replaced while a run is under way: its inode, size or
times differ) is hashed again before its rows are used, and refused, named, unless it still
matches its manifest: one ``stat`` per read otherwise.

A device's part of an update is a fixed slot range (:func:`split_for_devices`): a public
function of the slot order alone, never of the data. Privacy-unit batches (packed units, an
int8 mask) are repacked for the devices and microbatches instead
(:func:`split_units_for_devices`), so that no unit straddles two: a function of the units'
sizes, which the mask shows, and of the public device count and microbatch.

The test split is not copied: evaluation streams the dataset's own test shards in row order
with :func:`iter_split` (no sampling is involved, so nothing needs materialising).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from fastdp_jax.data import batch_format
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib

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
    "max_rows_per_unit": "the privacy unit's bound k (None: row-level batches)",
}


# ------------------------------------------------------------------ devices

def padded_capacity(capacity: int, num_devices: int, unit_size: int = 1) -> int:
  """The capacity rounded up to a multiple of ``num_devices * unit_size``.

  With unit batches (k = ``unit_size`` slots per sampled unit) every device's share is then
  whole units: a unit's clipped sum never straddles two devices.
  """
  if num_devices < 1 or unit_size < 1:
    raise ValueError(f"{num_devices=} and {unit_size=} must be positive")
  step = num_devices * unit_size
  return -(-capacity // step) * step


def device_slots(capacity: int, num_devices: int, devices: tuple[int, int],
                 unit_size: int = 1) -> tuple[int, int]:
  """The slot range ``[lo, hi)`` of devices ``devices[0] .. devices[1] - 1`` of ``num_devices``.

  Device d holds slots ``[d * c, (d + 1) * c)`` with ``c = padded_capacity / num_devices``
  (a multiple of ``unit_size``, the slots of one sampled unit); a process passes its
  devices' range as ``device_slice`` to read only its part.
  """
  first, last = devices
  if not 0 <= first <= last <= num_devices:
    raise ValueError(f"{devices=} must be a range inside 0..{num_devices}")
  per = padded_capacity(capacity, num_devices, unit_size) // num_devices
  return first * per, last * per


def unit_device_capacity(capacity: int, num_devices: int, k: int, block: int | None) -> int:
  """Row slots per device that always hold an update of privacy-unit batches of
  ``capacity`` rows, its units repacked next-fit over the devices (:func:`split_units_for_
  devices`): whole blocks of ``block`` rows each, or without blocks the smallest P with
  ``(D - 1)(P - k + 1) + P >= capacity`` (each device a block of P,
  :func:`fastdp_jax.data.batch_format.unit_blocks`)."""
  if block is not None:
    blocks = batch_format.unit_blocks(capacity, block, k)
    return -(-blocks // num_devices) * block
  return max(k, -(-(capacity + (num_devices - 1) * (k - 1)) // num_devices))


def split_units_for_devices(features: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                            num_devices: int, k: int, block: int | None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Privacy-unit batches (packed units, ``mask`` int8) repacked for the devices.

  The units of each update keep their order and are packed next-fit into ``num_devices``
  devices of :func:`unit_device_capacity` slots, in blocks of ``block`` rows (or one block a
  device): no unit straddles two devices or two microbatches. On one device without blocks
  the layout is the written one (padded).

  Args:
    features: [K, slots, F]; labels [K, slots]; mask [K, slots] int8 (2 at a unit's first
      row, 1 at its further rows).
    num_devices: D.
    k: the bound on a unit's rows.
    block: the step's microbatch in rows, or None.

  Returns:
    ``(features [K, D, P, F], labels [K, D, P], mask [K, D, P])``.

  Raises:
    BatchError: an update holds more rows than its capacity (a corrupt directory).
  """
  steps, slots = mask.shape
  per = unit_device_capacity(slots, num_devices, k, block)
  size = block or per
  first = mask == batch_format.UNIT_FIRST
  rank = np.cumsum(first, axis=1) - 1  # the unit of each slot in its update
  t, s = np.nonzero(mask > 0)
  unit = rank[t, s]
  sizes = np.zeros((steps, max(1, int(first.sum(axis=1).max(initial=0)))), np.int64)
  np.add.at(sizes, (t, unit), 1)
  start = np.zeros_like(sizes)  # each unit's first slot as written
  ft, fs = np.nonzero(first)
  start[ft, rank[ft, fs]] = fs
  at, fits = batch_format.unit_positions(sizes, size, num_devices * per // size)
  if not fits.all():
    raise batch_format.BatchError(f"an update holds {int(sizes.sum(axis=1).max())} rows, "
                                  f"above the capacity {slots} of its batches (corrupt?)")
  new = at[t, unit] + s - start[t, unit]
  f = np.zeros((steps, num_devices * per) + features.shape[2:], features.dtype)
  y = np.zeros((steps, num_devices * per), labels.dtype)
  m = np.zeros((steps, num_devices * per), mask.dtype)
  f[t, new], y[t, new], m[t, new] = features[t, s], labels[t, s], mask[t, s]
  return (f.reshape((steps, num_devices, per) + features.shape[2:]),
          y.reshape(steps, num_devices, per), m.reshape(steps, num_devices, per))


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
FileState = tuple[int, int, int, int, int]


def _file_state(path: str) -> FileState | None:
  """What a write to the file at ``path``, or its replacement, changes (None: no file)."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _block_states(path: str, block: batch_format.BlockInfo) -> dict[str, FileState | None]:
  """Each shard file's state, taken BEFORE the block is hashed: a change during or after the
  hash then shows as a different state."""
  files = [os.path.join(path, block.name, s.file) for s in block.shards]
  return {f: _file_state(f) for f in files}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowRule:
  """What every real row of the batches must satisfy: the dataset manifest's value rule.

  Attributes:
    bounds: the features' declared public ``(lo, hi)``.
    feature_names: the columns, for the message.
    task: the labels' task.
    embeddings: the integer-id columns.
  """

  bounds: manifest_lib.Bounds
  feature_names: tuple[str, ...]
  task: manifest_lib.Task
  embeddings: tuple[manifest_lib.Embedding, ...]

  @classmethod
  def of_dataset(cls, dataset: str | os.PathLike, feature_bounds: Any = None) -> RowRule:
    """The rule of a dataset directory: its manifest's bounds (else ``feature_bounds``, the
    config's ``data.feature_bounds``), task and embeddings.

    Raises:
      ShardError: the manifest is unreadable, or declares no bounds and none are given.
    """
    m = manifest_lib.read_manifest(dataset)
    bounds = manifest_lib.resolve_bounds(m.feature_bounds, feature_bounds, m.num_features,
                                         f"{dataset} (a manifest without feature_bounds)")
    return cls(bounds=bounds, feature_names=m.feature_names, task=m.task,
               embeddings=m.embeddings)

  def check(self, where: str, features: np.ndarray, labels: np.ndarray, mask: np.ndarray,
            first_update: int, first_slot: int) -> None:
    """Checks the real rows of ``[k, w, F]`` features read from ``where``.

    Raises:
      batch_format.BatchError: naming ``where``, the column, the update and the slot.
    """
    updates, slots = np.nonzero(mask)
    if not len(updates):
      return
    try:
      manifest_lib.check_values(
          features[updates, slots], labels[updates, slots], bounds=self.bounds,
          feature_names=self.feature_names, where=where, task=self.task,
          embeddings=self.embeddings,
          row_name=lambda i: (f"update {first_update + int(updates[i])}, slot "
                              f"{first_slot + int(slots[i])}"))
    except manifest_lib.ShardError as e:
      raise batch_format.BatchError(
          f"{e} (not a row of the dataset: edited after it was written?); write the batches "
          "again with preprocessing.poisson_batches") from e


def dataset_identity(dataset: str | os.PathLike) -> dict[str, Any]:
  """What a trainer passes as ``open_batches(expected=...)`` for its dataset (plus B, E).

  For a privacy-unit dataset ``num_examples`` is U, its training units (counted from the
  train shards' unit keys: the bound k drops rows, never a whole unit), and
  ``max_rows_per_unit`` its k; None for a row-level dataset.
  """
  m = manifest_lib.read_manifest(dataset)
  n = m.rows("train")
  if m.privacy_unit:
    n = train_unit_count(dataset, m)
  return {"dataset_digest": m.digest(), "num_examples": n,
          "feature_names": tuple(m.feature_names), "label_name": m.label_name,
          "max_rows_per_unit": int(m.max_rows_per_unit) if m.privacy_unit else None}


def train_unit_count(dataset: str | os.PathLike, m: manifest_lib.Manifest) -> int:
  """U: the distinct unit keys of a unit dataset's train shards (8 bytes a row in memory)."""
  keys = [np.zeros(0, np.uint64)] + [data_lib.read_unit_keys(dataset, info)
                                     for info in m.shards_of("train")]
  return int(np.unique(np.concatenate(keys)).shape[0])


def _check_unit_kind(path: str, run: batch_format.RunInfo, dataset: str | os.PathLike,
                     m: manifest_lib.Manifest) -> None:
  """Refuses row-level batches for a unit dataset, and unit batches for a row-level one."""
  want = int(m.max_rows_per_unit) if m.privacy_unit else None
  if run.max_rows_per_unit == want and want is not None and (
      run.slot_order != batch_format.UNIT_SLOT_ORDER):
    raise batch_format.BatchMismatchError(
        f"{path} holds privacy-unit batches of an older layout (k slots per unit); write them "
        "again with this version's preprocessing.poisson_batches (a new --output)")
  if run.max_rows_per_unit == want:
    return
  have = ("row-level batches (each row sampled alone)" if run.max_rows_per_unit is None
          else f"privacy-unit batches (k={run.max_rows_per_unit})")
  asked = (f"a privacy-unit dataset (privacy_unit {list(m.privacy_unit)}, k={want})"
           if m.privacy_unit else "a row-level dataset")
  raise batch_format.BatchMismatchError(
      f"{path} holds {have} but data.path={os.fspath(dataset)} is {asked}; write its "
      "batches with preprocessing.poisson_batches --dataset on that dataset")


class BatchStream:
  """A verified batch directory; reads any range of updates (use :func:`open_batches`).

  Attributes:
    path: the batch directory.
    run: its :class:`fastdp_jax.data.batch_format.RunInfo`.
    rows: the rule every real row read is checked against (None: not checked).
  """

  def __init__(self, path: str, run: batch_format.RunInfo,
               blocks: Sequence[batch_format.BlockInfo], rows: RowRule | None = None, *,
               verified: dict[str, FileState | None] | None = None):
    self.path = path
    self.run = run
    self.rows = rows
    self._lock = threading.Lock()
    self._blocks: dict[str, batch_format.BlockInfo] = {}
    # Shard file -> its state when its sha256 was checked (none: checked at its first read).
    self._verified: dict[str, FileState | None] = dict(verified or {})
    for b in blocks:
      self._add_block(b)

  def __repr__(self) -> str:
    return (f"BatchStream({self.path!r}, q={self.q:.4g}, updates={self.total_updates}, "
            f"capacity={self.capacity}, available={self.available})")

  # Public values of the run (what the trainer configures from).
  q = property(lambda self: self.run.sampling_rate, doc="the sampling rate q")
  total_updates = property(lambda self: self.run.total_updates, doc="T, all blocks")
  capacity = property(lambda self: self.run.capacity, doc="slots per update")
  mask_dtype = property(lambda self: np.dtype(np.int8 if self.run.max_rows_per_unit else bool),
                        doc="int8 for privacy-unit batches (packed units), bool otherwise")
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

  def _add_block(self, block: batch_format.BlockInfo) -> None:
    for other in self._blocks.values():
      if block.first_update < other.end_update and other.first_update < block.end_update:
        raise batch_format.BatchError(
            f"{self.path}: blocks {other.name} and {block.name} overlap")
    self._blocks[block.name] = block

  def refresh(self) -> None:
    """Finds blocks appended since the stream was opened and verifies them."""
    with self._lock:
      for name in batch_format.block_dirs(self.path):
        if name not in self._blocks:
          block = batch_format.read_block(self.path, name, self.run)
          states = _block_states(self.path, block)
          batch_format.verify_block(self.path, block, self.run)
          self._add_block(block)
          self._verified.update(states)

  def _locate(self, update: int) -> tuple[batch_format.BlockInfo, batch_format.ShardEntry]:
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
    raise batch_format.MissingUpdatesError(
        f"{self.path}: update {update} (epoch {epoch}) is in no block (present: "
        f"{list(self.available) or 'none'}); write it with `python -m "
        f"preprocessing.poisson_batches ... --first-epoch {epoch} --num-epochs-block G`")

  def _check_unchanged(self, block: batch_format.BlockInfo, shard: batch_format.ShardEntry,
                       path: str) -> None:
    """Hashes a shard again if its file changed since it was verified; refuses a changed one.

    :func:`open_batches` hashed every shard before the first update, but a run reads a shard
    hours later: a file written to or replaced meanwhile would give the run other rows than
    its batches, silently. A changed state (:func:`_file_state`) costs one hash, here in the
    reader's thread; an unchanged one a ``stat``.

    Raises:
      batch_format.BatchError: naming the file, if it no longer matches its manifest.
    """
    state = _file_state(path)
    with self._lock:
      if state is not None and self._verified.get(path) == state:
        return
    try:
      digest = data_lib.sha256_file(path)
    except OSError as e:
      raise batch_format.BatchError(f"batch shard {path}: unreadable ({e})") from e
    if digest != shard.sha256:
      raise batch_format.BatchError(
          f"batch shard {path}: changed on disk after it was verified (sha256 {digest[:12]}... "
          f"is not the {block.name} manifest's {shard.sha256[:12]}...); restore the file, or "
          "write the block again with preprocessing.poisson_batches, then run the same command"
          " (a trainer resumes from its last checkpoint)")
    with self._lock:
      self._verified[path] = state

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
      batch_format.MissingUpdatesError: if an update is in no block.
      batch_format.BatchError: naming the shard, if a file cannot be read or (with
        :attr:`rows`) a real row breaks the dataset's rule (naming the update and slot).
    """
    self._check_range(first_update, num_updates)
    lo, hi = self._slice(device_slice)
    width, real_hi = hi - lo, min(hi, self.capacity)
    if out is None:
      features = np.zeros((num_updates, width, self.num_features), np.float32)
      labels = np.zeros((num_updates, width), np.float32)
      mask = np.zeros((num_updates, width), self.mask_dtype)
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
          raise batch_format.BatchError(
              f"batch shard {block.name}/{shard.file}: file missing (the block was deleted "
              "after the stream was opened?)")
        self._check_unchanged(block, shard, path)
        try:
          with h5py.File(path, "r") as f:
            f["features"].read_direct(features, np.s_[a:a + n, lo:real_hi],
                                      np.s_[i:i + n, :real_hi - lo])
            labels[i:i + n, :real_hi - lo] = f["labels"][a:a + n, lo:real_hi]
            f["mask"].read_direct(mask, np.s_[a:a + n, lo:real_hi],
                                  np.s_[i:i + n, :real_hi - lo])
        except (OSError, KeyError) as e:
          raise batch_format.BatchError(
              f"batch shard {block.name}/{shard.file}: unreadable ({e})") from e
        self._check_unchanged(block, shard, path)  # again: a write during the read
        if self.rows is not None:
          w = real_hi - lo
          self.rows.check(f"batch shard {block.name}/{shard.file}", features[i:i + n, :w],
                          labels[i:i + n, :w], mask[i:i + n, :w], t, lo)
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
    per_update = max(1, width * batch_format.bytes_per_slot(stream.num_features))
    self.read_updates = max(1, min(int(read_bytes) // per_update, end_update - first_update))
    self.num_buffers = prefetch + 1
    self._free: queue.Queue = queue.Queue()
    for _ in range(self.num_buffers):
      self._free.put((np.zeros((self.read_updates, width, stream.num_features), np.float32),
                      np.zeros((self.read_updates, width), np.float32),
                      np.zeros((self.read_updates, width), stream.mask_dtype)))
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
           np.empty((k, width), np.float32), np.empty((k, width), self._stream.mask_dtype))
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


def _compare(run: batch_format.RunInfo, expected: dict[str, Any]) -> list[str]:
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
                 threads: int = 4, dataset: str | os.PathLike | None = None,
                 feature_bounds: Any = None) -> BatchStream:
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
    dataset: the dataset directory the batches were drawn from (the trainer's ``data.path``):
      the batches must be its (its digest), and every real row read from them is checked
      against its manifest's bounds, task and embeddings (:class:`RowRule`), as the loader
      checks the rows it holds in memory. None: the values are not checked (tools that only
      inspect the batches).
    feature_bounds: ``data.feature_bounds``, for a dataset whose manifest declares none.

  Returns:
    A :class:`BatchStream`.

  Raises:
    FileNotFoundError: no such directory.
    batch_format.BatchMismatchError: the batches were made for another dataset, batch size,
      epochs, ...
    batch_format.BatchError: naming the file, for a missing, truncated, corrupt or hand-edited
      file.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"batch directory {path} does not exist; write it with "
                            "`python -m preprocessing.poisson_batches --dataset DATASET --output "
                            f"{path} --batch-size B --epochs E`")
  run = batch_format.read_run(path)
  rows = None
  if dataset is not None:
    rows = RowRule.of_dataset(dataset, feature_bounds)
    m = manifest_lib.read_manifest(dataset)
    _check_unit_kind(path, run, dataset, m)
    expected = dict(expected or {}, dataset_digest=m.digest())
  if expected:
    diffs = _compare(run, expected)
    if diffs:
      raise batch_format.BatchMismatchError(
          f"{path} was made for another run: " + "; ".join(diffs)
          + "; write batches for this run with preprocessing.poisson_batches")
  blocks = [batch_format.read_block(path, name, run)
            for name in batch_format.block_dirs(path)]
  if not blocks:
    raise batch_format.BatchError(f"{path}: no block of updates (epochs-*/); write one with "
                                  "preprocessing.poisson_batches")
  states: dict[str, FileState | None] = {}
  for b in blocks:
    states.update(_block_states(path, b))
    batch_format.verify_block(path, b, run, threads=threads)
  return BatchStream(path, run, blocks, rows, verified=states)


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
  m = manifest_lib.read_manifest(dataset)
  for info in m.shards_of(split):
    path = data_lib.shard_path(dataset, info)
    if data_lib.sha256_file(path) != info.sha256:
      raise manifest_lib.ShardError(f"shard {info.file}: sha256 does not match the manifest "
                                    "(corrupt or replaced file)")
  start, stop = (0, m.rows(split)) if rows is None else rows
  for lo in range(start, stop, chunk_rows):
    part = data_lib.load_split(dataset, split, rows=(lo, min(stop, lo + chunk_rows)),
                               verify_checksum=False)
    yield part.features, part.labels

"""Poisson sampling as a per-example decision, on the host, padded to a fixed capacity.

Every training example is included in update t independently with probability q: this is the
sampling the accountant assumes. Whether example i (its *global row id*) is in update t is a
function of the secret sampling key, i, t and q only -- not of N, of the other rows or of the
topology. Adding or removing a row therefore changes no other row's batches, every device and
process agrees on every batch, and a Spark job can evaluate the same function row by row.

Each row's updates are a renewal process: the gaps between its consecutive updates are
i.i.d. Geometric(q) on {1, 2, ...}, which makes its inclusions i.i.d. Bernoulli(q) across
updates. The j-th gap of row i is drawn from uniform number j of row i, given by a
counter-based generator (Threefry-2x64-20, Salmon et al. 2011) keyed by the 128-bit sampling
key with counter (i, j // 2): no state is shared between rows, and the cost is proportional to
the number of inclusions plus a scan of the rows per block of updates, not to N per update.
Threefry is written here in NumPy because NumPy's own generators take one key at a time and
JAX's keys are 64 bits; the key is secret and never leaves the process (see docs/privacy.md).

Batches are padded to a fixed per-device capacity with a mask, so the compiled step never
recompiles. The capacity is a Binomial quantile chosen so that one device's batch overflows
with probability below ``overflow_probability`` per update; an overflow raises
:class:`BatchOverflowError` (never drops examples), and the run's stated delta includes the
union bound ``updates * devices * overflow_probability`` (:func:`overflow_delta`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
from scipy import stats

from fastdp_jax import errors

DEFAULT_OVERFLOW_PROBABILITY = 1e-10
# Updates generated per block of the in-memory sampler (a cost knob: it does not change the
# batches, which are a function of (key, row, update) alone).
BLOCK_UPDATES = 1024
_KEY_WORDS = 2  # uint64 words: 128 bits


class BatchOverflowError(errors.UserError):
  """A Poisson batch exceeded the fixed capacity (never silently truncated)."""


# --- Threefry-2x64-20 ------------------------------------------------------------------------
_ROTATIONS = (16, 42, 12, 31, 16, 32, 24, 21)
_PARITY = np.uint64(0x1BD11BDAA9FC1A22)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
  return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def threefry2x64(key: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Threefry-2x64 with 20 rounds: two uint64 outputs per (c0, c1) counter pair.

  Args:
    key: uint64[2], the 128-bit key.
    c0, c1: uint64 arrays of the same shape, the counter words.

  Returns:
    Two uint64 arrays of that shape (Random123's ``threefry2x64_20``).
  """
  k0, k1 = np.uint64(key[0]), np.uint64(key[1])
  ks = (k0, k1, _PARITY ^ k0 ^ k1)
  x0 = np.asarray(c0, np.uint64) + ks[0]
  x1 = np.asarray(c1, np.uint64) + ks[1]
  for r in range(20):
    x0 = x0 + x1
    x1 = _rotl(x1, _ROTATIONS[r % 8]) ^ x0
    if r % 4 == 3:
      s = r // 4 + 1
      x0 = x0 + ks[s % 3]
      x1 = x1 + ks[(s + 1) % 3] + np.uint64(s)
  return x0, x1


def uniforms(key: np.ndarray, rows: np.ndarray, draws: np.ndarray) -> np.ndarray:
  """Uniform number ``draws[k]`` of row ``rows[k]``, in (0, 1], as float64."""
  rows = np.asarray(rows, np.uint64)
  draws = np.asarray(draws, np.uint64)
  out0, out1 = threefry2x64(key, rows, draws >> np.uint64(1))
  bits = np.where((draws & np.uint64(1)) == 0, out0, out1)
  return ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))


def geometric_gaps(key: np.ndarray, rows: np.ndarray, draws: np.ndarray,
                   sampling_rate: float) -> np.ndarray:
  """Gap number ``draws[k]`` of row ``rows[k]``: Geometric(q) on {1, 2, ...}, int64."""
  if sampling_rate >= 1.0:
    return np.ones(np.shape(rows), np.int64)
  u = uniforms(key, rows, draws)
  # P(gap > g) = (1 - q)^g: inversion of the survival function.
  gaps = np.floor(np.log(u) / np.log1p(-sampling_rate)) + 1.0
  return np.minimum(gaps, 2.0**62).astype(np.int64)


def first_update(key: np.ndarray, rows: np.ndarray, sampling_rate: float) -> np.ndarray:
  """The first update (0-based) that each row is in."""
  return geometric_gaps(key, rows, np.zeros(np.shape(rows), np.int64), sampling_rate) - 1


def inclusions(key: np.ndarray, rows: np.ndarray, sampling_rate: float, end: int,
               start: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Every (row, update) with ``start <= update < end`` and the row in that update.

  The inclusion function of every path (the in-memory sampler, the Spark job that
  materialises batches): vectorised over ``rows`` (global row ids), each row's chain of
  geometric gaps followed from update 0.

  Returns:
    ``(rows, updates)``: int64 arrays of equal length, ordered by row then update.
  """
  rows = np.asarray(rows, np.int64)
  nxt = first_update(key, rows, sampling_rate)
  draws = np.ones(rows.shape, np.int64)
  out_r, out_t = [], []
  sel = np.flatnonzero(nxt < end)
  while sel.size:
    keep = sel[nxt[sel] >= start]
    out_r.append(rows[keep])
    out_t.append(nxt[keep])
    nxt[sel] += geometric_gaps(key, rows[sel], draws[sel], sampling_rate)
    draws[sel] += 1
    sel = sel[nxt[sel] < end]
  r = np.concatenate(out_r) if out_r else np.zeros(0, np.int64)
  t = np.concatenate(out_t) if out_t else np.zeros(0, np.int64)
  order = np.lexsort((t, r))
  return r[order], t[order]


def row_updates(key: np.ndarray, row: int, sampling_rate: float, end: int) -> np.ndarray:
  """Every update before ``end`` that global row ``row`` is in (the reference definition)."""
  out: list[int] = []
  t, j = -1, 0
  while True:
    t += int(geometric_gaps(key, np.array([row]), np.array([j]), sampling_rate)[0])
    j += 1
    if t >= end:
      return np.asarray(out, np.int64)
    out.append(t)


# --- keys --------------------------------------------------------------------------------------
def sampling_key(sampling_seed: int | None) -> tuple[np.ndarray, bool]:
  """The sampling key: 128 bits of OS entropy, or derived from a seed (reproducible, public).

  Returns:
    ``(uint64[2] key, fixed)``; ``fixed`` is True when the key came from a seed, in which case
    the batches are known to anyone who knows the seed and the run has no DP guarantee.
  """
  if sampling_seed is None:
    return np.frombuffer(os.urandom(8 * _KEY_WORDS), np.uint64).copy(), False
  if isinstance(sampling_seed, bool) or not isinstance(sampling_seed, (int, np.integer)):
    raise errors.ConfigError(f"dp.sampling_seed={sampling_seed!r} must be an integer")
  # A domain tag keeps the sampling key apart from a noise key made from the same integer.
  seq = np.random.SeedSequence([int(sampling_seed) & (2**64 - 1), 0x5A4D504C])
  return seq.generate_state(_KEY_WORDS, np.uint64), True


def capacity_for(num_examples: int, sampling_rate: float,
                 overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY) -> int:
  """Smallest c with P(Binomial(num_examples, sampling_rate) > c) <= overflow_probability."""
  if num_examples <= 0:
    return 1
  if overflow_probability >= 1e-15:
    c = stats.binom.isf(overflow_probability, num_examples, sampling_rate)
  else:
    # scipy's isf loses its precision below about 1e-16 (it returns N): bisect on the log of
    # the survival function instead, P(B > c) <= p, which is monotone in c.
    target = np.log(overflow_probability)
    lo, hi = int(num_examples * sampling_rate), num_examples
    while lo < hi:
      mid = (lo + hi) // 2
      if stats.binom.logsf(mid, num_examples, sampling_rate) <= target:
        hi = mid
      else:
        lo = mid + 1
    c = lo
  return int(max(1, min(num_examples, np.ceil(c))))


def _log_mgf(log_q: float, log_1mq: float, sizes: np.ndarray, counts: np.ndarray,
             lam: float) -> float:
  """log E[exp(lam * R)], R = sum over units of size * Bernoulli(q), counts[i] units of
  sizes[i] rows: each factor ``log(1 - q + q e^(lam s))`` as a stable logaddexp."""
  return float(np.sum(counts * np.logaddexp(log_1mq, log_q + lam * sizes)))


def chernoff_log_tail(counts: np.ndarray, sampling_rate: float, c: int) -> float:
  """A rigorous upper bound on log P(R > c), R the rows of a Poisson sample of units.

  ``counts[s]`` units have s rows; each unit is in the sample with probability q on its own,
  so R = sum_u s_u Bernoulli(q). R is an integer, so P(R > c) = P(R >= c + 1) <=
  exp(-lam (c + 1)) E[e^(lam R)] for every lam >= 0 (Markov on e^(lam R)), and
  E[e^(lam R)] = prod_s (1 - q + q e^(lam s))^counts[s] by independence. The exponent is
  convex in lam: its minimum is found by bisection on its derivative; any lam gives a valid
  bound, so an imprecise minimiser only loosens it.

  Returns:
    The bound's log (0 when c + 1 <= E[R]: no better bound than 1; -inf when c is at least
    the rows of every unit together, which R never exceeds).
  """
  counts = np.asarray(counts, np.float64)
  sizes = np.arange(len(counts), dtype=np.float64)
  total = float(np.dot(counts, sizes))
  q, a = float(sampling_rate), float(c) + 1.0
  if a > total:
    return -np.inf
  if a <= q * total or q >= 1.0:
    return 0.0
  log_q, log_1mq = math.log(q), math.log1p(-q)
  logit = log_q - log_1mq

  def slope(lam: float) -> float:  # d/dlam of the exponent: E_lam[R] - a, increasing in lam
    return float(np.dot(counts * sizes, 1.0 / (1.0 + np.exp(-(lam * sizes + logit))))) - a

  lo, hi = 0.0, 1.0
  while slope(hi) < 0 and hi < 1e6:
    lo, hi = hi, 2 * hi
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
  lam = 0.5 * (lo + hi)
  return min(0.0, _log_mgf(log_q, log_1mq, sizes, counts, lam) - lam * a)


def row_capacity_for(counts: np.ndarray, sampling_rate: float,
                     overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY) -> int:
  """Smallest c whose Chernoff bound (:func:`chernoff_log_tail`) on P(R > c) is at most
  ``overflow_probability``, R the rows of a Poisson sample of units.

  Args:
    counts: [k + 1] the exact unit-size histogram: ``counts[s]`` units of s rows (of one
      device: its own capacity, as :func:`capacity_for` takes a device's exact row count).
    sampling_rate: q, each unit's inclusion probability.
    overflow_probability: p.

  Returns:
    c >= 1, at most the rows of all the units (R never exceeds them: probability 0).
  """
  counts = np.asarray(counts, np.int64)
  total = int(np.dot(counts, np.arange(len(counts))))
  # A margin of 1e-9 in the log absorbs the float64 rounding of the bound's evaluation.
  target = math.log(overflow_probability) - 1e-9
  lo, hi = max(0, int(sampling_rate * total)), total  # the bound at hi is -inf: it holds
  while lo < hi:
    mid = (lo + hi) // 2
    if chernoff_log_tail(counts, sampling_rate, mid) <= target:
      hi = mid
    else:
      lo = mid + 1
  return max(1, lo)


# The share of the requested delta set aside for a batch overflowing its capacity; the
# accountant gets the rest.
OVERFLOW_SHARE = 0.01
# An epsilon above any run's, for a job that writes batches before the run that uses them
# plans its epsilon (the overflow term grows with e^epsilon).
MAX_PLANNED_EPSILON = 10.0


def automatic_overflow_probability(delta: float, total_steps: int, num_devices: int,
                                   epsilon: float = MAX_PLANNED_EPSILON) -> float:
  """Per-update, per-device overflow probability whose term in delta
  (:func:`overflow_delta`) is :data:`OVERFLOW_SHARE` of ``delta`` at ``epsilon``."""
  return min(DEFAULT_OVERFLOW_PROBABILITY,
             OVERFLOW_SHARE * delta / (overflow_factor(epsilon) * max(1, total_steps * num_devices)))


def overflow_factor(epsilon: float) -> float:
  """``1 + e^epsilon``: the mechanism that stops at an overflow differs from the ideal one
  (which never does) only on that event, of probability at most eta under both neighbours, so
  ``P[M'(D) in S] <= P[M(D) in S] + eta <= e^eps P[M(D') in S] + delta + eta
  <= e^eps P[M'(D') in S] + delta + (1 + e^eps) eta`` (docs/privacy.md, "delta")."""
  return 1.0 + math.exp(min(float(epsilon), 700.0))


def overflow_delta(overflow_probability: float, total_steps: int, num_devices: int,
                   epsilon: float) -> float:
  """The overflow's term in delta: ``(1 + e^epsilon) * eta``, eta the union bound
  ``p * T * D`` on any batch of the run overflowing its capacity."""
  return min(1.0, overflow_factor(epsilon) * overflow_probability * total_steps * num_devices)


@dataclasses.dataclass(frozen=True)
class PaddedBatches:
  """Per-device local indices of several steps, padded with a mask.

  Attributes:
    indices: [steps, num_shards, capacity] int32 row indices local to each shard
      (0 where padded).
    mask: [steps, num_shards, capacity] bool, True for real examples.
  """

  indices: np.ndarray
  mask: np.ndarray


class _ShardStream:
  """The inclusions of one shard's rows, generated block by block, in update order."""

  def __init__(self, key: np.ndarray, lo: int, hi: int, q: float,
               counters: np.ndarray | None = None):
    self.key, self.lo, self.q = key, lo, q
    # Each example's Threefry counter: its global id, or the id it was given (a unit key).
    self.rows = (np.arange(lo, hi, dtype=np.int64) if counters is None
                 else np.asarray(counters[lo:hi], np.uint64))
    self.reset()

  def reset(self) -> None:
    self.next = first_update(self.key, self.rows, self.q)  # each row's next update
    self.draws = np.ones(self.rows.shape, np.int64)  # uniforms each row has used
    self.block_start = self.block_end = 0
    self.block_t = self.block_rows = np.zeros(0, np.int64)

  def _advance(self) -> None:
    """Generates the inclusions of the next block of updates."""
    start, end = self.block_end, self.block_end + BLOCK_UPDATES
    ts, rs = [], []
    sel = np.flatnonzero(self.next < end)
    while sel.size:
      ts.append(self.next[sel])
      rs.append(sel)
      self.next[sel] += geometric_gaps(self.key, self.rows[sel], self.draws[sel], self.q)
      self.draws[sel] += 1
      sel = sel[self.next[sel] < end]
    t = np.concatenate(ts) if ts else np.zeros(0, np.int64)
    r = np.concatenate(rs) if rs else np.zeros(0, np.int64)
    order = np.lexsort((r, t))
    self.block_t, self.block_rows = t[order], r[order]
    self.block_start, self.block_end = start, end

  def local_indices(self, step: int) -> np.ndarray:
    """Sorted shard-local row indices of update ``step``."""
    if step < self.block_start:
      self.reset()  # a step before the current block (a resume): replay from the start
    while step >= self.block_end:
      self._advance()
    lo, hi = np.searchsorted(self.block_t, [step, step + 1])
    return self.block_rows[lo:hi]


class PoissonSampler:
  """Topology-independent Poisson sampler over ``num_examples`` global rows.

  Args:
    num_examples: N, the number of training rows (global row ids 0..N-1).
    expected_batch_size: the expected batch size; q = expected_batch_size / N.
    key: the sampling key: uint64[2] (see :func:`sampling_key`), or an integer seed
      (reproducible batches, for tests: such a run has no DP guarantee).
    shard_bounds: [num_shards + 1] increasing global row offsets; shard k (a device) holds
      rows ``shard_bounds[k]:shard_bounds[k+1]``. Default: one shard with every row.
    overflow_probability: per-step probability that a shard's batch exceeds its capacity.
    capacity_multiple: round the capacity up to a multiple of this (e.g. the microbatch
      size of chunked clipping, which must divide the padded batch).
    sampling_rate: q itself, when it is fixed by a public figure rather than by N.
    counters: [num_examples] uint64, the Threefry counter of each example instead of its
      global id (a unit dataset passes its unit keys, so that a unit's inclusions are a
      function of (key, unit key, update) alone, as the out-of-core job evaluates them);
      distinct values. Default: the global ids.
    capacity: a fixed capacity instead of the Binomial quantile (a unit run passes its row
      capacity: a unit has at least one row, so a batch of more units than that has more
      rows too, and only the row capacity's overflow event can happen).

  Example::

    >>> key, fixed = sampling_key(None)  # 128 bits of OS entropy: the batches are secret
    >>> sampler = PoissonSampler(10_000, 100, key)
    >>> b = sampler.batches(0, 4)  # 4 updates, padded to a fixed capacity with a mask
    >>> b.indices.shape == (4, 1, sampler.capacity), bool(b.mask.sum() > 0)
    (True, True)
  """

  def __init__(self, num_examples: int, expected_batch_size: float,
               key: np.ndarray | int, *,
               shard_bounds: np.ndarray | None = None,
               overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
               capacity_multiple: int | None = None,
               sampling_rate: float | None = None,
               counters: np.ndarray | None = None,
               capacity: int | None = None):
    if num_examples <= 0:
      raise ValueError(f"{num_examples=} must be positive")
    self.num_examples = int(num_examples)
    self.sampling_rate = (float(sampling_rate) if sampling_rate is not None
                          else float(expected_batch_size) / num_examples)
    if not 0 < self.sampling_rate <= 1:
      raise ValueError(f"sampling rate q = expected_batch_size / N = {expected_batch_size} / "
                       f"{num_examples} = {self.sampling_rate} must be in (0, 1]")
    if isinstance(key, (int, np.integer)):
      key = sampling_key(int(key))[0]
    self._key = np.asarray(key, np.uint64)
    if self._key.shape != (_KEY_WORDS,):
      raise ValueError(f"sampling key must be uint64[{_KEY_WORDS}], got {self._key.shape}")
    if shard_bounds is None:
      shard_bounds = np.array([0, num_examples])
    self.shard_bounds = np.asarray(shard_bounds, dtype=np.int64)
    if self.shard_bounds[0] != 0 or self.shard_bounds[-1] != num_examples or np.any(
        np.diff(self.shard_bounds) < 0):
      raise ValueError(f"shard_bounds {self.shard_bounds} must rise from 0 to {num_examples}")
    largest = int(np.diff(self.shard_bounds).max())
    self.overflow_probability = float(overflow_probability)
    self.capacity = (int(capacity) if capacity is not None
                     else capacity_for(largest, self.sampling_rate, overflow_probability))
    if capacity_multiple:
      self.capacity = -(-self.capacity // capacity_multiple) * capacity_multiple
    self._streams: dict[int, _ShardStream] = {}
    self._counters = None if counters is None else np.asarray(counters, np.uint64)
    if self._counters is not None and self._counters.shape != (self.num_examples,):
      raise ValueError(f"counters of shape {self._counters.shape}; expected "
                       f"({self.num_examples},)")

  def __repr__(self) -> str:  # never shows the key
    return (f"PoissonSampler(q={self.sampling_rate:.4g}, shards={self.num_shards}, "
            f"capacity={self.capacity})")

  @property
  def num_shards(self) -> int:
    return len(self.shard_bounds) - 1

  def _stream(self, shard: int) -> _ShardStream:
    if shard not in self._streams:
      self._streams[shard] = _ShardStream(self._key, int(self.shard_bounds[shard]),
                                          int(self.shard_bounds[shard + 1]), self.sampling_rate,
                                          self._counters)
    return self._streams[shard]

  def global_indices(self, step: int) -> np.ndarray:
    """Sorted global row indices of update ``step``'s Poisson batch."""
    return np.concatenate([self._stream(d).local_indices(step) + self.shard_bounds[d]
                           for d in range(self.num_shards)])

  def batches(self, first_step: int, num_steps: int,
              shards: Sequence[int] | None = None) -> PaddedBatches:
    """Padded per-shard local indices of steps ``first_step .. first_step + num_steps - 1``.

    Args:
      first_step: the first update.
      num_steps: how many updates.
      shards: the shards (devices) to fill, default all; the others stay empty (a process
        computes only its own devices' batches).

    Raises:
      BatchOverflowError: if a shard's batch exceeds the capacity.
    """
    cap, k = self.capacity, self.num_shards
    indices = np.zeros((num_steps, k, cap), np.int32)
    mask = np.zeros((num_steps, k, cap), bool)
    for d in (range(k) if shards is None else shards):
      stream = self._stream(d)
      for s in range(num_steps):
        local = stream.local_indices(first_step + s)
        if local.size > cap:
          # Probability below overflow_probability per update; counted in the stated delta.
          raise BatchOverflowError(
              f"update {first_step + s}: {local.size} examples sampled on device {d}, "
              f"capacity {cap}; lower dp.overflow_probability (now "
              f"{self.overflow_probability:g}) and rerun")
        indices[s, d, :local.size] = local
        mask[s, d, :local.size] = True
    return PaddedBatches(indices=indices, mask=mask)

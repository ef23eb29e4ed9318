"""Poisson sampling of training examples on the host, padded to a fixed capacity.

Each training example is included in step t's batch independently with probability
``q = expected_batch_size / N``: this is the sampling that the accountant assumes. The batch
size B_t ~ Binomial(N, q) is drawn first and then a uniform subset of that size, which is the
same distribution (Beltran et al. 2026, Lemma 1) and costs O(B_t) instead of O(N).

The batch of step t is a function of (sampling seed, t, N) only, computed with a
counter-based generator (Philox keyed by the seed and the step). Every process of a
multi-host run therefore agrees on the global batch, and whether example i is in it does not
depend on the number of devices or processes; each device keeps the indices that fall in its
own row range.

Batches are padded to a fixed per-device capacity with a mask, so the compiled step never
recompiles. The capacity is a Binomial quantile chosen so that overflow has probability below
``overflow_probability`` per step; an overflow raises :class:`BatchOverflowError`, it never
drops examples.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

DEFAULT_OVERFLOW_PROBABILITY = 1e-10


class BatchOverflowError(RuntimeError):
  """A Poisson batch exceeded the fixed capacity (never silently truncated)."""


def capacity_for(num_examples: int, sampling_rate: float,
                 overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY) -> int:
  """Smallest c with P(Binomial(num_examples, sampling_rate) > c) <= overflow_probability."""
  if num_examples <= 0:
    return 1
  c = stats.binom.isf(overflow_probability, num_examples, sampling_rate)
  return int(max(1, min(num_examples, np.ceil(c))))


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

  @property
  def batch_sizes(self) -> np.ndarray:
    return self.mask.sum(axis=(1, 2))


class PoissonSampler:
  """Topology-independent Poisson sampler over ``num_examples`` global rows.

  Args:
    num_examples: N, the number of training examples (public in the usual DP-SGD analysis
      only through q; it is never logged by the sampler).
    expected_batch_size: the expected batch size; q = expected_batch_size / N.
    seed: the sampling seed (independent of the noise key).
    shard_bounds: [num_shards + 1] increasing global row offsets; shard k (a device) holds
      rows ``shard_bounds[k]:shard_bounds[k+1]``. Default: one shard with every row.
    overflow_probability: per-step probability that a shard's batch exceeds its capacity.
    capacity_multiple: round the capacity up to a multiple of this (e.g. the microbatch
      size of chunked clipping, which must divide the padded batch).
  """

  def __init__(self, num_examples: int, expected_batch_size: float, seed: int, *,
               shard_bounds: np.ndarray | None = None,
               overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
               capacity_multiple: int | None = None):
    if num_examples <= 0:
      raise ValueError(f"{num_examples=} must be positive")
    self.num_examples = int(num_examples)
    self.sampling_rate = float(expected_batch_size) / num_examples
    if not 0 < self.sampling_rate <= 1:
      raise ValueError(f"sampling rate q = expected_batch_size / N = {expected_batch_size} / "
                       f"{num_examples} = {self.sampling_rate} must be in (0, 1]")
    self.seed = int(seed)
    if shard_bounds is None:
      shard_bounds = np.array([0, num_examples])
    self.shard_bounds = np.asarray(shard_bounds, dtype=np.int64)
    if self.shard_bounds[0] != 0 or self.shard_bounds[-1] != num_examples or np.any(
        np.diff(self.shard_bounds) < 0):
      raise ValueError(f"shard_bounds {self.shard_bounds} must rise from 0 to {num_examples}")
    largest = int(np.diff(self.shard_bounds).max())
    self.capacity = capacity_for(largest, self.sampling_rate, overflow_probability)
    if capacity_multiple:
      self.capacity = -(-self.capacity // capacity_multiple) * capacity_multiple

  @property
  def num_shards(self) -> int:
    return len(self.shard_bounds) - 1

  def global_indices(self, step: int) -> np.ndarray:
    """Sorted global row indices of step ``step``'s Poisson batch."""
    rng = np.random.Generator(np.random.Philox(key=[self.seed & (2**64 - 1), int(step)]))
    size = rng.binomial(self.num_examples, self.sampling_rate)
    idx = rng.choice(self.num_examples, size=size, replace=False, shuffle=False)
    idx.sort()
    return idx

  def batches(self, first_step: int, num_steps: int) -> PaddedBatches:
    """Padded per-shard local indices of steps ``first_step .. first_step + num_steps - 1``.

    Raises:
      BatchOverflowError: if a shard's batch exceeds the capacity.
    """
    cap, k = self.capacity, self.num_shards
    indices = np.zeros((num_steps, k, cap), np.int32)
    mask = np.zeros((num_steps, k, cap), bool)
    for s in range(num_steps):
      idx = self.global_indices(first_step + s)
      cuts = np.searchsorted(idx, self.shard_bounds)
      for d in range(k):
        local = idx[cuts[d]:cuts[d + 1]] - self.shard_bounds[d]
        if local.size > cap:
          raise BatchOverflowError(
              f"step {first_step + s}: {local.size} examples sampled on shard {d}, capacity "
              f"{cap}; rerun with a larger capacity (this has probability below 1e-10)")
        indices[s, d, :local.size] = local
        mask[s, d, :local.size] = True
    return PaddedBatches(indices=indices, mask=mask)

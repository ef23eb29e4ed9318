"""Training on a unit dataset (a privacy unit: person or household) through the real loop.

User-level sampling with a clipped sum per unit (fastdp_jax/unit_batches.py): each UNIT is in
an update with probability q = batch_size / U, its rows' summed gradient is clipped to C as a
whole, and the accountant, the DP count and delta's default count units. Checked here through
``train.train_and_evaluate``: q, N and epsilon are the units' (against ``dp_accounting``
directly), a unit of k rows never moves the clipped sum by more than C, the bound k is applied,
ghost = vmap, a resumed run equals the uninterrupted one, 1 device = 8 devices (the
multidevice suite). Materialised (streamed) unit batches: tests/test_units_streamed.py.
"""

import json
import os

import dp_accounting
import jax
import numpy as np
import optax
import pytest

from fastdp_jax import errors
from fastdp_jax import inputs as inputs_lib
from fastdp_jax import parallel
from fastdp_jax import step as step_lib
from fastdp_jax import train
from fastdp_jax import unit_batches
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import count as count_lib
from fastdp_jax.dp import release
from fastdp_jax.dp import sampling
from tests.conftest import make_config, make_dataset, make_unit_dataset

BATCH, K = 32, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  # Units of 1..6 rows with k = 4: the bound drops rows of the larger units.
  return make_unit_dataset(str(tmp_path_factory.mktemp("u") / "data"), units=700,
                           max_rows=K, max_size=6, seed=3)


def _units_and_rows(path):
  """(U, rows) of the train split, counted here from the stored unit keys."""
  keys = data_lib.load_split(path, "train").unit_keys
  return len(np.unique(keys)), len(keys)


def _keys_of(path):
  """(unit keys, row content keys) of the train split: :func:`units_lib.group`'s input."""
  split = data_lib.load_split(path, "train")
  return split.unit_keys, units_lib.row_content_keys(split.features, split.labels)


def _cfg(path, **overrides):
  return make_config(path, **{"batch_size": BATCH, **overrides})


def _params(workdir):
  saved = np.load(os.path.join(workdir, "final_params.npz"))
  return {k: saved[k] for k in saved.files}


def _assert_params_close(a, b, rel):
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=rel * np.abs(a[k]).max())


def _random_layout(rng, k, units_per_device):
  """A unit layout of ``len(units_per_device)`` devices, units of 1..k rows."""
  sizes = rng.integers(1, k + 1, size=sum(units_per_device))
  bounds = np.r_[0, np.cumsum(units_per_device)]
  starts = np.concatenate([np.r_[0, np.cumsum(sizes[a:b])[:-1]] if b > a else []
                           for a, b in zip(bounds[:-1], bounds[1:])]).astype(np.int64)
  return parallel.UnitLayout(unit_size=k, unit_bounds=bounds, starts=starts, sizes=sizes,
                             keys=np.arange(len(sizes), dtype=np.uint64))


def packed_units(indices, mask):
  """The units of one packed block: ``[(first slot, indices of its rows)]``, checking the
  layout: an int8 mask, each unit a 2 followed by its 1s (never a 1 after padding or at the
  start)."""
  assert mask.dtype == np.int8 and set(np.unique(mask)) <= {0, 1, 2}
  more = np.flatnonzero(mask == 1)
  assert (more > 0).all() and (mask[more - 1] > 0).all(), "a unit's rows are not contiguous"
  firsts = np.flatnonzero(mask == 2)
  out = []
  for a in firsts:
    b = a + 1
    while b < len(mask) and mask[b] == 1:
      b += 1
    out.append((int(a), indices[a:b].tolist()))
  return out


@pytest.mark.parametrize("block", [None, 8, 11])
def test_pack_lays_each_sampled_units_kept_rows_out_once_contiguously(block):
  # Every sampled unit's rows appear exactly once, contiguous, in the sampler's order, never
  # straddling a multiple of the block, within the capacity; padding is 0 with index 0.
  rng = np.random.default_rng(block or 0)
  k = 5
  layout = _random_layout(rng, k, [40, 0, 55, 23])  # a device without units too
  sampler = sampling.PoissonSampler(len(layout.sizes), 12, 3, shard_bounds=layout.unit_bounds,
                                    counters=layout.keys)
  rows, capacity = unit_batches.row_capacity(layout, sampler.sampling_rate, 1e-6, block)
  b = sampler.batches(0, 30)
  idx, mask = unit_batches.pack(b, layout, capacity, block)
  assert idx.shape == mask.shape == (30, 4, capacity) and idx.dtype == np.int32
  size = block or capacity
  # Whole microbatches, or (none) whole blocks of k rows, ghost clipping's view of the slots.
  assert capacity % size == 0 and capacity % (block or k) == 0
  assert rows <= capacity
  seen = 0
  for s in range(30):
    for d in range(4):
      units = b.indices[s, d][b.mask[s, d]] + layout.unit_bounds[d]
      got = packed_units(idx[s, d], mask[s, d])
      assert (idx[s, d][mask[s, d] == 0] == 0).all()  # padding reads row 0
      assert len(got) == len(units)
      for (first, row_idx), u in zip(got, units):
        want = list(range(layout.starts[u], layout.starts[u] + layout.sizes[u]))
        assert row_idx == want  # all its kept rows, once, in order
        assert first // size == (first + len(want) - 1) // size  # inside one block
        seen += 1
  assert seen > 100


def test_pack_refuses_units_beyond_the_capacity():
  layout = _random_layout(np.random.default_rng(1), 3, [20])
  b = sampling.PoissonSampler(20, 20, 0, counters=layout.keys).batches(0, 1)  # q = 1
  total = int(layout.sizes.sum())
  idx, _ = unit_batches.pack(b, layout, total)  # exactly full: fits
  assert idx.shape == (1, 1, total)
  with pytest.raises(sampling.BatchOverflowError, match=f"{total} rows sampled on device 0"):
    unit_batches.pack(b, layout, total - 1)


def test_next_fit_blocks_hold_every_sample_up_to_the_bound():
  # unit_blocks(c, m, k) blocks hold ANY sequence of units of 1..k rows with at most c rows in
  # all; with m >= 2k - 1, one block fewer fails for some such sequence (the bound is tight).
  from fastdp_jax.data import batch_format
  rng = np.random.default_rng(0)
  for m, k, c in ((8, 3, 30), (11, 5, 47), (6, 6, 20), (16, 4, 16), (16, 4, 17), (9, 5, 40)):
    n = batch_format.unit_blocks(c, m, k)
    sizes = rng.integers(1, k + 1, size=(4000, c))
    sizes[np.cumsum(sizes, axis=1) > c] = 0  # at most c rows each, unused slots after
    assert batch_format.unit_positions(sizes, m, n)[1].all(), (m, k, c)
    if n > 1 and m >= 2 * k - 1:
      # Blocks of m - k + 1 rows each, every one closed by a unit of k: c rows at most.
      seq = [1] * (m - k + 1) + ([k] + [1] * (m - 2 * k + 1)) * (n - 2) + [k]
      assert sum(seq) <= c
      assert not batch_format.unit_positions(np.array([seq]), m, n - 1)[1][0], (m, k, c)


def _exact_tail(counts, q):
  """P(R > c) for every c, R = sum of s * Bernoulli(q) over counts[s] units: the exact
  distribution by convolution."""
  dist = np.array([1.0])
  for s, n in enumerate(counts):
    for _ in range(n):
      nxt = np.zeros(len(dist) + s)
      nxt[:len(dist)] += (1 - q) * dist
      nxt[s:] += q * dist
      dist = nxt
  return np.r_[dist[::-1].cumsum()[::-1][1:], 0.0]  # tail[c] = P(R >= c + 1), c = 0..max R


@pytest.mark.parametrize("counts, q", [([0, 40, 30, 20, 10], 0.1), ([0, 5, 0, 0, 0, 0, 7], 0.3),
                                       ([0, 200, 100, 50, 30, 20, 10, 5, 3], 0.02)])
def test_the_row_capacity_bounds_the_exact_tail(counts, q):
  tail = _exact_tail(counts, q)
  total = len(tail) - 1  # every unit's rows: R never exceeds them
  for c in range(total + 1):  # the bound holds everywhere
    bound = np.exp(sampling.chernoff_log_tail(np.array(counts), q, c))
    assert tail[c] <= bound * (1 + 1e-9) + 1e-300, (c, tail[c], bound)
  for p in (1e-2, 1e-6, 1e-12):
    c = sampling.row_capacity_for(np.array(counts), q, p)
    exact = int(np.argmax(tail <= p))  # the exact quantile: the least any bound can give
    assert tail[c] <= p and exact <= c <= total
    # Not loose: the Chernoff slack is a couple of standard deviations at most.
    sd = np.sqrt(q * (1 - q) * np.dot(counts, np.arange(len(counts)) ** 2))
    assert c - exact <= 2 * sd, (c, exact, sd)


def test_a_units_batches_follow_its_key_so_removing_a_unit_moves_no_other():
  rng = np.random.default_rng(0)
  keys = np.sort(rng.integers(0, 2**64 - 1, size=300, dtype=np.uint64))
  full = sampling.PoissonSampler(300, 30, 7, counters=keys)
  less = sampling.PoissonSampler(299, 30, 7, counters=np.delete(keys, 100),
                                 sampling_rate=full.sampling_rate)
  others = np.delete(keys, 100)
  for t in range(50):
    a = set(keys[full.global_indices(t)].tolist()) - {int(keys[100])}
    assert a == set(others[less.global_indices(t)].tolist())


def test_q_n_delta_and_epsilon_count_units(dataset, tmp_path, monkeypatch):
  units, rows = _units_and_rows(dataset)
  assert rows > 2 * units  # so a q, N or delta taken from rows would differ
  seen = {}
  s = train.train_and_evaluate(_cfg(dataset), str(tmp_path / "w"),
                               inspect=lambda t, summary: seen.update(t=t))
  # The capacity counts ROWS, from the kept units' exact sizes; the sampler's unit capacity is
  # the same number (a unit has a row at least), so only the rows' overflow event can happen
  # and the overflow's term in delta is p T D as planned. The row slots are that many rounded
  # up to whole blocks of k (more slots only lower the chance of an overflow).
  t = seen["t"]
  sizes = np.diff(units_lib.group(*_keys_of(dataset), K).offsets)
  ub = t.data.dev.units.unit_bounds  # each device's units: its own exact sizes
  want = max(sampling.row_capacity_for(np.bincount(sizes[a:b], minlength=K + 1),
                                       s.sampling_rate, t.plan.overflow_probability)
             for a, b in zip(ub[:-1], ub[1:]))
  assert t.batches.sampler.capacity == want
  assert t.batches.capacity == -(-want // K) * K
  # Fewer row slots than k for every unit slot of the Binomial unit capacity (the old layout).
  assert want < K * sampling.capacity_for(int(np.diff(ub).max()), s.sampling_rate,
                                          t.plan.overflow_probability)
  assert t.plan.overflow_delta == sampling.overflow_delta(
      t.plan.overflow_probability, t.plan.total_steps, len(ub) - 1, t.plan.epsilon_bound)
  assert s.train_examples == s.planned_num_examples == units
  assert s.privacy_unit == ("household",) and s.max_rows_per_unit == K
  assert s.sampling_rate == BATCH / units
  assert s.steps == 2 * round(units / BATCH)
  # delta's default (below 1/U): the accountant's share of it, plus the overflow's term.
  requested = release.default_delta(units)
  assert s.accountant_delta == pytest.approx(requested * (1 - sampling.OVERFLOW_SHARE))
  assert s.delta <= requested
  assert release.default_delta(units) != release.default_delta(rows)
  sigma = s.noise_multiplier

  def epsilon(q):
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), s.steps))
    return acc.get_epsilon(s.accountant_delta)

  # The ledger's PLD and the accountant's event agree to well within the gap between the
  # unit-level q and the row-level one.
  want, by_rows = epsilon(BATCH / units), epsilon(BATCH / rows)
  assert s.training_epsilon == pytest.approx(want, rel=1e-6)
  assert abs(want - by_rows) > 1e-3 * want
  # Without a declared N, the DP count counts units (its sensitivity is one unit).
  seen = []
  real = count_lib.noisy_count
  monkeypatch.setattr(count_lib, "noisy_count",
                      lambda n, eps, rng: seen.append(n) or real(n, eps, rng))
  s2 = train.train_and_evaluate(_cfg(dataset, **{"data.num_examples_public": False}),
                                str(tmp_path / "counted"))
  assert seen == [units] and s2.num_examples_source == count_lib.DP_ESTIMATE


def _one_unit_dataset(path, rows_in_unit):
  """A train split of ONE unit (``rows_in_unit`` rows, aligned large gradients), k = K."""
  rng = np.random.default_rng(0)
  x = np.ones((rows_in_unit, 6), np.uint8)
  x[:, 0] = np.arange(rows_in_unit) % 2  # distinct rows, all with label 0
  y = np.zeros(rows_in_unit, np.uint8)
  xt = (rng.random((40, 6)) < 0.5).astype(np.uint8)
  yt = (rng.random(40) < 0.5).astype(np.uint8)
  test_keys = units_lib.unit_keys([[f"T{i // 2}" for i in range(40)]])
  with data_lib.DatasetWriter(path, feature_names=[f"f{i}" for i in range(6)],
                              label_name="y", feature_bounds=(0, 1), privacy_unit="person",
                              max_rows_per_unit=K) as w:
    w.add("train", x, y, unit_keys=units_lib.unit_keys([["P1"] * rows_in_unit]))
    w.add("test", xt, yt, unit_keys=test_keys)
  return path


@pytest.mark.parametrize("clipping", ["vmap", "ghost"])
def test_a_unit_of_k_rows_never_moves_the_clipped_sum_by_more_than_c(tmp_path, monkeypatch,
                                                                     clipping):
  # One unit (q = 1: in every update) of 6 rows whose gradients are aligned and far above C:
  # clipped row by row they would sum to k C; clipped as a unit, to C exactly.
  path = _one_unit_dataset(str(tmp_path / "one"), rows_in_unit=6)
  seen = []
  real = step_lib.clipping.make_clipped_sum

  def spy(*args, **kwargs):
    fn = real(*args, **kwargs)

    def wrapped(params, batch, mask):
      grads, stats = fn(params, batch, mask)
      jax.debug.callback(lambda n, m: seen.append((float(n), int(m))),
                         optax.tree.norm(grads), (mask > 0).sum())  # the rows kept
      return grads, stats
    return wrapped

  monkeypatch.setattr(step_lib.clipping, "make_clipped_sum", spy)
  clip = 1e-3
  s = train.train_and_evaluate(
      _cfg(path, **{"batch_size": 1, "dp.l2_norm_clip": clip, "dp.clipping": clipping}),
      str(tmp_path / "w"))
  assert s.sampling_rate == 1.0 and s.steps == 2
  real_calls = [(n, m) for n, m in seen if m]  # microbatches holding a real row
  assert len(real_calls) == s.steps
  for norm, rows in real_calls:
    assert rows == K  # the bound: 4 of the unit's 6 rows
    # float32 norms: the clipped sum is C up to rounding (a relative 1e-5 is 80 ulps).
    assert clip * (1 - 1e-5) <= norm <= clip * (1 + 1e-5)


def test_ghost_equals_vmap_through_the_loop(dataset, tmp_path):
  runs = {}
  for method in ("vmap", "ghost"):
    runs[method] = train.train_and_evaluate(
        _cfg(dataset, **{"dp.clipping": method, "dp.l2_norm_clip": 0.5}),
        str(tmp_path / method))
  assert runs["vmap"].epsilon == runs["ghost"].epsilon
  # The same batches and noise; the clipped sums differ by float32 summation order only.
  _assert_params_close(_params(tmp_path / "vmap"), _params(tmp_path / "ghost"), 1e-4)


def test_microbatches_hold_whole_units(dataset, tmp_path):
  # A padding microbatch of 10 rows is rounded up to 3 units of k = 4; the vmap path's chunks
  # (dp.microbatch_size) count unit slots. Neither changes the update beyond summation order.
  base = {"dp.l2_norm_clip": 0.5}
  runs = {"plain": dict(base, **{"dp.clipping": "vmap"}),
          "ghost": dict(base, **{"dp.clipping": "ghost", "padding_microbatch": 10}),
          "vmap": dict(base, **{"dp.clipping": "vmap", "dp.microbatch_size": 8,
                                "padding_microbatch": 10})}
  for name, overrides in runs.items():
    train.train_and_evaluate(_cfg(dataset, **overrides), str(tmp_path / name))
  for name in ("ghost", "vmap"):
    _assert_params_close(_params(tmp_path / "plain"), _params(tmp_path / name), 1e-4)


def crash_midway_and_resume(cfg, tmp_path, monkeypatch):
  """``(reference summary, resumed summary, resumed workdir)``: ``cfg`` run whole in
  ``tmp_path/ref``, and in ``tmp_path/stopped`` crashed halfway (after a checkpoint of an
  earlier update) then resumed."""
  ref = train.train_and_evaluate(cfg, str(tmp_path / "ref"))
  real = train.Trainer.train_call

  class Crash(Exception):
    pass

  def crashing(self, k):
    if self.step >= ref.steps // 2:  # a checkpoint of an earlier update is on disk
      raise Crash()
    return real(self, k)

  monkeypatch.setattr(train.Trainer, "train_call", crashing)
  work = tmp_path / "stopped"
  with pytest.raises(Crash):
    train.train_and_evaluate(cfg, str(work))
  monkeypatch.setattr(train.Trainer, "train_call", real)
  return ref, train.train_and_evaluate(cfg, str(work)), work


def test_a_resumed_unit_run_equals_the_uninterrupted_one(dataset, tmp_path, monkeypatch):
  cfg = _cfg(dataset, **{"checkpoint.every_steps": 5, "steps_per_call": 1})
  ref, resumed, work = crash_midway_and_resume(cfg, tmp_path, monkeypatch)
  assert resumed.steps == ref.steps and resumed.epsilon == ref.epsilon
  a, b = _params(tmp_path / "ref"), _params(work)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k])
  epochs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]


def test_materialised_batches_with_validation_units_are_refused_in_one_line(dataset,
                                                                           tmp_path):
  # The batches are drawn from every training unit: none can be held out for validation.
  with pytest.raises(errors.ConfigError, match="validation_fraction"):
    train.train_and_evaluate(_cfg(dataset, **{"data.batches": str(tmp_path / "b"),
                                              "data.validation_fraction": 0.1}),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before the workdir is made


def test_the_poisson_batch_job_plans_a_unit_dataset_by_unit(dataset, tmp_path):
  # The plan alone (no Spark): N = U, q = B / U, and the capacity counts the rows of the
  # units sampled, bounded from the kept units' sizes (tests/test_units_streamed.py runs the
  # job and trains from its batches).
  from preprocessing import poisson_batches as pb
  units, _ = _units_and_rows(dataset)
  run = pb.plan_job(dataset, str(tmp_path / "b"), batch_size=BATCH, epochs=1).run
  assert run.num_examples == units and run.sampling_rate == BATCH / units
  sizes = np.diff(units_lib.group(*_keys_of(dataset), K).offsets)
  assert run.max_rows_per_unit == K and run.capacity == sampling.row_capacity_for(
      np.bincount(sizes, minlength=K + 1), BATCH / units, run.overflow_probability)
  assert not (tmp_path / "b").exists()  # planning writes nothing


def test_too_few_units_are_refused_before_the_workdir_exists(dataset, tmp_path):
  units, rows = _units_and_rows(dataset)
  batch = (units + rows) // 2  # enough rows, too few units
  with pytest.raises(errors.ConfigError, match=f"N = {batch} / {units} "):
    train.train_and_evaluate(_cfg(dataset, **{"batch_size": batch}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_validation_units_are_held_out_whole(dataset, tmp_path):
  seen = {}

  def inspect(t, summary):
    seen.update(train=t.data.train.unit_keys, validation=t.data.validation.unit_keys,
                summary=summary)

  train.train_and_evaluate(_cfg(dataset, **{"data.validation_fraction": 0.2}),
                           str(tmp_path / "w"), inspect=inspect)
  units, _ = _units_and_rows(dataset)
  held, kept = np.unique(seen["validation"]), np.unique(seen["train"])
  assert not np.intersect1d(held, kept).size  # no unit on both sides
  assert len(held) + len(kept) == units and len(held) > 0.1 * units
  assert seen["summary"].train_examples == len(kept)
  assert seen["summary"].sampling_rate == BATCH / len(kept)


def test_a_row_level_dataset_trains_as_before(tmp_path):
  path = make_dataset(str(tmp_path / "rows"), rows=1500)
  s = train.train_and_evaluate(_cfg(path), str(tmp_path / "w"))
  assert s.sampling_rate == BATCH / s.train_examples
  assert s.train_examples == len(data_lib.load_split(path, "train"))


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
def test_one_device_equals_eight_devices(dataset, tmp_path, monkeypatch, strategy):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  eight = train.train_and_evaluate(_cfg(dataset, **{"parallel.strategy": strategy}),
                                   str(tmp_path / "eight"))
  real = parallel.make_mesh
  monkeypatch.setattr(parallel, "make_mesh",
                      lambda devices=None: real(jax.devices()[:1] if devices is None
                                                else devices))
  one = train.train_and_evaluate(_cfg(dataset, **{"parallel.strategy": strategy}),
                                 str(tmp_path / "one"))
  assert eight.num_devices == 8 and one.num_devices == 1
  assert eight.epsilon == one.epsilon and eight.steps == one.steps
  a, b = _params(tmp_path / "one"), _params(tmp_path / "eight")
  _assert_params_close(a, b, 1e-5)  # the same units sampled; float summation order only


def _labelled_units_dataset(path, num_units=120, max_size=6, seed=5):
  """Units of 1..``max_size`` rows whose 8 binary features spell the unit's number, so that
  a batch row tells which unit it came from; k = K (the bound cuts units above K rows)."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, max_size + 1, size=num_units)
  unit = np.repeat(np.arange(num_units), sizes)
  x = ((unit[:, None] >> np.arange(8)) & 1).astype(np.uint8)
  y = (rng.random(len(unit)) < 0.5).astype(np.uint8)
  keys = units_lib.unit_keys([[f"U{u}" for u in unit]])
  test = units_lib.is_test_unit(keys)
  with data_lib.DatasetWriter(path, feature_names=[f"b{i}" for i in range(8)],
                              label_name="y", feature_bounds=(0, 1), privacy_unit="person",
                              max_rows_per_unit=K) as w:
    w.add("train", x[~test], y[~test], unit_keys=keys[~test])
    w.add("test", x[test], y[test], unit_keys=keys[test])
  in_test = units_lib.is_test_unit(units_lib.unit_keys([[f"U{u}" for u in range(num_units)]]))
  kept = {u: min(int(s), K) for u, s in enumerate(sizes) if not in_test[u]}
  return path, kept


@pytest.mark.parametrize("clipping, microbatch", [("vmap", None), ("ghost", None),
                                                  ("ghost", 9)])
def test_each_unit_slot_holds_all_kept_rows_of_one_unit_and_no_other(tmp_path, monkeypatch,
                                                                     clipping, microbatch):
  # What each real update's clipped sum sees: every packed unit (a 2, then its 1s) is rows of
  # ONE unit (never a neighbour's: its clipped sum would then move with two units), all of
  # that unit's kept rows (the unit is sampled whole, not row by row), at most k, and no unit
  # twice; no block (a microbatch) starts inside a unit.
  path, kept = _labelled_units_dataset(str(tmp_path / "d"))
  seen = []
  real = step_lib.clipping.make_clipped_sum

  def spy(*args, **kwargs):
    fn = real(*args, **kwargs)

    def wrapped(params, batch, mask):
      jax.debug.callback(lambda x, m: seen.append((np.asarray(x), np.asarray(m))),
                         batch[0], mask)
      return fn(params, batch, mask)
    return wrapped

  monkeypatch.setattr(step_lib.clipping, "make_clipped_sum", spy)
  s = train.train_and_evaluate(_cfg(path, **{"batch_size": 24, "dp.clipping": clipping,
                                             "num_epochs": 1, "padding_microbatch": microbatch}),
                               str(tmp_path / "w"))
  assert s.steps >= 2
  sampled = 0
  for x, m in seen:
    if microbatch is not None:
      assert len(m) == microbatch
    ids = (x.astype(np.int64) << np.arange(8)).sum(axis=1)  # the unit of each row
    units = packed_units(np.arange(len(m)), m)
    in_block = [ids[slots].tolist() for _, slots in units]
    assert len({u[0] for u in in_block}) == len(in_block), "a unit sampled twice"
    for rows in in_block:
      assert len(set(rows)) == 1, f"a packed unit mixes units {sorted(set(rows))}"
      assert len(rows) == kept[rows[0]] <= K, (rows[0], len(rows), kept[rows[0]])
      sampled += 1
  assert sampled > 0


def test_a_private_temperature_scores_whole_validation_units(dataset, tmp_path, monkeypatch):
  # The temperature's exponential mechanism scores the validation units (held out whole,
  # bounded to k rows like the training units), each by its mean row loss: the run must hand
  # the mechanism every validation row's unit.
  from fastdp_jax.dp import calibration
  calls = []
  real = calibration.select_temperature

  def spy(logits, labels, epsilon, rng, temperatures=calibration.TEMPERATURES, *, units=None):
    calls.append((len(labels), epsilon, None if units is None else np.asarray(units)))
    return real(logits, labels, epsilon, rng, temperatures, units=units)

  monkeypatch.setattr(calibration, "select_temperature", spy)
  s = train.train_and_evaluate(_cfg(dataset, **{"calibration.epsilon": 0.1,
                                                "data.validation_fraction": 0.2}),
                               str(tmp_path / "w"))
  keys = data_lib.load_split(dataset, "train").unit_keys
  uniq, sizes = np.unique(keys, return_counts=True)
  held = units_lib.is_validation_unit(uniq, 0.2, seed=inputs_lib.VALIDATION_SEED)
  [(rows, epsilon, units)] = calls
  assert (rows, epsilon) == (int(np.minimum(sizes[held], K).sum()), 0.1)
  got_units, got_sizes = np.unique(units, return_counts=True)
  assert set(got_units) == set(uniq[held])  # each held-out unit, by its key
  np.testing.assert_array_equal(got_sizes, np.minimum(sizes[held], K)[np.argsort(uniq[held])])
  assert s.calibration_epsilon == 0.1
  assert s.epsilon == pytest.approx(s.training_epsilon + 0.1, rel=1e-9)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_one_whole_validation_unit_moves_every_temperature_score_by_at_most_l(k):
  # The selection is epsilon-DP in the units if adding one unit moves every candidate's score
  # by a value in [0, L] (a monotone score of sensitivity L). The worst unit: k rows all
  # confidently wrong, each at the clamp L at every temperature; its rows' SUM would be k L.
  from fastdp_jax.dp import calibration
  rng = np.random.default_rng(k)
  n = 300
  logits, labels = rng.normal(size=n) * 3, (rng.random(n) < 0.5).astype(np.uint8)
  units = rng.integers(0, 120, n)  # 1..several rows per unit
  worst = (np.full(k, -1e4), np.ones(k, np.uint8), np.full(k, 10_000))
  mild = (rng.normal(size=k), (rng.random(k) < 0.5).astype(np.uint8), np.full(k, 10_001))
  base = calibration.scores(logits, labels, units=units)
  L = calibration.SENSITIVITY
  for extra_logits, extra_labels, extra_units in (worst, mild):
    more = calibration.scores(np.append(logits, extra_logits), np.append(labels, extra_labels),
                              units=np.append(units, extra_units))
    assert np.all(more - base >= 0) and np.all(more - base <= L * (1 + 1e-12))
  worst_move = calibration.scores(np.append(logits, worst[0]), np.append(labels, worst[1]),
                                  units=np.append(units, worst[2])) - base
  np.testing.assert_allclose(worst_move, L, rtol=1e-12)  # the bound is reached, not loose
  # Units of one row each: the row-level score.
  np.testing.assert_allclose(calibration.scores(logits, labels, units=np.arange(n)),
                             calibration.scores(logits, labels), rtol=1e-12)


def test_rows_given_in_memory_with_a_unit_layout_are_refused(dataset, tmp_path):
  # Given rows carry no manifest, so the step would not know the unit: refused, not clipped
  # row by row while sampled by unit.
  import contextlib
  mesh = parallel.make_mesh()
  grouped, dev = unit_batches.place_units(mesh, data_lib.load_split(dataset, "train"), K)
  test = data_lib.load_split(dataset, "test")
  with contextlib.ExitStack() as stack, pytest.raises(errors.ConfigError, match="privacy unit"):
    train.setup(_cfg(dataset), str(tmp_path / "w"), stack, data=(grouped, test, dev))

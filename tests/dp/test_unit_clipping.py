"""Per-unit clipping on packed unit batches: each unit's summed gradient is clipped to C whole.

A packed block holds each sampled unit's rows (1..k) contiguously; its int8 mask marks a
unit's first row 2, its further rows 1, empty slots 0 (``clip_types.unit_rows``). The
guarantees checked here, through ``clipping.make_clipped_sum`` and a real ``models.MLP``: the
ghost path (band norms of width k) equals the vmap path (segment sums of per-row gradients)
per unit, with and without embeddings; both equal the unit-by-unit computation (each unit's
gradient on its own, clipped, summed); removing one whole unit moves the sum by at most C; a
unit's rows together contribute at most C (where clipping each row would give up to k C);
k = 1 is the row path; empty slots, malformed rows and non-finite units contribute nothing;
the step's metrics count rows and units as before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastdp_jax.dp import clip_types
from fastdp_jax.dp import clipping
from fastdp_jax.dp import ghost
from fastdp_jax import models
from fastdp_jax import step as step_lib
from tests.dp import test_ghost

EPS = float(np.finfo(np.float32).eps)  # 2^-23 ~ 1.2e-7
HEADS = {
    "binary": models.BINARY,
    "multiclass": models.TaskHead("multiclass", num_classes=3),
    "regression": models.TaskHead("regression", bounds=(-3.0, 5.0)),
}
EMB = (models.EmbeddingInput(index=1, vocab_size=4, dim=3),)  # few ids: rows of a unit share


def _model(task, d, hidden, embeddings=(), seed=0):
  head = HEADS[task]
  model = models.create_model(d, hidden, seed, num_outputs=head.num_outputs,
                              embeddings=embeddings)
  apply_fn, params = models.functional(model)
  return model, head, params, models.example_loss(apply_fn, head)


def _pack(sizes, capacity, block=None):
  """The int8 mask of units of ``sizes`` packed next-fit into blocks of ``block`` slots (None:
  one block), and each unit's slots: what the host hands the step."""
  block = block or capacity
  mask, slots, pos = np.zeros(capacity, np.int8), [], 0
  for s in sizes:
    if pos % block + s > block:  # the unit would straddle a block: the next block
      pos += block - pos % block
    assert pos + s <= capacity, "the test's capacity is too small"
    mask[pos], mask[pos + 1:pos + s] = 2, 1
    slots.append(np.arange(pos, pos + s))
    pos += s
  return mask, slots


def _batch(rng, capacity, d, head, embeddings=(), scale=2.0):
  """Rows for ``capacity`` slots; the caller's empty slots get garbage that must not matter."""
  x, y = test_ghost._task_batch(rng, capacity, d, head, embeddings, scale)
  return x, y


def _garbage(x, mask, embeddings=()):
  x = x.copy()
  x[mask == 0] = 1e4  # garbage in the empty slots (ids stay ids: reset below)
  for e in embeddings:
    x[mask == 0, e.index] = 0
  return x


def _fn(method, model, loss_fn, head, clip, k, **kw):
  return jax.jit(clipping.make_clipped_sum(method, model, loss_fn, clip, head=head,
                                           unit_size=k, **kw))


def _leaves(tree):
  return [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(tree)]


def _norm(tree):
  return float(np.sqrt(sum(np.sum(v ** 2) for v in _leaves(tree))))


def _diff(a, b):
  return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(_leaves(a), _leaves(b)))))


def _width(params):
  """The longest dot product of a layer: kernels' input widths, biases' (output) widths,
  tables' vocabularies all bound it."""
  return max(int(w.shape[0]) for w in _leaves(params))


def _row_norms(model, loss_fn, head, params, batch):
  """[capacity] each row's own gradient norm (no clipping binds at C = 1e9)."""
  _, rows = _fn("vmap", model, loss_fn, head, 1e9, None)(
      params, batch, np.ones(batch[1].shape[0], bool))
  return np.asarray(rows.norms, np.float64)


def _tolerances(row_norms, slots, unit_norms, clip, k, width, depth):
  """Float32 bounds for comparing two computations of the clipped units, per unit norm and
  for the whole sum.

  Ghost's squared unit norm is sum_{j,l} (a_j.a_l + 1)(g_j.g_l) over the layers: dot products
  of length <= width and at most k^2 terms, so its rounding error is at most gamma * S^2 with
  gamma = (width + k^2 + depth) * eps and S = sum_j r_j the sum of the unit's row gradient
  norms (|(a_j.a_l + 1)(g_j.g_l)| <= r_j r_l by Cauchy-Schwarz, over the layers by
  Minkowski). A norm's error is then gamma * S^2 / (2 * norm), plus the vmap path's own
  summation of the k row gradients, gamma * S. Factor 4: the activations and output
  gradients themselves carry a few eps of rounding from the forward and backward passes.
  A clipped unit's contribution C * G / ||G|| moves by at most 2 C * err / ||G|| (norm and
  entries), an unclipped one by its entries' error, gamma * S.
  """
  gamma = 4 * (width + k * k + depth) * EPS
  s = np.array([row_norms[u].sum() for u in slots])
  norm = np.asarray(unit_norms, np.float64)
  safe = np.where(norm > 0, norm, 1.0)
  per_unit = gamma * s * s / (2 * safe) + gamma * s
  share = np.where(norm > clip, 2 * clip * per_unit / safe, gamma * s)
  return per_unit, float(np.sum(share)) + 1e-30


def _unit_by_unit(loss_fn, params, batch, slots, clip):
  """The old computation, one unit at a time: each unit's summed gradient, its norm, clipped
  to C, summed in float64."""
  x, y = batch
  unit_grad = jax.jit(jax.grad(lambda p, xs, ys: jnp.sum(
      jax.vmap(loss_fn, in_axes=(None, 0))(p, (xs, ys)))))
  total, norms = None, []
  for u in slots:
    g = _leaves(unit_grad(params, x[u], y[u]))
    norm = float(np.sqrt(sum(np.sum(v ** 2) for v in g)))
    c = min(1.0, clip / norm) if norm > 0 else 1.0
    total = [c * v for v in g] if total is None else [t + c * v for t, v in zip(total, g)]
    norms.append(norm)
  return total, np.array(norms)


CASES = [  # task, d, hidden, embeddings, units, k, block
    ("binary", 6, (10,), (), 10, 3, None),
    ("binary", 6, (8,), EMB, 8, 4, 8),
    ("multiclass", 5, (), (), 9, 2, None),
    ("binary", 4, (), (), 6, 3, None),  # one layer with one output: no band at all
    ("regression", 5, (6,), EMB, 7, 5, 10),
]


def _case(task, d, hidden, embeddings, units, k, block, seed):
  model, head, params, loss_fn = _model(task, d, hidden, embeddings)
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, k + 1, units)
  sizes[0] = k  # at least one full unit
  # Room for empty slots (and blocks' ends); some cases not whole blocks of k slots.
  capacity = 2 * units * k + (block is None and units % 2)
  mask, slots = _pack(sizes, capacity, block)
  x, y = _batch(rng, capacity, d, HEADS[task], embeddings)
  return model, head, params, loss_fn, (_garbage(x, mask, embeddings), y), mask, slots


@pytest.mark.parametrize("wide_band", [0, 10 ** 9], ids=["two_products", "window"])
@pytest.mark.parametrize("task,d,hidden,embeddings,units,k,block", CASES)
def test_ghost_equals_vmap_equals_unit_by_unit(task, d, hidden, embeddings, units, k, block,
                                               wide_band, monkeypatch):
  # Both forms of the band (chosen by an activation's width) on the same small layers.
  monkeypatch.setattr(ghost, "WIDE_BAND", wide_band)
  model, head, params, loss_fn, batch, mask, slots = _case(
      task, d, hidden, embeddings, units, k, block, [d, units, k])
  _, norms = _unit_by_unit(loss_fn, params, batch, slots, np.inf)
  clip = float(np.median(norms))  # about half the units clipped
  want_sum, want_norms = _unit_by_unit(loss_fn, params, batch, slots, clip)
  starts = np.array([u[0] for u in slots])
  per_unit, total = _tolerances(_row_norms(model, loss_fn, head, params, batch), slots,
                                want_norms, clip, k, _width(params), len(hidden) + 1)
  for method in ("ghost", "vmap"):
    got, stats = _fn(method, model, loss_fn, head, clip, k)(params, batch, mask)
    norms = np.asarray(stats.norms)
    # The stats sit at each unit's first row slot and nowhere else.
    assert norms.shape == stats.nonfinite.shape == mask.shape
    assert np.all(norms[mask != 2] == 0) and not np.any(stats.nonfinite)
    assert np.all(np.abs(norms[starts] - want_norms) <= per_unit), method
    assert _diff(got, want_sum) <= total, method
  # The premise: some units clipped, some not, and the tolerance is far below C.
  assert np.any(want_norms > clip) and np.any(want_norms < clip) and total < 1e-3 * clip


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_removing_one_whole_unit_moves_the_sum_by_at_most_c(method):
  model, head, params, loss_fn = _model("binary", 6, (8,), EMB)
  k, clip = 3, 0.05  # rows scaled x5: every unit's gradient is far above C
  rng = np.random.default_rng(1)
  sizes = rng.integers(1, k + 1, 8)
  capacity = 8 * k
  x, y = _batch(rng, capacity, 6, head, EMB, scale=5.0)
  mask, slots = _pack(sizes, capacity)
  fn = _fn(method, model, loss_fn, head, clip, k)
  full, stats = fn(params, (x, y), mask)
  assert np.all(np.asarray(stats.norms)[mask == 2] > 2 * clip)  # clipping binds
  for u in range(len(sizes)):
    # The neighbouring batch: the other units' rows packed again, as the host would.
    rest = [v for j, v in enumerate(slots) if j != u]
    order = np.concatenate(rest + [np.setdiff1d(np.arange(capacity), np.concatenate(rest))])
    fewer, _ = _pack([len(v) for v in rest], capacity)
    reduced, _ = fn(params, (x[order], y[order]), fewer)
    # The unit's clipped contribution has norm exactly C (it was clipped); float32 slack.
    assert _diff(full, reduced) == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_a_units_rows_together_contribute_at_most_c_where_rows_alone_give_k_c(method):
  """k copies of one row: aligned gradients. Clipped as a unit they give C; clipped row by row
  (what a mutant 'clip rows instead of the unit sum' computes) they give k * C."""
  model, head, params, loss_fn = _model("binary", 6, (8,), EMB)
  units, k, clip = 5, 3, 0.05
  x, y = _batch(np.random.default_rng(2), units, 6, head, EMB, scale=5.0)
  x, y = np.repeat(x, k, axis=0), np.repeat(y, k)  # each unit: one row k times
  mask, _ = _pack([k] * units, units * k)
  unit_fn = _fn(method, model, loss_fn, head, clip, k)
  row_fn = _fn(method, model, loss_fn, head, clip, None)
  for u in range(units):
    only = np.where(np.arange(units * k) // k == u, mask, 0).astype(np.int8)
    unit_sum, stats = unit_fn(params, (x, y), only)
    row_sum, row_stats = row_fn(params, (x, y), only > 0)
    assert np.asarray(row_stats.norms)[only > 0].min() > clip  # each row alone is clipped
    assert float(stats.norms[u * k]) == pytest.approx(k * float(row_stats.norms[u * k]),
                                                      rel=1e-4)
    assert _norm(unit_sum) <= clip * (1 + 1e-4)
    assert _norm(row_sum) == pytest.approx(k * clip, rel=1e-4)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("task,embeddings", [("binary", ()), ("multiclass", EMB)])
def test_unit_size_one_is_the_row_path(method, task, embeddings):
  model, head, params, loss_fn = _model(task, 6, (8,), embeddings)
  rng = np.random.default_rng(3)
  x, y = _batch(rng, 20, 6, head, embeddings)
  rows = rng.random(20) < 0.7
  mask = np.where(rows, 2, 0).astype(np.int8)  # every row its own unit of one
  x = _garbage(x, mask, embeddings)
  got, got_stats = _fn(method, model, loss_fn, head, 0.3, 1)(params, (x, y), mask)
  want, want_stats = _fn(method, model, loss_fn, head, 0.3, None)(params, (x, y), rows)
  slots = [np.array([i]) for i in np.flatnonzero(rows)]
  per_unit, total = _tolerances(np.asarray(want_stats.norms, np.float64), slots,
                                np.asarray(want_stats.norms)[rows], 0.3, 1, _width(params), 2)
  assert np.all(np.abs(np.asarray(got_stats.norms)[rows]
                       - np.asarray(want_stats.norms)[rows]) <= per_unit)
  assert _diff(got, want) <= total
  np.testing.assert_array_equal(got_stats.nonfinite, want_stats.nonfinite)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_empty_slots_malformed_rows_and_non_finite_units_contribute_nothing(method):
  model, head, params, loss_fn = _model("multiclass", 6, (8,), EMB)
  k = 3
  mask, _ = _pack([3, 1, 2, 3, 2], 16)
  x, y = _batch(np.random.default_rng(4), 16, 6, head, EMB)
  fn = _fn(method, model, loss_fn, head, 0.4, k)
  clean_x = np.where(mask[:, None] > 0, x, 0).astype(np.float32)
  dirty_x = x.copy()
  dirty_x[mask == 0, 0] = np.nan  # NaN in every empty slot
  got, stats = fn(params, (dirty_x, y), mask)
  want, _ = fn(params, (clean_x, y), mask)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  # Rows the host never sends are dropped, not clipped with a wrong unit: a block starting in
  # the middle of a unit (its tail), a unit longer than k (its rows beyond k).
  bad = np.concatenate([[1, 1], mask, [2, 1, 1, 1, 1]]).astype(np.int8)
  ok = np.concatenate([[0, 0], mask, [2, 1, 1, 0, 0]]).astype(np.int8)
  bx, by = np.concatenate([x[:2], dirty_x, x[:5]]), np.concatenate([y[:2], y, y[:5]])
  got, _ = fn(params, (bx, by), bad)
  want, _ = fn(params, (bx, by), ok)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  # A real row with a NaN feature: its whole unit (the second, slots 3..3) is zeroed and
  # counted at its first row.
  dirty_x[3, 0] = np.nan
  got, stats = fn(params, (dirty_x, y), mask)
  assert list(np.flatnonzero(stats.nonfinite)) == [3] and float(stats.norms[3]) == 0
  without = mask.copy()
  without[3] = 0
  want, _ = fn(params, (clean_x, y), without)
  np.testing.assert_allclose(np.concatenate([v.ravel() for v in _leaves(got)]),
                             np.concatenate([v.ravel() for v in _leaves(want)]),
                             rtol=0, atol=1e-7)
  zero, _ = fn(params, (dirty_x, y), np.zeros_like(mask))
  assert _norm(zero) == 0


def test_vmap_chunks_are_blocks_of_units_and_do_not_change_the_sum():
  model, head, params, loss_fn = _model("binary", 6, (8,), ())
  k, chunk_units = 3, 2
  block = chunk_units * k  # the rows of a chunk: step.unit_block gives the host this m
  assert step_lib.unit_block(None, "vmap", chunk_units, k) == block
  sizes = np.random.default_rng(5).integers(1, k + 1, 9)
  mask, slots = _pack(sizes, 8 * block, block)
  x, y = _batch(np.random.default_rng(5), 8 * block, 6, head)
  batch = (_garbage(x, mask), y)
  whole, whole_stats = _fn("vmap", model, loss_fn, head, 0.3, k)(params, batch, mask)
  parts, parts_stats = _fn("vmap", model, loss_fn, head, 0.3, k,
                           microbatch_size=chunk_units)(params, batch, mask)
  # The same unit gradients, computed at another vmap width (XLA may order sums differently):
  # within the bounds derived in _tolerances.
  starts = mask == 2
  per_unit, total = _tolerances(_row_norms(model, loss_fn, head, params, batch), slots,
                                np.asarray(whole_stats.norms)[starts], 0.3, k, _width(params),
                                2)
  assert np.all(np.abs(np.asarray(parts_stats.norms)[starts]
                       - np.asarray(whole_stats.norms)[starts]) <= per_unit)
  assert _diff(parts, whole) <= total
  with pytest.raises(ValueError, match="must divide"):
    _fn("vmap", model, loss_fn, head, 0.3, k, microbatch_size=5)(params, batch, mask)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_without_dp_the_unit_is_the_plain_masked_sum(method):
  model, head, params, loss_fn = _model("binary", 6, (8,), ())
  k = 2
  mask, _ = _pack([2, 1, 2, 2, 1], 12)
  x, y = _batch(np.random.default_rng(6), 12, 6, head)
  clean = (np.where(mask[:, None] > 0, x, 0).astype(np.float32), y)
  got, stats = _fn(method, model, loss_fn, head, None, k)(params, clean, mask)
  want, _ = _fn(method, model, loss_fn, head, None, None)(params, clean, mask > 0)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert stats.norms.shape == stats.nonfinite.shape == (12,)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_step_metrics_count_rows_and_units_in_packed_microbatches(method):
  model, head, params, loss_fn = _model("binary", 6, (8,), ())
  k, m = 3, 6
  mask, slots = _pack([3, 1, 2, 3, 3, 1, 2], 24, m)
  x, y = _batch(np.random.default_rng(7), 24, 6, head)
  x[4, 0] = np.nan  # blocks [0..2 | 3 | 4, 5] [6..8 | 9..11] [12 | 13, 14]: the 3rd unit
  _, norms = _unit_by_unit(loss_fn, params, (x, y), slots, np.inf)
  clip = float(np.nanmedian(norms))  # some units clipped, some not
  fn = clipping.make_clipped_sum(method, model, loss_fn, clip, head=head, unit_size=k)
  per_device = jax.jit(step_lib._per_device(loss_fn, fn, clip, m, k))
  idx = np.arange(24, dtype=np.int32)
  grads, metrics = per_device(params, x, y, idx, mask)
  whole, whole_metrics = jax.jit(step_lib._per_device(loss_fn, fn, clip, None, k))(
      params, x, y, idx, mask)
  nan_unit = next(j for j, u in enumerate(slots) if 4 in u)
  clipped_rows = sum(len(u) for j, u in enumerate(slots) if j != nan_unit and norms[j] > clip)
  assert 0 < clipped_rows < sum(map(len, slots)) - len(slots[nan_unit])  # the premise
  for got in (metrics, whole_metrics):
    assert float(got["count"]) == sum(map(len, slots))  # rows, as in a row-level run
    assert float(got["clipped"]) == clipped_rows  # rows of the units clipped
    assert float(got["nonfinite"]) == 1  # units zeroed
  ok = [u for j, u in enumerate(slots) if j != nan_unit]
  _, total = _tolerances(_row_norms(model, loss_fn, head, params, (x, y)), ok,
                         np.delete(norms, nan_unit), clip, k, _width(params), 2)
  assert _diff(grads, whole) <= total


def test_bad_unit_sizes_and_bool_masks_are_refused():
  model, head, params, loss_fn = _model("binary", 4, (), ())
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match="unit_size"):
      clipping.make_clipped_sum("vmap", model, loss_fn, 1.0, unit_size=bad)
  with pytest.raises(ValueError, match="int8 mask"):
    clip_types.unit_rows(jnp.ones((6,), bool), 3)


def test_unit_blocks_and_microbatches_hold_a_whole_unit():
  assert step_lib.padding_microbatch(10, "ghost", None, 4) == 10  # >= k: no rounding needed
  assert step_lib.padding_microbatch(2, "ghost", None, 4) == 4  # a unit of k must fit
  assert step_lib.padding_microbatch(10, "vmap", 3, 4) == 12  # vmap chunks: units of k slots
  assert step_lib.padding_microbatch(10, "ghost", None, None) == 10  # rows: unchanged
  assert step_lib.unit_block(None, "ghost", None, 4) is None  # one block: the whole batch
  assert step_lib.unit_block(None, "vmap", 3, 4) == 12

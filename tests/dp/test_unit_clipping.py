"""Per-unit clipping: each privacy unit's summed gradient is clipped to C as a whole.

A batch in unit mode is flat: unit slot u's row slot j is row ``u * k + j``; the row mask is
flat too. The guarantees checked here, through ``clipping.make_clipped_sum`` and a real
``models.MLP``: the ghost path (per-unit Gram norms) equals the vmap path per unit; removing
one whole unit moves the sum by at most C; a unit's rows together contribute at most C (where
clipping each row would give up to k * C); k = 1 is the row path; padding rows, empty unit
slots and non-finite units contribute nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastdp_jax.dp import clip_types
from fastdp_jax.dp import clipping
from fastdp_jax import models
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


def _batch(rng, units, k, d, head, embeddings=(), scale=2.0):
  """Flat [units * k] rows; each unit slot has 0..k real rows (some slots empty), and the
  padding rows hold large garbage that must not matter."""
  n = units * k
  x, y = test_ghost._task_batch(rng, n, d, head, embeddings, scale)
  rows = rng.integers(0, k + 1, units)
  rows[0], rows[-1] = k, 0  # at least one full unit and one empty slot
  mask = (np.arange(k)[None, :] < rows[:, None]).reshape(n)
  x[~mask] = 1e4  # garbage in the padding rows (ids stay ids: 1e4 is cast to an id)
  for e in embeddings:
    x[~mask, e.index] = 0
  return (x, y), mask


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


def _tolerances(row_norms, unit_norms, clip, k, width, depth):
  """Float32 bounds for comparing the two paths, per unit norm and for the whole sum.

  Ghost's squared unit norm is sum_{j,l} (a_j.a_l + 1)(g_j.g_l) over the layers: dot products
  of length <= width and k^2 terms, so its rounding error is at most gamma * S^2 with
  gamma = (width + k^2 + depth) * eps and S = sum_j r_j the sum of the unit's row gradient
  norms (|(a_j.a_l + 1)(g_j.g_l)| <= r_j r_l by Cauchy-Schwarz, over the layers by
  Minkowski). A norm's error is then gamma * S^2 / (2 * norm), plus the vmap path's own
  summation of the k row gradients, gamma * S. Factor 4: the activations and output
  gradients themselves carry a few eps of rounding from the forward and backward passes.
  A clipped unit's contribution C * G / ||G|| moves by at most 2 C * err / ||G|| (norm and
  entries), an unclipped one by its entries' error, gamma * S.
  """
  gamma = 4 * (width + k * k + depth) * EPS
  s = np.asarray(row_norms, np.float64).reshape(-1, k).sum(axis=1)
  norm = np.asarray(unit_norms, np.float64)
  safe = np.where(norm > 0, norm, 1.0)
  per_unit = gamma * s * s / (2 * safe) + gamma * s
  share = np.where(norm > clip, 2 * clip * per_unit / safe, gamma * s)
  return per_unit, float(np.sum(share)) + 1e-30


CASES = [  # task, d, hidden, embeddings, units, k, clip
    ("binary", 6, (10,), (), 10, 3, 0.5),
    ("binary", 6, (8,), EMB, 8, 4, 0.3),
    ("multiclass", 5, (), (), 9, 2, 0.4),
    ("regression", 5, (6,), EMB, 7, 5, 1.0),
]


@pytest.mark.parametrize("task,d,hidden,embeddings,units,k,clip", CASES)
def test_ghost_equals_vmap_per_unit(task, d, hidden, embeddings, units, k, clip):
  model, head, params, loss_fn = _model(task, d, hidden, embeddings)
  batch, mask = _batch(np.random.default_rng([d, units, k]), units, k, d, head, embeddings)
  got, got_stats = _fn("ghost", model, loss_fn, head, clip, k)(params, batch, mask)
  want, want_stats = _fn("vmap", model, loss_fn, head, clip, k)(params, batch, mask)
  assert got_stats.norms.shape == want_stats.norms.shape == (units,)
  assert got_stats.nonfinite.shape == (units,) and not np.any(got_stats.nonfinite)
  assert got_stats.losses.shape == (units * k,) and want_stats.losses is None
  _, rows = _fn("vmap", model, loss_fn, head, 1e9, None)(params, batch, mask)
  per_unit, total = _tolerances(rows.norms, want_stats.norms, clip, k, _width(params),
                                len(hidden) + 1)
  assert np.all(np.abs(np.asarray(got_stats.norms) - want_stats.norms) <= per_unit)
  assert _diff(got, want) <= total
  # The premise: some units clipped, some not, and the tolerance is far below C.
  norms = np.asarray(want_stats.norms)
  assert np.any(norms > clip) and total < 1e-3 * clip
  present = mask.reshape(units, k).any(axis=1)
  assert np.all((norms > 0) == present)  # empty slots report 0, real units a norm


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_removing_one_whole_unit_moves_the_sum_by_at_most_c(method):
  model, head, params, loss_fn = _model("binary", 6, (8,), EMB)
  units, k, clip = 8, 3, 0.05  # rows scaled x5: every unit's gradient is far above C
  batch, mask = _batch(np.random.default_rng(1), units, k, 6, head, EMB, scale=5.0)
  fn = _fn(method, model, loss_fn, head, clip, k)
  full, stats = fn(params, batch, mask)
  present = np.flatnonzero(mask.reshape(units, k).any(axis=1))
  assert np.all(np.asarray(stats.norms)[present] > 2 * clip)  # clipping binds
  for u in present:
    without = mask.copy()
    without[u * k:(u + 1) * k] = False
    reduced, _ = fn(params, batch, without)
    # The unit's clipped contribution has norm exactly C (it was clipped); float32 slack.
    assert _diff(full, reduced) == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_a_units_rows_together_contribute_at_most_c_where_rows_alone_give_k_c(method):
  """k copies of one row: aligned gradients. Clipped as a unit they give C; clipped row by row
  (what a mutant 'clip rows instead of the unit sum' computes) they give k * C."""
  model, head, params, loss_fn = _model("binary", 6, (8,), EMB)
  units, k, clip = 5, 3, 0.05
  (x, y), mask = _batch(np.random.default_rng(2), 2 * units, k, 6, head, EMB, scale=5.0)
  real = np.flatnonzero(mask)[:units]
  x, y = np.repeat(x[real], k, axis=0), np.repeat(y[real], k)  # each unit: one row k times
  unit_fn = _fn(method, model, loss_fn, head, clip, k)
  row_fn = _fn(method, model, loss_fn, head, clip, None)
  for u in range(units):
    only = np.arange(units * k) // k == u
    unit_sum, stats = unit_fn(params, (x, y), only)
    row_sum, row_stats = row_fn(params, (x, y), only)
    assert np.asarray(row_stats.norms)[only].min() > clip  # each row alone is clipped
    assert float(stats.norms[u]) == pytest.approx(k * float(row_stats.norms[u * k]), rel=1e-4)
    assert _norm(unit_sum) <= clip * (1 + 1e-4)
    assert _norm(row_sum) == pytest.approx(k * clip, rel=1e-4)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("task,embeddings", [("binary", ()), ("multiclass", EMB)])
def test_unit_size_one_is_the_row_path(method, task, embeddings):
  model, head, params, loss_fn = _model(task, 6, (8,), embeddings)
  batch, mask = _batch(np.random.default_rng(3), 20, 1, 6, head, embeddings)
  got, got_stats = _fn(method, model, loss_fn, head, 0.3, 1)(params, batch, mask)
  want, want_stats = _fn(method, model, loss_fn, head, 0.3, None)(params, batch, mask)
  # One row per unit: the same sums up to the Gram-vs-squares rounding bound above.
  per_unit, total = _tolerances(want_stats.norms, want_stats.norms, 0.3, 1, _width(params), 2)
  assert np.all(np.abs(np.asarray(got_stats.norms) - want_stats.norms) <= per_unit)
  assert _diff(got, want) <= total
  np.testing.assert_array_equal(got_stats.nonfinite, want_stats.nonfinite)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_padding_rows_empty_slots_and_non_finite_units_contribute_nothing(method):
  model, head, params, loss_fn = _model("multiclass", 6, (8,), EMB)
  units, k = 6, 3
  (x, y), mask = _batch(np.random.default_rng(4), units, k, 6, head, EMB)
  fn = _fn(method, model, loss_fn, head, 0.4, k)
  clean_x = np.where(mask[:, None], x, 0).astype(np.float32)
  dirty_x = x.copy()
  dirty_x[~mask, 0] = np.nan  # NaN in every padding row
  got, stats = fn(params, (dirty_x, y), mask)
  want, _ = fn(params, (clean_x, y), mask)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  empty = ~mask.reshape(units, k).any(axis=1)
  assert empty.any() and not np.any(np.asarray(stats.norms)[empty])
  # A real row with a NaN feature: its whole unit (slot 0, full) is zeroed and counted.
  dirty_x[1, 0] = np.nan
  got, stats = fn(params, (dirty_x, y), mask)
  assert list(np.flatnonzero(stats.nonfinite)) == [0] and float(stats.norms[0]) == 0
  no_unit0 = mask & (np.arange(units * k) >= k)
  want, _ = fn(params, (clean_x, y), no_unit0)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  zero, _ = fn(params, (dirty_x, y), np.zeros_like(mask))
  assert _norm(zero) == 0


def test_vmap_microbatches_count_unit_slots_and_do_not_change_the_sum():
  model, head, params, loss_fn = _model("binary", 6, (8,), ())
  units, k = 8, 3
  batch, mask = _batch(np.random.default_rng(5), units, k, 6, head)
  whole, whole_stats = _fn("vmap", model, loss_fn, head, 0.3, k)(params, batch, mask)
  parts, parts_stats = _fn("vmap", model, loss_fn, head, 0.3, k,
                           microbatch_size=2)(params, batch, mask)
  # The same unit gradients, computed at another vmap width (XLA may order sums differently):
  # within the bounds derived in _tolerances.
  _, rows = _fn("vmap", model, loss_fn, head, 1e9, None)(params, batch, mask)
  per_unit, total = _tolerances(rows.norms, whole_stats.norms, 0.3, k, _width(params), 2)
  assert np.all(np.abs(np.asarray(parts_stats.norms) - whole_stats.norms) <= per_unit)
  assert _diff(parts, whole) <= total
  with pytest.raises(ValueError, match="unit slots"):
    _fn("vmap", model, loss_fn, head, 0.3, k, microbatch_size=3)(params, batch, mask)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_without_dp_the_unit_is_the_plain_masked_sum(method):
  model, head, params, loss_fn = _model("binary", 6, (8,), ())
  units, k = 5, 2
  batch, mask = _batch(np.random.default_rng(6), units, k, 6, head)
  clean = (np.where(mask[:, None], batch[0], 0).astype(np.float32), batch[1])
  got, stats = _fn(method, model, loss_fn, head, None, k)(params, clean, mask)
  want, _ = _fn(method, model, loss_fn, head, None, None)(params, clean, mask)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert stats.norms.shape == stats.nonfinite.shape == (units,)


def test_bad_unit_sizes_are_refused():
  model, head, _, loss_fn = _model("binary", 4, (), ())
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match="unit_size"):
      clipping.make_clipped_sum("vmap", model, loss_fn, 1.0, unit_size=bad)
  with pytest.raises(ValueError, match="whole number of units"):
    clip_types.units_present(jnp.ones((7,), bool), 3)

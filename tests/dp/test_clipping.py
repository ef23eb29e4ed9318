"""Guarantees of per-example clipping: norms <= C, padding contributes zero, equals a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastdp_jax.dp import clip_types
from fastdp_jax.dp import clipping
from fastdp_jax import models


def _setup(seed=0, batch=16, d=5, hidden=(7,)):
  model = models.create_model(d, hidden, seed)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, d)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, batch), jnp.float32)
  return loss_fn, params, (x, y)


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(tree))))


@pytest.mark.parametrize("clip", [0.01, 0.5, 100.0])
def test_equals_python_loop_over_examples(clip):
  loss_fn, params, (x, y) = _setup()
  total, norms = clipping.clipped_grad_sum(loss_fn, params, (x, y), clip)
  expected = jax.tree_util.tree_map(jnp.zeros_like, params)
  for i in range(len(y)):
    g = jax.grad(loss_fn)(params, (x[i], y[i]))
    n = _norm(g)
    assert norms[i] == pytest.approx(n, rel=1e-5)
    scale = min(1.0, clip / n)
    expected = jax.tree_util.tree_map(lambda a, b: a + scale * b, expected, g)
  for a, b in zip(jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_clipped_contribution_has_norm_at_most_c():
  loss_fn, params, (x, y) = _setup(batch=32)
  clip = 0.05
  for i in range(len(y)):
    one = (x[i:i + 1], y[i:i + 1])
    g, _ = clipping.clipped_grad_sum(loss_fn, params, one, clip)
    assert _norm(g) <= clip * (1 + 1e-5)
  # And the sum of n clipped gradients is bounded by n * C.
  total, norms = clipping.clipped_grad_sum(loss_fn, params, (x, y), clip)
  assert _norm(total) <= len(y) * clip * (1 + 1e-5)
  assert int(jnp.sum(norms > clip)) >= len(y) // 2  # the bound above was not vacuous


def test_padding_rows_contribute_exactly_zero():
  loss_fn, params, (x, y) = _setup(batch=12)
  real_rows, clip = 7, 1.0
  mask = jnp.arange(12) < real_rows
  # Same shapes, different garbage in the padding rows (huge values; inf): the sums are equal
  # bit for bit, so nothing of a padding row reaches the sum.
  rng = np.random.default_rng(1)
  huge = x.at[real_rows:].set(jnp.asarray(rng.normal(size=(5, x.shape[1])) * 1e6, jnp.float32))
  inf = x.at[real_rows:].set(jnp.inf)
  padded, norms = clipping.clipped_grad_sum(loss_fn, params, (inf, y), clip, mask)
  for garbage in (x, huge):
    same, _ = clipping.clipped_grad_sum(loss_fn, params, (garbage, y), clip, mask)
    for a, b in zip(jax.tree_util.tree_leaves(padded), jax.tree_util.tree_leaves(same)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.asarray(norms)[real_rows:] == 0)
  # And the padded sum is the sum over the 7 real rows alone. The shapes differ (12 vs 7
  # rows), so XLA may add in another order: a float32 sum of m terms is off by at most
  # (m - 1) u sum|t_i| (Higham, Accuracy and Stability, 4.2; u = 2**-24), here both sums, of
  # 12 and 7 terms, each |t_i| <= C per coordinate over 7 real rows. Each term may itself
  # differ by the rounding of its norm, a sum of P squares: at most P u relative.
  u = np.finfo(np.float32).eps / 2
  num_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(params))
  atol = ((12 - 1) + (real_rows - 1) + num_params) * u * real_rows * clip
  real, _ = clipping.clipped_grad_sum(loss_fn, params, (x[:real_rows], y[:real_rows]), clip)
  for a, b in zip(jax.tree_util.tree_leaves(padded), jax.tree_util.tree_leaves(real)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)
  # A batch of padding only sums to exactly zero.
  empty, _ = clipping.clipped_grad_sum(loss_fn, params, (inf, y), clip, jnp.zeros(12, bool))
  assert all(bool(jnp.all(g == 0)) for g in jax.tree_util.tree_leaves(empty))


def test_nonfinite_example_is_zeroed_and_counted():
  loss_fn, params, (x, y) = _setup(batch=6)
  xb = x.at[2, 0].set(jnp.nan)
  total, stats = clipping.clipped_grad_sum_with_stats(loss_fn, params, (xb, y), 1.0)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(total))
  assert np.asarray(stats.nonfinite).tolist() == [False, False, True, False, False, False]
  keep = np.array([0, 1, 3, 4, 5])
  ref, _ = clipping.clipped_grad_sum(loss_fn, params, (x[keep], y[keep]), 1.0)
  for a, b in zip(jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_microbatching_does_not_change_the_sum():
  loss_fn, params, (x, y) = _setup(batch=24)
  mask = jnp.arange(24) < 20
  full, n1 = clipping.clipped_grad_sum(loss_fn, params, (x, y), 0.7, mask)
  micro, n2 = clipping.clipped_grad_sum(loss_fn, params, (x, y), 0.7, mask, microbatch_size=8)
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(micro)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(n1, n2, rtol=1e-6)


def test_no_clipping_is_the_plain_sum():
  loss_fn, params, (x, y) = _setup(batch=10)
  total, _ = clipping.clipped_grad_sum(loss_fn, params, (x, y), None)
  ref = jax.grad(lambda p: sum(loss_fn(p, (x[i], y[i])) for i in range(10)))(params)
  for a, b in zip(jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rejects_non_positive_clip():
  loss_fn, params, batch = _setup(batch=2)
  with pytest.raises(ValueError, match="l2_norm_clip"):
    clipping.clipped_grad_sum(loss_fn, params, batch, 0.0)


# ------------------------------------------------------- against the previous implementation
# fastdp_jax.dp.clipping now calls jax_privacy.clipping.clipped_grad. This is the hand-written
# computation it replaced (per-example vmap of grad, one norm per example, factor
# min(1, C / norm) set to 0 for padding and non-finite rows, where() so that 0 * inf is not
# NaN), kept here as the reference.
def _previous_terms(loss_fn, params, batch, l2_norm_clip, mask):
  """The per-example clipped gradients [batch, ...] and ClipStats of the previous code."""
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
  leaves = jax.tree_util.tree_leaves(grads)
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves))
  nonfinite = ~jnp.isfinite(norms)
  factor = jnp.minimum(1.0, l2_norm_clip / jnp.where(norms > 0, norms, 1.0))
  factor = jnp.where(nonfinite | ~mask, 0.0, factor)
  terms = jax.tree_util.tree_map(
      lambda g: jnp.where(
          (factor > 0).reshape((-1,) + (1,) * (g.ndim - 1)),
          g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), 0), grads)
  return terms, clip_types.ClipStats(norms=jnp.where(mask & ~nonfinite, norms, 0.0),
                                   nonfinite=nonfinite & mask)


def _previous(loss_fn, params, batch, l2_norm_clip, mask, microbatch_size=None):
  n = mask.shape[0]
  chunk = lambda b, m: (lambda t, st: (jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), t), st))(
      *_previous_terms(loss_fn, params, b, l2_norm_clip, m))
  if microbatch_size is None:
    return chunk(batch, mask)
  chunks = n // microbatch_size
  reshape = lambda x: x.reshape((chunks, microbatch_size) + x.shape[1:])

  def body(acc, xs):
    s, st = chunk(*xs)
    return jax.tree_util.tree_map(jnp.add, acc, s), st

  total, st = jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, params),
                           (jax.tree_util.tree_map(reshape, batch), reshape(mask)))
  return total, clip_types.ClipStats(norms=st.norms.reshape(n), nonfinite=st.nonfinite.reshape(n))


def _hostile_batch(batch=24, d=5, seed=3):
  """Ordinary rows, a NaN row, an inf row, a row whose gradient is finite but whose squared
  norm overflows float32 (features 1e20), a zero-gradient row, and padding with garbage."""
  loss_fn, params, (x, y) = _setup(seed=seed, batch=batch, d=d)
  apply_fn, _ = models.functional(models.create_model(d, (7,), seed))
  x = x.at[2, 0].set(jnp.nan).at[5, 1].set(jnp.inf).at[7].set(1e20)
  # Row 7's prediction saturates; the label that disagrees with it keeps its gradient huge.
  y = y.at[7].set(float(apply_fn(params, x[7:8]).ravel()[0] < 0))
  x = x.at[9].set(0.0)
  mask = jnp.arange(batch) < batch - 4
  x = x.at[batch - 4:].set(jnp.inf)  # padding: never reaches the sum
  return loss_fn, params, (x, y), mask


@pytest.mark.parametrize("clip", [0.05, 1e6])  # most rows clipped; none clipped
@pytest.mark.parametrize("microbatch_size", [None, 8])
@pytest.mark.parametrize("jit", [False, True])
def test_equal_to_the_previous_implementation(clip, microbatch_size, jit):
  loss_fn, params, batch, mask = _hostile_batch()
  new = lambda p: clipping.clipped_grad_sum_with_stats(loss_fn, p, batch, clip, mask,
                                                       microbatch_size=microbatch_size)
  old = lambda p: _previous(loss_fn, p, batch, clip, mask, microbatch_size)
  if jit:
    new, old = jax.jit(new), jax.jit(old)
  (got, got_stats), (want, want_stats) = new(params), old(params)
  # Which rows count, are zeroed and report a norm: exactly the same.
  np.testing.assert_array_equal(np.asarray(got_stats.nonfinite),
                                np.asarray(want_stats.nonfinite))
  assert np.asarray(got_stats.nonfinite).nonzero()[0].tolist() == [2, 5, 7]  # the premise
  np.testing.assert_array_equal(np.asarray(got_stats.norms) == 0,
                                np.asarray(want_stats.norms) == 0)
  # The one difference is the order in which XLA adds the P squares of a norm (clipped_grad
  # reduces each [a, b] leaf over both axes, the old code over the flattened leaf; seen: 1 ulp
  # on some rows). Each squared norm is then within P u of the exact one (Higham, Accuracy and
  # Stability, 4.2: P - 1 additions and the rounding of each square; u = 2**-24), so the two
  # norms differ by at most P u relative plus the sqrt's rounding on each side: (P + 2) u.
  # C / norm adds 2 roundings and the product g * factor 2 more: each clipped term differs by
  # at most (P + 6) u relative, and the batch sums, if added in other orders, by
  # 2 (B - 1) u sum|t_i| more (first order in u throughout; B = 24 rows).
  u = np.finfo(np.float32).eps / 2
  num_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(params))
  np.testing.assert_allclose(np.asarray(got_stats.norms), np.asarray(want_stats.norms),
                             rtol=(num_params + 2) * u, atol=0)
  terms, _ = _previous_terms(loss_fn, params, batch, clip, mask)
  scale = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda t: jnp.sum(jnp.abs(t), 0),
                                                           terms))
  for a, b, s in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), scale):
    atol = ((num_params + 6) + 2 * (mask.shape[0] - 1)) * u * np.asarray(s)
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= atol)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(got))


def test_unclipped_sum_is_bit_identical_to_the_previous_implementation():
  """Where no row is clipped (C above every norm) the norms play no part: the sums are the
  same bits, padding, NaN, inf and overflowing rows included."""
  loss_fn, params, batch, mask = _hostile_batch()
  got, _ = clipping.clipped_grad_sum_with_stats(loss_fn, params, batch, 1e6, mask)
  want, _ = _previous(loss_fn, params, batch, 1e6, mask)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_row_with_one_nan_coordinate_is_dropped_whole():
  """jax_privacy's nan_safe alone would keep the finite coordinates of a partly-NaN gradient;
  ours drops the whole example, so the sum equals the sum without that row."""
  loss_fn, params, (x, y) = _setup(batch=6)
  # NaN in one feature: only the first-layer weights of that feature get a NaN gradient, the
  # bias gradients stay finite.
  g = jax.grad(loss_fn)(params, (x.at[3, 0].set(jnp.nan)[3], y[3]))
  leaves = jax.tree_util.tree_leaves(g)
  assert any(bool(jnp.all(jnp.isfinite(v))) for v in leaves)  # the premise: partly finite
  assert any(not bool(jnp.all(jnp.isfinite(v))) for v in leaves)
  mask = jnp.ones(6, bool)
  with_nan, stats = clipping.clipped_grad_sum_with_stats(
      loss_fn, params, (x.at[3, 0].set(jnp.nan), y), 1.0, mask)
  without, _ = clipping.clipped_grad_sum_with_stats(loss_fn, params, (x, y), 1.0,
                                                    mask.at[3].set(False))
  assert np.asarray(stats.nonfinite).nonzero()[0].tolist() == [3]
  for a, b in zip(jax.tree_util.tree_leaves(with_nan), jax.tree_util.tree_leaves(without)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

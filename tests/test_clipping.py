"""Guarantees of per-example clipping: norms <= C, padding contributes zero, equals a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastdp_jax import clipping
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

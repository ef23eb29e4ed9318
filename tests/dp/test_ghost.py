"""Ghost-norm clipping equals vmap clipping; the dp.clipping dispatch picks and refuses right."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastdp_jax.dp import clipping
from fastdp_jax.dp import ghost
from fastdp_jax import models
from fastdp_jax.dp import noise
from fastdp_jax import parallel
from fastdp_jax.dp import sampling
from fastdp_jax import step as step_lib

RTOL = 1e-5  # float32; measured differences are about 1e-7 (summation order only)


def _model(d, hidden, seed):
  model = models.create_model(d, hidden, seed)
  apply_fn, params = models.functional(model)
  return model, apply_fn, params, models.example_loss(apply_fn)


def _batch(rng, n, d, scale=2.0):
  x = rng.normal(size=(n, d)).astype(np.float32) * scale
  y = (rng.random(n) < 0.5).astype(np.float32)
  return x, y


def _assert_trees_close(got, want, rtol=RTOL):
  """Leaf-wise: ||got - want|| <= rtol * ||want||, and elementwise within rtol of the leaf's
  largest entry (elementwise relative error is meaningless where entries cancel to ~0)."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    assert np.all(np.isfinite(g))
    scale = np.abs(w).max()
    assert np.linalg.norm(g - w) <= rtol * np.linalg.norm(w) + 1e-30
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def _both(loss_fn, params, batch, clip, mask):
  want, want_stats = jax.jit(lambda p: clipping.clipped_grad_sum_with_stats(
      loss_fn, p, batch, clip, mask))(params)
  got, got_stats = jax.jit(lambda p: ghost.ghost_clipped_sum(clip)(p, batch, mask))(params)
  return (got, got_stats), (want, want_stats)


@pytest.mark.parametrize("d,hidden", [(9, (50,)), (5, ()), (6, (7, 3)), (12, (16, 16, 8))])
def test_forward_is_the_models_forward(d, hidden):
  _, apply_fn, params, _ = _model(d, hidden, seed=3)
  x, _ = _batch(np.random.default_rng(0), 17, d)
  logits, inputs = models.mlp_forward(params, x)
  np.testing.assert_allclose(logits, apply_fn(params, x), rtol=1e-6, atol=1e-6)
  assert [a.shape[1] for a in inputs] == [d, *hidden]


@pytest.mark.parametrize("seed,d,hidden,n,clip", [
    (0, 9, (50,), 64, 0.1),
    (1, 9, (50,), 64, 3.0),
    (2, 5, (), 33, 0.5),
    (3, 6, (7, 3), 40, 1.0),
    (4, 12, (32, 16), 48, 1e3),   # nothing clipped
    (5, 8, (16,), 20, 1e-4),      # everything clipped
])
def test_ghost_equals_vmap_on_random_models_batches_and_masks(seed, d, hidden, n, clip):
  rng = np.random.default_rng(seed)
  _, _, params, loss_fn = _model(d, hidden, seed)
  x, y = _batch(rng, n, d, scale=rng.uniform(0.5, 4))
  mask = rng.random(n) < 0.7
  (got, got_stats), (want, want_stats) = _both(loss_fn, params, (x, y), clip, mask)
  _assert_trees_close(got, want)
  np.testing.assert_allclose(got_stats.norms, want_stats.norms, rtol=RTOL, atol=1e-7)
  assert not np.any(np.asarray(got_stats.norms)[~mask])  # padding reports norm 0
  assert not np.any(got_stats.nonfinite)
  want_losses = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))(params, (x, y))
  np.testing.assert_allclose(got_stats.losses, want_losses, rtol=1e-5, atol=1e-6)


def test_zero_norm_examples_count_as_unclipped_and_contribute_zero():
  rng = np.random.default_rng(7)
  _, apply_fn, params, loss_fn = _model(6, (10,), seed=7)
  x, y = _batch(rng, 24, 6)
  # Saturate some examples: a huge input gives a huge logit; with the label on the same side,
  # the BCE gradient sigmoid(z) - y is exactly 0 in float32, so the whole gradient is 0.
  zero_rows = np.array([0, 5, 11])
  x[zero_rows] *= 1e4
  y[zero_rows] = (np.asarray(apply_fn(params, x[zero_rows])) > 0).astype(np.float32)
  mask = np.ones(24, bool)
  (got, got_stats), (want, want_stats) = _both(loss_fn, params, (x, y), 0.3, mask)
  assert np.all(np.asarray(want_stats.norms)[zero_rows] == 0)  # the premise of this test
  assert np.all(np.asarray(got_stats.norms)[zero_rows] == 0)
  _assert_trees_close(got, want)
  # Only zero-norm examples: the clipped sum is exactly zero, not NaN (no 0/0).
  only, stats = jax.jit(ghost.ghost_clipped_sum(0.3))(params, (x[zero_rows], y[zero_rows]),
                                                       np.ones(3, bool))
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(only))
  assert not np.any(stats.nonfinite)


def test_padding_and_non_finite_rows_contribute_exactly_zero():
  rng = np.random.default_rng(8)
  _, _, params, loss_fn = _model(7, (12,), seed=8)
  x, y = _batch(rng, 16, 7)
  mask = np.ones(16, bool)
  mask[[2, 9]] = False
  x[2] = np.nan            # padding row with garbage: ignored, not counted as non-finite
  x[4, 1] = np.nan         # real rows with non-finite features: zeroed and counted
  x[6, 0] = np.inf
  (got, got_stats), (want, want_stats) = _both(loss_fn, params, (x, y), 1.0, mask)
  _assert_trees_close(got, want)
  np.testing.assert_array_equal(got_stats.nonfinite, want_stats.nonfinite)
  assert set(np.flatnonzero(got_stats.nonfinite)) == {4, 6}
  clean = np.ones(16, bool)
  clean[[2, 9, 4, 6]] = False
  ref, _ = jax.jit(lambda p: ghost.ghost_clipped_sum(1.0)(
      p, (np.where(clean[:, None], x, 0), y), clean))(params)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)  # exactly: those rows add zeros


def test_each_example_contributes_at_most_c():
  rng = np.random.default_rng(9)
  _, _, params, loss_fn = _model(5, (8,), seed=9)
  x, y = _batch(rng, 10, 5, scale=5.0)
  clip = 0.2
  fn = jax.jit(ghost.ghost_clipped_sum(clip))
  for i in range(10):
    total, stats = fn(params, (x, y), np.arange(10) == i)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(total)))
    assert norm == pytest.approx(min(float(stats.norms[i]), clip), rel=1e-5)


class _Scaled(nnx.Module):
  """A model with a parametrised layer that is not dense: ghost must refuse it."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 1, rngs=rngs)
    self.norm = nnx.LayerNorm(3, rngs=rngs)

  def __call__(self, x):
    return self.dense(self.norm(x))[..., 0]


def test_dispatch_auto_ghost_vmap():
  mlp = models.create_model(4, (6,), 0)
  assert ghost.unsupported_layers(mlp) == []
  assert clipping.resolve_method("auto", mlp) == "ghost"
  assert clipping.resolve_method("ghost", mlp) == "ghost"
  assert clipping.resolve_method("vmap", mlp) == "vmap"
  other = _Scaled(nnx.Rngs(0))
  problems = ghost.unsupported_layers(other)
  assert any("norm" in p and "LayerNorm" in p for p in problems)
  assert clipping.resolve_method("auto", other) == "vmap"
  with pytest.raises(ValueError, match="does not support"):
    clipping.resolve_method("ghost", other)
  with pytest.raises(ValueError, match="dp.clipping='fast'"):
    clipping.resolve_method("fast", mlp)
  with pytest.raises(ValueError, match="must be positive"):
    ghost.ghost_clipped_sum(0.0)


def test_auto_falls_back_to_vmap_that_works_on_the_other_model():
  other = _Scaled(nnx.Rngs(1))
  apply_fn, params = models.functional(other)
  loss_fn = models.example_loss(apply_fn)
  x, y = _batch(np.random.default_rng(1), 8, 3)
  fn = clipping.make_clipped_sum("auto", other, loss_fn, 0.5)
  got, stats = jax.jit(fn)(params, (x, y), np.ones(8, bool))
  want, norms = jax.jit(lambda p: clipping.clipped_grad_sum(loss_fn, p, (x, y), 0.5))(params)
  _assert_trees_close(got, want)
  np.testing.assert_allclose(stats.norms, norms, rtol=1e-6)


def test_make_clipped_sum_dispatches_and_non_private_is_the_plain_sum():
  model, _, params, loss_fn = _model(6, (9,), 2)
  x, y = _batch(np.random.default_rng(2), 12, 6)
  mask = np.arange(12) < 10
  want, _ = jax.jit(lambda p: clipping.clipped_grad_sum(loss_fn, p, (x, y), 0.7, mask))(params)
  for method in ("auto", "ghost", "vmap"):
    got, _ = jax.jit(clipping.make_clipped_sum(method, model, loss_fn, 0.7))(params, (x, y), mask)
    _assert_trees_close(got, want)
  plain, _ = jax.jit(clipping.make_clipped_sum("auto", model, loss_fn, None))(params, (x, y), mask)
  per_example = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(params, (x[:10], y[:10]))
  _assert_trees_close(plain, jax.tree_util.tree_map(lambda g: g.sum(0), per_example))


def test_training_steps_with_ghost_equal_vmap():
  """The compiled multi-update step gives the same parameters with either method."""
  rng = np.random.default_rng(5)
  model, _, params, loss_fn = _model(9, (20,), 5)
  n, batch, steps = 2000, 64, 6
  x, y = _batch(rng, n, 9)
  mesh = parallel.make_mesh(jax.devices()[:1])
  dev = parallel.place_training_data(mesh, x, y)
  sampler = sampling.PoissonSampler(n, batch, 0, shard_bounds=dev.bounds)
  b = sampler.batches(0, steps)
  results = {}
  for method in ("ghost", "vmap"):
    tx = optax.chain(noise.privatize(1.0, 0.5, batch, noise.noise_key(0)[0]), optax.sgd(0.5))
    run = step_lib.build_train_chunk(
        mesh, loss_fn, clipping.make_clipped_sum(method, model, loss_fn, 1.0), tx, 1.0)
    state = step_lib.State(params=params, opt_state=tx.init(params),
                           step=jnp.zeros((), jnp.int32))
    state, m = run(state, dev.features, dev.labels, b.indices, b.mask, np.ones(steps, bool))
    results[method] = (jax.device_get(state.params), jax.device_get(m))
  # Compare the parameters' changes (the noise is identical: same key, same updates).
  delta = lambda p: jax.tree_util.tree_map(jnp.subtract, p, params)
  _assert_trees_close(delta(results["ghost"][0]), delta(results["vmap"][0]))
  for key in ("count", "clipped", "nonfinite"):
    np.testing.assert_array_equal(results["ghost"][1][key], results["vmap"][1][key])
  np.testing.assert_allclose(results["ghost"][1]["loss_sum"], results["vmap"][1]["loss_sum"],
                             rtol=1e-5)


# --- every task, and embedding layers ----------------------------------------------------------
# Tolerance for the tests below, derived: both methods compute the same float32 products and
# sums, in a different order (per-example gradients then a sum, against a^T @ (c g) and a
# scatter-add). A sum of n float32 terms in two orders differs by at most about
# 2 n eps sum|terms| (eps = 2**-24 ~ 6e-8); with n <= 64 examples per batch that is
# 64 * 2 * 6e-8 ~ 8e-6 of the leaf's scale when the terms do not cancel, so RTOL = 1e-5
# relative to the leaf's largest entry (and its norm) is the bound, not a guess; norms are one
# sqrt of a sum of a few dozen squares: the same bound.
HEADS = {
    "multiclass": models.TaskHead("multiclass", num_classes=4),
    "regression": models.TaskHead("regression", bounds=(-3.0, 5.0)),
    "huber": models.TaskHead("regression", bounds=(0.0, 10.0), huber_delta=0.2),
    "binary": models.BINARY,
}


def _task_model(d, hidden, seed, head, embeddings=()):
  model = models.create_model(d, hidden, seed, num_outputs=head.num_outputs,
                              embeddings=embeddings)
  apply_fn, params = models.functional(model)
  return model, apply_fn, params, models.example_loss(apply_fn, head)


def _task_batch(rng, n, d, head, embeddings=(), scale=2.0):
  x = rng.normal(size=(n, d)).astype(np.float32) * scale
  for e in embeddings:
    x[:, e.index] = rng.integers(0, e.vocab_size, n)
  if head.kind == "multiclass":
    y = rng.integers(0, head.num_classes, n).astype(np.float32)
  elif head.kind == "regression":
    y = rng.uniform(*head.bounds, n).astype(np.float32)
  else:
    y = (rng.random(n) < 0.5).astype(np.float32)
  return x, y


def _ghost_and_vmap(model, loss_fn, head, params, batch, clip, mask):
  want, want_stats = jax.jit(lambda p: clipping.clipped_grad_sum_with_stats(
      loss_fn, p, batch, clip, mask))(params)
  fn = clipping.make_clipped_sum("ghost", model, loss_fn, clip, head=head)
  got, got_stats = jax.jit(fn)(params, batch, mask)
  return (got, got_stats), (want, want_stats)


EMB_A = (models.EmbeddingInput(index=1, vocab_size=5, dim=3),)
# Two tables, the id columns not adjacent, a vocabulary smaller than the batch (ids repeat
# across examples) and the same id values in both columns (different tables).
EMB_B = (models.EmbeddingInput(index=0, vocab_size=3, dim=4),
         models.EmbeddingInput(index=4, vocab_size=3, dim=2))


@pytest.mark.parametrize("task,d,hidden,embeddings,n,clip", [
    ("multiclass", 9, (16,), (), 48, 0.5),
    ("multiclass", 6, (), (), 33, 1e3),      # softmax regression, nothing clipped
    ("multiclass", 7, (8, 5), EMB_B, 40, 0.3),
    ("regression", 9, (16,), (), 48, 0.5),
    ("regression", 5, (), EMB_A, 30, 0.2),   # linear regression with an embedding
    ("huber", 8, (12,), EMB_B, 64, 1.0),
    ("binary", 6, (10,), EMB_A, 40, 0.4),
    ("binary", 6, (), EMB_B, 40, 1e-4),      # logistic regression, everything clipped
])
def test_ghost_equals_vmap_for_every_task_and_embeddings(task, d, hidden, embeddings, n, clip):
  head = HEADS[task]
  rng = np.random.default_rng([d, n, len(task)])  # fixed: no str hash (randomised per run)
  model, _, params, loss_fn = _task_model(d, hidden, n, head, embeddings)
  x, y = _task_batch(rng, n, d, head, embeddings)
  mask = rng.random(n) < 0.75
  (got, got_stats), (want, want_stats) = _ghost_and_vmap(model, loss_fn, head, params, (x, y),
                                                         clip, mask)
  _assert_trees_close(got, want)
  np.testing.assert_allclose(got_stats.norms, want_stats.norms, rtol=RTOL, atol=1e-7)
  assert not np.any(np.asarray(got_stats.norms)[~mask])
  want_losses = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))(params, (x, y))
  np.testing.assert_allclose(got_stats.losses, want_losses, rtol=RTOL, atol=1e-6)
  if embeddings:  # the premise: the tables do receive gradient, from several examples a row
    assert all(np.abs(np.asarray(t["embedding"])).max() > 0 for t in got["tables"].values())


def test_embedding_norm_is_the_row_gradient_norm():
  """Example i's table gradient is onehot(id_i) outer g_i: its norm is ||g_i||, alone."""
  head = HEADS["multiclass"]
  model, apply_fn, params, loss_fn = _task_model(4, (), 0, head, EMB_A)
  x, y = _task_batch(np.random.default_rng(3), 6, 4, head, EMB_A)
  per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, (x, y))
  table = np.asarray(per_example["tables"][0]["embedding"])  # [n, vocab, dim]
  ids = x[:, 1].astype(int)
  for i in range(6):
    others = np.delete(table[i], ids[i], axis=0)
    assert not others.any()  # only the looked-up row is non-zero
  # The tables' share of each example's squared norm, computed as ghost does it: ||g_i||^2
  # where g_i is the loss gradient with respect to the looked-up row.
  graphdef, _ = nnx.split(model, nnx.Param)

  def loss_of_rows(tap, i):
    out, _ = models.mlp_forward(params, x[i:i + 1], graphdef=graphdef, table_taps=[tap])
    return head.losses(out, y[i:i + 1])[0]

  for i in range(6):
    g = jax.grad(loss_of_rows)(jnp.zeros((1, 3)), i)
    np.testing.assert_allclose(np.sum(table[i] ** 2), np.sum(np.asarray(g) ** 2), rtol=RTOL)


def test_ghost_with_embeddings_padding_and_non_finite_rows_contribute_exactly_zero():
  head = HEADS["multiclass"]
  model, _, params, loss_fn = _task_model(7, (8,), 4, head, EMB_B)
  x, y = _task_batch(np.random.default_rng(4), 16, 7, head, EMB_B)
  mask = np.ones(16, bool)
  mask[[3, 8]] = False
  x[5, 2] = np.nan  # a real row with a non-finite dense feature: zeroed and counted
  (got, got_stats), (want, want_stats) = _ghost_and_vmap(model, loss_fn, head, params,
                                                         (x, y), 0.5, mask)
  _assert_trees_close(got, want)
  assert set(np.flatnonzero(got_stats.nonfinite)) == {5}
  clean = mask.copy()
  clean[5] = False
  fn = jax.jit(clipping.make_clipped_sum("ghost", model, loss_fn, 0.5, head=head))
  ref, _ = fn(params, (np.where(clean[:, None], x, 0), y), clean)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_dispatch_accepts_embeddings_and_wide_heads():
  model, _, _, _ = _task_model(7, (8,), 0, HEADS["multiclass"], EMB_B)
  assert ghost.unsupported_layers(model) == []
  assert clipping.resolve_method("auto", model) == "ghost"


@pytest.mark.parametrize("task", ["multiclass", "huber"])
def test_each_example_contributes_at_most_c_with_embeddings(task):
  """The sensitivity of the clipped sum: one example's share, tables included, is
  min(norm_i, C) (within the float32 bound RTOL derived above)."""
  head = HEADS[task]
  model, _, params, loss_fn = _task_model(6, (8,), 11, head, EMB_B)
  x, y = _task_batch(np.random.default_rng(11), 10, 6, head, EMB_B, scale=5.0)
  clip = 0.2
  fn = jax.jit(clipping.make_clipped_sum("ghost", model, loss_fn, clip, head=head))
  for i in range(10):
    total, stats = fn(params, (x, y), np.arange(10) == i)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(total)))
    assert norm == pytest.approx(min(float(stats.norms[i]), clip), rel=RTOL)

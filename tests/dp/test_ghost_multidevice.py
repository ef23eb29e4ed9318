"""Ghost clipping in the distributed step (8 fake CPU devices, run in their own process)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastdp_jax.dp import clipping
from fastdp_jax import models
from fastdp_jax.dp import noise
from fastdp_jax import parallel
from fastdp_jax.dp import sampling
from fastdp_jax import step as step_lib

pytestmark = pytest.mark.multidevice

N, D, HIDDEN, BATCH, CLIP, STEPS = 4003, 9, (24,), 96, 0.5, 6


def _run(devices, method, strategy="shard_map"):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = (rng.random(N) < 0.6).astype(np.float32)
  # A sampled example with a non-finite feature: zeroed by both methods on whichever device.
  x[sampling.PoissonSampler(N, BATCH, key=1).global_indices(2)[-1], 2] = np.nan
  model = models.create_model(D, HIDDEN, 0)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  mesh = parallel.make_mesh(devices)
  dev = parallel.place_training_data(mesh, x, y)
  sampler = sampling.PoissonSampler(N, BATCH, key=1, shard_bounds=dev.bounds)
  b = sampler.batches(0, STEPS)
  tx = optax.chain(noise.privatize(CLIP, 0.7, BATCH, noise.noise_key(5)[0]), optax.sgd(0.5))
  kwargs = {} if strategy == "shard_map" else dict(strategy=strategy)
  run = step_lib.build_train_chunk(
      mesh, loss_fn, clipping.make_clipped_sum(method, model, loss_fn, CLIP), tx, CLIP, **kwargs)
  state = step_lib.State(params=params, opt_state=tx.init(params),
                         step=jnp.zeros((), jnp.int32))
  state, m = run(state, dev.features, dev.labels, b.indices, b.mask, np.ones(STEPS, bool))
  delta = jax.tree_util.tree_map(jnp.subtract, jax.device_get(state.params), params)
  return delta, jax.device_get(m)


def _close(a, b, rtol=1e-5):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert np.linalg.norm(u - v) <= rtol * np.linalg.norm(v)
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * np.abs(v).max())


@pytest.mark.parametrize("strategy", getattr(step_lib, "STRATEGIES", ("shard_map",)))
def test_ghost_equals_vmap_on_eight_devices_and_on_one(strategy):
  assert jax.device_count() == 8
  ghost8, m8 = _run(jax.devices(), "ghost", strategy)
  vmap8, v8 = _run(jax.devices(), "vmap", strategy)
  _close(ghost8, vmap8)
  others = [v8]
  if strategy == "shard_map":
    ghost1, m1 = _run(jax.devices()[:1], "ghost")
    _close(ghost8, ghost1)
    others.append(m1)
  for m in others:
    np.testing.assert_array_equal(m["count"], m8["count"])
    np.testing.assert_array_equal(m["nonfinite"], m8["nonfinite"])
  assert m8["nonfinite"].sum() == 1


def _run_task(devices, method, head, embeddings):
  """Like _run, for a task head wider than one unit and embedding tables."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N, D)).astype(np.float32)
  for e in embeddings:
    x[:, e.index] = rng.integers(0, e.vocab_size, N)
  y = (rng.integers(0, head.num_classes, N) if head.kind == "multiclass"
       else rng.uniform(*head.bounds, N)).astype(np.float32)
  model = models.create_model(D, HIDDEN, 0, num_outputs=head.num_outputs,
                              embeddings=embeddings)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn, head)
  mesh = parallel.make_mesh(devices)
  dev = parallel.place_training_data(mesh, x, y)
  b = sampling.PoissonSampler(N, BATCH, key=2, shard_bounds=dev.bounds).batches(0, STEPS)
  tx = optax.chain(noise.privatize(CLIP, 0.7, BATCH, noise.noise_key(6)[0]), optax.sgd(0.5))
  run = step_lib.build_train_chunk(
      mesh, loss_fn, clipping.make_clipped_sum(method, model, loss_fn, CLIP, head=head), tx, CLIP)
  state = step_lib.State(params=params, opt_state=tx.init(params),
                         step=jnp.zeros((), jnp.int32))
  state, m = run(state, dev.features, dev.labels, b.indices, b.mask, np.ones(STEPS, bool))
  return jax.tree_util.tree_map(jnp.subtract, jax.device_get(state.params), params)


@pytest.mark.parametrize("head", [models.TaskHead("multiclass", num_classes=4),
                                  models.TaskHead("regression", bounds=(0.0, 2.0))])
def test_ghost_with_embeddings_and_wide_heads_on_eight_devices_equals_one(head):
  embeddings = (models.EmbeddingInput(index=0, vocab_size=11, dim=4),
                models.EmbeddingInput(index=5, vocab_size=3, dim=2))
  ghost8 = _run_task(jax.devices(), "ghost", head, embeddings)
  # Same tolerance as _close's callers above: float32 sums of the same terms in another order.
  _close(ghost8, _run_task(jax.devices(), "vmap", head, embeddings))
  _close(ghost8, _run_task(jax.devices()[:1], "ghost", head, embeddings))

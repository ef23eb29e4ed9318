"""Ghost clipping in the distributed step (8 fake CPU devices, run in their own process)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastdp_jax import ghost
from fastdp_jax import models
from fastdp_jax import noise
from fastdp_jax import parallel
from fastdp_jax import sampling
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
      mesh, loss_fn, ghost.make_clipped_sum(method, model, loss_fn, CLIP), tx, CLIP, **kwargs)
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

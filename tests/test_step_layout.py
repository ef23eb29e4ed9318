"""The compiled step's hazards, by name (8 fake CPU devices, run in their own process).

``jax.shard_map``'s default ``check_vma=True`` would make the gradient of the replicated
parameters inside each device's per-example vmap the gradient of the SUM over devices: an
implicit all-reduce BEFORE clipping, so examples would no longer be clipped one by one. The
step turns it off (fastdp_jax/step.py, ``_shard_map_sum``); these tests fail if it is on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastdp_jax.dp import clipping
from fastdp_jax import models
from fastdp_jax.dp import noise
from fastdp_jax import parallel
from fastdp_jax import step as step_lib

pytestmark = pytest.mark.multidevice

N, D, HIDDEN, CLIP = 64, 5, (6,), 0.1


def _update(devices, strategy, x, y, idx_global):
  """The update -(sum of clipped gradients) of one batch (sigma 0, SGD at lr 1, mean over 1)."""
  mesh = parallel.make_mesh(devices)
  dev = parallel.place_training_data(mesh, x, y)
  model = models.create_model(D, HIDDEN, seed=0)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  tx = optax.chain(noise.privatize(CLIP, 0.0, 1.0, noise.noise_key(0)[0]), optax.sgd(1.0))
  run = step_lib.build_train_chunk(mesh, loss_fn,
                                   clipping.make_clipped_sum("vmap", model, loss_fn, CLIP), tx,
                                   CLIP, strategy)
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  k = run.layout.num_devices
  cap = len(idx_global)
  indices = np.zeros((1, k, cap), np.int32)
  mask = np.zeros((1, k, cap), bool)
  for j, i in enumerate(idx_global):  # each global row goes to the device that holds it
    d = int(np.searchsorted(dev.bounds, i, side="right") - 1)
    indices[0, d, j] = i - dev.bounds[d]
    mask[0, d, j] = True
  new, _ = run(state, dev.features, dev.labels, indices, mask, np.ones(1, bool))
  before = models.flatten_params(params)
  after = models.flatten_params(jax.device_get(new.params))
  return {k: np.asarray(before[k]) - np.asarray(after[k]) for k in before}, apply_fn, params


@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
def test_per_example_clipping_survives_the_device_axis(strategy):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32) * 5  # large gradients: every row is clipped
  y = (rng.random(N) < 0.5).astype(np.float32)
  batch = np.arange(0, N, 3)  # rows on every device
  one, apply_fn, params = _update(jax.devices()[:1], strategy, x, y, batch)
  eight, _, _ = _update(jax.devices(), strategy, x, y, batch)
  # The same sum of clipped gradients on 1 and 8 devices (float32 summation order apart:
  # |S| <= len(batch) * C, so 1e-5 relative to that bound).
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], rtol=0, atol=1e-5 * len(batch) * CLIP)
  # And each example counted once, within C: the sum equals the reference clipped sum.
  loss_fn = models.example_loss(apply_fn)
  ref, norms = clipping.clipped_grad_sum(loss_fn, params, (jnp.asarray(x[batch]),
                                                           jnp.asarray(y[batch])), CLIP)
  assert float(jnp.min(norms)) > CLIP
  ref = {k: np.asarray(v) for k, v in models.flatten_params(ref).items()}
  for k in one:
    np.testing.assert_allclose(eight[k], ref[k], rtol=0, atol=1e-5 * len(batch) * CLIP)

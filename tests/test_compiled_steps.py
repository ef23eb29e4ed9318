"""Compiled multi-update calls: same Poisson batches and same results as one update at a time;
one compilation per configuration, whatever the number of active updates in a call, and a
program whose size does not grow with the updates per call (a loop, not an unrolled body)."""

import contextlib
import functools

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

N, D, HIDDEN, BATCH, CLIP, SIGMA, STEPS = 3000, 9, (16,), 48, 1.0, 0.8, 13


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = (rng.random((N, D)) < 0.4).astype(np.float32)
  y = (rng.random(N) < 0.6).astype(np.float32)
  model = models.create_model(D, HIDDEN, 0)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  mesh = parallel.make_mesh(jax.devices()[:1])
  dev = parallel.place_training_data(mesh, x, y)
  sampler = sampling.PoissonSampler(N, BATCH, 3, shard_bounds=dev.bounds)
  s = dict(x=x, y=y, model=model, params=params, loss_fn=loss_fn, mesh=mesh, dev=dev,
           sampler=sampler)
  s["train"] = functools.lru_cache(lambda *a: _train(s, *a))  # each setting compiles once
  return s


def _tx():
  # Momentum: the optimizer state must carry across calls too.
  return optax.chain(noise.privatize(CLIP, SIGMA, BATCH, noise.noise_key(11)[0]),
                     optax.sgd(0.1, momentum=0.9))


def _init(params, tx):
  return step_lib.State(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def _train(s, steps_per_call, method="ghost"):
  """Runs STEPS updates in calls of ``steps_per_call``, as the training loop does."""
  tx = _tx()
  run = step_lib.build_train_chunk(
      s["mesh"], s["loss_fn"], clipping.make_clipped_sum(method, s["model"], s["loss_fn"], CLIP),
      tx, CLIP)
  state, step, counts = _init(s["params"], tx), 0, []
  while step < STEPS:
    k = min(steps_per_call, STEPS - step)
    b = s["sampler"].batches(step, k)
    pad = ((0, steps_per_call - k), (0, 0), (0, 0))
    state, m = run(state, s["dev"].features, s["dev"].labels, np.pad(b.indices, pad),
                   np.pad(b.mask, pad), np.arange(steps_per_call) < k)
    counts.extend(np.asarray(m["count"])[:k])
    step += k
  return jax.device_get(state), np.asarray(counts)


def _close(a, b, rtol=1e-6):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * float(np.abs(v).max()))


def test_one_update_per_call_equals_many_per_call(setup):
  one, counts_one = setup["train"](1, "ghost")
  # 13 = 8 + 5: the second call runs 5 active updates of its 8 (no recompilation).
  many, counts_many = setup["train"](8, "ghost")
  _close(many.params, one.params)
  _close(many.opt_state, one.opt_state)
  assert int(many.step) == int(one.step) == STEPS
  np.testing.assert_array_equal(counts_one, counts_many)


def test_compiled_updates_equal_a_step_by_step_reference(setup):
  """Same Poisson batches and same updates as a plain loop over steps: update t clips over
  exactly the rows in ``global_indices(t)`` (here as a mask over all N rows, not padded
  indices), adds the noise of update t and applies the optimizer."""
  s = setup
  tx = _tx()
  loss_fn = s["loss_fn"]

  @jax.jit
  def reference_step(params, opt_state, included):
    grads, _ = clipping.clipped_grad_sum(loss_fn, params, (s["x"], s["y"]), CLIP, included)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = s["params"], tx.init(s["params"])
  sizes = []
  for t in range(STEPS):
    included = np.zeros(N, bool)
    included[s["sampler"].global_indices(t)] = True
    sizes.append(included.sum())
    params, opt_state = reference_step(params, opt_state, included)
  for method in ("ghost", "vmap"):
    state, counts = s["train"](8, method)
    np.testing.assert_array_equal(counts, sizes)  # the same Poisson batch sizes
    _close(state.params, params, rtol=1e-5)
    assert int(state.opt_state[0].count) == STEPS  # one noise draw per update


@contextlib.contextmanager
def _count_compilations(fun_name):
  """Counts XLA compilations of the jitted function ``fun_name`` (JAX's monitoring events)."""
  names = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  names[:] = [n for n in names if n == fun_name]


def test_a_call_compiles_once_whatever_its_number_of_active_updates(setup):
  s = setup
  tx = _tx()
  run = step_lib.build_train_chunk(
      s["mesh"], s["loss_fn"], clipping.make_clipped_sum("ghost", s["model"], s["loss_fn"], CLIP),
      tx, CLIP)
  # Placed on the mesh as train.py places it: a call's output state has this placement too.
  state, steps_per_call = parallel.replicate(s["mesh"], _init(s["params"], tx)), 8
  with _count_compilations("jit(jitted)") as compiled:  # build_train_chunk's jitted function
    for first, active in ((0, 8), (8, 5), (13, 1)):  # a full call, a short one, a single update
      b = s["sampler"].batches(first, active)
      pad = ((0, steps_per_call - active), (0, 0), (0, 0))
      state, _ = run(state, s["dev"].features, s["dev"].labels, np.pad(b.indices, pad),
                     np.pad(b.mask, pad), np.arange(steps_per_call) < active)
    jax.block_until_ready(state)
  assert compiled == ["jit(jitted)"]
  assert int(state.step) == 8 + 5 + 1


@pytest.mark.parametrize("name,d,hidden,batch,method", [
    ("W2 ghost", 128, (1024, 1024), 1024, "auto"),
    ("W1 vmap", 9, (50,), 256, "vmap"),
])
def test_program_size_does_not_grow_with_updates_per_call(name, d, hidden, batch, method):
  """128 updates per call lower to the same program as 2: one loop body, not 128 copies (an
  unrolled body would make compiling a new configuration take 64 times longer)."""
  n = 4 * batch
  model = models.create_model(d, hidden, 1)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  mesh = parallel.make_mesh(jax.devices()[:1])
  dev = parallel.place_training_data(mesh, np.zeros((n, d), np.float32), np.zeros(n, np.float32))
  sampler = sampling.PoissonSampler(n, batch, 0, shard_bounds=dev.bounds)
  b = sampler.batches(0, 1)
  tx = optax.chain(noise.privatize(1.0, 1.0, batch, noise.noise_key(0)[0]), optax.sgd(0.1))
  run = step_lib.build_train_chunk(mesh, loss_fn,
                                   clipping.make_clipped_sum(method, model, loss_fn, 1.0), tx, 1.0)
  state = _init(params, tx)
  sizes = {}
  for steps_per_call in (2, 128):
    idx = np.repeat(b.indices, steps_per_call, axis=0)
    mask = np.repeat(b.mask, steps_per_call, axis=0)
    text = run.lower(state, dev.features, dev.labels, idx, mask,
                     np.ones(steps_per_call, bool)).as_text()
    sizes[steps_per_call] = len(text.splitlines())  # one operation per line
  assert sizes[128] == sizes[2], f"{name}: {sizes}"


# --- padding microbatches (config ``padding_microbatch``) ----------------------------------------
U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff


def _padded_batch(s, step=0):
  """Update ``step``'s local indices and mask [capacity] (real rows first, then padding)."""
  b = s["sampler"].batches(step, 1)
  return jnp.asarray(b.indices[0, 0]), jnp.asarray(b.mask[0, 0])


def _summation_bound(s, idx, mask, clip):
  """A bound on |whole-batch - microbatched| for every coordinate of the clipped sum.

  Both compute sum_i t_i over the same K = capacity rows, t_i example i's (clipped) gradient,
  in different orders (the microbatches split the row reduction of ``a^T (c g)``): each is
  within gamma_K * sum_i |t_i| of the exact sum (Higham, Accuracy and Stability of Numerical
  Algorithms, eq. 3.5), gamma_n = n u / (1 - n u). Each t_i's factors come from dot products
  and norms that either path may block differently: at most L = 3 (d + sum(hidden) + 1)
  more roundings in a row (forward, backward and the norm's sum of squares over each layer's
  fan-in). Two paths: 2 gamma_(K + L) sum_i |t_i|, first order in u.
  """
  x, y = s["dev"].features[idx], s["dev"].labels[idx]
  per_example = jax.vmap(jax.grad(s["loss_fn"]), in_axes=(None, 0))(s["params"], (x, y))
  sq = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
           for g in jax.tree_util.tree_leaves(per_example))
  factor = jnp.where(mask, 1.0 if clip is None else jnp.minimum(1.0, clip / jnp.sqrt(sq)), 0.0)
  total = jax.tree_util.tree_map(
      lambda g: jnp.sum(jnp.abs(g) * factor.reshape((-1,) + (1,) * (g.ndim - 1)), axis=0),
      per_example)
  n = mask.shape[0] + 3 * (D + sum(HIDDEN) + 1)
  gamma = n * U / (1 - n * U)
  return jax.tree_util.tree_map(lambda t: 2 * gamma * t, total)


@pytest.mark.parametrize("method,clip", [("ghost", CLIP), ("vmap", CLIP), ("ghost", None)])
def test_padding_microbatches_equal_one_pass_over_the_padded_batch(setup, method, clip):
  """The per-device clipped sum and metrics in microbatches of 8 (the capacity is not a
  multiple of 8: the step pads it) equal one pass, within the summation bound; the counts
  exactly. ``clip=None``: the non-private sum."""
  s = setup
  clipped = clipping.make_clipped_sum(method, s["model"], s["loss_fn"], clip)
  idx, mask = _padded_batch(s)
  assert mask.shape[0] % 8 and not mask[-8:].any()  # a ragged tail and trailing padding
  whole = step_lib._per_device(s["loss_fn"], clipped, clip)
  parts = step_lib._per_device(s["loss_fn"], clipped, clip, microbatch=8)
  args = (s["params"], s["dev"].features, s["dev"].labels, idx, mask)
  (g_whole, m_whole), (g_parts, m_parts) = jax.jit(whole)(*args), jax.jit(parts)(*args)
  bound = _summation_bound(s, idx, mask, clip)
  for a, b, tol in zip(*(jax.tree_util.tree_leaves(t) for t in (g_whole, g_parts, bound))):
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= np.asarray(tol))
  for key in ("count", "clipped", "nonfinite"):  # integers held in float32: exact
    assert float(m_parts[key]) == float(m_whole[key])
  # The loss sum: sum of K per-example losses, each computed by either blocking (as above).
  loss_bound = 2 * (mask.shape[0] + 3 * (D + sum(HIDDEN) + 1)) * U * float(
      jnp.sum(jnp.where(mask, jnp.abs(jax.vmap(s["loss_fn"], in_axes=(None, 0))(
          s["params"], (s["dev"].features[idx], s["dev"].labels[idx]))), 0.0)))
  assert abs(float(m_parts["loss_sum"]) - float(m_whole["loss_sum"])) <= loss_bound


def test_all_padding_microbatches_are_skipped_and_change_nothing(setup):
  """Only the microbatches up to the last real row run (counted by a host callback in the
  clipping), and appending all-padding microbatches leaves the sum unchanged, bit for bit."""
  s = setup
  calls = []
  inner = clipping.make_clipped_sum("ghost", s["model"], s["loss_fn"], CLIP)

  def counting(params, batch, mask):
    jax.debug.callback(lambda: calls.append(1))
    return inner(params, batch, mask)

  idx, mask = _padded_batch(s, step=3)
  real = int(mask.sum())
  fn = jax.jit(step_lib._per_device(s["loss_fn"], counting, CLIP, microbatch=8))
  args = (s["params"], s["dev"].features, s["dev"].labels)
  out = jax.block_until_ready(fn(*args, idx, mask))
  assert len(calls) == -(-real // 8) < -(-mask.shape[0] // 8)
  longer = jax.block_until_ready(fn(*args, jnp.pad(idx, (0, 24)), jnp.pad(mask, (0, 24))))
  assert len(calls) == 2 * -(-real // 8)  # the 3 extra microbatches never ran
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(longer)):
    np.testing.assert_array_equal(a, b)
  empty = jax.block_until_ready(fn(*args, idx, jnp.zeros_like(mask)))  # no real row: no work
  assert len(calls) == 2 * -(-real // 8)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree_util.tree_leaves(empty))


def test_padding_microbatches_in_the_compiled_call_noise_once(setup):
  """The compiled call with microbatches: the same batch sizes, one noise draw per update
  (the noise is added after the microbatch loop, once), parameters within the summation
  bound of one update carried through SGD (lr 0.1, divided by the expected batch)."""
  s = setup
  tx = lambda: optax.chain(noise.privatize(CLIP, SIGMA, BATCH, noise.noise_key(11)[0]),
                           optax.sgd(0.1))
  clipped = clipping.make_clipped_sum("ghost", s["model"], s["loss_fn"], CLIP)
  b = s["sampler"].batches(0, 1)
  out = {}
  for mb in (None, 8):
    run = step_lib.build_train_chunk(s["mesh"], s["loss_fn"], clipped, tx(), CLIP,
                                     padding_microbatch=mb)
    out[mb] = jax.device_get(run(_init(s["params"], tx()), s["dev"].features, s["dev"].labels,
                                 b.indices, b.mask, np.ones(1, bool)))
  (whole, m_whole), (parts, m_parts) = out[None], out[8]
  np.testing.assert_array_equal(m_whole["count"], m_parts["count"])
  assert int(parts.opt_state[0].count) == int(whole.opt_state[0].count) == 1
  # params' = params - 0.1 (sum + noise) / BATCH: the sums' difference scaled by 0.1 / BATCH,
  # plus one rounding of each result (u |params'|, for either path).
  idx, mask = _padded_batch(s)
  bound = _summation_bound(s, idx, mask, CLIP)
  for a, b_, tol in zip(*(jax.tree_util.tree_leaves(t) for t in (whole.params, parts.params,
                                                                   bound))):
    limit = 0.1 / BATCH * np.asarray(tol) * (1 + 2 * U) + 2 * U * np.abs(np.asarray(a))
    assert np.all(np.abs(np.asarray(a) - np.asarray(b_)) <= limit)


def test_padding_microbatch_is_checked():
  with pytest.raises(ValueError, match="padding_microbatch=0 must be a positive integer"):
    step_lib.build_train_chunk(None, None, None, None, None, padding_microbatch=0)
  assert step_lib.padding_microbatch(None, "ghost", None) is None
  assert step_lib.padding_microbatch(256, "ghost", 64) == 256
  assert step_lib.padding_microbatch(256, "vmap", 64) == 64  # the vmap chunks are skipped


def test_padding_microbatch_through_the_trainer_keeps_timings_out_of_the_model(tmp_path):
  """The real training loop with ``padding_microbatch``: the same epsilon and steps as
  without, and ``model/`` (the public output) carries no duration; the epoch times stay in the
  private metrics.jsonl (docs/privacy.md, "Step duration")."""
  import json
  import os
  from fastdp_jax import train
  from tests.conftest import make_config, make_dataset
  data = make_dataset(str(tmp_path / "data"), rows=3000, seed=5)
  runs = {}
  for mb in (None, 16):
    cfg = make_config(data, padding_microbatch=mb, num_epochs=1)
    runs[mb] = train.train_and_evaluate(cfg, str(tmp_path / f"run{mb}"))
  assert runs[16].epsilon == runs[None].epsilon
  assert runs[16].steps == runs[None].steps
  with open(tmp_path / "run16" / "metrics.jsonl") as f:
    assert any("epoch_time_s" in json.loads(line) for line in f)
  model_dir = tmp_path / "run16" / "model"
  for name in os.listdir(model_dir):
    if name.endswith((".md", ".json", ".sha256")):
      text = (model_dir / name).read_text().lower()
      for word in ("epoch_time", "time_s", "seconds", "duration", "ms per", "examples/s"):
        assert word not in text, f"{name} mentions {word!r}"

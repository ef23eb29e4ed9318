"""Distributed training in one process: the data layout over processes and devices, where the
topology comes from, the launcher, and (8 fake devices, in their own process) that both
all-reduce strategies reproduce the single-device parameters with one all-reduce per update.
"""

import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastdp_jax import clipping
from fastdp_jax import data as data_lib
from fastdp_jax import distributed
from fastdp_jax import launch
from fastdp_jax import models
from fastdp_jax import noise
from fastdp_jax import parallel
from fastdp_jax import sampling
from fastdp_jax import step as step_lib
from tests.conftest import ROOT


# Process row ranges (data.process_row_ranges, which replaced whole-shard assignment) are
# tested in tests/test_data.py.


def test_device_bounds_split_each_process_range_evenly():
  bounds, per = parallel.device_bounds([2000, 2801], [2, 2])
  np.testing.assert_array_equal(bounds, [0, 1000, 2000, 3401, 4801])
  assert per == 1401
  bounds, per = parallel.device_bounds([0, 5], [2, 1])  # a process without rows
  np.testing.assert_array_equal(bounds, [0, 0, 0, 5])
  assert per == 5


def test_single_process_layout_matches_one_range_per_device(tmp_path):
  from tests.conftest import make_dataset
  path = make_dataset(str(tmp_path / "d"), rows=3000, max_rows_per_shard=700)
  mesh = parallel.make_mesh()
  local, dev = parallel.load_training_data(mesh, path)
  full = data_lib.load_split(path, "train")
  assert dev.num_examples == len(full) == len(local)
  np.testing.assert_array_equal(local.features, full.features)
  k = mesh.devices.size
  per = dev.features.shape[0] // k
  x = np.asarray(dev.features).reshape(k, per, -1)
  for d in range(k):  # device d's block starts with global rows bounds[d]:bounds[d+1]
    lo, hi = dev.bounds[d], dev.bounds[d + 1]
    np.testing.assert_array_equal(x[d, :hi - lo], full.features[lo:hi])


@pytest.mark.parametrize("args,env,expected", [
    ((None, None, None), {}, ("single", None, 1, 0)),
    (("h:1", 2, 1), {}, ("flags", "h:1", 2, 1)),
    ((None, None, None), {"FASTDP_COORDINATOR_ADDRESS": "e:2", "FASTDP_NUM_PROCESSES": "3",
                          "FASTDP_PROCESS_ID": "2"}, ("environment", "e:2", 3, 2)),
    # Flags win over the environment.
    (("h:1", 2, 0), {"FASTDP_COORDINATOR_ADDRESS": "e:2"}, ("flags", "h:1", 2, 0)),
    ((None, None, None), {"SLURM_NTASKS": "4"}, ("cluster", None, None, None)),
    ((None, None, None), {"SLURM_NTASKS": "1"}, ("single", None, 1, 0)),
    ((None, 1, None), {}, ("single", None, 1, 0)),
])
def test_resolve_topology(args, env, expected):
  t = distributed.resolve(*args, environ=env)
  assert (t.source, t.coordinator_address, t.num_processes, t.process_id) == expected


@pytest.mark.parametrize("args,match", [
    (("h:1", 2, None), "process_id"), (("h:1", 2, 2), "process_id=2"), (("h", 2, 0), "HOST:PORT")])
def test_resolve_rejects_incomplete_topology(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(*args, environ={})


def test_unreachable_coordinator_fails_fast_with_a_clear_message(tmp_path):
  port = launch.free_port()  # nobody listens there
  t0 = time.monotonic()
  r = subprocess.run([sys.executable, "main.py", "--config=configs/test.py",
                      f"--workdir={tmp_path}/w", f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", "--process_id=1", "--init_timeout_s=2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode != 0
  assert f"coordinator 127.0.0.1:{port} unreachable after 2 s" in r.stderr
  assert time.monotonic() - t0 < 30


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(textwrap.dedent("""
      import os, sys, time
      rank = int(os.environ["FASTDP_PROCESS_ID"])
      print("rank", rank, "of", os.environ["FASTDP_NUM_PROCESSES"],
            os.environ["FASTDP_COORDINATOR_ADDRESS"], sys.argv[1:], flush=True)
      if rank == 1:
        sys.exit(3)
      time.sleep(60)  # would outlive the test unless the launcher stops it
      """))
  t0 = time.monotonic()
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.launch", "--num_processes=3",
                      f"--script={script}", "--", "--x=1"], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 3
  assert time.monotonic() - t0 < 30
  lines = r.stdout.splitlines()
  for i in range(3):  # every process's output is forwarded with its rank prefix
    assert any(re.match(rf"\[{i}\] rank {i} of 3 127\.0\.0\.1:\d+ \['--x=1'\]", l) for l in lines)
  assert "[launch] process 1 exited with status 3; stopping the others" in r.stdout


def test_launcher_succeeds_when_all_do(tmp_path):
  script = tmp_path / "ok.py"
  script.write_text("print('hello')\n")
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
                      f"--script={script}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0 and "[0] hello" in r.stdout and "[1] hello" in r.stdout


# ---------------------------------------------------------------- 8 fake devices (own process)

N, D, HIDDEN, BATCH, CLIP, SIGMA, STEPS, CHUNK = 3000, 9, (16,), 64, 1.0, 1.0, 8, 4


def _tap_clipped_sum(loss_fn, l2_norm_clip):
  """A clipped sum that differentiates a zero "tap" it creates itself, as ghost clipping does.

  Inside ``shard_map`` such a device-invariant value is the trap: its gradient would be summed
  across devices before clipping unless the step treats the body as plain per-device code.
  """
  def fn(params, batch, mask):
    x, y = batch
    tap = jnp.zeros((x.shape[0],), jnp.float32)

    def total(tap):
      def one(p, xi, yi, ti):
        return loss_fn(p, (xi, yi)) + ti
      return jnp.sum(jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, y, tap))

    g_tap = jax.grad(total)(tap)  # [batch] per-example dloss/dtap = 1: sums must not leak
    grads, stats = clipping.clipped_grad_sum_with_stats(loss_fn, params, batch, l2_norm_clip,
                                                        mask)
    # Scale by the tap gradient (exactly 1 when per-device): wrong if it was all-reduced.
    scale = jnp.sum(jnp.where(mask, g_tap, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    return jax.tree_util.tree_map(lambda g: g * scale, grads), stats
  return fn


def _run_steps(devices, strategy, clip_kind):
  rng = np.random.default_rng(0)
  x = (rng.random((N, D)) < 0.4).astype(np.float32)
  y = (rng.random(N) < 0.6).astype(np.float32)
  mesh = parallel.make_mesh(devices)
  dev = parallel.place_training_data(mesh, x, y)
  apply_fn, params = models.functional(models.create_model(D, HIDDEN, 0))
  loss_fn = models.example_loss(apply_fn)
  clipped = (step_lib.vmap_clipped_sum(loss_fn, CLIP) if clip_kind == "vmap"
             else _tap_clipped_sum(loss_fn, CLIP))
  tx = optax.chain(noise.privatize(CLIP, SIGMA, BATCH, noise.noise_key(5)[0]),
                   optax.sgd(0.5, momentum=0.9))
  sampler = sampling.PoissonSampler(N, BATCH, seed=2, shard_bounds=dev.bounds)
  run = step_lib.build_train_chunk(mesh, loss_fn, clipped, tx, CLIP, strategy)
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  counts = []
  for s in range(0, STEPS, CHUNK):
    b = sampler.batches(s, CHUNK)
    state, m = run(state, dev.features, dev.labels, b.indices, b.mask, np.ones(CHUNK, bool))
    counts.append(np.asarray(m["count"]))
  return jax.device_get(state.params), np.concatenate(counts)


@pytest.mark.multidevice
@pytest.mark.parametrize("clip_kind,strategies", [
    ("vmap", ("shard_map", "auto")),
    ("tap", ("shard_map",)),  # the trap is shard_map's; 'auto' has no device-invariant values
])
def test_both_strategies_reproduce_single_device_params(clip_kind, strategies):
  assert jax.device_count() == 8
  ref, ref_counts = _run_steps(jax.devices()[:1], "shard_map", clip_kind)
  for strategy in strategies:
    got, counts = _run_steps(jax.devices(), strategy, clip_kind)
    # The same Poisson batches (topology-independent sampling) ...
    np.testing.assert_array_equal(counts, ref_counts)
    # ... and the same parameters after STEPS noisy updates, to float summation order.
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), (strategy, clip_kind)
  moved = jax.tree_util.tree_leaves(ref)[0]
  start = jax.tree_util.tree_leaves(models.functional(models.create_model(D, HIDDEN, 0))[1])[0]
  assert not np.allclose(moved, start)  # the updates did something


_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def _elements(shape_text):
  return sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", shape_text))


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
def test_compiled_step_has_exactly_one_all_reduce_of_the_gradient(strategy):
  rng = np.random.default_rng(0)
  x = (rng.random((N, D)) < 0.4).astype(np.float32)
  y = (rng.random(N) < 0.6).astype(np.float32)
  mesh = parallel.make_mesh()
  dev = parallel.place_training_data(mesh, x, y)
  apply_fn, params = models.functional(models.create_model(D, HIDDEN, 0))
  loss_fn = models.example_loss(apply_fn)
  tx = optax.chain(noise.privatize(CLIP, SIGMA, BATCH, noise.noise_key(5)[0]), optax.sgd(0.1))
  sampler = sampling.PoissonSampler(N, BATCH, seed=2, shard_bounds=dev.bounds)
  run = step_lib.build_train_chunk(mesh, loss_fn, step_lib.vmap_clipped_sum(loss_fn, CLIP),
                                   tx, CLIP, strategy)
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  b = sampler.batches(0, CHUNK)
  hlo = run.lower(state, dev.features, dev.labels, b.indices, b.mask,
                  np.ones(CHUNK, bool)).compile().as_text()
  collectives = _COLLECTIVE.findall(hlo)
  # One all-reduce in the whole program, inside the loop over the CHUNK updates (so once per
  # update), and no other collective: the data never moves, only the clipped sums do.
  assert [kind for _, kind in collectives] == ["all-reduce"], collectives
  assert "while" in hlo
  # It carries the gradient (num_params floats) and the four metric counters.
  num_params = models.count_params(params)
  assert _elements(collectives[0][0]) == num_params + 4, collectives[0][0]

"""Training throughput of DP-SGD and of the same code path without privacy.

Workloads (the same as ``../shared/bench/peer_torch.py``, which measures Opacus and the
original algorithm):

* **W1**: the original system's model, MLP 9-50-1, BCE, expected batch 256, on generated
  CaPUMS data (``preprocessing.synthesize``, seed 0, 1,223,992 rows of which the first
  979,193 are the training set: the original's 80 % split). An epoch is 979,193 rows.
* **W2**: a wide MLP 128-1024-1024-1, BCE, expected batch 1024, on generated Gaussian
  features with a logistic label; an epoch is ``--w2-rows`` rows (default 131,072).

Each measurement runs the training loop of :mod:`fastdp_jax.train` (host Poisson sampling,
transfer of the sampled indices, compiled calls of ``steps_per_call`` updates with the rows
on the device, metrics fetched after each call) for one epoch after a warm-up call that
compiles, and prints one JSON line::

  {"workload": "W1", "mode": "dp", "clipping": "ghost", "examples_per_s": ..., "epoch_s": ...,
   "peak_rss_mb": ..., "device": ..., ...}

``mode`` is ``dp`` (clipping and noise, sigma 0.9, C 3, as ``configs/seq.py``) or
``nonprivate`` (``dp.enabled=False``: the same step without clipping or noise). Several
workloads or modes (comma-separated) run back to back, each in a fresh process (so that
``peak_rss_mb`` is its own), ``--repeat`` times, followed by one ``ratio`` line per
workload and repetition (DP over non-private, measured back to back).

Usage::

  python benchmarks/throughput.py --workload W1 --mode dp
  python benchmarks/throughput.py --workload W1,W2 --mode nonprivate,dp --repeat 2
  python benchmarks/throughput.py --workload W2 --mode dp --clipping vmap --max-steps 8

Both workloads in both modes take about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

WORKLOADS = {  # features, hidden sizes, expected batch size
    "W1": (9, (50,), 256),
    "W2": (128, (1024, 1024), 1024),
}
W1_ROWS, W1_TRAIN_ROWS = 1_223_992, 979_193


def _data(workload: str, w2_rows: int):
  """Training features and labels of a workload (generated, deterministic)."""
  import numpy as np
  if workload == "W1":
    from fastdp_jax import schema
    from preprocessing import synthesize
    cols = synthesize.synthesize_capums(W1_ROWS, seed=0, na_fraction=0.0)
    x = np.stack([cols[c] for c in schema.CAPUMS_FEATURES], axis=1)[:W1_TRAIN_ROWS]
    y = cols[schema.CAPUMS_LABEL][:W1_TRAIN_ROWS]
    return np.ascontiguousarray(x, np.float32), np.asarray(y, np.float32)
  rng = np.random.default_rng(0)
  d = WORKLOADS["W2"][0]
  x = rng.standard_normal((w2_rows, d), dtype=np.float32)
  w = rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
  y = (rng.random(w2_rows) < 1 / (1 + np.exp(-(x @ w)))).astype(np.float32)
  return x, y


def _device() -> str:
  import jax
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    model = platform.processor() or "cpu"
    try:
      with open("/proc/cpuinfo") as f:
        model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
      pass
    return f"cpu: {model}, {os.cpu_count()} cores"
  return f"{dev.platform}: {dev.device_kind} x{jax.device_count()}"


def _largest_divisor_at_most(n: int, k: int) -> int:
  return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def measure(workload: str, mode: str, clipping: str, *, steps_per_call: int, w2_rows: int,
            max_steps: int | None, microbatch_size: int | None) -> dict:
  """Times one epoch of the training loop; returns the JSON record."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from fastdp_jax import config as config_lib
  from fastdp_jax import ghost
  from fastdp_jax import models
  from fastdp_jax import noise
  from fastdp_jax import parallel
  from fastdp_jax import sampling
  from fastdp_jax import step as step_lib
  from fastdp_jax import train

  d, hidden, batch = WORKLOADS[workload]
  x, y = _data(workload, w2_rows)
  n = len(y)
  cfg = config_lib.base_config()  # configs/seq.py: sigma 0.9, C 3, SGD lr 0.01
  cfg.data.path = "<generated in memory>"
  cfg.batch_size, cfg.model.hidden_sizes = batch, hidden
  cfg.num_epochs, cfg.steps_per_call = 1, steps_per_call
  cfg.dp.enabled = mode == "dp"
  cfg.dp.noise_multiplier = 0.9
  cfg.dp.noise_seed = 0
  cfg.dp.delta = 1e-7  # below 1/N for both workloads (no effect on the speed)
  cfg.dp.clipping = clipping
  config_lib.validate(cfg)
  plan = train.plan_privacy(cfg, n)

  # The set-up of fastdp_jax.train.train_and_evaluate.
  model = models.create_model(d, hidden, cfg.seed)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  key, _ = noise.noise_key(cfg.dp.noise_seed)
  tx = optax.chain(
      noise.privatize(plan.l2_norm_clip or 1.0, plan.noise_multiplier, batch, key),
      train.make_optimizer(cfg))
  mesh = parallel.make_mesh()
  dev = parallel.place_training_data(mesh, x, y)
  sampler = sampling.PoissonSampler(n, batch, cfg.seed, shard_bounds=dev.bounds)
  method = ghost.resolve_method(clipping, model) if plan.enabled else "none"
  if microbatch_size and method == "vmap":
    microbatch_size = _largest_divisor_at_most(sampler.capacity, microbatch_size)
  else:
    microbatch_size = None
  clipped_sum = ghost.make_clipped_sum(clipping, model, loss_fn, plan.l2_norm_clip,
                                       microbatch_size=microbatch_size)
  run = step_lib.build_train_chunk(mesh, loss_fn, clipped_sum, tx, plan.l2_norm_clip,
                                   cfg.parallel.strategy)
  state = jax.device_put(step_lib.State(params=params, opt_state=tx.init(params),
                                        step=jnp.zeros((), jnp.int32)),
                         NamedSharding(mesh, P()))
  chunk = steps_per_call

  def one_call(state, step, k):
    batches = sampler.batches(step, k)
    pad = ((0, chunk - k), (0, 0), (0, 0))
    inputs = run.place(np.pad(batches.indices, pad), np.pad(batches.mask, pad),
                       np.arange(chunk) < k)
    state, m = run(state, dev.features, dev.labels, *inputs)
    return state, jax.device_get(m)

  steps = plan.steps_per_epoch if max_steps is None else min(max_steps, plan.steps_per_epoch)
  rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  state, _ = one_call(state, 0, 1)  # compiles (and runs one update)
  compile_s = time.perf_counter() - t0
  state, _ = one_call(state, 0, 1)  # a second call: nothing left to compile
  step_temp_mb = None
  try:
    b = sampler.batches(0, 1)
    lowered = run.lower(state, dev.features, dev.labels, np.repeat(b.indices, chunk, 0),
                        np.repeat(b.mask, chunk, 0), np.ones(chunk, bool))
    step_temp_mb = lowered.compile().memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # memory analysis is best effort (not every backend reports it)
    pass

  examples, step = 0.0, 0
  t0 = time.perf_counter()
  while step < steps:
    k = min(chunk, steps - step)
    state, m = one_call(state, step, k)
    examples += float(m["count"][:k].sum())
    step += k
  seconds = time.perf_counter() - t0
  if not np.all(np.isfinite(np.asarray(jax.device_get(state.params)["layers"][0]["kernel"]))):
    raise FloatingPointError("parameters became non-finite during the benchmark")
  return dict(
      workload=workload, mode=mode, clipping=method, examples_per_s=round(examples / seconds),
      epoch_s=round(seconds * plan.steps_per_epoch / steps, 4),
      epoch_extrapolated=steps < plan.steps_per_epoch,
      peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      rss_before_training_mb=round(rss_before_mb, 1),
      step_temp_mb=None if step_temp_mb is None else round(step_temp_mb, 1),
      device=_device(), train_rows=n, batch_size=batch, updates=steps,
      updates_per_s=round(steps / seconds, 1), steps_per_call=chunk,
      microbatch_size=microbatch_size, compile_s=round(compile_s, 2),
      model=f"MLP {d}-{'-'.join(map(str, hidden))}-1", jax=jax.__version__)


def _split(value: str, allowed) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  for v in items:
    if v not in allowed:
      raise SystemExit(f"unknown value {v!r}; expected one of {sorted(allowed)}")
  return items


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workload", default="W1", help="W1, W2 or both: W1,W2")
  p.add_argument("--mode", default="dp", help="dp, nonprivate or both: nonprivate,dp")
  p.add_argument("--clipping", default="auto", choices=("auto", "ghost", "vmap"),
                 help="per-example clipping method of the DP mode (default auto)")
  p.add_argument("--steps-per-call", type=int, default=128)
  p.add_argument("--w2-rows", type=int, default=131_072, help="W2's training rows (an epoch)")
  p.add_argument("--max-steps", type=int, default=None,
                 help="time at most this many updates and extrapolate the epoch (slow modes)")
  p.add_argument("--microbatch-size", type=int, default=None,
                 help="vmap chunk size (rounded down to a divisor of the batch capacity)")
  p.add_argument("--repeat", type=int, default=1, help="repetitions of the whole set")
  args = p.parse_args(argv)
  workloads = _split(args.workload, WORKLOADS)
  modes = _split(args.mode, ("dp", "nonprivate"))
  single = dict(steps_per_call=args.steps_per_call, w2_rows=args.w2_rows,
                max_steps=args.max_steps, microbatch_size=args.microbatch_size)
  if len(workloads) == 1 and len(modes) == 1 and args.repeat == 1:
    print(json.dumps(measure(workloads[0], modes[0], args.clipping, **single)), flush=True)
    return 0
  # Several measurements: each in its own process (its own peak RSS), back to back.
  forwarded = [f"--clipping={args.clipping}", f"--steps-per-call={args.steps_per_call}",
               f"--w2-rows={args.w2_rows}"]
  if args.max_steps is not None:
    forwarded.append(f"--max-steps={args.max_steps}")
  if args.microbatch_size is not None:
    forwarded.append(f"--microbatch-size={args.microbatch_size}")
  for rep in range(args.repeat):
    for wl in workloads:
      records = {}
      for mode in modes:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--workload={wl}",
                              f"--mode={mode}", *forwarded], check=True, text=True,
                             stdout=subprocess.PIPE).stdout
        record = json.loads(out.strip().splitlines()[-1])
        record["repeat"] = rep
        records[mode] = record
        print(json.dumps(record), flush=True)
      if {"dp", "nonprivate"} <= set(records):
        dp, base = records["dp"], records["nonprivate"]
        print(json.dumps(dict(
            ratio=True, workload=wl, repeat=rep, clipping=dp["clipping"],
            dp_over_nonprivate_examples_per_s=round(
                dp["examples_per_s"] / base["examples_per_s"], 3),
            dp_over_nonprivate_peak_rss=round(dp["peak_rss_mb"] / base["peak_rss_mb"], 3),
            dp_over_nonprivate_step_temp=(
                round(dp["step_temp_mb"] / base["step_temp_mb"], 3)
                if dp["step_temp_mb"] and base["step_temp_mb"] else None))), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

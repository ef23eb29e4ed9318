"""Training throughput of DP-SGD and of the same code path without privacy.

Workloads (the same as ``../shared/bench/peer_torch.py``, which measures Opacus and the
original algorithm):

* **W1**: the original system's model, MLP 9-50-1, BCE, expected batch 256, on generated
  CaPUMS data (``preprocessing.synthesize``, seed 0, 1,223,992 rows of which the first
  979,193 are the training set: the original's 80 % split). An epoch is 979,193 rows.
* **W2**: a wide MLP 128-1024-1024-1, BCE, expected batch 1024, on generated Gaussian
  features with a logistic label; an epoch is ``--w2-rows`` rows (default 131,072).

Each measurement builds the trainer itself (:func:`fastdp_jax.setup` on the data in
memory, keys fixed by ``dp.noise_seed`` / ``dp.sampling_seed``, hence ``"private": false``,
which does not change the speed) and runs its compiled calls
(:meth:`fastdp_jax.Trainer.train_call`: host Poisson sampling, transfer of the sampled
indices, ``steps_per_call`` updates with the rows on the device, metrics fetched and checked
after each call) for one epoch after a warm-up call that compiles, and prints one JSON line::

  {"workload": "W1", "mode": "dp", "clipping": "ghost", "examples_per_s": ..., "epoch_s": ...,
   "peak_rss_mb": ..., "device": ..., ...}

``mode`` is ``dp`` (clipping and noise, sigma 0.9, C 3, as ``configs/seq.py``) or
``nonprivate`` (``dp.enabled=False``: the same step without clipping or noise). Several
workloads or modes (comma-separated) run back to back, each in a fresh process (so that
``peak_rss_mb`` is its own), ``--repeat`` times, followed by one ``ratio`` line per
workload and repetition (DP over non-private, measured back to back). When both modes are
asked for, a third process also times them interleaved (alternating their compiled calls over
an epoch each, so that both see the same load on a shared machine) and prints its own
``ratio`` line with ``"interleaved": true``.

Usage::

  python benchmarks/throughput.py --workload W1 --mode dp
  python benchmarks/throughput.py --workload W1,W2 --mode nonprivate,dp --repeat 2
  python benchmarks/throughput.py --workload W2 --mode dp --clipping vmap --max-steps 8
  python benchmarks/throughput.py --workload W1,W2 --units households --unit-size 8,4 \
      --max-steps 64 --repeat 3 --out benchmarks/results/units_throughput_DATE.jsonl

``--units households`` times household-level against row-level DP training of the same rows
(:func:`measure_units`, one ``"ratio"`` line each and a ``"summary"`` line per workload and k).

Both workloads in both modes take about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

WORKLOADS = {  # features, hidden sizes, expected batch size
    "W1": (9, (50,), 256),
    "W2": (128, (1024, 1024), 1024),
}
W1_ROWS, W1_TRAIN_ROWS = 1_223_992, 979_193


def workload_data(workload: str, w2_rows: int):
  """Training features and labels of a workload (generated, deterministic)."""
  import numpy as np
  if workload == "W1":
    from fastdp_jax.data import split as split_lib
    from preprocessing import synthesize
    cols = synthesize.synthesize_capums(W1_ROWS, seed=0, na_fraction=0.0)
    x = np.stack([cols[c] for c in split_lib.CAPUMS_FEATURES], axis=1)[:W1_TRAIN_ROWS]
    y = cols[split_lib.CAPUMS_LABEL][:W1_TRAIN_ROWS]
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


KEYS = "fixed by dp.noise_seed=0 and dp.sampling_seed=0 (private: false; no effect on speed)"


def in_memory_data(workload: str, x, y, process_rows=None):
  """``(train, test, device data)`` for :func:`fastdp_jax.setup`: this process's rows
  ``x``, ``y`` (``process_rows``: every process's row count) on ``parallel.make_mesh()``."""
  from fastdp_jax.data import shards as data_lib
  from fastdp_jax import parallel
  from fastdp_jax.data import split as split_lib
  if workload == "W1":
    names, label = tuple(split_lib.CAPUMS_FEATURES), split_lib.CAPUMS_LABEL
  else:
    names, label = tuple(f"x{i}" for i in range(x.shape[1])), "y"
  dev = parallel.place_training_data(parallel.make_mesh(), x, y, process_rows)
  split = functools.partial(data_lib.Split, feature_names=names, label_name=label,
                            digest=f"generated {workload}, {dev.num_examples} rows")
  # The benchmarks never evaluate; setup wants a test split (its majority-class rate).
  return split(features=x, labels=y), split(features=x[:1024], labels=y[:1024]), dev


def make_trainer(workload: str, mode: str, clipping: str, data, cleanup: contextlib.ExitStack,
                 *, steps_per_call: int, num_epochs: int, microbatch_size: int | None = None,
                 strategy: str = "shard_map", padding_microbatch: int | None = None,
                 unit_dir: str | None = None, batch_size: int | None = None):
  """:func:`fastdp_jax.setup` for one workload and mode, on ``data`` (from
  :func:`in_memory_data`), in a temporary workdir (closed by ``cleanup``).

  With ``unit_dir`` (``--units``), the run reads that unit dataset instead (``setup``'s
  in-memory ``data`` carries no privacy unit) and ``batch_size`` counts units.

  The config is ``configs/seq.py``'s (sigma 0.9, C 3, SGD lr 0.01) with the workload's model
  and batch, no checkpoint, export or privacy evaluation, and fixed keys (:data:`KEYS`).
  Set-up messages go to stderr: stdout carries only the JSON lines. ``setup`` validates the
  config and registers the sinks' closing with ``cleanup``.
  """
  import fastdp_jax
  _, hidden, batch = WORKLOADS[workload][:3]
  cfg = fastdp_jax.base_config()
  cfg.data.path, cfg.data.attack_column = unit_dir or "<generated in memory>", ""
  cfg.batch_size, cfg.model.hidden_sizes, cfg.steps_per_call = batch, hidden, steps_per_call
  cfg.batch_size = batch_size or batch
  cfg.num_epochs = num_epochs  # the plan's length: the updates timed, warm-up included
  cfg.dp.enabled, cfg.dp.clipping = mode == "dp", clipping
  cfg.dp.noise_multiplier, cfg.dp.noise_seed, cfg.dp.sampling_seed = 0.9, 0, 0
  cfg.dp.delta = 1e-7  # below 1/N for both workloads (no effect on the speed)
  # Only the vmap path chunks the batch (the capacity is rounded up to the chunk size).
  cfg.dp.microbatch_size = microbatch_size if mode == "dp" and clipping == "vmap" else None
  cfg.parallel.strategy, cfg.log_every_steps = strategy, 0
  cfg.padding_microbatch = padding_microbatch
  cfg.checkpoint.enabled = cfg.export_model = False
  cfg.privacy_eval.membership_rows = 0
  workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fastdp-bench-"))
  with contextlib.redirect_stdout(sys.stderr):
    return fastdp_jax.setup(cfg, workdir, cleanup, data=None if unit_dir else data)


def clipping_name(t) -> str:
  return t.compiled.clipping if t.plan.enabled else "none"


def timed_call(t, k: int) -> float:
  """One compiled call of ``k`` updates (:meth:`Trainer.train_call`: sampling, transfer,
  step, finiteness check, ledger); returns the number of examples it trained on."""
  return float(t.train_call(k)["count"][:k].sum())


def warm_up(t) -> float:
  """Compiles (first call, one update) and runs a second call, which does not; returns the
  first call's seconds."""
  t0 = time.perf_counter()
  timed_call(t, 1)
  seconds = time.perf_counter() - t0
  timed_call(t, 1)
  return seconds


def step_temp_mb(t) -> float | None:
  """XLA's temporary buffers of the compiled call (best effort)."""
  import numpy as np
  try:
    b, chunk, dev = t.batches.sampler.batches(0, 1), t.config.steps_per_call, t.data.dev
    lowered = t.compiled.run.lower(t.progress.state, dev.features, dev.labels,
                                   np.repeat(b.indices, chunk, 0), np.repeat(b.mask, chunk, 0),
                                   np.ones(chunk, bool))
    return round(lowered.compile().memory_analysis().temp_size_in_bytes / 2**20, 1)
  except Exception:  # not every backend reports it
    return None


def record(t, workload: str, mode: str, examples: float, seconds: float, steps: int,
           compile_s: float, **extra) -> dict:
  import jax
  d, hidden, batch = WORKLOADS[workload]
  spe = t.plan.steps_per_epoch
  return dict(
      workload=workload, mode=mode, clipping=clipping_name(t),
      examples_per_s=round(examples / seconds), epoch_s=round(seconds * spe / steps, 4),
      epoch_extrapolated=steps < spe, **extra,
      device=_device(), train_rows=t.data.num_examples, batch_size=batch,
      capacity=t.batches.capacity, updates=steps, updates_per_s=round(steps / seconds, 3),
      steps_per_call=t.config.steps_per_call, microbatch_size=t.config.dp.microbatch_size,
      compile_s=round(compile_s, 2), model=f"MLP {d}-{'-'.join(map(str, hidden))}-1",
      private=t.private, keys=KEYS, jax=jax.__version__,
      padding_microbatch=t.config.padding_microbatch, load_avg_1m=round(os.getloadavg()[0], 2))


def _place(workload: str, w2_rows: int):
  return in_memory_data(workload, *workload_data(workload, w2_rows))


def _epoch_steps(t, max_steps: int | None) -> int:
  total = t.plan.steps_per_epoch
  return total if max_steps is None else min(max_steps, total)


def measure(workload: str, mode: str, clipping: str, *, steps_per_call: int, w2_rows: int,
            max_steps: int | None, microbatch_size: int | None,
            padding_microbatch: int | None = None) -> dict:
  """Times one epoch of the training loop in this process; returns the JSON record."""
  with contextlib.ExitStack() as cleanup:
    # Two epochs in the plan: the two warm-up updates and the timed epoch.
    t = make_trainer(workload, mode, clipping, _place(workload, w2_rows), cleanup,
                     steps_per_call=steps_per_call, num_epochs=2,
                     microbatch_size=microbatch_size, padding_microbatch=padding_microbatch)
    steps = _epoch_steps(t, max_steps)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    compile_s = warm_up(t)
    temp = step_temp_mb(t)
    examples, step = 0.0, 0
    t0 = time.perf_counter()
    while step < steps:
      k = min(steps_per_call, steps - step)
      examples += timed_call(t, k)
      step += k
    seconds = time.perf_counter() - t0
    return record(
        t, workload, mode, examples, seconds, steps, compile_s,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        rss_before_training_mb=round(rss_before_mb, 1), step_temp_mb=temp)


def measure_interleaved(workload: str, clipping: str, *, steps_per_call: int, w2_rows: int,
                        max_steps: int | None, microbatch_size: int | None,
                        padding_microbatch: int | None = None) -> list[dict]:
  """Both modes in ONE process over the same data, alternating their compiled calls over an
  epoch each, so that both see the same machine load; returns both records and the ratio.
  (``peak_rss_mb`` is the process's, shared by both: use separate processes for memory.)"""
  with contextlib.ExitStack() as cleanup:
    data = _place(workload, w2_rows)
    trainers = {mode: make_trainer(workload, mode, clipping, data, cleanup,
                                   steps_per_call=steps_per_call, num_epochs=2,
                                   microbatch_size=microbatch_size,
                                   padding_microbatch=padding_microbatch)
                for mode in ("nonprivate", "dp")}
    compile_s = {mode: warm_up(t) for mode, t in trainers.items()}
    steps = _epoch_steps(trainers["dp"], max_steps)
    examples = dict.fromkeys(trainers, 0.0)
    seconds = dict.fromkeys(trainers, 0.0)
    step = 0
    while step < steps:
      k = min(steps_per_call, steps - step)
      for mode, t in trainers.items():
        t0 = time.perf_counter()
        examples[mode] += timed_call(t, k)
        seconds[mode] += time.perf_counter() - t0
      step += k
    records = [record(t, workload, mode, examples[mode], seconds[mode], steps,
                      compile_s[mode], interleaved=True) for mode, t in trainers.items()]
  dp, base = records[1], records[0]
  records.append(dict(ratio=True, interleaved=True, workload=workload, clipping=dp["clipping"],
                      dp_over_nonprivate_examples_per_s=round(
                          dp["examples_per_s"] / base["examples_per_s"], 3)))
  return records


def measure_units(workload: str, k: int, clipping: str, *, steps_per_call: int, w2_rows: int,
                  max_steps: int | None, microbatch_size: int | None,
                  padding_microbatch: int | None = None) -> list[dict]:
  """Row-level and household-level DP training of the same rows in ONE process, their
  compiled calls alternated (as :func:`measure_interleaved`); returns both records and the
  ratio of their rows per second (household over row).

  The rows are grouped into households of the published size distribution
  (``benchmarks/units.py``), bounded to ``k`` rows each; the unit run samples
  B / E[min(S, k)] households per update (the same expected rows as the row run's B), their
  kept rows packed (``row_slots``: the capacity, a Chernoff bound on the sampled rows).
  """
  import units as units_bench
  _, _, batch = WORKLOADS[workload]
  unit_batch = round(batch / units_bench.mean_kept_rows(k))
  x, y = workload_data(workload, w2_rows)
  with contextlib.ExitStack() as cleanup:
    trainer = functools.partial(make_trainer, workload, "dp", clipping,
                                steps_per_call=steps_per_call, num_epochs=2,
                                microbatch_size=microbatch_size,
                                padding_microbatch=padding_microbatch)
    row = trainer(in_memory_data(workload, x, y), cleanup)
    unit_dir = os.path.join(cleanup.enter_context(
        tempfile.TemporaryDirectory(prefix="fastdp-bench-units-")), "data")
    households = units_bench.write_unit_dataset(unit_dir, x, y, row.data.train.feature_names,
                                                row.data.train.label_name, k)
    del x, y
    unit = trainer(None, cleanup, unit_dir=unit_dir, batch_size=unit_batch)
    trainers = {"row": row, "household": unit}
    compile_s = {name: warm_up(t) for name, t in trainers.items()}
    steps = min(_epoch_steps(row, max_steps), _epoch_steps(unit, max_steps))
    examples, seconds, step = dict.fromkeys(trainers, 0.0), dict.fromkeys(trainers, 0.0), 0
    while step < steps:
      n = min(steps_per_call, steps - step)
      for name, t in trainers.items():
        t0 = time.perf_counter()
        examples[name] += timed_call(t, n)
        seconds[name] += time.perf_counter() - t0
      step += n
    records = [record(t, workload, "dp", examples[name], seconds[name], steps, compile_s[name],
                      interleaved=True, unit=name, unit_size=k if name != "row" else 1,
                      units_per_batch=unit_batch if name != "row" else batch,
                      households=households, row_slots=t.batches.capacity)
               for name, t in trainers.items()]
  records.append(dict(ratio=True, interleaved=True, workload=workload, unit_size=k,
                      clipping=records[1]["clipping"], units_per_batch=unit_batch,
                      household_over_row_rows_per_s=round(
                          records[1]["examples_per_s"] / records[0]["examples_per_s"], 3)))
  return records


def units_main(args, workloads: list[str]) -> int:
  """``--units households``: :func:`measure_units` for every workload and k, ``--repeat``
  times, each in its own process, then the min and median ratio per (workload, k)."""
  sizes = [int(v) for v in str(args.unit_size).split(",")]
  single = dict(steps_per_call=args.steps_per_call, w2_rows=args.w2_rows,
                max_steps=args.max_steps, microbatch_size=args.microbatch_size,
                padding_microbatch=args.padding_microbatch)
  if len(workloads) == 1 and len(sizes) == 1 and args.repeat == 1:
    for rec in measure_units(workloads[0], sizes[0], args.clipping, **single):
      print(json.dumps(rec), flush=True)
    return 0
  from _jsonl import emit, env
  ratios: dict = {}
  for rep in range(args.repeat):
    for wl in workloads:
      for k in sizes:
        argv = [sys.executable, os.path.abspath(__file__), f"--workload={wl}", "--units",
                args.units, f"--unit-size={k}", f"--clipping={args.clipping}",
                f"--steps-per-call={args.steps_per_call}", f"--w2-rows={args.w2_rows}",
                *([f"--max-steps={args.max_steps}"] if args.max_steps else []),
                *(f"--{n}={v}" for n, v in (("microbatch-size", args.microbatch_size),
                                            ("padding-microbatch", args.padding_microbatch)) if v)]
        out = subprocess.run(argv, check=True, text=True, stdout=subprocess.PIPE).stdout
        for line in out.strip().splitlines():
          if line.startswith("{"):
            rec = dict(json.loads(line), repeat=rep, **env())
            if rec.get("ratio"):
              ratios.setdefault((wl, k), []).append(rec["household_over_row_rows_per_s"])
            emit(rec, args.out)
  for (wl, k), v in ratios.items():
    emit(dict(summary=True, workload=wl, unit_size=k, household_over_row_rows_per_s=v,
              min=min(v), median=_median(v), target=0.7, met=_median(v) >= 0.7), args.out)
  return 0


# --- one sitting: everyone, interleaved (--peers) ------------------------------------------------
# Our systems: (mode, clipping, padding_microbatch, steps per call by workload). The vmap path
# on W2 materialises per-example gradients in chunks of VMAP_CHUNK rows: one update per call.
OURS = {
    "ours-nonprivate": ("nonprivate", "auto", None),
    "ours-nonprivate-skip": ("nonprivate", "auto", 256),
    "ours-dp-ghost": ("dp", "ghost", None),
    "ours-dp-ghost-skip": ("dp", "ghost", 256),
    "ours-dp-vmap": ("dp", "vmap", None),
}
OURS_STEPS_PER_CALL = {"W1": 128, "W2": 8}
VMAP_CHUNK = 64
SITTING_EPOCHS = 20  # the plan's length (hence the capacity), the same for every system
# Left out of the sitting unless --slow, at 16-80 s per W2 update on this CPU: our vmap path
# (per-example gradients of 1.2 M parameters: memory bandwidth) and the original algorithm
# (341 backward passes of 3 rows per update; 1.2 k examples/s on a quiet machine, 13 under
# load 11).
SLOW = {("W2", "ours-dp-vmap"), ("W2", "seed-microbatch")}
PEER_SYSTEMS = ("torch-sgd", "opacus-hooks", "opacus-ghost", "jax-privacy", "seed-microbatch")


def flops_per_example(workload: str, count: str = "model") -> int:
  """Matrix-product FLOPs of one example's forward and backward pass.

  A dense layer in -> out costs 2 in out FLOPs forward, as much for its weight gradient and as
  much for its input gradient. ``count="model"`` is three times the forward pass (7.1 MFLOP
  for W2, the usual model-FLOPs convention, on which the targets are stated);
  ``count="executed"`` leaves out the first layer's input gradient, which no trainer here
  computes (a stricter limit, 3.7 % higher on W2).
  """
  d, hidden, _ = WORKLOADS[workload]
  sizes = [d, *hidden, 1]
  pairs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
  if count not in FLOP_COUNTS:
    raise ValueError(f"{count=} must be one of {FLOP_COUNTS}")
  return 6 * sum(pairs) - (2 * pairs[0] if count == "executed" else 0)


FLOP_COUNTS = ("model", "executed")


def matmul_gflops(n: int = 2048, repeat: int = 10) -> dict:
  """This CPU's float32 matrix product rate: JAX (XLA:CPU) and NumPy, n x n, best of 3."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda u, v: u @ v)
  f(a, a).block_until_ready()
  out = {}
  for name, run in (("jax", lambda: f(a, a).block_until_ready()),
                    ("numpy", functools.partial(np.matmul, np.asarray(a), np.asarray(a)))):
    best = 0.0
    for _ in range(3):
      t0 = time.perf_counter()
      for _ in range(repeat):
        run()
      best = max(best, 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e9)
    out[f"{name}_gflops"] = round(best, 1)
  return out


def _cpu_seconds() -> float:
  """CPU seconds (user + system) of all this process's threads (/proc/self/stat)."""
  with open("/proc/self/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OursWorker:
  """Builds each (workload, system) of ours once (compiled, warmed up) and times it."""

  def __init__(self, w2_rows: int):
    self.w2_rows, self.data, self.built = w2_rows, {}, {}
    self.cleanup = contextlib.ExitStack()

  def trainer(self, workload: str, system: str):
    if (workload, system) not in self.built:
      if workload not in self.data:
        self.data[workload] = _place(workload, self.w2_rows)
      mode, clipping, skip = OURS[system]
      vmap_w2 = clipping == "vmap" and workload == "W2"
      t = make_trainer(workload, mode, clipping, self.data[workload], self.cleanup,
                       steps_per_call=1 if vmap_w2 else OURS_STEPS_PER_CALL[workload],
                       num_epochs=SITTING_EPOCHS, padding_microbatch=skip,
                       microbatch_size=VMAP_CHUNK if vmap_w2 else None)
      warm_up(t)
      self.built[workload, system] = t
    return self.built[workload, system]

  def measure(self, workload: str, system: str, seconds: float) -> dict:
    t = self.trainer(workload, system)
    k, examples, calls = t.config.steps_per_call, 0.0, 0
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    while not calls or time.perf_counter() - t0 < seconds:
      examples += timed_call(t, k)
      calls += 1
    elapsed = time.perf_counter() - t0
    return dict(workload=workload, system=system, examples_per_s=round(examples / elapsed),
                steps=calls * k, seconds=round(elapsed, 3), capacity=t.batches.capacity,
                padding_microbatch=t.config.padding_microbatch, clipping=clipping_name(t),
                cores_busy=round((_cpu_seconds() - cpu0) / elapsed, 2))


def serve(worker, requests=sys.stdin, out=sys.stdout) -> None:
  """One JSON request per line -> one JSON reply per line (the sitting's worker loop)."""
  for line in requests:
    if not line.strip():
      continue
    req = json.loads(line)
    try:
      if req.get("system") == "matmul":
        reply = dict(system="matmul", **matmul_gflops())
      else:
        reply = worker.measure(req["workload"], req["system"], float(req["seconds"]))
    except Exception as e:  # the driver stops with it
      reply = dict(error=f"{type(e).__name__}: {e}", **req)
    print(json.dumps(reply), file=out, flush=True)


class _Worker:
  """A worker process (ours or the peers'), spoken to one JSON line at a time."""

  def __init__(self, argv: list[str]):
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT)

  def ask(self, **request) -> dict:
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"worker {self.proc.args[:2]} ended (exit {self.proc.wait()})")
    reply = json.loads(line)
    if "error" in reply:
      raise SystemExit(f"worker failed on {request}: {reply['error']}")
    return reply

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def _median(values):
  import statistics
  return statistics.median(values)


# (name, numerator, denominator or a tuple whose best is taken, target)
TARGETS = {
    "W2": [("dp over opacus-ghost", "ours-dp-ghost", "opacus-ghost", 1.5),
           ("dp (skip) over opacus-ghost", "ours-dp-ghost-skip", "opacus-ghost", 1.5),
           ("non-private over torch", "ours-nonprivate", "torch-sgd", 0.8),
           ("non-private (skip) over torch", "ours-nonprivate-skip", "torch-sgd", 0.8),
           ("dp over jax-privacy", "ours-dp-ghost", "jax-privacy", 2.0),
           ("dp over non-private", "ours-dp-ghost", "ours-nonprivate", None)],
    "W1": [("dp over the faster Opacus", "ours-dp-ghost", ("opacus-hooks", "opacus-ghost"), 5.0),
           ("dp over non-private", "ours-dp-ghost", "ours-nonprivate", 0.8),
           ("dp over jax-privacy", "ours-dp-ghost", "jax-privacy", 1.0)],
}


FLOP_TARGETS = [("W2", "ours-dp-ghost", 0.6), ("W2", "ours-dp-ghost-skip", 0.6)]


def summarize(records: list[dict], gflops: float, rates: list[float] | None = None
              ) -> list[dict]:
  """Medians and spread per (workload, system), the FLOP limit, and the targets' ratios
  (each ratio per round, both measured in that round, then their median; against the FLOP
  limit, the matmul rate measured at the start of that round: ``rates[round]``)."""
  out, by = [], {}
  for r in records:
    by.setdefault((r["workload"], r["system"]), []).append(r)
  for (wl, system), rs in sorted(by.items()):
    v = [r["examples_per_s"] for r in rs]
    limit = gflops * 1e9 / flops_per_example(wl)
    out.append(dict(summary=True, workload=wl, system=system, rounds=len(v),
                    median_examples_per_s=round(_median(v)), min=min(v), max=max(v),
                    flop_limit_examples_per_s=round(limit),
                    fraction_of_flop_limit=round(_median(v) / limit, 3),
                    fraction_of_executed_flop_limit=round(
                        _median(v) * flops_per_example(wl, "executed") / (gflops * 1e9), 3)))
  for wl, system, target in FLOP_TARGETS if rates else []:
    for count in FLOP_COUNTS:
      per_round = [round(r["examples_per_s"] * flops_per_example(wl, count)
                         / (rates[r["round"]] * 1e9), 3)
                   for r in records if r["workload"] == wl and r["system"] == system]
      if per_round:
        med = _median(per_round)
        # The target is stated on the model count; the executed count is shown beside it,
        # without a target.
        name = "over the FLOP limit" if count == "model" else "over the executed-FLOP limit"
        goal = target if count == "model" else None
        out.append(dict(ratio=True, workload=wl, name=f"{system} {name}", per_round=per_round,
                        median=round(med, 3), target=goal,
                        met=None if goal is None else med >= goal))
  for wl, targets in TARGETS.items():
    for name, num, den, target in targets:
      dens = den if isinstance(den, tuple) else (den,)
      per_round = []
      for rnd in sorted({r["round"] for r in records}):
        got = {r["system"]: r["examples_per_s"] for r in records
               if r["workload"] == wl and r["round"] == rnd}
        if num in got and all(d in got for d in dens):
          per_round.append(round(got[num] / max(got[d] for d in dens), 3))
      if per_round:
        med = _median(per_round)
        out.append(dict(ratio=True, workload=wl, name=name, per_round=per_round,
                        median=round(med, 3), target=target,
                        met=None if target is None else med >= target))
  return out


def peak_memory(workload: str, w2_rows: int) -> dict:
  """Peak RSS of the non-private and the DP training process (each its own process)."""
  out = {}
  for mode in ("nonprivate", "dp"):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--workload={workload}",
                           f"--mode={mode}", "--max-steps=16", "--steps-per-call=8",
                           f"--w2-rows={w2_rows}"], check=True, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    out[mode] = rec["peak_rss_mb"], rec["step_temp_mb"]
  (np_rss, np_tmp), (dp_rss, dp_tmp) = out["nonprivate"], out["dp"]
  return dict(memory=True, workload=workload, nonprivate_peak_rss_mb=np_rss,
              dp_peak_rss_mb=dp_rss, dp_over_nonprivate_peak_rss=round(dp_rss / np_rss, 3),
              nonprivate_step_temp_mb=np_tmp, dp_step_temp_mb=dp_tmp)


def markdown_table(lines: list[dict]) -> str:
  """BENCHMARKS.md's tables from a sitting's JSON lines: systems and targets.

  The summaries and ratios are computed again from the sitting's raw measurements and matmul
  rates (so that every sitting's file reads with the definitions above); the memory line is
  taken as is.
  """
  records = [r for r in lines if "round" in r and "examples_per_s" in r]
  rates = sorted((r for r in lines if "round" in r and "jax_gflops" in r),
                 key=lambda r: r["round"])
  if records and rates:
    gflops = [r["jax_gflops"] for r in rates]
    lines = [*summarize(records, _median(gflops), gflops), *records,
             *(r for r in lines if r.get("memory"))]
  rows = ["| workload | system | examples/s median | min - max | rounds | of FLOP limit | "
          "of executed-FLOP limit | cores busy (median) |", "|---|---|---|---|---|---|---|---|"]
  busy = {}
  for r in lines:
    if "round" in r and "examples_per_s" in r:
      busy.setdefault((r["workload"], r["system"]), []).append(r.get("cores_busy", 0.0))
  for r in lines:
    if r.get("summary"):
      b = busy.get((r["workload"], r["system"]))
      rows.append(f"| {r['workload']} | {r['system']} | {r['median_examples_per_s']:,} | "
                  f"{r['min']:,} - {r['max']:,} | {r['rounds']} | "
                  f"{r['fraction_of_flop_limit']:.3f} | "
                  f"{r.get('fraction_of_executed_flop_limit', '')} | {_median(b) if b else ''} |")
  rows += ["", "| workload | ratio | per round | median | target | met |", "|---|---|---|---|---|---|"]
  for r in lines:
    if r.get("ratio") and "per_round" in r:
      target = "" if r["target"] is None else f">= {r['target']}"
      met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
      rows.append(f"| {r['workload']} | {r['name']} | {', '.join(map(str, r['per_round']))} | "
                  f"{r['median']} | {target} | {met} |")
  for r in lines:
    if r.get("memory"):
      ratio = r["dp_over_nonprivate_peak_rss"]
      rows.append(f"| {r['workload']} | DP peak RSS over non-private ({r['dp_peak_rss_mb']} / "
                  f"{r['nonprivate_peak_rss_mb']} MB) | | {ratio} | <= 1.3 | "
                  f"{'yes' if ratio <= 1.3 else '**no**'} |")
  return "\n".join(rows)


def sitting(args) -> int:
  """Everyone in one sitting: rounds of every system, alternating, one JSON line each."""
  from _jsonl import emit, env
  systems = [s for s in args.systems.split(",") if s]
  unknown = [s for s in systems if s not in OURS and s not in PEER_SYSTEMS]
  if unknown:
    raise SystemExit(f"unknown systems {unknown}; ours {list(OURS)}, peers {PEER_SYSTEMS}")
  ours = _Worker([sys.executable, os.path.abspath(__file__), "--worker",
                  f"--w2-rows={args.w2_rows}"])
  peers = (_Worker([args.peer_python, os.path.join(ROOT, "benchmarks", "peers.py"),
                    "--worker"]) if any(s in PEER_SYSTEMS for s in systems) else None)
  if peers is None and any(s in PEER_SYSTEMS for s in systems):
    raise SystemExit("the peers need --peer-python (bash benchmarks/peer_venv.sh)")
  head = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=_device())
  records, rates = [], []
  try:
    for rnd in range(args.rounds):
      rates.append(ours.ask(system="matmul"))
      emit(dict(rates[-1], round=rnd, **head, **env()), args.out)
      for wl in _split(args.workload, WORKLOADS):
        # Rotated every round, so that no system always follows the same one.
        order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
        for system in order:
          if (wl, system) in SLOW and not args.slow:
            continue
          worker = ours if system in OURS else peers
          rec = dict(worker.ask(workload=wl, system=system, seconds=args.seconds), round=rnd,
                     flops_per_example=flops_per_example(wl),
                     executed_flops_per_example=flops_per_example(wl, "executed"), **env())
          records.append(rec)
          emit(rec, args.out)
    rates.append(ours.ask(system="matmul"))
    emit(dict(rates[-1], round=args.rounds, **head, **env()), args.out)
  finally:
    ours.close()
    if peers is not None:
      peers.close()
  gflops = _median([r["jax_gflops"] for r in rates])
  for line in summarize(records, gflops, [r["jax_gflops"] for r in rates]):
    emit(dict(line, matmul_gflops=gflops), args.out)
  if args.memory and "W2" in args.workload:
    emit(dict(peak_memory("W2", args.w2_rows), **env()), args.out)
  return 0


def _split(value: str, allowed) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  for v in items:
    if v not in allowed:
      raise SystemExit(f"unknown value {v!r}; expected one of {sorted(allowed)}")
  return items


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workload", default=None,
                 help="W1, W2 or both: W1,W2 (default W1; with --peers both)")
  p.add_argument("--mode", default="dp", help="dp, nonprivate or both: nonprivate,dp")
  p.add_argument("--clipping", default="auto", choices=("auto", "ghost", "vmap"),
                 help="per-example clipping method of the DP mode (default auto)")
  p.add_argument("--steps-per-call", type=int, default=128)
  p.add_argument("--w2-rows", type=int, default=131_072, help="W2's training rows (an epoch)")
  p.add_argument("--max-steps", type=int, default=None,
                 help="time at most this many updates and extrapolate the epoch (slow modes)")
  p.add_argument("--microbatch-size", type=int, default=None,
                 help="vmap chunk size (the batch capacity is rounded up to a multiple)")
  p.add_argument("--repeat", type=int, default=1, help="repetitions of the whole set")
  p.add_argument("--padding-microbatch", type=int, default=None,
                 help="config padding_microbatch: skip all-padding microbatches of this size")
  p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                 help="also time both modes in one process, alternating their calls (the "
                      "ratio under the same load); default: on when both modes are asked for")
  p.add_argument("--peers", action="store_true",
                 help="one sitting of everyone (ours and the peers), interleaved in rounds")
  p.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"),
                 help="the peers' venv's python (bash benchmarks/peer_venv.sh)")
  p.add_argument("--systems", default=",".join([*OURS, *PEER_SYSTEMS]),
                 help="--peers: the systems, comma-separated")
  p.add_argument("--rounds", type=int, default=3, help="--peers: rounds over every system")
  p.add_argument("--seconds", type=float, default=3.0,
                 help="--peers: timed seconds per measurement (at least one call or step)")
  p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                 help="--peers: also W2's peak RSS, DP and non-private, in own processes")
  p.add_argument("--out", default=None, help="--peers, --units: also append the JSON lines here")
  p.add_argument("--slow", action="store_true",
                 help="--peers: also ours-dp-vmap and seed-microbatch on W2")
  p.add_argument("--table", default=None, metavar="JSONL",
                 help="print the Markdown tables of a sitting's JSON lines (its --out file)")
  p.add_argument("--units", default=None, choices=("households",),
                 help="household-level against row-level DP training of the same rows, "
                      "interleaved (rows grouped into households of the published sizes)")
  p.add_argument("--unit-size", default="8",
                 help="--units: k, the public bound on rows per unit; several: 8,4")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.table:
    with open(args.table, encoding="utf-8") as f:
      print(markdown_table([json.loads(line) for line in f if line.startswith("{")]))
    return 0
  if args.worker:
    serve(OursWorker(args.w2_rows))
    return 0
  if args.peers:
    args.workload = args.workload or "W1,W2"
    return sitting(args)
  args.workload = args.workload or "W1"
  workloads = _split(args.workload, WORKLOADS)
  if args.units:
    return units_main(args, workloads)
  modes = _split(args.mode, ("dp", "nonprivate"))
  single = dict(steps_per_call=args.steps_per_call, w2_rows=args.w2_rows,
                max_steps=args.max_steps, microbatch_size=args.microbatch_size,
                padding_microbatch=args.padding_microbatch)
  both = {"dp", "nonprivate"} <= set(modes)
  interleave = both if args.interleave is None else args.interleave
  if interleave and not both:
    raise SystemExit("--interleave needs both modes: --mode nonprivate,dp")
  if len(workloads) == 1 and args.repeat == 1 and (len(modes) == 1 or args.interleave):
    records = (measure_interleaved(workloads[0], args.clipping, **single) if interleave else
               [measure(workloads[0], modes[0], args.clipping, **single)])
    for record in records:
      print(json.dumps(record), flush=True)
    return 0
  # Several measurements: each in its own process (its own peak RSS), back to back.
  forwarded = [f"--clipping={args.clipping}", f"--steps-per-call={args.steps_per_call}",
               f"--w2-rows={args.w2_rows}"]
  if args.max_steps is not None:
    forwarded.append(f"--max-steps={args.max_steps}")
  if args.microbatch_size is not None:
    forwarded.append(f"--microbatch-size={args.microbatch_size}")
  if args.padding_microbatch is not None:
    forwarded.append(f"--padding-microbatch={args.padding_microbatch}")
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
      if interleave:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--workload={wl}",
                              "--mode=nonprivate,dp", "--interleave", *forwarded], check=True,
                             text=True, stdout=subprocess.PIPE).stdout
        for line in out.strip().splitlines():
          if line.startswith("{"):
            print(json.dumps(dict(json.loads(line), repeat=rep)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Scaling of the distributed step: 1 device vs 1 process x 2 devices vs 2 processes x 1 device.

Workloads (as ``benchmarks/throughput.py`` and ``../shared/bench/peer_torch.py``):

* **W1**: MLP 9-50-1 (551 parameters), BCE, expected batch 256, on generated CaPUMS data
  (``preprocessing.synthesize``, seed 0, the 979,193 training rows of 1,223,992);
* **W2**: MLP 128-1024-1024-1 (1,182,721 parameters), BCE, expected batch 1024, on 131,072
  rows of generated Gaussian features (128 columns) with a logistic label.

Each topology runs in fresh processes: ``1x1`` (one process, one device), ``1x2`` (one
process, 2 CPU devices) and ``2x1`` (two processes of one device each, started by
:mod:`fastdp_jax.launch`, gloo all-reduce over loopback). Every process holds only its
contiguous share of the rows and builds the trainer itself (:func:`fastdp_jax.setup`
on the rows in memory, as ``benchmarks/throughput.py``; keys fixed, hence ``"private":
false``, which does not change the speed): per-example clipping (``clipping`` method), one
all-reduce per update with ``--strategy``, noise, SGD. After one compiling call, ``calls``
calls of ``steps_per_call`` updates of :meth:`fastdp_jax.Trainer.train_call` are
timed as the training loop makes them: each process samples its own devices' batches on the
host (``host_sampling_ms_per_step``, included in ``step_ms``), transfers them, runs the step
and fetches its metrics. Prints one JSON line per measurement::

  {"workload": "W1", "topology": "2x1", "processes": 2, "devices": 2, "examples_per_s": ...,
   "step_ms": ..., "speedup_vs_1x1": ..., "allreduce_bytes_per_step": ...}

then the communication model (:func:`predict`) for 4, 16 and 64 GPUs, one line per case.

Usage::

  python benchmarks/scaling.py                       # both workloads, all topologies (~3 min)
  python benchmarks/scaling.py --workloads W2 --topologies 1x1,1x2
  python benchmarks/scaling.py --model_only --step_ms W1=0.08,W2=0.9   # GPU step times
  python benchmarks/scaling.py --rows 8192 --calls 2                  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

WORKLOADS = {  # features, hidden sizes, expected batch size, steps per call, timed calls
    "W1": (9, (50,), 256, 128, 30),
    "W2": (128, (1024, 1024), 1024, 2, 4),
}
W2_ROWS = 131_072  # W1: throughput.W1_ROWS, W1_TRAIN_ROWS
TOPOLOGIES = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1),  # processes, devices per process
              "1x4": (1, 4), "1x8": (1, 8)}  # (1xN for N > 2: local GPUs, --platform gpu)

# --- the communication model -------------------------------------------------------------
# Assumed links (documented in BENCHMARKS.md): GPUs of one node talk over NVLink, nodes over
# one 400 Gb/s InfiniBand NIC per GPU; 8 GPUs per node. Bandwidths are achievable all-reduce
# bus bandwidths, latencies the per-hop cost of one ring step (NCCL-like).
LINKS = {
    "nvlink": dict(bandwidth=300e9, latency=5e-6),  # inside a node
    "ib400": dict(bandwidth=40e9, latency=10e-6),  # between nodes, per GPU
}
GPUS_PER_NODE = 8
# Estimated single-GPU (H100) step times in seconds, used when no measurement is given:
# W1 is bound by kernel launches (a few dozen small kernels per update inside the compiled
# loop); W2 with ghost clipping is a forward pass, a backward pass to the pre-activations and
# the weighted weight-gradient sum: 3 x 2 x 1.18 M x 1024 = 7.3 GFLOP per update, on about
# 1.2 x 1024 padded rows, at ~30 TFLOP/s.
DEFAULT_STEP_S = {"W1": 60e-6, "W2": 0.3e-3}
STEP_FLOOR_S = 40e-6  # an update never takes less, however small each device's share


def num_params(workload: str) -> int:
  d, hidden, *_ = WORKLOADS[workload]
  sizes = [d, *hidden, 1]
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def ring_allreduce_s(num_bytes: float, n: int) -> float:
  """Time of one ring all-reduce of ``num_bytes`` over ``n`` devices (0 for one device).

  ``2 (n - 1) / n * bytes / bandwidth + 2 (n - 1) * latency``, with the slowest link of the
  ring: NVLink inside one node, InfiniBand as soon as the ring leaves it.
  """
  if n <= 1:
    return 0.0
  link = LINKS["nvlink"] if n <= GPUS_PER_NODE else LINKS["ib400"]
  return 2 * (n - 1) / n * num_bytes / link["bandwidth"] + 2 * (n - 1) * link["latency"]


def predict(workload: str, n: int, step_s: float) -> dict:
  """Predicted step time and parallel efficiency on ``n`` GPUs.

  Two regimes: ``fixed_global_batch`` keeps the expected batch (so q, sigma and epsilon are
  unchanged) and splits it over the GPUs; ``fixed_per_gpu_batch`` gives every GPU the whole
  batch (what the original system did: the global batch, hence q, grows with n).
  """
  comm = ring_allreduce_s(4 * num_params(workload), n)
  strong = max(step_s / n, STEP_FLOOR_S) + comm
  weak = step_s + comm
  per_example = step_s / WORKLOADS[workload][2]
  return dict(workload=workload, gpus=n, allreduce_bytes=4 * num_params(workload),
              allreduce_us=comm * 1e6, step_1gpu_us=step_s * 1e6,
              fixed_global_batch_efficiency=step_s / (n * strong),
              fixed_per_gpu_batch_efficiency=step_s / weak,
              # E = t / (t + comm) >= 0.8 needs t >= 4 comm: this many examples per GPU.
              batch_per_gpu_for_80pct=int(-(-4 * comm // per_example)))


# The original system (SEED.md): Tesla M60s, 979k rows / batch 256 = 3,825 updates per epoch
# and per GPU (every rank takes its own batch of 256), 615 s per epoch on 1 GPU (v2), and one
# all-reduce per parameter tensor (4) per microbatch (85 per update): 340 per update.
ORIGINAL = dict(epoch_s={1: 615.0, 2: 304.0, 4: 173.0}, updates_per_epoch=3825,
                allreduces_per_update=85 * 4, tensor_bytes=551 * 4 / 4,
                link=dict(bandwidth=6e9, latency=10e-6))  # PCIe between M60s (fitted latency)


def predict_original(n: int) -> dict:
  """The same ring model applied to the original's 340 small all-reduces per update."""
  o = ORIGINAL
  step = o["epoch_s"][1] / o["updates_per_epoch"]
  if n <= 1:
    comm = 0.0
  else:
    one = (2 * (n - 1) / n * o["tensor_bytes"] / o["link"]["bandwidth"]
           + 2 * (n - 1) * o["link"]["latency"])
    comm = o["allreduces_per_update"] * one
  published = o["epoch_s"][1] / (n * o["epoch_s"][n]) if n in o["epoch_s"] else None
  return dict(workload="original W1 (v2, M60)", gpus=n, allreduce_us=comm * 1e6,
              step_1gpu_us=step * 1e6, fixed_per_gpu_batch_efficiency=step / (step + comm),
              published_efficiency=published)


# --- one measurement (run in each worker process) -----------------------------------------

def _local_rows(workload: str, process: int, num_processes: int, rows: int = 0):
  """This process's contiguous share of the workload's training rows (balanced; the first
  ``rows`` of them when ``rows`` > 0), and every process's row count."""
  import numpy as np
  from benchmarks import throughput
  x, y = throughput.workload_data(workload, W2_ROWS)
  if rows:
    x, y = x[:rows], y[:rows]
  parts = np.array_split(np.arange(len(y)), num_processes)
  mine = parts[process]
  return x[mine], y[mine], [len(p) for p in parts]


def worker(workload: str, strategy: str, clipping_method: str, rows: int = 0,
           calls: int = 0) -> None:
  """One measurement in this process (or in each process of a launch): the trainer of
  :func:`fastdp_jax.setup` on this process's rows, one compiling call, then ``calls``
  timed calls of :meth:`fastdp_jax.Trainer.train_call`."""
  from fastdp_jax import distributed
  distributed.initialize()  # from the launcher's environment; a single process otherwise
  import contextlib
  import jax
  from benchmarks import throughput

  _, _, batch, steps_per_call, default_calls = WORKLOADS[workload]
  calls = calls or default_calls
  x, y, process_rows = _local_rows(workload, jax.process_index(), jax.process_count(), rows)
  updates = (calls + 1) * steps_per_call
  with contextlib.ExitStack() as cleanup:
    t = throughput.make_trainer(
        workload, "dp", clipping_method, throughput.in_memory_data(workload, x, y, process_rows),
        cleanup, steps_per_call=steps_per_call, strategy=strategy,
        num_epochs=-(-updates // max(1, round(sum(process_rows) / batch))))
    t0 = time.perf_counter()
    throughput.timed_call(t, steps_per_call)
    compile_s = time.perf_counter() - t0
    prof = t.services.prof
    sampling_s = prof.phases()["sampling"]["seconds"]
    examples = 0.0
    t0 = time.perf_counter()
    for _ in range(calls):
      examples += throughput.timed_call(t, steps_per_call)
    elapsed = time.perf_counter() - t0
    sampling_s = prof.phases()["sampling"]["seconds"] - sampling_s
    params = sum(int(p.size) for p in jax.tree.leaves(t.progress.state.params))
    if jax.process_index() == 0:
      print("RESULT " + json.dumps(dict(
          workload=workload, processes=jax.process_count(), devices=jax.device_count(),
          strategy=strategy, clipping=throughput.clipping_name(t),
          examples_per_s=examples / elapsed, step_ms=1e3 * elapsed / (calls * steps_per_call),
          host_sampling_ms_per_step=1e3 * sampling_s / (calls * steps_per_call),
          updates=calls * steps_per_call, first_call_s=compile_s,
          capacity_per_device=t.batches.capacity, params=params,
          allreduce_bytes_per_step=4 * params, train_rows=t.data.num_examples,
          private=t.private, keys=throughput.KEYS,
          device=jax.devices()[0].device_kind)), flush=True)


def _measure(workload: str, topology: str, strategy: str, clipping_method: str,
             rows: int = 0, calls: int = 0, platform: str = "cpu") -> dict:
  processes, devices = TOPOLOGIES[topology]
  worker_args = ["--worker", f"--workloads={workload}", f"--strategy={strategy}",
                 f"--clipping={clipping_method}", f"--rows={rows}", f"--calls={calls}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if platform == "gpu":  # the first `devices` local GPUs, one process (NCCL inside it)
    if processes != 1:
      raise ValueError(f"--platform gpu measures 1xN topologies only, not {topology}")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
  if processes == 1:
    cmd = [sys.executable, os.path.abspath(__file__), *worker_args]
  else:
    cmd = [sys.executable, "-m", "fastdp_jax.launch", f"--num_processes={processes}",
           f"--devices_per_process={devices}", f"--script={os.path.abspath(__file__)}", "--",
           *worker_args]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  lines = [l.split("RESULT ", 1)[1] for l in r.stdout.splitlines() if "RESULT " in l]
  if r.returncode != 0 or not lines:
    raise RuntimeError(f"{workload} {topology} failed ({r.returncode}):\n"
                       f"{(r.stdout + r.stderr)[-3000:]}")
  return dict(json.loads(lines[0]), topology=topology)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workloads", default="W1,W2")
  p.add_argument("--topologies", default="1x1,1x2,2x1")
  p.add_argument("--strategy", default="auto", choices=["auto", "shard_map"])
  p.add_argument("--clipping", default="auto", help="'auto' (ghost for MLPs) | 'ghost' | 'vmap'")
  p.add_argument("--model_only", action="store_true", help="print only the model's lines")
  p.add_argument("--step_ms", default="", help="single-GPU step times for the model, e.g. "
                 "W1=0.08,W2=0.9 (default: the estimates in DEFAULT_STEP_S)")
  p.add_argument("--rows", type=int, default=0,
                 help="train on the first ROWS rows of each workload (default 0: all)")
  p.add_argument("--calls", type=int, default=0,
                 help="timed calls per measurement (default 0: the workload's, in WORKLOADS)")
  p.add_argument("--platform", default="cpu", choices=["cpu", "gpu"],
                 help="cpu: fake CPU devices; gpu: 1xN topologies on the first N local GPUs")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  workloads = args.workloads.split(",")
  if args.worker:
    worker(workloads[0], args.strategy, args.clipping, args.rows, args.calls)
    return 0
  if not args.model_only:
    for wl in workloads:
      base = None
      for topo in args.topologies.split(","):
        res = _measure(wl, topo, args.strategy, args.clipping, args.rows, args.calls,
                       args.platform)
        base = res["examples_per_s"] if topo == "1x1" else base
        if base:
          res["speedup_vs_1x1"] = res["examples_per_s"] / base
        print(json.dumps(res), flush=True)
  step_s = dict(DEFAULT_STEP_S)
  for item in filter(None, args.step_ms.split(",")):
    name, ms = item.split("=")
    step_s[name] = float(ms) / 1e3
  for n in (1, 2, 4):
    print(json.dumps(dict(predict_original(n), kind="model_original")), flush=True)
  for wl in workloads:
    for n in (1, 2, 4, 16, 64):
      print(json.dumps(dict(predict(wl, n, step_s[wl]), kind="model",
                            step_source="measured" if args.step_ms else "estimate")),
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Where W2's time goes on this machine: per-op times, busy threads, dot kernels, padding.

For ours (``--mode nonprivate`` or ``dp``) it builds the benchmark's trainer
(:func:`throughput.make_trainer`), compiles, then

* traces ``--steps`` updates with the JAX profiler and sums the trace's XLA op events
  (``XLA Ops`` / thunk events of the CPU executable) by op name: ``ops`` in the JSON;
* times ``--calls`` calls while reading every thread's CPU time from
  ``/proc/self/task/*/stat`` before and after: ``threads`` lists the threads that ran,
  with their share of the wall time (1.0 = one core busy throughout);
* counts the compiled HLO's dot instructions and the custom calls (oneDNN, XNNPACK) that
  replace them: which matmul kernels XLA:CPU runs;
* reports the padding: capacity against the expected batch.

Usage::

  python benchmarks/profile_w2.py --mode nonprivate
  python benchmarks/profile_w2.py --mode dp --steps 8 --calls 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (the benchmark's own trainer set-up)
from _jsonl import env  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int | str = "self") -> dict[str, float]:
  """CPU seconds (user + system) of every thread of ``pid``, by ``tid:name``."""
  out = {}
  for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
    try:
      with open(stat) as f:
        text = f.read()
    except OSError:  # the thread ended
      continue
    tid = stat.split("/")[-2]
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
  return out


def busy_threads(before: dict[str, float], after: dict[str, float], wall: float,
                 floor: float = 0.02) -> list[dict]:
  """Threads whose CPU time grew by more than ``floor`` of ``wall``, busiest first."""
  rows = [dict(thread=k, busy=round((after[k] - before.get(k, 0.0)) / wall, 3))
          for k in after]
  return sorted((r for r in rows if r["busy"] > floor), key=lambda r: -r["busy"])


def trace_op_ms(trace_dir: str, top: int = 15) -> tuple[list[dict], float]:
  """Sums the perfetto trace's complete events by name (the XLA ops' thunks on CPU).

  Returns ``(rows, total_ms)``: the ``top`` names by total duration with their calls, and
  the total of every event on the XLA threads (those whose events are not Python's).
  """
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    return [], 0.0
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
             for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    thread = threads.get((e.get("pid"), e.get("tid")), "")
    if ("python" in thread.lower() or thread.startswith("MainThread")
        or e["name"].startswith("$")):  # Python's own events (the profiler's Python tracer)
      continue
    name = re.sub(r"\.\d+$", "", e["name"])  # fusion.12 -> fusion
    total[name] += e.get("dur", 0) / 1000
    calls[name] += 1
  rows = [dict(op=k, ms=round(v, 2), calls=calls[k]) for k, v in total.most_common(top)]
  return rows, round(sum(total.values()), 2)


def hlo_kernels(t) -> dict:
  """Dot instructions and matmul custom calls in the compiled call's optimized HLO."""
  import numpy as np
  b, chunk, dev = t.batches.sampler.batches(0, 1), t.config.steps_per_call, t.data.dev
  text = t.compiled.run.lower(t.progress.state, dev.features, dev.labels,
                              np.repeat(b.indices, chunk, 0), np.repeat(b.mask, chunk, 0),
                              np.ones(chunk, bool)).compile().as_text()
  dots = re.findall(r"= (f32|bf16)\[([0-9,]*)\][^=]*? dot\(", text)
  custom = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  return dict(dots=[f"{dtype}[{shape}]" for dtype, shape in dots],
              custom_calls=dict(custom),
              xnn_or_onednn_fusions=len(re.findall(r"__xnn|onednn|xnn_fusion", text)))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mode", default="nonprivate", choices=("nonprivate", "dp"))
  p.add_argument("--workload", default="W2", choices=tuple(throughput.WORKLOADS))
  p.add_argument("--steps", type=int, default=16, help="updates per call (traced and timed)")
  p.add_argument("--calls", type=int, default=4, help="timed calls for the thread counts")
  p.add_argument("--w2-rows", type=int, default=131_072)
  p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                 help="also trace one call with the JAX profiler (ops)")
  args = p.parse_args(argv)
  import jax
  with contextlib.ExitStack() as cleanup:
    t = throughput.make_trainer(args.workload, args.mode, "auto",
                                throughput._place(args.workload, args.w2_rows), cleanup,
                                steps_per_call=args.steps, num_epochs=4)
    throughput.warm_up(t)
    throughput.timed_call(t, args.steps)
    kernels = hlo_kernels(t)
    before, t0 = thread_cpu_seconds(), time.perf_counter()
    examples = sum(throughput.timed_call(t, args.steps) for _ in range(args.calls))
    wall = time.perf_counter() - t0
    threads = busy_threads(before, thread_cpu_seconds(), wall)
    ops, op_total = [], 0.0
    if args.trace:
      with tempfile.TemporaryDirectory(prefix="fastdp-prof-") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
          throughput.timed_call(t, args.steps)
        ops, op_total = trace_op_ms(d)
    _, hidden, batch = throughput.WORKLOADS[args.workload]
    record = dict(
        bench="profile", workload=args.workload, mode=args.mode,
        clipping=throughput.clipping_name(t), updates_per_call=args.steps,
        ms_per_update=round(1000 * wall / (args.calls * args.steps), 2),
        examples_per_s=round(examples / wall), capacity=t.batches.capacity,
        expected_batch=batch, padded_share=round(1 - batch / t.batches.capacity, 3),
        threads=threads, cores_busy=round(sum(r["busy"] for r in threads), 2),
        trace_ops_ms_per_call=ops, trace_total_ms=op_total, **kernels,
        xla_flags=os.environ.get("XLA_FLAGS", ""), **env())
  print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

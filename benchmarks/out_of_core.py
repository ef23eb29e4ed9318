"""Out-of-core Poisson batches: Spark materialisation time, reader throughput and peak RSS.

Prints one JSON object per line (and appends them to ``--output`` if given)::

  python benchmarks/out_of_core.py                                # N = 1 M and 4 M rows
  python benchmarks/out_of_core.py --sizes 200000 --epochs 2      # quick

For each size: generated raw-spec PUMS rows (``preprocessing.synthesize``, seed 0) go through
the Spark job (``pums_raw`` spec: 29 features) into a dataset; then, each in a fresh process:

* ``materialise``: ``python -m preprocessing.poisson_batches`` (``--master``, default
  local[2]); ``wall_s`` includes Spark start-up, ``job_s`` is the job alone (block.json);
* ``stream``: ``open_batches`` (every shard's sha256 checked: ``open_s``), then every update
  read in order through the prefetching reader (``updates_per_take`` at a time), as a trainer
  would; ``peak_rss_mb`` is the process's ``ru_maxrss`` and ``base_rss_mb`` its RSS before
  opening, so the difference is what streaming costs (VmHWM; getrusage's ru_maxrss beside
  it, which on Linux may carry the parent's high-water mark over fork + exec);
* ``in_memory``: the in-memory path's host side for comparison: the train split loaded
  (``fastdp_jax.load_split``) and every update's rows gathered with
  ``fastdp_jax.PoissonSampler`` (a fixed key: the speed does not depend on it).

Reads come from the page cache when the batches fit in memory (just written): ``mb_per_s`` is
then the reader's own cost, not the disk's. The load average is recorded because other
processes on a small machine change the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from _jsonl import emit as _emit  # noqa: E402  (benchmarks/ is the script's directory)
from _jsonl import env as _env  # noqa: E402


def _run(cmd: list[str]) -> tuple[float, str]:
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if r.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  return wall, r.stdout


def _rss_mb() -> float:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak() -> dict:
  """Peak RSS: VmHWM (this process image's high-water mark) and getrusage's ru_maxrss.

  ru_maxrss can carry the parent's high-water mark over fork + exec on Linux, so the
  benchmark reports VmHWM as the figure and ru_maxrss beside it.
  """
  with open("/proc/self/status", encoding="ascii") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
  return {"peak_rss_mb": round(hwm / 1024, 1),
          "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def child_stream(path: str, take: int) -> dict:
  """Streams every update of a batch directory; returns the figures (run in a fresh process)."""
  from fastdp_jax.data import batch_stream  # pylint: disable=g-import-not-at-top
  base = _rss_mb()
  t0 = time.perf_counter()
  stream = batch_stream.open_batches(path)
  opened = time.perf_counter() - t0
  real, nbytes = 0, 0
  t0 = time.perf_counter()
  with stream.reader(0) as r:
    for first in range(0, stream.total_updates, take):
      f, lab, m = r.take(min(take, stream.total_updates - first))
      real += int(m.sum())
      nbytes += f.nbytes + lab.nbytes + m.nbytes
  secs = time.perf_counter() - t0
  return {"updates": stream.total_updates, "capacity": stream.capacity,
          "open_s": round(opened, 2), "stream_s": round(secs, 2),
          "updates_per_s": round(stream.total_updates / secs, 1),
          "mb_per_s": round(nbytes / 1e6 / secs, 1), "examples_per_s": round(real / secs),
          "base_rss_mb": round(base, 1), **_peak(), "updates_per_take": take}


def child_in_memory(dataset: str, batch_size: int, updates: int) -> dict:
  """The in-memory host path: the split in memory, each update's rows gathered by index."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import fastdp_jax  # pylint: disable=g-import-not-at-top
  base = _rss_mb()
  train = fastdp_jax.load_split(dataset, "train")
  sampler = fastdp_jax.PoissonSampler(len(train), batch_size, 0)
  t0 = time.perf_counter()
  real, nbytes = 0, 0
  for first in range(0, updates, 64):
    k = min(64, updates - first)
    b = sampler.batches(first, k)
    x = np.take(train.features, b.indices[:, 0], axis=0)  # [k, capacity, F], as a device would
    real += int(b.mask.sum())
    nbytes += x.nbytes
  secs = time.perf_counter() - t0
  return {"updates": updates, "updates_per_s": round(updates / secs, 1),
          "mb_per_s": round(nbytes / 1e6 / secs, 1),
          "examples_per_s": round(real / secs), "base_rss_mb": round(base, 1), **_peak()}


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 4_000_000],
                 help="rows of generated raw PUMS data (80 %% go to train)")
  p.add_argument("--epochs", type=int, nargs="*", default=[10],
                 help="epochs to materialise, one per size (the last repeats)")
  p.add_argument("--batch-size", type=int, default=1024)
  p.add_argument("--master", default="local[2]")
  p.add_argument("--take", type=int, default=64, help="updates per take() of the reader")
  p.add_argument("--workdir", help="where to put data and batches (default: a temp dir)")
  p.add_argument("--output", help="append the JSON lines to this file")
  p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:  # a fresh process for one measurement
    kind, *rest = args.child
    if kind == "stream":
      print(json.dumps(child_stream(rest[0], int(rest[1]))))
    else:
      print(json.dumps(child_in_memory(rest[0], int(rest[1]), int(rest[2]))))
    return 0
  from preprocessing import synthesize  # pylint: disable=g-import-not-at-top
  from fastdp_jax.data import batch_format  # pylint: disable=g-import-not-at-top
  from fastdp_jax.data import batch_stream  # pylint: disable=g-import-not-at-top
  work = args.workdir or tempfile.mkdtemp(prefix="bench-out-of-core-")
  os.makedirs(work, exist_ok=True)
  try:
    for i, rows in enumerate(args.sizes):
      epochs = args.epochs[min(i, len(args.epochs) - 1)]
      csv = os.path.join(work, f"raw-{rows}.csv")
      dataset = os.path.join(work, f"raw-{rows}")
      batches = os.path.join(work, f"raw-{rows}-b{args.batch_size}")
      synthesize.write_csv_file(csv, rows, schema_name="raw", seed=0)
      wall, _ = _run([sys.executable, "-m", "preprocessing.spark_job", "--input", csv,
                      "--output", dataset, "--spec", "pums_raw", "--master", args.master,
                      "--overwrite"])
      os.remove(csv)
      env = _env()
      wall, _ = _run([sys.executable, "-m", "preprocessing.poisson_batches", "--dataset",
                      dataset, "--output", batches, "--batch-size", str(args.batch_size),
                      "--epochs", str(epochs), "--master", args.master, "--overwrite"])
      stream = batch_stream.open_batches(batches)
      block = batch_format.read_block(batches, batch_format.block_name(0, epochs), stream.run)
      inclusions = stream.total_updates * stream.batch_size  # expected
      _emit({"bench": "materialise", "rows": rows, "train_rows": stream.num_examples,
             "features": stream.num_features, "batch_size": args.batch_size, "epochs": epochs,
             "updates": stream.total_updates, "capacity": stream.capacity,
             "shards": len(block.shards), "disk_mb": round(_du(batches) / 1e6, 1),
             "master": args.master, "wall_s": round(wall, 2),
             "job_s": block.extra["seconds"],
             "expected_inclusions_per_s": round(inclusions / block.extra["seconds"]),
             "spark_tasks": block.extra["spark"]["tasks"], **env}, args.output)
      del stream
      env = _env()
      _, out = _run([sys.executable, os.path.abspath(__file__), "--child", "stream", batches,
                     str(args.take)])
      _emit({"bench": "stream", "rows": rows, **json.loads(out), **env}, args.output)
      env = _env()
      updates = min(2000, epochs * max(1, round(0.8 * rows / args.batch_size)))
      _, out = _run([sys.executable, os.path.abspath(__file__), "--child", "in_memory",
                     dataset, str(args.batch_size), str(updates)])
      _emit({"bench": "in_memory", "rows": rows, **json.loads(out), **env}, args.output)
      shutil.rmtree(batches, ignore_errors=True)
      shutil.rmtree(dataset, ignore_errors=True)
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Preprocessing throughput: the Spark job (local[2]) and the streaming path, CSV -> shards.

Prints one JSON object per line (and appends them to ``--output`` if given)::

  python benchmarks/preprocess.py                          # 1.22 M and 12.2 M rows, Spark
  python benchmarks/preprocess.py --sizes 1223992 --streaming-sizes 1223992
  python benchmarks/preprocess.py --sizes 200000 --streaming-sizes 200000 --repeats 1  # quick

Each Spark figure is the wall time of a fresh ``python -m preprocessing.spark_job`` process,
Spark start-up included (what a user waits for); ``job_s`` is the job alone (from the
manifest). Each streaming figure is a fresh ``python -m preprocessing.mapreduce.local``
(mapper | LC_ALL=C sort | reducer, then the converter). The input is generated CaPUMS data
(``preprocessing.synthesize``, seed 0, 0.1 % NA cells). The load average is recorded because
other processes on a small machine change the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastdp_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from preprocessing import synthesize  # pylint: disable=g-import-not-at-top,wrong-import-position


from _jsonl import emit as _emit  # noqa: E402  (benchmarks/ is the script's directory)
from _jsonl import env as _env  # noqa: E402


def _run(cmd: list[str]) -> float:
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if r.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  return wall


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", type=int, nargs="*", default=[1_223_992, 12_239_920],
                 help="rows for the Spark job")
  p.add_argument("--streaming-sizes", type=int, nargs="*", default=[1_223_992],
                 help="rows for the streaming path")
  p.add_argument("--master", default="local[2]")
  p.add_argument("--repeats", type=int, default=2, help="runs per size (the best is kept too)")
  p.add_argument("--workdir", help="where to put inputs and outputs (default: a temp dir)")
  p.add_argument("--output", help="append the JSON lines to this file")
  args = p.parse_args(argv)
  work = args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
  os.makedirs(work, exist_ok=True)
  try:
    for rows in sorted(set(args.sizes) | set(args.streaming_sizes)):
      csv = os.path.join(work, f"capums-{rows}.csv")
      t0 = time.perf_counter()
      size = synthesize.write_csv_file(csv, rows, seed=0)
      gen = time.perf_counter() - t0
      _emit({"bench": "synthesize", "rows": rows, "mb": round(size / 1e6, 1),
             "seconds": round(gen, 2), "rows_per_s": round(rows / gen), **_env()}, args.output)
      out = os.path.join(work, "out")
      if rows in args.sizes:
        for rep in range(args.repeats):
          env = _env()
          wall = _run([sys.executable, "-m", "preprocessing.spark_job", "--input", csv,
                       "--output", out, "--spec", "capums", "--master", args.master,
                       "--overwrite"])
          m = manifest_lib.read_manifest(out)
          _emit({"bench": "spark_job", "rows": rows, "mb": round(size / 1e6, 1),
                 "master": args.master, "repeat": rep, "wall_s": round(wall, 2),
                 "job_s": m.extra["seconds"], "startup_s": round(wall - m.extra["seconds"], 2),
                 "rows_per_s": round(rows / wall), "job_rows_per_s":
                 round(rows / m.extra["seconds"]), "partitions": m.extra["spark"]["partitions"],
                 "shards": len(m.shards), "kept": m.provenance.kept, **env}, args.output)
      if rows in args.streaming_sizes:
        for rep in range(args.repeats):
          env = _env()
          wall = _run([sys.executable, "-m", "preprocessing.mapreduce.local", "--input", csv,
                       "--output", out, "--spec", "capums", "--overwrite"])
          m = manifest_lib.read_manifest(out)
          _emit({"bench": "streaming_local", "rows": rows, "mb": round(size / 1e6, 1),
                 "repeat": rep, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall),
                 "kept": m.provenance.kept, **env}, args.output)
      os.remove(csv)
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

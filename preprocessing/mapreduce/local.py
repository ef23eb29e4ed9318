"""The whole streaming path on one machine: ``mapper | LC_ALL=C sort | reducer``, then shards.

::

  python -m preprocessing.mapreduce.local --input in.csv --output data/capums \
      --spec capums [--overwrite] [--keep-tsv cleaned.tsv]

This is what ``hadoop jar hadoop-streaming.jar`` does with one map task and one reducer; the
same mapper and reducer run under Hadoop unchanged (see ``mapper.py``). Input compressed with
gzip or bzip2 is decompressed first (as Hadoop and Spark do); other compressions are refused.
The reducer's output and ``sort``'s temporary files (private rows) live in a hidden work
directory beside the output (``.NAME.staging-*``, removed at the end, and by the next run if
the job was killed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from fastdp_jax import atomic
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import features as features_lib
from preprocessing.mapreduce import mapper
from preprocessing.mapreduce import to_shards
from preprocessing import output as output_lib
from preprocessing.output import PipelineError

_HERE = os.path.dirname(os.path.abspath(__file__))


# Compressions the streaming path reads, as Hadoop's and Spark's line readers do.
_DECOMPRESS = {"gzip": "gzip", "bzip2": "bz2"}


def input_compression(input_csv: str) -> str | None:
  """``'gzip'``, ``'bzip2'`` (decompressed on the way in) or None.

  Raises:
    PipelineError: another compression ("compressed input is not supported by the streaming
      path").
  """
  with open(input_csv, "rb") as f:
    kind = mapper.compression_of(f.read(16))
  if kind is None and input_csv.endswith(_COMPRESSED_SUFFIXES):
    kind = input_csv.rsplit(".", 1)[1]
  if kind is not None and kind not in _DECOMPRESS:
    raise PipelineError(f"{input_csv} is {kind}-compressed: {mapper.UNSUPPORTED_COMPRESSION} "
                        "(it reads plain, gzip and bzip2 CSV); decompress it first, or use "
                        "the Spark job")
  return kind


_COMPRESSED_SUFFIXES = (".deflate", ".zst", ".lz4", ".snappy", ".xz", ".zip")


def run_streaming(input_csv: str, tsv: str, spec_path: str, *, sort_memory: str = "25%",
                  work_dir: str | None = None, file_name: str = "-") -> None:
  """Runs ``mapper < input_csv | LC_ALL=C sort | reducer > tsv``; raises on any failure.

  Args:
    work_dir: where ``sort`` keeps its temporary files (default: the system's).
    file_name: how the rejects name the input file (the mapper's ``map_input_file``).
  """
  if os.path.isdir(input_csv):
    raise PipelineError(f"input {input_csv} is a directory: the streaming path reads one CSV "
                        "file (the Spark job reads directories)")
  if not os.path.isfile(input_csv):
    raise FileNotFoundError(f"input {input_csv} does not exist")
  kind = input_compression(input_csv)
  env = dict(os.environ, LC_ALL="C", map_input_file=file_name)
  py = sys.executable
  with open(input_csv, "rb") as fin, open(tsv, "wb") as fout, \
      tempfile.TemporaryFile() as err_d, tempfile.TemporaryFile() as err_m, \
      tempfile.TemporaryFile() as err_s, tempfile.TemporaryFile() as err_r:
    stages = []
    source: Any = fin
    if kind is not None:
      module = _DECOMPRESS[kind]
      stages.append(("decompress", subprocess.Popen(
          [py, "-c", f"import {module}, shutil, sys; shutil.copyfileobj({module}.open("
           "sys.stdin.buffer), sys.stdout.buffer)"],
          stdin=fin, stdout=subprocess.PIPE, stderr=err_d, env=env), err_d))
      source = stages[-1][1].stdout
    stages.append(("mapper", subprocess.Popen(
        [py, os.path.join(_HERE, "mapper.py"), "--spec", spec_path],
        stdin=source, stdout=subprocess.PIPE, stderr=err_m, env=env), err_m))
    sort_cmd = ["sort", "-S", sort_memory] + (["-T", work_dir] if work_dir else [])
    stages.append(("sort", subprocess.Popen(sort_cmd, stdin=stages[-1][1].stdout,
                                            stdout=subprocess.PIPE, stderr=err_s, env=env),
                   err_s))
    stages.append(("reducer", subprocess.Popen(
        [py, os.path.join(_HERE, "reducer.py")], stdin=stages[-1][1].stdout, stdout=fout,
        stderr=err_r, env=env), err_r))
    for _, proc, _ in stages[:-1]:
      proc.stdout.close()  # each stage's reader owns its pipe now
    codes = [proc.wait() for _, proc, _ in stages]
    failed = []
    for (name, _, err), code in zip(stages, codes):
      if code:
        err.seek(0)
        text = err.read().decode(errors="replace").strip().splitlines()
        failed.append((name, code, text[-1] if text else ""))
    if any(atomic.is_disk_full(OSError(last)) for _, _, last in failed):
      raise atomic.DiskFullError(atomic.disk_full_message(
          f"the streaming path's work files in {work_dir or tempfile.gettempdir()}",
          "no output was written"))
    # A stage killed by SIGPIPE only lost its reader: the reader's failure is the news.
    for name, code, last in sorted(failed, key=lambda f: f[1] == -13):
      raise PipelineError(f"{name} failed (exit {code}): {last}")


def file_uri(path: str) -> str:
  """A local file as Spark names it in ``_metadata.file_path``: ``file:/abs/path``, quoted."""
  return "file:" + urllib.parse.quote(os.path.abspath(output_lib.local_path(path)))


def run_local(input_csv: str, output: str, spec: str, *, overwrite: bool = False,
              split_seed: int = split_lib.DEFAULT_SPLIT_SEED,
              test_fraction: float = split_lib.DEFAULT_TEST_FRACTION,
              max_rows_per_shard: int = 250_000,
              keep_tsv: str | None = None,
              manifest_extra: dict | None = None) -> manifest_lib.Manifest:
  """The streaming path end to end; returns the manifest of ``output``.

  The rejects name the input by its ``file:`` URI, as the Spark job's do; ``manifest_extra``
  adds entries to the manifest's ``extra``.
  """
  out = output_lib.check_output(output, overwrite)  # before the (long) streaming run
  spec_path = spec if spec.endswith(".py") else os.path.join(  # a built-in spec's file
      os.path.dirname(os.path.abspath(features_lib.__file__)), "specs", f"{spec}.py")
  features_lib.load_spec(spec_path)
  # The cleaned rows are as private as the input: they stay beside the output (owner-only,
  # named like a staging directory so that the next run removes them if this one is killed).
  work = output_lib.make_staging(out, subdirs=())
  try:
    with atomic.disk_full_is_user_error(out, f"the previous {out} (if any) is intact",
                                        restate=True):
      tsv = keep_tsv or os.path.join(work, "cleaned.tsv")
      run_streaming(input_csv, tsv, spec_path, work_dir=work, file_name=file_uri(input_csv))
      with open(tsv, encoding="utf-8", newline="\n") as f:
        return to_shards.convert(f, output, spec_path, overwrite=overwrite,
                                 split_seed=split_seed, test_fraction=test_fraction,
                                 max_rows_per_shard=max_rows_per_shard, source=input_csv,
                                 extra=manifest_extra)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m preprocessing.mapreduce.local",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="a CSV file")
  p.add_argument("--output", required=True, help="dataset directory to create")
  p.add_argument("--spec", required=True, help="feature spec file or built-in name")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  p.add_argument("--keep-tsv", help="also keep the reducer output here")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    m = run_local(args.input, args.output, args.spec, overwrite=args.overwrite,
                  keep_tsv=args.keep_tsv)
  except (errors.UserError, FileNotFoundError, FileExistsError) as e:  # one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{output_lib.describe(args.output, m)}; {time.perf_counter() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

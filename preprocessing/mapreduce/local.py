"""The whole streaming path on one machine: ``mapper | LC_ALL=C sort | reducer``, then shards.

::

  python -m preprocessing.mapreduce.local --input in.csv --output data/capums \
      --spec capums [--overwrite] [--keep-tsv cleaned.tsv]

This is what ``hadoop jar hadoop-streaming.jar`` does with one map task and one reducer; the
same mapper and reducer run under Hadoop unchanged (see ``mapper.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from fastdp_jax import data as data_lib
from fastdp_jax import schema
from preprocessing import features as features_lib
from preprocessing.mapreduce import to_shards
from preprocessing import output as output_lib
from preprocessing.output import PipelineError

_HERE = os.path.dirname(os.path.abspath(__file__))


def run_streaming(input_csv: str, tsv: str, spec_path: str, *, sort_memory: str = "25%") -> None:
  """Runs ``mapper < input_csv | LC_ALL=C sort | reducer > tsv``; raises on any failure."""
  if not os.path.isfile(input_csv):
    raise FileNotFoundError(f"input {input_csv} does not exist")
  env = dict(os.environ, LC_ALL="C")
  py = sys.executable
  with open(input_csv, "rb") as fin, open(tsv, "wb") as fout, \
      tempfile.TemporaryFile() as err_m, tempfile.TemporaryFile() as err_s, \
      tempfile.TemporaryFile() as err_r:
    mapper = subprocess.Popen([py, os.path.join(_HERE, "mapper.py"), "--spec", spec_path],
                              stdin=fin, stdout=subprocess.PIPE, stderr=err_m, env=env)
    sorter = subprocess.Popen(["sort", "-S", sort_memory], stdin=mapper.stdout,
                              stdout=subprocess.PIPE, stderr=err_s, env=env)
    mapper.stdout.close()
    reducer = subprocess.Popen([py, os.path.join(_HERE, "reducer.py")], stdin=sorter.stdout,
                               stdout=fout, stderr=err_r, env=env)
    sorter.stdout.close()
    codes = (mapper.wait(), sorter.wait(), reducer.wait())
    for name, code, err in zip(("mapper", "sort", "reducer"), codes, (err_m, err_s, err_r)):
      if code:
        err.seek(0)
        text = err.read().decode(errors="replace").strip().splitlines()
        raise PipelineError(f"{name} failed (exit {code}): {text[-1] if text else ''}")


def run_local(input_csv: str, output: str, spec: str, *, overwrite: bool = False,
              split_seed: int = schema.DEFAULT_SPLIT_SEED,
              test_fraction: float = schema.DEFAULT_TEST_FRACTION,
              max_rows_per_shard: int = 250_000,
              keep_tsv: str | None = None) -> data_lib.Manifest:
  """The streaming path end to end; returns the manifest of ``output``."""
  from preprocessing import output as output_lib  # pylint: disable=g-import-not-at-top
  output_lib.check_output(output, overwrite)  # before the (long) streaming run
  spec_path = spec if spec.endswith(".py") else os.path.join(  # a built-in spec's file
      os.path.dirname(os.path.abspath(features_lib.__file__)), "specs", f"{spec}.py")
  features_lib.load_spec(spec_path)
  with tempfile.TemporaryDirectory() as tmp:
    tsv = keep_tsv or os.path.join(tmp, "cleaned.tsv")
    run_streaming(input_csv, tsv, spec_path)
    with open(tsv, encoding="utf-8", newline="\n") as f:
      return to_shards.convert(f, output, spec_path, overwrite=overwrite,
                               split_seed=split_seed, test_fraction=test_fraction,
                               max_rows_per_shard=max_rows_per_shard, source=input_csv)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m preprocessing.mapreduce.local",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="a CSV file")
  p.add_argument("--output", required=True, help="dataset directory to create")
  p.add_argument("--spec", required=True, help="feature spec file or built-in name")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--keep-tsv", help="also keep the reducer output here")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    m = run_local(args.input, args.output, args.spec, overwrite=args.overwrite,
                  keep_tsv=args.keep_tsv)
  except (PipelineError, features_lib.SpecError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{output_lib.describe(args.output, m)}; {time.perf_counter() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

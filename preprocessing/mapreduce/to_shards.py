"""Converts the streaming path's reducer output into a shard dataset (with rejects/).

::

  python -m preprocessing.mapreduce.to_shards --input cleaned.tsv --output data/capums \
      --spec capums [--overwrite]

``--input`` is the reducer's output: a file, ``-`` for stdin, or a Hadoop output directory
(its ``part-*`` files, in name order). Rows are encoded with the spec and split with
``fastdp_jax.data.split.is_test_row`` of their row keys (content and occurrence among the
identical rows before them: one sink sees every row in the reducer's row-id order, so one
counter numbers them over the whole input), or by ``fastdp_jax.data.units.is_test_unit`` of
the unit key when the spec names a ``privacy_unit`` (distinct unit ids sharing a key are
refused), exactly as the Spark job does; malformed
lines go to ``rejects/`` and the manifest's counts reconcile
(``rows_read = kept + dropped_na + rejected``). The output appears atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib
from preprocessing import output as output_lib
from preprocessing.output import PipelineError

BLOCK = 65536


def _input_lines(path: str) -> Iterable[str]:
  if path == "-":
    yield from sys.stdin
    return
  if os.path.isdir(path):
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if not n.startswith(("_", ".")))
  elif os.path.isfile(path):
    files = [path]
  else:
    raise FileNotFoundError(f"streaming output {path} does not exist")
  for f in files:
    with open(f, encoding="utf-8", newline="\n") as fh:
      yield from fh


class _Block:
  """Reducer records of one block, turned into a CleanResult for the ShardSink."""

  def __init__(self, k: int):
    self.k = k
    self.rows: list[int] = []
    self.kept: list[int] = []
    self.payloads: list[str] = []
    self.units: list[str] = []  # canonical unit ids of the kept rows (a unit spec)
    self.na: list[int] = []
    self.na_cells: list[list[int]] = []
    self.rejects: list[tuple[int, str, str]] = []
    self.records: list[dict] = []

  def result(self) -> tuple[np.ndarray, cleaning.CleanResult]:
    k = self.k
    if self.payloads:
      flat = ",".join(self.payloads).split(",")
      if len(flat) != k * len(self.payloads):
        raise PipelineError(f"a kept record near row {self.rows[self.kept[0]]} does not hold "
                            f"{k} values; was the streaming path run with another spec?")
      values = np.array(flat, np.float64).reshape(-1, k)
    else:
      values = np.zeros((0, k))
    cells = np.zeros((len(self.na), k), bool)
    for r, cols in enumerate(self.na_cells):
      cells[r, cols] = True
    return np.array(self.rows, np.int64), cleaning.CleanResult(
        kept=np.array(self.kept, np.int64), values=values,
        dropped_na=np.array(self.na, np.int64), na_cells=cells, rejects=self.rejects,
        units=self.units or None)  # one id per kept row of a unit spec (checked by the sink)


def convert(lines: Iterable[str], output: str, spec: features_lib.FeatureSpec | str, *,
            overwrite: bool = False, split_seed: int = split_lib.DEFAULT_SPLIT_SEED,
            test_fraction: float = split_lib.DEFAULT_TEST_FRACTION,
            max_rows_per_shard: int = 250_000, source: str = "",
            extra: dict | None = None) -> manifest_lib.Manifest:
  """Writes the dataset for reducer output ``lines``; returns its manifest.

  ``extra`` adds entries to the manifest's ``extra`` (the Spark job's ``--engine local``
  names its engine, format and input files as its Spark engine does).

  Raises:
    PipelineError: empty or inconsistent reducer output, or no usable rows.
    FileExistsError: existing output without ``overwrite``.
  """
  t0 = time.perf_counter()
  if isinstance(spec, str):
    spec = features_lib.load_spec(spec)
  out = output_lib.check_output(output, overwrite)
  with atomic.disk_full_is_user_error(out, f"the previous {out} (if any) is intact",
                                      restate=True):
    return _convert(lines, out, spec, overwrite, split_seed, test_fraction, max_rows_per_shard,
                    source, t0, extra or {})


def _convert(lines, out, spec, overwrite, split_seed, test_fraction, max_rows_per_shard,
             source, t0, extra) -> manifest_lib.Manifest:
  staging = output_lib.make_staging(out)
  k = len(spec.used_columns)
  try:
    sink = output_lib.ShardSink(spec=spec, staging=staging, split_seed=split_seed,
                                test_fraction=test_fraction, max_rows=max_rows_per_shard)
    expected_row, records, headers = 0, 0, 0
    ignored: list[str] = []  # header columns the spec does not use, in order of appearance
    block = _Block(k)

    def flush(block):
      if block.rows:
        row_ids, result = block.result()
        sink.add(0, len(block.rows), row_ids, result, block.records)
      return _Block(k)

    for n, raw in enumerate(lines, start=1):
      status, a, b = raw.rstrip("\n").split("\t", 2)
      records += 1
      if status == "H":
        headers += 1
        sink.header(0)
        cols = b.split("\t", 1)[1].split(",") if "\t" in b else []
        ignored += [c for c in cols if c and c not in ignored]
        continue
      row = int(a)
      if row != expected_row:
        raise PipelineError(f"reducer output line {n}: row id {row}, expected {expected_row} "
                            "(several reducers, or a truncated or reordered output?)")
      expected_row += 1
      i = len(block.rows)
      block.rows.append(row)
      if status == "K":
        block.kept.append(i)
        if spec.privacy_unit:  # values<TAB>"unit id" (the mapper's JSON string)
          b, sep, uid = b.partition("\t")
          if not sep:
            raise PipelineError(f"reducer output line {n}: a kept row without its unit id; "
                                "was the streaming path run with another spec?")
          block.units.append(json.loads(uid))
        block.payloads.append(b)
      elif status == "N":
        block.na.append(i)
        block.na_cells.append([int(j) for j in b.split(",") if j])
      elif status == "R":
        rec = json.loads(b)
        block.rejects.append((i, rec["reason"], rec["detail"]))
        block.records.append(rec)
      else:
        raise PipelineError(f"reducer output line {n}: unknown status {status!r}")
      if len(block.rows) >= BLOCK:
        block = flush(block)
    flush(block)
    if records == 0:
      raise PipelineError("the streaming output is empty: the input had no lines at all "
                          "(expected a header line)")
    body = output_lib.summarize(spec, sink.close(), staging, split_seed,
                                test_fraction, max_rows_per_shard,
                                {"producer": "preprocessing.mapreduce", "input": source,
                                 **extra})
    body.pop("_lines_by_split")
    body["extra"]["lines"] = body["provenance"].rows_read + headers
    body["extra"]["ignored_columns"] = ignored
    body["extra"]["seconds"] = round(time.perf_counter() - t0, 2)
    manifest_lib.write_manifest(staging, **body)
    output_lib.publish(staging, out, overwrite)
  except BaseException:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest_lib.read_manifest(out)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m preprocessing.mapreduce.to_shards",
                              description="reducer output -> shard dataset")
  p.add_argument("--input", required=True, help="reducer output file, directory, or -")
  p.add_argument("--output", required=True, help="dataset directory to create")
  p.add_argument("--spec", required=True, help="the feature spec the mapper used")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  p.add_argument("--split-seed", type=int, default=split_lib.DEFAULT_SPLIT_SEED,
                 help="seed of the train/test hash split (default "
                 f"{split_lib.DEFAULT_SPLIT_SEED})")
  p.add_argument("--test-fraction", type=float, default=split_lib.DEFAULT_TEST_FRACTION,
                 help=f"expected fraction of test rows (default {split_lib.DEFAULT_TEST_FRACTION})")
  p.add_argument("--max-rows-per-shard", type=int, default=250_000,
                 help="rows per HDF5 shard at most (default 250000)")
  args = p.parse_args(argv)
  try:
    m = convert(_input_lines(args.input), args.output, args.spec, overwrite=args.overwrite,
                split_seed=args.split_seed, test_fraction=args.test_fraction,
                max_rows_per_shard=args.max_rows_per_shard, source=args.input)
  except (errors.UserError, FileNotFoundError, FileExistsError) as e:  # one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    return 2
  pv = m.provenance
  print(f"{args.output}: {pv.rows_read} rows read, {pv.kept} kept ({m.rows('train')} train / "
        f"{m.rows('test')} test), {pv.dropped_na} dropped for NA, {pv.rejected} rejected")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The Spark job: census CSV (or Parquet) -> cleaned, encoded, split HDF5 shards + manifest.

Runs on a laptop (Spark local mode, the default) and unchanged on a cluster::

  python -m preprocessing.spark_job --input CaPUMS5full.csv --output data/capums \
      --spec capums [--master local[2]] [--overwrite]
  PYSPARK_PYTHON=.venv/bin/python spark-submit --master yarn preprocessing/spark_job.py \
      --input hdfs:///census/CaPUMS5full.csv --output /shared/data/capums --spec capums

``--engine local`` runs the same job without a JVM on the streaming path
(:mod:`preprocessing.mapreduce.local`, one local CSV file); ``--engine auto`` (the default)
does so below :data:`LOCAL_ENGINE_MAX_BYTES`. Both engines write the same shards, rejects and
manifest, byte for byte, but for the manifest fields naming the engine (:func:`choose_engine`).

What it does, and what it guarantees:

0. **Header check** (before Spark starts, whenever the input is local): each file's header
   (CSV: its first line; Parquet: its schema) must hold every column the spec uses, by name
   and in any order; a missing column is one line naming it. Other columns are ignored and
   listed in the manifest (``extra["ignored_columns"]``).
1. **Plan** (one cheap JVM-only pass): counts the lines of every input split (file, byte
   offset) and reads each file's first line, its header. Headers are checked against the spec
   before any Python runs (again: a remote input is first seen here); from the counts every line gets its line number and every data row
   its row id (0-based index of the data row over the files in path order). Neither depends
   on how the input is partitioned or how many executors there are.
2. **Count** (a row-level spec): a row's split is decided by its row key, its encoded
   content and its occurrence among the identical kept rows before it in row-id order over
   the whole input (:mod:`fastdp_jax.data.split`), so that removing or reordering rows moves
   no other row between splits. A task sees only its runs (ranges of row ids of one input
   split), so a pre-pass cleans and encodes the input as the next pass will and counts each
   run's rows by content key; a window over the content key, ordered by run start, gives each
   run the rows of each key before it, and the non-zero offsets go to the next pass's tasks.
   The driver checks afterwards that both passes cut the same runs.
3. **Clean and write** (one pass, ``mapInPandas``): each task cleans its lines with
   :mod:`fastdp_jax.data.cleaning` (the same rules as the streaming mapper and the direct
   writer), puts each row in train or test with ``fastdp_jax.data.split.is_test_row`` of
   its row key, written into the shards (or, for a spec naming a ``privacy_unit``,
   ``fastdp_jax.data.units.is_test_unit`` of its unit key, after a check, one Spark
   aggregation over the unit ids, that no two distinct ids share a key), encodes it with the
   spec, and writes shards (at most ``--max-rows-per-shard`` rows, never
   mixing input splits, named by their first row id) with ``fastdp_jax.data.shards.write_shard``
   into a staging directory, and its malformed lines into ``rejects/part-*.jsonl`` with the
   reason. Tasks return the shards' manifest entries and their counts.
4. **Commit** (driver): checks that ``rows_read = kept + dropped_na + rejected``, that every
   planned line was seen exactly once and that the shards hold exactly the kept rows, writes
   ``manifest.json`` last, then renames the staging directory into place. A failed or killed
   job leaves only a hidden ``.NAME.staging-*`` directory, never a complete-looking output.

The output directory must be on a file system that the driver and every executor can write
(local disk in local mode; NFS/EFS/Lustre on a cluster): HDF5 files are written with h5py.
The output (shards, rejects, counts) is as private as the input.
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import glob
import gzip
import json
import os
import shutil
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script (spark-submit preprocessing/spark_job.py)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from fastdp_jax import atomic  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
from fastdp_jax import errors  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import cleaning  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import features as features_lib  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import spark as spark_lib  # pylint: disable=g-import-not-at-top
from preprocessing import output as output_lib  # pylint: disable=g-import-not-at-top
from preprocessing.output import PipelineError  # pylint: disable=g-import-not-at-top
from preprocessing.mapreduce import local as local_runner  # pylint: disable=g-import-not-at-top

DEFAULT_MAX_ROWS_PER_SHARD = 250_000
ENGINES = ("auto", "local", "spark")
# ``--engine auto`` runs the streaming path (preprocessing.mapreduce.local: no JVM) on a single
# local CSV file below this size, and Spark above it. Spark's start-up alone takes 7-38 s; the
# streaming path cleaned 0.9-3.2 MB/s on one (loaded) core, 20 s to a minute at this size
# (README "When Spark pays off").
LOCAL_ENGINE_MAX_BYTES = 64 * 2**20
# Spark settings that mean nothing to the streaming path.
_SPARK_ONLY = ("master", "conf", "partition_mb")


@dataclasses.dataclass(frozen=True)
class InputSplit:
  """One input split as planned on the driver (shipped to the executors).

  Attributes:
    key: xxhash64 of (file, start), the split's id in the processing pass.
    file: the file's path (URI).
    start: byte offset of the split in the file.
    lines: number of lines the split holds.
    header: whether its first line is the file's header (``start == 0``).
    row_base: row id of its first data row.
    line_base: 1-based line number, in the file, of its first line.
  """

  key: int
  file: str
  start: int
  lines: int
  header: bool
  row_base: int
  line_base: int


# ---------------------------------------------------------------------------------------------
# Executor side.


def _sink(spec: features_lib.FeatureSpec, staging: str | None, split_seed: int,
          test_fraction: float, max_rows: int, offsets: output_lib.Offsets | None):
  """A task's sink: the pre-pass's counter (``staging`` None) or the shard writer."""
  if staging is None:
    return output_lib.ContentCounter(spec)
  return output_lib.ShardSink(spec=spec, staging=staging, split_seed=split_seed,
                              test_fraction=test_fraction, max_rows=max_rows,
                              offsets=offsets if offsets is not None else {})


def _csv_task(splits: dict[int, InputSplit], header: tuple[str, ...],
              spec: features_lib.FeatureSpec, staging: str | None, split_seed: int,
              test_fraction: float, max_rows: int, offsets: output_lib.Offsets | None = None):
  """The mapInPandas function of the CSV pass: (value, key) batches -> (kind, body) rows.

  With ``staging`` None, the pre-pass instead: the same blocks counted by content key
  (:class:`preprocessing.output.ContentCounter`), so that both passes cut the same runs.
  """

  def run(batches):
    cleaner = cleaning.LineCleaner(spec, header)
    writer = _sink(spec, staging, split_seed, test_fraction, max_rows, offsets)
    seen: dict[int, int] = {}
    for pdf in batches:
      # Lines come as bytes: undecodable bytes become U+FFFD (as in the streaming mapper) and
      # the row is rejected, instead of failing the Arrow conversion of the whole batch.
      lines = b"\n".join(pdf["value"].tolist()).decode("utf-8", "replace").split("\n")
      keys = pdf["key"].to_numpy()
      cuts = np.flatnonzero(np.diff(keys)) + 1
      for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(keys)]):
        key = int(keys[lo])
        s = splits.get(key)
        if s is None:
          raise RuntimeError(f"input split {key} was not in the plan: the input changed while "
                             "the job ran")
        block = lines[lo:hi]
        pos = seen.get(key, 0)  # position of block[0] among the split's lines
        seen[key] = pos + len(block)
        if s.header and pos == 0:
          if cleaning.parse_header(block[0]) != header:
            raise RuntimeError(f"{s.file}: first line changed while the job ran")
          writer.header(key)
          block, pos = block[1:], 1
          if not block:
            continue
        first_row = s.row_base + pos - (1 if s.header else 0)
        row_ids = np.arange(first_row, first_row + len(block), dtype=np.int64)
        result = cleaner.clean(block)
        records = ({"file": s.file, "line": s.line_base + pos + i, "row": int(row_ids[i]),
                    "reason": reason, "detail": detail, "text": block[i]}
                   for i, reason, detail in result.rejects)
        writer.add(key, len(block), row_ids, result, records)
    yield output_lib.task_frame(writer)

  return run


def _parquet_task(files: dict[int, tuple[str, int]], spec: features_lib.FeatureSpec,
                  staging: str | None, split_seed: int, test_fraction: float, max_rows: int,
                  offsets: output_lib.Offsets | None = None):
  """The mapInPandas function of the Parquet pass (``staging`` None: of its pre-pass)."""

  def run(batches):
    writer = _sink(spec, staging, split_seed, test_fraction, max_rows, offsets)
    for pdf in batches:
      keys = pdf["__key"].to_numpy()
      cuts = np.flatnonzero(np.diff(keys)) + 1
      for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(keys)]):
        key = int(keys[lo])
        path, base = files[key]
        part = pdf.iloc[lo:hi]
        index = part["__row_index"].to_numpy(np.int64)
        row_ids = base + index
        cols = {c: part[c].to_numpy() for c in spec.used_columns + (spec.privacy_unit or ())}
        result = cleaning.clean_columns(spec, cols)

        def show(i, cols=cols):
          return json.dumps({c: (None if v is None or (isinstance(v, float) and v != v)
                                 else (v.item() if hasattr(v, "item") else v))
                             for c, v in ((c, cols[c][i]) for c in spec.used_columns)},
                            default=str)

        records = ({"file": path, "line": int(index[i]) + 1, "row": int(row_ids[i]),
                    "reason": reason, "detail": detail, "text": show(i)}
                   for i, reason, detail in result.rejects)
        writer.add(key, hi - lo, row_ids, result, records)
    yield output_lib.task_frame(writer)

  return run


# ---------------------------------------------------------------------------------------------
# Driver side.


def _local_input_files(path: str) -> list[str]:
  """The local files an input names (file, directory, or glob); [] if none exist."""
  p = output_lib.local_path(path)
  if glob.has_magic(p):
    found = sorted(glob.glob(p))
  elif os.path.isdir(p):
    found = [p]
  elif os.path.isfile(p):
    found = [p]
  else:
    found = []
  return found


def _check_input(input_path: str, output: str) -> int:
  """Checks a local input exists and does not contain the output; returns its size in bytes."""
  if not output_lib.is_local(input_path):
    return 0
  found = _local_input_files(input_path)
  if not found:
    raise FileNotFoundError(f"input {input_path} does not exist")
  size = 0
  for f in found:
    if os.path.isdir(f):
      if os.path.commonpath([os.path.abspath(f), output]) == os.path.abspath(f):
        raise PipelineError(f"--output {output} is inside the input directory {f}; the job "
                            "would read its own output")
      for root, _, names in os.walk(f):
        size += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    else:
      size += os.path.getsize(f)
  return size


def _local_data_files(input_path: str) -> list[str]:
  """The data files of a local input (what Spark reads: no ``_*`` or ``.*`` names)."""
  out = []
  for f in _local_input_files(input_path):
    if os.path.isdir(f):
      for root, dirs, names in os.walk(f):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        out += [os.path.join(root, n) for n in sorted(names) if not n.startswith(("_", "."))]
    elif not os.path.basename(f).startswith(("_", ".")):
      out.append(f)
  return out


def _local_header(path: str, fmt: str) -> tuple[str, ...] | None:
  """The column names of a local file (CSV first line, Parquet schema); None if unreadable."""
  if fmt == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      return tuple(pq.read_schema(path).names)
    except Exception:  # pylint: disable=broad-except
      return None  # Spark reports what is wrong with the file
  opener: Any = {".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(path)[1], open)
  if opener is open and path.endswith(_COMPRESSED):
    return None  # a compression Spark reads and Python does not: Spark checks the header
  try:
    with opener(path, "rb") as f:
      head = f.readline(cleaning.MAX_HEADER_BYTES + 1)
  except OSError:
    return None
  if not head:
    return None  # an empty file: the plan says so
  return cleaning.parse_header(head.split(b"\n")[0].split(b"\r")[0].decode("utf-8", "replace"))


def check_header(input_path: str, spec: features_lib.FeatureSpec,
                 fmt: str = "auto") -> tuple[str, ...] | None:
  """Checks every local input file's columns against the spec, before Spark starts.

  Columns are matched by name, in any order; columns the spec does not use are allowed.

  Returns:
    The first file's columns, or None when the input is not local (Spark reads it).

  Raises:
    PipelineError: one line naming the file and the columns it lacks (or repeats).
  """
  if not output_lib.is_local(input_path):
    return None
  fmt = _detect_format(input_path, fmt)
  first = None
  what = "the Parquet schema" if fmt == "parquet" else "the first line is taken as the header"
  for path in _local_data_files(input_path):
    try:
      cols = _local_header(path, fmt)  # a header over 1 MiB is refused here already
      if cols is None:
        continue
      output_lib.check_columns(spec, cols)
    except features_lib.SpecError as e:
      raise PipelineError(f"{path}: {what}: {e}") from e
    first = cols if first is None else first
  return first


def _detect_format(input_path: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  p = output_lib.local_path(input_path).rstrip("/")
  if p.endswith((".parquet", ".pq")):
    return "parquet"
  if output_lib.is_local(input_path) and os.path.isdir(p):
    names = [n for n in os.listdir(p) if not n.startswith(("_", "."))]
    if names and all(n.endswith((".parquet", ".pq")) for n in names):
      return "parquet"
  return "csv"


def _read_error(e: Exception, input_path: str) -> PipelineError | FileNotFoundError:
  text = str(e)
  if "PATH_NOT_FOUND" in text or "does not exist" in text:
    return FileNotFoundError(f"input {input_path} does not exist")
  return PipelineError(f"cannot read {input_path}: {text.splitlines()[0]}")


_COMPRESSED = (".gz", ".bz2", ".deflate", ".zst", ".lz4", ".snappy", ".xz")


def _first_lines(spark, input_path: str, files: list[str]) -> dict[str, str]:
  """The first line of each file: read directly when local, else with a small Spark query."""
  from pyspark.sql import functions as F  # pylint: disable=g-import-not-at-top
  out, remote = {}, []
  for uri in files:
    path = urllib.parse.unquote(output_lib.local_path(uri)) if uri.startswith("file:") else None
    if path and os.path.isfile(path) and not path.endswith(_COMPRESSED):
      with open(path, "rb") as f:  # one byte more than the limit: a longer header is refused
        head = f.readline(cleaning.MAX_HEADER_BYTES + 1)
      # Like Hadoop's line reader: \n, \r\n and \r all end a line.
      out[uri] = head.split(b"\n")[0].split(b"\r")[0].decode("utf-8", "replace")
    else:
      remote.append(uri)
  if remote:
    meta = spark.read.text(input_path).select(
        F.col("value").cast("binary").alias("value"), F.col("_metadata.file_path").alias("file"),
        F.col("_metadata.file_block_start").alias("start"),
        F.monotonically_increasing_id().alias("pos"))
    for r in (meta.where(F.col("start") == 0).where(F.col("file").isin(remote))
              .groupBy("file").agg(F.min_by("value", "pos").alias("first")).collect()):
      out[r["file"]] = bytes(r["first"]).decode("utf-8", "replace")
  return out


def plan_csv(spark, input_path: str,
             spec: features_lib.FeatureSpec) -> tuple[list[InputSplit], str, tuple[str, ...]]:
  """Pass 1: the input splits with their line counts and bases, and the checked header.

  Returns:
    ``(splits in file order, header line, header columns)``.

  Raises:
    PipelineError: empty input, a header that does not fit the spec, or files whose headers
      differ.
  """
  from pyspark.sql import functions as F  # pylint: disable=g-import-not-at-top
  try:
    df = spark.read.text(input_path)
    meta = df.select(F.col("_metadata.file_path").alias("file"),
                     F.col("_metadata.file_block_start").alias("start"))
    rows = (meta.groupBy("file", "start", F.xxhash64("file", "start").alias("key"))
            .agg(F.count(F.lit(1)).alias("lines")).collect())
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ in ("AnalysisException", "Py4JJavaError", "IllegalArgumentException"):
      raise _read_error(e, input_path) from e
    raise
  if not rows:
    raise PipelineError(f"input {input_path} is empty: no lines at all (expected a header "
                        f"line naming the columns {list(spec.input_columns or spec.used_columns)})")
  rows = sorted(rows, key=lambda r: (r["file"], r["start"]))
  if len({r["key"] for r in rows}) != len(rows):
    raise PipelineError("two input splits hash to the same key; rename a file and retry")
  first_lines = _first_lines(spark, input_path, [r["file"] for r in rows if r["start"] == 0])
  header_line, header = None, None
  for r in rows:
    if r["start"] != 0:
      continue
    line = first_lines[r["file"]]
    try:
      cols = cleaning.parse_header(line)
      output_lib.check_columns(spec, cols)
    except features_lib.SpecError as e:
      raise PipelineError(f"{r['file']}: the first line is taken as the header: {e}") from e
    if header is None:
      header_line, header = line, cols
    elif cols != header:
      raise PipelineError(f"{r['file']}: header {list(cols)} differs from {list(header)} of "
                          "the first file; all input files must have the same columns")
  splits, row, line_no, file = [], 0, 1, None
  for r in rows:
    if r["file"] != file:
      file, line_no = r["file"], 1
      if r["start"] != 0:
        raise PipelineError(f"{file}: no split at offset 0 (cannot find its header)")
    has_header = r["start"] == 0
    splits.append(InputSplit(key=int(r["key"]), file=file, start=int(r["start"]),
                             lines=int(r["lines"]), header=has_header, row_base=row,
                             line_base=line_no))
    row += int(r["lines"]) - has_header
    line_no += int(r["lines"])
  return splits, header_line, header


def _tune_partitions(spark, input_bytes: int, partition_mb: float | None) -> None:
  """Sets split sizes so that each core gets a few tasks (better balance than 128 MB splits)."""
  if partition_mb is None:
    if not input_bytes:
      return
    cores = spark.sparkContext.defaultParallelism
    partition_mb = min(128.0, max(4.0, input_bytes / 1e6 / (3 * cores)))
  spark.conf.set("spark.sql.files.maxPartitionBytes", str(int(partition_mb * 1e6)))


def run_job(spark, input_path: str, output: str, spec: features_lib.FeatureSpec | str, *,
            fmt: str = "auto", overwrite: bool = False,
            split_seed: int = split_lib.DEFAULT_SPLIT_SEED,
            test_fraction: float = split_lib.DEFAULT_TEST_FRACTION,
            max_rows_per_shard: int = DEFAULT_MAX_ROWS_PER_SHARD,
            partition_mb: float | None = None) -> manifest_lib.Manifest:
  """Runs the job on an existing SparkSession; returns the committed manifest.

  Args:
    spark: the session (its master decides where the job runs).
    input_path: a CSV or Parquet file, a directory of them, or a glob; local or a URI.
    output: the dataset directory to create.
    spec: a :class:`FeatureSpec`, or a spec file path / built-in name.
    fmt: ``'csv'``, ``'parquet'`` or ``'auto'`` (by extension).
    overwrite: replace an existing dataset directory.
    split_seed: seed of the train/test hash split.
    test_fraction: expected fraction of test rows.
    max_rows_per_shard: shard size bound.
    partition_mb: input split size; default about 3 tasks per core.

  Raises:
    FileNotFoundError: missing input.
    FileExistsError: existing output without ``overwrite``.
    PipelineError: empty input, header problems, no usable rows, or a failed task.
  """
  t0 = time.perf_counter()
  if isinstance(spec, str):
    spec = features_lib.load_spec(spec)
  if not 0 < test_fraction < 1:
    raise PipelineError(f"{test_fraction=} must be in (0, 1)")
  if max_rows_per_shard < 1:
    raise PipelineError(f"{max_rows_per_shard=} must be positive")
  out = output_lib.check_output(output, overwrite)
  input_bytes = _check_input(input_path, out)
  fmt = _detect_format(input_path, fmt)
  if fmt not in ("csv", "parquet"):
    raise PipelineError(f"{fmt=} must be csv, parquet or auto")
  check_header(input_path, spec, fmt)  # a missing column: one line, before any Spark work
  skipped = _skipped_inputs(input_path)
  with atomic.disk_full_is_user_error(out, f"the previous {out} (if any) is intact",
                                      restate=True):
    _write(spark, input_path, out, spec, fmt, overwrite, split_seed, test_fraction,
           max_rows_per_shard, partition_mb, input_bytes, skipped, t0)
  return manifest_lib.read_manifest(out)


def _skipped_inputs(input_path: str) -> list[str]:
  """Files of a local input directory that Spark (like Hadoop) ignores: names ``_*``, ``.*``."""
  p = output_lib.local_path(input_path)
  if not (output_lib.is_local(input_path) and os.path.isdir(p)):
    return []
  return sorted(n for n in os.listdir(p) if n.startswith(("_", ".")))


def _write(spark, input_path: str, out: str, spec: features_lib.FeatureSpec, fmt: str,
           overwrite: bool, split_seed: int, test_fraction: float, max_rows_per_shard: int,
           partition_mb: float | None, input_bytes: int, skipped: list[str],
           t0: float) -> None:
  staging = output_lib.make_staging(out)
  old_partition_bytes = spark.conf.get("spark.sql.files.maxPartitionBytes")
  try:
    _tune_partitions(spark, input_bytes, partition_mb)
    if fmt == "csv":
      manifest = _run_csv(spark, input_path, spec, staging, split_seed, test_fraction,
                          max_rows_per_shard)
    else:
      manifest = _run_parquet(spark, input_path, spec, staging, split_seed, test_fraction,
                              max_rows_per_shard)
    manifest["extra"].update({
        "producer": "preprocessing.spark_job", "engine": "spark", "input": input_path,
        "format": fmt,
        "spark": {"version": spark.version, "master": spark.sparkContext.master,
                  "partitions": manifest["extra"].pop("partitions")},
        "seconds": round(time.perf_counter() - t0, 2)})
    if skipped:
      manifest["extra"]["skipped_inputs"] = skipped
    manifest_lib.write_manifest(staging, **manifest)  # with the spec's task and embeddings
    output_lib.publish(staging, out, overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    spark.conf.set("spark.sql.files.maxPartitionBytes", old_partition_bytes)


def _collect(df, what: str) -> list:
  try:
    return df.collect()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if atomic.is_disk_full(e):  # an executor's shard on a full disk: run_job says so
      raise
    for marker in ("RuntimeError: ", "PipelineError: ", "SpecError: "):
      if marker in text:
        detail = text.split(marker, 1)[1].splitlines()[0]
        raise PipelineError(f"{what} failed: {detail}") from e
    raise


def _offsets(df, spec: features_lib.FeatureSpec,
             counter) -> tuple[output_lib.Offsets | None, dict[str, int] | None]:
  """The pre-pass of a row-level spec: ``(occurrence offsets, rows of each run)``.

  A row's split depends on its occurrence among the identical rows before it over the
  WHOLE input, but a task sees only its runs: this pass cleans and encodes the input as the
  writing pass will (``counter()``: its task function, counting) and a window query gives
  each run the rows of each content key in the runs before it. A unit spec needs none
  (split by unit key): ``(None, None)``.
  """
  if spec.privacy_unit:
    return None, None
  counts = df.mapInPandas(counter(), output_lib.COUNT_SCHEMA)
  return output_lib.offsets_of(_collect(output_lib.offsets_query(counts),
                                        "counting identical rows"))


def _run_csv(spark, input_path, spec, staging, split_seed, test_fraction, max_rows):
  from pyspark.sql import functions as F  # pylint: disable=g-import-not-at-top
  splits, _, header = plan_csv(spark, input_path, spec)
  table = {s.key: s for s in splits}
  df = spark.read.text(input_path).select(
      F.col("value").cast("binary").alias("value"), F.xxhash64(F.col("_metadata.file_path"),
                          F.col("_metadata.file_block_start")).alias("key"))
  if spec.privacy_unit:  # before writing anything: distinct unit ids sharing a key
    output_lib.check_unit_collisions(df.select("value").mapInPandas(
        output_lib.unit_id_task(spec, header), output_lib.UNIT_ID_SCHEMA))
  offsets, runs = _offsets(df, spec, lambda: _csv_task(table, header, spec, None, split_seed,
                                                       test_fraction, max_rows))
  fn = _csv_task(table, header, spec, staging, split_seed, test_fraction, max_rows, offsets)
  results = _collect(df.mapInPandas(fn, "kind string, body string"), "cleaning the input")
  if runs is not None:
    output_lib.check_runs(results, runs)
  body = output_lib.summarize(spec, results, staging, split_seed, test_fraction, max_rows,
                      {"partitions": df.rdd.getNumPartitions(),
                       "files": sorted({s.file for s in splits})})
  seen = body.pop("_lines_by_split")
  for s in splits:
    if seen.get(str(s.key), 0) != s.lines:
      raise PipelineError(f"{s.file} at byte {s.start}: planned {s.lines} lines, the tasks saw "
                          f"{seen.get(str(s.key), 0)} (the input changed while the job ran?)")
  lines = sum(s.lines for s in splits)
  if lines != body["provenance"].rows_read + body["extra"]["header_lines"]:
    raise PipelineError(f"internal error: {lines} lines != rows read + headers")
  body["extra"]["lines"] = lines
  body["extra"]["ignored_columns"] = spec.ignored_columns(header)
  return body


def _run_parquet(spark, input_path, spec, staging, split_seed, test_fraction, max_rows):
  from pyspark.sql import functions as F  # pylint: disable=g-import-not-at-top
  try:
    df = spark.read.parquet(input_path)
    columns = tuple(df.columns)
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(e, input_path) from e
  try:
    output_lib.check_columns(spec, columns)  # by name; other columns are ignored
  except features_lib.SpecError as e:
    raise PipelineError(f"{input_path}: the Parquet schema: {e}") from e
  unit_only = [c for c in spec.privacy_unit or () if c not in spec.used_columns]
  if spec.privacy_unit:  # before writing anything: distinct unit ids sharing a key
    output_lib.check_unit_collisions(df.select(*[F.col(f"`{c}`") for c in spec.privacy_unit])
                                     .mapInPandas(output_lib.unit_id_task(spec, None),
                                                  output_lib.UNIT_ID_SCHEMA))
  meta = df.select(*[F.col(f"`{c}`") for c in spec.used_columns + tuple(unit_only)],
                   F.xxhash64(F.col("_metadata.file_path")).alias("__key"),
                   F.col("_metadata.row_index").alias("__row_index"),
                   F.col("_metadata.file_path").alias("__file"))
  counts = sorted(meta.groupBy("__file", "__key").count().collect(), key=lambda r: r["__file"])
  if not counts:
    raise PipelineError(f"input {input_path} holds no rows")
  files, base = {}, 0
  for r in counts:
    files[int(r["__key"])] = (r["__file"], base)
    base += int(r["count"])
  rows = meta.drop("__file")
  offsets, runs = _offsets(rows, spec, lambda: _parquet_task(files, spec, None, split_seed,
                                                             test_fraction, max_rows))
  fn = _parquet_task(files, spec, staging, split_seed, test_fraction, max_rows, offsets)
  results = _collect(rows.mapInPandas(fn, "kind string, body string"), "cleaning the input")
  if runs is not None:
    output_lib.check_runs(results, runs)
  body = output_lib.summarize(spec, results, staging, split_seed, test_fraction, max_rows,
                      {"partitions": meta.rdd.getNumPartitions(),
                       "files": [r["__file"] for r in counts]})
  body.pop("_lines_by_split")
  body["extra"]["ignored_columns"] = spec.ignored_columns(columns)
  if body["provenance"].rows_read != base:
    raise PipelineError(f"planned {base} rows, the tasks read {body['provenance'].rows_read}")
  return body


def choose_engine(engine: str, input_path: str, fmt: str,
                  spark_options: Sequence[str] = ()) -> str:
  """``'local'`` or ``'spark'`` for ``--engine`` (``auto``, ``local`` or ``spark``).

  The streaming path reads one local CSV file (plain, gzip or bzip2); ``auto`` picks it for
  such a file under :data:`LOCAL_ENGINE_MAX_BYTES` unless a Spark setting was given
  (``spark_options``: the names of the Spark-only options set). Both engines write the same
  shards, rejects and manifest (but for the fields that name the engine and its timing).

  Raises:
    PipelineError: ``local`` for an input the streaming path cannot read, or with a Spark
      setting.
  """
  if engine not in ENGINES:
    raise PipelineError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
  if engine == "spark":
    return "spark"
  path = output_lib.local_path(input_path)
  why_not = None
  if not output_lib.is_local(input_path) or glob.has_magic(path) or not os.path.isfile(path):
    why_not = "it reads one local CSV file, not a directory, a glob or a URI"
  elif _detect_format(input_path, fmt) != "csv":
    why_not = "it reads CSV, not Parquet"
  else:
    try:
      local_runner.input_compression(path)
    except PipelineError as e:
      why_not = str(e)
  if engine == "local":
    if why_not:
      raise PipelineError(f"--engine local cannot read {input_path}: {why_not}; use "
                          "--engine spark")
    if spark_options:
      raise PipelineError(f"--engine local takes no Spark setting "
                          f"({', '.join('--' + o.replace('_', '-') for o in spark_options)}); "
                          "drop it or use --engine spark")
    return "local"
  small = why_not is None and os.path.getsize(path) < LOCAL_ENGINE_MAX_BYTES
  return "local" if small and not spark_options else "spark"


def run_local_engine(input_path: str, output: str, spec: str, *, overwrite: bool,
                     split_seed: int, test_fraction: float,
                     max_rows_per_shard: int) -> manifest_lib.Manifest:
  """The job on the streaming path (no JVM): the same dataset as :func:`run_job`.

  The manifest's ``extra`` names the engine (``engine: local``, ``producer``) where the Spark
  engine's names Spark (``engine: spark``, ``spark: {version, master, partitions}``).
  """
  if not 0 < test_fraction < 1:
    raise PipelineError(f"{test_fraction=} must be in (0, 1)")
  if max_rows_per_shard < 1:
    raise PipelineError(f"{max_rows_per_shard=} must be positive")
  return local_runner.run_local(
      input_path, output, spec, overwrite=overwrite, split_seed=split_seed,
      test_fraction=test_fraction, max_rows_per_shard=max_rows_per_shard,
      manifest_extra={"engine": "local", "format": "csv",
                      "files": [local_runner.file_uri(input_path)]})


def _parse_conf(items: Sequence[str]) -> dict[str, str]:
  conf = {}
  for kv in items:
    key, sep, value = kv.partition("=")
    if not sep or not key:
      raise PipelineError(f"--conf {kv!r}: expected KEY=VALUE")
    conf[key] = value
  return conf


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m preprocessing.spark_job",
      description="Census CSV/Parquet -> cleaned, split HDF5 shards (see docs/data_pipeline.md)")
  p.add_argument("--input", required=True,
                 help="CSV or Parquet file, directory, or glob; local path or URI")
  p.add_argument("--output", required=True, help="dataset directory to create")
  p.add_argument("--spec", required=True,
                 help="feature spec: a built-in name (capums, pums_raw; shipped in "
                 "fastdp_jax/data/specs/) or the path of a spec file (my_spec.py)")
  p.add_argument("--format", choices=("auto", "csv", "parquet"), default="auto",
                 help="input format (default: by extension; a directory of .parquet files "
                 "is Parquet)")
  p.add_argument("--engine", choices=ENGINES, default="auto",
                 help="local: the streaming path, no JVM (one local CSV file); spark: Spark; "
                 f"auto (default): local below {LOCAL_ENGINE_MAX_BYTES >> 20} MiB, else "
                 "Spark. Same shards either way")
  p.add_argument("--master", default=None,
                 help="Spark master; default: spark-submit's, else local[*]")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  p.add_argument("--split-seed", type=int, default=split_lib.DEFAULT_SPLIT_SEED,
                 help=f"seed of the train/test hash split (default {split_lib.DEFAULT_SPLIT_SEED})")
  p.add_argument("--test-fraction", type=float, default=split_lib.DEFAULT_TEST_FRACTION,
                 help=f"expected fraction of test rows (default {split_lib.DEFAULT_TEST_FRACTION})")
  p.add_argument("--max-rows-per-shard", type=int, default=DEFAULT_MAX_ROWS_PER_SHARD,
                 help=f"rows per HDF5 shard at most (default {DEFAULT_MAX_ROWS_PER_SHARD})")
  p.add_argument("--partition-mb", type=float, default=None,
                 help="input split size in MB (default: about 3 tasks per core, 4..128 MB)")
  p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                 help="extra Spark setting (repeatable)")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    spec = features_lib.load_spec(args.spec)
    out = output_lib.check_output(args.output, args.overwrite)  # fail before Spark starts (7-9 s)
    _check_input(args.input, out)
    check_header(args.input, spec, args.format)  # a missing column: refused before Spark starts
    # Under spark-submit (its PythonRunner hands the driver a gateway in the environment) the
    # user chose Spark: auto must not run the local path.
    submitted = ["spark-submit"] if "PYSPARK_GATEWAY_PORT" in os.environ else []
    engine = choose_engine(args.engine, args.input, args.format,
                           [o for o in _SPARK_ONLY if getattr(args, o)] + submitted)
    if engine == "local":
      t1 = time.perf_counter()
      m = run_local_engine(args.input, args.output, args.spec, overwrite=args.overwrite,
                           split_seed=args.split_seed, test_fraction=args.test_fraction,
                           max_rows_per_shard=args.max_rows_per_shard)
    else:
      conf = _parse_conf(args.conf)
      spark_lib.worker_python(conf, args.master)  # refused before Spark starts (7-9 s)
      spark = spark_lib.create_session(args.master, conf=conf)
      t1 = time.perf_counter()
      m = run_job(spark, args.input, args.output, spec, fmt=args.format,
                  overwrite=args.overwrite, split_seed=args.split_seed,
                  test_fraction=args.test_fraction, max_rows_per_shard=args.max_rows_per_shard,
                  partition_mb=args.partition_mb)
  except (errors.UserError, FileNotFoundError, FileExistsError) as e:  # one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    return 2
  pv = m.provenance
  print(output_lib.describe(args.output, m)
        + (f" (see {os.path.join(args.output, output_lib.REJECTS)}/: "
           f"{m.extra['rejected_by_reason']})"
           if pv.rejected else "")
        + (f"; skipped {len(m.extra['skipped_inputs'])} input files that Spark ignores (names "
           f"starting with _ or .): {', '.join(m.extra['skipped_inputs'][:10])}"
           + (", ..." if len(m.extra["skipped_inputs"]) > 10 else "")
           if m.extra.get("skipped_inputs") else "")
        + (f"; {time.perf_counter() - t0:.1f} s ({t1 - t0:.1f} s Spark start-up)"
           if engine == "spark" else f"; {time.perf_counter() - t0:.1f} s (local engine)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())

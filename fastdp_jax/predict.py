"""Predictions from a raw CSV with an exported model: ``python -m fastdp_jax.predict``.

::

  python -m fastdp_jax.predict --model runs/fulton/model --input raw.csv \
      --output predictions.csv [--errors errors.csv] [--key-file KEY] [--spark [--master URL]]
  fastdp-predict --model ... (the same command, installed)

``--key-file`` names the secret key the model was signed with (``python -m fastdp_jax.export
sign``): an unsigned model, or one whose signature the key does not match, is refused before
any row is read. Without it the model's integrity is checked (its files are the ones its
manifest names), not who made it.

``--spark`` encodes and predicts with Spark (large inputs; ``--master`` as the preprocessing
job's: default spark-submit's, else ``local[*]``): the same blocks of rows, encoded and
predicted by the same code, written by the same writers, so the outputs are the same bytes as
without it. The header is checked first, before Spark starts; the executors must read the
input and the model at the paths the driver gives (local mode, or a shared file system).

The model's feature spec (stored in the export) encodes each raw row with the Spark job's own
code (:mod:`fastdp_jax.data.features`, :mod:`fastdp_jax.data.cleaning`): columns by name in any
order, other columns ignored. Rows that cannot be encoded (a missing value, an unknown category
or vocabulary code, a non-number, NaN, a value outside the column's domain, a wrong number of
fields, a line of any length that is not the header) are not predicted: each is written to
``--errors`` with its row, line, column and reason (without ``--errors``, the first ones are
printed), and counted on the console. So is a row whose encoded features the model refuses
(non-finite, outside its declared feature bounds: reasons ``non_finite``, ``out_of_bounds``).

``predictions.csv`` has one line per predicted row: ``row`` (0-based data row of the input) and
``line`` (its line in the file), then

* binary: ``probability`` (P(label = 1)) and ``prediction`` (0/1 at the model's threshold);
* multiclass: ``p_CLASS`` for each class, and ``prediction`` (the most probable class name);
* regression: ``prediction`` (the value in the label's own units: the inverse of the spec's
  label transform, ``expm1`` for ``log1p``, is applied, as the model card states).

Both outputs are as private as the input rows, and written owner-only; with ``--spark``,
Spark's shuffle and cache files on the executors' local disks also hold those rows while it
runs.

Exit status: 0 when the input could be read (even if some rows had errors), 2 when it cannot
be used at all (no such file, a header lacking a column the model needs, not a model, a model
the key does not authenticate), with one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from fastdp_jax import atomic
from fastdp_jax import errors
from fastdp_jax.export import model_dir
from fastdp_jax.export import predictor as predictor_lib

ERROR_COLUMNS = ("row", "line", "column", "reason", "detail")
BLOCK_ROWS = 1 << 16  # rows encoded and predicted together, on both paths
# A block's (rows read, prediction rows, errors): what the writers take, from either path.
Block = tuple[int, list[list[Any]], list[predictor_lib.RowError]]
_SHOWN_ERRORS = 10


def prediction_header(predictor: predictor_lib.Predictor) -> list[str]:
  """The columns of ``predictions.csv`` for the model's task."""
  if predictor.task == "binary":
    return ["row", "line", "probability", "prediction"]
  if predictor.task == "multiclass":
    return ["row", "line", *[f"p_{c}" for c in predictor.classes], "prediction"]
  return ["row", "line", "prediction"]


def _prediction_rows(predictor: predictor_lib.Predictor, result: predictor_lib.RowPredictions):
  lines = result.rows + 2  # a data row's line: after the header, one row per line
  for i, (row, line) in enumerate(zip(result.rows.tolist(), lines.tolist())):
    out = result.outputs[i]
    if predictor.task == "binary":
      yield [row, line, repr(float(out)), int(result.predictions[i])]
    elif predictor.task == "multiclass":
      yield [row, line, *[repr(float(p)) for p in out],
             predictor.classes[int(result.predictions[i])]]
    else:
      yield [row, line, repr(float(out))]


def _block_output(predictor: predictor_lib.Predictor,
                  result: predictor_lib.RowPredictions) -> Block:
  """A block's ``(rows read, prediction rows, errors)``, as both paths write them."""
  return result.num_rows, list(_prediction_rows(predictor, result)), result.errors


def predict_csv(model: str, input_path: str, output: str, errors_path: str | None = None, *,
                spark: Any = None, block_rows: int = BLOCK_ROWS,
                key: bytes | str | None = None
                ) -> tuple[int, int, int, list[predictor_lib.RowError]]:
  """Writes the predictions of a raw CSV file (and its errors) with an exported model.

  Both outputs hold values of the input rows: they are written owner-only (0600), each
  appearing whole (temporary file, then rename).

  Args:
    model: the model directory (or a workdir holding ``model/``).
    input_path: the raw CSV file (plain, ``.gz`` or ``.bz2``), header first.
    output: the predictions CSV to write.
    errors_path: the CSV of the rows that could not be predicted (None: not written).
    spark: None (this process reads the file), or a SparkSession, or a function returning
      one (called once the header has been checked, so a bad input fails before Spark
      starts). The outputs are the same bytes either way (:func:`_spark_blocks`).
    block_rows: rows encoded and predicted together (the same blocks on both paths).
    key: the secret key the model was signed with: the signature must exist and match
      (:func:`~fastdp_jax.export.predictor.load_model`'s ``key``).

  Returns:
    ``(rows read, rows predicted, rows with errors, the first errors)``.

  Raises:
    errors.UserError: the model cannot be loaded or the input cannot be used at all.
    FileNotFoundError: no such input.
  """
  predictor = predictor_lib.load_model(model, key=key)
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"input {input_path} does not exist")
  if spark is None:
    blocks: Iterable[Block] = (_block_output(predictor, r) for r in
                               predictor.predict_csv_blocks(input_path, block_rows))
  else:
    header_line = predictor.csv_header(input_path)  # the local path's check and message
    session = spark() if callable(spark) else spark
    blocks = _spark_blocks(session, predictor, os.path.abspath(model),
                           os.path.abspath(input_path), header_line, block_rows)
  return _write_outputs(predictor, blocks, output, errors_path)


def _write_outputs(predictor: predictor_lib.Predictor, blocks: Iterable[Block], output: str,
                   errors_path: str | None) -> tuple[int, int, int, list[predictor_lib.RowError]]:
  """Writes the blocks, in order, to ``output`` (and ``errors_path``): owner-only, atomic."""
  read = predicted = bad = 0
  first: list[predictor_lib.RowError] = []
  with contextlib.ExitStack() as stack:
    out = csv.writer(stack.enter_context(open(  # noqa: SIM115
        stack.enter_context(atomic.replacing_path(output, 0o600)), "w", newline="")))
    out.writerow(prediction_header(predictor))
    err = None
    if errors_path:
      err = csv.writer(stack.enter_context(open(  # noqa: SIM115
          stack.enter_context(atomic.replacing_path(errors_path, 0o600)), "w", newline="",
          encoding="utf-8")))
      err.writerow(ERROR_COLUMNS)
    for num_rows, rows, row_errors in blocks:
      read += num_rows
      predicted += len(rows)
      bad += len(row_errors)
      out.writerows(rows)
      if err is not None:
        err.writerows([e.row, e.line, e.column, e.reason, e.detail] for e in row_errors)
      first += row_errors[:max(0, _SHOWN_ERRORS - len(first))]
  return read, predicted, bad, first


# ---------------------------------------------------------------------------------------------
# The Spark path: the same blocks as the local path, encoded and predicted by executors.


def _spark_blocks(spark: Any, predictor: predictor_lib.Predictor, model: str, input_path: str,
                  header_line: str, block_rows: int) -> Iterator[Block]:
  """The blocks of :func:`predict_csv`'s local path, computed by Spark, in order.

  Pass 1 (JVM only) counts the lines of each input split, which numbers every line whatever
  the partitioning. Pass 2 sends each data line (as bytes, decoded as the local path decodes
  them) to the partition of its block (``block_rows`` consecutive rows, as locally; whole
  blocks, so the model sees the same batches and gives the same bits), sorted by row; each
  partition encodes and predicts its blocks with :meth:`predictor_lib.Predictor.predict_csv_lines`,
  the local path's code. The results are cached on the executors (memory, then their local
  disks: as private as the input), then brought to the driver one partition at a time.

  Raises:
    errors.UserError: a Spark task failed (the message is its Python error).
  """
  from pyspark import StorageLevel  # local: only the Spark path needs pyspark
  from pyspark.sql import functions as F
  df = spark.read.text("file://" + input_path).select(
      F.col("value").cast("binary").alias("value"),
      F.col("_metadata.file_block_start").alias("start"))
  try:
    counts = sorted((int(r["start"]), int(r["count"]))
                    for r in df.groupBy("start").count().collect())
    bases, lines = {}, 0
    for start, n in counts:
      bases[start] = lines
      lines += n
    num_rows = lines - 1  # line 0 is the header, checked on the driver
    if num_rows <= 0:
      return
    num_blocks = -(-num_rows // block_rows)
    parts = max(1, min(num_blocks, df.rdd.getNumPartitions()))
    predicted = (df.rdd.mapPartitions(_number_lines(bases))
                 .repartitionAndSortWithinPartitions(
                     parts, partitionFunc=_block_partition(block_rows, num_blocks, parts))
                 .mapPartitions(_predict_blocks(model, predictor.digest, input_path,
                                                header_line, block_rows, num_rows)))
    predicted.persist(StorageLevel.MEMORY_AND_DISK)
    try:
      predicted.count()  # every partition at once; the driver then reads them in order
      for expected, (block, output) in enumerate(predicted.toLocalIterator()):
        if block != expected:
          raise RuntimeError(f"block {block} came where {expected} was due")
        yield output
    finally:
      predicted.unpersist()
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "Py4JJavaError":
      raise
    raise errors.UserError(f"predicting with Spark failed: {_task_error(str(e))}") from e


def _task_error(text: str) -> str:
  """The Python error of a failed Spark task (the last one of its traceback)."""
  found = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, re.MULTILINE)
  found = [f for f in found if not f[0].startswith(("Py4J", "Spark"))]
  return f"{found[-1][0]}: {found[-1][1]}" if found else text.splitlines()[0]


def _number_lines(bases: dict[int, int]):
  """Rows of (value, split start) -> (data row, line bytes); the header (line 0) is dropped."""

  def run(rows):
    seen: dict[int, int] = {}
    for value, start in rows:  # a split's lines come together and in order
      i = seen.get(start, 0)
      seen[start] = i + 1
      line = bases[start] + i
      if line:
        yield line - 1, bytes(value)

  return run


def _block_partition(block_rows: int, num_blocks: int, parts: int):
  """Data row -> partition: consecutive ranges of whole blocks, in order."""
  return lambda row: (row // block_rows) * parts // num_blocks


_WORKER_MODEL: dict[tuple, tuple] = {}  # a Python worker loads the model once


def _worker_model(model: str, digest: str, input_path: str, header_line: str):
  key = (model, digest, input_path, header_line)
  if key not in _WORKER_MODEL:
    # The digest pins the files the driver checked (epsilon included): the same model.
    predictor = predictor_lib.load_model(model, expected_digest=digest, check_epsilon=False)
    _WORKER_MODEL.clear()
    _WORKER_MODEL[key] = predictor, predictor.csv_cleaner(input_path, header_line)
  return _WORKER_MODEL[key]


def _predict_blocks(model: str, digest: str, input_path: str, header_line: str,
                    block_rows: int, num_rows: int):
  """Sorted (data row, line bytes) pairs of whole blocks -> (block, :data:`Block`) each."""

  def run(pairs):
    predictor, cleaner = _worker_model(model, digest, input_path, header_line)
    for block, group in itertools.groupby(pairs, key=lambda kv: kv[0] // block_rows):
      items = list(group)
      row = block * block_rows
      if len(items) != min(block_rows, num_rows - row) or items[0][0] != row:
        raise RuntimeError(f"{input_path}: block {block} has {len(items)} lines, not "
                           f"{min(block_rows, num_rows - row)} (the file changed?)")
      # Bytes decoded as the local path's reader decodes the file: bad bytes become U+FFFD.
      lines = b"\n".join(v for _, v in items).decode("utf-8", "replace").split("\n")
      yield block, _block_output(predictor, predictor.predict_csv_lines(cleaner, lines, row))

  return run


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m fastdp_jax.predict",
                              description="predict raw CSV rows with an exported model")
  p.add_argument("--model", required=True, help="the model directory (or a workdir with model/)")
  p.add_argument("--input", required=True, help="raw CSV file with a header line")
  p.add_argument("--output", required=True, help="predictions CSV to write")
  p.add_argument("--errors", default=None, help="CSV of the rows that could not be predicted "
                 "(row, line, column, reason, detail); default: print the first ones")
  p.add_argument("--key-file", default=None, help="the secret key the model was signed with "
                 "(python -m fastdp_jax.export sign): refuse it unless the signature matches")
  p.add_argument("--spark", action="store_true", help="encode and predict with Spark (large "
                 "inputs); the outputs are the same bytes as without it")
  p.add_argument("--master", default=None, help="with --spark: the Spark master; default: "
                 "spark-submit's, else local[*] (as the preprocessing job's --master)")
  args = p.parse_args(argv)
  sessions: list[Any] = []

  def start_spark():  # only once the model and the header have been checked
    from fastdp_jax.data import spark as spark_lib  # local: only --spark needs pyspark
    sessions.append(spark_lib.create_session(args.master, app_name="fastdp-predict"))
    return sessions[-1]

  try:
    key = model_dir.read_key_file(args.key_file) if args.key_file else None
    read, predicted, bad, first = predict_csv(args.model, args.input, args.output, args.errors,
                                              spark=start_spark if args.spark else None,
                                              key=key)
  except (errors.UserError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  finally:
    for session in sessions:
      session.stop()
  print(f"{args.input}: {read} rows, {predicted} predicted -> {args.output}, {bad} with errors"
        + (f" -> {args.errors}" if args.errors and bad else ""))
  if not args.errors:
    for row_error in first:
      print(f"  row {row_error.row} (line {row_error.line}): {row_error.reason}: "
            f"{row_error.detail}", file=sys.stderr)
    if bad > len(first):
      print(f"  ... {bad - len(first)} more (pass --errors FILE for all)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

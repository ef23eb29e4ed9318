#!/usr/bin/env python3
"""Hadoop-streaming mapper: cleans CSV lines with the Spark job's rules and keys them by position.

Locally (one input stream; its first line is the header)::

  cat in.csv | python preprocessing/mapreduce/mapper.py --spec capums \
    | LC_ALL=C sort | python preprocessing/mapreduce/reducer.py > cleaned.tsv

Under Hadoop (``-D stream.map.input.ignoreKey=false``, so each input record is
``BYTE_OFFSET<TAB>LINE``; the header is the line at offset 0 of each file, and a split that
does not start a file learns the column order from the spec's ``input_columns`` or
``--columns``: pass ``--columns`` with the file's header when its columns are in another order
than ``input_columns`` or include others, since such a split never sees the header)::

  hadoop jar hadoop-streaming.jar -D stream.map.input.ignoreKey=false \
    -D stream.num.map.output.key.fields=2 -D mapreduce.job.reduces=1 \
    -files mapper.py,reducer.py,capums.py -archives fastdp.zip#fastdp \
    -cmdenv PYTHONPATH=fastdp -mapper "python3 mapper.py --spec capums.py" \
    -reducer "python3 reducer.py" -input /census/CaPUMS5full.csv -output /census/cleaned

Output, one line per input line: ``FILE<TAB>POSITION<TAB>STATUS<TAB>PAYLOAD`` where FILE is the
input file (``-`` for stdin), POSITION its 0-based line index (stdin) or byte offset (Hadoop)
zero-padded to 15 digits, so that a byte-wise sort restores the input order, and STATUS/PAYLOAD:

* ``H`` header line; payload: the header's columns that the spec does not use (ignored),
  comma-separated (columns are found by name, in any order);
* ``K`` kept: the used columns' values (features then label), comma-separated; with a spec
  that names a ``privacy_unit``, then a TAB and the row's canonical unit id as a JSON string
  (:func:`fastdp_jax.data.units.canonical_id`; JSON escapes any TAB inside it);
* ``N`` dropped for NA: the positions (in the spec's used columns) of the missing cells;
* ``R`` rejected: a JSON object with ``reason``, ``detail`` and the line's ``text``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys

if __package__ in (None, ""):  # run as a script: make the project importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # pylint: disable=g-import-not-at-top

from fastdp_jax.data import cleaning  # pylint: disable=g-import-not-at-top
from fastdp_jax import errors  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import features as features_lib  # pylint: disable=g-import-not-at-top
from fastdp_jax.data import units as units_lib  # pylint: disable=g-import-not-at-top

BLOCK_LINES = 8192
_HADOOP_ENV = ("mapreduce_task_id", "mapred_task_id")
# Magic numbers of compressed files: the mapper reads text, so compressed bytes are refused
# (Hadoop decompresses .gz and .bz2 input itself, as Spark does; the local runner too).
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
          (b"\x04\x22\x4d\x18", "lz4"), (b"PK\x03\x04", "zip"),
          (b"\xff\x06\x00\x00sNaPpY", "snappy"))
UNSUPPORTED_COMPRESSION = "compressed input is not supported by the streaming path"


def compression_of(head: bytes) -> str | None:
  """The compression format whose magic number starts ``head`` (>= 10 bytes), or None."""
  if re.match(rb"BZh[1-9]1AY&SY", head):
    return "bzip2"
  for magic, name in _MAGIC:
    if head.startswith(magic):
      return name
  return None


def format_values(values: np.ndarray) -> list[str]:
  """[m, k] float64 -> m comma-separated texts that read back to exactly the same floats."""
  if not len(values):
    return []
  cols = []
  for j in range(values.shape[1]):
    v = values[:, j]
    if np.all(np.abs(v) < 2**53) and np.array_equal(v, np.round(v)):
      cols.append(v.astype(np.int64).astype(str))
    else:
      cols.append(np.array([repr(float(x)) for x in v]))
  out = cols[0].astype(object)
  for c in cols[1:]:
    out = out + "," + c.astype(object)
  return out.tolist()


def _emit(out, file: str, positions: list[int], lines: list[str],
          result: cleaning.CleanResult) -> None:
  status = [""] * len(lines)
  uids = ([""] * len(result.kept) if result.units is None else
          ["\t" + json.dumps(u) for u in result.units])
  for i, text, uid in zip(result.kept.tolist(), format_values(result.values), uids):
    status[i] = "K\t" + text + uid
  for i, cells in zip(result.dropped_na.tolist(), result.na_cells):
    status[i] = "N\t" + ",".join(map(str, np.flatnonzero(cells).tolist()))
  for i, reason, detail in result.rejects:
    status[i] = "R\t" + json.dumps({"reason": reason, "detail": detail, "text": lines[i]})
  out.write("".join(f"{file}\t{p:015d}\t{s}\n" for p, s in zip(positions, status)))


def run(stdin, stdout, spec: features_lib.FeatureSpec, columns: tuple[str, ...] | None,
        environ=os.environ) -> int:
  """Maps ``stdin`` to ``stdout``; returns the process exit code."""
  hadoop = any(k in environ for k in _HADOOP_ENV)
  file = environ.get("mapreduce_map_input_file", environ.get("map_input_file", "-"))
  if hadoop and environ.get("stream_map_input_ignoreKey", "").lower() != "false":
    print("mapper: run with -D stream.map.input.ignoreKey=false so that each record carries "
          "its byte offset (needed to number lines)", file=sys.stderr)
    return 2
  header = columns or spec.input_columns or None
  cleaner = cleaning.LineCleaner(spec, header) if header else None
  positions: list[int] = []
  lines: list[str] = []
  index = 0

  def flush():
    if lines:
      _emit(stdout, file, positions, lines, cleaner.clean(lines))
      positions.clear()
      lines.clear()

  for raw in stdin:
    line = raw[:-1] if raw.endswith("\n") else raw
    if hadoop:
      offset, sep, line = line.partition("\t")
      if not sep or not offset.isdigit():
        print(f"mapper: record {raw[:60]!r} is not OFFSET<TAB>LINE; run with "
              "-D stream.map.input.ignoreKey=false", file=sys.stderr)
        return 2
      pos = int(offset)
    else:
      pos = index
    index += 1
    if pos == 0:  # the file's header
      try:
        found = cleaning.parse_header(line)
        spec.column_indices(found)
        if spec.privacy_unit:  # the unit's id columns, whether or not they are features
          units_lib.unit_column_indices(spec.privacy_unit, found)
      except (features_lib.SpecError, errors.PipelineError) as e:
        print(f"mapper: {file}: the first line is taken as the header: {e}", file=sys.stderr)
        return 2
      if cleaner is None or cleaner.header != found:
        flush()
        cleaner = cleaning.LineCleaner(spec, found)
      stdout.write(f"{file}\t{pos:015d}\tH\t{','.join(spec.ignored_columns(found))}\n")
      continue
    if cleaner is None:
      print("mapper: this split does not start its file, so the header is unknown: give "
            "--columns or set input_columns in the spec", file=sys.stderr)
      return 2
    positions.append(pos)
    lines.append(line)
    if len(lines) >= BLOCK_LINES:
      flush()
  flush()
  return 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description="Hadoop-streaming mapper (see the module docstring)")
  p.add_argument("--spec", required=True, help="feature spec file or built-in name")
  p.add_argument("--columns", help="the input header, comma-separated (default: the spec's "
                 "input_columns, else the first line)")
  args = p.parse_args(argv)
  try:
    spec = features_lib.load_spec(args.spec)
  except (features_lib.SpecError, FileNotFoundError) as e:  # one line, exit 2
    print(f"mapper: {e}", file=sys.stderr)
    return 2
  columns = tuple(args.columns.split(",")) if args.columns else None
  kind = compression_of(sys.stdin.buffer.peek(16)[:16])  # type: ignore[union-attr]
  if kind:
    file = os.environ.get("mapreduce_map_input_file", os.environ.get("map_input_file", "-"))
    print(f"mapper: {file}: the input is {kind}-compressed; {UNSUPPORTED_COMPRESSION} "
          "(decompress it first, or use the Spark job)", file=sys.stderr)
    return 2
  # Universal newlines: \n, \r\n and \r end a line, as in Hadoop's and Spark's line readers;
  # undecodable bytes become U+FFFD as in Spark's text source.
  stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline=None)
  stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n",
                            write_through=False)
  code = run(stdin, stdout, spec, columns)
  stdout.flush()
  return code


if __name__ == "__main__":
  sys.exit(main())

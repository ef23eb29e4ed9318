#!/usr/bin/env python3
"""Hadoop-streaming reducer: numbers the mapper's records in input order.

Its input is the mapper's output sorted byte-wise (``LC_ALL=C sort`` locally; Hadoop's
shuffle with ``-D stream.num.map.output.key.fields=2 -D mapreduce.job.reduces=1``), so the
records arrive in (file, position) order, i.e. the input files in path order and the lines
of each file in file order. It gives each line its 1-based line number in its file and each
data record its row id (0-based, over all files, headers excluded), the same numbering as the
Spark job, so that both put every row in the same split.

Output, one line per record (the converter ``preprocessing.mapreduce.to_shards`` reads it)::

  H<TAB>FILE<TAB>LINE[<TAB>COLS]  a header line (COLS: its columns the spec ignores)
  K<TAB>ROW<TAB>v1,v2,...        kept: values of the used columns (features then label)
  N<TAB>ROW<TAB>j1,j2,...        dropped for NA in used columns j1, j2, ...
  R<TAB>ROW<TAB>{json}           rejected: file, line, row, reason, detail, text

A single reducer sees every record; out-of-order input is an error (exit code 2), never a
silent renumbering.
"""

from __future__ import annotations

import io
import json
import sys


def run(stdin, stdout) -> int:
  """Reduces ``stdin`` to ``stdout``; returns the exit code."""
  row = 0
  file, line, last = None, 0, None
  write = stdout.write
  for n, raw in enumerate(stdin, start=1):
    parts = raw.rstrip("\n").split("\t", 3)
    if len(parts) != 4:
      print(f"reducer: input line {n} is not FILE<TAB>POSITION<TAB>STATUS<TAB>PAYLOAD: "
            f"{raw[:80]!r}", file=sys.stderr)
      return 2
    f, pos, status, payload = parts
    key = (f, pos)
    if last is not None and key <= last:
      print(f"reducer: input line {n} ({f}, {pos}) is not after ({last[0]}, {last[1]}): sort "
            "the mapper output byte-wise (LC_ALL=C sort) and use a single reducer",
            file=sys.stderr)
      return 2
    last = key
    if f != file:
      file, line = f, 0
    line += 1
    if status == "H":
      write(f"H\t{f}\t{line}" + (f"\t{payload}" if payload else "") + "\n")
      continue
    if status == "R":
      rec = json.loads(payload)
      rec = {"file": f, "line": line, "row": row, **rec}
      write(f"R\t{row}\t{json.dumps(rec)}\n")
    elif status in ("K", "N"):
      write(f"{status}\t{row}\t{payload}\n")
    else:
      print(f"reducer: input line {n} has unknown status {status!r}", file=sys.stderr)
      return 2
    row += 1
  return 0


def main() -> int:
  stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
  stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n")
  code = run(stdin, stdout)
  stdout.flush()
  return code


if __name__ == "__main__":
  sys.exit(main())

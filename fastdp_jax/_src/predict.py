"""Predictions from a raw CSV with an exported model: ``python -m fastdp_jax.predict``.

::

  python -m fastdp_jax.predict --model runs/fulton/model --input raw.csv \
      --output predictions.csv [--errors errors.csv]
  fastdp-predict --model ... (the same command, installed)

The model's feature spec (stored in the export) encodes each raw row with the Spark job's own
code (:mod:`preprocessing.features`, :mod:`preprocessing.cleaning`): columns by name in any
order, other columns ignored. Rows that cannot be encoded (a missing value, an unknown category
or vocabulary code, a non-number, NaN, a value outside the column's domain, a wrong number of
fields) are not predicted: each is written to ``--errors`` with its row, line, column and
reason (without ``--errors``, the first ones are printed), and counted on the console.

``predictions.csv`` has one line per predicted row: ``row`` (0-based data row of the input) and
``line`` (its line in the file), then

* binary: ``probability`` (P(label = 1)) and ``prediction`` (0/1 at the model's threshold);
* multiclass: ``p_CLASS`` for each class, and ``prediction`` (the most probable class name);
* regression: ``prediction`` (the value, on the label's transformed scale).

Exit status: 0 when the input could be read (even if some rows had errors), 2 when it cannot
be used at all (no such file, a header lacking a column the model needs, not a model), with
one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from collections.abc import Sequence

from fastdp_jax._src import atomic
from fastdp_jax._src import errors
from fastdp_jax._src import export

ERROR_COLUMNS = ("row", "line", "column", "reason", "detail")
_SHOWN_ERRORS = 10


def prediction_header(predictor: export.Predictor) -> list[str]:
  """The columns of ``predictions.csv`` for the model's task."""
  if predictor.task == "binary":
    return ["row", "line", "probability", "prediction"]
  if predictor.task == "multiclass":
    return ["row", "line", *[f"p_{c}" for c in predictor.classes], "prediction"]
  return ["row", "line", "prediction"]


def _prediction_rows(predictor: export.Predictor, result: export.RowPredictions):
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


def predict_csv(model: str, input_path: str, output: str,
                errors_path: str | None = None) -> tuple[int, int, int, list[export.RowError]]:
  """Writes the predictions of a raw CSV file (and its errors) with an exported model.

  Both outputs hold values of the input rows: they are written owner-only (0600), each
  appearing whole (temporary file, then rename).

  Returns:
    ``(rows read, rows predicted, rows with errors, the first errors)``.

  Raises:
    errors.UserError: the model cannot be loaded or the input cannot be used at all.
    FileNotFoundError: no such input.
  """
  predictor = export.load_model(model)
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"input {input_path} does not exist")
  read = predicted = bad = 0
  first: list[export.RowError] = []
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
    for result in predictor.predict_csv_blocks(input_path):
      read += result.num_rows
      predicted += len(result.rows)
      bad += len(result.errors)
      out.writerows(_prediction_rows(predictor, result))
      if err is not None:
        err.writerows([e.row, e.line, e.column, e.reason, e.detail] for e in result.errors)
      first += result.errors[:max(0, _SHOWN_ERRORS - len(first))]
  return read, predicted, bad, first


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m fastdp_jax.predict",
                              description="predict raw CSV rows with an exported model")
  p.add_argument("--model", required=True, help="the model directory (or a workdir with model/)")
  p.add_argument("--input", required=True, help="raw CSV file with a header line")
  p.add_argument("--output", required=True, help="predictions CSV to write")
  p.add_argument("--errors", default=None, help="CSV of the rows that could not be predicted "
                 "(row, line, column, reason, detail); default: print the first ones")
  args = p.parse_args(argv)
  try:
    read, predicted, bad, first = predict_csv(args.model, args.input, args.output, args.errors)
  except (errors.UserError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
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

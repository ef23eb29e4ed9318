"""``fastdp-spec init``: a commented feature spec for your own CSV table.

::

  fastdp-spec init TABLE.csv --label COLUMN [--output FILE] [--task binary|multiclass|regression]
      [--positive VALUE] [--epsilon E [--delta D]]
  python -m fastdp_jax.data.spec_init init ...    (the same)

**From the header only** (the default): every column of the header is listed, and each kind,
bound and category list is a ``TODO`` placeholder, because the only place they may come from
without a privacy cost is public knowledge (a codebook, the survey's documentation, common
sense). The spec refuses to load (``FILE:LINE: ... is still a TODO placeholder``, exit 2) until
every placeholder is replaced. No row of the table is read. A column with an empty name (R's
row names) is named ``unnamed_I`` (I its position) and left out of the features.

**With** ``--epsilon E``: the values are private estimates from the rows, (E, D)-DP for the
whole table with a row as the privacy unit (add or remove one row), and E and D are written
into the spec (``config.private_estimates``) so that every model trained with it adds them to
its own epsilon and delta (basic composition: :func:`fastdp_jax.dp.calibration.total_epsilon`).
It spends them in two rounds (sequential composition; the second round's allocation depends
only on the first round's outputs, so it is adaptive composition), with m used columns (the
label included):

1. 40 % of E, ``E1 / m`` per column, and all of D, ``D / m`` per column:

   * 70 %: a **thresholded histogram** of the column's cells (after trimming; missing-value
     tokens left out): each distinct value's count plus Laplace noise of scale ``1 / eps_h``,
     and only values whose noisy count exceeds ``tau = 1 + ln(1 / (2 delta_h)) / eps_h`` are
     released. A row adds 1 to one count, so this is ``(eps_h, delta_h)``-DP under add/remove
     (the delta covers a value that only the added row holds: ``P[1 + Lap > tau] = delta_h``;
     Korolova et al. 2009, Wilson et al. 2020);
   * 30 %: two Laplace counts, the column's cells that are numbers and those that are not (a
     row's cell is in at most one of them: L1 sensitivity 1).

2. The other 60 %, split evenly over the k columns that round 1 makes numeric (the label too
   with ``--task regression``): the **5 % and 95 % quantiles** of each one's numbers, each
   drawn by the exponential mechanism over :data:`GRID`, a public grid fixed in advance (0 and
   +-{1, 2, 5} * 10^k, k = -2..8), scored by ``-|rank(c) - q n|`` (sensitivity 1 under
   add/remove; Smith 2011), with probability proportional to
   ``(1 + |c|)^-2 exp(eps_q * score / 2)``: the public base measure (it does not depend on
   the data, so the mechanism stays eps_q-DP) breaks the ties the data cannot break, between
   the candidates below the smallest value or above the largest, in favour of small
   magnitudes. When no column is numeric this round does not run, and the spec states
   ``0.4 E`` as spent.

The kind is a deterministic function of these outputs (public constants only): released
values covering at least :data:`COVERAGE` of the noisy count of cells, and at most
:data:`MAX_CATEGORIES` of them, make a discrete column (two values: binary; more: categorical;
numbers stay numbers); else a column whose noisy count of non-numbers is under
``1 - COVERAGE`` of its cells is numeric, clipped to the two quantiles (``log1p`` when they
span more than three decades from 0); else, if values were released, an embedding of them with
``unknown='extra_id'``; else the column is left out (too few repeated values to estimate).
Accuracy grows with ``n * E``: with a few thousand rows and E = 0.5, a category needs several
hundred rows to be released and a bound may be a power of ten too wide; check the estimates,
and prefer public values where you have them.
The label becomes binary (two values; the positive one from ``--positive``, else a word such
as ``yes``/``true``/``1``), multiclass (3 or more) or regression (numbers), unless ``--task``
says which. Values that rows hold too rarely to pass the threshold are not listed, so such
rows follow the column's rule for unknown values (rejected, or the embedding's extra id).

The noise comes from the operating system's entropy and is forgotten: a rerun gives other
estimates (and spends the budget again).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastdp_jax import atomic
from fastdp_jax import errors
from fastdp_jax.data import cleaning
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import spec_source
from fastdp_jax.data import spec_values

MECHANISM = ("40 % of epsilon: per column a Laplace thresholded histogram and two Laplace "
             "counts; 60 %: exponential-mechanism 5 %/95 % quantiles on a public grid for the "
             "numeric columns; basic composition (fastdp_jax/data/spec_init.py)")
_ROUND1, _SHARE_HISTOGRAM = 0.4, 0.7
QUANTILES = (0.05, 0.95)
MAX_CATEGORIES = 32
COVERAGE = 0.9
DEFAULT_DELTA = 1e-6
# The public candidates of the quantiles: 0 and +-{1, 2, 5} * 10^k (k = -2..8), sorted. Few
# candidates: each one far from the data takes probability from the right one.
GRID = np.unique(np.concatenate([[0.0], *[
    s * np.array([d * 10.0 ** k for k in range(-2, 9) for d in (1, 2, 5)])
    for s in (1.0, -1.0)]]))
_POSITIVE_WORDS = ("yes", "y", "true", "t", "1", "positive", "pos")
_NA_TOKENS = ("NA", "")


class InitError(errors.UserError):
  """``fastdp-spec init`` cannot write a spec (a bad table, column or option)."""


@dataclasses.dataclass
class ColumnData:
  """One column's cells, as the estimates need them (private: never written)."""

  counts: collections.Counter
  numbers: list[float]


def read_header(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(header, names)``: the first line's columns, and their names in the spec (an empty
  name becomes ``unnamed_I``).

  Raises:
    InitError: no file, an empty file, or names the spec cannot hold (repeats, dots).
  """
  if not os.path.isfile(path):
    raise InitError(f"{path} does not exist")
  with cleaning.open_csv(path) as f:
    first = f.readline(cleaning.MAX_HEADER_BYTES + 1).rstrip("\n")
  if not first:
    raise InitError(f"{path} is empty (expected a header line naming the columns)")
  header = cleaning.parse_header(first)
  names = tuple(h or f"unnamed_{i}" for i, h in enumerate(header))
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise InitError(f"{path}: the header names {repeated} more than once")
  dotted = [n for n in names if "." in n]
  if dotted:
    raise InitError(f"{path}: column names {dotted} hold a dot, which a spec's ConfigDict "
                    "cannot use as a key; rename them in the header")
  return header, names


def scan(path: str, header: Sequence[str], used: Sequence[int]) -> list[ColumnData]:
  """The used columns' non-missing cells (trimmed) and numbers; lines of another arity and
  repeats of the header are skipped, as the cleaning rejects them."""
  out = [ColumnData(collections.Counter(), []) for _ in used]
  na = frozenset(_NA_TOKENS)
  with cleaning.open_csv(path) as f:
    f.readline(cleaning.MAX_HEADER_BYTES + 1)
    for line in f:
      parts = line.rstrip("\n").split(",")
      if len(parts) != len(header) or cleaning.parse_header(line.rstrip("\n")) == tuple(header):
        continue
      for col, j in zip(out, used):
        token = cleaning.normalize_token(parts[j])
        if token in na:
          continue
        col.counts[token] += 1
        v = spec_values.parse_number(token)
        if v is not None:
          col.numbers.append(v)
  return out


def thresholded_histogram(counts: collections.Counter, epsilon: float, delta: float,
                          rng: np.random.Generator) -> dict[str, float]:
  """The values whose Laplace-noised count exceeds ``1 + ln(1/(2 delta))/epsilon``, with
  their noisy counts: ``(epsilon, delta)``-DP when a row adds 1 to at most one count."""
  tau = 1.0 + math.log(1.0 / (2.0 * delta)) / epsilon
  keys = sorted(counts)
  noisy = np.array([counts[k] for k in keys], np.float64) + rng.laplace(0, 1 / epsilon,
                                                                         len(keys))
  return {k: float(c) for k, c in zip(keys, noisy) if c > tau}


def private_quantile(numbers: np.ndarray, q: float, epsilon: float,
                     rng: np.random.Generator, grid: np.ndarray = GRID) -> float:
  """The exponential mechanism's ``q``-quantile over the public ``grid`` (epsilon-DP).

  Args:
    numbers: the column's values, sorted.
    q: in (0, 1).
    epsilon: the selection's budget.
    rng: secret randomness.
    grid: the public candidates, sorted.
  """
  return float(grid[int(np.argmax(quantile_logits(numbers, q, epsilon, grid)
                                  + rng.gumbel(size=len(grid))))])


def quantile_logits(numbers: np.ndarray, q: float, epsilon: float,
                    grid: np.ndarray = GRID) -> np.ndarray:
  """The log-probabilities (up to a constant) of :func:`private_quantile`'s candidates."""
  rank = np.searchsorted(numbers, grid, side="right").astype(np.float64)
  score = -np.abs(rank - q * len(numbers))  # one row moves it by at most max(q, 1 - q) <= 1
  return epsilon * score / 2.0 - 2.0 * np.log1p(np.abs(grid))  # the base measure: public


@dataclasses.dataclass(frozen=True)
class Released:
  """One column's DP outputs (the only inputs of the kind rule)."""

  values: dict[str, float]
  numeric: float
  other: float
  lo: float = math.nan
  hi: float = math.nan

  @property
  def nonmissing(self) -> float:
    return self.numeric + self.other

  @property
  def is_numeric(self) -> bool:
    """Mostly numbers, by the noisy counts."""
    return self.numeric > 0 and self.other < (1 - COVERAGE) * self.nonmissing


def release(col: ColumnData, epsilon: float, delta: float,
            rng: np.random.Generator) -> Released:
  """Round 1 of a column: its histogram and counts, ``(epsilon, delta)``-DP."""
  values = thresholded_histogram(col.counts, _SHARE_HISTOGRAM * epsilon, delta, rng)
  scale = 1.0 / ((1 - _SHARE_HISTOGRAM) * epsilon)
  numeric = len(col.numbers) + rng.laplace(0, scale)
  other = sum(col.counts.values()) - len(col.numbers) + rng.laplace(0, scale)
  return Released(values, float(numeric), float(other))


def needs_bounds(r: Released) -> bool:
  """Whether round 1 makes the column numeric (a function of its DP outputs only)."""
  return _discrete(r) is None and r.is_numeric


def with_bounds(r: Released, col: ColumnData, epsilon: float,
                rng: np.random.Generator) -> Released:
  """Round 2 of a column: ``r`` with its two quantiles, epsilon-DP (half each)."""
  numbers = np.sort(np.asarray(col.numbers, np.float64))
  lo, hi = (private_quantile(numbers, q, epsilon / 2, rng) for q in QUANTILES)
  if hi <= lo:  # post-processing: the next public candidate above lo
    above = int(np.searchsorted(GRID, lo, side="right"))
    lo, hi = (lo, float(GRID[above])) if above < len(GRID) else (float(GRID[-2]), lo)
  return dataclasses.replace(r, lo=lo, hi=hi)


def _numeric_entry(r: Released) -> dict[str, Any]:
  log = r.lo >= 0 and r.hi > 1000 * max(r.lo, 1.0)
  return {"kind": "numeric", "bounds": (r.lo, r.hi), "transform": "log1p" if log else
          "identity"}


def _discrete(r: Released) -> tuple[Any, ...] | None:
  """The released values as the spec lists them (numbers when all are), or None when they do
  not describe the column (too many, or too little of its mass)."""
  if not r.values or len(r.values) > MAX_CATEGORIES:
    return None
  if sum(r.values.values()) < COVERAGE * r.nonmissing:
    return None
  numbers = {t: spec_values.parse_number(t) for t in r.values}
  if all(v is not None for v in numbers.values()) and len(set(numbers.values())) == len(numbers):
    return tuple(sorted(v for v in numbers.values() if v is not None))
  return tuple(sorted(r.values))


def _binary_order(values: tuple[Any, ...], positive: str | None = None) -> tuple[Any, ...]:
  """Two values as (read as 0, read as 1): ``positive`` or a yes-like word second."""
  first, second = values
  want = positive if positive is not None else next(
      (v for v in (second, first) if str(v).lower() in _POSITIVE_WORDS), None)
  return (second, first) if want == first else (first, second)


def feature_entry(r: Released) -> dict[str, Any] | None:
  """A feature column's spec entry from its DP outputs (None: leave it out)."""
  discrete = _discrete(r)
  if discrete is not None:
    # 0/1 is the binary kind's public coding: a column whose released values are among them
    # is binary even when one of the two was too rare to pass the threshold (a one-valued
    # categorical would reject every row holding the other).
    if set(discrete) <= {0.0, 1.0} and not isinstance(discrete[0], str):
      return {"kind": "binary"}
    if len(discrete) == 2 and isinstance(discrete[0], str):
      return {"kind": "binary", "values": _binary_order(discrete)}
    if len(discrete) == 1:  # the others were rare: they share the extra id, no row is lost
      return {"kind": "embedding", "codes": _ints(discrete), "unknown": "extra_id"}
    return {"kind": "categorical", "categories": _ints(discrete)}
  if r.is_numeric:
    return _numeric_entry(r)
  if r.values:  # many values, or rare ones: an embedding, the rest on its extra id
    codes = tuple(sorted(r.values))[:manifest_lib.MAX_VOCAB - 1]
    return {"kind": "embedding", "codes": codes, "unknown": "extra_id"}
  return None


def _ints(values: tuple[Any, ...]) -> tuple[Any, ...]:
  return tuple(int(v) if isinstance(v, float) and v.is_integer() else v for v in values)


def task_entry(r: Released, task: str | None, positive: str | None) -> dict[str, Any]:
  """The label's ``task`` entry from its DP outputs (``task``/``positive``: the user's)."""
  discrete = _discrete(r)
  if task is None:
    if discrete is not None and len(discrete) >= 2:
      task = "binary" if len(discrete) == 2 else "multiclass"
    elif r.is_numeric:
      task = "regression"
    else:
      raise InitError("the private estimates do not show the label's task (too few repeated "
                      "values, and not numbers); pass --task, or write the spec by hand")
  if task == "regression":
    return dict(_numeric_entry(r), kind="regression", out_of_bounds="clip")
  if discrete is None or len(discrete) < 2:
    raise InitError(f"--task {task}: the private estimates released "
                    f"{len(r.values)} label values; too few or too many (at most "
                    f"{MAX_CATEGORIES}) at this epsilon")
  if task == "multiclass":
    return {"kind": "multiclass", "classes": tuple(
        (str(spec_values.format_number(c) if not isinstance(c, str) else c), (c,))
        for c in _ints(discrete))}
  if len(discrete) != 2:
    raise InitError(f"--task binary: the label shows {len(discrete)} values; use --task "
                    "multiclass, or --positive with a two-valued label")
  if discrete == (0.0, 1.0) and positive in (None, "1"):
    return {"kind": "binary"}
  texts = tuple(sorted(r.values))  # the cells' own texts: a string label matches them exactly
  if positive is None and not any(t.lower() in _POSITIVE_WORDS for t in texts):
    raise InitError(f"the label's values are {texts}: pass --positive VALUE to say which is "
                    "the positive class")
  if positive is not None and positive not in texts:
    raise InitError(f"--positive {positive!r} is not one of the label's released values "
                    f"{texts}")
  negative, pos = _binary_order(texts, positive)
  return {"kind": "binary", "positive": pos, "negative": (negative,)}


_MENU = '''\
# Each column's entry comes from PUBLIC knowledge (a codebook, the survey's documentation,
# common sense), never from looking at the rows: a min, a max or a list of values read from the
# data leaks it, outside the guarantee. Replace each "TODO" with one of:
#   ConfigDict({"kind": "numeric", "bounds": (LO, HI)})   clipped to [LO, HI], scaled to [0, 1]
#       (optional: "transform": "log1p" for skewed amounts; "domain": (A, B), a hard range)
#   ConfigDict({"kind": "categorical", "categories": ("a", "b", ...)})   one-hot; numbers or
#       strings (matched exactly after trimming); another value rejects the row
#   ConfigDict({"kind": "binary"})                        cells 0 or 1
#   ConfigDict({"kind": "binary", "values": ("no", "yes")})   two strings, read as 0 and 1
#   ConfigDict({"kind": "embedding", "codes": (...), "unknown": "extra_id"})   many values
# or take the column out of config.features. The task: ConfigDict({"kind": "binary",
# "positive": "yes"}) (other values negative; or list them: "negative": ("no",)),
# {"kind": "binary"} (labels 0/1), {"kind": "multiclass", "classes": (("low", ("a", "b")),
# ("high", ("c",)))} or {"kind": "regression", "bounds": (LO, HI), "out_of_bounds": "clip"}.
# Without public values: `fastdp-spec init --epsilon E` estimates them privately, and E is
# added to the epsilon of every model trained with the spec.
'''


def _todo_task(task: str | None, positive: str | None) -> dict[str, Any]:
  if task is None:
    return {"kind": "TODO: binary (with positive=...), multiclass or regression"}
  if task == "binary":
    return {"kind": "binary", "positive": positive} if positive is not None else {
        "kind": "binary"}
  if task == "multiclass":
    return {"kind": "multiclass", "classes": "TODO: ((class name, (code, ...)), ...)"}
  return {"kind": "regression", "bounds": "TODO: (LO, HI), public", "transform": "identity",
          "out_of_bounds": "clip"}


def _name_of(path: str) -> str:
  base = os.path.basename(path)
  for ext in (".gz", ".bz2", ".csv", ".txt"):
    base = base[:-len(ext)] if base.lower().endswith(ext) else base
  return re.sub(r"[^A-Za-z0-9_-]+", "_", base) or "table"


def _line(key: str, entry: dict[str, Any], note: str = "") -> str:
  text = f"  config.{key} = ConfigDict({entry!r})"
  return text + (f"  # {note}" if note else "")


def render(path: str, names: Sequence[str], label: str, features: Sequence[str],
           entries: dict[str, dict[str, Any]], task: dict[str, Any],
           estimates: tuple[float, float] | None, left_out: Sequence[str]) -> str:
  """The spec file's text."""
  how = ("with private estimates (see config.private_estimates)" if estimates else
         "from its header only: the TODO placeholders are yours to fill")
  out = [f'"""Feature spec of {os.path.basename(path)}, written by fastdp-spec init {how}.',
         "", "Columns are matched by name; columns not in config.features are ignored.", '"""',
         "", "from ml_collections import ConfigDict", ""]
  if not estimates:
    out += [_MENU]
  out += ["# The table's header, in file order" + (
      " (an empty name is called unnamed_I here; it is not a feature)." if any(
          n.startswith("unnamed_") for n in names) else "."),
          f"INPUT_COLUMNS = {tuple(names)!r}", "", "", "def get_config():",
          "  config = ConfigDict()", f"  config.name = {_name_of(path)!r}",
          f"  config.description = {os.path.basename(path)!r}",
          "  config.input_columns = INPUT_COLUMNS", f"  config.features = {tuple(features)!r}"]
  if left_out:
    out.append(f"  # Left out: {', '.join(left_out)} (the estimates released too few repeated "
               "values to describe them).")
  out.append("  config.columns = ConfigDict()")
  for name in features:
    out.append(_line(f"columns[{name!r}]", entries[name]))
  out += [f"  config.label = {label!r}", _line("task", task),
          f"  config.na_tokens = {_NA_TOKENS!r}  # cells that mean missing (the row is dropped)"]
  if estimates:
    eps, delta = estimates
    out += ["  # What the estimates above cost; composed into every model trained with this "
            "spec.", "  config.private_estimates = ConfigDict("
            f"{{'epsilon': {eps!r}, 'delta': {delta!r}, 'mechanism': {MECHANISM!r}}})"]
  return "\n".join(out + ["  return config", ""])


def init(path: str, label: str, *, epsilon: float | None = None,
         delta: float = DEFAULT_DELTA, task: str | None = None, positive: str | None = None,
         rng: np.random.Generator | None = None) -> str:
  """The spec file's text for the table at ``path`` (see the module docstring).

  Args:
    path: the CSV table (plain, .gz or .bz2).
    label: the label column's name.
    epsilon, delta: the estimates' budget; None: from the header only (no row is read).
    task, positive: the label's task and positive value, when the user knows them.
    rng: the estimates' randomness (default: the operating system's entropy; a fixed seed
      makes the estimates non-private, for tests only).

  Raises:
    InitError: a bad table, label or option.
  """
  header, names = read_header(path)
  if label not in names:
    raise InitError(f"--label {label!r} is not a column of {path} (columns: {list(names)})")
  used = [n for n in names if n != label and not n.startswith("unnamed_")]
  if epsilon is None:
    entries = {n: {"kind": spec_source.TODO} for n in used}
    return render(path, names, label, used, entries, _todo_task(task, positive), None, ())
  if not (math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
    raise InitError(f"--epsilon {epsilon} must be positive and --delta {delta} in (0, 1)")
  rng = rng or np.random.default_rng()
  columns = used + [label]
  data = scan(path, header, [names.index(n) for n in columns])
  m, cells = len(columns), dict(zip(columns, data))
  del data
  outs = {n: release(cells[n], _ROUND1 * epsilon / m, delta / m, rng) for n in columns}
  numeric = [n for n in columns if needs_bounds(outs[n]) or (n == label and task ==
                                                            "regression")]
  for n in numeric:
    outs[n] = with_bounds(outs[n], cells[n], (1 - _ROUND1) * epsilon / len(numeric), rng)
  cells.clear()  # the rows' values go no further than the releases
  spent = float(epsilon) if numeric else _ROUND1 * float(epsilon)
  entries = {n: e for n in used if (e := feature_entry(outs[n])) is not None}
  features = [n for n in used if n in entries]
  if not features:
    raise InitError(f"no feature could be estimated at epsilon {epsilon}: too few rows for "
                    "the threshold; raise --epsilon or write the spec by hand")
  text = render(path, names, label, features, entries, task_entry(outs[label], task, positive),
                (spent, float(delta)), [n for n in used if n not in entries])
  return text


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="fastdp-spec", description="Feature specs for your own "
                              "table (see docs in fastdp_jax/data/spec_init.py).")
  sub = p.add_subparsers(dest="command", required=True)
  q = sub.add_parser("init", help="write a commented spec for a CSV table",
                     description=__doc__.split("\n\n")[0])
  q.add_argument("table", help="the CSV table (its first line is the header)")
  q.add_argument("--label", required=True, help="the label column")
  q.add_argument("--output", help="write the spec here (default: stdout); never overwritten")
  q.add_argument("--task", choices=spec_values.TASK_KINDS, help="the label's task, if known")
  q.add_argument("--positive", help="a binary label's positive value (e.g. yes)")
  q.add_argument("--epsilon", type=float, help="estimate kinds, bounds and categories from "
                 "the rows with this privacy budget (added to every model's epsilon)")
  q.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                 help=f"the estimates' delta (default {DEFAULT_DELTA:g})")
  args = p.parse_args(argv)
  try:
    if args.output and os.path.exists(args.output):
      raise InitError(f"--output {args.output} exists; remove it or choose another name")
    text = init(args.table, args.label, epsilon=args.epsilon, delta=args.delta,
                task=args.task, positive=args.positive)
    if args.output:
      atomic.write_text(args.output, text)
      print(f"wrote {args.output}", file=sys.stderr)
    else:
      sys.stdout.write(text)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  return 0


if __name__ == "__main__":
  sys.exit(main())

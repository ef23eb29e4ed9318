"""The exported model in use: :func:`load_model` and the :class:`Predictor` it returns.

Example::

  predictor = fastdp_jax.load_model('runs/demo/model')
  p_employed = predictor(features)             # [n, d] array of ENCODED features
  labels = predictor.predict(features)         # 0/1 at the exported threshold
  bad = predictor.check_features(features)     # a RowError per row it would refuse
  result = predictor.predict_rows(rows)        # RAW rows: list of dicts, {column: values},
                                               # a pandas DataFrame, or a CSV file's path
  result.outputs, result.rows, result.errors   # good rows' outputs; a RowError per bad row

A model trained on a Spark-job dataset carries its feature spec, so raw rows are encoded by
the same code as the job (``fastdp_jax.data.features`` and ``fastdp_jax.data.cleaning``); a row
with a missing column value, an unknown category or vocabulary code, a wrong type, a NaN or
an out-of-domain value gets an error naming its row, column and reason, never a number.
``python -m fastdp_jax.predict`` does this for CSV files.

Encoded features are held to the same standard: a row with a NaN or infinite value, a value
outside the model's declared feature bounds (its feature spec's, when it has one) or an
embedding id that is not an integer id of the vocabulary has no meaningful output (a NaN
probability would read as class 0), so :meth:`Predictor.__call__`, :meth:`Predictor.predict`
and :meth:`Predictor.logits` refuse the whole call with a :class:`RowInputError` naming the
rows (its ``errors`` list every one), and :meth:`Predictor.check_features` returns the reasons
without raising, so that a caller can drop those rows and predict the others. The raw-row paths
check the features they encode the same way and report such a row as a bad row.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax import errors
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir


@dataclasses.dataclass(frozen=True)
class RowError:
  """Why one raw row could not be predicted.

  Attributes:
    row: the row's 0-based position in the input (data rows; a CSV's header is not a row).
    column: the column at fault ('' for a structural problem: blank line, wrong arity).
    reason: a code of :mod:`fastdp_jax.data.cleaning` (``non_numeric``, ``out_of_domain``,
      ``wrong_arity``, ...), ``missing`` (no value: absent, None, NaN or an NA token), or,
      for an encoded feature, ``non_finite`` (NaN or inf) or ``out_of_bounds`` (outside the
      model's declared feature bounds, or not an integer id of an embedding's vocabulary).
    detail: the message, naming the column and the value.
    line: the 1-based line in the CSV file (None for other inputs).
  """

  row: int
  column: str
  reason: str
  detail: str
  line: int | None = None


@dataclasses.dataclass(frozen=True)
class RowPredictions:
  """The outcome of predicting raw rows: every row is in ``rows`` or in ``errors``.

  Attributes:
    rows: [m] int64 positions (0-based) of the rows that were predicted.
    outputs: the model's outputs for them: probabilities [m] (binary), [m, K] (multiclass),
      or values [m] in the label's own units (regression).
    predictions: [m] 0/1 at the threshold (binary), the class index (multiclass) or the value
      (regression).
    errors: one :class:`RowError` per row that was not predicted, by row.
    num_rows: how many rows the input held.
  """

  rows: np.ndarray
  outputs: np.ndarray
  predictions: np.ndarray
  errors: list[RowError]
  num_rows: int


class RowInputError(errors.UserError):
  """Rows that cannot all be predicted; the message lists the first bad rows.

  Attributes:
    errors: a :class:`RowError` for every bad row found (empty when the input as a whole
      cannot be used: no feature spec, a missing column).
  """

  def __init__(self, message: str, row_errors: Sequence[RowError] = ()):
    super().__init__(message)
    self.errors = list(row_errors)


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A loaded model: ``predictor(features) -> P(label = 1)`` (binary), class probabilities
  (multiclass) or values in the label's own units (regression; :meth:`model_values` gives
  them on the transformed scale the model learnt).

  Attributes:
    feature_names: the encoded inputs, in order.
    label_name: what is predicted.
    threshold: the decision threshold of :meth:`predict` (binary).
    digest: sha256 of ``MANIFEST.sha256``: one value covering every file of the model.
    signed: whether a signature was checked against a key.
    spec: the full ``model.json`` contents (privacy, metrics, config).
    model: the ``"model"`` dict (task, classes, bounds, embeddings, hidden sizes).
    feature_spec: the public encoding of raw rows (None for a model trained on data without
      a feature spec: it takes encoded features only).
    feature_bounds: the declared public ``(lo, hi)`` of each encoded feature (the feature
      spec's; None without one: then only finiteness and embedding ids are checked).
  """

  feature_names: tuple[str, ...]
  label_name: str
  threshold: float
  digest: str
  signed: bool
  spec: dict[str, Any] = dataclasses.field(repr=False)
  _apply: Any = dataclasses.field(repr=False)
  _params: Any = dataclasses.field(repr=False)
  model: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
  feature_spec: Any = dataclasses.field(repr=False, default=None)
  _flat: Any = dataclasses.field(repr=False, default=None)
  feature_bounds: tuple[tuple[float, float], ...] | None = dataclasses.field(repr=False,
                                                                             default=None)

  @property
  def task(self) -> str:
    return self.model.get("task", "binary")

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(self.model.get("classes") or ())

  @property
  def label_transform(self) -> str:
    """The transform of a regression label in the spec (``'identity'``, ``'log1p'``).

    The network learns ``transform(label)``; :meth:`__call__` undoes it, so predictions are in
    the label's own units. ``'identity'`` for a classifier and for a model without a feature
    spec (its dataset's labels are what it predicts).
    """
    if self.task != "regression" or self.feature_spec is None:
      return "identity"
    return self.feature_spec.target.transform

  @property
  def raw_columns(self) -> tuple[str, ...]:
    """The raw input columns :meth:`predict_rows` needs (empty without a feature spec)."""
    return () if self.feature_spec is None else self.feature_spec.used_columns[:-1]

  def features_array(self, features: Any) -> np.ndarray:
    """ENCODED features as a [n, d] float32 array, from an array or a mapping name -> column.

    Raises:
      RowInputError: a row holds a NaN or inf, a value outside :attr:`feature_bounds` or an
        embedding id outside its vocabulary (:meth:`check_features` says which, per row).
    """
    x = self._encoded(features)
    row_errors = self._value_errors(x, np.arange(len(x)))
    if row_errors:
      raise RowInputError(_summary(row_errors, "check_features reports every row"), row_errors)
    return x

  def check_features(self, features: Any) -> list[RowError]:
    """A :class:`RowError` for each row of ENCODED features the predictor would refuse.

    Reasons: ``non_finite`` (NaN or inf), ``out_of_bounds`` (outside :attr:`feature_bounds`,
    or an embedding id that is not an integer in its vocabulary); one error per row, for its
    first bad column. Empty when every row can be predicted.
    """
    x = self._encoded(features)
    return self._value_errors(x, np.arange(len(x)))

  def _encoded(self, features: Any) -> np.ndarray:
    """``features`` as a [n, d] float32 array (raw rows encoded), values unchecked."""
    if _is_row_list(features):
      return self._raise_on_errors(self.encode_rows(features))[0]
    if hasattr(features, "keys") and not isinstance(features, np.ndarray):
      if self.feature_spec is not None:
        return self._raise_on_errors(self.encode_rows(features))[0]
      missing = [n for n in self.feature_names if n not in features.keys()]
      if missing:
        raise KeyError(f"features lack columns {missing}; the model needs "
                       f"{list(self.feature_names)}")
      x = np.stack([np.asarray(features[n], np.float32) for n in self.feature_names], axis=-1)
    else:
      x = np.asarray(features, np.float32)
    if x.ndim == 1:
      x = x[None]
    if x.ndim != 2 or x.shape[1] != len(self.feature_names):
      raise ValueError(f"features of shape {x.shape}; expected [n, {len(self.feature_names)}]"
                       f" in the order {list(self.feature_names)}")
    return x

  def logits(self, features: Any) -> np.ndarray:
    """The network's raw outputs: [n] (binary, regression) or [n, K] (multiclass)."""
    return np.asarray(self._apply(self._params, self.features_array(features)))

  def __call__(self, features: Any) -> np.ndarray:
    """Probabilities [n] (binary: P(label = 1)), [n, K] (multiclass) or values [n].

    ``features``: a [n, d] array of encoded features; or, for a model with a feature spec,
    raw rows (a mapping column -> values, a list of dicts, a pandas DataFrame), which must
    all be valid (else :class:`RowInputError`; :meth:`predict_rows` reports them per row).

    A regression model's values are in the label's own units: the inverse of the spec's
    label transform (:attr:`label_transform`; ``expm1`` for ``log1p``) is applied to
    :meth:`model_values`, as float32.

    Raises:
      RowInputError: naming the rows that cannot be predicted (its ``errors`` list them
        all): bad raw rows, or encoded rows with a NaN or inf, a value outside
        :attr:`feature_bounds` or an embedding id outside its vocabulary. Nothing is
        predicted then; :meth:`check_features` finds those rows without raising.
    """
    outputs = self.model_values(features)
    if self.label_transform == "identity":
      return outputs
    from fastdp_jax.data import features as features_lib  # local: only specs need it
    return np.asarray(features_lib.inverse_transform(self.label_transform, outputs),
                      outputs.dtype)

  def model_values(self, features: Any) -> np.ndarray:
    """As :meth:`__call__`, but a regression's values on the scale the model learnt.

    That is ``transform(label)`` (for a ``log1p`` label, log1p of its units): the scale of
    the dataset's labels, on which the run's test RMSE and MAE were computed. Classifiers:
    the same probabilities as :meth:`__call__`.
    """
    x = self.features_array(features)
    from fastdp_jax import models  # local: JAX only when predicting
    return np.asarray(models.apply_exported(self._flat, x, self.model))

  def _decide(self, outputs: np.ndarray) -> np.ndarray:
    if self.task == "binary":
      return (outputs >= self.threshold).astype(np.int32)
    if self.task == "multiclass":
      return np.argmax(outputs, axis=-1).astype(np.int32)
    return outputs

  def predict(self, features: Any) -> np.ndarray:
    """[n] labels: 0/1 at ``threshold`` (binary), class indices (multiclass), values.

    Raises:
      RowInputError: as :meth:`__call__`; a row without a meaningful output never gets a
        class.
    """
    return self._decide(self(features))

  def encode_rows(self, rows: Any) -> tuple[np.ndarray, np.ndarray, list[RowError], int]:
    """Raw rows -> ``(features [m, d], positions [m], errors, n)`` with the Spark job's code.

    Args:
      rows: a mapping column -> [n] values, a list of dicts (one per row), a pandas
        DataFrame, or a CSV file's path (``str`` or ``os.PathLike``; header first).

    Raises:
      RowInputError: the model has no feature spec, or the input lacks a column the model
        needs (every row would fail: the message names the columns).
    """
    spec = self._need_spec()
    if isinstance(rows, (str, os.PathLike)):
      results = [self._screen(r, csv=True) for r in _csv_blocks(spec, os.fspath(rows))]
      xs = [r[0] for r in results] or [np.zeros((0, spec.num_features), np.float32)]
      return (np.concatenate(xs), np.concatenate([r[1] for r in results] or [np.zeros(0, int)]),
              [e for r in results for e in r[2]], sum(r[3] for r in results))
    return self._screen(_encode_columns(spec, _as_columns(rows, spec)), csv=False)

  def predict_rows(self, rows: Any) -> RowPredictions:
    """Predicts raw rows (see :meth:`encode_rows`); bad rows are reported, never predicted."""
    x, kept, errs, n = self.encode_rows(rows)
    return self._predictions(x, kept, errs, n)

  def predict_csv_blocks(self, path: str, block_rows: int = 1 << 16):
    """Yields :class:`RowPredictions` for consecutive blocks of a CSV file's rows."""
    for block in _csv_blocks(self._need_spec(), os.fspath(path), block_rows):
      yield self._predictions(*self._screen(block, csv=True))

  def csv_header(self, path: str) -> str:
    """The first line of a CSV file, checked as :meth:`predict_csv_blocks` checks it.

    Raises:
      RowInputError: an empty file, or a header lacking a column the model needs.
    """
    from fastdp_jax.data import cleaning  # local: only raw rows need it
    with cleaning.open_csv(os.fspath(path)) as f:
      header_line = _read_csv_header(f)
    self.csv_cleaner(path, header_line)
    return header_line

  def csv_cleaner(self, path: str, header_line: str):
    """The line cleaner of a CSV file whose first line is ``header_line`` (see
    :meth:`csv_header`); ``path`` names the file in errors."""
    return _csv_cleaner(self._need_spec(), os.fspath(path), header_line)

  def predict_csv_lines(self, cleaner, lines: Sequence[str], row: int) -> RowPredictions:
    """Predicts consecutive data lines of a CSV file (without line terminators), the first
    being data row ``row``: a block of :meth:`predict_csv_blocks`, by the same code."""
    return self._predictions(*self._screen(
        _encode_csv_lines(self._need_spec(), cleaner, lines, row), csv=True))

  def _predictions(self, x, kept, errs, n) -> RowPredictions:
    k = len(self.classes) if self.task == "multiclass" else 0
    outputs = (self(x) if len(x) else np.zeros((0, k) if k else (0,), np.float32))
    return RowPredictions(rows=np.asarray(kept, np.int64), outputs=outputs,
                          predictions=self._decide(outputs), errors=errs, num_rows=n)

  def _value_errors(self, x: np.ndarray, positions: np.ndarray,
                    lines: np.ndarray | None = None) -> list[RowError]:
    """A :class:`RowError` per row of ``x`` with a value no output can be trusted for."""
    return _value_errors(x, positions, lines, names=self.feature_names,
                         bounds=self.feature_bounds,
                         embeddings=[(e["index"], e["vocab_size"])
                                     for e in self.model.get("embeddings") or ()])

  def _screen(self, encoded, csv: bool):
    """Moves the encoded rows that :meth:`check_features` refuses to the errors.

    The raw rows' cleaning refuses what would encode to such values, so this finds nothing
    unless the encoder and the model disagree; then those rows are bad rows too, not
    predictions.
    """
    x, kept, errs, n = encoded
    kept = np.asarray(kept, np.int64)
    found = self._value_errors(x, kept, kept + 2 if csv else None)
    if not found:
      return x, kept, errs, n
    good = ~np.isin(kept, [e.row for e in found])
    return x[good], kept[good], sorted(errs + found, key=lambda e: e.row), n

  def _need_spec(self):
    if self.feature_spec is None:
      raise RowInputError(f"this model has no feature spec (its data had none), so it takes "
                          f"encoded features only: a [n, {len(self.feature_names)}] array in "
                          f"the order {list(self.feature_names)[:8]}...")
    return self.feature_spec

  @staticmethod
  def _raise_on_errors(encoded):
    x, _, errs, _ = encoded
    if errs:
      raise RowInputError(_summary(errs, "predict_rows reports every row"), errs)
    return x, encoded[1]


def _summary(errs: Sequence[RowError], more: str) -> str:
  """One line naming the first bad rows and their reasons."""
  shown = "; ".join(f"row {e.row}: {e.detail}" for e in errs[:5])
  return (f"{len(errs)} row(s) cannot be predicted: {shown}" + ("; ..." if len(errs) > 5 else "")
          + f" ({more})")


def _value_errors(x: np.ndarray, positions: np.ndarray, lines: np.ndarray | None, *,
                  names: Sequence[str], bounds: Sequence[tuple[float, float]] | None,
                  embeddings: Sequence[tuple[int, int]]) -> list[RowError]:
  """A :class:`RowError` for each row of encoded features ``x`` that must not be predicted.

  The loader's rule (:func:`fastdp_jax.data.manifest.check_values`) per row: finite, inside
  the bounds (compared in float32, the bounds rounded to float32), embedding ids integers of
  the vocabulary; the first bad column of a row names it.
  """
  x = np.asarray(x, np.float32)
  nonfinite = ~np.isfinite(x)
  outside = np.zeros_like(nonfinite)
  if bounds is not None and x.size:
    b = np.asarray(bounds, np.float64).astype(np.float32)
    outside |= (x < b[:, 0]) | (x > b[:, 1])
  for j, vocab in embeddings:
    col = x[:, j]
    outside[:, j] |= (col != np.round(col)) | (col < 0) | (col > vocab - 1)
  bad = nonfinite | outside
  out = []
  for i in np.flatnonzero(bad.any(axis=1)).tolist():
    j = int(np.argmax(bad[i]))
    value = _value_text(float(x[i, j]))
    if nonfinite[i, j]:
      reason, detail = "non_finite", f"column {names[j]!r}: {value} is not a finite number"
    else:
      reason, detail = "out_of_bounds", f"column {names[j]!r}: {value} is outside " + (
          _domain(j, bounds, embeddings))
    out.append(RowError(row=int(positions[i]), column=names[j], reason=reason, detail=detail,
                        line=None if lines is None else int(lines[i])))
  return out


def _value_text(v: float) -> str:
  """A value as an error shows it (``nan``, ``inf``, ``0.25``, ``1e+30``)."""
  return repr(v) if not v.is_integer() or abs(v) >= 1e15 else str(int(v))


def _domain(j: int, bounds: Sequence[tuple[float, float]] | None,
            embeddings: Sequence[tuple[int, int]]) -> str:
  vocab = dict(embeddings).get(j)
  if vocab is not None:
    return f"the embedding's integer ids 0..{vocab - 1}"
  lo, hi = bounds[j]  # type: ignore[index]
  return f"the model's feature bounds [{lo:g}, {hi:g}]"


def _is_row_list(rows: Any) -> bool:
  return (isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and len(rows) > 0
          and all(isinstance(r, Mapping) for r in rows))


def _as_columns(rows: Any, spec) -> dict[str, Any]:
  """Raw rows as {column: [n] values}; a missing column is a :class:`RowInputError`."""
  needed = spec.used_columns[:-1]
  if type(rows).__module__.startswith("pandas") and hasattr(rows, "columns"):
    have = [str(c) for c in rows.columns]
    columns = {str(c): rows[c].to_numpy() for c in rows.columns if str(c) in needed}
  elif isinstance(rows, Mapping):
    have = [str(c) for c in rows]
    columns = {c: rows[c] for c in needed if c in rows}
  elif _is_row_list(rows):
    have = sorted({str(c) for r in rows for c in r})
    columns = {c: np.array([r.get(c) for r in rows], dtype=object) for c in needed
               if c in have}
  else:
    raise RowInputError(f"raw rows of type {type(rows).__name__}: expected a list of dicts, "
                        "a mapping column -> values, a pandas DataFrame or a CSV path")
  try:
    spec.column_indices(have, with_label=False)
  except errors.UserError as e:
    raise RowInputError(f"the input cannot be predicted: {e}") from e
  return columns


def _errors_of(spec, result, positions: np.ndarray, lines: np.ndarray | None) -> list[RowError]:
  """A :class:`RowError` per rejected or NA row of a cleaning result, by row."""
  names = spec.used_columns[:-1]
  out = []
  for i, reason, detail in result.rejects:
    out.append(RowError(row=int(positions[i]), column=result.reject_columns.get(i, ""),
                        reason=reason, detail=detail,
                        line=None if lines is None else int(lines[i])))
  for i, cells in zip(result.dropped_na.tolist(), result.na_cells):
    cols = [names[j] for j in np.flatnonzero(cells)]
    out.append(RowError(row=int(positions[i]), column=cols[0], reason="missing",
                        detail=f"column(s) {cols}: no value (absent, None, NaN or an NA token)",
                        line=None if lines is None else int(lines[i])))
  return sorted(out, key=lambda e: e.row)


def _encode_columns(spec, columns: Mapping[str, Any]):
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  try:
    result = cleaning.clean_columns(spec, columns, with_label=False)
  except errors.UserError as e:
    raise RowInputError(f"the input cannot be predicted: {e}") from e
  n = len(next(iter(columns.values()))) if columns else 0
  positions = np.arange(n, dtype=np.int64)
  x = spec.encode_features(result.values).astype(np.float32)
  return x, result.kept, _errors_of(spec, result, positions, None), n


def _read_csv_header(f) -> str:
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  return f.readline(cleaning.MAX_HEADER_BYTES + 1)  # one more: a longer header is refused


def _csv_cleaner(spec, path: str, header_line: str):
  """The line cleaner of a CSV file's first line ('': an empty file), checked against ``spec``."""
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  if not header_line:
    raise RowInputError(f"{path}: empty file (expected a header naming the columns "
                        f"{list(spec.used_columns[:-1])})")
  try:
    return cleaning.LineCleaner(spec, cleaning.parse_header(header_line.rstrip("\n")),
                                with_label=False)
  except errors.UserError as e:
    raise RowInputError(f"{path}: the first line is taken as the header: {e}") from e


def _encode_csv_lines(spec, cleaner, lines: Sequence[str], row: int):
  """``(features, positions, errors, rows)`` of consecutive data lines from data row ``row`` on.

  The one encoder of CSV lines: the local blocks and the Spark path's blocks both call it, so
  their encodings, error reasons and row and line numbers are the same by construction.
  """
  result = cleaner.clean(lines)
  positions = np.arange(row, row + len(lines), dtype=np.int64)
  x = spec.encode_features(result.values).astype(np.float32)
  # A data row's line: after the header, one row per line.
  return x, positions[result.kept], _errors_of(spec, result, positions, positions + 2), len(lines)


def _csv_blocks(spec, path: str, block_rows: int = 1 << 16):
  """``(features, positions, errors, rows)`` per block of a CSV file's data lines."""
  from fastdp_jax.data import cleaning  # local: only raw rows need it
  with cleaning.open_csv(path) as f:
    cleaner = _csv_cleaner(spec, path, _read_csv_header(f))
    row = 0
    while True:
      lines = [line.rstrip("\n") for _, line in zip(range(block_rows), f)]
      if not lines:
        return
      yield _encode_csv_lines(spec, cleaner, lines, row)
      row += len(lines)


def load_model(path: str, *, key: bytes | str | None = None, expected_digest: str | None = None,
               check_epsilon: bool = True) -> Predictor:
  """Loads an exported model (``WORKDIR/model`` or the workdir that holds it), checked first.

  Args:
    path: the model directory, or a workdir holding ``model/``.
    key: the secret key the model was signed with: the signature must exist and match.
    expected_digest: the model digest (:attr:`Predictor.digest`) the files must have.
    check_epsilon: recompute epsilon from the stated sigma, q and steps (a fraction of a
      second; skipped for runs whose ledger composed several segments).

  Raises:
    FileNotFoundError: no export at ``path``.
    fastdp_jax.export.model_dir.ModelIntegrityError: a missing, extra, corrupt or edited file,
      a bad signature or digest, or a ``model.json`` that is inconsistent with itself or with
      ``params.npz``; nothing large is allocated before the architecture has been checked
      against the file.
  """
  checked = model_dir.read_checked(path, key=key, expected_digest=expected_digest,
                                   check_epsilon=check_epsilon)
  spec, model, loaded = checked.spec, checked.model, checked.params
  arch = spec["architecture"]
  import jax  # local: only loading needs JAX
  from fastdp_jax import models
  emb = tuple(models.EmbeddingInput(index=e["index"], vocab_size=e["vocab_size"],
                                    dim=e["dim"]) for e in model["embeddings"])
  outputs = len(model["classes"]) if model["task"] == "multiclass" else 1
  net = models.create_model(arch["num_features"], arch["hidden_sizes"], seed=0,
                            num_outputs=outputs, embeddings=emb)
  apply_fn, template = models.functional(net)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves_with_paths]
  params = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(loaded[n]) for n in names])
  feature_spec, bounds = None, None
  if spec.get("feature_spec") is not None:
    from fastdp_jax.data import features as features_lib  # local: only specs need it
    feature_spec = features_lib.spec_from_dict(
        spec["feature_spec"], source=os.path.join(checked.path, layout.SPEC_FILE))
    bounds = feature_spec.feature_bounds
  return Predictor(feature_names=tuple(f["name"] for f in spec["features"]),
                   label_name=spec["label"]["name"], threshold=float(spec["threshold"]),
                   digest=checked.digest, signed=checked.signed, spec=spec,
                   _apply=jax.jit(apply_fn), _params=params, model=model,
                   feature_spec=feature_spec, _flat=loaded, feature_bounds=bounds)

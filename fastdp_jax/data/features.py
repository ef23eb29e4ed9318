"""Feature specs: which input columns become which model features, with public bounds only.

A feature spec is a Python config file whose ``get_config()`` returns an
``ml_collections.ConfigDict`` (see ``fastdp_jax/data/specs/capums.py``, ``pums_raw.py``,
``pums_educ.py`` and ``pums_income.py``)::

  config.name = 'capums'
  config.description = 'CaPUMS5full.csv: ...'       # optional public text; the model card
                                                     # names the data with it
  config.input_columns = ('sex', ..., 'targetted')  # the usual header (documentation, and the
                                                     # streaming mapper's default); () = any
  config.features = ('sex', 'married', ...)         # feature columns, in output order
  config.columns.sex = dict(kind='binary')           # one entry per feature column
  config.columns.educ = dict(kind='categorical', categories=tuple(range(1, 17)))
  config.columns.age = dict(kind='numeric', bounds=(16, 95), domain=(0, 130))
  config.columns.puma = dict(kind='embedding', range=(100, 199), unknown='reject')
  config.label = 'employed'                          # the label column
  config.task = dict(kind='binary')                  # optional; binary by default
  config.na_tokens = ('NA', '')                      # cells that mean "missing"
  config.privacy_unit = 'SERIALNO'                   # optional: a unit's id column(s), and
  config.max_rows_per_unit = 8                       # its public bound k (fastdp_jax.data.units)

Columns are found by name: the header may hold them in any order, and columns the spec does
not use are ignored (the manifest lists them). A used column that the header lacks is refused.

Column kinds and what they become:

* ``binary``: the value must be 0 or 1; one feature.
* ``categorical``: the value must be one of the public ``categories``; one-hot, one feature per
  category, named ``column=value``.
* ``numeric``: any finite number inside the optional hard ``domain`` (outside it the row is
  malformed); clipped to the public ``bounds``, optionally ``log1p``-transformed, and scaled
  to [0, 1]. With public cut points ``bins=(c1, ..., cm)`` and ``encoding='onehot'`` or
  ``'pwl'``, the clipped value becomes m + 1 features over the intervals of
  ``(lo, c1, ..., cm, hi)`` instead: indicators, or piecewise-linear ramps
  (:mod:`fastdp_jax.data.bins`).
* ``embedding``: an integer code from a PUBLIC vocabulary, either ``codes`` (a list) or
  ``range=(lo, hi)`` (every integer from lo to hi), encoded as its id 0..V-1 in ONE feature
  column (exact in float32) that the model looks up in an embedding table. A code outside the
  vocabulary rejects the row (``unknown='reject'``, the default) or, with
  ``unknown='extra_id'``, becomes the extra id V (so V + 1 ids); such rows are counted.

Label kinds (``config.task``):

* ``binary`` (default): the label must be 0 or 1.
* ``multiclass``: ``classes=(('name', (code, ...)), ...)`` maps the label's public codes to
  K >= 2 classes (buckets); the label is the class index 0..K-1. A code in no class rejects
  the row (``out_of_domain``).
* ``regression``: ``bounds=(lo, hi)`` public bounds of the raw label, ``transform``
  (``'identity'`` or ``'log1p'``), optional hard ``domain``, and ``out_of_bounds``: ``'clip'``
  (clipped to the bounds and counted) or ``'reject'`` (the row is rejected as
  ``out_of_bounds``). The label is ``transform(clip(value))`` as float32, inside the task's
  bounds ``(transform(lo), transform(hi))``.

Categories, embedding codes, a binary column's ``values=("no", "yes")``, a binary label's
``positive="yes"`` (and optional ``negative=(...)``) and multiclass codes may be strings,
matched exactly after trimming (:mod:`fastdp_jax.data.spec_values`). A spec file may import
helpers beside it; any error in it is one line ``FILE:LINE: ...``
(:mod:`fastdp_jax.data.spec_source`).

Bounds, categories, vocabularies and domains are part of the spec, written down before looking
at the data. Nothing is computed from the data (no min/max/mean/vocabulary): such statistics
of the private data would leak through the features without being accounted for by DP-SGD.
The one exception is accounted: ``config.private_estimates`` (``fastdp-spec init --epsilon``,
:mod:`fastdp_jax.data.spec_init`) states the (epsilon, delta) of DP estimates of the values,
which every model trained with the spec adds to its own.

:class:`FeatureSpec` is the validated, typed form; :meth:`FeatureSpec.encode` turns cleaned
values into the ``[n, d]`` feature matrix and the labels every producer writes, and
:meth:`FeatureSpec.to_dict` / :func:`spec_from_dict` carry the spec into an exported model,
whose predictor encodes raw rows with this same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax.data import bins as bins_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import spec_source
from fastdp_jax.data import spec_values
from fastdp_jax.data.spec_values import format_number, parse_number

KINDS = ("binary", "categorical", "numeric", "embedding")
TASK_KINDS = spec_values.TASK_KINDS
TRANSFORMS = spec_values.TRANSFORMS
UNKNOWN = ("reject", "extra_id")
OUT_OF_BOUNDS = spec_values.OUT_OF_BOUNDS
_TOP_KEYS = {"name", "input_columns", "features", "columns", "label", "task", "na_tokens",
             "description", "private_estimates", "privacy_unit", "max_rows_per_unit"}
_COLUMN_KEYS = {
    "binary": {"kind", "values"},
    "categorical": {"kind", "categories"},
    "numeric": {"kind", "bounds", "domain", "transform", "bins", "encoding"},
    "embedding": {"kind", "codes", "range", "unknown"},
}
_MAX_RANGE = manifest_lib.MAX_VOCAB  # ids stay exact in float32


SpecError = spec_source.SpecError
_as_tuple, _number_pair = spec_values.as_tuple, spec_values.number_pair
_kind_of, _transform_of = spec_values.kind_of, spec_values.transform_of


def _transform(name: str, v: np.ndarray | float) -> Any:
  return np.log1p(v) if name == "log1p" else v


def inverse_transform(name: str, v: np.ndarray | float) -> Any:
  """The inverse of a label ``transform``: values on the model's scale -> the label's units.

  ``expm1`` for ``'log1p'`` (computed in float64: expm1 is exact near 0, where ``exp(v) - 1``
  loses digits), the values unchanged for ``'identity'``. Nothing is clipped: a value the
  model puts beyond the transformed bounds maps beyond the raw bounds.
  """
  if name not in TRANSFORMS:
    raise SpecError(f"transform={name!r} must be one of {TRANSFORMS}")
  return np.expm1(np.asarray(v, np.float64)) if name == "log1p" else v


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColumnSpec:
  """How one input column is validated and encoded.

  Attributes:
    name: the input column's header name.
    kind: ``'binary'``, ``'categorical'``, ``'numeric'`` or ``'embedding'``.
    categories: public category values (categorical), or the vocabulary's codes (embedding
      with ``codes``).
    bounds: public ``(lo, hi)`` clipping bounds (numeric only).
    domain: optional hard ``(lo, hi)`` validity range (numeric only); values outside reject
      the row as malformed.
    transform: ``'identity'`` or ``'log1p'`` (numeric only), applied after clipping.
    vocab_range: ``(lo, hi)`` integer codes of an embedding's vocabulary given as a range.
    unknown: what an embedding code outside the vocabulary does: ``'reject'`` or
      ``'extra_id'``.
    tokens: a string column's ``(cell text, value)`` pairs (:mod:`spec_values`): the i-th
      string category or code has the value i (``categories`` is then ``(0, ..., K-1)``), a
      binary column's ``values=(no, yes)`` 0 and 1. Empty: the cells are numbers.
    other: the value of a string the column does not list (default: in no domain).
    cuts: numeric only: public interior cut points of ``encoding`` (:mod:`bins`).
    encoding: numeric only: ``'scaled'`` (one feature in [0, 1], the default), ``'onehot'``
      or ``'pwl'`` (``len(cuts) + 1`` features over the public bins).
  """

  name: str
  kind: str
  categories: tuple[float, ...] = ()
  bounds: tuple[float, float] | None = None
  domain: tuple[float, float] | None = None
  transform: str = "identity"
  vocab_range: tuple[int, int] | None = None
  unknown: str = "reject"
  tokens: tuple[tuple[str, float], ...] = ()
  other: float = spec_values.UNLISTED
  cuts: tuple[float, ...] = ()
  encoding: str = "scaled"

  @property
  def texts(self) -> tuple[str, ...]:
    """A string column's strings, in the spec's order (empty for a number column)."""
    return tuple(t for t, _ in self.tokens)

  def show(self, v: float) -> str:
    """A value as the cell that gave it: its string (string columns) or the number."""
    if not self.tokens:
      return format_number(v)
    return next((repr(t) for t, x in self.tokens if x == v), "an unlisted value")

  @property
  def width(self) -> int:
    if self.kind == "numeric" and self.encoding != "scaled":
      return len(self.cuts) + 1
    return len(self.categories) if self.kind == "categorical" else 1

  @property
  def feature_names(self) -> tuple[str, ...]:
    if self.kind == "categorical":
      return tuple(f"{self.name}={t}" for t in self.texts or map(format_number, self.categories))
    if self.kind == "numeric" and self.encoding != "scaled":
      assert self.bounds is not None
      return bins_lib.names(self.name, self.bounds, self.cuts, self.encoding)
    return (self.name,)

  @property
  def vocab_size(self) -> int:
    """Number of embedding ids (the vocabulary, plus one for ``unknown='extra_id'``)."""
    if self.vocab_range is not None:
      n = self.vocab_range[1] - self.vocab_range[0] + 1
    else:
      n = len(self.categories)
    return n + (self.unknown == "extra_id")

  def in_vocabulary(self, v: np.ndarray) -> np.ndarray:
    """[n] bool: which codes belong to the embedding's vocabulary."""
    if self.vocab_range is not None:
      lo, hi = self.vocab_range
      return (v >= lo) & (v <= hi) & (v == np.round(v))
    return np.isin(v, np.asarray(self.categories))

  def accepts(self, v: np.ndarray) -> np.ndarray:
    """[n] bool: which (non-missing) values are valid for the column (else out_of_domain)."""
    if self.kind == "binary":
      return (v == 0) | (v == 1)
    if self.kind == "categorical":
      return np.isin(v, np.asarray(self.categories))
    if self.kind == "embedding":
      return self.in_vocabulary(v) | (np.isfinite(v) & (self.unknown == "extra_id"))
    if self.domain is not None:
      return (v >= self.domain[0]) & (v <= self.domain[1])
    return np.isfinite(v)

  def domain_text(self) -> str:
    """The valid values, in words, for reject messages."""
    if self.kind == "binary" and not self.tokens:
      return "0 or 1"
    if self.kind in ("binary", "categorical", "embedding"):
      if self.vocab_range is not None:
        return (f"an integer code in [{self.vocab_range[0]}, {self.vocab_range[1]}] (the "
                "embedding's vocabulary)")
      cats = [repr(t) for t in self.texts] or [format_number(c) for c in self.categories]
      text = "one of " + spec_values.list_text(cats)
      return text + (" (the embedding's vocabulary)" if self.kind == "embedding" else "")
    if self.domain is None:
      return "a finite number"
    return f"a number in [{format_number(self.domain[0])}, {format_number(self.domain[1])}]"

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"name": self.name, "kind": self.kind}
    if self.kind == "binary" and self.tokens:
      d["values"] = list(self.texts)
    if self.kind == "categorical":
      d["categories"] = list(self.texts or self.categories)
    if self.kind == "numeric":
      d["bounds"] = list(self.bounds or ())
      d["domain"] = list(self.domain) if self.domain else None
      d["transform"] = self.transform
      if self.encoding != "scaled":  # a scaled column keeps the form (and digest) it had
        d.update(bins=list(self.cuts), encoding=self.encoding)
    if self.kind == "embedding":
      if self.vocab_range is not None:
        d["range"] = list(self.vocab_range)
      else:
        d["codes"] = list(self.texts or self.categories)
      d["unknown"] = self.unknown
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelSpec:
  """How the label column is validated and encoded, and the task it defines.

  Attributes:
    name: the label column's header name.
    kind: ``'binary'``, ``'multiclass'`` or ``'regression'``.
    classes: multiclass: ``(class name, codes)`` for each of the K classes.
    bounds: regression: public ``(lo, hi)`` of the raw label.
    transform: regression: ``'identity'`` or ``'log1p'``, applied after clipping.
    domain: regression: optional hard ``(lo, hi)``; values outside reject the row.
    out_of_bounds: regression: ``'clip'`` (clip and count) or ``'reject'``.
    positive: binary with string labels: the cell text of the positive class (label 1).
    negative: binary with ``positive``: the texts of the negative class (label 0); any other
      text is ``out_of_domain``. Empty: every other non-missing text is negative.
    class_texts: multiclass with string codes: the codes in the spec's order (the i-th has
      the value i in ``classes``).
  """

  name: str
  kind: str = "binary"
  classes: tuple[tuple[str, tuple[float, ...]], ...] = ()
  bounds: tuple[float, float] | None = None
  transform: str = "identity"
  domain: tuple[float, float] | None = None
  out_of_bounds: str = "clip"
  positive: str | None = None
  negative: tuple[str, ...] = ()
  class_texts: tuple[str, ...] = ()

  @property
  def column(self) -> ColumnSpec:
    """The label as a column for the shared validity check (codes, or the hard domain)."""
    if self.kind == "binary":
      if self.positive is None:
        return ColumnSpec(name=self.name, kind="binary")
      return ColumnSpec(name=self.name, kind="binary",
                        tokens=tuple((t, 0.0) for t in self.negative) + ((self.positive, 1.0),),
                        other=spec_values.UNLISTED if self.negative else 0.0)
    if self.kind == "multiclass":
      return ColumnSpec(name=self.name, kind="categorical",
                        categories=tuple(c for _, codes in self.classes for c in codes),
                        tokens=tuple((t, float(i)) for i, t in enumerate(self.class_texts)))
    return ColumnSpec(name=self.name, kind="numeric", bounds=self.bounds, domain=self.domain,
                      transform=self.transform)

  @property
  def task(self) -> manifest_lib.Task:
    """The manifest's task (classes by name; regression bounds on the transformed scale)."""
    if self.kind == "multiclass":
      return manifest_lib.Task("multiclass", classes=tuple(n for n, _ in self.classes))
    if self.kind == "regression":
      assert self.bounds is not None
      lo, hi = self.bounds
      return manifest_lib.Task("regression", bounds=(float(_transform(self.transform, lo)),
                                                     float(_transform(self.transform, hi))))
    return manifest_lib.BINARY

  def outside_bounds(self, v: np.ndarray) -> np.ndarray:
    """[n] bool: regression labels outside the public bounds (all False otherwise)."""
    if self.kind != "regression":
      return np.zeros(v.shape, bool)
    assert self.bounds is not None
    return (v < self.bounds[0]) | (v > self.bounds[1])

  def encode(self, v: np.ndarray) -> np.ndarray:
    """Validated raw labels [n] -> the shards' labels (uint8 / uint16 / float32)."""
    if self.kind == "binary":
      return v.astype(np.uint8)
    if self.kind == "multiclass":
      out = np.full(v.shape, -1, np.int64)
      for k, (_, codes) in enumerate(self.classes):
        out[np.isin(v, np.asarray(codes))] = k
      if (out < 0).any():
        raise ValueError(f"label {self.name!r}: a code in no class reached encode")
      return out.astype(np.uint8 if len(self.classes) <= 256 else np.uint16)
    assert self.bounds is not None
    lo, hi = self.bounds
    return np.asarray(_transform(self.transform, np.clip(v, lo, hi)), np.float32)

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": self.kind}
    if self.positive is not None:
      d["positive"] = self.positive
      if self.negative:
        d["negative"] = list(self.negative)
    if self.kind == "multiclass":
      d["classes"] = [[n, [self.class_texts[int(c)] if self.class_texts else c for c in codes]]
                      for n, codes in self.classes]
    if self.kind == "regression":
      d.update(bounds=list(self.bounds or ()), transform=self.transform,
               domain=list(self.domain) if self.domain else None,
               out_of_bounds=self.out_of_bounds)
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureSpec:
  """A validated feature spec.

  Attributes:
    name: short name, recorded in the manifest.
    input_columns: the usual header (documentation; the streaming mapper's default header
      for splits that do not start a file), or ``()``. Columns are matched by name.
    features: the feature columns, in output order.
    label: the label column's name.
    label_spec: the label's kind and encoding (binary when the spec declares no task).
    na_tokens: cell texts that mean "missing" (the row is dropped and counted).
    source: where the spec came from (a path), for the manifest.
    digest: sha256 of the spec's canonical JSON form.
    estimate_epsilon, estimate_delta, estimate_mechanism: the privacy spent on the spec's
      private estimates (``config.private_estimates``, written by ``fastdp-spec init
      --epsilon``; 0, 0, '' when every value is public). It composes into every model
      trained with the spec.
    privacy_unit, max_rows_per_unit: the raw column(s) naming a privacy unit and the public
      bound k on its rows (:mod:`fastdp_jax.data.units`); None, None: one row, one unit.
  """

  name: str
  input_columns: tuple[str, ...]
  features: tuple[ColumnSpec, ...]
  label: str
  na_tokens: tuple[str, ...] = ("NA", "")
  source: str = ""
  description: str = ""
  label_spec: LabelSpec | None = None
  estimate_epsilon: float = 0.0
  estimate_delta: float = 0.0
  estimate_mechanism: str = ""
  privacy_unit: tuple[str, ...] | None = None
  max_rows_per_unit: int | None = None

  @property
  def target(self) -> LabelSpec:
    """The label's spec (binary when none was declared)."""
    return self.label_spec or LabelSpec(name=self.label)

  @property
  def task(self) -> manifest_lib.Task:
    return self.target.task

  @property
  def embeddings(self) -> tuple[manifest_lib.Embedding, ...]:
    """The manifest's embedding columns (each one feature holding the id 0..V-1)."""
    return tuple(manifest_lib.Embedding(c.name, c.vocab_size) for c in self.features
                 if c.kind == "embedding")

  @property
  def used_columns(self) -> tuple[str, ...]:
    """The input columns that are read: the features, then the label."""
    return tuple(c.name for c in self.features) + (self.label,)

  @property
  def label_column(self) -> ColumnSpec:
    return self.target.column

  @property
  def used_specs(self) -> tuple[ColumnSpec, ...]:
    return self.features + (self.label_column,)

  def input_specs(self, with_label: bool = True) -> tuple[ColumnSpec, ...]:
    """The columns a producer (with the label) or a predictor (without it) reads."""
    return self.used_specs if with_label else self.features

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(n for c in self.features for n in c.feature_names)

  @property
  def num_features(self) -> int:
    return sum(c.width for c in self.features)

  @property
  def feature_bounds(self) -> tuple[tuple[float, float], ...]:
    """Public ``(lo, hi)`` of every encoded feature, for the manifest (from the spec alone).

    :meth:`encode` maps every feature into [0, 1] (binary values and one-hot indicators are 0
    or 1, and numeric columns are clipped to their public bounds and scaled to [0, 1]),
    except embedding ids, which lie in [0, V - 1].
    """
    out: list[tuple[float, float]] = []
    for c in self.features:
      out += [(0.0, float(c.vocab_size - 1)) if c.kind == "embedding" else (0.0, 1.0)] * c.width
    return tuple(out)

  @property
  def all_binary(self) -> bool:
    return all(c.kind == "binary" for c in self.features)

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"name": self.name, "input_columns": list(self.input_columns),
         "features": [c.to_dict() for c in self.features], "label": self.label,
         "na_tokens": list(self.na_tokens)}
    if self.target.to_dict() != {"kind": "binary"}:  # a 0/1 spec keeps its form and digest
      d["task"] = self.target.to_dict()
    if self.description:  # public text of the spec's author: the model card names the data
      d["description"] = self.description
    if self.estimate_epsilon:  # the privacy its values cost (specs without keep their digest)
      d["private_estimates"] = {"epsilon": self.estimate_epsilon, "delta": self.estimate_delta,
                                "mechanism": self.estimate_mechanism}
    if self.privacy_unit:  # row-level specs keep their form and digest
      d["privacy_unit"], d["max_rows_per_unit"] = list(self.privacy_unit), self.max_rows_per_unit
    return d

  @property
  def digest(self) -> str:
    return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

  def column_indices(self, header: Sequence[str], with_label: bool = True) -> tuple[int, ...]:
    """Positions of the used columns in a header, found by name in any order.

    Columns the spec does not use are ignored (:meth:`ignored_columns`).

    Args:
      header: the input's column names.
      with_label: also find the label (producers); a predictor reads the features only.

    Raises:
      SpecError: naming the used columns the header lacks, or names it repeats.
    """
    header = tuple(header)
    wanted = self.used_columns if with_label else self.used_columns[:-1]
    missing = [c for c in wanted if c not in header]
    if missing:
      unexpected = [c for c in header if c not in self.used_columns
                    and c not in self.input_columns]
      raise SpecError(
          f"header {_short(header)} does not match the columns of spec {self.name!r}: "
          f"missing {missing}" + (f"; unexpected {unexpected}" if unexpected else "")
          + f" (it uses {list(wanted)}, in any order; other columns are ignored)")
    dupes = sorted({c for c in header if header.count(c) > 1 and c in wanted})
    if dupes:
      raise SpecError(f"header {_short(header)} names the column(s) {dupes} more than once")
    return tuple(header.index(c) for c in wanted)

  def ignored_columns(self, header: Sequence[str]) -> list[str]:
    """The header's columns that the spec does not use (listed in the manifest)."""
    return [c for c in header if c not in self.used_columns]

  def encode_features(self, values: np.ndarray) -> np.ndarray:
    """Validated feature values [n, len(features)] -> the [n, num_features] matrix.

    Features are uint8 when every feature column is binary, float32 otherwise.
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    if values.ndim != 2 or values.shape[1] != len(self.features):
      raise ValueError(f"values {values.shape} is not [n, {len(self.features)}]")
    dtype = np.uint8 if self.all_binary else np.float32
    out = np.zeros((n, self.num_features), dtype)
    j = 0
    for i, c in enumerate(self.features):
      v = values[:, i]
      if c.kind == "binary":
        out[:, j] = v
      elif c.kind == "categorical":
        cats = np.asarray(c.categories, np.float64)
        order = np.argsort(cats)
        pos = order[np.searchsorted(cats[order], v)]
        out[np.arange(n), j + pos] = 1
      elif c.kind == "embedding":
        out[:, j] = embedding_ids(c, v)
      elif c.encoding != "scaled":
        assert c.bounds is not None
        out[:, j:j + c.width] = bins_lib.encode(v, c.bounds, c.cuts, c.encoding)
      else:
        lo, hi = c.bounds
        x = np.clip(v, lo, hi) - lo
        if c.transform == "log1p":
          out[:, j] = np.log1p(x) / math.log1p(hi - lo)
        else:
          out[:, j] = x / (hi - lo)
      j += c.width
    return out

  def encode(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turns cleaned values into features and labels.

    Args:
      values: [n, len(used_columns)] float64, already validated (no NaN, inside the domain).

    Returns:
      ``(features [n, num_features], labels [n])``; features are uint8 when every feature
      column is binary, float32 otherwise; labels as the task stores them (binary uint8,
      multiclass the class index, regression float32 transformed and clipped).
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] != len(self.used_columns):
      raise ValueError(f"values {values.shape} is not [n, {len(self.used_columns)}]")
    return self.encode_features(values[:, :-1]), self.target.encode(values[:, -1])

  def adjustments(self, values: np.ndarray) -> dict[str, int]:
    """What :meth:`encode` changes in validated rows, counted (for the manifest).

    Args:
      values: [n, len(used_columns)] validated values (features then label).

    Returns:
      ``{'clipped:COLUMN': n, 'unknown_id:COLUMN': n, 'label_clipped:LABEL': n}`` for the
      counts that are not zero: numeric features clipped to their bounds, embedding codes
      mapped to the extra id, regression labels clipped to their bounds.
    """
    values = np.asarray(values, np.float64)
    out: dict[str, int] = {}
    for i, c in enumerate(self.features):
      v = values[:, i]
      if c.kind == "numeric":
        assert c.bounds is not None
        n = int(((v < c.bounds[0]) | (v > c.bounds[1])).sum())
        key = f"clipped:{c.name}"
      elif c.kind == "embedding" and c.unknown == "extra_id":
        n, key = int((~c.in_vocabulary(v)).sum()), f"unknown_id:{c.name}"
      else:
        continue
      if n:
        out[key] = n
    if len(values):
      n = int(self.target.outside_bounds(values[:, -1]).sum())
      if n:
        out[f"label_clipped:{self.label}"] = n
    return out


def embedding_ids(col: ColumnSpec, v: np.ndarray) -> np.ndarray:
  """Codes [n] (validated) -> ids 0..V-1 of an embedding column (V - 1 = unknown, if any)."""
  v = np.asarray(v, np.float64)
  known = col.in_vocabulary(v)
  if col.vocab_range is not None:
    ids = np.where(known, v - col.vocab_range[0], 0.0)
  else:
    cats = np.asarray(col.categories, np.float64)
    order = np.argsort(cats)
    pos = np.searchsorted(cats[order], v)
    ids = np.where(known, order[np.minimum(pos, len(cats) - 1)], 0).astype(np.float64)
  return np.where(known, ids, float(col.vocab_size - 1))


def _short(header: Sequence[str], limit: int = 40) -> str:
  cols = list(header)
  return str(cols) if len(cols) <= limit else str(cols[:limit])[:-1] + f", ... ({len(cols)})]"


def _tokens(texts: Sequence[str]) -> tuple[tuple[str, float], ...]:
  return tuple((t, float(i)) for i, t in enumerate(texts))


def _column_from_config(name: str, cfg: Mapping[str, Any], na: Sequence[str]) -> ColumnSpec:
  cfg = dict(cfg)
  kind = _kind_of(cfg, f"columns.{name}", KINDS, _COLUMN_KEYS, "column")
  if kind == "binary":
    if cfg.get("values") is None:
      return ColumnSpec(name=name, kind=kind)
    _, texts = spec_values.codes(cfg["values"], f"columns.{name}.values", "values", na)
    if len(texts) != 2:
      raise SpecError(f"columns.{name}.values={cfg['values']!r} must be two strings "
                      "(the value read as 0, then the value read as 1)")
    return ColumnSpec(name=name, kind=kind, tokens=_tokens(texts))
  if kind == "categorical":
    cats, texts = spec_values.codes(cfg.get("categories", ()), f"columns.{name}.categories",
                                    "categories", na)
    return ColumnSpec(name=name, kind=kind, categories=cats, tokens=_tokens(texts))
  if kind == "embedding":
    return _embedding_from_config(name, cfg, na)
  if "bounds" not in cfg:
    raise SpecError(f"columns.{name}: a numeric column needs public bounds=(lo, hi)")
  bounds = _number_pair(cfg["bounds"], f"columns.{name}.bounds")
  domain = cfg.get("domain")
  domain = None if domain is None else _number_pair(domain, f"columns.{name}.domain")
  transform = _transform_of(cfg.get("transform", "identity"), f"columns.{name}.transform")
  encoding = cfg.get("encoding", "scaled" if cfg.get("bins") is None else "onehot")
  if encoding not in bins_lib.ENCODINGS:
    raise SpecError(f"columns.{name}.encoding={encoding!r} must be one of {bins_lib.ENCODINGS}")
  cuts: tuple[float, ...] = ()
  if encoding != "scaled":
    try:
      cuts = bins_lib.check_cuts(cfg.get("bins"), bounds, f"columns.{name}.bins")
    except ValueError as e:
      raise SpecError(str(e)) from None
  elif cfg.get("bins") is not None:
    raise SpecError(f"columns.{name}: bins= needs encoding='onehot' or 'pwl'")
  return ColumnSpec(name=name, kind=kind, bounds=bounds, domain=domain, transform=transform,
                    cuts=cuts, encoding=encoding)


def _embedding_from_config(name: str, cfg: Mapping[str, Any], na: Sequence[str]) -> ColumnSpec:
  unknown = cfg.get("unknown", "reject")
  if unknown not in UNKNOWN:
    raise SpecError(f"columns.{name}.unknown={unknown!r} must be one of {UNKNOWN}")
  has_codes, has_range = cfg.get("codes") is not None, cfg.get("range") is not None
  if has_codes == has_range:
    raise SpecError(f"columns.{name}: an embedding column needs its public vocabulary as "
                    "exactly one of codes=(...) or range=(lo, hi)")
  if has_codes:
    codes, texts = spec_values.codes(cfg["codes"], f"columns.{name}.codes", "codes", na)
    col = ColumnSpec(name=name, kind="embedding", categories=codes, unknown=unknown,
                     tokens=_tokens(texts))
  else:
    lo, hi = _number_pair(cfg["range"], f"columns.{name}.range")
    if not (lo.is_integer() and hi.is_integer()):
      raise SpecError(f"columns.{name}.range={cfg['range']!r} must be two integers")
    col = ColumnSpec(name=name, kind="embedding", vocab_range=(int(lo), int(hi)),
                     unknown=unknown)
  if col.vocab_size > _MAX_RANGE:
    raise SpecError(f"columns.{name}: a vocabulary of {col.vocab_size} ids is more than "
                    f"{_MAX_RANGE} (ids must be exact in float32)")
  return col


def spec_from_config(config: Any, source: str = "") -> FeatureSpec:
  """Validates a spec ConfigDict (or plain dict) and returns its typed form.

  Raises:
    SpecError: naming the offending key and value.
  """
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  todo = spec_source.find_todo(cfg)
  if todo:
    raise SpecError(f"{todo} is still a TODO placeholder: write a public value there (see the "
                    "file's comments), or rerun fastdp-spec init with --epsilon for private "
                    "estimates")
  unknown = set(cfg) - _TOP_KEYS
  if unknown:
    raise SpecError(f"spec {source or ''}: unknown key(s) {sorted(unknown)} (allowed: "
                    f"{sorted(_TOP_KEYS)})")
  for key in ("name", "features", "columns", "label"):
    if key not in cfg:
      raise SpecError(f"spec {source or ''}: missing key {key!r}")
  name = cfg["name"]
  if not isinstance(name, str) or not name:
    raise SpecError(f"name={name!r} must be a non-empty string")
  features = _as_tuple(cfg["features"], "features")
  if not features or not all(isinstance(f, str) and f for f in features):
    raise SpecError(f"features={features!r} must be a non-empty list of column names")
  if len(set(features)) != len(features):
    raise SpecError(f"features={features!r} names a column twice")
  columns = dict(cfg["columns"] or {})
  label = cfg["label"]
  if not isinstance(label, str) or not label:
    raise SpecError(f"label={label!r} must be a column name")
  if label in features:
    raise SpecError(f"label={label!r} must not also be a feature")
  for col in columns:
    if col not in features and col != label:
      raise SpecError(f"columns.{col} is described but is neither in features nor the label")
  if label in columns and dict(columns[label]) != {"kind": "binary"}:
    raise SpecError(f"columns.{label}: the label is described by task=..., not columns "
                    f"(got {dict(columns[label])})")
  missing = [f for f in features if f not in columns]
  if missing:
    raise SpecError(f"features {missing} have no entry under columns (give each a kind)")
  na_tokens = _na_tokens(cfg.get("na_tokens", ("NA", "")))
  specs = tuple(_column_from_config(f, columns[f], na_tokens) for f in features)
  label_spec = LabelSpec(name=label, **spec_values.label_fields(cfg.get("task"), na_tokens))
  eps, delta, mechanism = spec_values.private_estimates(cfg.get("private_estimates"))
  input_columns = _as_tuple(cfg.get("input_columns", ()) or (), "input_columns")
  if input_columns:
    absent = [c for c in features + (label,) if c not in input_columns]
    if absent:
      raise SpecError(f"input_columns lacks the used column(s) {absent}")
    if len(set(input_columns)) != len(input_columns):
      raise SpecError(f"input_columns={input_columns!r} names a column twice")
  return FeatureSpec(name=name, input_columns=tuple(str(c) for c in input_columns),
                     features=specs, label=label, na_tokens=na_tokens, source=source,
                     description=str(cfg.get("description", "")),
                     label_spec=None if label_spec == LabelSpec(name=label) else label_spec,
                     estimate_epsilon=eps, estimate_delta=delta, estimate_mechanism=mechanism,
                     **spec_source.unit_fields(cfg, input_columns))


def _na_tokens(value: Any) -> tuple[str, ...]:
  na_tokens = _as_tuple(value, "na_tokens")
  if not all(isinstance(t, str) for t in na_tokens):
    raise SpecError(f"na_tokens={na_tokens!r} must be strings")
  for t in na_tokens:
    if parse_number(t) is not None:
      raise SpecError(f"na_tokens: {t!r} is a number; it cannot also mean missing")
  return tuple(na_tokens)


def spec_from_dict(body: Mapping[str, Any], source: str = "") -> FeatureSpec:
  """The spec of its canonical form (:meth:`FeatureSpec.to_dict`, as manifests and exported
  models store it), validated as a spec file is.

  Raises:
    SpecError: the form is malformed.
  """
  if not isinstance(body, Mapping) or not isinstance(body.get("features"), list):
    raise SpecError(f"spec {source}: not a feature spec's canonical form")
  columns: dict[str, Any] = {}
  names = []
  for f in body["features"]:
    if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
      raise SpecError(f"spec {source}: feature {f!r} has no name")
    names.append(f["name"])
    columns[f["name"]] = {k: v for k, v in f.items() if k != "name"
                          and not (k == "domain" and v is None)}
  cfg = {"name": body.get("name"), "input_columns": body.get("input_columns", ()),
         "features": names, "columns": columns, "label": body.get("label"),
         "na_tokens": body.get("na_tokens", ("NA", ""))}
  if "task" in body:
    cfg["task"] = body["task"]
  for key in ("description", "private_estimates", "privacy_unit", "max_rows_per_unit"):
    if body.get(key):
      cfg[key] = body[key]
  return spec_from_config(cfg, source=source)


def builtin_specs() -> list[str]:
  """The names of the specs shipped in the package (``--spec NAME``)."""
  return sorted(n[:-3] for n in os.listdir(_CONFIG_DIR)
                if n.endswith(".py") and not n.startswith("_"))


def load_spec(path: str | os.PathLike) -> FeatureSpec:
  """Loads and validates a spec file (``my_spec.py``) or a built-in spec's name.

  Args:
    path: a ``.py`` file with ``get_config()``, or ``'capums'`` / ``'pums_raw'`` for the
      specs shipped in the package (``fastdp_jax/data/specs/``, found from any install).

  Raises:
    FileNotFoundError: if the file does not exist.
    SpecError: if the spec is malformed.
  """
  path = os.fspath(path)
  if not path.endswith(".py") and os.sep not in path:
    path = os.path.join(_CONFIG_DIR, f"{path}.py")
  if not os.path.isfile(path):
    builtin = builtin_specs()
    raise FileNotFoundError(f"feature spec {path} does not exist (built-in specs: {builtin})")
  config = spec_source.load_config(path)  # errors: one line, FILE:LINE: ...
  try:
    return spec_from_config(config, source=path)
  except SpecError as e:
    raise SpecError(f"{path}:{spec_source.line_of(path, str(e))}: {e}") from e


# The built-in specs: package data of preprocessing (fastdp_jax/data/specs/*.py).
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")

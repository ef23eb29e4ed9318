"""Feature specs: which input columns become which model features, with public bounds only.

A feature spec is a Python config file whose ``get_config()`` returns an
``ml_collections.ConfigDict`` (see ``fastdp_jax/data/specs/capums.py``, ``pums_raw.py``,
``pums_educ.py`` and ``pums_income.py``)::

  config.name = 'capums'
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

Columns are found by name: the header may hold them in any order, and columns the spec does
not use are ignored (the manifest lists them). A used column that the header lacks is refused.

Column kinds and what they become:

* ``binary``: the value must be 0 or 1; one feature.
* ``categorical``: the value must be one of the public ``categories``; one-hot, one feature per
  category, named ``column=value``.
* ``numeric``: any finite number inside the optional hard ``domain`` (outside it the row is
  malformed); clipped to the public ``bounds``, optionally ``log1p``-transformed, and scaled
  to [0, 1].
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

Bounds, categories, vocabularies and domains are part of the spec, written down before looking
at the data. Nothing is computed from the data (no min/max/mean/vocabulary): such statistics
of the private data would leak through the features without being accounted for by DP-SGD.

:class:`FeatureSpec` is the validated, typed form; :meth:`FeatureSpec.encode` turns cleaned
values into the ``[n, d]`` feature matrix and the labels every producer writes, and
:meth:`FeatureSpec.to_dict` / :func:`spec_from_dict` carry the spec into an exported model,
whose predictor encodes raw rows with this same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors

KINDS = ("binary", "categorical", "numeric", "embedding")
TASK_KINDS = ("binary", "multiclass", "regression")
TRANSFORMS = ("identity", "log1p")
UNKNOWN = ("reject", "extra_id")
OUT_OF_BOUNDS = ("clip", "reject")
_TOP_KEYS = {"name", "input_columns", "features", "columns", "label", "task", "na_tokens",
             "description"}
_COLUMN_KEYS = {
    "binary": {"kind"},
    "categorical": {"kind", "categories"},
    "numeric": {"kind", "bounds", "domain", "transform"},
    "embedding": {"kind", "codes", "range", "unknown"},
}
_TASK_KEYS = {
    "binary": {"kind"},
    "multiclass": {"kind", "classes"},
    "regression": {"kind", "bounds", "transform", "domain", "out_of_bounds"},
}
_MAX_RANGE = manifest_lib.MAX_VOCAB  # ids stay exact in float32


class SpecError(errors.UserError):
  """A feature spec is malformed; the message names the offending key and value."""


def _transform(name: str, v: np.ndarray | float) -> Any:
  return np.log1p(v) if name == "log1p" else v


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
  """

  name: str
  kind: str
  categories: tuple[float, ...] = ()
  bounds: tuple[float, float] | None = None
  domain: tuple[float, float] | None = None
  transform: str = "identity"
  vocab_range: tuple[int, int] | None = None
  unknown: str = "reject"

  @property
  def width(self) -> int:
    return len(self.categories) if self.kind == "categorical" else 1

  @property
  def feature_names(self) -> tuple[str, ...]:
    if self.kind == "categorical":
      return tuple(f"{self.name}={format_number(c)}" for c in self.categories)
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
    if self.kind == "binary":
      return "0 or 1"
    if self.kind in ("categorical", "embedding"):
      if self.vocab_range is not None:
        return (f"an integer code in [{self.vocab_range[0]}, {self.vocab_range[1]}] (the "
                "embedding's vocabulary)")
      cats = [format_number(c) for c in self.categories]
      text = "one of " + (",".join(cats) if len(cats) <= 20 else
                          ",".join(cats[:20]) + f",... ({len(cats)} values)")
      return text + (" (the embedding's vocabulary)" if self.kind == "embedding" else "")
    if self.domain is None:
      return "a finite number"
    return f"a number in [{format_number(self.domain[0])}, {format_number(self.domain[1])}]"

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"name": self.name, "kind": self.kind}
    if self.kind == "categorical":
      d["categories"] = list(self.categories)
    if self.kind == "numeric":
      d["bounds"] = list(self.bounds or ())
      d["domain"] = list(self.domain) if self.domain else None
      d["transform"] = self.transform
    if self.kind == "embedding":
      if self.vocab_range is not None:
        d["range"] = list(self.vocab_range)
      else:
        d["codes"] = list(self.categories)
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
  """

  name: str
  kind: str = "binary"
  classes: tuple[tuple[str, tuple[float, ...]], ...] = ()
  bounds: tuple[float, float] | None = None
  transform: str = "identity"
  domain: tuple[float, float] | None = None
  out_of_bounds: str = "clip"

  @property
  def column(self) -> ColumnSpec:
    """The label as a column for the shared validity check (codes, or the hard domain)."""
    if self.kind == "binary":
      return ColumnSpec(name=self.name, kind="binary")
    if self.kind == "multiclass":
      return ColumnSpec(name=self.name, kind="categorical",
                        categories=tuple(c for _, codes in self.classes for c in codes))
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
    if self.kind == "multiclass":
      d["classes"] = [[n, list(codes)] for n, codes in self.classes]
    if self.kind == "regression":
      d.update(bounds=list(self.bounds or ()), transform=self.transform,
               domain=list(self.domain) if self.domain else None,
               out_of_bounds=self.out_of_bounds)
    return d


def format_number(v: float) -> str:
  """Formats a number as the shortest text that reads back to it (``3`` not ``3.0``)."""
  v = float(v)
  return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


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
  """

  name: str
  input_columns: tuple[str, ...]
  features: tuple[ColumnSpec, ...]
  label: str
  na_tokens: tuple[str, ...] = ("NA", "")
  source: str = ""
  description: str = ""
  label_spec: LabelSpec | None = None

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
    if self.target.kind != "binary":  # a binary spec keeps the form (and digest) it had
      d["task"] = self.target.to_dict()
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


def _as_tuple(value: Any, what: str) -> tuple:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise SpecError(f"{what}={value!r} must be a list or tuple")
  return tuple(value)


def _number_pair(value: Any, what: str) -> tuple[float, float]:
  pair = _as_tuple(value, what)
  if len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) for v in pair):
    raise SpecError(f"{what}={value!r} must be two finite numbers (lo, hi)")
  lo, hi = float(pair[0]), float(pair[1])
  if not lo < hi:
    raise SpecError(f"{what}={value!r} needs lo < hi")
  return lo, hi


def _codes(value: Any, what: str, noun: str = "codes") -> tuple[float, ...]:
  codes = _as_tuple(value, what)
  if not codes:
    raise SpecError(f"{what} must list the public {noun}")
  if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
             for c in codes):
    raise SpecError(f"{what}={codes!r} must be finite numbers")
  if len(set(map(float, codes))) != len(codes):
    raise SpecError(f"{what}={codes!r} has duplicates")
  return tuple(float(c) for c in codes)


def _transform_of(value: Any, what: str) -> str:
  if value not in TRANSFORMS:
    raise SpecError(f"{what}={value!r} must be one of {TRANSFORMS}")
  return value


def _kind_of(cfg: Mapping[str, Any], where: str, kinds: Any, keys: Mapping[str, Any],
             noun: str) -> str:
  """``cfg['kind']``, refusing an unknown kind or a key that kind does not take."""
  kind = cfg.get("kind")
  if kind not in kinds:
    raise SpecError(f"{where}.kind={kind!r} must be one of {kinds}")
  unknown = set(cfg) - keys[kind]
  if unknown:
    raise SpecError(f"{where}: unknown key(s) {sorted(unknown)} for a {kind} {noun} "
                    f"(allowed: {sorted(keys[kind])})")
  return kind


def _column_from_config(name: str, cfg: Mapping[str, Any]) -> ColumnSpec:
  cfg = dict(cfg)
  kind = _kind_of(cfg, f"columns.{name}", KINDS, _COLUMN_KEYS, "column")
  if kind == "binary":
    return ColumnSpec(name=name, kind=kind)
  if kind == "categorical":
    return ColumnSpec(name=name, kind=kind,
                      categories=_codes(cfg.get("categories", ()), f"columns.{name}.categories",
                                        "categories"))
  if kind == "embedding":
    return _embedding_from_config(name, cfg)
  if "bounds" not in cfg:
    raise SpecError(f"columns.{name}: a numeric column needs public bounds=(lo, hi)")
  bounds = _number_pair(cfg["bounds"], f"columns.{name}.bounds")
  domain = cfg.get("domain")
  domain = None if domain is None else _number_pair(domain, f"columns.{name}.domain")
  transform = _transform_of(cfg.get("transform", "identity"), f"columns.{name}.transform")
  return ColumnSpec(name=name, kind=kind, bounds=bounds, domain=domain, transform=transform)


def _embedding_from_config(name: str, cfg: Mapping[str, Any]) -> ColumnSpec:
  unknown = cfg.get("unknown", "reject")
  if unknown not in UNKNOWN:
    raise SpecError(f"columns.{name}.unknown={unknown!r} must be one of {UNKNOWN}")
  has_codes, has_range = cfg.get("codes") is not None, cfg.get("range") is not None
  if has_codes == has_range:
    raise SpecError(f"columns.{name}: an embedding column needs its public vocabulary as "
                    "exactly one of codes=(...) or range=(lo, hi)")
  if has_codes:
    codes = _codes(cfg["codes"], f"columns.{name}.codes")
    col = ColumnSpec(name=name, kind="embedding", categories=codes, unknown=unknown)
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


def _label_from_config(label: str, cfg: Any) -> LabelSpec:
  cfg = dict(cfg or {"kind": "binary"})
  kind = _kind_of(cfg, "task", TASK_KINDS, _TASK_KEYS, "task")
  if kind == "binary":
    return LabelSpec(name=label)
  if kind == "multiclass":
    classes = _as_tuple(cfg.get("classes", ()), "task.classes")
    out: list[tuple[str, tuple[float, ...]]] = []
    seen: set[float] = set()
    for k, entry in enumerate(classes):
      pair = _as_tuple(entry, f"task.classes[{k}]")
      if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
        raise SpecError(f"task.classes[{k}]={entry!r} must be (class name, (code, ...))")
      codes = _codes(pair[1], f"task.classes[{k}] ({pair[0]!r}) codes")
      if seen & set(codes):
        raise SpecError(f"task.classes[{k}] ({pair[0]!r}): codes "
                        f"{sorted(seen & set(codes))} are already in another class")
      seen |= set(codes)
      out.append((pair[0], codes))
    if len(out) < 2 or len({n for n, _ in out}) != len(out):
      raise SpecError(f"task.classes must name 2 or more distinct classes, got "
                      f"{[n for n, _ in out]}")
    return LabelSpec(name=label, kind=kind, classes=tuple(out))
  if "bounds" not in cfg:
    raise SpecError("task: a regression task needs public bounds=(lo, hi) of the raw label")
  bounds = _number_pair(cfg["bounds"], "task.bounds")
  transform = _transform_of(cfg.get("transform", "identity"), "task.transform")
  if transform == "log1p" and bounds[0] <= -1:
    raise SpecError(f"task.bounds={cfg['bounds']!r}: log1p needs lo > -1")
  domain = cfg.get("domain")
  domain = None if domain is None else _number_pair(domain, "task.domain")
  policy = cfg.get("out_of_bounds")
  if policy not in OUT_OF_BOUNDS:
    raise SpecError(f"task.out_of_bounds={policy!r} must be declared: one of {OUT_OF_BOUNDS} "
                    "(clip and count, or reject the row)")
  return LabelSpec(name=label, kind=kind, bounds=bounds, transform=transform, domain=domain,
                   out_of_bounds=policy)


def spec_from_config(config: Any, source: str = "") -> FeatureSpec:
  """Validates a spec ConfigDict (or plain dict) and returns its typed form.

  Raises:
    SpecError: naming the offending key and value.
  """
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
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
  specs = tuple(_column_from_config(f, columns[f]) for f in features)
  label_spec = _label_from_config(label, cfg.get("task"))
  input_columns = _as_tuple(cfg.get("input_columns", ()) or (), "input_columns")
  if input_columns:
    absent = [c for c in features + (label,) if c not in input_columns]
    if absent:
      raise SpecError(f"input_columns lacks the used column(s) {absent}")
    if len(set(input_columns)) != len(input_columns):
      raise SpecError(f"input_columns={input_columns!r} names a column twice")
  na_tokens = _as_tuple(cfg.get("na_tokens", ("NA", "")), "na_tokens")
  if not all(isinstance(t, str) for t in na_tokens):
    raise SpecError(f"na_tokens={na_tokens!r} must be strings")
  for t in na_tokens:
    if _looks_numeric(t):
      raise SpecError(f"na_tokens: {t!r} is a number; it cannot also mean missing")
  return FeatureSpec(name=name, input_columns=tuple(str(c) for c in input_columns),
                     features=specs, label=label, na_tokens=tuple(na_tokens), source=source,
                     description=str(cfg.get("description", "")),
                     label_spec=None if label_spec.kind == "binary" else label_spec)


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
  return spec_from_config(cfg, source=source)


# The number grammar of every input cell (cleaning parses cells with it); here, below cleaning,
# so that the spec's own checks need no import of cleaning (no cycle).
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def parse_number(token: str) -> float | None:
  """The value of a decimal literal, or None (for ``nan``, ``inf``, ``1_0``, ``0x1``, ``''``)."""
  if not _NUMBER.match(token):
    return None
  v = float(token)
  return v if math.isfinite(v) else None


def _looks_numeric(token: str) -> bool:
  return parse_number(token) is not None


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
  module_name = "_fastdp_spec_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SpecError(f"{path}: defines no get_config()")
  return spec_from_config(module.get_config(), source=path)


# The built-in specs: package data of preprocessing (fastdp_jax/data/specs/*.py).
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")

"""Feature specs: which input columns become which model features, with public bounds only.

A feature spec is a Python config file whose ``get_config()`` returns an
``ml_collections.ConfigDict`` (see ``preprocessing/specs/capums.py`` and ``preprocessing/specs/pums_raw.py``)::

  config.name = 'capums'
  config.input_columns = ('sex', ..., 'targetted')  # the expected header, exactly; () = any
  config.features = ('sex', 'married', ...)         # feature columns, in output order
  config.columns.sex = dict(kind='binary')           # one entry per feature column
  config.columns.educ = dict(kind='categorical', categories=tuple(range(1, 17)))
  config.columns.age = dict(kind='numeric', bounds=(16, 95), domain=(0, 130))
  config.label = 'employed'                          # a 0/1 column
  config.na_tokens = ('NA', '')                      # cells that mean "missing"

Column kinds and what they become:

* ``binary``: the value must be 0 or 1; one feature.
* ``categorical``: the value must be one of the public ``categories``; one-hot, one feature per
  category, named ``column=value``.
* ``numeric``: any finite number inside the optional hard ``domain`` (outside it the row is
  malformed); clipped to the public ``bounds``, optionally ``log1p``-transformed, and scaled
  to [0, 1].

Bounds, categories and domains are part of the spec, written down before looking at the data.
Nothing is computed from the data (no min/max/mean/vocabulary): such statistics of the private
data would leak through the features without being accounted for by DP-SGD.

:class:`FeatureSpec` is the validated, typed form; :meth:`FeatureSpec.encode` turns cleaned
values into the ``[n, d]`` feature matrix every producer writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdp_jax import errors

KINDS = ("binary", "categorical", "numeric")
TRANSFORMS = ("identity", "log1p")
_TOP_KEYS = {"name", "input_columns", "features", "columns", "label", "na_tokens", "description"}
_COLUMN_KEYS = {
    "binary": {"kind"},
    "categorical": {"kind", "categories"},
    "numeric": {"kind", "bounds", "domain", "transform"},
}


class SpecError(errors.UserError):
  """A feature spec is malformed; the message names the offending key and value."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColumnSpec:
  """How one input column is validated and encoded.

  Attributes:
    name: the input column's header name.
    kind: ``'binary'``, ``'categorical'`` or ``'numeric'``.
    categories: public category values (categorical only).
    bounds: public ``(lo, hi)`` clipping bounds (numeric only).
    domain: optional hard ``(lo, hi)`` validity range (numeric only); values outside reject
      the row as malformed.
    transform: ``'identity'`` or ``'log1p'`` (numeric only), applied after clipping.
  """

  name: str
  kind: str
  categories: tuple[float, ...] = ()
  bounds: tuple[float, float] | None = None
  domain: tuple[float, float] | None = None
  transform: str = "identity"

  @property
  def width(self) -> int:
    return len(self.categories) if self.kind == "categorical" else 1

  @property
  def feature_names(self) -> tuple[str, ...]:
    if self.kind == "categorical":
      return tuple(f"{self.name}={format_number(c)}" for c in self.categories)
    return (self.name,)

  def domain_text(self) -> str:
    """The valid values, in words, for reject messages."""
    if self.kind == "binary":
      return "0 or 1"
    if self.kind == "categorical":
      cats = [format_number(c) for c in self.categories]
      return "one of " + (",".join(cats) if len(cats) <= 20 else
                          ",".join(cats[:20]) + f",... ({len(cats)} values)")
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
    input_columns: the expected header (exact, in order), or ``()`` to accept any header that
      contains the used columns.
    features: the feature columns, in output order.
    label: the 0/1 label column.
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

  @property
  def used_columns(self) -> tuple[str, ...]:
    """The input columns that are read: the features, then the label."""
    return tuple(c.name for c in self.features) + (self.label,)

  @property
  def label_column(self) -> ColumnSpec:
    return ColumnSpec(name=self.label, kind="binary")

  @property
  def used_specs(self) -> tuple[ColumnSpec, ...]:
    return self.features + (self.label_column,)

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(n for c in self.features for n in c.feature_names)

  @property
  def num_features(self) -> int:
    return sum(c.width for c in self.features)

  @property
  def feature_bounds(self) -> tuple[tuple[float, float], ...]:
    """Public ``(lo, hi)`` of every encoded feature, for the manifest (from the spec alone).

    :meth:`encode` maps every feature into [0, 1]: binary values and one-hot indicators are 0
    or 1, and numeric columns are clipped to their public bounds and scaled to [0, 1].
    """
    return ((0.0, 1.0),) * self.num_features

  @property
  def all_binary(self) -> bool:
    return all(c.kind == "binary" for c in self.features)

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "input_columns": list(self.input_columns),
            "features": [c.to_dict() for c in self.features], "label": self.label,
            "na_tokens": list(self.na_tokens)}

  @property
  def digest(self) -> str:
    import json  # pylint: disable=g-import-not-at-top
    return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

  def column_indices(self, header: Sequence[str]) -> tuple[int, ...]:
    """Positions of the used columns in a header; raises ``SpecError`` naming what is wrong."""
    header = tuple(header)
    if self.input_columns and header != self.input_columns:
      missing = [c for c in self.input_columns if c not in header]
      extra = [c for c in header if c not in self.input_columns]
      detail = []
      if missing:
        detail.append(f"missing {missing}")
      if extra:
        detail.append(f"unexpected {extra}")
      if not missing and not extra:
        detail.append("same names in a different order")
      raise SpecError(
          f"header {list(header)} does not match the columns of spec {self.name!r} "
          f"({'; '.join(detail)}); expected {list(self.input_columns)}")
    missing = [c for c in self.used_columns if c not in header]
    if missing:
      raise SpecError(f"header {list(header)} lacks the column(s) {missing} that spec "
                      f"{self.name!r} uses")
    dupes = sorted({c for c in header if header.count(c) > 1 and c in self.used_columns})
    if dupes:
      raise SpecError(f"header {list(header)} names the column(s) {dupes} more than once")
    return tuple(header.index(c) for c in self.used_columns)

  def encode(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turns cleaned values into features and labels.

    Args:
      values: [n, len(used_columns)] float64, already validated (no NaN, inside the domain).

    Returns:
      ``(features [n, num_features], labels [n] uint8)``; features are uint8 when every
      feature column is binary, float32 otherwise.
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    if values.ndim != 2 or values.shape[1] != len(self.used_columns):
      raise ValueError(f"values {values.shape} is not [n, {len(self.used_columns)}]")
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
      else:
        lo, hi = c.bounds
        x = np.clip(v, lo, hi) - lo
        if c.transform == "log1p":
          out[:, j] = np.log1p(x) / math.log1p(hi - lo)
        else:
          out[:, j] = x / (hi - lo)
      j += c.width
    return out, values[:, -1].astype(np.uint8)


def _as_tuple(value: Any, what: str) -> tuple:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise SpecError(f"{what}={value!r} must be a list or tuple")
  return tuple(value)


def _number_pair(value: Any, what: str) -> tuple[float, float]:
  pair = _as_tuple(value, what)
  if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
    raise SpecError(f"{what}={value!r} must be two finite numbers (lo, hi)")
  lo, hi = float(pair[0]), float(pair[1])
  if not lo < hi:
    raise SpecError(f"{what}={value!r} needs lo < hi")
  return lo, hi


def _column_from_config(name: str, cfg: Mapping[str, Any]) -> ColumnSpec:
  cfg = dict(cfg)
  kind = cfg.get("kind")
  if kind not in KINDS:
    raise SpecError(f"columns.{name}.kind={kind!r} must be one of {KINDS}")
  unknown = set(cfg) - _COLUMN_KEYS[kind]
  if unknown:
    raise SpecError(f"columns.{name}: unknown key(s) {sorted(unknown)} for a {kind} column "
                    f"(allowed: {sorted(_COLUMN_KEYS[kind])})")
  if kind == "binary":
    return ColumnSpec(name=name, kind=kind)
  if kind == "categorical":
    cats = _as_tuple(cfg.get("categories", ()), f"columns.{name}.categories")
    if not cats:
      raise SpecError(f"columns.{name}.categories must list the public categories")
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
               for c in cats):
      raise SpecError(f"columns.{name}.categories={cats!r} must be finite numbers")
    if len(set(map(float, cats))) != len(cats):
      raise SpecError(f"columns.{name}.categories={cats!r} has duplicates")
    return ColumnSpec(name=name, kind=kind, categories=tuple(float(c) for c in cats))
  if "bounds" not in cfg:
    raise SpecError(f"columns.{name}: a numeric column needs public bounds=(lo, hi)")
  bounds = _number_pair(cfg["bounds"], f"columns.{name}.bounds")
  domain = cfg.get("domain")
  domain = None if domain is None else _number_pair(domain, f"columns.{name}.domain")
  transform = cfg.get("transform", "identity")
  if transform not in TRANSFORMS:
    raise SpecError(f"columns.{name}.transform={transform!r} must be one of {TRANSFORMS}")
  return ColumnSpec(name=name, kind=kind, bounds=bounds, domain=domain, transform=transform)


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
    raise SpecError(f"columns.{label}: the label must be a binary column, got "
                    f"{dict(columns[label])}")
  missing = [f for f in features if f not in columns]
  if missing:
    raise SpecError(f"features {missing} have no entry under columns (give each a kind)")
  specs = tuple(_column_from_config(f, columns[f]) for f in features)
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
                     description=str(cfg.get("description", "")))


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
      specs shipped in the package (``preprocessing/specs/``, found from any install).

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


# The built-in specs: package data of preprocessing (preprocessing/specs/*.py).
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")

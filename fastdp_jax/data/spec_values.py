"""The values a feature spec declares: numbers, pairs, strings and their token maps; the task.

The label's entry (``config.task``) is parsed here into the fields of
:class:`fastdp_jax.data.features.LabelSpec` (:func:`label_fields`).

A column's public values are either all numbers (``categories=(1, 2, 3)``) or all strings
(``categories=("northeast", "south")``); a spec that mixes them in one list is refused. A
string value matches a cell exactly after :func:`normalize_token` (surrounding spaces and one
pair of double quotes removed, nothing else: no case folding), so the declared strings must
themselves be trimmed, and none may be one of the spec's ``na_tokens``.

A string column is encoded through numbers, so that everything after the token stage (the
domain checks, the one-hot and embedding encodings, the shards) is the same code for both:
the i-th declared string becomes the value ``i`` (a binary column's ``values=(no, yes)``: 0
and 1; a binary label's ``positive``: 1, its ``negative`` values: 0). A string the column does
not list becomes :data:`UNLISTED`, which no domain contains, so it follows the column's rule
for an unknown value (``out_of_domain``, or an embedding's extra id with
``unknown='extra_id'``); a binary label that names only its ``positive`` value maps every
other (non-missing) string to 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastdp_jax.data import spec_source

SpecError = spec_source.SpecError

TASK_KINDS = ("binary", "multiclass", "regression")
TRANSFORMS = ("identity", "log1p")
OUT_OF_BOUNDS = ("clip", "reject")
_TASK_KEYS = {
    "binary": {"kind", "positive", "negative"},
    "multiclass": {"kind", "classes"},
    "regression": {"kind", "bounds", "transform", "domain", "out_of_bounds"},
}

# The value of a string that a string column does not list: in no column's domain.
UNLISTED = -1.0
_TOKEN_CACHE_LIMIT = 1 << 16
# The number grammar of every input cell (cleaning parses cells with it); here, below cleaning,
# so that the spec's own checks need no import of cleaning (no cycle).
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def parse_number(token: str) -> float | None:
  """The value of a decimal literal, or None (for ``nan``, ``inf``, ``1_0``, ``0x1``, ``''``)."""
  if not _NUMBER.match(token):
    return None
  v = float(token)
  return v if math.isfinite(v) else None


def format_number(v: float) -> str:
  """Formats a number as the shortest text that reads back to it (``3`` not ``3.0``)."""
  v = float(v)
  return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def normalize_token(token: str) -> str:
  """Strips surrounding whitespace and one pair of surrounding double quotes."""
  token = token.strip()
  if len(token) >= 2 and token[0] == '"' and token[-1] == '"':
    token = token[1:-1].strip()
  return token


def as_tuple(value: Any, what: str) -> tuple:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise SpecError(f"{what}={value!r} must be a list or tuple")
  return tuple(value)


def number_pair(value: Any, what: str) -> tuple[float, float]:
  pair = as_tuple(value, what)
  if len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) for v in pair):
    raise SpecError(f"{what}={value!r} must be two finite numbers (lo, hi)")
  lo, hi = float(pair[0]), float(pair[1])
  if not lo < hi:
    raise SpecError(f"{what}={value!r} needs lo < hi")
  return lo, hi


def _is_number(c: Any) -> bool:
  return isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)


def check_text(value: Any, what: str, na_tokens: Sequence[str] = ()) -> str:
  """A declared string value: non-empty, trimmed, and not a missing-value token."""
  if not isinstance(value, str) or not value:
    raise SpecError(f"{what}={value!r} must be a non-empty string")
  if normalize_token(value) != value:
    raise SpecError(f"{what}={value!r}: cells are matched after trimming spaces and quotes, "
                    f"so write it trimmed ({normalize_token(value)!r})")
  if value in na_tokens:
    raise SpecError(f"{what}={value!r} is also one of na_tokens {tuple(na_tokens)!r}")
  return value


def codes(value: Any, what: str, noun: str = "codes", na_tokens: Sequence[str] = ()
          ) -> tuple[tuple[float, ...], tuple[str, ...]]:
  """A list of public values: ``(numbers, ())``, or for strings ``((0, 1, ...), strings)``.

  Raises:
    SpecError: empty, mixed numbers and strings, duplicates, or a bad string.
  """
  items = as_tuple(value, what)
  if not items:
    raise SpecError(f"{what} must list the public {noun}")
  if all(isinstance(c, str) for c in items):
    texts = tuple(check_text(c, f"{what}[{i}]", na_tokens) for i, c in enumerate(items))
    if len(set(texts)) != len(texts):
      raise SpecError(f"{what}={items!r} has duplicates")
    return tuple(float(i) for i in range(len(texts))), texts
  if not all(_is_number(c) for c in items):
    raise SpecError(f"{what}={items!r} must be all finite numbers or all strings")
  if len(set(map(float, items))) != len(items):
    raise SpecError(f"{what}={items!r} has duplicates")
  return tuple(float(c) for c in items), ()


def text_list(value: Any, what: str, na_tokens: Sequence[str]) -> tuple[str, ...]:
  """One string or a list of strings (a binary label's ``negative``), checked."""
  items = (value,) if isinstance(value, str) else as_tuple(value, what)
  return tuple(check_text(v, f"{what}", na_tokens) for v in items)


def show_value(texts: Sequence[str], v: float) -> str:
  """A column's value as its cell text: the string of a string column, else the number."""
  if texts:
    i = int(v) if float(v).is_integer() else -1
    return repr(texts[i]) if 0 <= i < len(texts) else "a value it does not list"
  return format_number(v)


def list_text(items: Sequence[str], limit: int = 20) -> str:
  """``a,b,c`` or the first ``limit`` and the count."""
  items = list(items)
  return (",".join(items) if len(items) <= limit else
          ",".join(items[:limit]) + f",... ({len(items)} values)")


class TokenMap(dict):
  """cell text -> value of a string column (for the cleaners); never raises.

  A miss normalizes the cell (spaces, quotes): a missing-value token gives NaN, a listed
  string its value, anything else ``other``. Misses are cached (a bounded number).
  """

  def __init__(self, token_values: Sequence[tuple[str, float]], other: float,
               na_tokens: Sequence[str]):
    super().__init__(token_values)
    self._known = dict(token_values)
    self._other = other
    self._na = frozenset(na_tokens)
    for t in na_tokens:
      self[t] = math.nan

  def value(self, token: str) -> float:
    """The value of an already normalized token."""
    if token in self._na:
      return math.nan
    return self._known.get(token, self._other)

  def __missing__(self, cell: str) -> float:
    v = self.value(normalize_token(cell))
    if len(self) < _TOKEN_CACHE_LIMIT:
      self[cell] = v
    return v


def private_estimates(value: Any) -> tuple[float, float, str]:
  """``(epsilon, delta, mechanism)`` of a spec's ``private_estimates`` (0, 0, '' if absent).

  Raises:
    SpecError: epsilon not a positive finite number, delta not in [0, 1), no mechanism, or
      another key.
  """
  if not value:
    return 0.0, 0.0, ""
  if not hasattr(value, "items"):
    raise SpecError(f"private_estimates={value!r} must be a dict(epsilon=, delta=, mechanism=)")
  d = dict(value)
  unknown = set(d) - {"epsilon", "delta", "mechanism"}
  if unknown:
    raise SpecError(f"private_estimates: unknown key(s) {sorted(unknown)} (allowed: delta, "
                    "epsilon, mechanism)")
  eps, delta, mechanism = d.get("epsilon"), d.get("delta", 0.0), d.get("mechanism")
  if not _is_number(eps) or not eps > 0:
    raise SpecError(f"private_estimates.epsilon={eps!r} must be a positive number")
  if not _is_number(delta) or not 0 <= delta < 1:
    raise SpecError(f"private_estimates.delta={delta!r} must be a number in [0, 1)")
  if not isinstance(mechanism, str) or not mechanism:
    raise SpecError(f"private_estimates.mechanism={mechanism!r} must name the mechanism")
  return float(eps), float(delta), mechanism


def transform_of(value: Any, what: str) -> str:
  if value not in TRANSFORMS:
    raise SpecError(f"{what}={value!r} must be one of {TRANSFORMS}")
  return value


def kind_of(cfg: Mapping[str, Any], where: str, kinds: Any, keys: Mapping[str, Any],
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


def _binary_label(cfg: Mapping[str, Any], na: Sequence[str]) -> dict[str, Any]:
  if cfg.get("positive") is None:
    if cfg.get("negative") is not None:
      raise SpecError("task.negative needs task.positive (the text of the positive class)")
    return {}
  positive = check_text(cfg["positive"], "task.positive", na)
  negative = text_list(cfg.get("negative") or (), "task.negative", na)
  if positive in negative or len(set(negative)) != len(negative):
    raise SpecError(f"task.negative={negative!r} repeats a value or holds the positive "
                    f"{positive!r}")
  return {"positive": positive, "negative": negative}


def _classes(cfg: Mapping[str, Any], na: Sequence[str]) -> dict[str, Any]:
  classes = as_tuple(cfg.get("classes", ()), "task.classes")
  out: list[tuple[str, tuple[Any, ...]]] = []
  seen: set[Any] = set()
  for k, entry in enumerate(classes):
    pair = as_tuple(entry, f"task.classes[{k}]")
    if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
      raise SpecError(f"task.classes[{k}]={entry!r} must be (class name, (code, ...))")
    out.append((pair[0], as_tuple(pair[1], f"task.classes[{k}] ({pair[0]!r}) codes")))
    if not out[-1][1]:
      raise SpecError(f"task.classes[{k}] ({pair[0]!r}) must list the public codes")
    mine = {float(c) if _is_number(c) else c for c in out[-1][1]}
    if seen & mine:
      raise SpecError(f"task.classes[{k}] ({pair[0]!r}): codes "
                      f"{sorted(seen & mine, key=str)} are already in another class")
    seen |= mine
  if len(out) < 2 or len({n for n, _ in out}) != len(out):
    raise SpecError(f"task.classes must name 2 or more distinct classes, got "
                    f"{[n for n, _ in out]}")
  # All codes together are one list of public values: all numbers or all strings, no repeat
  # (a code in two classes is a duplicate).
  values, texts = codes([c for _, group in out for c in group], "task.classes (all codes)",
                        "codes", na)
  groups, i = [], 0
  for name, group in out:
    groups.append((name, values[i:i + len(group)]))
    i += len(group)
  return {"kind": "multiclass", "classes": tuple(groups), "class_texts": texts}


def label_fields(cfg: Any, na: Sequence[str] = ()) -> dict[str, Any]:
  """The fields of a ``LabelSpec`` (all but its name) of a spec's ``task`` entry.

  Raises:
    SpecError: naming the offending key and value.
  """
  cfg = dict(cfg or {"kind": "binary"})
  kind = kind_of(cfg, "task", TASK_KINDS, _TASK_KEYS, "task")
  if kind == "binary":
    return _binary_label(cfg, na)
  if kind == "multiclass":
    return _classes(cfg, na)
  if "bounds" not in cfg:
    raise SpecError("task: a regression task needs public bounds=(lo, hi) of the raw label")
  bounds = number_pair(cfg["bounds"], "task.bounds")
  transform = transform_of(cfg.get("transform", "identity"), "task.transform")
  if transform == "log1p" and bounds[0] <= -1:
    raise SpecError(f"task.bounds={cfg['bounds']!r}: log1p needs lo > -1")
  domain = cfg.get("domain")
  domain = None if domain is None else number_pair(domain, "task.domain")
  policy = cfg.get("out_of_bounds")
  if policy not in OUT_OF_BOUNDS:
    raise SpecError(f"task.out_of_bounds={policy!r} must be declared: one of {OUT_OF_BOUNDS} "
                    "(clip and count, or reject the row)")
  return {"kind": kind, "bounds": bounds, "transform": transform, "domain": domain,
          "out_of_bounds": policy}

"""Public-bin encodings of numeric columns: one-hot or piecewise-linear over public cut points.

A numeric column of a spec is one scaled feature by default. A model that must learn the shape
of a curve (employment by age, by income) from one scaled input needs many private updates to
do it; given public cut points instead, even a linear model fits the curve, which is how DP-EBM
models each column. The cut points are written in the spec from public knowledge (age groups,
income brackets of a published table), never computed from the data: quantiles of the private
file would leak it.

``edges = (lo, *cuts, hi)`` with ``(lo, hi)`` the column's public ``bounds``; a value is first
clipped to the bounds. With ``encoding='onehot'`` the column becomes ``len(cuts) + 1``
indicators, one per interval ``[e_i, e_{i+1})`` (the last one closed). With ``encoding='pwl'``
it becomes ``len(cuts) + 1`` ramps ``clip((x - e_i) / (e_{i+1} - e_i), 0, 1)``: a thermometer
code whose linear combinations are exactly the continuous piecewise-linear functions with
knots at the edges. Every encoded value lies in [0, 1], so the manifest's feature bounds and
the clipping of per-example gradients are unchanged in kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastdp_jax.data.spec_values import format_number

ENCODINGS = ("scaled", "onehot", "pwl")
# More cut points than this is a vocabulary, not a set of brackets: use an embedding.
MAX_CUTS = 254


def check_cuts(cuts: Any, bounds: tuple[float, float], what: str) -> tuple[float, ...]:
  """Validates public cut points: finite, strictly increasing, strictly inside the bounds.

  Args:
    cuts: the spec's ``bins`` value (a list or tuple of numbers).
    bounds: the column's public ``(lo, hi)``.
    what: the spec key, for messages.

  Returns:
    The cut points as floats.

  Raises:
    ValueError: naming ``what`` and the offending value.
  """
  if isinstance(cuts, (str, bytes)) or not isinstance(cuts, Sequence) or not cuts:
    raise ValueError(f"{what}={cuts!r} must be a non-empty list of public cut points")
  if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
             for c in cuts):
    raise ValueError(f"{what}={cuts!r} must be finite numbers")
  out = tuple(float(c) for c in cuts)
  if len(out) > MAX_CUTS:
    raise ValueError(f"{what}: {len(out)} cut points is more than {MAX_CUTS}")
  if any(b <= a for a, b in zip(out, out[1:])):
    raise ValueError(f"{what}={cuts!r} must be strictly increasing")
  lo, hi = bounds
  if out[0] <= lo or out[-1] >= hi:
    raise ValueError(f"{what}={cuts!r} must lie strictly inside the bounds "
                     f"({format_number(lo)}, {format_number(hi)}); the bounds are the outer "
                     "edges already")
  return out


def edges(bounds: tuple[float, float], cuts: tuple[float, ...]) -> np.ndarray:
  """[len(cuts) + 2] float64: the bounds with the cut points between them."""
  return np.asarray((bounds[0], *cuts, bounds[1]), np.float64)


def names(column: str, bounds: tuple[float, float], cuts: tuple[float, ...],
          encoding: str) -> tuple[str, ...]:
  """Feature names: ``age[16,20)`` ... ``age[80,93]`` (onehot), ``age~[16,20]`` (pwl)."""
  e = [format_number(v) for v in edges(bounds, cuts)]
  if encoding == "onehot":
    return tuple(f"{column}[{a},{b}{']' if i == len(e) - 2 else ')'}"
                 for i, (a, b) in enumerate(zip(e, e[1:])))
  return tuple(f"{column}~[{a},{b}]" for a, b in zip(e, e[1:]))


def encode(v: np.ndarray, bounds: tuple[float, float], cuts: tuple[float, ...],
           encoding: str) -> np.ndarray:
  """Validated raw values [n] -> [n, len(cuts) + 1] float64 in [0, 1].

  Args:
    v: [n] raw values of the column (no NaN; any finite number, clipped here).
    bounds: the column's public ``(lo, hi)``.
    cuts: the public interior cut points.
    encoding: ``'onehot'`` or ``'pwl'``.
  """
  e = edges(bounds, cuts)
  x = np.clip(np.asarray(v, np.float64), e[0], e[-1])
  if encoding == "onehot":
    # side='right' puts a value equal to a cut into the interval that starts there; the top
    # bound (clipped values included) belongs to the last interval.
    k = np.minimum(np.searchsorted(e, x, side="right") - 1, len(e) - 2)
    return (k[:, None] == np.arange(len(e) - 1)[None, :]).astype(np.float64)
  if encoding == "pwl":
    return np.clip((x[:, None] - e[None, :-1]) / np.diff(e)[None, :], 0.0, 1.0)
  raise ValueError(f"encoding={encoding!r} must be 'onehot' or 'pwl' here")

"""Reading a spec file: a plain Python file, its helpers beside it, every error one line.

A spec file is ordinary Python whose ``get_config()`` returns the spec's ``ConfigDict``
(:mod:`fastdp_jax.data.features` validates it). While it loads, its own directory is first on
``sys.path``, so ``import my_helpers`` finds ``my_helpers.py`` next to the spec; the helpers
are forgotten afterwards (``sys.modules``), so two specs in two directories may each have a
``helpers.py`` of their own.

Whatever goes wrong while loading (a syntax error, an exception raised by the file, by a
helper or by ``get_config()``, a field the validation refuses, a ``TODO`` placeholder left by
``fastdp-spec init``) is a :class:`SpecError` whose message is one line that starts with
``FILE:LINE:``, so every command that takes ``--spec`` prints it and exits with status 2.
"""

from __future__ import annotations

import contextlib
import importlib.util
import hashlib
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from fastdp_jax import errors
from fastdp_jax.data import units as units_lib

# The placeholder ``fastdp-spec init`` writes for a value only the user (or a private estimate)
# can supply: any string value starting with it makes the spec refuse to load.
TODO = "TODO"


class SpecError(errors.UserError):
  """A feature spec is malformed; the message names the offending key and value."""


def one_line(text: str) -> str:
  """``text`` with its whitespace runs (newlines too) collapsed to one space."""
  return " ".join(str(text).split())


@contextlib.contextmanager
def _beside(directory: str) -> Iterator[None]:
  """``directory`` first on ``sys.path``; the modules imported from it forgotten afterwards."""
  before = set(sys.modules)
  sys.path.insert(0, directory)
  try:
    yield
  finally:
    with contextlib.suppress(ValueError):
      sys.path.remove(directory)
    for name in set(sys.modules) - before:  # top-level modules found through the path entry
      file = getattr(sys.modules[name], "__file__", None) or ""
      if "." not in name and os.path.dirname(os.path.abspath(file)) == directory:
        del sys.modules[name]


def _where(exc: BaseException, path: str) -> str:
  """``FILE:LINE`` of the innermost frame of ``exc`` in the spec's directory (else the spec)."""
  if isinstance(exc, SyntaxError) and exc.filename:
    return f"{exc.filename}:{exc.lineno or 1}"
  directory = os.path.dirname(path)
  found = f"{path}:1"
  for frame in traceback.extract_tb(exc.__traceback__):
    if os.path.dirname(os.path.abspath(frame.filename)) == directory:
      found = f"{frame.filename}:{frame.lineno}"
  return found


def load_config(path: str) -> Any:
  """Runs a spec file and returns what its ``get_config()`` returns.

  Args:
    path: an existing ``.py`` file.

  Raises:
    SpecError: ``FILE:LINE: what went wrong``, one line, for any error the file raises.
  """
  path = os.path.abspath(path)
  module_name = "_fastdp_spec_" + hashlib.sha256(path.encode()).hexdigest()[:12]
  try:
    with _beside(os.path.dirname(path)):
      spec = importlib.util.spec_from_file_location(module_name, path)
      assert spec is not None and spec.loader is not None
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      if not callable(getattr(module, "get_config", None)):
        raise SpecError(f"{path}:1: defines no get_config() (a spec file's get_config() "
                        "returns its ConfigDict)")
      return module.get_config()
  except SpecError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any error in user code: one line
    detail = e.msg if isinstance(e, SyntaxError) else str(e)
    raise SpecError(f"{_where(e, path)}: {type(e).__name__}: {one_line(detail)}") from e


def find_todo(cfg: Any, where: str = "") -> str | None:
  """The key (``columns.age.bounds``) of the first ``TODO`` placeholder in a spec, or None."""
  if isinstance(cfg, str):
    return where if cfg.startswith(TODO) else None
  if isinstance(cfg, Mapping):
    for k, v in cfg.items():
      found = find_todo(v, f"{where}.{k}" if where else str(k))
      if found:
        return found
  elif isinstance(cfg, (list, tuple)):
    for i, v in enumerate(cfg):
      found = find_todo(v, f"{where}[{i}]")
      if found:
        return found
  return None


def line_of(path: str, message: str) -> int:
  """The line of a spec file that a validation message is most likely about.

  The message starts with the key it names (``columns.NAME...``, ``task...``, ``features``,
  ``label``, ``name``, ``na_tokens``, ``private_estimates``): the first line that mentions
  that column (quoted, or as an attribute) or assigns that key. Else the line of
  ``def get_config``, else 1.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    return 1
  m = re.match(r"(?:spec [^:]*: )?(?:features \[')?columns\.([^.:=\[\s]+)", message)
  key = re.match(r"\w+", message)
  patterns = []
  if m:  # the column's own entry (config.columns...) before any other mention of its name
    name = re.escape(m.group(1))
    patterns += [re.compile(rf"columns.*(?:['\"]{name}['\"]|\.{name}\b)"),
                 re.compile(rf"['\"]{name}['\"]|\.{name}\b")]
  elif key:
    patterns.append(re.compile(rf"config\.{re.escape(key.group(0))}\b"))
  patterns.append(re.compile(r"def get_config\b"))
  for pat in patterns:
    for i, line in enumerate(lines, 1):
      if pat.search(line):
        return i
  return 1


def unit_fields(cfg: Mapping[str, Any], input_columns: tuple[str, ...]) -> dict[str, Any]:
  """A spec's ``privacy_unit`` and ``max_rows_per_unit``, checked (both None when unset).

  Here rather than in :mod:`fastdp_jax.data.features` (kept small): the unit columns need
  not be features, but a declared ``input_columns`` must name them, since the streaming mapper
  finds them by that header.

  Raises:
    SpecError: starting with ``privacy_unit`` (its line in the file), saying what to declare.
  """
  try:
    unit, bound = units_lib.normalize_unit(cfg.get("privacy_unit"),
                                           cfg.get("max_rows_per_unit"), "privacy_unit")
  except errors.UserError as e:
    raise SpecError(str(e)) from e
  absent = [c for c in unit or () if input_columns and c not in input_columns]
  if absent:
    raise SpecError(f"privacy_unit: input_columns lacks the unit column(s) {absent}")
  if unit and cfg.get("private_estimates"):
    # fastdp-spec init's estimates are DP for one ROW (no bound per unit): a unit of k rows
    # moves them k times, so their epsilon and delta would not hold for the unit.
    raise SpecError("privacy_unit: this spec's private_estimates hold for one row, not one "
                    "unit; write the bounds and categories from public knowledge instead")
  return {"privacy_unit": unit, "max_rows_per_unit": bound}

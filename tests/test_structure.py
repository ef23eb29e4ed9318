"""Structure checks on the package's source: short functions, no import cycle, light configs.

Read from the source with ``ast`` (nothing is imported, except in the config test's fresh
subprocess), so a failure names the file and the function or the modules involved.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("fastdp_jax", "preprocessing")
# About the length of the flax examples' train_and_evaluate: a function longer than this
# does several jobs and should be split into named steps.
MAX_FUNCTION_LINES = 80


def _sources() -> dict[str, pathlib.Path]:
  """Module name -> file, for every module of the packages (subpackages included)."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      out[".".join(parts)] = path
  return out


def _parse(path: pathlib.Path) -> ast.Module:
  return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_sources_found():
  # The checks below pass vacuously on an empty tree; make sure they see the real one.
  names = _sources()
  assert {"fastdp_jax.train", "fastdp_jax.step", "preprocessing.spark_job",
          "preprocessing.poisson_batches"} <= set(names)


def long_functions(max_lines: int = MAX_FUNCTION_LINES) -> list[str]:
  """``file:line name (N lines)`` for every function or method longer than ``max_lines``.

  A function's length runs from its ``def`` line to its last line, docstring and comments
  included (decorators excluded); nested functions count inside their parent and on their own.
  """
  out = []
  for path in _sources().values():
    for node in ast.walk(_parse(path)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > max_lines:
          out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
  return out


def test_no_function_longer_than_80_lines():
  offenders = long_functions()
  assert not offenders, (f"functions longer than {MAX_FUNCTION_LINES} lines (split them into "
                         "named steps): " + "; ".join(offenders))


def test_long_functions_finds_a_long_function(tmp_path, monkeypatch):
  # The detector itself: a 3-line function is over a limit of 2 and named in the result.
  pkg = tmp_path / "fastdp_jax"
  pkg.mkdir()
  (pkg / "m.py").write_text("def f():\n  x = 1\n  return x\n\n\ndef g():\n  return 1\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("fastdp_jax",))
  assert long_functions(2) == ["fastdp_jax/m.py:1 f (3 lines)"]


# --- imports ----------------------------------------------------------------------------------
def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> tuple[list[ast.stmt], list[ast.stmt]]:
  """``(import-time, call-time)`` import statements of a module.

  Import time: statements that run when the module is imported, in its body or in the body of
  a module-level ``if``/``try``/``with``/``for`` or class (not under ``if TYPE_CHECKING:``,
  which never runs). Call time: imports inside a function, run only when it is called.
  """
  now: list[ast.stmt] = []
  later: list[ast.stmt] = []

  def visit(body, at_import):
    for node in body:
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        (now if at_import else later).append(node)
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        visit(node.body, False)
      elif isinstance(node, ast.If) and _is_type_checking(node.test):
        visit(node.orelse, at_import)
      else:
        for field in ("body", "orelse", "finalbody", "handlers"):
          visit(getattr(node, field, []) or [], at_import)
        for handler in getattr(node, "handlers", []) or []:
          visit(handler.body, at_import)

  visit(tree.body, True)
  return now, later


def _targets(stmt: ast.stmt, module: str, is_package: bool, nodes: set[str]) -> set[str]:
  """The project modules an import statement imports.

  ``from P import x`` is an edge to ``P.x`` when that is a module, else to ``P``. The parent
  packages that Python initialises first are not edges: the packages' ``__init__`` files are
  nodes of their own, with their own imports.
  """
  if isinstance(stmt, ast.Import):
    return {a.name for a in stmt.names if a.name in nodes}
  assert isinstance(stmt, ast.ImportFrom)
  base = stmt.module or ""
  if stmt.level:  # relative: from the module's package, up level - 1 packages
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - (stmt.level - 1)]
    base = ".".join(package + ([base] if base else []))
  out = set()
  for alias in stmt.names:
    sub = f"{base}.{alias.name}"
    if sub in nodes:
      out.add(sub)
    elif base in nodes:
      out.add(base)
  return out


def import_graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """``(import-time graph, graph of every import)``: module -> the project modules it imports."""
  sources = _sources()
  nodes = set(sources)
  now: dict[str, set[str]] = {m: set() for m in nodes}
  every: dict[str, set[str]] = {m: set() for m in nodes}
  for module, path in sources.items():
    at_import, at_call = _imports(_parse(path))
    is_package = path.name == "__init__.py"
    for stmt in at_import:
      now[module] |= _targets(stmt, module, is_package, nodes) - {module}
    for stmt in at_import + at_call:
      every[module] |= _targets(stmt, module, is_package, nodes) - {module}
  return now, every


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return path[path.index(n):] + [n]
      if n not in state and (cycle := visit(n)):
        return cycle
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (cycle := visit(m)):
      return cycle
  return None


def test_no_import_cycle_at_import_time():
  # A cycle here runs a module while another is half-initialised: names missing at random.
  now, _ = import_graphs()
  cycle = find_cycle(now)
  assert cycle is None, "import cycle at import time: " + " -> ".join(cycle)


def test_no_import_cycle_through_function_level_imports():
  # Stricter than Python needs: a function-level import that closes a cycle cannot break
  # import, but it is a hidden two-way dependency (fastdp_jax.data.features imported cleaning
  # inside a function while cleaning imported features). Modules stay layered.
  _, every = import_graphs()
  cycle = find_cycle(every)
  assert cycle is None, "import cycle (through a function-level import): " + " -> ".join(cycle)


def test_cleaning_and_features_do_not_import_each_other():
  # cleaning builds on features (the spec); features must not reach back, at any level.
  _, every = import_graphs()
  assert "fastdp_jax.data.cleaning" not in every["fastdp_jax.data.features"]


def test_import_graph_sees_module_and_function_level_imports():
  # The graph builder itself, on statements whose imports are known: train imports step at
  # module level; features no longer reaches cleaning; a function-level import is call-time.
  now, every = import_graphs()
  assert "fastdp_jax.step" in now["fastdp_jax.train"]
  assert "fastdp_jax.data.features" in now["fastdp_jax.data.cleaning"]
  tree = ast.parse("import os\nfrom fastdp_jax.data import shards\nif TYPE_CHECKING:\n"
                   "  from fastdp_jax import train\ndef f():\n  from . import step\n")
  at_import, at_call = _imports(tree)
  nodes = {"fastdp_jax.data.shards", "fastdp_jax.train", "fastdp_jax.step"}
  assert set().union(*(_targets(s, "fastdp_jax.x", False, nodes) for s in at_import)) == {
      "fastdp_jax.data.shards"}
  assert set().union(*(_targets(s, "fastdp_jax.x", False, nodes) for s in at_call)) == {
      "fastdp_jax.step"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


# --- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["configs.dist", "configs.seq", "configs.test",
                                    "fastdp_jax.config"])
def test_reading_a_config_imports_neither_jax_nor_flax(module):
  # A fresh interpreter (this one has JAX loaded already) imports the config and builds it.
  build = "base_config" if module == "fastdp_jax.config" else "get_config"
  code = (f"import sys, {module} as m\n"
          f"m.{build}()\n"
          "print(','.join(n for n in ('jax', 'flax') if n in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
  assert out.stdout.strip() == "", f"reading {module} imported {out.stdout.strip()}"


# --- the house rules: who may import whom (docs/architecture.md) ------------------------------
# What the producers (preprocessing/) may import from the package: the data contract and the
# error and file helpers. The Poisson-batch job runs the mechanism's sampler out of core (the
# batches it writes are the training run's batches), so it also imports the sampler and the
# default-delta rule, and nothing else of dp/.
PRODUCER_IMPORTS = ("fastdp_jax.data", "fastdp_jax.errors", "fastdp_jax.atomic")
PRODUCER_EXCEPTIONS = {"preprocessing.poisson_batches": {"fastdp_jax.dp.sampling",
                                                         "fastdp_jax.dp.release"}}
MAX_FILE_LINES = 800
MAX_TRAINER_LINES = 500


def _in(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def test_the_trainer_side_never_imports_a_producer():
  # An exported predictor or a trainer that needs preprocessing would need the Spark extra.
  _, every = import_graphs()
  bad = {m: sorted(n for n in targets if _in(n, "preprocessing"))
         for m, targets in every.items() if _in(m, "fastdp_jax")}
  assert not {m: t for m, t in bad.items() if t}


def test_producers_import_only_the_data_contract_and_the_helpers():
  _, every = import_graphs()
  bad = {}
  for m, targets in every.items():
    if not _in(m, "preprocessing"):
      continue
    allowed = PRODUCER_EXCEPTIONS.get(m, set())
    out = sorted(n for n in targets if _in(n, "fastdp_jax") and n not in allowed
                 and n != "fastdp_jax" and not any(_in(n, p) for p in PRODUCER_IMPORTS))
    if out:
      bad[m] = out
  assert not bad, f"producers importing the trainer's side: {bad}"


def test_the_data_contract_imports_nothing_of_the_trainer():
  # data/ is what both sides import; it may use the error and file helpers and nothing else.
  _, every = import_graphs()
  bad = {m: sorted(n for n in targets if _in(n, "fastdp_jax") and n != "fastdp_jax"
                   and not any(_in(n, p) for p in PRODUCER_IMPORTS))
         for m, targets in every.items() if _in(m, "fastdp_jax.data")}
  assert not {m: t for m, t in bad.items() if t}


def test_no_private_subpackage_and_no_module_that_only_re_exports():
  # The folders are the architecture: no _src tree behind shims. A module whose body is only
  # imports (and a docstring, __all__, a main guard) re-exports another.
  for module, path in _sources().items():
    assert "._" not in "." + module.replace("fastdp_jax.", "", 1).replace("__", ""), module
    tree = _parse(path)
    body = [n for n in tree.body if not (
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # docstrings
    if not body or path.name in ("__init__.py", "__main__.py"):
      continue
    substantive = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom)) and not (
        isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                          for t in n.targets)) and not (
        isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    assert substantive, f"{path.relative_to(ROOT)} only re-exports other modules"


def test_no_file_over_800_lines_and_a_trainer_read_in_one_sitting():
  sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
           for p in _sources().values()}
  assert {f: n for f, n in sizes.items() if n > MAX_FILE_LINES} == {}
  assert sizes["fastdp_jax/train.py"] < MAX_TRAINER_LINES


def test_the_package_docstring_names_only_what_it_exports():
  # fastdp_jax/__init__.py: the public API is its __all__, loaded lazily from its modules.
  import fastdp_jax
  for name in fastdp_jax.__all__:
    assert getattr(fastdp_jax, name) is not None, name

"""notebooks/quickstart.ipynb: stored without outputs, and runs top to bottom on small data."""

import os
import re
import sys

import nbformat
from nbclient import NotebookClient

from fastdp_jax import records
from fastdp_jax import sinks
from tests.conftest import ROOT
from tests.tensorboard_events import read_scalars
import pytest

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _read():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def test_notebook_is_stored_without_outputs():
  for cell in _read().cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
  nb = _read()
  # The kernel must be this environment's Python (the one `make` installed ipykernel into).
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
  monkeypatch.setenv("QUICKSTART_ROWS", "10000")
  monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
  monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path))
  # Run from notebooks/, as Jupyter does when the file is opened there.
  NotebookClient(nb, timeout=240, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  kernel = re.search(r"KERNEL (\S+)", text).group(1)
  assert os.path.realpath(kernel) == os.path.realpath(sys.executable)
  # The loaded model scores what training reported; the audit respects the accountant.
  loaded, reported = re.search(r"accuracy of the loaded model: (\S+) \(training reported (\S+)\)",
                               text).groups()
  assert loaded == reported
  assert "consistent: True" in text
  assert "privacy/epsilon" in text and "test/accuracy" in text
  # The one metrics.jsonl by kind, and the event files hold the curves of its eval records.
  assert "record kinds: ['epoch', 'eval', 'summary']" in text
  evals = sinks.read_jsonl(tmp_path / "run" / sinks.METRICS_FILE, records.EVAL)
  scalars = read_scalars(tmp_path / "run")
  assert [s for s, _ in scalars["privacy/epsilon"]] == [r["step"] for r in evals]
  assert [s for s, _ in scalars["test/accuracy"]] == [r["step"] for r in evals]
  assert os.path.isfile(tmp_path / "run" / "report" / "accuracy_vs_epsilon.png")
  assert os.path.isfile(tmp_path / "run" / "model" / "MODEL_CARD.md")
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the report plot is displayed"

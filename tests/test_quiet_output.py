"""Quiet, honest output (issue 25, item 6): a default private run prints no warning, the noise
calibration none of dp_accounting's convergence warnings, and the stated delta is at most the
requested one."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from dp_accounting import rdp

from conftest import make_dataset
from fastdp_jax.dp import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A sampling rate at which dp_accounting's default RDP orders do not all converge at the
# bracket's smallest sigma (0.3): its fractional orders 1.1-1.3 warn there.
Q, STEPS, DELTA = 0.08, 75, 1e-5
# absl's INFO lines (I1207 00:42:50.377235 ... file.py:145] message): the trainer's log.
_INFO_LINE = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")
# What a warning looks like on either stream: absl's W/E lines, Python's warnings, ours.
_WARNING = re.compile(r"^[WE]\d{4} |Warning|WARNING|warn|failed to converge", re.MULTILINE)


def _convergence_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "failed to converge" in r.getMessage()]


def test_the_default_rdp_orders_would_warn_here(caplog):
  """The condition the calibration avoids exists: without it, the test below means nothing."""
  caplog.set_level(logging.WARNING, logger="absl")
  logger = logging.getLogger("absl")
  filters = list(logger.filters)
  for f in filters:  # the note filter accounting installs, off for this check
    logger.removeFilter(f)
  try:
    acc = rdp.RdpAccountant()
    acc.compose(accounting.dp_event(0.3, Q, STEPS))
    acc.get_epsilon(DELTA)
  finally:
    for f in filters:
      logger.addFilter(f)
  assert len(_convergence_warnings(caplog)) >= 3


def test_calibration_logs_no_convergence_warning(caplog):
  caplog.set_level(logging.DEBUG, logger="absl")
  sigma = accounting.calibrate_noise_multiplier(4.0, Q, STEPS, DELTA)
  assert accounting.compute_epsilon(sigma, Q, STEPS, DELTA) <= 4.0
  assert not _convergence_warnings(caplog)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow  # a training run in a subprocess
def test_a_default_private_run_prints_no_warning(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=4000)
  config = tmp_path / "private.py"
  # configs/test.py with its public seeds unset: a private run, as a user's would be.
  config.write_text("from configs import test\n\n\ndef get_config():\n"
                    "  config = test.get_config()\n"
                    "  config.dp.sampling_seed = None\n  config.dp.noise_seed = None\n"
                    "  return config\n")
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax", f"--config={config}", f"--config.data.path={data}",
       "--config.dp.target_epsilon=4", f"--config.dp.delta={DELTA}", "--config.batch_size=256",
       "--config.num_epochs=6", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "noise multiplier calibrated" in r.stdout  # the calibration ran
  assert not _WARNING.search(r.stdout), r.stdout
  others = [line for line in r.stderr.splitlines() if not _INFO_LINE.match(line)]
  assert not others, others  # nothing but the trainer's INFO log lines
  with open(tmp_path / "run" / "summary.json", encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["private"] is True and summary["delta_warning"] is None
  assert summary["delta"] <= DELTA
  assert summary["accountant_delta"] + summary["overflow_delta"] <= DELTA * (1 + 1e-12)

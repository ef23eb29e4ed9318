"""Budget and parameter edges: refused before any update, in one line, with what would work."""

import os
import subprocess
import sys

import pytest

from fastdp_jax.dp import accounting
from fastdp_jax import errors
from fastdp_jax import config as config_lib
from fastdp_jax.dp import plan as plan_lib
from fastdp_jax import train
from tests.conftest import ROOT, make_config, make_dataset

N = 3000 - 595  # training rows of the dataset below


def _plan(cfg, n):
  """The trainer's plan of ``cfg`` for ``n`` training rows."""
  rc = config_lib.settings(cfg)
  return plan_lib.plan_privacy(rc.dp, batch_size=rc.batch_size, num_epochs=rc.num_epochs,
                               num_examples=n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=3000, seed=1)


def _cli(dataset, workdir, *extra):
  return subprocess.run([sys.executable, "main.py", "--config=configs/test.py",
                         f"--config.data.path={dataset}", f"--workdir={workdir}",
                         "--config.num_epochs=1", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_error_line(r) -> str:
  lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  return lines[0]


def test_a_cap_below_one_update_is_refused_before_training_with_its_cost(dataset, tmp_path):
  # At the accountant's delta: 99 % of the default 1e-5 (the rest is the overflow's share).
  one = accounting.compute_epsilon(1.0, 64 / N, 1, 0.99e-5)
  for _ in range(2):  # the same answer on every rerun (before: "checkpoint saved", IndexError)
    r = _cli(dataset, tmp_path / "w", f"--config.dp.max_epsilon={one / 2}")
    line = _one_error_line(r)
    assert f"is below what a single update costs: epsilon {one:.6g}" in line
    assert "checkpoint saved" not in r.stdout
    assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")
  # Just above the cost of one update: one update, then the budget stop.
  summary = train.train_and_evaluate(
      make_config(dataset, num_epochs=1, **{"dp.max_epsilon": one * 1.0001}),
      str(tmp_path / "ok"))
  assert summary.steps == 1 and summary.budget_exhausted


@pytest.fixture()
def no_pld(monkeypatch):
  """Records every accountant built: a refusal that needs none answers in milliseconds."""
  built = []
  real = accounting.make_accountant
  monkeypatch.setattr(accounting, "make_accountant",
                      lambda name="pld": built.append(name) or real(name))
  return built


@pytest.mark.parametrize("target,match", [
    (1e6, r"is reached with a noise multiplier below 0.3"),
    (100.0, r"is reached with a noise multiplier below 0.3"),
])
def test_a_target_too_large_for_any_sane_sigma_is_refused_at_once(dataset, target, match,
                                                                  no_pld):
  cfg = make_config(dataset, **{"dp.target_epsilon": target})
  with pytest.raises(accounting.CalibrationError, match=match) as e:
    _plan(cfg, N)
  assert isinstance(e.value, errors.UserError) and "pld" not in no_pld


def test_a_target_that_needs_sigma_beyond_sane_limits_is_refused_at_once(dataset, no_pld):
  # num_epochs=1e6: 38 million updates; target 1 would need sigma ~ 400 (minutes per PLD
  # evaluation, and noise that drowns every gradient).
  cfg = make_config(dataset, num_epochs=1_000_000, **{"dp.target_epsilon": 1.0})
  with pytest.raises(accounting.CalibrationError,
                     match=r"over 38000000 updates .* needs a noise multiplier above 100"):
    _plan(cfg, N)
  assert "pld" not in no_pld


def test_the_cli_says_an_unreachable_target_in_one_line(dataset, tmp_path):
  line = _one_error_line(_cli(dataset, tmp_path / "w", "--config.dp.target_epsilon=1e6"))
  assert "CalibrationError" in line and "below 0.3" in line
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_long_calibration_prints_progress(dataset, monkeypatch, capsys):
  # Every evaluation reported (the trainer reports at most one every 5 s: quick ones are
  # silent, slow ones visible).
  real = accounting.progress_printer
  monkeypatch.setattr(accounting, "progress_printer",
                      lambda what, **kw: real(what, **dict(kw, every_s=0)))
  plan = _plan(make_config(dataset, **{"dp.target_epsilon": 2.0}), N)
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if line.startswith("calibrating the noise "
                                                                 "multiplier to epsilon <= 2.0")]
  assert len(lines) >= 3 and "sigma" in lines[-1], out
  assert f"noise multiplier calibrated to {plan.noise_multiplier:.4f}" in out


def test_progress_is_reported_for_every_evaluation_and_throttled_in_time():
  seen = []
  sigma = accounting.calibrate_noise_multiplier(1.0, 0.02, 100, 1e-5,
                                                progress=lambda s, e: seen.append((s, e)))
  assert len(seen) >= 3
  assert all(e is None or e == accounting.compute_epsilon(s, 0.02, 100, 1e-5)
             for s, e in seen[:3])
  assert accounting.compute_epsilon(sigma, 0.02, 100, 1e-5) <= 1.0
  lines = []
  quiet = accounting.progress_printer("x", every_s=float("inf"), write=lines.append)
  loud = accounting.progress_printer("x", every_s=0, write=lines.append)
  quiet(1.0, 0.5)
  loud(1.0, 0.5)
  loud(2.0, None)
  assert lines == ["x: 1 evaluations (0 s), sigma 1 -> epsilon 0.5",
                   "x: 2 evaluations (0 s), sigma 2"]
  ledger = accounting.PrivacyLedger(1e-5)
  steps = []
  k = ledger.steps_within(1.0, 1.0, 0.02, 10_000, progress=lambda s, e: steps.append(s))
  assert 0 < k < 10_000 and len(steps) >= 3


def test_a_tiny_noise_multiplier_is_a_config_error_not_a_size_overflow(dataset, tmp_path):
  line = _one_error_line(_cli(dataset, tmp_path / "w", "--config.dp.noise_multiplier=1e-9"))
  assert "dp.noise_multiplier=1e-09 is below 0.1" in line and "dp.accountant='rdp'" in line
  assert "Maximum allowed size" not in line
  # The accountant itself says what is wrong, as a user error.
  with pytest.raises(accounting.AccountingError, match="no meaningful guarantee"):
    accounting.compute_epsilon(1e-9, 0.02, 10, 1e-5)
  # The way out the message names works.
  summary = train.train_and_evaluate(
      make_config(dataset, num_epochs=1, **{"dp.noise_multiplier": 1e-9,
                                            "dp.accountant": "rdp"}), str(tmp_path / "w"))
  assert summary.steps > 0 and summary.epsilon > 1e6

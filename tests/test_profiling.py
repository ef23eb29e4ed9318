"""--config.profile_steps=N: a trace of N updates and a phase table, without changing results."""

import glob
import json
import os

import numpy as np
import pytest

from configs import test as test_config
from fastdp_jax import profiling
from fastdp_jax import train
from tests.conftest import make_dataset


def test_trace_window_and_call_cutting(tmp_path):
  prof = profiling.Profiler(str(tmp_path), 10, first_step=0, last_step=1000,
                            steps_per_call=128)
  assert (prof.trace_start, prof.trace_end) == (128, 138)  # after the compiling call
  assert prof.call_length(0, 128) == 128
  assert prof.call_length(128, 128) == 10
  assert prof.call_length(120, 128) == 8
  short = profiling.Profiler(str(tmp_path), 10, first_step=0, last_step=50, steps_per_call=128)
  assert (short.trace_start, short.trace_end) == (0, 10)
  off = profiling.Profiler(str(tmp_path), 0, first_step=0, last_step=50, steps_per_call=128)
  assert off.call_length(0, 128) == 128 and off.report() is None
  assert not os.path.exists(off.directory)
  with pytest.raises(ValueError, match="profile_steps"):
    profiling.Profiler(str(tmp_path), -1, first_step=0, last_step=5, steps_per_call=1)


def test_profile_steps_writes_a_trace_and_phase_table_same_results(tmp_path, capsys):
  data = make_dataset(str(tmp_path / "data"), rows=4000, seed=2)
  results = {}
  for steps in (0, 5):
    cfg = test_config.get_config()
    cfg.data.path = data
    cfg.num_epochs = 1
    cfg.profile_steps = steps
    cfg.checkpoint.enabled = False
    workdir = str(tmp_path / f"run{steps}")
    train.train_and_evaluate(cfg, workdir)
    results[steps] = np.load(os.path.join(workdir, "final_params.npz"))
  out = capsys.readouterr().out
  for phase in profiling.PHASES:
    assert phase in out
  profile = tmp_path / "run5" / "profile"
  assert glob.glob(str(profile / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert glob.glob(str(profile / "**" / "perfetto_trace.json.gz"), recursive=True)
  phases = json.loads((profile / "phases.json").read_text())
  assert phases["trace_written"]
  assert phases["trace_steps"][1] - phases["trace_steps"][0] == 5
  assert phases["phases"]["sampling"]["calls"] >= 2
  # The work after the loop is in the profile too: the membership inference's loss passes
  # (train and test rows) and the export of model/, once the run's outputs are written.
  after = phases["after_loop"]
  assert after["export"]["calls"] == 1 and after["privacy evaluation"]["calls"] == 2
  # The table's bookkeeping, whatever the clock read: "other" is the rest of the total.
  booked = sum(r["seconds"] for k, r in after.items() if k not in ("total", "other"))
  assert after["other"]["seconds"] == max(0.0, after["total"]["seconds"] - booked)
  assert all(r["seconds"] >= 0 for r in after.values())
  assert phases["start_up_s"] > 0 and set(phases["process_cpu_s"]) == {
      "before_loop", "loop", "after_loop"}
  assert "time after the loop:" in out and "export" in out
  assert not (tmp_path / "run0" / "profile").exists()
  # Cutting calls at the traced window's edges does not change the training.
  for name in results[0].files:
    np.testing.assert_allclose(results[5][name], results[0][name], rtol=1e-6, atol=1e-7)


def test_nested_phases_are_booked_once_to_the_outer_one(tmp_path):
  prof = profiling.Profiler(str(tmp_path), 1, first_step=0, last_step=10, steps_per_call=5)
  profiling.activate(prof)
  try:
    with prof.phase("evaluation"):
      with profiling.booked("export"):  # e.g. a metric computed inside the loop's evaluation
        pass
    profiling.books("export")(lambda: None)()
  finally:
    profiling.activate(None)
  profiling.books("export")(lambda: None)()  # no run: nothing booked anywhere
  phases = prof.phases()
  assert phases["evaluation"]["calls"] == 1
  assert phases["export"]["calls"] == 1  # the decorated call alone, not the nested one
  assert prof.finish() is None  # report() did not run: no table after the loop

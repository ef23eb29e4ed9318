"""Faults tried on purpose: each gives a clear error, or is survived, and loses nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdp_jax.dp import accounting
from fastdp_jax import checkpoint
from fastdp_jax import errors
from fastdp_jax.data import shards as data_lib
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax import train
from tests.conftest import ROOT, make_dataset, make_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=6000, seed=5,
                      max_rows_per_shard=2000)


def _cfg(path, **overrides):
  return make_config(path, **{"num_epochs": 1, **overrides})


def _cli(dataset, workdir, *extra):
  return subprocess.run([sys.executable, "main.py", "--config=configs/test.py",
                         f"--config.data.path={dataset}", f"--workdir={workdir}", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_resume_with_changed_privacy_model_or_data_is_refused(dataset, tmp_path):
  train.train_and_evaluate(_cfg(dataset), str(tmp_path))
  with pytest.raises(errors.ResumeMismatchError, match="noise_multiplier"):
    train.train_and_evaluate(_cfg(dataset, **{"dp.noise_multiplier": 2.0}), str(tmp_path))
  with pytest.raises(errors.ResumeMismatchError, match="model_hidden_sizes"):
    train.train_and_evaluate(_cfg(dataset, **{"model.hidden_sizes": (4,)}), str(tmp_path))
  other = make_dataset(str(tmp_path / "other"), rows=6000, seed=6)
  with pytest.raises(errors.ResumeMismatchError, match="data_digest"):
    train.train_and_evaluate(_cfg(other), str(tmp_path))


def test_override_is_recorded_and_epsilon_keeps_accumulating(dataset, tmp_path):
  first = train.train_and_evaluate(_cfg(dataset), str(tmp_path))
  second = train.train_and_evaluate(
      _cfg(dataset, num_epochs=2, **{"dp.noise_multiplier": 2.0,
                                     "checkpoint.allow_changes": True}), str(tmp_path))
  assert any("noise_multiplier" in d for d in second.resume_overrides[0])
  q, steps = first.sampling_rate, first.steps
  assert second.steps == 2 * steps
  assert [s["noise_multiplier"] for s in second.privacy_ledger] == [1.0, 2.0]
  # The composition of both segments, never a reset: more than either part alone; RDP, which
  # is valid when the second segment's sigma was chosen after seeing the first's results.
  delta = first.accountant_delta
  eps_second_alone = accounting.compute_epsilon(2.0, q, steps, delta)
  assert second.epsilon > max(first.epsilon, eps_second_alone)
  assert second.ledger_composition == "rdp (adaptive)"
  rdp = accounting.make_accountant("rdp")
  for sigma in (1.0, 2.0):
    rdp.compose(accounting.dp_event(sigma, q, steps))
  assert second.epsilon == pytest.approx(rdp.get_epsilon(delta), rel=1e-12)


def test_a_resume_with_changes_draws_fresh_noise_and_fresh_batches(dataset, tmp_path):
  train.train_and_evaluate(_cfg(dataset), str(tmp_path))
  before = keys_lib.load(str(tmp_path))
  train.train_and_evaluate(_cfg(dataset, num_epochs=2, **{"dp.noise_multiplier": 2.0,
                                                          "checkpoint.allow_changes": True}),
                           str(tmp_path))
  after = keys_lib.load(str(tmp_path))
  assert not (after.noise == before.noise).all()
  # A new segment: its batches are drawn with a new key, independent of the first segment's
  # (the accountant composes the segments as independent mechanisms).
  assert not (after.sampling == before.sampling).all()


def test_budget_cap_stops_before_exceeding_and_survives_resume(dataset, tmp_path):
  full = train.train_and_evaluate(_cfg(dataset, num_epochs=4), str(tmp_path / "full"))
  cap = full.epsilon * 0.8
  capped = train.train_and_evaluate(_cfg(dataset, num_epochs=4, **{"dp.max_epsilon": cap}),
                                    str(tmp_path / "cap"))
  assert capped.budget_exhausted is True
  assert capped.epsilon <= cap < full.epsilon
  q, sigma = capped.sampling_rate, capped.noise_multiplier
  # It stopped at the LAST update within the budget.
  assert accounting.compute_epsilon(sigma, q, capped.steps + 1,
                                    capped.accountant_delta) > cap
  assert (tmp_path / "cap" / "checkpoints" / str(capped.steps)).is_dir()
  # Rerunning resumes and takes no further update: the budget never resets.
  again = train.train_and_evaluate(_cfg(dataset, num_epochs=4, **{"dp.max_epsilon": cap}),
                                   str(tmp_path / "cap"))
  assert again.steps == capped.steps and again.epsilon == capped.epsilon


def test_second_run_in_the_same_workdir_is_refused(dataset, tmp_path):
  lock = checkpoint.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    r = _cli(dataset, tmp_path)
    assert r.returncode == 2
    assert "in use by another run" in r.stderr
  finally:
    lock.release()
  r = _cli(dataset, tmp_path, "--config.num_epochs=1")
  assert r.returncode == 0, r.stderr[-2000:]


def test_workdir_that_is_not_writable(dataset, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  r = _cli(dataset, blocker / "run")
  assert r.returncode == 2 and "not writable" in r.stderr


def test_config_typo_fails_before_any_work(dataset, tmp_path):
  r = _cli(dataset, tmp_path / "w", "--config.dp.noise_multiplyer=2")
  assert r.returncode != 0 and "noise_multiplyer" in r.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "missing", "manifest"])
def test_bad_shards_name_themselves_and_no_training_starts(tmp_path, fault):
  ds = make_dataset(str(tmp_path / "d"), rows=6000, seed=5, max_rows_per_shard=2000)
  shard = os.path.join(ds, "train-00001.h5")
  if fault == "corrupt":
    with open(shard, "r+b") as f:
      f.seek(4000)
      f.write(b"\x00" * 64)
  elif fault == "truncated":
    with open(shard, "r+b") as f:
      f.truncate(1000)
  elif fault == "missing":
    os.remove(shard)
  else:
    m = json.loads(open(os.path.join(ds, "manifest.json")).read())
    for s in m["shards"]:
      if s["file"] == "train-00001.h5":
        s["rows"] += 5
    open(os.path.join(ds, "manifest.json"), "w").write(json.dumps(m))
  r = _cli(ds, tmp_path / "w")
  assert r.returncode == 2
  assert "train-00001.h5" in r.stderr and "ShardError" in r.stderr
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_batchnorm_is_refused_in_dp_mode():
  from flax import nnx
  from fastdp_jax import models

  class WithBN(nnx.Module):
    def __init__(self):
      self.bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match="BatchNorm"):
    models.check_dp_compatible(WithBN())

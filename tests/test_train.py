"""End to end: the real train_and_evaluate on a tiny generated data set with configs/test.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdp_jax.dp import accounting
from fastdp_jax.data import shards as data_lib
from fastdp_jax import models
from fastdp_jax.dp import release
from fastdp_jax import step as step_lib
from fastdp_jax import train
from tests.conftest import ROOT, make_dataset, make_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=8000, seed=3)


_config = make_config


def test_end_to_end_summary_metrics_and_params(dataset, tmp_path):
  cfg = _config(dataset)
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  n = len(data_lib.load_split(dataset, "train").labels)
  q = cfg.batch_size / n
  steps = cfg.num_epochs * round(n / cfg.batch_size)
  assert summary.steps == steps and summary.sampling_rate == pytest.approx(q)
  # The default delta: the largest power of ten at most 1 / (10 N), stated as requested (the
  # accountant gets 99 % of it, the overflow's term at most the rest).
  requested = release.default_delta(n)
  assert summary.delta <= requested <= 1 / (10 * n)
  assert summary.accountant_delta == pytest.approx(0.99 * requested, rel=1e-12)
  assert summary.epsilon == pytest.approx(
      accounting.compute_epsilon(cfg.dp.noise_multiplier, q, steps, summary.accountant_delta),
      rel=1e-12)
  assert summary.delta == summary.accountant_delta + summary.overflow_delta
  assert summary.overflow_delta <= 0.01 * requested
  assert summary.test_accuracy > summary.majority_class_rate
  # configs/test.py fixes both seeds: a reproducibility run, said so.
  assert summary.private is False and "dp.sampling_seed" in summary.privacy_note
  with open(tmp_path / "summary.json") as f:
    on_disk = json.load(f)
  for key in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps",
              "test_accuracy", "majority_class_rate", "train_examples", "config"):
    assert key in on_disk
  assert on_disk["config"]["dp"]["noise_multiplier"] == cfg.dp.noise_multiplier
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[0]["epsilon"] < records[1]["epsilon"] == summary.epsilon
  assert all(0 <= r[release.ATTACK_ACCURACY] <= 1 for r in records)
  assert all(release.TRAIN_LOSS in r and "train_loss" not in r for r in records)
  params = np.load(tmp_path / "final_params.npz")
  assert sorted(params) == ["layers/0/bias", "layers/0/kernel", "layers/1/bias",
                            "layers/1/kernel"]
  assert params["layers/0/kernel"].shape == (9, 8)
  # A binary task (a manifest without "task" is one too): its AUC is the exported model's,
  # by the definition (pairs of a positive and a negative test row ranked right, ties 1/2).
  assert summary.task == "binary" and all("test_auc" in r for r in records)
  test = data_lib.load_split(dataset, "test")
  p = np.asarray(models.apply_exported(dict(params), test.features,
                                       {"hidden_sizes": [8], "task": "binary"}), np.float64)
  pos, neg = p[test.labels == 1][:, None], p[test.labels == 0][None, :]
  # float32 forward passes compiled for other shapes: scores agree to a few ulps, and the
  # 1,587 x 1,587 pair comparisons may flip only where two scores are that close.
  assert summary.test_auc == pytest.approx(np.mean((pos > neg) + 0.5 * (pos == neg)),
                                           abs=1e-4)


def test_fixed_seeds_reproduce_and_each_secret_key_changes_the_run(dataset, tmp_path):
  runs = {"a": {}, "b": {}, "noise": {"dp.noise_seed": None},
          "batches": {"dp.sampling_seed": None},
          "private": {"dp.noise_seed": None, "dp.sampling_seed": None}}
  out = {w: train.train_and_evaluate(_config(dataset, num_epochs=1, **o), str(tmp_path / w))
         for w, o in runs.items()}
  p = {w: np.load(tmp_path / w / "final_params.npz")["layers/0/kernel"] for w in runs}
  np.testing.assert_array_equal(p["a"], p["b"])
  # Noise seed set, sampling seed unset: different batches, hence different parameters.
  assert not np.allclose(p["a"], p["batches"]) and not np.allclose(p["a"], p["noise"])
  assert [out[w].private for w in runs] == [False, False, False, False, True]
  assert out["batches"].privacy_note.startswith("reproducibility run: dp.noise_seed")
  assert out["private"].privacy_note is None
  assert out["private"].noise == out["private"].sampling == "os entropy"
  assert len({out[w].epsilon for w in runs}) == 1  # the mechanism's epsilon, comparable


def test_vmap_clipping_with_microbatches_trains(dataset, tmp_path):
  summary = train.train_and_evaluate(
      _config(dataset, num_epochs=1, **{"dp.clipping": "vmap", "dp.microbatch_size": 16}),
      str(tmp_path))
  assert summary.test_accuracy > summary.majority_class_rate


def test_target_epsilon_is_met(dataset, tmp_path):
  # A target on the command line wins over the sigma of the config file.
  cfg = _config(dataset, num_epochs=1, **{"dp.target_epsilon": 2.0})
  assert cfg.dp.noise_multiplier == 1.0
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary.epsilon <= 2.0
  assert summary.epsilon == pytest.approx(2.0, rel=1e-3)
  assert summary.noise_multiplier != 1.0


def test_non_private_mode_same_path(dataset, tmp_path):
  summary = train.train_and_evaluate(_config(dataset, num_epochs=1, **{"dp.enabled": False}),
                                     str(tmp_path))
  assert summary.dp_enabled is False and summary.epsilon == float("inf")
  assert summary.test_accuracy > summary.majority_class_rate


def test_only_non_finite_parameters_stop_a_run(dataset, tmp_path):
  # A learning rate that makes the noised parameters overflow: the DP output itself, so
  # stopping on it is post-processing (one row's non-finite gradient is zeroed instead; see
  # tests/dp/test_privacy_guarantees.py).
  cfg = _config(dataset, **{"optimizer.learning_rate": 1e38, "dp.noise_multiplier": 1e3})
  with pytest.raises(step_lib.NonFiniteParametersError, match="update 1;"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))


@pytest.mark.parametrize("overrides,match", [
    ({"dp.l2_norm_clip": 0.0}, "l2_norm_clip"),
    ({"dp.noise_multiplier": -1.0}, "noise_multiplier"),
    ({"dp.delta": 1.0}, "delta"),
    ({"dp.noise_multiplier": None}, "dp.noise_multiplier or dp.target_epsilon"),
    ({"batch_size": 10 ** 7}, "sampling rate"),
    ({"optimizer.name": "adagrad"}, "optimizer.name"),
    ({"data.path": "/nonexistent/data"}, "does not exist"),
])
def test_bad_config_fails_before_training(dataset, tmp_path, overrides, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    train.train_and_evaluate(_config(dataset, **overrides), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_key_in_a_config_file_is_rejected(dataset, tmp_path):
  cfg = _config(dataset)
  with cfg.unlocked():
    cfg.dp.l2_norm_clp = 1.0
  with pytest.raises(ValueError, match="unknown config key dp.l2_norm_clp; did you mean dp.l2_norm_clip"):
    train.train_and_evaluate(cfg, str(tmp_path))


def test_cli_typo_fails_before_any_work_and_cli_runs(dataset, tmp_path):
  base = [sys.executable, "main.py", "--config=configs/test.py",
          f"--config.data.path={dataset}"]
  bad = subprocess.run(base + ["--config.dp.l2_norm_clp=1", f"--workdir={tmp_path}/x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "l2_norm_clp" in bad.stderr
  assert not os.path.exists(tmp_path / "x")
  ok = subprocess.run(base + ["--config.num_epochs=1", f"--workdir={tmp_path}/ok"],
                      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "epsilon" in ok.stdout and "test_acc" in ok.stdout
  assert (tmp_path / "ok" / "summary.json").exists()

"""End to end: the real train_and_evaluate on a tiny generated data set with configs/test.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdp_jax import accounting
from fastdp_jax import data as data_lib
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
  assert summary["steps"] == steps and summary["sampling_rate"] == pytest.approx(q)
  assert summary["epsilon"] == pytest.approx(
      accounting.compute_epsilon(cfg.dp.noise_multiplier, q, steps, cfg.dp.delta), rel=1e-12)
  assert summary["test_accuracy"] > summary["majority_class_rate"]
  assert summary["noise_key"].startswith("deterministic")
  with open(tmp_path / "summary.json") as f:
    on_disk = json.load(f)
  for key in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps",
              "test_accuracy", "majority_class_rate", "train_examples", "config"):
    assert key in on_disk
  assert on_disk["config"]["dp"]["noise_multiplier"] == cfg.dp.noise_multiplier
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(l) for l in lines]
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[0]["epsilon"] < records[1]["epsilon"] == summary["epsilon"]
  assert all(0 <= r["attack_accuracy"] <= 1 for r in records)
  params = np.load(tmp_path / "final_params.npz")
  assert sorted(params) == ["layers/0/bias", "layers/0/kernel", "layers/1/bias",
                            "layers/1/kernel"]
  assert params["layers/0/kernel"].shape == (9, 8)


def test_deterministic_noise_reproduces_and_entropy_noise_differs(dataset, tmp_path):
  a = train.train_and_evaluate(_config(dataset, num_epochs=1), str(tmp_path / "a"))
  b = train.train_and_evaluate(_config(dataset, num_epochs=1), str(tmp_path / "b"))
  c = train.train_and_evaluate(_config(dataset, num_epochs=1, **{"dp.noise_seed": None}),
                               str(tmp_path / "c"))
  pa, pb, pc = (np.load(tmp_path / w / "final_params.npz") for w in "abc")
  np.testing.assert_array_equal(pa["layers/0/kernel"], pb["layers/0/kernel"])
  assert not np.allclose(pa["layers/0/kernel"], pc["layers/0/kernel"])
  assert c["noise_key"] == "os entropy" and a["epsilon"] == c["epsilon"]


def test_vmap_clipping_with_microbatches_trains(dataset, tmp_path):
  summary = train.train_and_evaluate(
      _config(dataset, num_epochs=1, **{"dp.clipping": "vmap", "dp.microbatch_size": 16}),
      str(tmp_path))
  assert summary["test_accuracy"] > summary["majority_class_rate"]


def test_target_epsilon_is_met(dataset, tmp_path):
  # A target on the command line wins over the sigma of the config file.
  cfg = _config(dataset, num_epochs=1, **{"dp.target_epsilon": 2.0})
  assert cfg.dp.noise_multiplier == 1.0
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["epsilon"] <= 2.0
  assert summary["epsilon"] == pytest.approx(2.0, rel=1e-3)
  assert summary["noise_multiplier"] != 1.0


def test_non_private_mode_same_path(dataset, tmp_path):
  summary = train.train_and_evaluate(_config(dataset, num_epochs=1, **{"dp.enabled": False}),
                                     str(tmp_path))
  assert summary["dp_enabled"] is False and summary["epsilon"] == float("inf")
  assert summary["test_accuracy"] > summary["majority_class_rate"]


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  rows = 600
  x = np.full((rows, 3), np.nan, np.float32)
  y = np.zeros(rows)
  with data_lib.DatasetWriter(str(tmp_path / "nan"), feature_names=["a", "b", "c"],
                              label_name="y") as w:
    w.add("train", x[:500], y[:500])
    w.add("test", x[500:], y[500:])
  cfg = _config(str(tmp_path / "nan"), batch_size=50)
  cfg.data.attack_column = ""
  with pytest.raises(FloatingPointError, match="step 1"):
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
  with pytest.raises(ValueError, match="unknown config key 'dp.l2_norm_clp'"):
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

"""configs/from_json.py: the original system's JSON configs, mapped key by key, end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import from_json
from fastdp_jax import config as config_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax import summary as summary_lib
from tests.conftest import ROOT

ORIGINAL = os.path.join(ROOT, "configs", "original")


def _load(name):
  with open(os.path.join(ORIGINAL, name)) as f:
    return json.load(f)


def test_seq_train_values_map_onto_our_keys():
  original = _load("seq_train.json")
  cfg, lines = from_json.map_original(original)
  config_lib.validate(cfg)
  assert (cfg.num_epochs, cfg.batch_size) == (10, 256)
  assert (cfg.dp.l2_norm_clip, cfg.dp.noise_multiplier) == (3.0, 0.9)
  assert cfg.optimizer.name == "sgd" and cfg.optimizer.learning_rate == 0.01
  assert cfg.data.path == original["path"] and cfg.dp.enabled
  assert cfg.dp.noise_seed is None  # OS entropy, not the original's public seed
  # One line per key, saying where it went or why it is not mapped.
  for key in original:
    assert sum(l.strip().startswith(f"{key} = ") for l in lines) == 1, key
  assert any("minibatch_size = 3: not mapped: gradients are clipped per example" in l
             for l in lines)
  assert any("dp.delta = 1/(10 N) rounded down to a power of ten" in l for l in lines)


def test_dist_train_keys_are_explained_not_silently_dropped():
  original = _load("dist_train.json")
  cfg, lines = from_json.map_original(original)
  base, _ = from_json.map_original(_load("seq_train.json"))
  assert cfg.to_dict() == base.to_dict()  # the distributed keys change nothing here
  for key in ("world_size", "master_ip", "master_port", "dist_backend"):
    line = next(l for l in lines if l.strip().startswith(f"{key} = "))
    assert "not mapped" in line
  assert any("coordinator address for a multi-host launch: 127.0.0.1:23456" in l for l in lines)


@pytest.mark.parametrize("bad, message", [
    ({"num_epoch": 10, "learning_rate": 0.1}, "unknown key"),
    ({"num_epoch": "10"}, "not a number"),
    ({"num_epoch": 2.5}, "not an integer"),
    ({"lr": True}, "not a number"),
    ({"path": 3}, "not a string"),
    ([1, 2], "JSON object"),
])
def test_bad_original_configs_fail_naming_the_key(bad, message):
  with pytest.raises(ValueError, match=message):
    from_json.map_original(bad)


def test_get_config_needs_an_existing_json_file(tmp_path):
  with pytest.raises(ValueError, match="give the JSON file"):
    from_json.get_config()
  with pytest.raises(FileNotFoundError):
    from_json.get_config(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{num_epoch: 1")
  with pytest.raises(ValueError, match="not valid JSON"):
    from_json.get_config(str(tmp_path / "bad.json"))


def _ceiling_accuracy(path):
  """Test accuracy of the best classifier of the 9 binary features: the majority label of
  each of the 512 feature combinations, learned on the training split."""
  train = data_lib.load_split(path, "train")
  test = data_lib.load_split(path, "test")
  weights = 2 ** np.arange(train.features.shape[1])
  code_train = (train.features @ weights).astype(int)
  code_test = (test.features @ weights).astype(int)
  ones = np.bincount(code_train, weights=train.labels, minlength=512)
  rows = np.bincount(code_train, minlength=512)
  predict = ones > rows / 2
  return float(np.mean(predict[code_test] == (test.labels > 0.5)))


def test_seq_train_json_through_main_reaches_the_data_ceiling(tmp_path):
  """The original's seq_train.json values, unchanged but for the path, via main.py.

  The original reported 0.62-0.66 test accuracy on its California file, about what its data
  allowed. On the generated CaPUMS data (preprocessing.synthesize, calibrated to the real
  Fulton County file) the best classifier of these 9 binary features reaches about 0.677,
  above that band (on the real Fulton file: 0.682). So the check is what the band means
  here: reaching the data's ceiling (within 0.01), well above the majority class. At full
  scale (1.22 M rows, `make demo`) the same config gives 0.6766 against a ceiling of 0.677;
  on the real Fulton file converted to these features, 0.672 (ceiling 0.682).
  """
  from preprocessing import synthesize
  data = str(tmp_path / "capums")
  synthesize.write_shards(synthesize.synthesize_capums(50_000, seed=0, na_fraction=0.001),
                          data)
  original = _load("seq_train.json")
  original["path"] = data
  path = tmp_path / "seq_train.json"
  path.write_text(json.dumps(original))
  work = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "main.py", f"--config=configs/from_json.py:{path}", f"--workdir={work}",
       "--config.checkpoint.enabled=False"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "minibatch_size = 3: not mapped" in proc.stdout
  assert "lr = 0.01 -> optimizer.learning_rate = 0.01" in proc.stdout
  summary = summary_lib.read_summary(str(work))
  assert summary.config["dp"]["noise_multiplier"] == 0.9
  # T from the DP estimate of N (the default; the original treated N as public).
  assert summary.steps == 10 * round(summary.planned_num_examples / 256)
  assert summary.num_examples_source == "dp estimate" and summary.count_epsilon == 0.01
  ceiling = _ceiling_accuracy(data)
  acc = summary.test_accuracy
  assert acc >= summary.majority_class_rate + 0.03, (acc, summary.majority_class_rate)
  assert ceiling - 0.01 <= acc <= ceiling + 0.005, (acc, ceiling)

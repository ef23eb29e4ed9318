"""What a default run releases: model/ holds no data statistic, keys stay in keys.json.

A default run (both keys from the OS's entropy) through the real train_and_evaluate; then every
file is scanned: under model/ for the data digest, N and the training-row statistics the run
wrote to its private files; everywhere but keys.json for the keys' bytes and digits.
"""

import json
import os
import re
import stat

import numpy as np

from fastdp_jax import checkpoint
from fastdp_jax import errors
from fastdp_jax.data import shards as data_lib
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax.dp import release
from fastdp_jax import train
from tests.conftest import make_config, make_dataset


def _files(root):
  for base, _, names in os.walk(root):
    for name in names:
      yield os.path.join(base, name)


def _number_strings(value):
  """Ways a float may be written: repr, and 3 to 6 decimals (drops too-short ones)."""
  out = {repr(float(value))} | {f"{value:.{k}f}" for k in range(3, 7)}
  return {s for s in out if len(s.strip("0.-")) >= 3}


def test_default_run_is_private_and_releases_no_statistic_of_training_rows(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=3000, seed=11)
  cfg = make_config(data, **{"dp.noise_seed": None, "dp.sampling_seed": None,
                             "num_epochs": 2, "checkpoint.every_steps": 10})
  workdir = str(tmp_path / "w")
  summary = train.train_and_evaluate(cfg, workdir)
  train_split = data_lib.load_split(data, "train")
  n = len(train_split.labels)
  assert summary.private is True and summary.privacy_note is None
  assert summary.delta < 1 / n and summary.accountant_delta <= 1 / (10 * n)

  # model/: no N, no data digest, no training-row statistic (all of which the private files
  # of the same run hold).
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  leaks = {str(n), summary.data_digest, train_split.digest}
  for r in records:
    for key, value in r.items():
      if key.startswith(release.NONPRIVATE_PREFIX) and isinstance(value, float):
        leaks |= _number_strings(value)
  mia = summary.privacy_eval["membership_inference"]
  leaks |= _number_strings(mia["auc"])
  model_files = list(_files(os.path.join(workdir, "model")))
  assert {"params.npz", "model.json", "MODEL_CARD.md"} <= {os.path.basename(p)
                                                           for p in model_files}
  for path in model_files:
    text = open(path, "rb").read().decode("latin-1")
    for leak in leaks:
      assert not re.search(rf"(?<![\d.]){re.escape(leak)}(?!\d)", text), (path, leak)

  # The keys: in keys.json only (owner-only), in no other file, as bytes or as digits.
  keys = keys_lib.load(workdir)
  assert not keys.sampling_fixed and not keys.noise_fixed
  key_path = os.path.join(workdir, keys_lib.KEYS_FILE)
  assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
  assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
  assert stat.S_IMODE(os.stat(data).st_mode) == 0o700  # the dataset directory too
  needles = [keys.sampling.tobytes(), keys.noise.tobytes()]
  needles += [str(int(w)).encode() for w in np.concatenate([keys.sampling.astype(object),
                                                            keys.noise.astype(object)])]
  scanned = 0
  for path in _files(workdir):
    if os.path.abspath(path) == os.path.abspath(key_path):
      continue
    blob = open(path, "rb").read()
    scanned += 1
    for needle in needles:
      assert needle not in blob, (path, needle)
  assert scanned > 5  # checkpoints, metrics, summary, TensorBoard, model

  # Every output of the run has its entry (and status) in release.OUTPUTS.
  named = " ".join(release.OUTPUTS)
  for entry in os.listdir(workdir):
    name = "TensorBoard events" if entry.startswith("events.out.tfevents.") else entry
    assert name in named or f"{name}/" in named, entry
  assert "steps.jsonl" not in named and named.count("metrics.jsonl") == 1  # one metrics file


def test_forget_drops_keys_and_checkpoints_and_refuses_a_retrain(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=1500, seed=12)
  cfg = make_config(data, **{"num_epochs": 1, "checkpoint.keep_keys": False})
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(cfg, workdir)
  assert not os.path.exists(os.path.join(workdir, keys_lib.KEYS_FILE))
  assert not os.path.exists(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
  assert os.path.isfile(os.path.join(workdir, "model", "model.json"))
  try:
    train.train_and_evaluate(cfg, workdir)
  except errors.ResumeMismatchError as e:
    assert "keys and checkpoints were deleted" in str(e)
  else:
    raise AssertionError("a forgotten run was trained again")

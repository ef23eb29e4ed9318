"""What a default run releases: model/ holds no data statistic, keys stay in keys.json.

A default run (both keys from the OS's entropy) through the real train_and_evaluate; then every
file is scanned: under model/ for the data digest, N and the training-row statistics the run
wrote to its private files; everywhere but keys.json for the keys' bytes and digits.
"""

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np

from fastdp_jax import checkpoint
from fastdp_jax import errors
from fastdp_jax.data import shards as data_lib
from fastdp_jax.dp import count as count_lib
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
                             "data.num_examples_public": False,  # the default: a DP count
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
  leaks = {summary.data_digest, train_split.digest}
  if summary.planned_num_examples != n:  # the published DP estimate hits N with prob. 0.5 %
    leaks.add(str(n))
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


def test_forget_removes_every_private_leftover_and_says_what(tmp_path, capsys):
  # A finished run's workdir with what killed writers leave (a keys.json being written, a
  # model being staged), and the batch directory it trained from with a staging directory of
  # the batch job beside it: `checkpoint forget` deletes all of it, names each path, and
  # keeps what is not a batch directory and the public/private outputs that stay.
  work = tmp_path / "w"
  (work / checkpoint.CHECKPOINT_DIR / "10").mkdir(parents=True)
  (work / keys_lib.KEYS_FILE).write_text("{}")
  (work / count_lib.COUNT_FILE).write_text("{}")  # names the data's digest
  (work / ".keys.json.tmp-123-abcdef01").write_text("{}")
  (work / ".model.staging-0a1b2c3d-123-abcdef012345").mkdir()
  (work / "model").mkdir()
  (work / "metrics.jsonl").write_text("")
  batches = tmp_path / "batches"
  (batches / "private").mkdir(parents=True)
  (batches / "batches.json").write_text("{}")
  (batches / "private" / "sampling_key.json").write_text("{}")
  (tmp_path / ".batches.staging-0a1b2c3d-9-abcdef012345").mkdir()
  other = tmp_path / "other_batches"  # a batches path that is no batch directory: kept
  other.mkdir()
  (work / "summary.json").write_text(json.dumps({"batches": str(batches)}))
  assert checkpoint.main(["forget", str(work)]) == 0
  out = capsys.readouterr().out
  gone = [work / checkpoint.CHECKPOINT_DIR, work / keys_lib.KEYS_FILE, work / count_lib.COUNT_FILE,
          work / ".keys.json.tmp-123-abcdef01", work / ".model.staging-0a1b2c3d-123-abcdef012345",
          batches, tmp_path / ".batches.staging-0a1b2c3d-9-abcdef012345"]
  for path in gone:
    assert not os.path.lexists(path), path
    assert f"removed {path}\n" in out, (path, out)
  for kept in ("model", "metrics.jsonl", "summary.json", keys_lib.KEYS_DELETED):
    assert (work / kept).exists(), kept
  assert "it cannot be resumed" in out
  assert checkpoint.forget(str(work), batches=str(other)) == [
      f"kept {other}: not a batch directory (no batches.json)"]
  assert other.is_dir()


def test_forget_refuses_a_workdir_in_use(tmp_path, capsys):
  work = tmp_path / "w"
  work.mkdir()
  (work / "summary.json").write_text("{}")
  (work / keys_lib.KEYS_FILE).write_text("{}")
  lock = checkpoint.WorkdirLock(str(work))
  lock.acquire()
  try:
    r = subprocess.run([sys.executable, "-m", "fastdp_jax.checkpoint", "forget", str(work)],
                       capture_output=True, text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  finally:
    lock.release()
  assert r.returncode == 2 and "in use" in r.stderr and "nothing deleted" in r.stderr, r
  assert (work / keys_lib.KEYS_FILE).exists()


def test_a_streamed_runs_keys_file_holds_no_sampling_key():
  # A run that streams materialised batches never samples: keys.json stores no sampling key
  # (the batch directory keeps its own), and reading it back gives a key of zeros.
  drawn = keys_lib.draw(None, None, streamed=True)
  assert not drawn.sampling.any() and drawn.sampling_from_batches
  with_batches = dataclasses.replace(drawn, sampling=np.array([5, 7], np.uint64))
  stored = json.loads(with_batches.to_json())
  assert stored["sampling"] is None and stored["noise"] == [int(w) for w in drawn.noise]
  back = keys_lib.RunKeys.from_json(with_batches.to_json())
  assert not back.sampling.any() and back.sampling_from_batches
  in_memory = keys_lib.draw(None, None)
  assert in_memory.sampling.any() and not in_memory.sampling_from_batches
  assert json.loads(in_memory.to_json())["sampling"] == [int(w) for w in in_memory.sampling]

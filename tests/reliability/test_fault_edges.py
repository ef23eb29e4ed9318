"""Edges a fault trial found: too few training rows, a worker of a multi-process run killed, a
batch shard changed under a running trainer, the batch job killed while appending a block.

Every wait polls for an event (a file, a checkpoint, a line) within a generous bound; none
assumes the machine's speed. Runs that are stopped at a precise point use a small wrapper that
pauses the real command there (see ``_PAUSE_AFTER_FIRST_SAVE`` and ``_PAUSE_BEFORE_PUBLISH``):
the kill or the change then happens at that point on any machine, however fast.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax.data import batch_format as bf
from fastdp_jax.dp import plan as plan_lib
from tests import preprocessing_helpers as T
from tests.conftest import ROOT, make_config, make_dataset

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

_WAIT_S = 300  # bound on any one wait; a normal run needs a small fraction of it


def _one_error_line(r: subprocess.CompletedProcess) -> str:
  lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, \
      (r.returncode, r.stderr[-3000:])
  return lines[0]


def _train(*args: str, timeout: float = _WAIT_S) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "fastdp_jax", "--config=configs/test.py", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _saved_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _params(workdir) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, "final_params.npz")) as saved:
    return {k: saved[k] for k in saved.files}


def _wait_for(condition, what: str, proc: subprocess.Popen, log=None) -> None:
  """Polls ``condition()`` until true; fails if ``proc`` ends first or after ``_WAIT_S``."""
  deadline = time.monotonic() + _WAIT_S
  while not condition():
    if proc.poll() is not None or time.monotonic() > deadline:
      why = (f"no {what} within {_WAIT_S} s" if proc.returncode is None else
             f"the process ended (status {proc.returncode}) before {what}")
      with open(log) if log is not None else open(os.devnull) as f:
        raise AssertionError(f"{why}\n{f.read()[-3000:]}")
    time.sleep(0.05)


def _stop(proc: subprocess.Popen, group: bool = False) -> None:
  """Kills ``proc`` (and its process group) if it still runs; reaps it."""
  if proc.poll() is None:
    if group:
      os.killpg(proc.pid, signal.SIGKILL)
    else:
      proc.kill()
  proc.wait()


# --- 1. too few training rows -------------------------------------------------------------------
def _original_h5(path, train_rows: int) -> str:
  """The original system's single-file layout (dataset.h5) with ``train_rows`` train rows."""
  rng = np.random.default_rng(0)
  with h5py.File(path, "w") as f:
    for split, n in (("train", train_rows), ("test", 20)):
      f[f"x_{split}"] = (rng.random((n, 9)) < 0.4).astype(np.float32)
      f[f"y_{split}"] = (rng.random(n) < 0.5).astype(np.float32)
  return str(path)


@pytest.mark.parametrize("rows, extra, says", [
    # 1 row in all: the split puts it in the test split, none is left for training.
    pytest.param(1, (), "has no training rows (N = 0)", id="no_training_row"),
    # 40 rows (32 train) for a batch of 64: q = 64 / 32 > 1.
    pytest.param(40, (), "must be in (0, 1]", id="fewer_rows_than_the_batch"),
    # 100 rows (83 train), 42 of them held out: 41 left for a batch of 64.
    pytest.param(100, ("--config.data.validation_fraction=0.5",), "held out for validation",
                 id="validation_holds_them_out"),
    # An original single-file layout: the count is the file's shape, no row read.
    pytest.param(None, ("--config.data.feature_bounds=(0, 1)",), "has no training rows (N = 0)",
                 id="original_h5_without_train_rows"),
])
def test_too_few_training_rows_is_one_line_exit_2_before_the_workdir_exists(tmp_path, rows,
                                                                            extra, says):
  if rows is None:
    data = _original_h5(tmp_path / "dataset.h5", train_rows=0)
  else:
    data = make_dataset(str(tmp_path / "data"), rows=rows, seed=3)
  workdir = tmp_path / "w"
  line = _one_error_line(_train(f"--config.data.path={data}", f"--workdir={workdir}", *extra))
  assert says in line and f"data.path={data}" in line, line
  assert "ZeroDivisionError" not in line
  assert not workdir.exists()  # neither made nor locked: nothing to clean up


def test_the_privacy_plan_refuses_zero_training_rows_instead_of_dividing_by_zero(tmp_path):
  # The guard behind the early check, for callers of plan_privacy (notebooks, benchmarks).
  dp = config_lib.settings(make_config(str(tmp_path / "unused"))).dp
  for public in (None, 1000):  # a declared public N does not make up for no rows at all
    with pytest.raises(errors.ConfigError, match=r"no training rows \(N = 0\)"):
      plan_lib.plan_privacy(dp, batch_size=64, num_epochs=1, num_examples=0,
                            public_num_examples=public)
  with pytest.raises(errors.ConfigError, match=r"64 / 10 = 6\.4 must be in \(0, 1\]"):
    plan_lib.plan_privacy(dp, batch_size=64, num_epochs=1, num_examples=10)


# --- 2. SIGKILL of one process of a multi-process run --------------------------------------------
def _launch(dataset, workdir, log) -> subprocess.Popen:
  """The 2-process run (fixed seeds: configs/test.py sets dp.sampling_seed, dp.noise_seed)."""
  return subprocess.Popen(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2", "--",
       "--config=configs/test.py", f"--config.data.path={dataset}", f"--workdir={workdir}",
       "--config.num_epochs=4", "--config.steps_per_call=1", "--config.checkpoint.every_steps=10"],
      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _trainer_pid(launcher: int, process_id: int) -> int | None:
  """The pid of trainer ``process_id`` started by the launcher ``launcher`` (from /proc)."""
  for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
    try:
      with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      if ppid != launcher:
        continue
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = f.read().split(b"\0")
    except (OSError, IndexError, ValueError):
      continue  # gone meanwhile, or not ours to read
    if f"FASTDP_PROCESS_ID={process_id}".encode() in env:
      return pid
  return None


def test_sigkill_of_one_process_then_the_same_command_resumes_to_the_uninterrupted_model(
    tmp_path):
  dataset = make_dataset(str(tmp_path / "data"), rows=4000, seed=5)  # 50 updates per epoch
  with open(tmp_path / "ref.log", "w") as log:
    ref = _launch(dataset, tmp_path / "ref", log)
    try:
      assert ref.wait(timeout=2 * _WAIT_S) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
      _stop(ref, group=True)

  work = tmp_path / "killed"
  with open(tmp_path / "killed.log", "w") as log:
    run = _launch(dataset, work, log)
    try:
      _wait_for(lambda: _saved_steps(work), "a checkpoint", run, tmp_path / "killed.log")
      victim = _trainer_pid(run.pid, 1)
      assert victim is not None
      saved = _saved_steps(work)
      os.kill(victim, signal.SIGKILL)  # one worker, without warning
      code = run.wait(timeout=_WAIT_S)  # the launcher stops process 0 and reports
    finally:
      _stop(run, group=True)
  text = (tmp_path / "killed.log").read_text()
  assert code != 0 and "[launch] process 1 was killed by SIGKILL" in text, text[-3000:]
  assert not (work / "summary.json").exists(), "the run ended before the kill"
  assert saved and saved[-1] < 200

  with open(tmp_path / "again.log", "w") as log:
    again = _launch(dataset, work, log)
    try:
      assert again.wait(timeout=2 * _WAIT_S) == 0, (tmp_path / "again.log").read_text()[-3000:]
    finally:
      _stop(again, group=True)
  assert "resumed from" in (tmp_path / "again.log").read_text()
  a, b = _params(tmp_path / "ref"), _params(work)
  assert sorted(a) == sorted(b)
  # Same topology, same batches (dp.sampling_seed), same noise (dp.noise_seed), the same
  # compiled call of one update each time, and a checkpoint that stores the float32 state
  # exactly: nothing differs in the arithmetic, so the models are equal bit for bit.
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  sa, sb = (json.loads((w / "summary.json").read_text()) for w in (tmp_path / "ref", work))
  assert sb["steps"] == sa["steps"] == 200 and sb["epsilon"] == sa["epsilon"]


# --- Spark: the materialised batches ----------------------------------------------------------
@pytest.fixture(scope="module")
def spark():
  why_not = T.spark_available()
  if why_not is not None:
    pytest.skip(str(why_not))
  yield from T.spark_session("test_fault_edges")


# The trainer, paused after its first checkpoint until the test says go: the test changes a
# shard while the run is under way, at a known update. Its reader takes one update at a time,
# one read ahead (like a real run's batches, far larger than the reader's buffers), so the
# changed shard is read after the change.
_PAUSE_AFTER_FIRST_SAVE = """
import os, sys, time
from fastdp_jax import checkpoint
from fastdp_jax.data import batch_stream
batch_stream.BatchStream.reader.__kwdefaults__.update(read_bytes=1, prefetch=1)
save = checkpoint.Checkpointer.save
def paused_save(self, *args, **kw):
  save(self, *args, **kw)
  if not os.path.exists(os.environ["SAVED"]):
    open(os.environ["SAVED"], "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(os.environ["GO"]):
      if time.monotonic() > deadline:
        os._exit(99)
      time.sleep(0.05)
checkpoint.Checkpointer.save = paused_save
from fastdp_jax import __main__
sys.argv[0] = "fastdp_jax"
__main__.run()
"""


def test_a_batch_shard_changed_mid_run_stops_in_one_line_and_the_run_resumes(spark, tmp_path):
  from preprocessing import poisson_batches as pb  # local: needs pyspark
  dataset = make_dataset(str(tmp_path / "data"), rows=2500, seed=21)  # 31 updates per epoch
  batches = str(tmp_path / "batches")
  pb.run_job(spark, pb.plan_job(dataset, batches, batch_size=64, epochs=4, sampling_seed=0,
                                updates_per_shard=8))
  args = [f"--config.data.path={dataset}", f"--config.data.batches={batches}",
          "--config.num_epochs=4", "--config.checkpoint.every_steps=8"]
  ref = _train(*args, f"--workdir={tmp_path / 'ref'}")
  assert ref.returncode == 0, ref.stderr[-3000:]

  work, saved_flag, go = tmp_path / "w", tmp_path / "saved", tmp_path / "go"
  err_path = tmp_path / "w.err"
  with open(tmp_path / "w.out", "w") as out, open(err_path, "w") as err:
    run = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_AFTER_FIRST_SAVE, "--config=configs/test.py", *args,
         f"--workdir={work}"], cwd=ROOT, stdout=out, stderr=err,
        env=dict(os.environ, SAVED=str(saved_flag), GO=str(go)))
    try:
      _wait_for(saved_flag.exists, "the first checkpoint", run, err_path)
      saved = _saved_steps(work)
      # The last shard: its updates are far ahead of the paused run and its reader.
      block = bf.read_block(batches, bf.block_dirs(batches)[-1], bf.read_run(batches))
      shard = block.shards[-1]
      assert shard.first_update > saved[-1] + 8 + 2, (saved, shard)
      victim = os.path.join(batches, block.name, shard.file)
      shutil.copy(victim, tmp_path / "shard.bak")
      with h5py.File(victim, "r+") as f:  # in-bounds values: only the digest can tell
        x, m = f["features"][0], f["mask"][0]
        x[m] = 1 - x[m]
        f["features"][0] = x
      go.touch()
      code = run.wait(timeout=_WAIT_S)
    finally:
      _stop(run)
  stderr = err_path.read_text()
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (code, stderr[-3000:])
  assert victim in lines[0] and "sha256" in lines[0], lines[0]
  # The last checkpoint is intact and the run unfinished; restored, the same command resumes.
  assert _saved_steps(work) and not (work / "summary.json").exists()
  shutil.copy(tmp_path / "shard.bak", victim)
  again = _train(*args, f"--workdir={work}")
  assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
  a, b = _params(tmp_path / "ref"), _params(work)
  for k in a:  # the same batches, noise and calls as the uninterrupted run: equal
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_the_reader_hashes_a_shard_again_only_when_its_file_changed(spark, tmp_path,
                                                                   monkeypatch):
  """A touched but unchanged shard is hashed again and accepted, a rewritten one refused by
  name at its first read after the change, a restored one accepted; an untouched one is never
  hashed again (the check costs a stat)."""
  from fastdp_jax.data import batch_stream as bs
  from fastdp_jax.data import shards as data_lib
  from preprocessing import poisson_batches as pb  # local: needs pyspark
  dataset = make_dataset(str(tmp_path / "data"), rows=1000, seed=23)
  batches = str(tmp_path / "batches")
  pb.run_job(spark, pb.plan_job(dataset, batches, batch_size=64, epochs=1, sampling_seed=0,
                                updates_per_shard=4))
  stream = bs.open_batches(batches)
  block = bf.read_block(batches, bf.block_dirs(batches)[0], stream.run)
  first, last = block.shards[0], block.shards[-1]
  victim = os.path.join(batches, block.name, last.file)
  hashed = []
  real_hash = data_lib.sha256_file
  monkeypatch.setattr(data_lib, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
  whole = stream.read(0, stream.total_updates)
  assert hashed == []  # verified at open, unchanged since: no second hash
  os.utime(victim, ns=(time.time_ns() + 10**9,) * 2)  # touched, same bytes
  t = last.first_update
  np.testing.assert_array_equal(stream.read(t, 1)[0], whole[0][t:t + 1])
  assert hashed == [victim]
  shutil.copy(victim, tmp_path / "shard.bak")
  with h5py.File(victim, "r+") as f:
    f["mask"][0] = ~f["mask"][0]
  with pytest.raises(bf.BatchError, match=f"batch shard {victim}: changed on disk"):
    stream.read(t, 1)
  stream.read(first.first_update, 1)  # the other shards still read
  shutil.copy(tmp_path / "shard.bak", victim)
  np.testing.assert_array_equal(stream.read(t, last.num_updates)[1], whole[1][t:])


# The batch job, paused just before it publishes its block (every shard and block.json are in
# its staging directory), until it is killed; polled meanwhile for shards being written.
_PAUSE_BEFORE_PUBLISH = """
import os, sys, time
from fastdp_jax import atomic
from preprocessing import poisson_batches
def paused_publish(staging, path, overwrite=True):
  open(os.environ["PUBLISHING"], "w").close()
  time.sleep(300)
  os._exit(99)
atomic.publish = paused_publish
sys.exit(poisson_batches.main())
"""


def _tree(path) -> dict[str, str]:
  """Every file under ``path`` (hidden ones too) -> its sha256; block.json as its content
  without the producer's notes (Spark's master, seconds) and the digest that covers them."""
  out = {}
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if name == bf.BLOCK_MANIFEST:
        body = json.loads(open(full).read())
        out[rel] = json.dumps({k: v for k, v in body.items() if k not in ("extra", "digest")},
                              sort_keys=True)
      else:
        with open(full, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_sigkill_while_appending_a_block_then_the_rerun_writes_the_uninterrupted_batches(
    spark, tmp_path):
  from preprocessing import poisson_batches as pb  # local: needs pyspark
  dataset = make_dataset(str(tmp_path / "data"), rows=2500, seed=22)
  first = tmp_path / "first"
  pb.run_job(spark, pb.plan_job(dataset, str(first), batch_size=64, epochs=3, sampling_seed=1,
                                first_epoch=0, num_epochs_block=1, updates_per_shard=2))
  ref, work = tmp_path / "ref", tmp_path / "killed"
  shutil.copytree(first, ref)
  shutil.copytree(first, work)
  pb.run_job(spark, pb.plan_job(dataset, str(ref), batch_size=64, epochs=3, first_epoch=1,
                                updates_per_shard=2))  # uninterrupted

  append = ["--dataset", dataset, "--output", str(work), "--batch-size", "64", "--epochs", "3",
            "--first-epoch", "1", "--updates-per-shard", "2", "--master", "local[2]"]
  publishing, log = tmp_path / "publishing", tmp_path / "job.log"

  def staged() -> list[str]:
    return [os.path.join(work, d) for d in os.listdir(work) if ".staging-" in d]

  def staged_files() -> list[str]:
    try:
      return [n for s in staged() for n in os.listdir(s)]
    except FileNotFoundError:  # renamed or removed between the two listings
      return []

  def shards_written() -> bool:
    return publishing.exists() or any(n.endswith(".h5") for n in staged_files())

  with open(log, "w") as out:
    job = subprocess.Popen([sys.executable, "-c", _PAUSE_BEFORE_PUBLISH, *append], cwd=ROOT,
                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                           env=dict(os.environ, PUBLISHING=str(publishing)))
    try:
      _wait_for(shards_written, "a batch shard written", job, log)
      os.killpg(job.pid, signal.SIGKILL)  # the driver, its JVM and its Python workers
      job.wait()
    finally:
      _stop(job, group=True)
  # Where it was killed: while shards were being written, or (a machine too fast for the
  # poll) with every shard and block.json staged, just before the rename that publishes them.
  at_kill = staged_files()
  whole = bf.read_block(str(ref), "epochs-0001-0003", bf.read_run(str(ref)))
  print(f"killed with {sum(n.endswith('.h5') for n in at_kill)} of {len(whole.shards)} "
        f"shards staged, block.json staged: {bf.BLOCK_MANIFEST in at_kill}")
  left = staged()
  assert left and not (work / "epochs-0001-0003").exists(), os.listdir(work)
  assert bf.block_dirs(str(work)) == ["epochs-0000-0001"]  # readers see no half block

  again = subprocess.run([sys.executable, "-m", "preprocessing.poisson_batches", *append],
                         cwd=ROOT, capture_output=True, text=True, timeout=_WAIT_S)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"removed {left[0]}, left by a killed job" in again.stderr
  assert _tree(work) == _tree(ref)

"""Several processes on 127.0.0.1 (gloo collectives over loopback): the same model as one
process, each process reads its range of rows whatever the number of shards, only process 0
writes, and the death of one process stops the other, loudly."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import test as test_config
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import launch
from fastdp_jax import summary as summary_lib
from fastdp_jax import train
from tests.conftest import ROOT, make_dataset, make_unit_dataset
from tests.data.test_shards import write_raw_dataset

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  # Five train shards, so that two processes get different, unequal shares (2000 / 2800 rows).
  return make_dataset(str(tmp_path_factory.mktemp("mh") / "data"), rows=6000, seed=1,
                      max_rows_per_shard=1000)


def test_two_processes_give_the_one_process_model(dataset, tmp_path):
  cfg = test_config.get_config()
  cfg.data.path = dataset
  ref = train.train_and_evaluate(cfg, str(tmp_path / "one"))  # 1 process, 1 device, shard_map

  # 2 processes x 2 fake CPU devices, the other strategy: XLA inserts the all-reduce.
  work = tmp_path / "two"
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
       "--devices_per_process=2", "--", "--config=configs/test.py",
       f"--config.data.path={dataset}", "--config.parallel.strategy=auto", f"--workdir={work}"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stdout[-3000:]

  two = summary_lib.read_summary(str(work))
  assert two.num_processes == 2 and two.num_devices == 4
  assert two.steps == ref.steps and two.train_examples == ref.train_examples
  assert two.epsilon == pytest.approx(ref.epsilon, rel=1e-5)
  a, b = np.load(tmp_path / "one" / "final_params.npz"), np.load(work / "final_params.npz")
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.linalg.norm(a[k] - b[k]) <= 1e-5 * np.linalg.norm(a[k]), k

  # Each process read only its rows: contiguous ranges of N/2, cut inside a shard.
  n = manifest_lib.read_manifest(dataset).rows("train")
  assert f"process 0 holds training rows 0:{n // 2} of {n}" in r.stdout
  assert f"process 1 holds training rows {n // 2}:{n} of {n}" in r.stdout
  # Both processes log; only process 0 writes (one metrics line per epoch, not two).
  assert re.search(r"^\[0\] epoch 2/2", r.stdout, re.M)
  # User-facing lines come once, from process 0.
  assert re.search(r"^\[0\] done: epsilon", r.stdout, re.M)
  assert not re.search(r"^\[1\] done: epsilon", r.stdout, re.M)
  kinds = [json.loads(l)["kind"] for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert kinds.count("epoch") == cfg.num_epochs


def test_two_processes_train_a_unit_dataset_as_one_process(tmp_path):
  # A household dataset: every process reads the whole train split and places its devices'
  # units; 2 processes x 2 devices must give the 1-process, 1-device model (same unit batches,
  # drawn by unit key; each unit's clipped sum on the device that holds it).
  data = make_unit_dataset(str(tmp_path / "units"), units=1200, max_rows=4, seed=5)
  cfg = test_config.get_config()
  cfg.data.path = data
  ref = train.train_and_evaluate(cfg, str(tmp_path / "one"))
  work = tmp_path / "two"
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
       "--devices_per_process=2", "--", "--config=configs/test.py",
       f"--config.data.path={data}", f"--workdir={work}"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stdout[-3000:]
  two = summary_lib.read_summary(str(work))
  assert two.num_processes == 2 and two.num_devices == 4
  assert (two.steps, two.train_examples) == (ref.steps, ref.train_examples)
  assert two.epsilon == pytest.approx(ref.epsilon, rel=1e-5)
  a, b = np.load(tmp_path / "one" / "final_params.npz"), np.load(work / "final_params.npz")
  for k in a:  # float32 sums in another order: a few ulps per update
    assert np.linalg.norm(a[k] - b[k]) <= 1e-5 * np.linalg.norm(a[k]), k


def _reproducible(cfg):
  """Fixed noise and sampling seeds: a reproducibility run, comparable across topologies."""
  overrides = {"dp.noise_seed": 0, "batch_size": 512, "num_epochs": 1, "steps_per_call": 16,
               "checkpoint.enabled": False}
  if "sampling_seed" in cfg.dp:
    overrides["dp.sampling_seed"] = 0
  for key, value in overrides.items():
    group, _, name = key.rpartition(".")
    (cfg[group] if group else cfg)[name] = value
  return overrides


def test_one_train_shard_is_split_by_rows_between_two_processes(tmp_path):
  """40,000 rows written as ONE train shard: each process holds half of the train rows (HDF5
  slices of the same shard), and the model equals the 1-process model."""
  data = make_dataset(str(tmp_path / "data"), rows=40_000, seed=4, max_rows_per_shard=100_000)
  manifest = manifest_lib.read_manifest(data)
  assert len(manifest.shards_of("train")) == 1
  n = manifest.rows("train")
  cfg = test_config.get_config()
  cfg.data.path = data
  overrides = _reproducible(cfg)
  ref = train.train_and_evaluate(cfg, str(tmp_path / "one"))

  work = tmp_path / "two"
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
       "--devices_per_process=2", "--", "--config=configs/test.py",
       f"--config.data.path={data}", f"--workdir={work}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stdout[-3000:]
  assert f"process 0 holds training rows 0:{n // 2} of {n}" in r.stdout, r.stdout[-3000:]
  assert f"process 1 holds training rows {n // 2}:{n} of {n}" in r.stdout

  two = summary_lib.read_summary(str(work))
  assert two.num_processes == 2 and two.steps == ref.steps
  assert two.train_examples == ref.train_examples == n
  # Same batches and noise; only the float32 summation order of the clipped sum differs (four
  # per-device partial sums, then the all-reduce). That moves each update by about
  # batch_size * C * 2**-24 / batch_size = C * 6e-8 before the learning rate, so after
  # ``steps`` updates of lr 0.05 the parameters differ by at most ~steps * 0.05 * 3 * 6e-8
  # ~ 1e-6 of their O(1) norm: the bound 1e-5 has a 10x margin.
  a, b = np.load(tmp_path / "one" / "final_params.npz"), np.load(work / "final_params.npz")
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.linalg.norm(a[k] - b[k]) <= 1e-5 * np.linalg.norm(a[k]), k


def test_a_bad_row_on_one_process_stops_every_process_naming_the_shard(tmp_path):
  """Process 1 alone reads the bad row; process 0 must not wait for it in a collective, and
  both say which shard and column, before any update."""
  src = make_dataset(str(tmp_path / "src"), rows=3000, seed=2)
  train_rows, test_rows = (data_lib.load_split(src, s) for s in manifest_lib.SPLITS)
  n = len(train_rows)
  x = train_rows.features.copy()
  x[n - 5, 3] = 1e30  # in process 1's half, second shard
  names = manifest_lib.read_manifest(src).feature_names
  bad = write_raw_dataset(str(tmp_path / "bad"), {
      "train-0.h5": ("train", x[:1000], train_rows.labels[:1000]),
      "train-1.h5": ("train", x[1000:], train_rows.labels[1000:]),
      "test-0.h5": ("test", test_rows.features, test_rows.labels)}, names=names)
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
       "--devices_per_process=2", "--", "--config=configs/test.py",
       f"--config.data.path={bad}", f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert r.returncode != 0
  where = f"shard train-1.h5: column '{names[3]}' has 1 value(s) outside its declared bounds"
  lines = r.stdout.splitlines()
  assert any(line.startswith("[0] ") and "process 1 refused its training rows" in line
             and where in line for line in lines), r.stdout[-3000:]
  # Process 1 says the same (unless the launcher stopped it first, once process 0 failed).
  assert all(where in line for line in lines if line.startswith("[1] error")), r.stdout[-3000:]
  assert "epoch 1/" not in r.stdout and not (tmp_path / "w" / "metrics.jsonl").exists()


def _start(dataset, tmp_path, port, rank):
  out = open(tmp_path / f"out{rank}.txt", "w")
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/test.py", f"--config.data.path={dataset}",
       "--config.num_epochs=500", "--config.checkpoint.enabled=False",
       f"--workdir={tmp_path}/w", f"--coordinator_address=127.0.0.1:{port}",  # one, shared
       "--num_processes=2", f"--process_id={rank}", "--heartbeat_timeout_s=5",
       "--init_timeout_s=60"],
      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_killing_one_process_stops_the_other_with_a_message(dataset, tmp_path, victim):
  port = launch.free_port()
  procs = [_start(dataset, tmp_path, port, rank) for rank in (0, 1)]
  try:
    deadline = time.monotonic() + 120
    while "epoch 1/500" not in (tmp_path / "out0.txt").read_text():  # training is under way
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          (tmp_path / "out0.txt").read_text()[-3000:]
      time.sleep(0.2)
    assert (tmp_path / "w" / "metrics.jsonl").exists()  # written by process 0
    procs[victim].send_signal(signal.SIGKILL)
    survivor = procs[1 - victim]
    # A hang would never end: the wait is bounded by the 2 minutes (TimeoutExpired
    # fails the test); a 5 s heartbeat normally ends it within seconds, but no duration is
    # asserted, since CI's CPU may be slower or busier.
    code = survivor.wait(timeout=115)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = (tmp_path / f"out{1 - victim}.txt").read_text()
  assert code != 0
  assert ("another task died" in text or "lost contact with another process" in text
          or "stopped answering" in text or "lost contact with the coordinator" in text), \
      text[-3000:]


def test_sigterm_to_one_process_checkpoints_every_process_at_the_same_update(dataset, tmp_path,
                                                                             capsys):
  """A scheduler's SIGTERM to one host: JAX's coordination service tells the other, both
  checkpoint the same update and exit 143, and the same commands resume to the one-process
  model; so does one process alone (the checkpoint and the batches are the topology's own
  no more than the model is)."""
  cfg = test_config.get_config()
  cfg.data.path = dataset
  ref = train.train_and_evaluate(cfg, str(tmp_path / "one"))  # 1 process, 1 device

  def start(tag, port, rank):
    out = open(tmp_path / f"{tag}{rank}.txt", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "main.py", "--config=configs/test.py",
         f"--config.data.path={dataset}", f"--workdir={tmp_path}/w",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={rank}", "--heartbeat_timeout_s=10", "--init_timeout_s=60"],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

  def run_both(tag, until=None):
    port = launch.free_port()
    procs = [start(tag, port, rank) for rank in (0, 1)]
    try:
      if until is not None:  # a line of process 1's, then SIGTERM to process 1 alone
        deadline = time.monotonic() + 120
        while until not in (tmp_path / f"{tag}1.txt").read_text():
          assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
              (tmp_path / f"{tag}1.txt").read_text()[-3000:]
          time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
      codes = [p.wait(timeout=200) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    return codes, [(tmp_path / f"{tag}{rank}.txt").read_text() for rank in (0, 1)]

  # Signalled once it has joined the run (JAX's notifier is installed) and read its rows, so
  # the stop comes at one of the first calls, whatever the machine's speed.
  codes, texts = run_both("term", until="process 1 holds training rows")
  assert codes == [143, 143], [t[-2000:] for t in texts]
  stops = [re.findall(r"^stopped by SIGTERM after update (\d+): checkpoint saved", t, re.M)
           for t in texts]
  assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # the same update on both
  step = int(stops[0][0])
  saved = sorted(int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit())
  assert saved[-1] == step < ref.steps, saved
  assert not (tmp_path / "w" / "summary.json").exists()
  shutil.copytree(tmp_path / "w", tmp_path / "w1")  # to be resumed by one process

  codes, texts = run_both("again")
  assert codes == [0, 0], [t[-2000:] for t in texts]
  assert f"at update {step} " in texts[0] and "resumed from" in texts[0], texts[0][-3000:]
  two = summary_lib.read_summary(str(tmp_path / "w"))
  assert two.steps == ref.steps and two.epsilon == pytest.approx(ref.epsilon, rel=1e-5)
  # The bound of test_one_train_shard_is_split_by_rows_between_two_processes: the topologies
  # differ in float32 summation order only.
  a, b = np.load(tmp_path / "one" / "final_params.npz"), np.load(tmp_path / "w" /
                                                                "final_params.npz")
  for k in a:
    assert np.linalg.norm(a[k] - b[k]) <= 1e-5 * np.linalg.norm(a[k]), k

  capsys.readouterr()
  one = train.train_and_evaluate(cfg, str(tmp_path / "w1"))  # 1 process, 1 device
  assert f"at update {step} " in capsys.readouterr().out  # resumed, not started afresh
  assert one.steps == ref.steps and one.epsilon == pytest.approx(ref.epsilon, rel=1e-5)
  kinds = [json.loads(l)["kind"] for l in (tmp_path / "w1" / "metrics.jsonl").read_text()
           .splitlines()]
  assert kinds.count("epoch") == cfg.num_epochs
  c = np.load(tmp_path / "w1" / "final_params.npz")
  for k in a:
    assert np.linalg.norm(a[k] - c[k]) <= 1e-5 * np.linalg.norm(a[k]), k

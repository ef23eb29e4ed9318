"""A lost peer ends every other process with one clear line; a badly started run is refused.

Two processes on 127.0.0.1 with a 5 s heartbeat. For each fault (a process killed with
SIGKILL, or hung with SIGSTOP; the worker or the coordinator; a process that never joins; a
coordinator that is not there) the survivor must exit with a non-zero status, print exactly
one ``error:`` line saying which process, what happened and how to resume, and print neither
JAX's C++ fatal report nor Python's fault-handler dump of every thread (before: exit -6 and
both). The waits are generous timeouts, never assertions about speed.

A run whose processes were given different workdirs or configs, or whose workdir is not one
directory shared by all of them, is refused on every process before any training (before:
two workdirs trained an epoch, then hung 600 s in the first checkpoint save).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastdp_jax import distributed
from fastdp_jax import launch
from tests.conftest import ROOT, make_dataset

HEARTBEAT_S = 5
WAIT_S = 120  # generous: a loaded 2-core machine; the fault takes about HEARTBEAT_S

# What JAX and Python printed before: none of it may appear.
_DUMPS = ("Fatal Python error", "Thread 0x", "Check failure stack trace",
          "Terminating process because", "Current thread 0x")

# A process of a multi-process run, as the trainer starts it (absl's app.run enables the fault
# handler whose thread dump must not appear), looping over collectives until it is stopped.
_WORKER = textwrap.dedent("""
    import faulthandler, os, sys, time
    faulthandler.enable()
    sys.path.insert(0, {root!r})
    from fastdp_jax import distributed
    rank, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    distributed.initialize(f"127.0.0.1:{{port}}", 2, rank,
                           initialization_timeout_s=float(os.environ.get("INIT_S", "60")),
                           heartbeat_timeout_s={beat})
    if os.environ.get("PRIVATE_DIR"):
      # This process's host has its own directory at the workdir's path (not shared): it
      # looks for process 0's files in PRIVATE_DIR instead.
      shared, private, holds = workdir, os.environ["PRIVATE_DIR"], distributed._holds
      distributed._holds = lambda path, text: holds(path.replace(shared, private), text)
    import numpy as np
    from jax.experimental import multihost_utils
    from fastdp_jax import errors
    with distributed.exit_promptly_on_failure():
      try:
        distributed.check_same_start(workdir, "config", shared_timeout_s=3)
      except errors.UserError as e:  # as the trainer's command line reports it
        print(f"error: {{e}}", file=sys.stderr, flush=True)
        sys.exit(2)
      print("ready", flush=True)
      i = 0
      while True:
        multihost_utils.process_allgather(np.array([i]))
        i += 1
        time.sleep(0.05)
    """)


def _env(**extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)


@pytest.fixture()
def worker(tmp_path):
  path = tmp_path / "worker.py"
  path.write_text(_WORKER.format(root=ROOT, beat=HEARTBEAT_S))
  return str(path)


def _start(worker, tmp_path, port, rank, **env):
  out = open(tmp_path / f"out{rank}.txt", "w")
  err = open(tmp_path / f"err{rank}.txt", "w")
  return subprocess.Popen([sys.executable, worker, str(rank), str(port), str(tmp_path / "w")],
                          cwd=ROOT, env=_env(**env), stdout=out, stderr=err)


def _wait_for(predicate, procs, what):
  deadline = time.monotonic() + WAIT_S
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    assert all(p.poll() is None for p in procs), f"a process ended while waiting for {what}"
    time.sleep(0.2)


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()  # also ends a stopped process
      p.wait()


def _one_error_line(stderr: str) -> str:
  errors_ = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(errors_) == 1, stderr[-3000:]
  for dump in _DUMPS:
    assert dump not in stderr, stderr[-3000:]
  return errors_[0]


@pytest.mark.parametrize("victim,sig,expected", [
    (1, signal.SIGKILL, "process 0 of 2: process 1 stopped answering"),
    (1, signal.SIGSTOP, "process 0 of 2: process 1 stopped answering"),
    (0, signal.SIGKILL, "process 1 of 2: lost contact with the coordinator (process 0"),
    (0, signal.SIGSTOP, "process 1 of 2: lost contact with the coordinator (process 0"),
], ids=["worker_killed", "worker_hung", "coordinator_killed", "coordinator_hung"])
def test_a_lost_peer_ends_the_survivor_with_one_line(worker, tmp_path, victim, sig, expected):
  port = launch.free_port()
  procs = [_start(worker, tmp_path, port, rank) for rank in (0, 1)]
  try:
    _wait_for(lambda: all("ready" in (tmp_path / f"out{r}.txt").read_text() for r in (0, 1)),
              procs, "both processes to run")
    os.kill(procs[victim].pid, sig)
    code = procs[1 - victim].wait(timeout=WAIT_S)
  finally:
    _kill_all(procs)
  line = _one_error_line((tmp_path / f"err{1 - victim}.txt").read_text())
  assert code == distributed.PEER_LOST_EXIT_CODE
  assert expected in line, line
  assert "to resume, rerun the same command on every process" in line
  assert str(tmp_path / "w") in line  # the workdir whose checkpoint a rerun resumes from


def test_a_process_that_never_joins_ends_the_others_with_one_line(worker, tmp_path):
  p = _start(worker, tmp_path, launch.free_port(), 0, INIT_S="5")  # process 1 never starts
  try:
    code = p.wait(timeout=WAIT_S)
  finally:
    _kill_all([p])
  line = _one_error_line((tmp_path / "err0.txt").read_text())
  assert code == distributed.PEER_LOST_EXIT_CODE
  assert "process 0 of 2: not all 2 processes joined the coordinator at 127.0.0.1:" in line


def test_a_workdir_that_is_not_shared_is_refused_by_every_process(worker, tmp_path):
  private = tmp_path / "host1"
  private.mkdir()
  port = launch.free_port()
  procs = [_start(worker, tmp_path, port, 0), _start(worker, tmp_path, port, 1,
                                                      PRIVATE_DIR=str(private))]
  try:
    codes = [p.wait(timeout=WAIT_S) for p in procs]
  finally:
    _kill_all(procs)
  for rank in (0, 1):
    line = _one_error_line((tmp_path / f"err{rank}.txt").read_text())
    assert f"workdir {tmp_path / 'w'} is not shared between the processes: processes [1] " \
           "do not see the file process 0 wrote there" in line, line
    assert "ready" not in (tmp_path / f"out{rank}.txt").read_text()
  assert codes == [2, 2], codes
  assert not [f for f in os.listdir(tmp_path / "w") if f.startswith(".shared-check")]


# ------------------------------------------------------------- the trainer's command line

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("peers") / "data"), rows=3000, seed=3)


def _trainer(dataset, workdir, port, rank, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
       f"--config.data.path={dataset}", f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={rank}",
       f"--heartbeat_timeout_s={HEARTBEAT_S}", "--init_timeout_s=60", *extra],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("difference,expected", [
    ("workdir", "--workdir differs between processes (processes [1] differ from process 0"),
    ("config", "the config differs between processes (processes [1] differ from process 0)"),
])
def test_processes_started_differently_are_refused_before_training(dataset, tmp_path,
                                                                  difference, expected):
  port = launch.free_port()
  workdirs = ([tmp_path / "w0", tmp_path / "w1"] if difference == "workdir"
              else [tmp_path / "w"] * 2)
  extra = [[], ["--config.seed=7"] if difference == "config" else []]
  procs = [_trainer(dataset, workdirs[r], port, r, *extra[r]) for r in (0, 1)]
  try:
    results = [p.communicate(timeout=WAIT_S) for p in procs]
  finally:
    _kill_all(procs)
  for rank, (p, (out, err)) in enumerate(zip(procs, results)):
    assert p.returncode == 2, (rank, err[-3000:])
    assert expected in _one_error_line(err), err[-3000:]
    assert "epoch 1/" not in out
  for w in set(workdirs):  # refused before any training: nothing written
    assert not (w / "metrics.jsonl").exists()


def test_a_hung_trainer_process_ends_the_other_with_one_line(dataset, tmp_path):
  port = launch.free_port()
  work = tmp_path / "w"
  procs = [_trainer(dataset, work, port, r, "--config.num_epochs=500",
                    "--config.checkpoint.enabled=False") for r in (0, 1)]
  try:
    lines = []  # process 0's stdout, read while it trains
    _wait_for(lambda: lines.append(procs[0].stdout.readline()) or "epoch 1/500" in lines[-1],
              procs, "the first epoch")
    os.kill(procs[1].pid, signal.SIGSTOP)  # hung: its connections stay open
    out, err = procs[0].communicate(timeout=WAIT_S)
  finally:
    _kill_all(procs)
  assert procs[0].returncode == distributed.PEER_LOST_EXIT_CODE, err[-3000:]
  line = _one_error_line(err)
  assert line == ("error: process 0 of 2: process 1 stopped answering (no heartbeat for "
                  f"{HEARTBEAT_S} s: killed, hung or unreachable); stopping; to resume, rerun "
                  "the same command on every process (training continues from the last "
                  f"checkpoint in {work})"), line

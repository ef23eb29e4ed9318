"""Distributed training in one process: the data layout over processes and devices, where the
topology comes from, the launcher, and (8 fake devices, in their own process) that both
all-reduce strategies reproduce the single-device parameters with one all-reduce per update.
"""

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastdp_jax.dp import clipping
from fastdp_jax.data import shards as data_lib
from fastdp_jax import distributed
from fastdp_jax import launch
from fastdp_jax import models
from fastdp_jax.dp import noise
from fastdp_jax import parallel
from fastdp_jax.dp import sampling
from fastdp_jax import step as step_lib
from tests.conftest import ROOT


# Process row ranges (data.process_row_ranges, which replaced whole-shard assignment) are
# tested in tests/data/test_shards.py.


def test_device_bounds_split_each_process_range_evenly():
  bounds, per = parallel.device_bounds([2000, 2801], [2, 2])
  np.testing.assert_array_equal(bounds, [0, 1000, 2000, 3401, 4801])
  assert per == 1401
  bounds, per = parallel.device_bounds([0, 5], [2, 1])  # a process without rows
  np.testing.assert_array_equal(bounds, [0, 0, 0, 5])
  assert per == 5


def test_single_process_layout_matches_one_range_per_device(tmp_path):
  from tests.conftest import make_dataset
  path = make_dataset(str(tmp_path / "d"), rows=3000, max_rows_per_shard=700)
  mesh = parallel.make_mesh()
  local, dev = parallel.load_training_data(mesh, path)
  full = data_lib.load_split(path, "train")
  assert dev.num_examples == len(full) == len(local)
  np.testing.assert_array_equal(local.features, full.features)
  k = mesh.devices.size
  per = dev.features.shape[0] // k
  x = np.asarray(dev.features).reshape(k, per, -1)
  for d in range(k):  # device d's block starts with global rows bounds[d]:bounds[d+1]
    lo, hi = dev.bounds[d], dev.bounds[d + 1]
    np.testing.assert_array_equal(x[d, :hi - lo], full.features[lo:hi])


@pytest.mark.parametrize("args,env,expected", [
    ((None, None, None), {}, ("single", None, 1, 0)),
    (("h:1", 2, 1), {}, ("flags", "h:1", 2, 1)),
    ((None, None, None), {"FASTDP_COORDINATOR_ADDRESS": "e:2", "FASTDP_NUM_PROCESSES": "3",
                          "FASTDP_PROCESS_ID": "2"}, ("environment", "e:2", 3, 2)),
    # Flags win over the environment.
    (("h:1", 2, 0), {"FASTDP_COORDINATOR_ADDRESS": "e:2"}, ("flags", "h:1", 2, 0)),
    ((None, None, None), {"SLURM_NTASKS": "4"}, ("cluster", None, None, None)),
    ((None, None, None), {"SLURM_NTASKS": "1"}, ("single", None, 1, 0)),
    ((None, 1, None), {}, ("single", None, 1, 0)),
])
def test_resolve_topology(args, env, expected):
  t = distributed.resolve(*args, environ=env)
  assert (t.source, t.coordinator_address, t.num_processes, t.process_id) == expected


@pytest.mark.parametrize("args,match", [
    (("h:1", 2, None), "process_id"), (("h:1", 2, 2), "process_id=2"), (("h", 2, 0), "HOST:PORT")])
def test_resolve_rejects_incomplete_topology(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(*args, environ={})


def test_unreachable_coordinator_fails_with_one_clear_line(tmp_path):
  port = launch.free_port()  # nobody listens there
  r = subprocess.run([sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
                      f"--workdir={tmp_path}/w", f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", "--process_id=1", "--init_timeout_s=2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  errors_ = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors_) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert f"coordinator 127.0.0.1:{port} unreachable after 2 s" in errors_[0]


# ---------------------------------------------------------------- one line for a lost peer

@pytest.fixture
def run_info(monkeypatch):
  info = distributed._Run(process_id=1, num_processes=2, coordinator_address="10.0.0.1:1234",
                          init_s=90, beat_s=60, workdir="/shared/runs/a")
  monkeypatch.setattr(distributed, "_RUN", info)
  return info


# The statuses JAX 0.10 reported in each case (tried with two processes), after "Status:".
_HEARTBEATS = ("UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n"
               "{tasks}\nThe tasks have crashed. Check the task logs for an earlier error, or "
               "scheduler events (e.g. preemption, eviction) to debug further.\n\n"
               "RPC: /xla.coordination.CoordinationService/PollForError "
               "[type.googleapis.com/tensorflow.CoordinationServiceError='']\n")
_LEADER_GONE = ("UNAVAILABLE: Failed to send RPC to coordination service. Either the leader "
                "task was preempted/died/restarted unexpectedly or this task is experiencing "
                "network issues.\nAdditional GRPC error information from remote target "
                "coordination_service while calling /xla.coordination.CoordinationService/"
                "PollForError:\n:UNKNOWN:Error received from peer  {grpc_status:14, "
                "grpc_message:\"Socket closed\"}\n")
_LEADER_HUNG = "DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/Heartbeat\n"
_NEVER_JOINED = "DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/RegisterTask\n"
_RESUME = ("to resume, rerun the same command on every process (training continues from the "
           "last checkpoint in /shared/runs/a)")


@pytest.mark.parametrize("status,expected", [
    (_HEARTBEATS.format(tasks="0"), "error: process 1 of 2: process 0 stopped answering (no "
     f"heartbeat for 60 s: killed, hung or unreachable); stopping; {_RESUME}"),
    (_HEARTBEATS.format(tasks="0\n2"), "error: process 1 of 2: processes 0, 2 stopped "
     f"answering (no heartbeat for 60 s: killed, hung or unreachable); stopping; {_RESUME}"),
    (_HEARTBEATS.format(tasks="1"), "error: process 1 of 2: the coordinator declared this "
     "process dead (no heartbeat from it for 60 s: was it suspended or overloaded?); "
     f"stopping; {_RESUME}"),
    (_LEADER_GONE, "error: process 1 of 2: lost contact with the coordinator (process 0 at "
     f"10.0.0.1:1234): it died, hung or is unreachable; stopping; {_RESUME}"),
    (_LEADER_HUNG, "error: process 1 of 2: lost contact with the coordinator (process 0 at "
     f"10.0.0.1:1234): it died, hung or is unreachable; stopping; {_RESUME}"),
    (_NEVER_JOINED, "error: process 1 of 2: not all 2 processes joined the coordinator at "
     "10.0.0.1:1234 within 90 s; start every process with the same --num_processes and "
     "coordinator address (and a distinct --process_id), then rerun"),
], ids=["peer", "two_peers", "this_one", "coordinator_died", "coordinator_hung",
        "never_joined"])
def test_fatal_status_becomes_one_line(run_info, status, expected):
  assert distributed.describe_fatal_status(status) == expected


@pytest.mark.parametrize("text,lost", [
    ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
     "[127.0.0.1]:9609: Connection reset by peer", True),
    ("INTERNAL: Gloo AllReduce failed: Connection closed by peer [127.0.0.1]:3491", True),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB", False),
    ("sampling rate q must be in (0, 1]", False),
])
def test_lost_peer_is_told_apart_from_other_errors(text, lost):
  assert distributed.is_lost_peer(ValueError(text)) is lost


_GUARDED = textwrap.dedent("""
    import ctypes, faulthandler, os, sys
    faulthandler.enable()  # as absl's app.run does: its dump of every thread must not appear
    sys.path.insert(0, {root!r})
    from fastdp_jax import distributed
    distributed._RUN = distributed._Run(process_id=1, num_processes=2,
                                        coordinator_address="127.0.0.1:1", init_s=9, beat_s=5)
    distributed._RUN.guard = distributed._FatalErrorGuard.install()
    print("a line of Python's own", file=sys.stderr, flush=True)
    os.write(2, b"W1201 09:00:00.000000 1 gloo.cc:1] an unrelated C++ warning\\n")
    if sys.argv[1] == "report":  # what JAX's coordination client writes before abort()
      os.write(2, b"E1201 09:00:00.000000 2 coordination_service_agent.cc:289] Polled an error "
                  b"from coordination service (this can be an error from this or another "
                  b"task).\\n")
      os.write(2, b"F1201 09:00:00.000000 2 client.h:80] Terminating process because the JAX "
                  b"distributed service detected fatal errors. This most likely indicates that "
                  b"another task died; absl::Status: UNAVAILABLE: The following tasks are "
                  b"unhealthy (stopped sending heartbeats):\\n0\\nThe tasks have crashed.\\n\\n"
                  b"RPC: /xla.coordination.CoordinationService/PollForError\\n"
                  b"*** Check failure stack trace: ***\\n    @     0x7fa75c610634  absl::Flush()\\n")
    ctypes.CDLL(None).abort()
    """)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux-only")
@pytest.mark.parametrize("case", ["report", "other_abort"])
def test_guard_turns_jax_fatal_report_into_one_line(tmp_path, case):
  script = tmp_path / "guarded.py"
  script.write_text(_GUARDED.format(root=ROOT))
  r = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True,
                     timeout=120)
  # Everything else still comes through, whole.
  assert "a line of Python's own\n" in r.stderr
  assert "W1201 09:00:00.000000 1 gloo.cc:1] an unrelated C++ warning\n" in r.stderr
  for dump in ("Fatal Python error", "Thread 0x", "Current thread", "Polled an error",
               "Terminating process", "Check failure"):
    assert dump not in r.stderr, r.stderr
  if case == "report":
    assert r.returncode == distributed.PEER_LOST_EXIT_CODE, r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [
        "error: process 1 of 2: process 0 stopped answering (no heartbeat for 5 s: killed, "
        "hung or unreachable); stopping; to resume, rerun the same command on every process "
        "(training continues from the last checkpoint in the workdir)"]
  else:  # an abort that is not JAX's report: the process still ends by SIGABRT, a while later
    assert r.returncode == -6, r.stderr
    assert "error:" not in r.stderr


class _Recorder(io.RawIOBase):
  def __init__(self):
    self.writes = []

  def writable(self):
    return True

  def write(self, b):
    self.writes.append(bytes(b))
    return len(b)


def test_stdout_writes_each_line_whole_in_a_multiprocess_run(monkeypatch):
  # The hazard: under PYTHONUNBUFFERED (as the launcher sets it) print() writes the text and
  # its newline separately, and another thread's output can land between them.
  raw = _Recorder()
  monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
  print("epoch 1/2  train_loss* 0.6398")
  assert raw.writes == [b"epoch 1/2  train_loss* 0.6398", b"\n"]
  raw.writes.clear()
  distributed._line_buffer_stdout()  # what initialize() does for a multi-process run
  print("epoch 2/2  train_loss* 0.6040")
  print("done")
  assert raw.writes == [b"epoch 2/2  train_loss* 0.6040\n", b"done\n"]


def test_single_process_start_checks_nothing(tmp_path):
  distributed.check_same_start(str(tmp_path / "never-created"), {"any": "config"})
  assert not (tmp_path / "never-created").exists()


# Two processes on loopback, each checking a value with check_same_on_all_processes (a
# multihost_utils.assert_equal underneath) and printing the one line a user would get.
_AGREEMENT_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from fastdp_jax import distributed
    rank, port, value = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    distributed.initialize(f"127.0.0.1:{{port}}", 2, rank, initialization_timeout_s=60)
    try:
      distributed.check_same_on_all_processes("the data digest", value)
      print("same", flush=True)
    except distributed.ProcessMismatchError as e:
      print(f"error: {{e}}", flush=True)
    distributed.check_same_on_all_processes("a second check", "agreed")  # still in step
    print("done", flush=True)
    """)


@pytest.mark.parametrize("values,expected", [
    (("abc", "abc"), "same"),
    (("abc", "abd"), "error: the data digest differs between processes (processes [1] differ "
                     "from process 0); start every process with the same config and data"),
])
def test_processes_agree_or_every_one_names_who_differs(tmp_path, values, expected):
  script = tmp_path / "worker.py"
  script.write_text(_AGREEMENT_WORKER.format(root=ROOT))
  port = str(launch.free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(script), str(r), port, values[r]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for r in (0, 1)]
  try:
    outs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    ours = [line for line in out.splitlines() if not line.startswith("[Gloo]")]  # gloo's own
    assert ours == [expected, "done"], (out, err[-3000:])


# ---------------------------------------------------------------- the launcher

def test_launcher_runs_the_trainer_module():
  assert launch.trainer_command() == [sys.executable, "-m", "fastdp_jax"]


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(textwrap.dedent("""
      import os, pathlib, sys, time
      rank = int(os.environ["FASTDP_PROCESS_ID"])
      print("rank", rank, "of", os.environ["FASTDP_NUM_PROCESSES"],
            os.environ["FASTDP_COORDINATOR_ADDRESS"], sys.argv[1:], flush=True)
      here = pathlib.Path(__file__).parent
      (here / f"printed-{rank}").touch()
      if rank == 1:
        # Fail only once every process has printed: on a slow machine a process still starting
        # Python when the others are stopped would have nothing to forward.
        deadline = time.monotonic() + 60
        while (not all((here / f"printed-{i}").exists() for i in range(3))
               and time.monotonic() < deadline):
          time.sleep(0.05)
        sys.exit(3)
      time.sleep(120)  # would outlive the test unless the launcher stops it
      """))
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.launch", "--num_processes=3",
                      f"--script={script}", "--", "--x=1"], cwd=ROOT, capture_output=True,
                     text=True, timeout=100)
  assert r.returncode == 3
  lines = r.stdout.splitlines()
  for i in range(3):  # every process's output is forwarded with its rank prefix
    assert any(re.match(rf"\[{i}\] rank {i} of 3 127\.0\.0\.1:\d+ \['--x=1'\]", l) for l in lines)
  assert "[launch] process 1 exited with status 3; stopping the others" in r.stdout


def test_launcher_names_the_signal_that_killed_a_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(textwrap.dedent("""
      import os, signal, time
      if os.environ["FASTDP_PROCESS_ID"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(120)
      """))
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
                      f"--script={script}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=100)
  assert r.returncode == 1
  assert "[launch] process 1 was killed by SIGKILL; stopping the others" in r.stdout


def test_launcher_succeeds_when_all_do(tmp_path):
  script = tmp_path / "ok.py"
  script.write_text("print('hello')\n")
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.launch", "--num_processes=2",
                      f"--script={script}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0 and "[0] hello" in r.stdout and "[1] hello" in r.stdout


def test_launcher_never_glues_a_processs_two_streams(tmp_path):
  # Half a line on stdout, a whole line on stderr, the rest of the stdout line: one pipe for
  # both streams would give "[0] first half, a whole stderr line".
  script = tmp_path / "halves.py"
  script.write_text(textwrap.dedent("""
      import os, time
      os.write(1, b"first half, ")
      time.sleep(0.3)
      os.write(2, b"a whole stderr line\\n")
      time.sleep(0.3)
      os.write(1, b"second half\\n")
      """))
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.launch", "--num_processes=1",
                      f"--script={script}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0
  lines = r.stdout.splitlines()
  assert "[0] first half, second half" in lines and "[0] a whole stderr line" in lines


def test_sigterm_to_the_launcher_gives_its_processes_time_to_checkpoint(tmp_path):
  # Each process takes longer than the after-failure grace to "checkpoint" on SIGTERM (as the
  # trainer does, then exits 143): the launcher must wait for it, not SIGKILL it.
  script = tmp_path / "saver.py"
  script.write_text(textwrap.dedent(f"""
      import signal, sys, time
      def term(signum, frame):
        time.sleep({launch._GRACE_S + 1.0})
        print("checkpointed", flush=True)
        sys.exit(143)
      signal.signal(signal.SIGTERM, term)
      print("ready", flush=True)
      time.sleep(300)
      """))
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    launcher = subprocess.Popen([sys.executable, "-m", "fastdp_jax.launch",
                                 "--num_processes=2", f"--script={script}"], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 60
    while out.read_text().count("] ready") < 2:
      assert time.monotonic() < deadline and launcher.poll() is None, out.read_text()
      time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    code = launcher.wait(timeout=launch._TERM_GRACE_S + 30)
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
  text = out.read_text()
  assert code == 143, text
  assert "[0] checkpointed" in text and "[1] checkpointed" in text, text


def _alive(pid):
  """Running or stopped, not gone and not a zombie waiting for a parent to reap it."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_by_sigkill_takes_its_processes_with_it(tmp_path):
  script = tmp_path / "sleeper.py"
  script.write_text("import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(300)\n")
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    launcher = subprocess.Popen([sys.executable, "-m", "fastdp_jax.launch",
                                 "--num_processes=2", f"--script={script}"], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
  pids = []
  try:
    deadline = time.monotonic() + 60
    while len(pids) < 2:
      assert time.monotonic() < deadline and launcher.poll() is None, out.read_text()
      pids = [int(m) for m in re.findall(r"^\[\d\] pid (\d+)$", out.read_text(), re.M)]
      time.sleep(0.1)
    assert all(_alive(p) for p in pids)
    launcher.kill()  # SIGKILL: the launcher can do nothing; the kernel must stop its children
    launcher.wait()
    deadline = time.monotonic() + 60  # generous; it takes well under a second
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "the launcher's processes outlived it"
  finally:
    for p in pids:
      if _alive(p):
        os.kill(p, 9)


# ---------------------------------------------------------------- 8 fake devices (own process)

N, D, HIDDEN, BATCH, CLIP, SIGMA, STEPS, CHUNK = 3000, 9, (16,), 64, 1.0, 1.0, 8, 4


def _tap_clipped_sum(loss_fn, l2_norm_clip):
  """A clipped sum that differentiates a zero "tap" it creates itself, as ghost clipping does.

  Inside ``shard_map`` such a device-invariant value is the trap: its gradient would be summed
  across devices before clipping unless the step treats the body as plain per-device code.
  """
  def fn(params, batch, mask):
    x, y = batch
    tap = jnp.zeros((x.shape[0],), jnp.float32)

    def total(tap):
      def one(p, xi, yi, ti):
        return loss_fn(p, (xi, yi)) + ti
      return jnp.sum(jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, y, tap))

    g_tap = jax.grad(total)(tap)  # [batch] per-example dloss/dtap = 1: sums must not leak
    grads, stats = clipping.clipped_grad_sum_with_stats(loss_fn, params, batch, l2_norm_clip,
                                                        mask)
    # Scale by the tap gradient (exactly 1 when per-device): wrong if it was all-reduced.
    scale = jnp.sum(jnp.where(mask, g_tap, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    return jax.tree_util.tree_map(lambda g: g * scale, grads), stats
  return fn


def _run_steps(devices, strategy, clip_kind):
  rng = np.random.default_rng(0)
  x = (rng.random((N, D)) < 0.4).astype(np.float32)
  y = (rng.random(N) < 0.6).astype(np.float32)
  mesh = parallel.make_mesh(devices)
  dev = parallel.place_training_data(mesh, x, y)
  model = models.create_model(D, HIDDEN, 0)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  clipped = (clipping.make_clipped_sum("vmap", model, loss_fn, CLIP) if clip_kind == "vmap"
             else _tap_clipped_sum(loss_fn, CLIP))
  tx = optax.chain(noise.privatize(CLIP, SIGMA, BATCH, noise.noise_key(5)[0]),
                   optax.sgd(0.5, momentum=0.9))
  sampler = sampling.PoissonSampler(N, BATCH, key=2, shard_bounds=dev.bounds)
  run = step_lib.build_train_chunk(mesh, loss_fn, clipped, tx, CLIP, strategy)
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  counts = []
  for s in range(0, STEPS, CHUNK):
    b = sampler.batches(s, CHUNK)
    state, m = run(state, dev.features, dev.labels, b.indices, b.mask, np.ones(CHUNK, bool))
    counts.append(np.asarray(m["count"]))
  return jax.device_get(state.params), np.concatenate(counts)


@pytest.mark.multidevice
@pytest.mark.parametrize("clip_kind,strategies", [
    ("vmap", ("shard_map", "auto")),
    ("tap", ("shard_map",)),  # the trap is shard_map's; 'auto' has no device-invariant values
])
def test_both_strategies_reproduce_single_device_params(clip_kind, strategies):
  assert jax.device_count() == 8
  ref, ref_counts = _run_steps(jax.devices()[:1], "shard_map", clip_kind)
  for strategy in strategies:
    got, counts = _run_steps(jax.devices(), strategy, clip_kind)
    # The same Poisson batches (topology-independent sampling) ...
    np.testing.assert_array_equal(counts, ref_counts)
    # ... and the same parameters after STEPS noisy updates, to float summation order.
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), (strategy, clip_kind)
  moved = jax.tree_util.tree_leaves(ref)[0]
  start = jax.tree_util.tree_leaves(models.functional(models.create_model(D, HIDDEN, 0))[1])[0]
  assert not np.allclose(moved, start)  # the updates did something


_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def _elements(shape_text):
  return sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", shape_text))


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
def test_compiled_step_has_exactly_one_all_reduce_of_the_gradient(strategy):
  rng = np.random.default_rng(0)
  x = (rng.random((N, D)) < 0.4).astype(np.float32)
  y = (rng.random(N) < 0.6).astype(np.float32)
  mesh = parallel.make_mesh()
  dev = parallel.place_training_data(mesh, x, y)
  model = models.create_model(D, HIDDEN, 0)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  tx = optax.chain(noise.privatize(CLIP, SIGMA, BATCH, noise.noise_key(5)[0]), optax.sgd(0.1))
  sampler = sampling.PoissonSampler(N, BATCH, key=2, shard_bounds=dev.bounds)
  run = step_lib.build_train_chunk(mesh, loss_fn,
                                   clipping.make_clipped_sum("vmap", model, loss_fn, CLIP),
                                   tx, CLIP, strategy)
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  b = sampler.batches(0, CHUNK)
  hlo = run.lower(state, dev.features, dev.labels, b.indices, b.mask,
                  np.ones(CHUNK, bool)).compile().as_text()
  collectives = _COLLECTIVE.findall(hlo)
  # One all-reduce in the whole program, inside the loop over the CHUNK updates (so once per
  # update), and no other collective: the data never moves, only the clipped sums do.
  assert [kind for _, kind in collectives] == ["all-reduce"], collectives
  assert "while" in hlo
  # It carries the gradient (num_params floats) and the four metric counters.
  num_params = models.count_params(params)
  assert _elements(collectives[0][0]) == num_params + 4, collectives[0][0]

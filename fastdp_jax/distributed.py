"""Multi-process start-up, agreement between processes, and failing fast when one dies.

A run of N processes (one per host, each using all of its local devices) is started by
:func:`initialize` before any other JAX call. Where the topology comes from, first match
wins:

1. explicit arguments (``main.py --coordinator_address=HOST:PORT --num_processes=N
   --process_id=I``);
2. environment variables ``FASTDP_COORDINATOR_ADDRESS``, ``FASTDP_NUM_PROCESSES``,
   ``FASTDP_PROCESS_ID`` (set by :mod:`fastdp_jax.launch`);
3. JAX's own detection of a SLURM, Open MPI or Kubernetes job of more than one task;
4. otherwise a single process, and nothing is initialised.

Faults are bounded in time and end in one line. A process other than 0 first waits at most
``initialization_timeout_s`` for the coordinator's port, and raises
:class:`CoordinatorUnreachableError` naming the address if it never opens. Once running, JAX's
coordination service declares a process that has sent no heartbeat for
``heartbeat_timeout_s`` dead (killed, or hung: ``kill -STOP``), and a process that loses the
coordinator stops as soon as it notices; a process that does not join within the
initialisation timeout stops the others too. JAX ends each of these from C++ (``LOG(FATAL)``:
a multi-line status, a C++ stack, then ``abort()``, which Python's fault handler turns into a
dump of every thread, exit status -6). :func:`initialize` installs a guard that reads what C++
writes to stderr, recognises that report and replaces it with ONE line naming this process,
the process that was lost and how to resume, then exits with status
:data:`PEER_LOST_EXIT_CODE` (see :class:`_FatalErrorGuard`). A collective that loses its peer
fails at once with a Python exception: :func:`exit_promptly_on_failure` turns it into the same
kind of line (and exits at once, with no shutdown barrier), so that the others notice within
the heartbeat timeout instead of waiting for it.

Agreement is checked up front: :func:`check_same_start` (called first thing by the trainer)
refuses, on every process and within seconds, a run whose processes were given different
``--workdir`` paths, a workdir that is not the same shared directory on every host, or
different configs; the data digest is compared once the data is read
(:func:`check_same_on_all_processes`).

The noise key is agreed once at start: process 0 draws it and broadcasts it
(:func:`broadcast_from_process_0`), so every device adds the same noise to the same global sum.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import io
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import jax
import numpy as np
from absl import logging

from fastdp_jax import errors

ENV_COORDINATOR = "FASTDP_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FASTDP_NUM_PROCESSES"
ENV_PROCESS_ID = "FASTDP_PROCESS_ID"
ENV_INIT_TIMEOUT = "FASTDP_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "FASTDP_HEARTBEAT_TIMEOUT_S"

# Both well under the bound of 2 minutes from a fault to every process's exit.
DEFAULT_INIT_TIMEOUT_S = 90
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# Exit status of a process that stopped because it lost another process (or the coordinator):
# nothing is wrong with this process; rerunning the same command resumes from the checkpoint.
PEER_LOST_EXIT_CODE = 3
# How long the processes other than 0 look for process 0's token in the workdir (a network
# file system may show a new file a little late).
SHARED_WORKDIR_TIMEOUT_S = 10.0


class CoordinatorUnreachableError(errors.UserError, RuntimeError):
  """The coordinator (process 0) did not accept connections within the timeout."""


class TopologyError(errors.UserError):
  """An incomplete or inconsistent topology (flags or environment)."""


class ProcessMismatchError(errors.UserError):
  """The processes of one run were started differently (workdir, config or data)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Topology:
  """Who this process is in the run.

  Attributes:
    coordinator_address: ``HOST:PORT`` of process 0's coordination service (None: detected
      by JAX from the cluster, or a single process).
    num_processes: N (None: detected by JAX).
    process_id: this process's rank (None: detected by JAX).
    source: where the values came from: 'flags', 'environment', 'cluster' or 'single'.
  """

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  source: str


def _in_multi_task_cluster(environ: Mapping[str, str]) -> bool:
  """Whether this process is one task of a SLURM / Open MPI job of several tasks, or a pod of
  an indexed Kubernetes Job (JAX then reads the topology from the Kubernetes API)."""
  for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if environ.get(key, "").isdigit():
      return int(environ[key]) > 1
  return "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            environ: Mapping[str, str] | None = None) -> Topology:
  """Decides where the topology comes from (see the module docstring); starts nothing."""
  environ = os.environ if environ is None else environ
  given = (coordinator_address, num_processes, process_id)
  source = "flags"
  if all(v is None for v in given):
    coordinator_address = environ.get(ENV_COORDINATOR) or None
    num_processes = int(environ[ENV_NUM_PROCESSES]) if environ.get(ENV_NUM_PROCESSES) else None
    process_id = int(environ[ENV_PROCESS_ID]) if environ.get(ENV_PROCESS_ID) else None
    source = "environment"
  if all(v is None for v in (coordinator_address, num_processes, process_id)):
    if _in_multi_task_cluster(environ):
      return Topology(coordinator_address=None, num_processes=None, process_id=None,
                      source="cluster")
    return Topology(coordinator_address=None, num_processes=1, process_id=0, source="single")
  if num_processes == 1 and process_id in (None, 0):
    return Topology(coordinator_address=None, num_processes=1, process_id=0, source="single")
  missing = [name for name, v in zip(("coordinator_address", "num_processes", "process_id"),
                                     (coordinator_address, num_processes, process_id))
             if v is None]
  if missing:
    raise TopologyError(f"multi-process run from the {source}: {', '.join(missing)} not given "
                     f"(set all of --coordinator_address, --num_processes, --process_id or "
                     f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  if not 0 <= process_id < num_processes:
    raise TopologyError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
  if ":" not in coordinator_address:
    raise TopologyError(f"coordinator_address={coordinator_address!r} must be HOST:PORT")
  return Topology(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, source=source)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until ``HOST:PORT`` accepts TCP connections.

  Raises:
    CoordinatorUnreachableError: after ``timeout_s`` seconds, naming the address.
  """
  host, port = address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise CoordinatorUnreachableError(
          f"coordinator {address} unreachable after {timeout_s:g} s ({last}); is process 0 "
          "running, and is the port open from this host?")
    time.sleep(0.25)


def _seconds(value: float | None, env: str, default: float) -> int:
  if value is None:
    value = float(os.environ[env]) if os.environ.get(env) else default
  if value <= 0:
    raise TopologyError(f"timeout {value} s ({env}) must be positive")
  return max(1, int(round(value)))


@dataclasses.dataclass(kw_only=True)
class _Run:
  """What the one-line fault messages need to know about this run."""

  process_id: int
  num_processes: int
  coordinator_address: str | None
  init_s: int
  beat_s: int
  workdir: str | None = None
  guard: _FatalErrorGuard | None = None


_RUN: _Run | None = None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               initialization_timeout_s: float | None = None,
               heartbeat_timeout_s: float | None = None,
               guard_fatal_errors: bool = True) -> Topology:
  """Joins this process to a multi-process run (call before any other JAX call).

  In a multi-process run this also makes stdout line-buffered (each line reaches the launcher
  or the log in one write, never glued to another process's or library's output) and, on
  Linux, installs the guard that turns JAX's fatal coordination errors into one line (module
  docstring).

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (it binds that port).
    num_processes: N.
    process_id: this process's rank in ``[0, N)``.
    initialization_timeout_s: how long to wait for the coordinator and the other processes
      (default ``$FASTDP_INIT_TIMEOUT_S`` or 90).
    heartbeat_timeout_s: a process silent this long is declared dead and the run stops
      (default ``$FASTDP_HEARTBEAT_TIMEOUT_S`` or 60).
    guard_fatal_errors: install the fatal-error guard (Linux; off: JAX's own report).

  Returns:
    The resolved :class:`Topology` (``source == 'single'``: nothing was initialised).

  Raises:
    TopologyError: an incomplete or inconsistent topology.
    CoordinatorUnreachableError: the coordinator's port did not open in time.
  """
  global _RUN
  topo = resolve(coordinator_address, num_processes, process_id)
  if topo.source == "single":
    return topo
  init_s = _seconds(initialization_timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S)
  beat_s = _seconds(heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S)
  _line_buffer_stdout()
  if topo.source == "cluster":
    logging.info("initialising from the cluster environment (JAX auto-detection)")
    # The rank is not known before JAX reads it from the cluster: the guard's messages then
    # name this process by what the cluster said (SLURM_PROCID, OMPI_COMM_WORLD_RANK).
    rank = int(os.environ.get("SLURM_PROCID") or os.environ.get("OMPI_COMM_WORLD_RANK") or -1)
    _RUN = _Run(process_id=rank, num_processes=-1, coordinator_address=None, init_s=init_s,
                beat_s=beat_s)
    if guard_fatal_errors:
      _RUN.guard = _FatalErrorGuard.install()
    jax.distributed.initialize(local_device_ids=_all_local_gpus_if_one_task_per_node(),
                               initialization_timeout=init_s, heartbeat_timeout_seconds=beat_s)
    _RUN.process_id, _RUN.num_processes = jax.process_index(), jax.process_count()
    return dataclasses.replace(topo, num_processes=jax.process_count(),
                               process_id=jax.process_index())
  start = time.monotonic()
  if topo.process_id != 0:
    wait_for_coordinator(topo.coordinator_address, init_s)
  remaining = max(1, math.ceil(init_s - (time.monotonic() - start)))
  _RUN = _Run(process_id=topo.process_id, num_processes=topo.num_processes,
              coordinator_address=topo.coordinator_address, init_s=remaining, beat_s=beat_s)
  if guard_fatal_errors:
    _RUN.guard = _FatalErrorGuard.install()
  logging.info("process %d of %d: joining coordinator %s (timeout %d s, heartbeat %d s)",
               topo.process_id, topo.num_processes, topo.coordinator_address, remaining, beat_s)
  # 'deactivate': explicit values must not be overridden by a SLURM/MPI environment, whose
  # detection would also restrict this process to one GPU; one process per host uses all.
  jax.distributed.initialize(topo.coordinator_address, topo.num_processes, topo.process_id,
                             cluster_detection_method="deactivate",
                             initialization_timeout=remaining,
                             heartbeat_timeout_seconds=beat_s)
  return topo


def _line_buffer_stdout() -> None:
  """One write per line on stdout (``PYTHONUNBUFFERED`` writes a print's text and its newline
  separately, so another thread's or library's output could land between them)."""
  reconfigure = getattr(sys.stdout, "reconfigure", None)
  if reconfigure is not None:
    try:
      reconfigure(line_buffering=True, write_through=False)
    except (ValueError, io.UnsupportedOperation):  # a closed or detached stream: leave it
      pass


def _all_local_gpus_if_one_task_per_node() -> list[int] | None:
  """Every local GPU when the cluster runs one task per node, else None (JAX's default).

  JAX's SLURM / Open MPI detection gives each process the single GPU of its local rank,
  which suits one process per GPU; with one process per node that would leave the other
  GPUs idle.
  """
  per_node = (os.environ.get("SLURM_NTASKS_PER_NODE") or
              os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or "")
  if per_node.split("(")[0] != "1":
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible:
    count = len([v for v in visible.split(",") if v.strip()])
  else:
    count = len([f for f in os.listdir("/dev") if f.startswith("nvidia") and f[6:].isdigit()]
                ) if os.path.isdir("/dev") else 0
  return list(range(count)) or None


def broadcast_from_process_0(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process (the same shape and dtype everywhere)."""
  if jax.process_count() == 1:
    return np.asarray(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def check_same_on_all_processes(what: str, value: Any) -> None:
  """Fails unless every process passes the same ``value`` (e.g. the config and data digest).

  Raises:
    ProcessMismatchError: naming ``what``, on every process, if any process differs.
  """
  if jax.process_count() == 1:
    return
  differ = _processes_that_differ([value])[0]
  if differ:
    raise ProcessMismatchError(
        f"{what} differs between processes (processes {differ} differ from process 0); "
        "start every process with the same config and data")


def _processes_that_differ(values: list[Any]) -> list[list[int]]:
  """For each of ``values``: the processes whose value differs from process 0's (only 8-byte
  digests travel).

  The check is ``multihost_utils.assert_equal`` (one collective; it raises on every process
  when any differs, so all of them take the same branch). Its message lists the raw digests
  and names no process: on a mismatch, one more gather of the digests finds which processes
  differ, for the one-line error the callers raise.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digests = np.stack([np.frombuffer(hashlib.sha256(repr(v).encode()).digest()[:8], np.uint32)
                      for v in values])
  try:
    multihost_utils.assert_equal(digests, "the processes' digests differ")
    return [[] for _ in values]
  except AssertionError:
    pass
  every = np.asarray(multihost_utils.process_allgather(digests))  # [P, len(values), 2]
  return [[p for p in range(every.shape[0]) if not (every[p, i] == every[0, i]).all()]
          for i in range(len(values))]


def check_same_start(workdir: str, config: Any, *,
                     shared_timeout_s: float = SHARED_WORKDIR_TIMEOUT_S) -> None:
  """Refuses, on every process and before any work, a run whose processes disagree.

  Checks, in this order: every process was given the same workdir path and the same config;
  the workdir is one directory shared by all of them (process 0 writes a token file into it
  and every other process must read it back within ``shared_timeout_s``). Without this, two
  processes given different workdirs trained a whole epoch, then hung in the first
  checkpoint save (each waiting for files the other wrote elsewhere). A single process
  returns at once.

  Args:
    workdir: this process's ``--workdir``.
    config: this process's config (anything with a stable ``repr``, e.g. its JSON).
    shared_timeout_s: how long the others look for process 0's token.

  Raises:
    ProcessMismatchError: on every process, naming what differs, or which processes do not
      see the workdir of process 0.
    errors.UserError: on every process, when process 0 cannot write into the workdir.
  """
  path = os.path.abspath(workdir)
  if _RUN is not None:
    _RUN.workdir = path
  if jax.process_count() == 1:
    return
  me = jax.process_index()
  paths, configs = _processes_that_differ([path, config])
  if paths:
    raise ProcessMismatchError(
        f"--workdir differs between processes (processes {paths} differ from process 0; "
        f"this is process {me}, with {path}); give every process the same --workdir, a "
        "directory that every host mounts at the same path")
  if configs:
    raise ProcessMismatchError(
        f"the config differs between processes (processes {configs} differ from process 0); "
        "start every process with the same config file and --config overrides")
  # Process 0 writes a token (a nonce it broadcasts), every other process reads it back.
  nonce = os.urandom(8).hex()
  problem = ""
  if me == 0:
    try:
      os.makedirs(path, exist_ok=True)
      with open(os.path.join(path, f".shared-check-{nonce}"), "w") as f:
        f.write(nonce)
    except OSError as e:
      problem = e.strerror or str(e)
  header = np.frombuffer(f"{nonce}{'!' if problem else '.'}".encode(), np.uint8)
  text = broadcast_from_process_0(header).tobytes().decode()
  nonce, failed = text[:-1], text[-1] == "!"
  token = os.path.join(path, f".shared-check-{nonce}")
  if failed:  # everyone raises, so that no process waits for the others in a collective
    raise errors.UserError(
        f"workdir {path} is not writable by process 0"
        + (f" ({problem})" if problem else "") + "; choose another --workdir")
  seen = True
  if me != 0:
    deadline = time.monotonic() + shared_timeout_s
    while not _holds(token, nonce):
      if time.monotonic() >= deadline:
        seen = False
        break
      time.sleep(0.2)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  every = np.asarray(multihost_utils.process_allgather(np.array([seen], np.uint8))).ravel()
  if me == 0:
    with contextlib.suppress(OSError):
      os.remove(token)
  blind = [p for p in range(len(every)) if not every[p]]
  if blind:
    raise ProcessMismatchError(
        f"workdir {path} is not shared between the processes: processes {blind} do not see "
        f"the file process 0 wrote there within {shared_timeout_s:g} s; give every process "
        "the same --workdir on a file system that every host mounts at the same path")


def _holds(path: str, text: str) -> bool:
  try:
    with open(path) as f:
      return f.read() == text
  except OSError:
    return False


# ---------------------------------------------------------------------------- lost processes

def _resume_hint() -> str:
  where = f"in {_RUN.workdir}" if _RUN is not None and _RUN.workdir else "in the workdir"
  return (f"to resume, rerun the same command on every process (training continues from "
          f"the last checkpoint {where})")


def _who() -> str:
  if _RUN is None or _RUN.process_id < 0:
    return "this process"
  if _RUN.num_processes < 0:
    return f"process {_RUN.process_id}"
  return f"process {_RUN.process_id} of {_RUN.num_processes}"


_UNHEALTHY = re.compile(r"unhealthy \(stopped sending heartbeats\):\s*([0-9][0-9,\s]*)")


def describe_fatal_status(status: str) -> str:
  """One line for JAX's fatal coordination report ``status`` (its text after ``Status:``).

  Names this process, what happened (which process stopped answering, the coordinator lost,
  or a process that never joined) and how to resume.
  """
  who = _who()
  beat = f"{_RUN.beat_s} s" if _RUN is not None else "the heartbeat timeout"
  coordinator = (f" at {_RUN.coordinator_address}" if _RUN is not None
                 and _RUN.coordinator_address else "")
  m = _UNHEALTHY.search(status)
  if m:
    lost = sorted({int(t) for t in re.findall(r"\d+", m.group(1))})
    me = _RUN.process_id if _RUN is not None else None
    if me in lost and len(lost) == 1:
      what = (f"the coordinator declared this process dead (no heartbeat from it for {beat}: "
              "was it suspended or overloaded?)")
    else:
      names = ", ".join(str(t) for t in lost if t != me)
      what = (f"process{'es' if len(lost) > 1 else ''} {names} stopped answering (no "
              f"heartbeat for {beat}: killed, hung or unreachable)")
    return f"error: {who}: {what}; stopping; {_resume_hint()}"
  if "RegisterTask" in status:
    count = _RUN.num_processes if _RUN is not None and _RUN.num_processes > 0 else "all"
    wait = f" within {_RUN.init_s} s" if _RUN is not None else ""
    return (f"error: {who}: not all {count} processes joined the coordinator{coordinator}"
            f"{wait}; start every process with the same --num_processes and coordinator "
            "address (and a distinct --process_id), then rerun")
  if "Barrier" in status:
    return (f"error: {who}: the other processes did not reach the same point in time "
            f"({_first_line(status)}); stopping; {_resume_hint()}")
  if any(k in status for k in ("Heartbeat", "PollForError", "leader", "coordination service",
                               "UNAVAILABLE", "Socket closed", "DEADLINE_EXCEEDED")):
    return (f"error: {who}: lost contact with the coordinator (process 0{coordinator}): it "
            f"died, hung or is unreachable; stopping; {_resume_hint()}")
  return (f"error: {who}: the JAX distributed service stopped the run "
          f"({_first_line(status)}); {_resume_hint()}")


def _first_line(text: str) -> str:
  return next((l.strip() for l in text.splitlines() if l.strip()), "no details")[:200]


class _FatalErrorGuard:
  """Turns JAX's fatal coordination errors into one line and exit status 3 (Linux).

  JAX's coordination client ends the process from C++ when a peer or the coordinator is
  lost: it writes a multi-line report (``Terminating process because the JAX distributed
  service detected fatal errors ... Status: ...``, then a C++ stack) to file descriptor 2 and
  calls ``abort()``. Its Python binding offers no usable hook (a Python callback cannot take
  the C++ status). So:

  * file descriptor 2 becomes a pipe that a daemon thread reads and forwards line by line to
    the real stderr, except that report: on it, the thread prints one line
    (:func:`describe_fatal_status`) and calls ``os._exit(PEER_LOST_EXIT_CODE)``;
  * Python's own ``sys.stderr`` (logging, tracebacks, errors) writes to the real stderr
    directly, so nothing of it waits in the pipe or is lost on exit;
  * ``SIGABRT`` gets libc's ``sleep`` as its handler: the aborting C++ thread sleeps (6 s, the
    signal number) while the reader thread reports and exits; had the reader not exited by
    then, the handler returns and ``abort()`` ends the process as before (a fail-safe).
    Python's fault handler therefore no longer dumps every thread on ``SIGABRT``; it still
    does on a segmentation fault.
  """

  _FATAL = b"JAX distributed service detected fatal errors"
  _STACK = b"*** Check failure stack trace"
  # Logged by the coordination service and agent just before the fatal report (the service
  # about to tell every process, the agent having heard it): held back, dropped if the report
  # follows within _HOLD_S, forwarded if not.
  _PRELUDE = (b"Use error polling to propagate", b"Polled an error from coordination service",
              b"Failed to retrieve preemption notice", b"Failed to cancel preemption barrier")
  _HOLD_S = 2.0

  def __init__(self, real_fd: int, read_fd: int):
    self._real_fd = real_fd
    self._read_fd = read_fd
    self._report: list[bytes] | None = None
    self._held: list[bytes] = []
    self._held_since = 0.0
    self._thread = threading.Thread(target=self._pump, name="fastdp-fatal-error-guard",
                                    daemon=True)

  @classmethod
  def install(cls) -> _FatalErrorGuard | None:
    if not sys.platform.startswith("linux"):
      return None
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      sleep = ctypes.cast(libc.sleep, ctypes.c_void_p).value
    except (OSError, AttributeError):
      return None
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        stream.flush()
    real_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    guard = cls(real_fd, read_fd)
    old = sys.stderr
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real_fd, "w", closefd=False), encoding=getattr(old, "encoding", None),
        errors="backslashreplace", line_buffering=True)
    # Log handlers that captured the old stream (absl's, made at import) follow it.
    import logging as std_logging  # pylint: disable=g-import-not-at-top
    handlers = [logging.get_absl_handler().python_handler, *std_logging.getLogger().handlers]
    for handler in handlers:
      if isinstance(handler, std_logging.StreamHandler) and handler.stream is old:
        handler.setStream(sys.stderr)
    import faulthandler  # pylint: disable=g-import-not-at-top
    if faulthandler.is_enabled():  # crash dumps go to the real stderr, not into the pipe
      faulthandler.enable(file=sys.stderr, all_threads=True)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGABRT, sleep)
    guard._thread.start()
    return guard

  def _pump(self) -> None:
    pending = b""
    deadline = None
    while True:
      ready, _, _ = select.select([self._read_fd], [], [], 0.25)
      chunk = os.read(self._read_fd, 65536) if ready else None
      if chunk == b"":  # the write end is closed
        self._forward(b"".join(self._held) + pending)
        return
      if chunk:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
          self._line(line + b"\n")
      now = time.monotonic()
      if self._report is None:
        if pending and not chunk:  # a partial line, quiet for a while: forward it as it is
          self._forward(pending)
          pending = b""
        if self._held and now - self._held_since > self._HOLD_S:
          self._forward(b"".join(self._held))
          self._held = []
        continue
      # The fatal report: everything that matters precedes the C++ stack; at most 1 s.
      deadline = deadline or now + 1.0
      if self._report[-1].startswith(self._STACK) or now >= deadline:
        self._exit_with_report()

  def _line(self, line: bytes) -> None:
    if self._report is not None:
      self._report.append(line)
    elif self._FATAL in line:
      self._held = []
      self._report = [line]
    elif self._held or any(p in line for p in self._PRELUDE):
      if not self._held:
        self._held_since = time.monotonic()
      self._held.append(line)
    else:
      self._forward(line)

  def _forward(self, data: bytes) -> None:
    while data:
      try:
        data = data[os.write(self._real_fd, data):]
      except OSError:
        return

  def _exit_with_report(self) -> NoReturn:
    text = b"".join(self._report or []).decode("utf-8", errors="replace")
    status = text.split("Status:", 1)[1] if "Status:" in text else text
    status = status.split("*** Check failure stack trace", 1)[0]
    _exit_with_line(describe_fatal_status(status), PEER_LOST_EXIT_CODE)


def _exit_with_line(line: str, code: int) -> NoReturn:
  """Prints ``line`` to stderr as one write, then exits at once (no shutdown barrier)."""
  with contextlib.suppress(Exception):
    sys.stdout.flush()
  with contextlib.suppress(Exception):
    logging.flush()
  with contextlib.suppress(Exception):
    sys.stderr.flush()
  fd = _RUN.guard._real_fd if _RUN is not None and _RUN.guard is not None else 2
  with contextlib.suppress(OSError):
    os.write(fd, (" ".join(line.split()) + "\n").encode("utf-8", errors="replace"))
  os._exit(code)  # pylint: disable=protected-access


def _exit_now(code: int) -> NoReturn:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


# A collective whose peer went away (gloo over TCP on CPU; NCCL/gRPC elsewhere).
_LOST_PEER = re.compile(r"Gloo \w+ failed|Connection (closed|reset) by peer|Broken pipe|"
                        r"Socket closed|Connection refused|UNAVAILABLE")


def is_lost_peer(e: BaseException) -> bool:
  """Whether ``e`` says that a collective lost the process at its other end."""
  return bool(_LOST_PEER.search(str(e)))


@contextlib.contextmanager
def exit_promptly_on_failure() -> Iterator[None]:
  """In a multi-process run, a failing process exits at once with a non-zero status.

  A normal exit waits at JAX's shutdown barrier for every other process, which are
  themselves blocked in a collective waiting for this one; exiting at once lets them see it
  gone (a closed connection or a missed heartbeat) and stop within the heartbeat timeout.

  A collective whose peer died raises at once (gloo: "Connection reset by peer"), before the
  coordination service has named the lost process. This process then waits up to the
  heartbeat timeout for the service's verdict, which the fatal-error guard reports as one
  line naming that process; without a verdict it prints one line itself. Either way the
  exit status is :data:`PEER_LOST_EXIT_CODE`. Other errors keep their traceback (status 1);
  a ``SystemExit`` keeps its status. Single-process runs are not affected.
  """
  try:
    yield
  except SystemExit as e:
    if jax.process_count() > 1 and e.code not in (0, None):
      _exit_now(e.code if isinstance(e.code, int) else 1)
    raise
  except BaseException as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    if is_lost_peer(e):
      if _RUN is not None and _RUN.guard is not None:
        time.sleep(_RUN.beat_s + 10)  # the guard exits first, naming the lost process
      _exit_with_line(f"error: {_who()}: lost contact with another process during a "
                      f"collective ({_first_line(str(e))}); stopping; {_resume_hint()}",
                      PEER_LOST_EXIT_CODE)
    traceback.print_exc()
    _exit_now(1)

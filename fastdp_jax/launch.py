"""Starts N local processes of one multi-process run, for development and tests.

Usage::

  python -m fastdp_jax.launch --num_processes=2 [--devices_per_process=K] -- \\
      --config=configs/dist.py --config.data.path=DIR --workdir=runs/dist

Everything after ``--`` goes to every process of the trainer, ``python -m fastdp_jax`` with
this interpreter (or ``--script``). Process i gets ``FASTDP_COORDINATOR_ADDRESS=127.0.0.1:PORT``
(a free port), ``FASTDP_NUM_PROCESSES=N`` and ``FASTDP_PROCESS_ID=i`` (read by
:func:`fastdp_jax.distributed.initialize`); the processes talk over loopback (gloo collectives
on CPU). ``--devices_per_process=K`` gives each process K fake CPU devices.

Output: each process's stdout and stderr are read through separate pipes and forwarded line
by line to the launcher's stdout, one log, each line whole and prefixed with ``[i]``: lines of
two processes, or of one process's two streams, are never glued together.

Failures: if a process fails, the launcher stops the others (SIGTERM to its process group,
SIGKILL after a grace period of 5 s) and exits non-zero; it exits 0 only if all of them do. The
processes never outlive the launcher: each runs in its own process group and, on Linux, gets
SIGKILL from the kernel when the launcher dies, even by ``kill -9`` (``PR_SET_PDEATHSIG``);
SIGTERM or Ctrl-C to the launcher stops them too, with a longer grace (60 s): on SIGTERM the
trainers checkpoint after their current call and exit 143, and the same command resumes.

On a cluster, do not use this: start one trainer per host with ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or let SLURM / Open MPI start them (see
``configs/dist.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_GRACE_S = 5.0  # after a failure: the others cannot checkpoint without the failed process
_TERM_GRACE_S = 60.0  # after SIGTERM or Ctrl-C to the launcher: time for every checkpoint
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def trainer_command() -> list[str]:
  """How to start the trainer: its module entry point, or ``main.py`` of a checkout that
  predates ``fastdp_jax/__main__.py``."""
  if importlib.util.find_spec("fastdp_jax.__main__") is not None:
    return [sys.executable, "-m", "fastdp_jax"]
  return [sys.executable, os.path.join(_ROOT, "main.py")]


def _die_with_parent() -> Callable[[], None] | None:
  """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux).

  Everything it calls is resolved here, before the fork, so that the child runs no more than
  two system calls between fork and exec.
  """
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                    ctypes.c_ulong]
  parent = os.getpid()

  def preexec() -> None:
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before prctl took effect
      os._exit(1)  # pylint: disable=protected-access

  return preexec


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free a moment ago (the coordinator binds it soon after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int | None) -> dict[str, str]:
  """The environment of process ``process_id``."""
  env = dict(base)
  # PYTHONUNBUFFERED: output arrives as it is written; the trainer itself makes stdout
  # line-buffered (distributed.initialize), so that a print is one write, never split.
  env.update(FASTDP_COORDINATOR_ADDRESS=coordinator, FASTDP_NUM_PROCESSES=str(num_processes),
             FASTDP_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [
        f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _forward(stream: BinaryIO, out: BinaryIO, prefix: str, lock: threading.Lock) -> None:
  """Copies ``stream`` to ``out`` line by line, each line whole and prefixed."""
  for line in iter(stream.readline, b""):
    if not line.endswith(b"\n"):
      line += b"\n"
    with lock:
      out.write(prefix.encode() + line)
      out.flush()
  stream.close()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(p.pid, sig)  # the process and anything it started
  except (ProcessLookupError, PermissionError):
    pass


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = _GRACE_S) -> None:
  """SIGTERM to every live process group, SIGKILL to those still alive after ``grace_s``."""
  for p in procs:
    if p.poll() is None:
      _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)
      p.wait()


def _describe_status(code: int) -> str:
  if code >= 0:
    return f"exited with status {code}"
  try:
    name = signal.Signals(-code).name
  except ValueError:
    name = f"signal {-code}"
  return f"was killed by {name}"


class _Terminated(Exception):
  """The launcher got SIGTERM."""


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  raise _Terminated()


def launch(num_processes: int, args: Sequence[str], *, devices_per_process: int | None = None,
           script: str | None = None, port: int | None = None) -> int:
  """Runs ``num_processes`` copies of the trainer (or ``script``) as one run.

  Returns:
    0 if every process exits 0; otherwise the first failing process's status (1 if it was
    killed by a signal), after the others were stopped; 130 after Ctrl-C, 143 after SIGTERM.
  """
  if num_processes <= 0:
    raise ValueError(f"{num_processes=} must be positive")
  command = [sys.executable, script] if script else trainer_command()
  coordinator = f"127.0.0.1:{port or free_port()}"
  lock = threading.Lock()
  procs, threads = [], []
  print(f"[launch] {num_processes} processes, coordinator {coordinator}"
        + (f", {devices_per_process} CPU devices each" if devices_per_process else ""),
        flush=True)
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  status = 0
  try:
    preexec = _die_with_parent()
    # Every child is started before any forwarding thread: a fork while other threads run
    # could leave the child's preexec_fn waiting on a lock that one of them held.
    for i in range(num_processes):
      env = process_env(dict(os.environ), coordinator, num_processes, i, devices_per_process)
      procs.append(subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    process_group=0, preexec_fn=preexec))
    for i, p in enumerate(procs):
      for stream in (p.stdout, p.stderr):
        t = threading.Thread(target=_forward, args=(stream, sys.stdout.buffer, f"[{i}] ", lock),
                             daemon=True)
        t.start()
        threads.append(t)
    while [p.poll() for p in procs].count(None):  # poll every process, not just the first
      failed = [(i, p.returncode) for i, p in enumerate(procs)
                if p.returncode is not None and p.returncode != 0]
      if failed:
        i, code = failed[0]
        with lock:
          print(f"[launch] process {i} {_describe_status(code)}; stopping the others",
                flush=True)
        status = code if code > 0 else 1
        _stop(procs)
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(procs, _TERM_GRACE_S)
    status = 130
  except _Terminated:
    _stop(procs, _TERM_GRACE_S)
    status = 143
  finally:
    signal.signal(signal.SIGTERM, previous)
  for t in threads:
    t.join(timeout=_GRACE_S)
  if status == 0:
    codes = [p.returncode for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
      status = bad[0][1] if bad[0][1] > 0 else 1
      print(f"[launch] process {bad[0][0]} {_describe_status(bad[0][1])}", flush=True)
  return status


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  forwarded = []
  if "--" in argv:
    cut = argv.index("--")
    argv, forwarded = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(prog="python -m fastdp_jax.launch",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--num_processes", type=int, required=True,
                 help="processes to start; the arguments after -- go to each of them")
  p.add_argument("--devices_per_process", type=int, default=None,
                 help="fake CPU devices per process (CPU development and tests)")
  p.add_argument("--script", default=None,
                 help="Python program to run (default: the trainer, python -m fastdp_jax)")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  args = p.parse_args(argv)
  return launch(args.num_processes, forwarded, devices_per_process=args.devices_per_process,
                script=args.script, port=args.port)


if __name__ == "__main__":
  sys.exit(main())

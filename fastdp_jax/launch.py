"""Starts N local processes of one multi-process run, for development and tests.

Usage::

  python -m fastdp_jax.launch --num_processes=2 [--devices_per_process=K] -- \\
      --config=configs/dist.py --config.data.path=DIR --workdir=runs/dist

Everything after ``--`` goes to every process of ``main.py`` (or ``--script``). Process i gets
``FASTDP_COORDINATOR_ADDRESS=127.0.0.1:PORT`` (a free port), ``FASTDP_NUM_PROCESSES=N`` and
``FASTDP_PROCESS_ID=i`` (read by :func:`fastdp_jax.distributed.initialize`); the processes
talk over loopback (gloo collectives on CPU). ``--devices_per_process=K`` gives each process
K fake CPU devices. Output lines are forwarded with a ``[i]`` prefix. If a process fails, the
launcher stops the others and exits non-zero; it exits 0 only if all of them do.

On a cluster, do not use this: start one ``main.py`` per host with ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or let SLURM / Open MPI start them (see
``configs/dist.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free a moment ago (the coordinator binds it soon after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int | None) -> dict[str, str]:
  """The environment of process ``process_id``."""
  env = dict(base)
  env.update(FASTDP_COORDINATOR_ADDRESS=coordinator, FASTDP_NUM_PROCESSES=str(num_processes),
             FASTDP_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [
        f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _forward(stream, prefix: str, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix.encode() + line)
      sys.stdout.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to every live process, SIGKILL to those still alive after a grace period."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + _GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(num_processes: int, args: Sequence[str], *, devices_per_process: int | None = None,
           script: str | None = None, port: int | None = None) -> int:
  """Runs ``num_processes`` copies of ``script`` as one run; returns the exit status.

  Returns:
    0 if every process exits 0; otherwise the first failing process's status (1 if it was
    killed by a signal), after the others were stopped.
  """
  if num_processes <= 0:
    raise ValueError(f"{num_processes=} must be positive")
  script = script or os.path.join(_ROOT, "main.py")
  coordinator = f"127.0.0.1:{port or free_port()}"
  lock = threading.Lock()
  procs, threads = [], []
  print(f"[launch] {num_processes} processes, coordinator {coordinator}"
        + (f", {devices_per_process} CPU devices each" if devices_per_process else ""),
        flush=True)
  for i in range(num_processes):
    env = process_env(os.environ, coordinator, num_processes, i, devices_per_process)
    p = subprocess.Popen([sys.executable, script, *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    t = threading.Thread(target=_forward, args=(p.stdout, f"[{i}] ", lock), daemon=True)
    t.start()
    procs.append(p)
    threads.append(t)
  status = 0
  try:
    while [p.poll() for p in procs].count(None):  # poll every process, not just the first
      failed = [(i, p.returncode) for i, p in enumerate(procs)
                if p.returncode is not None and p.returncode != 0]
      if failed:
        i, code = failed[0]
        with lock:
          print(f"[launch] process {i} exited with status {code}; stopping the others",
                flush=True)
        status = code if code > 0 else 1
        _stop(procs)
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(procs)
    status = 130
  for t in threads:
    t.join(timeout=_GRACE_S)
  if status == 0:
    codes = [p.returncode for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
      status = bad[0][1] if bad[0][1] > 0 else 1
      print(f"[launch] process {bad[0][0]} exited with status {bad[0][1]}", flush=True)
  return status


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  forwarded = []
  if "--" in argv:
    cut = argv.index("--")
    argv, forwarded = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(prog="python -m fastdp_jax.launch",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--devices_per_process", type=int, default=None,
                 help="fake CPU devices per process (CPU development and tests)")
  p.add_argument("--script", default=None, help="program to run (default: main.py)")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  args = p.parse_args(argv)
  return launch(args.num_processes, forwarded, devices_per_process=args.devices_per_process,
                script=args.script, port=args.port)


if __name__ == "__main__":
  sys.exit(main())

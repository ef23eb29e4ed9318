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

Faults are bounded in time. A process other than 0 first waits at most
``initialization_timeout_s`` for the coordinator's port, and raises
:class:`CoordinatorUnreachableError` naming the address if it never opens. Once running, the
coordination service marks a process that has sent no heartbeat for
``heartbeat_timeout_s`` as dead and terminates the others with "another task died"; a
collective that loses its peer fails at once. :func:`exit_promptly_on_failure` makes a failing
process exit at once (no shutdown barrier), with a one-line message when it lost a peer, so
that the others notice within the heartbeat timeout instead of waiting for it.

The noise key is agreed once at start: process 0 draws it and broadcasts it
(:func:`broadcast_from_process_0`), so every device adds the same noise to the same global sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

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


class CoordinatorUnreachableError(errors.UserError, RuntimeError):
  """The coordinator (process 0) did not accept connections within the timeout."""


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
    raise ValueError(f"multi-process run from the {source}: {', '.join(missing)} not given "
                     f"(set all of --coordinator_address, --num_processes, --process_id or "
                     f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
  if ":" not in coordinator_address:
    raise ValueError(f"coordinator_address={coordinator_address!r} must be HOST:PORT")
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
    raise ValueError(f"timeout {value} s ({env}) must be positive")
  return max(1, int(round(value)))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               initialization_timeout_s: float | None = None,
               heartbeat_timeout_s: float | None = None) -> Topology:
  """Joins this process to a multi-process run (call before any other JAX call).

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (it binds that port).
    num_processes: N.
    process_id: this process's rank in ``[0, N)``.
    initialization_timeout_s: how long to wait for the coordinator and the other processes
      (default ``$FASTDP_INIT_TIMEOUT_S`` or 90).
    heartbeat_timeout_s: a process silent this long is declared dead and the run stops
      (default ``$FASTDP_HEARTBEAT_TIMEOUT_S`` or 60).

  Returns:
    The resolved :class:`Topology` (``source == 'single'``: nothing was initialised).

  Raises:
    ValueError: an incomplete or inconsistent topology.
    CoordinatorUnreachableError: the coordinator's port did not open in time.
  """
  topo = resolve(coordinator_address, num_processes, process_id)
  if topo.source == "single":
    return topo
  init_s = _seconds(initialization_timeout_s, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S)
  beat_s = _seconds(heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S)
  kwargs = dict(initialization_timeout=init_s, heartbeat_timeout_seconds=beat_s)
  if topo.source == "cluster":
    logging.info("initialising from the cluster environment (JAX auto-detection)")
    jax.distributed.initialize(local_device_ids=_all_local_gpus_if_one_task_per_node(),
                               **kwargs)
    return dataclasses.replace(topo, num_processes=jax.process_count(),
                               process_id=jax.process_index())
  start = time.monotonic()
  if topo.process_id != 0:
    wait_for_coordinator(topo.coordinator_address, init_s)
  remaining = max(1, math.ceil(init_s - (time.monotonic() - start)))
  # If a peer never joins, JAX aborts every process after the timeout with DEADLINE_EXCEEDED
  # from C++ (no Python exception to catch): say so beforehand.
  print(f"process {topo.process_id} of {topo.num_processes}: joining coordinator "
        f"{topo.coordinator_address} (timeout {remaining} s, heartbeat {beat_s} s; "
        "DEADLINE_EXCEEDED below means a process did not join in time)",
        file=sys.stderr, flush=True)
  # 'deactivate': explicit values must not be overridden by a SLURM/MPI environment, whose
  # detection would also restrict this process to one GPU; one process per host uses all.
  jax.distributed.initialize(topo.coordinator_address, topo.num_processes, topo.process_id,
                             cluster_detection_method="deactivate",
                             initialization_timeout=remaining,
                             heartbeat_timeout_seconds=beat_s)
  return topo


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
    ValueError: naming ``what``, on every process, if any process differs.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digest = np.frombuffer(hashlib.sha256(repr(value).encode()).digest()[:8], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(digest))
  if not (every == every[0]).all():
    differ = [p for p in range(len(every)) if not (every[p] == every[0]).all()]
    raise ValueError(f"{what} differs between processes (processes {differ} differ from "
                     "process 0); start every process with the same config and data")


def _exit_now(code: int) -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def exit_promptly_on_failure() -> Iterator[None]:
  """In a multi-process run, a failing process exits at once with a non-zero status.

  A normal exit waits at JAX's shutdown barrier for every other process, which are
  themselves blocked in a collective waiting for this one; exiting at once lets them see it
  gone (a closed connection or a missed heartbeat) and stop within the heartbeat timeout.
  A collective whose peer died raises ``JaxRuntimeError`` (gloo: "Connection closed by
  peer"): it is reported as one line naming the lost contact. Single-process runs are not
  affected.
  """
  try:
    yield
  except SystemExit as e:
    if jax.process_count() > 1 and e.code not in (0, None):
      _exit_now(e.code if isinstance(e.code, int) else 1)
    raise
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    print(f"error: process {jax.process_index()} of {jax.process_count()} lost contact with "
          f"another process, stopping: {str(e).splitlines()[0][:300]}", file=sys.stderr)
    _exit_now(1)
  except BaseException:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    _exit_now(1)

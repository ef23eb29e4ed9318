"""Atomic outputs: every file the project writes appears whole or not at all.

One helper for every output file (training outputs, the exported model, keys, manifests,
preprocessing outputs): write a temporary file beside the target (same directory, so the
rename stays on one file system), flush and ``fsync`` it, rename it over the target
(``os.replace``, atomic on POSIX), then ``fsync`` the directory so the rename itself survives
a power cut. A crash or a full disk at any point leaves the previous complete file (or none),
never a truncated one. Writers that open files by name (h5py) use :func:`replacing_path`.

Directories the same way: an output directory (a dataset, a batch directory, the exported
model) is written into a hidden staging directory beside it (:func:`make_staging`,
``.NAME.staging-HOST-PID-*``) and renamed into place when complete (:func:`publish`). What a
killed writer leaves (staging directories, replaced outputs being deleted, temporary files) is
removed by the next writer of the same output on the same host (:func:`clean_stale`).

A full disk (``ENOSPC``) or an exhausted quota (``EDQUOT``) is the user's to fix: it becomes
:class:`DiskFullError`, a :class:`fastdp_jax.errors.UserError` (one line, exit status 2) that
names the file and says that the previous complete state is intact. :func:`disk_full_is_user_error`
does the same for writers that are not ours (orbax checkpoints, h5py shards, TensorBoard).

Example::

  atomic.write_json(os.path.join(workdir, 'summary.json'), summary, mode=0o600)
  atomic.write_npz(os.path.join(workdir, 'final_params.npz'), {'layers/0/kernel': w})
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import numpy as np

from fastdp_jax import errors

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What a full disk looks like in the text of errors that lost their errno on the way (h5py's
# "errno = 28", a Spark executor's Python traceback, tensorstore's status messages).
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "errno = 28",
                   "[Errno 28]", "[Errno 122]")


class DiskFullError(errors.UserError):
  """The disk (or the quota) filled up while writing an output; the previous state is kept."""


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether ``exc`` (or an exception it was raised from) is a full disk or quota."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, DiskFullError):
      return True
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
      return True
    if any(t in str(exc) for t in _DISK_FULL_TEXT):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def disk_full_message(what: str, kept: str) -> str:
  """``no space left on device writing WHAT; KEPT; free some space and rerun``."""
  return f"no space left on device writing {what}; {kept}; free some space and rerun"


@contextlib.contextmanager
def disk_full_is_user_error(what: str, kept: str, restate: bool = False) -> Iterator[None]:
  """Turns a full disk inside the block into :class:`DiskFullError` (other errors pass).

  Args:
    what: the file or directory being written (named in the message).
    kept: what is intact, e.g. ``'the last checkpoint is intact; rerun to resume'``.
    restate: also restate a :class:`DiskFullError` raised inside (which names a file of a
      staging directory, say) as one about ``what``.
  """
  try:
    yield
  except DiskFullError as e:
    if restate:
      raise DiskFullError(disk_full_message(what, kept)) from e
    raise
  except Exception as e:  # pylint: disable=broad-except
    if is_disk_full(e):
      raise DiskFullError(disk_full_message(what, kept)) from e
    raise


def directory_bytes(path: str | os.PathLike) -> int:
  """The bytes of the files under ``path`` (0 if it does not exist)."""
  total = 0
  for root, _, names in os.walk(os.fspath(path)):
    for n in names:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, n)).st_size
  return total


def largest_entry_bytes(directory: str | os.PathLike) -> int:
  """The bytes of the largest entry of ``directory`` (e.g. its last checkpoint), or 0."""
  try:
    entries = list(os.scandir(os.fspath(directory)))
  except OSError:
    return 0
  return max((directory_bytes(e.path) if e.is_dir() else e.stat().st_size for e in entries),
             default=0)


def ensure_free_space(directory: str | os.PathLike, need_bytes: int, what: str, kept: str,
                      agree: Callable[[bool], bool] | None = None) -> None:
  """Raises :class:`DiskFullError` before writing ``what`` if ``directory``'s file system has
  less than ``need_bytes`` free (for writers such as orbax, whose threads print screens of
  tracebacks on a full disk before the error reaches the caller).

  Args:
    agree: turns this process's answer into the one every process acts on (process 0's, in a
      multi-process run: they write one checkpoint together, so all stop or none).
  """
  try:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
  except OSError:
    free = None  # nothing to measure: the write itself will say
  enough = free is None or free >= need_bytes
  if agree is not None:
    enough = agree(enough)
  if not enough:
    free = free or 0
    raise DiskFullError(disk_full_message(
        f"{what} in {directory} ({free >> 10} KiB free, about {need_bytes >> 10} KiB needed)",
        kept))


def fsync_directory(directory: str) -> None:
  """Makes a rename in ``directory`` durable (best effort: not every file system allows it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _temp_name(path: str) -> str:
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def host_tag() -> str:
  """This host's tag in staging names (a hash of its name: private outputs name no host)."""
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
  """``HOST-PID``: who made a staging directory (the next writer checks whether it is dead)."""
  return f"{host_tag()}-{os.getpid()}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # exists, not ours to signal
  return True


def _owner(rest: str) -> tuple[str | None, int | None]:
  """``(host tag, pid)`` of a sibling's name after ``.NAME.KIND-``; None where unknown.

  Staging directories are named ``HOST-PID-RANDOM``; temporary files ``PID-RANDOM`` (this
  host's, like staging directories of earlier versions).
  """
  parts = rest.split("-")
  if len(parts) >= 2 and len(parts[0]) == 8 and parts[1].isdigit() and all(
      c in "0123456789abcdef" for c in parts[0]):
    return parts[0], int(parts[1])
  if parts[0].isdigit() and len(parts) >= 2:
    return host_tag(), int(parts[0])
  return None, None


def clean_stale(path: str | os.PathLike, kinds: tuple[str, ...] = ("staging", "old")
                ) -> list[str]:
  """Removes what killed writers left beside ``path``: ``.NAME.KIND-OWNER-*`` siblings.

  Kinds: ``staging`` (an output being written), ``old`` (a replaced output being deleted),
  ``tmp`` (a file being written). Those made on this host by a process that no longer runs are
  removed; the others (another host's, a live writer's, or ones without an owner) are left and
  named with the command that removes them. This process's own are left alone.

  Returns:
    One line per sibling found and not ours, saying what was done.
  """
  parent, name = os.path.split(os.path.abspath(os.fspath(path)))
  notes = []
  for kind in kinds:
    prefix = f".{name}.{kind}-"
    for stale in sorted(glob.glob(os.path.join(glob.escape(parent),
                                               glob.escape(prefix) + "*"))):
      host, pid = _owner(os.path.basename(stale)[len(prefix):])
      if host == host_tag() and pid == os.getpid():
        continue  # ours (the streaming path's work directory, a file being written)
      if host == host_tag() and pid is not None and not _alive(pid):
        _remove(stale)
        notes.append(f"removed {stale}, left by a killed job (pid {pid}) on {path}")
      else:
        why = (f"a running job (pid {pid})" if host == host_tag() and pid is not None else
               "a job on another host or an older version")
        notes.append(f"{stale} holds private rows of {why}; if no job on {path} is running, "
                     f"remove it: rm -rf {shlex.quote(stale)}")
  return notes


def remove_stale(path: str | os.PathLike, tag: str = "tmp") -> None:
  """:func:`clean_stale` for one kind, silently (temporary files of killed writers)."""
  clean_stale(path, (tag,))


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.remove(path)


def _say_on_stderr(note: str) -> None:
  print(f"note: {note}", file=sys.stderr, flush=True)


def make_staging(path: str | os.PathLike, subdirs: tuple[str, ...] = (), mode: int = 0o700,
                 report: Callable[[str], None] | None = _say_on_stderr) -> str:
  """Creates the hidden staging directory ``.NAME.staging-HOST-PID-RANDOM/`` beside ``path``.

  An output directory is written there and :func:`publish` renames it into place, so a crash
  never leaves a directory that looks complete. What killed writers left beside ``path`` is
  cleaned first (:func:`clean_stale`; each note goes to ``report``, stderr by default).

  Args:
    path: the output directory the staging directory becomes.
    subdirs: subdirectories to create inside.
    mode: the directory's mode (0700 by default: outputs are as private as the data; the
      umask applies).
    report: receives one line per stale sibling found (None: silent).

  Returns:
    The staging directory's path.
  """
  parent, name = os.path.split(os.path.abspath(os.fspath(path)))
  os.makedirs(parent, exist_ok=True)
  for note in clean_stale(path):
    if report is not None:
      report(note)
  staging = os.path.join(parent, f".{name}.staging-{owner_tag()}-{uuid.uuid4().hex[:12]}")
  os.makedirs(staging, mode=mode)
  for sub in subdirs:
    os.makedirs(os.path.join(staging, sub))
  return staging


def publish(staging: str, path: str | os.PathLike, overwrite: bool = True) -> None:
  """Renames the finished ``staging`` directory to ``path``, replacing what is there if
  ``overwrite`` (moved aside as ``.NAME.old-*`` first, then deleted), and makes it durable.

  Raises:
    FileExistsError: ``path`` exists (it appeared while the job ran) and not ``overwrite``.
  """
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  if os.path.lexists(path):
    if not overwrite:
      raise FileExistsError(f"output {path} appeared while the job ran; not replacing it")
    old = os.path.join(parent, f".{name}.old-{owner_tag()}-{uuid.uuid4().hex[:12]}")
    os.replace(path, old)
    os.replace(staging, path)
    _remove(old)
  else:
    os.replace(staging, path)
  fsync_directory(parent)


def _fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)  # fsync through a read-only descriptor is enough on POSIX
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def replacing_path(path: str | os.PathLike, mode: int = 0o644, *,
                   disk_full_error: bool = True, stale: bool = True) -> Iterator[str]:
  """A temporary path beside ``path`` whose file replaces ``path`` atomically when the block
  ends (for writers that open a file by name: h5py, a CSV copier).

  The file written there is fsynced, given exactly ``mode``, renamed over ``path`` and the
  rename made durable. If the block raises, ``path`` is left as it was and the temporary file
  removed.

  Args:
    path: the file to replace.
    mode: its mode (0600 for private files).
    disk_full_error: a full disk raises :class:`DiskFullError`; False keeps the
      ``OSError`` (for callers that report its errno themselves).
    stale: also remove the temporary files of killed writers of ``path`` (False in a fresh
      staging directory, which is removed whole).

  Raises:
    DiskFullError: the disk or quota filled up (``path`` is left as it was).
  """
  path = os.fspath(path)
  tmp = _temp_name(path)
  try:
    try:
      yield tmp
      _fsync_file(tmp)
      os.chmod(tmp, mode & 0o777)  # exactly ``mode``, whatever the umask
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
  except OSError as e:
    if disk_full_error and is_disk_full(e):
      raise DiskFullError(disk_full_message(
          path, f"the previous {os.path.basename(path)} (if any) is intact")) from e
    raise
  fsync_directory(os.path.dirname(os.path.abspath(path)))
  if stale:
    remove_stale(path)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o644) -> Iterator[IO[bytes]]:
  """A binary file object whose contents replace ``path`` atomically when the block ends.

  The temporary file is created with ``mode`` (0600 for private files: never readable by
  others, not even for a moment). If the block raises, ``path`` is left as it was.

  Raises:
    DiskFullError: the disk or quota filled up (``path`` is left as it was).
  """
  with replacing_path(path, mode) as tmp:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o777)
    with os.fdopen(fd, "wb") as f:
      yield f


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
  """Writes ``data`` to ``path`` atomically (see :func:`replacing`)."""
  with replacing(path, mode) as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644, indent: int | None = 1,
               **kw: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (``kw`` goes to :func:`json.dumps`)."""
  write_text(path, json.dumps(obj, indent=indent, **kw), mode)


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any], mode: int = 0o644) -> None:
  """Writes named arrays as an uncompressed ``.npz`` (``np.savez``) to ``path`` atomically."""
  with replacing(path, mode) as f:
    # type: ignore: numpy's stub fears that a ** dict sets allow_pickle.
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]


# Workdirs, checkpoints, key files and dataset directories are as private as the data.
def make_private_dir(path: str) -> None:
  """Creates ``path`` (and parents) and makes it owner-only (mode 0700)."""
  os.makedirs(path, exist_ok=True)
  try:
    os.chmod(path, 0o700)
  except OSError:
    pass  # not ours to change (e.g. a shared mount); the docs say the workdir is private


def write_private_file(path: str, text: str) -> None:
  """Writes ``text`` atomically into an owner-only file (mode 0600)."""
  write_text(path, text, mode=0o600)

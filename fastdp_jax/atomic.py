"""Atomic outputs: every file the project writes appears whole or not at all.

One helper for every output file (training outputs, the exported model, keys, manifests,
preprocessing outputs): write a temporary file beside the target (same directory, so the
rename stays on one file system), flush and ``fsync`` it, rename it over the target
(``os.replace``, atomic on POSIX), then ``fsync`` the directory so the rename itself survives
a power cut. A crash or a full disk at any point leaves the previous complete file (or none),
never a truncated one.

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
import json
import os
import shutil
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


def remove_stale(path: str | os.PathLike, tag: str = "tmp") -> None:
  """Removes ``.NAME.TAG-PID-*`` siblings of ``path`` left by killed writers (dead PIDs).

  Temporary files (``tmp``) and staging directories (``staging``, ``old``) carry the writer's
  process id; those of processes that are still alive are left alone.
  """
  directory, name = os.path.split(os.path.abspath(os.fspath(path)))
  prefix = f".{name}.{tag}-"
  for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")):
    pid = os.path.basename(stale)[len(prefix):].split("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      if os.path.isdir(stale) and not os.path.islink(stale):
        shutil.rmtree(stale, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.remove(stale)
    except OSError:
      pass  # alive (or not ours to ask): leave it


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o644) -> Iterator[IO[bytes]]:
  """A binary file object whose contents replace ``path`` atomically when the block ends.

  The temporary file is created with ``mode`` (0600 for private files: never readable by
  others, not even for a moment). If the block raises, ``path`` is left as it was.

  Raises:
    DiskFullError: the disk or quota filled up (``path`` is left as it was).
  """
  path = os.fspath(path)
  tmp = _temp_name(path)
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o777)
    try:
      with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    os.chmod(tmp, mode & 0o777)  # exactly ``mode``, whatever the umask
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if is_disk_full(e):
      raise DiskFullError(disk_full_message(
          path, f"the previous {os.path.basename(path)} (if any) is intact")) from e
    raise
  fsync_directory(os.path.dirname(os.path.abspath(path)))
  remove_stale(path)


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

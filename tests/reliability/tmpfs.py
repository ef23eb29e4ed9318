"""A tiny tmpfs for full-disk tests (root only; tests that need one skip without it)."""

import contextlib
import os
import subprocess
import uuid


def _mount(path: str, size: str) -> subprocess.CompletedProcess:
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                        capture_output=True, text=True, check=False)


def why_not() -> str | None:
  """None if this process can mount a tmpfs, else why not."""
  if os.geteuid() != 0:
    return "mounting a tmpfs needs root"
  probe = f"/tmp/.tmpfs-probe-{uuid.uuid4().hex[:8]}"
  os.makedirs(probe)
  try:
    r = _mount(probe, "64k")
    if r.returncode:
      return f"cannot mount a tmpfs: {r.stderr.strip()}"
    subprocess.run(["umount", probe], check=True)
    return None
  finally:
    os.rmdir(probe)


@contextlib.contextmanager
def mounted(path, size: str):
  """A tmpfs of ``size`` (e.g. ``'256k'``) mounted on the new directory ``path``."""
  path = os.fspath(path)
  os.makedirs(path)
  r = _mount(path, size)
  assert r.returncode == 0, r.stderr
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def resize(path, size: str) -> None:
  subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True)


def fill(path, leave_bytes: int) -> str:
  """Fills the file system of ``path`` up to ``leave_bytes`` free; returns the filler file."""
  st = os.statvfs(path)
  free = st.f_bavail * st.f_frsize
  filler = os.path.join(path, "filler")
  with open(filler, "wb") as f:
    f.write(b"\0" * max(0, free - leave_bytes))
  return filler

"""What every benchmark prints: one JSON line per measurement, with the machine's state."""

from __future__ import annotations

import json
import os
import platform
import sys


def env() -> dict:
  """The machine and its load when a measurement is taken (and jax's version, once loaded)."""
  out = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
         "python": platform.python_version(), "machine": platform.machine()}
  jax = sys.modules.get("jax")  # a GPU host's own jax may not be the pinned one
  if jax is not None:
    out["jax"] = getattr(jax, "__version__", None)
  return out


def emit(record: dict, out: str | None) -> None:
  """Prints ``record`` as one JSON line, and appends it to ``out`` if given."""
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    with open(out, "a", encoding="utf-8") as f:
      f.write(line + "\n")

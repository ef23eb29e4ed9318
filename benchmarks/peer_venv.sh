#!/usr/bin/env bash
# The peers' virtual environment for benchmarks/throughput.py, OUTSIDE the project's
# dependencies: torch 2.13.0 (CPU wheel) + opacus 1.6.0, and jax_privacy 2.0.0 with the
# project's own jax/jaxlib/flax/optax/numpy/dp-accounting pins (constraints.txt), so that
# jax_privacy's DP-SGD runs on the same JAX as ours.
#
# Usage: bash benchmarks/peer_venv.sh [VENV_DIR]   (default /work/peer-venv; or make peer-venv)
# A plain `pip install torch` would pull a multi-GB CUDA build: the CPU wheel is named by its
# local version (+cpu). pip must find it: in a local wheel directory (pip's find-links, as on
# this project's machines) or, elsewhere, PyTorch's CPU index given as
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
VENV="${1:-${PEER_VENV:-/work/peer-venv}}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
pin() {  # the project's pinned version of a package, from constraints.txt
  grep -iE "^$1==" "$ROOT/constraints.txt" | head -1
}
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu" "opacus==1.6.0"
"$VENV/bin/python" -m pip install -q "jax-privacy==2.0.0" "$(pin jax)" "$(pin jaxlib)" \
  "$(pin flax)" "$(pin optax)" "$(pin numpy)" "$(pin dp-accounting)" chex pydantic toolz
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "opacus", "jax", "jaxlib", "flax", "optax", "jax-privacy", "numpy"):
  print(f"{name}=={md.version(name)}")
PY

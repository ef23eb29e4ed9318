#!/usr/bin/env bash
# The GPU benchmark, prepared for the first GPU host that can be had (at most 10 minutes):
# a fresh venv with the project and its `cuda12` extra (jax[cuda12] pinned to the project's
# jax), then W1 and W2, DP and non-private (benchmarks/throughput.py, separate processes and
# interleaved, with and without padding_microbatch), and the scaling topologies over the
# local GPUs (benchmarks/scaling.py --platform gpu: 1x1, 1x2, 1x4, 1x8 as far as the GPUs
# go). Every measurement is one JSON line in OUT_DIR/gpu_bench.jsonl; nvidia-smi's card
# names head the file.
#
# Usage: bash benchmarks/gpu.sh [OUT_DIR] [--dry-run] [--host-python]
#   OUT_DIR   default $OUT (the device tool's output folder) or runs/gpu-bench
#   --dry-run print the steps (and whether a GPU was found) without running them
#   --host-python  no venv and no install: $PYTHON's own jax (a GPU image's, with CUDA) and
#             packages, the repository on PYTHONPATH, plus the wheels in .whl/ if any,
#             installed offline into a temporary folder (bash benchmarks/gpu_wheels.sh
#             fetches them where an index is reachable). For hosts that reach no package
#             index, such as the GPU machines this workplace lends; its jax may not be the
#             pinned 0.10.2, and every JSON line says which it is.
# Without a GPU (nvidia-smi lists none) it says so and falls back to the CPU: the plain
# install and short CPU runs of the same steps (fake CPU devices for 1x2), so the script is
# checked end to end anywhere; those lines carry "device": "cpu: ...".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY=0
HOST=0
OUT_DIR="${OUT:-$ROOT/runs/gpu-bench}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --host-python) HOST=1 ;;
    -*) echo "unknown option $arg (usage: bash benchmarks/gpu.sh [OUT_DIR] [--dry-run]" \
             "[--host-python])" >&2
        exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
VENV="${GPU_VENV:-${TMPDIR:-/tmp}/fastdp-gpu-venv}"
PYTHON="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_bench.jsonl"
DEADLINE=$((SECONDS + 590))  # the whole script within 10 minutes

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$GPUS" -gt 0 ]; then
  EXTRA="cuda12"; PLATFORM=gpu; TOPOLOGIES="1x1"
  for n in 2 4 8; do [ "$GPUS" -ge "$n" ] && TOPOLOGIES="$TOPOLOGIES,1x$n"; done
  W2_ARGS=(); SCALE_ARGS=()
  echo "gpu.sh: $GPUS GPU(s): installing .[$EXTRA], topologies $TOPOLOGIES"
else
  EXTRA=""; PLATFORM=cpu; TOPOLOGIES="1x1,1x2"
  W2_ARGS=(--max-steps 16 --steps-per-call 8)  # a short CPU check of the same steps
  SCALE_ARGS=(--rows 8192 --calls 2)
  echo "gpu.sh: no NVIDIA GPU found (nvidia-smi lists none): CPU fallback, short runs"
fi

# Runs a step (or prints it with --dry-run) within what is left of the 10 minutes.
step() {
  local left=$((DEADLINE - SECONDS))
  echo "+ $*"
  [ "$DRY" = 1 ] && return 0
  if [ "$left" -le 10 ]; then
    echo "gpu.sh: out of time before: $*" >&2
    return 1
  fi
  timeout "$left" "$@"
}
# A measurement step: its JSON lines (stdout) appended to the log, tagged with the step.
measure() {
  local name="$1"; shift
  if [ "$DRY" = 1 ]; then step "$@"; return 0; fi
  step "$@" | while IFS= read -r line; do
    case "$line" in
      \{*) printf '%s\n' "${line%\}}, \"gpu_sh_step\": \"$name\"}" | tee -a "$LOG" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done
}

[ "$DRY" = 1 ] || mkdir -p "$OUT_DIR"
if [ "$DRY" = 0 ] && [ "$GPUS" -gt 0 ]; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader |
    while IFS=, read -r idx name mem driver; do
      printf '{"gpu": %s, "name": "%s", "memory": "%s", "driver": "%s"}\n' \
        "$idx" "${name# }" "${mem# }" "${driver# }" | tee -a "$LOG"
    done
fi

if [ "$HOST" = 1 ]; then
  PY="$PYTHON"
  SITE="${TMPDIR:-/tmp}/fastdp-gpu-site"
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    step "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.whl/*.whl
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  step "$PYTHON" -m venv "$VENV"
  step "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" --upgrade pip setuptools
  step "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" --no-build-isolation \
    "$ROOT${EXTRA:+[$EXTRA]}"
  PY="$VENV/bin/python"
fi
step "$PY" -c "import jax, fastdp_jax; print('jax', jax.__version__, jax.devices())"

cd "$ROOT"
# W1 and W2, DP and non-private: separate processes (peak memory) and interleaved.
measure throughput "$PY" benchmarks/throughput.py --workload W1,W2 --mode nonprivate,dp \
  "${W2_ARGS[@]}"
measure throughput-skip "$PY" benchmarks/throughput.py --workload W2 --mode nonprivate,dp \
  --padding-microbatch 256 "${W2_ARGS[@]}"
# The scaling topologies over the local devices.
measure scaling "$PY" benchmarks/scaling.py --platform "$PLATFORM" --topologies "$TOPOLOGIES" \
  "${SCALE_ARGS[@]}"
[ "$DRY" = 1 ] || echo "gpu.sh: done in $SECONDS s; results in $LOG"

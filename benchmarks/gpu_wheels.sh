#!/usr/bin/env bash
# Downloads, here, the wheels that an offline GPU host lacks for `gpu.sh --host-python`.
#
# The GPU machines this workplace lends (docs: ../.library/device/) reach no package index;
# their image's python3 (3.12) already holds jax with CUDA, flax, optax, orbax, h5py, scipy,
# absl, rich, chex and matplotlib, but not these. They are fetched for CPython 3.12 on
# manylinux x86-64, at the versions constraints.txt pins, into .whl/ (git-ignored), to travel
# with the working tree (the device tool's `carry: [".whl"]`; 64 MiB at most, this is < 10).
#
# Usage: bash benchmarks/gpu_wheels.sh [DEST]     (default .whl in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
# Not on the GPU image: the project's own dependencies and what they need in turn.
NAMES=(jax-privacy dp-accounting dm-tree ml-collections tensorboardX pydantic pydantic_core
       annotated-types typing-inspection rich)
pin() {  # the version constraints.txt pins for a name ('-' and '_' alike, any case)
  local key
  key=$(echo "$1" | tr 'A-Z_' 'a-z-')
  awk -F'==' -v k="$key" '{n=tolower($1); gsub("_","-",n); if (n==k) print $2}' \
    "$ROOT/constraints.txt"
}
mkdir -p "$DEST"
for name in "${NAMES[@]}"; do
  version=$(pin "$name")
  if [ -z "$version" ]; then
    echo "gpu_wheels.sh: $name is not pinned in constraints.txt" >&2
    exit 1
  fi
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    "$name==$version"
done
echo "gpu_wheels.sh: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"

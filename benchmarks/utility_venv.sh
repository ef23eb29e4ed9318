#!/usr/bin/env bash
# The private-model peers' virtual environment for benchmarks/utility.py, OUTSIDE the
# project's dependencies: interpret-core (DP-EBM: DPExplainableBoostingClassifier, in the core
# package; no extra is needed), diffprivlib (DP logistic regression), scikit-learn (non-private
# logistic regression and gradient boosting), numpy, pandas, scipy.
#
# Usage: bash benchmarks/utility_venv.sh [VENV_DIR]   (default /work/utility-peer-venv)
#
# Pins: the versions found working together here (2026-12): interpret-core 0.7.8 needs
# scikit-learn >= 1.6; diffprivlib 0.6.6 breaks on scikit-learn 1.7 (its LogisticRegression
# subclasses private scikit-learn internals), so scikit-learn 1.6.1.
set -euo pipefail
VENV="${1:-${UTILITY_PEER_VENV:-/work/utility-peer-venv}}"
PYTHON="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "interpret-core==0.7.8" "diffprivlib==0.6.6" \
  "scikit-learn==1.6.1" "numpy==2.2.6" "pandas==2.3.3" "scipy==1.15.3" "joblib==1.5.2"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
from interpret.privacy import DPExplainableBoostingClassifier  # noqa: F401 (imports)
from diffprivlib.models import LogisticRegression  # noqa: F401
for name in ("interpret-core", "diffprivlib", "scikit-learn", "numpy", "pandas", "scipy"):
  print(f"{name}=={md.version(name)}")
PY

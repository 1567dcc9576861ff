#!/usr/bin/env bash
# Runs bt-ray's tests: unit (fast, fake engine) then integration (real model, real Ray, real DSPy, CPU).
# GPU tests (marker `gpu`) are skipped on machines without CUDA.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/unit      # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BT_RAY_VENV:-.venv}"
[ -x "$venv/bin/python" ] || bash scripts/install.sh
source scripts/env.sh
if [ $# -gt 0 ]; then
  exec "$venv/bin/python" -m pytest "$@"
fi
"$venv/bin/python" -m pytest tests -q -m "not integration and not gpu"
"$venv/bin/python" -m pytest tests -q -m "integration or gpu" --durations=10

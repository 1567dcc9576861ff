#!/usr/bin/env bash
# Sets up bt-ray and runs BetterTogether (Π→Θ→Π) on Iris with the shipped SmolLM2-135M, on CPU.
#   bash scripts/quickstart.sh                     # install, then run configs/quickstart.yaml
#   bash scripts/quickstart.sh seed=1 name=again   # extra dotted overrides go to `bt-ray run`
# Prints the per-step score table; the run is in runs/<name>/ (results.md, results.json, scores.png).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh
source scripts/env.sh
venv="${BT_RAY_VENV:-.venv}"
echo "==> running Π→Θ→Π on Iris (installed in $(( $(date +%s) - start ))s)"
"$venv/bin/bt-ray" run configs/quickstart.yaml "$@"
echo "==> quickstart finished in $(( $(date +%s) - start ))s"
echo "==> next: source $venv/bin/activate, then bt-ray report <the run dir above>, or bt-ray run configs/iris.yaml (README: Running it)"

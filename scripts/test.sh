#!/usr/bin/env bash
# Install PICE with its test dependencies into the virtual environment .venv (scripts/setup.sh;
# nothing goes into the system Python) and Mosquitto from the distribution (the suite starts it
# itself), then lint, type-check and run the whole test suite. Usage: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends mosquitto
fi
# Mosquitto is started by the tests on free loopback ports; the packaged service is not needed.

# PYTHON (default python3) is the interpreter the venv is made from; torch is pinned there.
./scripts/setup.sh dev
PY="${PICE_VENV:-.venv}/bin/python"

"$PY" -m ruff check .
"$PY" -m mypy
exec "$PY" -m pytest "$@"

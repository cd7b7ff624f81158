#!/usr/bin/env bash
# Install PICE with its test dependencies (and Mosquitto, which the suite starts itself),
# then lint, type-check and run the whole test suite. Usage: ./scripts/test.sh [pytest args]
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

PYTHON="${PYTHON:-python3}"
# torch is pinned to the CPU wheel: an unpinned torch pulls gigabytes of CUDA libraries.
"$PYTHON" -m pip install --disable-pip-version-check -q "torch==2.13.0" -e ".[dev]"

"$PYTHON" -m ruff check .
"$PYTHON" -m mypy
exec "$PYTHON" -m pytest "$@"

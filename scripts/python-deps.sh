#!/usr/bin/env bash
# Install the Python packages the tests use (the official XenAPI client, for the XAPI
# simulator's fidelity test) into target/pydeps, without touching the system's Python.
# Prints the folder to put on PYTHONPATH. Usage: PYTHONPATH=$(scripts/python-deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$PWD/target/pydeps"
if PYTHONPATH="$dir" python3 -c 'import XenAPI' 2>/dev/null; then
    echo "$dir"
    exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
mkdir -p "$dir"
# --target keeps it out of the system's site-packages (PEP 668 allows that).
python3 -m pip install --quiet --disable-pip-version-check --target "$dir" XenAPI >&2 ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages --target "$dir" XenAPI >&2
PYTHONPATH="$dir" python3 -c 'import XenAPI' >&2
echo "$dir"

#!/usr/bin/env bash
# Run the whole test suite: unit tests, golden vectors, property tests and end-to-end tests
# of the real binary. Installs the Debian packages the tests use first.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/packages.sh
PYTHONPATH=$(scripts/python-deps.sh)
export PYTHONPATH
cargo test --workspace --locked

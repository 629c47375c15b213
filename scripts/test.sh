#!/usr/bin/env bash
# The test suite, as CI runs it. Fetches the backbone weights first (pip, into the user cache) if missing, and
# the Python runtimes the ONNX parity test runs exported models in (tests/requirements.txt; a Debian-managed
# Python would refuse a global install without PIP_BREAK_SYSTEM_PACKAGES).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: -r tests/requirements.txt
cargo run --release --quiet -p loupe -- weights fetch
cargo test --release --workspace
./scripts/gui_free_build.sh

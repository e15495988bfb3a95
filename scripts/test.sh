#!/usr/bin/env bash
# Runs every test: installs what the tests need (scripts/setup-test.sh: the
# real models, the test photos, the Python test tools, the Node.js client's
# packages, promtool and kubectl for the deploy checks, headless Chromium for
# the web console's browser test), then the unit and integration tests, which
# start real servers on loopback ports. One release build serves the tests and
# the server alike.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-test.sh
cargo test --release --locked "$@"

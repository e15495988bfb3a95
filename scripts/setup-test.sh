#!/usr/bin/env bash
# Installs what the tests need: the real models, the test photos, the Python
# test tools, the Node.js client's packages, promtool and kubectl for the
# deploy checks, headless Chromium for the web console's browser test, and the
# peft reference's virtualenv. Idempotent; scripts/test.sh runs it first, and
# CI runs it beside the lints, as it waits mostly on downloads.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-models.sh
scripts/fetch-test-images.sh
scripts/setup-python.sh
scripts/setup-node.sh
scripts/setup-tools.sh
scripts/setup-browser.sh
scripts/setup-peft.sh

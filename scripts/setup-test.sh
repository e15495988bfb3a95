#!/usr/bin/env bash
# Installs what the tests need: the test photos, the Python test tools, the
# Node.js client's packages, promtool and kubectl for the deploy checks,
# headless Chromium for the web console's browser test, the peft reference's
# virtualenv, and the real models (the served ones and the SmolLM2 decoder).
# Idempotent; scripts/test.sh runs it first, and CI runs it beside the lints,
# as it waits mostly on downloads.
#
# The models come last: converting EfficientNet-Lite0's weights needs the
# release build of tlserve, which in CI waits for the lints' hold on the
# target folder; everything before it only downloads and unpacks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-test-images.sh
scripts/setup-python.sh
scripts/setup-node.sh
scripts/setup-tools.sh
scripts/setup-browser.sh
scripts/setup-peft.sh
# The tests also run the SmolLM2 decoder, which is not a default model.
TLSERVE_MODELS="all-MiniLM-L6-v2 efficientnet-lite0 SmolLM2-135M-Instruct" scripts/fetch-models.sh

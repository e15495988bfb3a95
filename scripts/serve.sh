#!/usr/bin/env bash
# Sets up and serves: fetches the default models if missing, builds the release
# binary and runs `tlserve serve` with config/tlserve.toml (or $TLSERVE_CONFIG).
# Extra arguments go to `tlserve serve`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-models.sh
cargo build --release --locked
exec target/release/tlserve serve --config "${TLSERVE_CONFIG:-config/tlserve.toml}" "$@"

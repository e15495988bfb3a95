#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets in fuzz/ for a bounded time each,
# starting from the committed seed corpus. Needs a nightly toolchain (cargo-fuzz
# builds with sanitizers) and a C++ compiler (libFuzzer); installs cargo-fuzz
# with `cargo install` when it is missing. New inputs that find new coverage go
# to target/fuzz-corpus/<target> (the committed corpus stays as it is); a crash
# stops the run and leaves its input under fuzz/artifacts/<target>/.
#
# The same targets also run on stable Rust in every test run, on the corpus and
# its mutations, for a few seconds (tests/integration/fuzz_smoke.rs).
#
# Usage: scripts/fuzz.sh [--seconds S] [TARGET...]   (default: 60 s, every target)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds=60
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(image_decode request_convert message_frames)

log() { printf 'fuzz: %s\n' "$*" >&2; }
rustup run nightly rustc --version >/dev/null 2>&1 \
  || { log "error: no nightly toolchain (rustup toolchain install nightly)"; exit 1; }
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

for target in "${targets[@]}"; do
  work="target/fuzz-corpus/$target"
  mkdir -p "$work"
  log "$target for ${seconds}s"
  # The first corpus directory receives new inputs; the committed one seeds it.
  cargo +nightly fuzz run "$target" "$work" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10
done
log "no crash in ${#targets[@]} target(s), ${seconds}s each"

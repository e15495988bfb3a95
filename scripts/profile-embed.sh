#!/usr/bin/env bash
# Where a MiniLM forward pass spends its time, per engine and batch size:
# samples `tlserve bench-embed` with perf (cpu-clock, no call graphs) and groups
# the symbols into kinds of work (scripts/bench/perf_categories.py). For the
# native engine it also prints bench-embed's own per-phase timers (--profile).
# Results and the raw perf data go to target/perf/. Needs `perf` (Debian:
# linux-perf) and perf_event_paranoid <= 2 or root.
#
# Usage: scripts/profile-embed.sh [--batch-sizes 1,32] [--engines native,candle]
#                                 [--precision f32|int8|bf16]  (native engine)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
batch_sizes="1,32"
engines="native,candle"
precision="f32"
while [ $# -gt 0 ]; do
  case "$1" in
    --batch-sizes) batch_sizes="$2"; shift 2 ;;
    --engines) engines="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    *) echo "profile-embed: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v perf >/dev/null || { echo "profile-embed: perf is not installed (Debian: linux-perf)" >&2; exit 1; }

out="$root/target/perf"
mkdir -p "$out"
scripts/fetch-models.sh >&2
scripts/bench-corpus.sh target/bench/corpus.txt >/dev/null
cargo build --release --locked --quiet

for engine in ${engines//,/ }; do
  for batch in ${batch_sizes//,/ }; do
    data="$out/$engine-$precision-b$batch.data"
    profile_flag=()
    [ "$engine" = native ] && profile_flag=(--profile)
    echo "== $engine, batch $batch" >&2
    precision_of_run="f32"; [ "$engine" = native ] && precision_of_run="$precision"
    TLSERVE__BACKBONES__0__ENGINE="$engine" TLSERVE__BACKBONES__0__PRECISION="$precision_of_run" perf record -q -e cpu-clock -F 499 -o "$data" -- \
      target/release/tlserve bench-embed --backbone all-MiniLM-L6-v2 \
      --corpus target/bench/corpus.txt --batch-sizes "$batch" --min-seconds 5 "${profile_flag[@]}"
    perf report -i "$data" --stdio --sort symbol 2>/dev/null > "${data%.data}.txt"
    printf '{"engine": "%s", "precision": "%s", "batch_size": %s, "perf_shares": %s}\n' \
      "$engine" "$precision_of_run" "$batch" \
      "$(python3 scripts/bench/perf_categories.py < "${data%.data}.txt")"
  done
done

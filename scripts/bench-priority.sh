#!/usr/bin/env bash
# Shows what the bulk lane buys: the latency of light online Embed traffic alone,
# next to a heavy competing flood sent at online priority, and next to the same
# flood at bulk priority (what training jobs use to embed their examples).
# Prints a markdown table. Loopback only; every run is bounded by --seconds.
#
# Usage: scripts/bench-priority.sh [--seconds S] [--flood-clients C]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds=10
flood_clients=8
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --flood-clients) flood_clients="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

scripts/fetch-models.sh
corpus="$root/target/bench/corpus.txt"
scripts/bench-corpus.sh "$corpus" >/dev/null
cargo build --release --locked --quiet
bin="$root/target/release/tlserve"
work="$(mktemp -d)"
# shellcheck source=scripts/lib/local-server.sh
source "$root/scripts/lib/local-server.sh"
grpc_port="$(free_port)"; metrics_port="$(free_port)"
addr="http://127.0.0.1:$grpc_port"
TLSERVE__SERVER__LISTEN="127.0.0.1:$grpc_port" TLSERVE__SERVER__METRICS_LISTEN="127.0.0.1:$metrics_port" \
  TLSERVE__HEADS__STORE_DIR="$work/heads" "$bin" serve --config config/tlserve.toml 2>"$work/serve.log" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "$bin" "$addr"

# Light online traffic: 2 clients, one sentence per request.
online() { "$bin" bench --addr "$addr" -c 2 -k 1 --duration-seconds "$seconds" --corpus "$corpus" 2>/dev/null; }
# The flood: many clients, 8 sentences per request, for a little longer.
flood() {
  "$bin" bench --addr "$addr" -c "$flood_clients" -k 8 --duration-seconds "$((seconds + 3))" \
    --corpus "$corpus" --priority "$1" 2>/dev/null
}
row() {
  python3 - "$1" "$2" "${3:-}" <<'PY'
import json, sys
online = json.load(open(sys.argv[2]))
flood = json.load(open(sys.argv[3])) if sys.argv[3] else None
l = online["latency_ms"]
flood_rate = f"{flood['inputs_per_sec']:.1f}" if flood else "-"
print(f"| {sys.argv[1]} | {online['requests_per_sec']:.1f} | {l['p50']:.1f} | {l['p95']:.1f} | {l['p99']:.1f} | {flood_rate} |")
PY
}

echo "| scenario | online req/s | online p50 ms | p95 ms | p99 ms | flood inputs/s |"
echo "|---|---:|---:|---:|---:|---:|"
online >"$work/alone.json"
row "online alone" "$work/alone.json"
for priority in online bulk; do
  flood "$priority" >"$work/flood-$priority.json" &
  flood_pid=$!
  sleep 2
  online >"$work/online-$priority.json"
  wait "$flood_pid"
  row "next to a $priority flood ($flood_clients clients x 8 inputs)" "$work/online-$priority.json" "$work/flood-$priority.json"
done

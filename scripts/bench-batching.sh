#!/usr/bin/env bash
# Compares batching settings under the same load, to choose the defaults: for each
# (max_batch_size, max_queue_delay_ms[, workers, threads_per_worker]) it starts
# `tlserve serve` on loopback with that setting, runs `tlserve bench` against it,
# and prints a markdown row: throughput, latency percentiles and the mean inputs
# per forward pass.
#
# Usage: scripts/bench-batching.sh [--concurrency C] [--inputs-per-request K]
#                                  [--seconds S] [--settings "B:D B:D:W:T ..."]
#                                  [--images]
#   --images loads EfficientNet-Lite0 (the second backbone of the default
#   config) with the three test photos, encoded, instead of MiniLM with texts.
#   a setting B:D keeps one worker on every core; B:D:W:T runs W workers of T
#   threads each (T "-" for the default: cores / W).
# Only loopback addresses are used; every run is bounded by --seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

concurrency=16
inputs=1
seconds=10
settings="1:0 8:2 32:0 32:2 32:10 64:5"
images=0
while [ $# -gt 0 ]; do
  case "$1" in
    --concurrency) concurrency="$2"; shift 2 ;;
    --inputs-per-request) inputs="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --settings) settings="$2"; shift 2 ;;
    --images) images=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf 'bench-batching: %s\n' "$*" >&2; }

scripts/fetch-models.sh
if [ "$images" = 1 ]; then
  scripts/fetch-test-images.sh >/dev/null
  index=1 backbone=efficientnet-lite0
  corpus="$root/target/bench/images.txt"
  mkdir -p "$(dirname "$corpus")"
  printf '%s\n' "$root/models/test-images/chelsea.png" "$root/models/test-images/coffee.png" \
    "$root/models/test-images/grace_hopper.jpg" > "$corpus"
  corpus_args=(--backbone "$backbone" --images "$corpus")
else
  index=0 backbone=all-MiniLM-L6-v2
  corpus="$root/target/bench/corpus.txt"
  scripts/bench-corpus.sh "$corpus" >/dev/null
  corpus_args=(--backbone "$backbone" --corpus "$corpus")
fi
cargo build --release --locked --quiet
bin="$root/target/release/tlserve"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# shellcheck source=scripts/lib/local-server.sh
source "$root/scripts/lib/local-server.sh"

log "load: $concurrency clients, $inputs input(s) per request, ${seconds}s per setting; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| max_batch_size | max_queue_delay_ms | workers x threads | req/s | inputs/s | p50 ms | p95 ms | p99 ms | inputs per pass | errors |"
echo "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
for setting in $settings; do
  IFS=: read -r batch delay workers threads <<< "$setting"
  workers="${workers:-1}"
  pool_env=(TLSERVE__BACKBONES__${index}__WORKERS="$workers")
  if [ -n "${threads:-}" ] && [ "$threads" != "-" ]; then
    pool_env+=(TLSERVE__BACKBONES__${index}__THREADS_PER_WORKER="$threads")
  fi
  grpc_port="$(free_port)"; metrics_port="$(free_port)"
  env "${pool_env[@]}" \
  TLSERVE__SERVER__LISTEN="127.0.0.1:$grpc_port" \
  TLSERVE__SERVER__METRICS_LISTEN="127.0.0.1:$metrics_port" \
  TLSERVE__BACKBONES__${index}__MAX_BATCH_SIZE="$batch" \
  TLSERVE__BACKBONES__${index}__MAX_QUEUE_DELAY_MS="$delay" \
    "$bin" serve --config config/tlserve.toml 2>"$work/serve.log" &
  pid=$!
  addr="http://127.0.0.1:$grpc_port"
  wait_ready "$bin" "$addr"
  "$bin" bench --addr "$addr" -c "$concurrency" -k "$inputs" --duration-seconds "$seconds" \
    "${corpus_args[@]}" >"$work/report.json" 2>/dev/null
  python3 - "$work/report.json" "$metrics_port" "$batch" "$delay" "$workers x ${threads:--}" "$backbone" <<'PY'
import json, sys, urllib.request
report = json.load(open(sys.argv[1]))
backbone = sys.argv[6]
metrics = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/metrics", timeout=10).read().decode()
def value(prefix):
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
passes = value(f'tlserve_batch_items_count{{backbone="{backbone}"}}')
per_pass = value(f'tlserve_batch_items_sum{{backbone="{backbone}"}}') / passes if passes else 0.0
l = report["latency_ms"]
print(f"| {sys.argv[3]} | {sys.argv[4]} | {sys.argv[5]} | {report['requests_per_sec']:.1f} | {report['inputs_per_sec']:.1f} "
      f"| {l['p50']:.1f} | {l['p95']:.1f} | {l['p99']:.1f} | {per_pass:.1f} | {report['errors'] or 'none'} |")
PY
  kill -TERM "$pid"; wait "$pid" || true
done

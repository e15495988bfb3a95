#!/usr/bin/env bash
# What one client meets: sequential Embed calls of 1, 8 and 32 sentences from a
# lone client, Python grpcio, tlserve's own Rust client, and on the
# OpenAI-compatible HTTP API the `openai` SDK and plain http.client, against a fresh
# `tlserve serve` on loopback, next to the in-process forward pass of the same
# batches (`tlserve bench-embed`). Run once per max_queue_delay_ms setting, to
# see what waiting for company that is not coming costs a lone request.
#
# Usage: scripts/bench-latency.sh [--requests N] [--delays "0 2"] [--batches "1 8 32"]
# Prints a markdown table: per delay and batch, p50 / p99 round trip of each
# client, the in-process forward pass per batch, and the gap at the median.
# Only loopback addresses are used; every run is bounded by --requests.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

requests=200
delays="0 2"
batches="1 8 32"
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) requests="$2"; shift 2 ;;
    --delays) delays="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf 'bench-latency: %s\n' "$*" >&2; }

scripts/fetch-models.sh >/dev/null
scripts/setup-python.sh >/dev/null
python="$root/.venv/bin/python"
corpus="$root/target/bench/corpus.txt"
scripts/bench-corpus.sh "$corpus" >/dev/null
cargo build --release --locked --quiet
bin="$root/target/release/tlserve"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck source=scripts/lib/local-server.sh
source "$root/scripts/lib/local-server.sh"

# MiniLM alone (the first backbone of the default config): the image
# backbone would only lengthen the start.
python3 - config/tlserve.toml "$root/models" >"$work/tlserve.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read().replace("../models", sys.argv[2])
blocks = re.split(r"(?m)^(?=\[)", text)
seen = 0
for block in blocks:
    if block.startswith("[[backbones]]"):
        seen += 1
        if seen > 1:
            continue
    sys.stdout.write(block)
PY

log "in-process forward pass; load average $(cut -d' ' -f1-3 /proc/loadavg)"
comma_batches="$(echo "$batches" | tr ' ' ',')"
"$bin" bench-embed --config "$work/tlserve.toml" --backbone all-MiniLM-L6-v2 \
  --corpus "$corpus" --batch-sizes "$comma_batches" --min-seconds 3 >"$work/inprocess.jsonl" 2>/dev/null

echo "| max_queue_delay_ms | sentences per call | forward pass ms | Rust client p50 / p99 ms | Python grpcio p50 / p99 ms | Python p50 above the pass, ms | Python openai SDK (HTTP) p50 / p99 ms | Python http.client (HTTP) p50 / p99 ms |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for delay in $delays; do
  grpc_port="$(free_port)"; metrics_port="$(free_port)"; http_port="$(free_port)"
  TLSERVE__SERVER__LISTEN="127.0.0.1:$grpc_port" \
  TLSERVE__SERVER__METRICS_LISTEN="127.0.0.1:$metrics_port" \
  TLSERVE__SERVER__HTTP_LISTEN="127.0.0.1:$http_port" \
  TLSERVE__BACKBONES__0__MAX_QUEUE_DELAY_MS="$delay" \
    "$bin" serve --config "$work/tlserve.toml" 2>"$work/serve.log" &
  pid=$!
  addr="127.0.0.1:$grpc_port"
  wait_ready "$bin" "http://$addr"
  for batch in $batches; do
    log "delay $delay ms, $batch sentence(s) per call; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    "$bin" bench --addr "http://$addr" -c 1 -k "$batch" --requests "$requests" \
      --corpus "$corpus" >"$work/rust.json" 2>/dev/null
    "$python" scripts/bench/latency_client.py --addr "$addr" --corpus "$corpus" \
      --batch "$batch" --requests "$requests" >"$work/python.json"
    "$python" scripts/bench/latency_openai.py --base-url "http://127.0.0.1:$http_port/v1" \
      --corpus "$corpus" --batch "$batch" --requests "$requests" >"$work/openai.json"
    "$python" scripts/bench/latency_openai.py --base-url "http://127.0.0.1:$http_port/v1" \
      --client http --corpus "$corpus" --batch "$batch" --requests "$requests" >"$work/http.json"
    python3 - "$work/inprocess.jsonl" "$work/rust.json" "$work/python.json" "$delay" "$batch" \
      "$work/openai.json" "$work/http.json" <<'PY'
import json, sys
inprocess = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        row = json.loads(line)
        inprocess[row["batch_size"]] = row
batch = int(sys.argv[5])
row = inprocess[batch]
pass_ms = 1e3 * batch / row["sentences_per_sec"]
rust = json.load(open(sys.argv[2]))["latency_ms"]
python = json.loads(open(sys.argv[3]).read())
sdk = json.loads(open(sys.argv[6]).read())
raw = json.loads(open(sys.argv[7]).read())
print(f"| {sys.argv[4]} | {batch} | {pass_ms:.1f} | {rust['p50']:.1f} / {rust['p99']:.1f} "
      f"| {python['p50_ms']:.1f} / {python['p99_ms']:.1f} | {python['p50_ms'] - pass_ms:.1f} "
      f"| {sdk['p50_ms']:.1f} / {sdk['p99_ms']:.1f} | {raw['p50_ms']:.1f} / {raw['p99_ms']:.1f} |")
PY
  done
  kill -TERM "$pid"; wait "$pid" || true
done

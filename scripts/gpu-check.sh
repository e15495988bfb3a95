#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its driver, and a Python with
# torch and sentence-transformers, but no network and no Rust: run it from the
# folder scripts/gpu-check-prepare.sh filled (bin/tlserve built with CUDA,
# model/ with f16 weights, bench/ with the corpus and the peer script).
#
#   (a) numerics: one server holds MiniLM twice, on the CPU and on the GPU;
#       Embed of 256 corpus sentences on each; every GPU vector must be within
#       cosine 0.9999 of the CPU one (f32);
#   (b) throughput per batch size, in one run: tlserve's forward pass on the GPU
#       (`tlserve bench-embed`) and sentence-transformers on the same GPU, same
#       weights, corpus and batch sizes, printed side by side with the ratio;
#   (c) the GPU memory the server process holds with the model resident.
#
# Usage: ./gpu-check.sh [--device cuda:0] [--batches "1 8 32 128"]
#                       [--python python3] [--min-seconds 5]
# `--device cpu` runs the same steps on the CPU: a dry run of the script itself.
# Exits non-zero when a numerical check fails. Only loopback ports are used.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
device="cuda:0"
batches="1 8 32 128"
python="python3"
min_seconds=5
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --min-seconds) min_seconds="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

bin="$here/bin/tlserve"
model="$here/model"
corpus="$here/bench/corpus.txt"
[ -x "$bin" ] && [ -f "$model/model.safetensors" ] && [ -f "$corpus" ] \
  || die "run this from the folder scripts/gpu-check-prepare.sh made"
# The CUDA build links the driver (libcuda.so.1) and CUDA 13's cuBLAS, cuRAND
# and runtime: the machine's driver and toolkit must provide them.
missing="$(ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }' | tr '\n' ' ')"
[ -z "$missing" ] || die "bin/tlserve cannot find ${missing}: install the NVIDIA driver and the \
CUDA 13 libraries, or add their folder to LD_LIBRARY_PATH"
"$python" -c 'import torch, sentence_transformers' 2>/dev/null \
  || die "$python lacks torch or sentence-transformers: pass --python"
gpu_name="none"
if command -v nvidia-smi >/dev/null; then
  gpu_name="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
fi
log "GPU: $gpu_name; device $device"

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

grpc="127.0.0.1:$(free_port)"
cat >"$work/tlserve.toml" <<TOML
[server]
listen = "$grpc"
metrics_listen = "127.0.0.1:$(free_port)"
http_listen = "127.0.0.1:$(free_port)"

[heads]
store_dir = "$work/heads"

[[backbones]]
name = "minilm-cpu"
architecture = "bert"
source = { path = "$model" }
device = "cpu"
precision = "f32"

[[backbones]]
name = "minilm-gpu"
architecture = "bert"
source = { path = "$model" }
device = "$device"
TOML

# (a) numerics and (c) memory, from one server.
"$bin" serve --config "$work/tlserve.toml" 2>"$work/serve.log" &
server_pid=$!
ready=0
for _ in $(seq 1200); do
  ready="$({ "$bin" backbones --addr "http://$grpc" 2>/dev/null || true; } | { grep -o BACKBONE_STATE_READY || true; } | wc -l)"
  [ "$ready" -eq 2 ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "the server exited"; }
  sleep 0.1
done
[ "$ready" -eq 2 ] || { cat "$work/serve.log" >&2; die "the backbones did not load within 2 minutes"; }
head -n 256 "$corpus" >"$work/sentences.txt"
"$bin" embed --addr "http://$grpc" -b minilm-cpu <"$work/sentences.txt" >"$work/cpu.json"
"$bin" embed --addr "http://$grpc" -b minilm-gpu <"$work/sentences.txt" >"$work/gpu.json"
memory="n/a"
if command -v nvidia-smi >/dev/null; then
  memory="$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader \
    | awk -F', ' -v pid="$server_pid" '$1 == pid { print $2 }')"
  memory="${memory:-not listed}"
fi
kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=""

"$python" - "$work/cpu.json" "$work/gpu.json" <<'PY'
import json, sys
import numpy as np
def vectors(path):
    data = json.load(open(path))
    return np.array([e["values"] for e in data["embeddings"]], dtype=np.float64)
cpu, gpu = vectors(sys.argv[1]), vectors(sys.argv[2])
assert cpu.shape == gpu.shape, (cpu.shape, gpu.shape)
cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
print(f"numerics: {len(cos)} sentences, cosine GPU vs CPU lowest {cos.min():.7f}, mean {cos.mean():.7f} "
      f"(needed: >= 0.9999)")
sys.exit(0 if cos.min() >= 0.9999 else 1)
PY
echo "GPU memory held by the server with MiniLM resident: $memory"

# (b) throughput, tlserve then sentence-transformers, same batch sizes.
comma="$(echo "$batches" | tr ' ' ',')"
log "tlserve forward pass on $device"
"$bin" bench-embed --config "$work/tlserve.toml" --backbone minilm-gpu --corpus "$corpus" \
  --batch-sizes "$comma" --min-seconds "$min_seconds" >"$work/tlserve.jsonl" 2>/dev/null
log "sentence-transformers on $device"
(cd "$here/bench" && "$python" peer_embed.py --model-dir "$model" --corpus "$corpus" \
  --batch-sizes "$comma" --min-seconds "$min_seconds" --device "$device") >"$work/peer.jsonl"
"$python" - "$work/tlserve.jsonl" "$work/peer.jsonl" "$gpu_name" <<'PY'
import json, sys
def rows(path):
    return {r["batch_size"]: r for r in (json.loads(l) for l in open(path) if l.startswith("{"))}
ours, peer = rows(sys.argv[1]), rows(sys.argv[2])
print(f"\nthroughput, sentences/s ({sys.argv[3]}):\n")
print("| batch | tlserve | sentence-transformers | ratio |")
print("|---:|---:|---:|---:|")
for size in sorted(ours):
    a, b = ours[size]["sentences_per_sec"], peer[size]["sentences_per_sec"]
    print(f"| {size} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
PY

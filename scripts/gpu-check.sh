#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its driver, and a Python with
# torch and sentence-transformers, but no network and no Rust: run it from the
# folder scripts/gpu-check-prepare.sh filled (bin/tlserve built with CUDA,
# model/ with f16 weights, bench/ with the corpus and the peer script).
#
#   (a) numerics: one server holds MiniLM on the CPU (native engine, f32) and
#       on the GPU once per precision (f32, f16, bf16); Embed of 256 corpus
#       sentences on each; every GPU vector must be within cosine 0.9999 of the
#       CPU one in f32, 0.999 in f16 and bf16;
#   (b) throughput per batch size and precision, in one run: tlserve's forward
#       pass on the GPU (`tlserve bench-embed`) and sentence-transformers on the
#       same GPU, same weights, float type, corpus and batch sizes, printed side
#       by side with the ratio; each side first makes one untimed pass over the
#       corpus at each batch size (PyTorch tunes half precision per shape: its
#       first pass ran at a tenth of its steady speed on an H200);
#   (c) the GPU memory the server holds with the models resident (nvidia-smi's
#       used memory before the server starts and once its models are loaded),
#       and per backbone as the server exports it;
#   (d) an image backbone on the GPU: ResNet-50 in torchvision's layout with
#       seeded random weights (made here by torchvision: no file travels), 8
#       seeded random images of varied sizes, every GPU vector within cosine
#       0.9999 of the CPU one.
#
# Usage: ./gpu-check.sh [--device cuda:0] [--batches "1 8 32 128"]
#                       [--precisions "f32 f16 bf16"] [--python python3]
#                       [--min-seconds 3] [--logs DIR]
# --logs keeps the server's and the benchmark's logs in DIR.
# `--device cpu` runs the same steps on the CPU: a dry run of the script itself.
# Exits non-zero when a numerical check fails. Only loopback ports are used.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
device="cuda:0"
batches="1 8 32 128"
precisions="f32 f16 bf16"
python="python3"
min_seconds=3
logs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --precisions) precisions="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --min-seconds) min_seconds="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

bin="$here/bin/tlserve"
model="$here/model"
corpus="$here/bench/corpus.txt"
# The binary travels xz-compressed (a fifth of its size).
if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
  "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bin.xz" "$bin"
  chmod +x "$bin"
fi
[ -x "$bin" ] && [ -f "$model/model.safetensors" ] && [ -f "$corpus" ] \
  || die "run this from the folder scripts/gpu-check-prepare.sh made"
"$python" -c 'import torch, torchvision, sentence_transformers, safetensors, PIL' 2>/dev/null \
  || die "$python lacks torch, torchvision, sentence-transformers, safetensors or Pillow: pass --python"

# The CUDA build links the driver (libcuda.so.1) and CUDA 13's cuBLAS, cuRAND,
# NVRTC and runtime. Where the system lacks them, PyTorch's CUDA 13 wheels
# (nvidia/cu13/lib in its site-packages) and the driver's usual folders serve.
missing_libraries() { ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }' | tr '\n' ' '; }
missing="$(missing_libraries)"
if [ -n "$missing" ]; then
  candidates="$("$python" - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = {os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)"
  for dir in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
    [ -d "$dir" ] && candidates="$candidates:$dir"
  done
  export LD_LIBRARY_PATH="$candidates${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  missing="$(missing_libraries)"
fi
[ -z "$missing" ] || die "bin/tlserve cannot find ${missing}: install the NVIDIA driver and the \
CUDA 13 libraries, or add their folder to LD_LIBRARY_PATH"

gpu_name="none"
gpu_memory_used() { echo 0; }
if command -v nvidia-smi >/dev/null; then
  gpu_name="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
  gpu_memory_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }
fi
log "GPU: $gpu_name; device $device; precisions $precisions"

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$logs" ]; then mkdir -p "$logs" && cp "$work"/*.log "$logs"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

grpc="127.0.0.1:$(free_port)"
metrics="127.0.0.1:$(free_port)"
cat >"$work/tlserve.toml" <<TOML
[server]
listen = "$grpc"
metrics_listen = "$metrics"
http_listen = "127.0.0.1:$(free_port)"

[heads]
store_dir = "$work/heads"
TOML
count=0
# add_backbone NAME ARCHITECTURE FOLDER DEVICE [SETTING...]: one more backbone.
add_backbone() {
  count=$((count + 1))
  printf '\n[[backbones]]\nname = "%s"\narchitecture = "%s"\nsource = { path = "%s" }\ndevice = "%s"\n' \
    "$1" "$2" "$3" "$4" >>"$work/tlserve.toml"
  shift 4
  for setting in "$@"; do echo "$setting" >>"$work/tlserve.toml"; done
}
add_backbone minilm-cpu bert "$model" cpu 'precision = "f32"'
for precision in $precisions; do
  add_backbone "minilm-gpu-$precision" bert "$model" "$device" 'engine = "candle"' "precision = \"$precision\""
done

# (d)'s network and images.
"$python" - "$work/resnet" <<'PY'
import os, sys
import numpy as np, torch, torchvision
from PIL import Image
from safetensors.torch import save_file
out = sys.argv[1]
os.makedirs(os.path.join(out, "images"))
torch.manual_seed(0)
state = torchvision.models.resnet50().state_dict()
save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")},
          os.path.join(out, "model.safetensors"))
rng = np.random.default_rng(0)
for i in range(8):
    pixels = rng.integers(0, 256, (224 + 24 * i, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(out, "images", f"{i}.png"))
PY
add_backbone resnet-cpu resnet50 "$work/resnet" cpu
add_backbone resnet-gpu resnet50 "$work/resnet" "$device"

# (a) numerics, (c) memory and (d), from one server.
memory_before="$(gpu_memory_used)"
"$bin" serve --config "$work/tlserve.toml" 2>"$work/serve.log" &
server_pid=$!
ready=0
for _ in $(seq 1800); do
  ready="$({ "$bin" backbones --addr "http://$grpc" 2>/dev/null || true; } | { grep -o BACKBONE_STATE_READY || true; } | wc -l)"
  [ "$ready" -eq "$count" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "the server exited"; }
  sleep 0.1
done
[ "$ready" -eq "$count" ] || { tail -n 50 "$work/serve.log" >&2; die "the backbones did not load within 3 minutes"; }
memory_after="$(gpu_memory_used)"
# What the server itself reports per backbone (tlserve_backbone_device_memory_bytes).
"$python" - "http://$metrics/metrics" >"$work/device-memory.txt" <<'PY' || true
import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines():
    if line.startswith("tlserve_backbone_device_memory_bytes{"):
        labels, value = line.rsplit(" ", 1)
        print(f"  {labels.split('{', 1)[1].rstrip('}')}: {float(value) / 2**20:.0f} MiB")
PY
head -n 256 "$corpus" >"$work/sentences.txt"
"$bin" embed --addr "http://$grpc" -b minilm-cpu <"$work/sentences.txt" >"$work/cpu.json"
for precision in $precisions; do
  "$bin" embed --addr "http://$grpc" -b "minilm-gpu-$precision" <"$work/sentences.txt" >"$work/gpu-$precision.json"
done
images=()
for i in $(seq 0 7); do images+=(--image "$work/resnet/images/$i.png"); done
"$bin" embed --addr "http://$grpc" -b resnet-cpu "${images[@]}" >"$work/resnet-cpu.json"
"$bin" embed --addr "http://$grpc" -b resnet-gpu "${images[@]}" >"$work/resnet-gpu.json"
# A graceful stop releases every model and exits 0.
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=""
[ "$status" -eq 0 ] || { tail -n 5 "$work/serve.log" >&2; die "the server exited with status $status on SIGTERM"; }
echo "shutdown: the server stopped on SIGTERM with status 0"

numerics_ok=1
compare() { # CPU_JSON GPU_JSON LABEL PRECISION
  "$python" - "$@" <<'PY' || numerics_ok=0
import json, sys
import numpy as np
def vectors(path):
    data = json.load(open(path))
    return np.array([e["values"] for e in data["embeddings"]], dtype=np.float64)
cpu, gpu = vectors(sys.argv[1]), vectors(sys.argv[2])
label, precision = sys.argv[3], sys.argv[4]
needed = 0.9999 if precision == "f32" else 0.999
assert cpu.shape == gpu.shape, (cpu.shape, gpu.shape)
cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
ok = bool(np.isfinite(cos).all() and cos.min() >= needed)
print(f"numerics {label} {precision}: {len(cos)} inputs, cosine GPU vs CPU lowest {np.nanmin(cos):.7f}, "
      f"mean {np.nanmean(cos):.7f} (needed: >= {needed}) {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
}
for precision in $precisions; do
  compare "$work/cpu.json" "$work/gpu-$precision.json" MiniLM "$precision"
done
compare "$work/resnet-cpu.json" "$work/resnet-gpu.json" ResNet-50 f32
echo "GPU memory used by the server (MiniLM in $precisions and ResNet-50 resident, CUDA context included): \
$((memory_after - memory_before)) MiB (nvidia-smi, $memory_before MiB before the start, $memory_after after the load)"
echo "GPU memory per backbone, as the server exports it:"
cat "$work/device-memory.txt"

# (b) throughput, tlserve then sentence-transformers, same batch sizes and type.
comma="$(echo "$batches" | tr ' ' ',')"
for precision in $precisions; do
  case "$precision" in f32) torch_dtype=float32 ;; f16) torch_dtype=float16 ;; bf16) torch_dtype=bfloat16 ;; esac
  log "throughput in $precision: tlserve, then sentence-transformers"
  "$bin" bench-embed --config "$work/tlserve.toml" --backbone "minilm-gpu-$precision" --corpus "$corpus" \
    --batch-sizes "$comma" --min-seconds "$min_seconds" --warm-passes 1 \
    >"$work/tlserve-$precision.jsonl" 2>"$work/bench.log" \
    || { tail -n 20 "$work/bench.log" >&2; die "tlserve bench-embed failed"; }
  (cd "$here/bench" && "$python" peer_embed.py --model-dir "$model" --corpus "$corpus" \
    --batch-sizes "$comma" --min-seconds "$min_seconds" --warm-passes 1 --device "$device" \
    --dtype "$torch_dtype") \
    >"$work/peer-$precision.jsonl"
done
"$python" - "$work" "$gpu_name" $precisions <<'PY'
import json, os, sys
work, gpu, precisions = sys.argv[1], sys.argv[2], sys.argv[3:]
def rows(path):
    return {r["batch_size"]: r for r in (json.loads(l) for l in open(path) if l.startswith("{"))}
print(f"\nthroughput, sentences/s ({gpu}):\n")
print("| precision | batch | tlserve | sentence-transformers | ratio |")
print("|---|---:|---:|---:|---:|")
for precision in precisions:
    ours = rows(os.path.join(work, f"tlserve-{precision}.jsonl"))
    peer = rows(os.path.join(work, f"peer-{precision}.jsonl"))
    for size in sorted(ours):
        a, b = ours[size]["sentences_per_sec"], peer[size]["sentences_per_sec"]
        print(f"| {precision} | {size} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
versions = next(iter(rows(os.path.join(work, f"peer-{precisions[0]}.jsonl")).values()))["versions"]
print(f"\npeer versions: {versions}")
PY
[ "$numerics_ok" -eq 1 ] || die "a numerical check failed (above)"

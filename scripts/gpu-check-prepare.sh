#!/usr/bin/env bash
# Prepares what the GPU check (scripts/gpu-check.sh) needs on a machine with an
# NVIDIA GPU but no network and no Rust: one folder holding the tlserve binary
# built here with `--features cuda` (scripts/build-cuda.sh; xz-compressed), all-MiniLM-L6-v2
# with its weights stored as f16 (half the size; the check compares the GPU
# with the CPU on these same weights), the benchmark corpus, and the scripts.
#
# Usage: scripts/gpu-check-prepare.sh [--out DIR] [--binary PATH]
#   --out     the folder to fill (default: target/gpu-check)
#   --binary  a tlserve binary to ship instead of building the CUDA one (a CPU
#             build serves for a dry run of the check here: --device cpu)
# Then copy DIR to the GPU machine and run DIR/gpu-check.sh there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/target/gpu-check"
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf 'gpu-check-prepare: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

scripts/fetch-models.sh >/dev/null
# numpy for the f16 conversion, from the test virtualenv.
eval "$(scripts/setup-python.sh)"
python="$TLSERVE_VENV/bin/python"
if [ -z "$binary" ]; then
  [ -x scripts/build-cuda.sh ] || die "scripts/build-cuda.sh is missing: pass --binary"
  log "building the CUDA binary (scripts/build-cuda.sh)"
  # It prints shell assignments, the binary's path among them.
  eval "$(scripts/build-cuda.sh)"
  binary="${TLSERVE_CUDA_BIN:?scripts/build-cuda.sh named no binary}"
fi
[ -x "$binary" ] || die "no executable at $binary"

rm -rf "$out"
mkdir -p "$out/bin" "$out/model" "$out/bench"
cp "$binary" "$out/bin/tlserve"
strip "$out/bin/tlserve" 2>/dev/null || true
# xz takes the binary to a fifth (about 10 MB): with the f16 weights the folder
# stays under 64 MiB. gpu-check.sh unpacks it with Python's lzma.
log "compressing the binary (xz)"
xz -9 -T0 "$out/bin/tlserve"

model="$root/models/all-MiniLM-L6-v2"
cp "$model/config.json" "$model/tokenizer.json" "$model/sentence_bert_config.json" "$out/model/"
cp -r "$model/1_Pooling" "$out/model/"
log "storing the weights as f16"
"$python" scripts/bench/f16_safetensors.py "$model/model.safetensors" "$out/model/model.safetensors"

scripts/bench-corpus.sh "$out/bench/corpus.txt" >/dev/null
cp scripts/gpu-check.sh "$out/"
cp scripts/bench/peer_embed.py scripts/bench/bench_args.py "$out/bench/"
log "ready: $(du -sh "$out" | cut -f1) in $out; run $out/gpu-check.sh on the GPU machine"

#!/usr/bin/env bash
# Fine-tuning (LoRA by default, `--method top_layers` for the top layers in
# full) against the default frozen-feature head (TrainHead with no options): both fitted on the same training texts, measured on the same test
# texts (`tlserve bench-finetune`, in process), on Rotten Tomatoes review
# snippets (scripts/bench/finetune_data.py: fixed seed, stratified split).
# Prints the machine, its load average and the JSON result; extra arguments go
# to `tlserve bench-finetune` (e.g. --layers 2 --rank 8 --epochs 3). With
# --peer, then runs the same recipe in PyTorch (+ peft for LoRA) on the same files
# (scripts/bench/peer_finetune.py, in the peer virtualenv of
# scripts/bench-embed.sh --setup-peer) with the defaults' settings.
#
# Usage: scripts/bench-finetune.sh [--train N] [--test N] [--peer] [bench-finetune options]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
train=2000
test=1000
extra=()
peer=0
method=lora
peer_venv="${TLSERVE_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve-peer-venv}"
while [ $# -gt 0 ]; do
  case "$1" in
    --peer) peer=1; shift ;;
    --train) train="$2"; shift 2 ;;
    --test) test="$2"; shift 2 ;;
    --method) method="$2"; extra+=("$1" "$2"); shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done

log() { printf 'bench-finetune: %s\n' "$*" >&2; }

scripts/fetch-models.sh >/dev/null
scripts/bench-heads.sh --setup
out="$root/target/bench/finetune"
python3 scripts/bench/finetune_data.py "$root/target/bench/heads-data" "$out" --train "$train" --test "$test"
cargo build --release --locked --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/release/tlserve"
cat >"$out/tlserve.toml" <<TOML
[heads]
store_dir = "$out/heads"

[[backbones]]
name = "minilm"
architecture = "bert"
source = { path = "$root/models/all-MiniLM-L6-v2" }
TOML
log "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; flags: $(grep -m1 -o -w 'avx512_bf16\|amx_bf16\|avx512_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" bench-finetune --config "$out/tlserve.toml" --backbone minilm \
  --train "$out/train.tsv" --test "$out/test.tsv" "${extra[@]}"
if [ "$peer" = 1 ]; then
  "$peer_venv/bin/python" -c 'import peft, torch, transformers' 2>/dev/null \
    || { log "no peer virtualenv with torch and peft at $peer_venv: run scripts/bench-embed.sh --setup-peer"; exit 1; }
  log "load average before the peer: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$peer_venv/bin/python" scripts/bench/peer_finetune.py "$root/models/all-MiniLM-L6-v2" \
    "$out/train.tsv" "$out/test.tsv" --method "$method" --threads "$(nproc)"
fi

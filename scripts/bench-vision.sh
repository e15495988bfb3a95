#!/usr/bin/env bash
# Image backbone throughput, tlserve vs PyTorch and ONNX Runtime (CPU), in one
# run: images per second at several batch sizes for the real
# EfficientNet-Lite0, and for ResNet-50 and VGG16 (fc7 features) on generated
# weights (no pretrained ones are fetchable here; speed does not depend on the
# values). Decoding and preprocessing count for every engine. The corpus is
# the three test photos (scripts/fetch-test-images.sh), cycled.
#
# Steps: build tlserve; then for each backbone, one engine after the other
# (never two at once): tlserve's `bench-embed` (the engine its config gives:
# `auto`, the native one on a CPU, unless --candle), then
# scripts/bench/peer_vision.py in the peer virtualenv with --runtime torch
# (torchvision's ResNet-50 and VGG16; Lite0 in torch.nn.functional) and
# --runtime onnxruntime (the same torch model exported to ONNX), on the same
# weights, corpus, batch sizes, minimum time and thread count. Prints a
# markdown table with the ratios. The load average is recorded before each
# engine (a warning is printed above 0.5).
#
# Every engine prints JSON lines of the same shape:
#   {"engine": "tlserve" | "torch" | "onnxruntime", "backbone": NAME,
#    "batch_size": B, "images": N, "seconds": T, "images_per_sec": N/T,
#    "threads": n, ...}
# All of them go to target/bench/vision.jsonl (and, as they come, to stderr);
# the report goes to stdout and target/bench/vision-report.md.
#
# The peer virtualenv is the one scripts/bench-embed.sh uses (torch,
# torchvision, Pillow, onnxruntime); create it, or add what an existing one
# lacks, with --setup-peer.
#
# Usage: scripts/bench-vision.sh [options]
#   --batch-sizes LIST   comma-separated batch sizes (default: 1,8,32)
#   --min-seconds S      measure each batch size at least this long (default: 5)
#   --threads N          threads for every engine (default: nproc)
#   --backbones LIST     some of efficientnet-lite0,resnet50,vgg16 (default: all)
#   --candle             tlserve on engine = "candle" (the plain path) instead
#   --no-peer            run tlserve only
#   --setup-peer         create or update the peer virtualenv, then exit
# Environment: TLSERVE_PEER_VENV (default: ~/.cache/tlserve-peer-venv),
#   PYTHON (default: python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
peer_venv="${TLSERVE_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve-peer-venv}"
batch_sizes="1,8,32"
min_seconds=5
threads="$(nproc)"
run_peer=1
only="efficientnet-lite0,resnet50,vgg16"
tlserve_engine="auto"

log() { printf 'bench-vision: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --batch-sizes) [ $# -ge 2 ] || die "$1 needs a value"; batch_sizes="$2"; shift 2 ;;
    --min-seconds) [ $# -ge 2 ] || die "$1 needs a value"; min_seconds="$2"; shift 2 ;;
    --threads)     [ $# -ge 2 ] || die "$1 needs a value"; threads="$2"; shift 2 ;;
    --no-peer)     run_peer=0; shift ;;
    --candle)      tlserve_engine="candle"; shift ;;
    --backbones)   [ $# -ge 2 ] || die "$1 needs a value"; only="$2"; shift 2 ;;
    # One virtualenv, one list of pinned packages: bench-embed.sh's.
    --setup-peer)  exec "$root/scripts/bench-embed.sh" --setup-peer ;;
    -h|--help)     usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ "$batch_sizes" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--batch-sizes wants e.g. 1,8,32, got '$batch_sizes'"
[[ "$min_seconds" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--min-seconds wants a number, got '$min_seconds'"
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads wants a positive integer, got '$threads'"

if [ "$run_peer" = 1 ] && ! { [ -x "$peer_venv/bin/python" ] \
    && "$peer_venv/bin/python" -c 'import torch, torchvision, PIL, onnxruntime, onnx' >/dev/null 2>&1; }; then
  die "no peer virtualenv with torch, torchvision, Pillow and onnxruntime at $peer_venv.
  Create it (or add Pillow to it) with:  scripts/bench-vision.sh --setup-peer
  (or set TLSERVE_PEER_VENV to an existing one), or skip the peer with --no-peer."
fi

# shellcheck source=scripts/lib/bench-load.sh
source "$root/scripts/lib/bench-load.sh"

bench_dir="$root/target/bench"
mkdir -p "$bench_dir"
scripts/fetch-models.sh >&2
scripts/fetch-test-images.sh >&2
eval "$(scripts/setup-python.sh)"
# Build first, so that compiling is neither timed nor running next to either engine.
cargo build --release --locked >&2

generated() { # ARCHITECTURE: the folder of its generated weights, made once
  local dir="$bench_dir/$1-generated"
  [ -f "$dir/model.safetensors" ] \
    || "$TLSERVE_VENV/bin/python" scripts/bench/generate_convnet.py "$1" "$dir" >&2
  echo "$dir"
}

corpus="$bench_dir/images.txt"
printf '%s\n' "$root/models/test-images/chelsea.png" "$root/models/test-images/coffee.png" \
  "$root/models/test-images/grace_hopper.jpg" > "$corpus"

# name, architecture, folder with model.safetensors: for tlserve's config and the peers.
backbones=()
for architecture in ${only//,/ }; do
  case "$architecture" in
    efficientnet-lite0) backbones+=("efficientnet-lite0 efficientnet-lite0 $root/models/efficientnet-lite0") ;;
    resnet50|vgg16) backbones+=("$architecture-generated $architecture $(generated "$architecture")") ;;
    *) die "--backbones: unknown '$architecture' (efficientnet-lite0, resnet50, vgg16)" ;;
  esac
done
engines=(tlserve)
[ "$run_peer" = 1 ] && engines+=(torch onnxruntime)

config="$bench_dir/vision.toml"
for entry in "${backbones[@]}"; do
  read -r name architecture dir <<< "$entry"
  printf '[[backbones]]\nname = "%s"\narchitecture = "%s"\nengine = "%s"\nsource = { path = "%s" }\n\n' \
    "$name" "$architecture" "$tlserve_engine" "$dir"
done > "$config"

cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
machine="nproc $(nproc), CPU ${cpu_model:-unknown}, $(rustc --version 2>/dev/null || echo 'rustc: not found')"
results="$bench_dir/vision.jsonl"
: > "$results"

# candle sizes its CPU thread pool from CANDLE_NUM_THREADS, else
# RAYON_NUM_THREADS, else the number of cores; both are set.
# Each backbone through each engine in turn (tlserve, torch, ONNX Runtime),
# never two at once; the load average before each goes into the report.
loads=""
run_engine() { # ENGINE NAME ARCHITECTURE DIR
  local engine="$1" name="$2" architecture="$3" dir="$4" load
  load="$(loadavg)"
  check_load "before $engine on $name"
  loads="$loads; $engine $name: $load"
  log "$engine on $name (batch sizes $batch_sizes, at least ${min_seconds}s each, $threads threads; load $load)"
  if [ "$engine" = tlserve ]; then
    CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
      target/release/tlserve bench-embed --config "$config" --backbone "$name" \
      --corpus "$corpus" --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" \
      | tee -a "$results" >&2 || die "tlserve bench-embed failed for $name"
  else
    "$peer_venv/bin/python" scripts/bench/peer_vision.py --architecture "$architecture" \
      --runtime "$engine" --weights "$dir/model.safetensors" --name "$name" --corpus "$corpus" \
      --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" --threads "$threads" \
      2> >(grep -v -e 'TracerWarning' -e 'DeprecationWarning' -e 'torch.onnx.export' >&2) \
      | tee -a "$results" >&2 || die "peer_vision.py --runtime $engine failed for $name"
  fi
}
for entry in "${backbones[@]}"; do
  read -r name architecture dir <<< "$entry"
  for engine in "${engines[@]}"; do
    run_engine "$engine" "$name" "$architecture" "$dir"
  done
done

# Joins the results by backbone and batch size into the markdown table. Fails
# when an engine left out a requested backbone or batch size, rather than
# printing a table with holes.
report="$bench_dir/vision-report.md"
"$TLSERVE_VENV/bin/python" - "$results" "$batch_sizes" "$threads" "${engines[*]}" \
  "${backbones[@]%% *}" > "$report.table" <<'PY'
import json, sys

path, sizes, requested, engines, *backbones = sys.argv[1:]
sizes = [int(s) for s in sizes.split(",")]
engines = engines.split()
rows = {}
with open(path, encoding="utf-8") as f:
    for line in f:
        line = line.strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        for key in ("engine", "backbone", "batch_size", "images", "seconds", "images_per_sec", "threads"):
            if key not in rec:
                sys.exit(f"{path}: record without {key!r}: {line}")
        rows[rec["engine"], rec["backbone"], int(rec["batch_size"])] = rec
missing = [f"{e} {b} batch {s}" for e in engines for b in backbones for s in sizes
           if (e, b, s) not in rows]
if missing:
    sys.exit(f"{path}: no result for " + ", ".join(missing))

peers = engines[1:]
head = ["backbone", "batch"] + [f"{e} img/s" for e in engines] + [f"tlserve / {p}" for p in peers]
print("| " + " | ".join(head) + " |")
print("|---|" + "---:|" * (len(head) - 1))
for b in backbones:
    for s in sizes:
        speeds = [rows[e, b, s]["images_per_sec"] for e in engines]
        ratios = [f"{speeds[0] / p:.2f}x" for p in speeds[1:]]
        print("| " + " | ".join([b, str(s)] + [f"{v:.2f}" for v in speeds] + ratios) + " |")
print()
for e in engines:
    used = sorted({str(r["threads"]) for k, r in rows.items() if k[0] == e})
    print(f"- threads: {e} {', '.join(used)} (requested {requested})")
for e in peers:
    v = next(r for k, r in rows.items() if k[0] == e).get("versions", {})
    print(f"- {e} peer versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
PY

{
  echo "## Image throughput: tlserve (engine = \"$tlserve_engine\") vs ${engines[*]:1} (CPU)"
  echo
  cat "$report.table"
  echo "- corpus: $corpus (the 3 test photos, cycled; decoding and preprocessing timed)"
  echo "- batch sizes $batch_sizes, at least ${min_seconds}s and one full corpus pass each (at most 50 passes)"
  echo "- *-generated: generated weights in torchvision's layout ($bench_dir/*-generated)"
  echo "- machine: $machine"
  echo "- load average (1/5/15 min) before each engine${loads}"
} > "$report"
rm -f "$report.table"
cat "$report"

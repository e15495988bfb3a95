#!/usr/bin/env bash
# Image backbone throughput, tlserve vs PyTorch (CPU), in one run: images per
# second at several batch sizes for the real EfficientNet-Lite0 and for
# ResNet-50 on generated weights (no pretrained ResNet-50 is fetchable here;
# speed does not depend on the values). Decoding and preprocessing count on
# both sides. The corpus is the three test photos
# (scripts/fetch-test-images.sh), cycled.
#
# Steps: build tlserve; run its `bench-embed` subcommand for both backbones;
# then run scripts/bench/peer_vision.py (the same networks written in plain
# torch, Pillow for decoding, in the peer virtualenv) on the same weights,
# corpus, batch sizes, minimum time and thread count; print a markdown table
# with the ratio. The two engines run one after the other, never together, and
# the load average is recorded before each side (a warning is printed above
# 0.5: candle's thread pool loses badly to any other load).
#
# Both sides print JSON lines of the same shape:
#   {"engine": "tlserve" | "torch", "backbone": NAME, "batch_size": B,
#    "images": N, "seconds": T, "images_per_sec": N/T, "threads": n, ...}
# All of them go to target/bench/vision.jsonl (and, as they come, to stderr);
# the report goes to stdout and target/bench/vision-report.md.
#
# The peer virtualenv is the one scripts/bench-embed.sh uses (torch, Pillow);
# create it, or add what an existing one lacks, with --setup-peer.
#
# Usage: scripts/bench-vision.sh [options]
#   --batch-sizes LIST   comma-separated batch sizes (default: 1,8,32)
#   --min-seconds S      measure each batch size at least this long (default: 5)
#   --threads N          threads for both engines (default: nproc)
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

log() { printf 'bench-vision: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --batch-sizes) [ $# -ge 2 ] || die "$1 needs a value"; batch_sizes="$2"; shift 2 ;;
    --min-seconds) [ $# -ge 2 ] || die "$1 needs a value"; min_seconds="$2"; shift 2 ;;
    --threads)     [ $# -ge 2 ] || die "$1 needs a value"; threads="$2"; shift 2 ;;
    --no-peer)     run_peer=0; shift ;;
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
    && "$peer_venv/bin/python" -c 'import torch, PIL' >/dev/null 2>&1; }; then
  die "no peer virtualenv with torch and Pillow at $peer_venv.
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

resnet_dir="$bench_dir/resnet50-generated"
[ -f "$resnet_dir/model.safetensors" ] \
  || "$TLSERVE_VENV/bin/python" scripts/bench/generate_resnet50.py "$resnet_dir" >&2

corpus="$bench_dir/images.txt"
printf '%s\n' "$root/models/test-images/chelsea.png" "$root/models/test-images/coffee.png" \
  "$root/models/test-images/grace_hopper.jpg" > "$corpus"

# name, architecture, folder with model.safetensors: for tlserve's config and the peer.
backbones=(
  "efficientnet-lite0 efficientnet-lite0 $root/models/efficientnet-lite0"
  "resnet50-generated resnet50 $resnet_dir"
)

config="$bench_dir/vision.toml"
for entry in "${backbones[@]}"; do
  read -r name architecture dir <<< "$entry"
  printf '[[backbones]]\nname = "%s"\narchitecture = "%s"\nsource = { path = "%s" }\n\n' \
    "$name" "$architecture" "$dir"
done > "$config"

cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
machine="nproc $(nproc), CPU ${cpu_model:-unknown}, $(rustc --version 2>/dev/null || echo 'rustc: not found')"
results="$bench_dir/vision.jsonl"
: > "$results"

# candle sizes its CPU thread pool from CANDLE_NUM_THREADS, else
# RAYON_NUM_THREADS, else the number of cores; both are set.
load_tlserve="$(loadavg)"
check_load "before tlserve"
log "load average before tlserve: $load_tlserve on $(nproc) cores"
for entry in "${backbones[@]}"; do
  read -r name _ _ <<< "$entry"
  log "running tlserve bench-embed for $name (batch sizes $batch_sizes, at least ${min_seconds}s each, $threads threads)"
  CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
    target/release/tlserve bench-embed --config "$config" --backbone "$name" \
    --corpus "$corpus" --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" \
    | tee -a "$results" >&2 || die "tlserve bench-embed failed for $name"
done

load_peer="n/a"
if [ "$run_peer" = 1 ]; then
  load_peer="$(loadavg)"
  check_load "before torch"
  log "load average before torch: $load_peer on $(nproc) cores"
  for entry in "${backbones[@]}"; do
    read -r name architecture dir <<< "$entry"
    log "running the torch peer for $name (batch sizes $batch_sizes, at least ${min_seconds}s each, $threads threads)"
    "$peer_venv/bin/python" scripts/bench/peer_vision.py --architecture "$architecture" \
      --weights "$dir/model.safetensors" --name "$name" --corpus "$corpus" \
      --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" --threads "$threads" \
      | tee -a "$results" >&2 || die "peer_vision.py failed for $name"
  done
fi

# Joins the results by backbone and batch size into the markdown table. Fails
# when an engine left out a requested backbone or batch size, rather than
# printing a table with holes.
report="$bench_dir/vision-report.md"
"$TLSERVE_VENV/bin/python" - "$results" "$batch_sizes" "$run_peer" "$threads" \
  "${backbones[@]%% *}" > "$report.table" <<'PY'
import json, sys

path, sizes, run_peer, requested, *backbones = sys.argv[1:]
sizes = [int(s) for s in sizes.split(",")]
engines = ["tlserve"] + (["torch"] if run_peer == "1" else [])
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

print("| backbone | batch | tlserve img/s | torch img/s | ratio (tlserve / torch) |")
print("|---|---:|---:|---:|---:|")
for b in backbones:
    for s in sizes:
        t = rows["tlserve", b, s]["images_per_sec"]
        if "torch" in engines:
            p = rows["torch", b, s]["images_per_sec"]
            print(f"| {b} | {s} | {t:.2f} | {p:.2f} | {t / p:.2f}x |")
        else:
            print(f"| {b} | {s} | {t:.2f} | n/a | n/a |")
print()
for e in engines:
    used = sorted({str(r["threads"]) for k, r in rows.items() if k[0] == e})
    print(f"- threads: {e} {', '.join(used)} (requested {requested})")
if "torch" in engines:
    v = next(r for k, r in rows.items() if k[0] == "torch").get("versions", {})
    print("- torch peer versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
PY

{
  echo "## Image throughput: tlserve vs torch (CPU)"
  echo
  cat "$report.table"
  echo "- corpus: $corpus (the 3 test photos, cycled; decoding and preprocessing timed)"
  echo "- batch sizes $batch_sizes, at least ${min_seconds}s and one full corpus pass each (at most 50 passes)"
  echo "- resnet50-generated: ResNet-50 on generated weights ($resnet_dir)"
  echo "- machine: $machine"
  echo "- load average (1/5/15 min): before tlserve $load_tlserve; before torch $load_peer"
} > "$report"
rm -f "$report.table"
cat "$report"

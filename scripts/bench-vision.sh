#!/usr/bin/env bash
# Image backbone throughput, in process: images per second at several batch
# sizes for the real EfficientNet-Lite0 and for ResNet-50 on generated weights
# (no pretrained ResNet-50 is fetchable here; speed does not depend on the
# values). Decoding and preprocessing count. The corpus is the three test
# photos (scripts/fetch-test-images.sh), cycled.
#
# Usage: scripts/bench-vision.sh [--batch-sizes 1,8,32] [--min-seconds 5]
# Prints one JSON line per backbone and batch size; raw results go to
# target/bench/vision.jsonl.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
batch_sizes="1,8,32"
min_seconds=5
while [ $# -gt 0 ]; do
  case "$1" in
    --batch-sizes) batch_sizes="$2"; shift 2 ;;
    --min-seconds) min_seconds="$2"; shift 2 ;;
    *) echo "bench-vision: unknown option $1" >&2; exit 2 ;;
  esac
done

bench_dir="$root/target/bench"
mkdir -p "$bench_dir"
scripts/fetch-models.sh >&2
scripts/fetch-test-images.sh >&2
eval "$(scripts/setup-python.sh)"
cargo build --release --locked >&2

resnet_dir="$bench_dir/resnet50-generated"
[ -f "$resnet_dir/model.safetensors" ] \
  || "$TLSERVE_VENV/bin/python" scripts/bench/generate_resnet50.py "$resnet_dir" >&2

corpus="$bench_dir/images.txt"
printf '%s\n' "$root/models/test-images/chelsea.png" "$root/models/test-images/coffee.png" \
  "$root/models/test-images/grace_hopper.jpg" > "$corpus"

config="$bench_dir/vision.toml"
cat > "$config" <<TOML
[[backbones]]
name = "efficientnet-lite0"
architecture = "efficientnet-lite0"
source = { path = "$root/models/efficientnet-lite0" }

[[backbones]]
name = "resnet50-generated"
architecture = "resnet50"
source = { path = "$resnet_dir" }
TOML

load="$(cut -d' ' -f1 /proc/loadavg)"
echo "bench-vision: load average before: $load on $(nproc) cores" >&2
: > "$bench_dir/vision.jsonl"
for backbone in efficientnet-lite0 resnet50-generated; do
  target/release/tlserve bench-embed --config "$config" --backbone "$backbone" \
    --corpus "$corpus" --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" \
    | tee -a "$bench_dir/vision.jsonl"
done

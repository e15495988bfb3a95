#!/usr/bin/env bash
# Where an image backbone's time goes, by symbol: samples `tlserve bench-embed`
# with perf (cpu-clock, 999 Hz, no call graphs) for EfficientNet-Lite0 and
# ResNet-50 (generated weights) at each batch size, decoding and resizing
# included, and prints the top symbols and the kinds of work
# (scripts/bench/perf_categories.py). Needs `perf` (Debian: linux-perf) and
# perf_event_paranoid <= 2 or root; the ResNet-50 weights come from
# scripts/bench/generate_convnet.py in the test virtualenv. The backbones run
# on the engine their config resolves to (native on a CPU); with --profile,
# bench-embed also prints the wall-time share of each phase of the forward
# pass (stem, 1x1, k x k and depthwise convolutions, shortcuts, pooling).
# Output and perf data go to target/bench/perf-vision/.
#
# Usage: scripts/profile-vision.sh [BATCH_SIZES]   (default: 1,32)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
batch_sizes="${1:-1,32}"
command -v perf >/dev/null || { echo "profile-vision: perf is not installed (Debian: linux-perf)" >&2; exit 1; }
out="$root/target/bench/perf-vision"
mkdir -p "$out"
cargo build --release --locked --quiet
binary="${CARGO_TARGET_DIR:-$root/target}/release/tlserve"
resnet="$root/target/bench/resnet50-generated"
[ -f "$resnet/model.safetensors" ] || "$root/.venv/bin/python" scripts/bench/generate_convnet.py resnet50 "$resnet" >&2
printf '%s\n' "$root/models/test-images/chelsea.png" "$root/models/test-images/coffee.png" \
  "$root/models/test-images/grace_hopper.jpg" > "$out/images.txt"
printf '[[backbones]]\nname = "lite0"\narchitecture = "efficientnet-lite0"\nsource = { path = "%s" }\n\n[[backbones]]\nname = "resnet50"\narchitecture = "resnet50"\nsource = { path = "%s" }\n' \
  "$root/models/efficientnet-lite0" "$resnet" > "$out/vision.toml"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load: $(cut -d' ' -f1-3 /proc/loadavg)"
for backbone in lite0 resnet50; do
  for batch in ${batch_sizes//,/ }; do
    data="$out/$backbone-b$batch.data"
    echo "== $backbone, batch $batch"
    perf record -q -e cpu-clock -F 999 -o "$data" -- "$binary" bench-embed --config "$out/vision.toml" \
      --backbone "$backbone" --corpus "$out/images.txt" --batch-sizes "$batch" --min-seconds 6 --profile 2>/dev/null
    # head closes the pipe early: perf's SIGPIPE is not a failure.
    perf report -i "$data" --stdio --sort symbol 2>/dev/null | grep -E '^\s+[0-9]' | head -12 || true
    perf report -i "$data" --stdio --sort symbol 2>/dev/null | python3 scripts/bench/perf_categories.py
  done
done

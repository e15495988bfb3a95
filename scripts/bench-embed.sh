#!/usr/bin/env bash
# Embedding throughput, tlserve vs sentence-transformers (PyTorch CPU) and ONNX
# Runtime (CPUExecutionProvider, the engine text-embeddings-inference runs on
# CPU), on the same corpus, the same model files and the same batch sizes, in
# one run; then the accuracy of every engine against the float64 reference.
#
# Steps: build the fixed corpus (scripts/bench-corpus.sh); run tlserve's
# `bench-embed` subcommand once per BERT engine (--engines) and, for the native
# engine, per precision (--precisions); run scripts/bench/peer_embed.py and
# scripts/bench/peer_onnx.py (which exports the model to ONNX and quantizes it,
# once, into target/bench/onnx) in the peer virtualenv; print markdown tables
# with the ratios; score every engine's embeddings of the corpus with
# scripts/bench/embed_accuracy.py. Everything runs one after the other, never
# together: all want every core, and candle's thread pool in particular loses
# badly to any other load, which is also why the load average is recorded
# before each side and a warning is printed above 0.5.
#
# Both sides print JSON lines of the same shape:
#   {"engine": E, "batch_size": B, "sentences": N, "seconds": T,
#    "sentences_per_sec": N/T, "threads": n, "versions": {...}}
# Raw results are kept in target/bench/ (embed-tlserve-ENGINE.jsonl, embed-peer.jsonl)
# next to the report (embed-report.md).
#
# The peer is not a dependency of tlserve: it lives in a scratch virtualenv outside
# the repository (5.8 GB, as PyPI's torch wheel is the CUDA build with its
# nvidia-* libraries). Create it once with --setup-peer.
#
# Usage: scripts/bench-embed.sh [options]
#   --batch-sizes LIST   comma-separated batch sizes (default: 1,8,32,128)
#   --min-seconds S      measure each batch size at least this long (default: 5)
#   --threads N          threads for both engines (default: nproc)
#   --config PATH        tlserve config, relative to the repository root
#                        (default: config/tlserve.toml)
#   --engines LIST       tlserve BERT engines to measure (default: native,candle):
#                        native is the packed CPU forward pass, candle the
#                        candle-transformers BertModel it replaces on CPU
#   --precisions LIST    the native engine's precisions (default: f32,int8,bf16)
#   --onnx-variants LIST ONNX Runtime models (default: fp32,int8,int8-per-channel;
#                        "none" skips ONNX Runtime)
#   --no-peer            run tlserve only (no peers, no accuracy table)
#   --setup-peer         create the peer virtualenv (or install what an existing
#                        one lacks), then exit
# Environment: TLSERVE_PEER_VENV (default: ~/.cache/tlserve-peer-venv),
#   TLSERVE_MODELS_DIR (default: ./models), PYTHON (default: python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
peer_venv="${TLSERVE_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve-peer-venv}"
models_dir="${TLSERVE_MODELS_DIR:-$root/models}"
backbone="all-MiniLM-L6-v2"
bench_dir="$root/target/bench"
corpus="$bench_dir/corpus.txt"

# The versions the peer was first measured with, pinned so that a re-created venv
# measures the same software (transformers and tokenizers do the tokenising and
# the forward pass, so they matter as much as torch).
peer_packages=(
  "torch==2.15.0"
  "sentence-transformers==6.2.0"
  "transformers==5.24.0"
  "tokenizers==0.23.3"
  # Decodes and resizes the photos for the image peer, scripts/bench/peer_vision.py
  # (scripts/bench-vision.sh); the version the tests' reference uses.
  "Pillow==13.0.0"
  # torchvision's ResNet-50 and VGG16, the models users run, for the image peer.
  "torchvision==0.29.2"
  # ONNX Runtime, the engine text-embeddings-inference runs on CPU: the model is
  # exported to ONNX (torch.onnx.export, which needs onnx and onnxscript) in this
  # venv and run with the CPUExecutionProvider, float and dynamically quantized.
  # The LoRA reference of scripts/bench-finetune.sh --peer (scripts/bench/peer_finetune.py).
  "peft==0.21.2"
  "onnxruntime==1.32.0"
  "onnx==1.23.2"
  "onnxscript==0.7.2"
  # Reads GGUF files for transformers (which dequantizes them to float): the
  # decoder peer, scripts/bench/peer_decoder.py (scripts/bench-decoder.sh).
  "gguf==0.19.0"
)

batch_sizes="1,8,32,128"
min_seconds="5"
threads="$(nproc)"
config="config/tlserve.toml"
run_peer=1
setup_only=0
engines="native,candle"
precisions="f32,int8,bf16"
onnx_variants="fp32,int8,int8-per-channel"

log() { printf 'bench-embed: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --batch-sizes) [ $# -ge 2 ] || die "$1 needs a value"; batch_sizes="$2"; shift 2 ;;
    --min-seconds) [ $# -ge 2 ] || die "$1 needs a value"; min_seconds="$2"; shift 2 ;;
    --threads)     [ $# -ge 2 ] || die "$1 needs a value"; threads="$2"; shift 2 ;;
    --config)      [ $# -ge 2 ] || die "$1 needs a value"; config="$2"; shift 2 ;;
    --engines)     [ $# -ge 2 ] || die "$1 needs a value"; engines="$2"; shift 2 ;;
    --precisions)  [ $# -ge 2 ] || die "$1 needs a value"; precisions="$2"; shift 2 ;;
    --onnx-variants) [ $# -ge 2 ] || die "$1 needs a value"; onnx_variants="$2"; shift 2 ;;
    --no-peer)     run_peer=0; shift ;;
    --setup-peer)  setup_only=1; shift ;;
    -h|--help)     usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ "$batch_sizes" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--batch-sizes wants e.g. 1,8,32,128, got '$batch_sizes'"
[[ "$min_seconds" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--min-seconds wants a number, got '$min_seconds'"
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads wants a positive integer, got '$threads'"
[[ "$engines" =~ ^(native|candle)(,(native|candle))*$ ]] || die "--engines wants native and/or candle, got '$engines'"
[[ "$precisions" =~ ^(f32|int8|bf16)(,(f32|int8|bf16))*$ ]] || die "--precisions wants f32, int8 and/or bf16, got '$precisions'"
[[ "$onnx_variants" =~ ^(none|(fp32|int8|int8-per-channel)(,(fp32|int8|int8-per-channel))*)$ ]] \
  || die "--onnx-variants wants fp32, int8, int8-per-channel or none, got '$onnx_variants'"

# Creates the peer virtualenv, or installs into an existing one what it lacks of
# peer_packages (pip leaves what is already at the pinned version alone; the
# existing venv keeps its own interpreter). nice keeps pip's unpacking of ~5 GB
# from starving whatever else the machine is doing (usually a cargo build).
setup_peer() {
  log "creating or updating the peer virtualenv in $peer_venv (a new one downloads about 2.5 GB from PyPI, 5.8 GB installed)"
  local start=$SECONDS
  [ -x "$peer_venv/bin/python" ] || nice -n 10 "$python" -m venv "$peer_venv"
  nice -n 10 "$peer_venv/bin/python" -m pip install --upgrade pip
  nice -n 10 "$peer_venv/bin/python" -m pip install "${peer_packages[@]}"
  peer_ready || die "the peer virtualenv was created but cannot import its packages"
  log "peer virtualenv ready in $((SECONDS - start)) s: $(du -sh "$peer_venv" | cut -f1)"
}

peer_ready() {
  [ -x "$peer_venv/bin/python" ] \
    && "$peer_venv/bin/python" -c 'import torch, sentence_transformers, onnxruntime, onnx' >/dev/null 2>&1
}

if [ "$setup_only" = 1 ]; then
  setup_peer
  exit 0
fi

if [ "$run_peer" = 1 ] && ! peer_ready; then
  die "no usable peer virtualenv at $peer_venv.
  Create it once with:  scripts/bench-embed.sh --setup-peer
  (or set TLSERVE_PEER_VENV to an existing one), or skip the peer with --no-peer."
fi

# shellcheck source=scripts/lib/bench-load.sh
source "$root/scripts/lib/bench-load.sh"

cd "$root"
mkdir -p "$bench_dir"
load_start="$(loadavg)"
check_load "at start"

corpus_stats="$("$root/scripts/bench-corpus.sh" "$corpus")"

cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
machine="nproc $(nproc), CPU ${cpu_model:-unknown}, $(rustc --version 2>/dev/null || echo 'rustc: not found')"
# The flags that decide which kernels run (AVX2, AVX-512, VNNI, BF16, AMX).
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
  | grep -E '^(avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_tile|amx_int8|amx_bf16)$' \
  | tr '\n' ' ' | sed 's/ $//')"

# Build first, so that compiling is neither timed nor running next to either engine.
log "building tlserve (release)"
cargo build --release --quiet

results="$bench_dir/embed-results"
embeddings="$bench_dir/embed-vectors"
rm -rf "$results" "$embeddings"
mkdir -p "$results" "$embeddings"

# The tlserve runs: (engine, precision) pairs, labelled "native", "native-int8", ...
runs=()
for engine in ${engines//,/ }; do
  if [ "$engine" = native ]; then
    for precision in ${precisions//,/ }; do
      runs+=("$engine:$precision")
    done
  else
    runs+=("$engine:f32")
  fi
done

# candle sizes its CPU thread pool from CANDLE_NUM_THREADS, else RAYON_NUM_THREADS
# (else the number of cores), which is how --threads reaches tlserve; both
# engines run on that pool. The engine and precision of the first backbone
# (MiniLM in the default config) are chosen by environment overrides.
load_tlserve=""
labels=""
for run in "${runs[@]}"; do
  engine="${run%%:*}"; precision="${run##*:}"
  label="$engine"; [ "$precision" = f32 ] || label="$engine-$precision"
  labels="$labels,tlserve $label"
  load_tlserve="$load_tlserve $label: $(loadavg);"
  check_load "before tlserve ($label)"
  log "running tlserve bench-embed, $label (batch sizes $batch_sizes, at least ${min_seconds}s each)"
  CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
    TLSERVE__BACKBONES__0__ENGINE="$engine" TLSERVE__BACKBONES__0__PRECISION="$precision" \
    target/release/tlserve bench-embed \
    --config "$config" --backbone "$backbone" --corpus "$corpus" \
    --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" \
    --embeddings-out "$embeddings/tlserve $label.jsonl" > "$results/tlserve $label.jsonl" \
    || die "tlserve bench-embed ($label) failed"
done

load_peer="n/a"
if [ "$run_peer" = 1 ]; then
  load_peer="sentence-transformers: $(loadavg);"
  check_load "before sentence-transformers"
  log "running sentence-transformers (batch sizes $batch_sizes, at least ${min_seconds}s each)"
  "$peer_venv/bin/python" "$root/scripts/bench/peer_embed.py" \
    --model-dir "$models_dir/$backbone" --corpus "$corpus" \
    --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" --threads "$threads" \
    > "$results/sentence-transformers.jsonl" || die "peer_embed.py failed"
  labels="$labels,sentence-transformers"
  if [ "$onnx_variants" != none ]; then
    load_peer="$load_peer onnxruntime: $(loadavg)"
    check_load "before ONNX Runtime"
    log "running ONNX Runtime ($onnx_variants; batch sizes $batch_sizes, at least ${min_seconds}s each)"
    "$peer_venv/bin/python" "$root/scripts/bench/peer_onnx.py" \
      --model-dir "$models_dir/$backbone" --corpus "$corpus" --work-dir "$bench_dir/onnx" \
      --variants "$onnx_variants" --embeddings-dir "$embeddings" \
      --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" --threads "$threads" \
      > "$results/onnxruntime.jsonl" || die "peer_onnx.py failed"
    for variant in ${onnx_variants//,/ }; do labels="$labels,onnxruntime-$variant"; done
  fi
fi

# Joins the result files by batch size into markdown tables. Fails when an
# engine left out a requested batch size or printed something malformed, rather
# than printing a table with holes.
"$python" - "$results" "${labels#,}" "$batch_sizes" "$threads" > "$bench_dir/embed-report.md" <<'PY'
import glob, json, os, sys

results, labels, sizes, requested = sys.argv[1:5]
labels = labels.split(",")
sizes = [int(s) for s in sizes.split(",")]

rows = {}  # label -> batch size -> record
for path in sorted(glob.glob(os.path.join(results, "*.jsonl"))):
    tlserve = os.path.basename(path)[: -len(".jsonl")]
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue  # stray log lines
            rec = json.loads(line)
            if "engine" not in rec:
                continue  # profiles
            for key in ("batch_size", "sentences", "seconds", "sentences_per_sec", "threads"):
                if key not in rec:
                    sys.exit(f"{path}: record without {key!r}: {line}")
            label = tlserve if rec["engine"] == "tlserve" else rec["engine"]
            rows.setdefault(label, {})[int(rec["batch_size"])] = rec
for label in labels:
    missing = [s for s in sizes if s not in rows.get(label, {})]
    if missing:
        sys.exit(f"{label}: no result for batch sizes {missing}")

print("Sentences per second:")
print()
print("| batch | " + " | ".join(labels) + " |")
print("|---:|" + "---:|" * len(labels))
for s in sizes:
    print(f"| {s} | " + " | ".join(f"{rows[l][s]['sentences_per_sec']:.1f}" for l in labels) + " |")
print()
ours = [l for l in labels if l.startswith("tlserve ")]
peers = [l for l in labels if not l.startswith("tlserve ")]
if peers:
    print("Ratios, tlserve / peer (same run):")
    print()
    pairs = [(o, p) for o in ours for p in peers]
    print("| batch | " + " | ".join(f"{o[8:]} / {p}" for o, p in pairs) + " |")
    print("|---:|" + "---:|" * len(pairs))
    for s in sizes:
        cells = (rows[o][s]["sentences_per_sec"] / rows[p][s]["sentences_per_sec"] for o, p in pairs)
        print(f"| {s} | " + " | ".join(f"{c:.2f}x" for c in cells) + " |")
    print()
threads = sorted({str(r["threads"]) for l in labels for r in rows[l].values()})
print(f"- threads: {', '.join(threads)} (requested {requested})")
for label in peers:
    v = next(iter(rows[label].values())).get("versions", {})
    print(f"- {label} versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
PY

accuracy=""
if [ "$run_peer" = 1 ]; then
  log "scoring every engine's embeddings against the float64 reference"
  specs=()
  for file in "$embeddings"/*.jsonl; do specs+=("$(basename "$file" .jsonl)=$file"); done
  accuracy="$("$peer_venv/bin/python" "$root/scripts/bench/embed_accuracy.py" \
    --model-dir "$models_dir/$backbone" --corpus "$corpus" "${specs[@]}")" \
    || die "embed_accuracy.py failed"
fi

{
  echo "## Embedding throughput: tlserve vs sentence-transformers and ONNX Runtime ($backbone)"
  echo
  cat "$bench_dir/embed-report.md"
  echo "- corpus: $corpus ($corpus_stats)"
  echo "- batch sizes $batch_sizes, at least ${min_seconds}s and one full corpus pass each"
  echo "- machine: $machine"
  echo "- CPU flags: $cpu_flags"
  echo "- load average (1/5/15 min): at start $load_start; before tlserve:$load_tlserve before the peers: $load_peer"
  if [ -n "$accuracy" ]; then
    echo
    echo "Accuracy against the float64 reference:"
    echo
    echo "$accuracy"
  fi
} | tee "$bench_dir/embed-report.md.tmp"
mv "$bench_dir/embed-report.md.tmp" "$bench_dir/embed-report.md"

#!/usr/bin/env bash
# Embedding throughput, tlserve vs sentence-transformers (PyTorch CPU), on the same
# corpus, the same model files and the same batch sizes, in one run.
#
# Steps: build the fixed corpus (scripts/bench-corpus.sh); run tlserve's
# `bench-embed` subcommand once per BERT engine (--engines); run
# scripts/bench/peer_embed.py in the peer virtualenv; print a markdown table
# with the ratios. Everything runs one after the other, never together: both want every core, and candle's thread
# pool in particular loses badly to any other load, which is also why the load
# average is recorded before each side and a warning is printed above 0.5.
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
#   --no-peer            run tlserve only
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
)

batch_sizes="1,8,32,128"
min_seconds="5"
threads="$(nproc)"
config="config/tlserve.toml"
run_peer=1
setup_only=0
engines="native,candle"

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
    && "$peer_venv/bin/python" -c 'import torch, sentence_transformers' >/dev/null 2>&1
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

# Build first, so that compiling is neither timed nor running next to either engine.
log "building tlserve (release)"
cargo build --release --quiet

peer_out="$bench_dir/embed-peer.jsonl"
rm -f "$bench_dir"/embed-tlserve-*.jsonl "$peer_out"

# candle sizes its CPU thread pool from CANDLE_NUM_THREADS, else RAYON_NUM_THREADS
# (else the number of cores), which is how --threads reaches tlserve; both
# engines run on that pool. The engine of the first backbone (MiniLM in the
# default config) is chosen by an environment override.
load_tlserve=""
for engine in ${engines//,/ }; do
  load_tlserve="$load_tlserve $engine: $(loadavg);"
  check_load "before tlserve ($engine)"
  log "running tlserve bench-embed, $engine engine (batch sizes $batch_sizes, at least ${min_seconds}s each)"
  CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" TLSERVE__BACKBONES__0__ENGINE="$engine" \
    cargo run --release --quiet -- bench-embed \
    --config "$config" --backbone "$backbone" --corpus "$corpus" \
    --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" > "$bench_dir/embed-tlserve-$engine.jsonl" \
    || die "tlserve bench-embed ($engine) failed"
done

load_peer="n/a"
if [ "$run_peer" = 1 ]; then
  load_peer="$(loadavg)"
  check_load "before sentence-transformers"
  log "running sentence-transformers (batch sizes $batch_sizes, at least ${min_seconds}s each)"
  "$peer_venv/bin/python" "$root/scripts/bench/peer_embed.py" \
    --model-dir "$models_dir/$backbone" --corpus "$corpus" \
    --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" --threads "$threads" \
    > "$peer_out" || die "peer_embed.py failed"
fi

# Joins both result files by batch size into the markdown report. Fails when an
# engine left out a requested batch size or printed something malformed, rather
# than printing a table with holes.
"$python" - "$bench_dir" "$engines" "$peer_out" "$batch_sizes" "$run_peer" "$threads" \
  > "$bench_dir/embed-report.md" <<'PY'
import json, sys

bench_dir, engines, peer_path, sizes, run_peer, requested = sys.argv[1:7]
engines = engines.split(",")
run_peer = run_peer == "1"
sizes = [int(s) for s in sizes.split(",")]

def load(path, engine):
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue  # tolerate stray log lines; the JSON ones carry the data
            rec = json.loads(line)
            if rec.get("engine") != engine:
                sys.exit(f"{path}: expected engine {engine!r}, got {rec.get('engine')!r}")
            for key in ("batch_size", "sentences", "seconds", "sentences_per_sec", "threads"):
                if key not in rec:
                    sys.exit(f"{path}: record without {key!r}: {line}")
            rows[int(rec["batch_size"])] = rec
    missing = [s for s in sizes if s not in rows]
    if missing:
        sys.exit(f"{path}: no result for batch sizes {missing}")
    return rows

tl = {e: load(f"{bench_dir}/embed-tlserve-{e}.jsonl", "tlserve") for e in engines}
peer = load(peer_path, "sentence-transformers") if run_peer else {}

def threads(rows):
    return ", ".join(sorted({str(r["threads"]) for r in rows.values()})) or "n/a"

head = " | ".join(f"tlserve {e} sent/s" for e in engines)
ratios = " | ".join(f"{e} / peer" for e in engines)
print(f"| batch | {head} | sentence-transformers sent/s | {ratios} |")
print("|---:|" + "---:|" * (2 * len(engines) + 1))
for s in sizes:
    ts = [tl[e][s]["sentences_per_sec"] for e in engines]
    cells = " | ".join(f"{t:.1f}" for t in ts)
    if s in peer:
        p = peer[s]["sentences_per_sec"]
        rs = " | ".join(f"{t / p:.2f}x" for t in ts)
        print(f"| {s} | {cells} | {p:.1f} | {rs} |")
    else:
        print(f"| {s} | {cells} | n/a | " + " | ".join("n/a" for _ in ts) + " |")
print()
all_tl = {f"{e}-{k}": v for e in engines for k, v in tl[e].items()}
print(f"- threads: tlserve {threads(all_tl)}, sentence-transformers {threads(peer)} (requested {requested})")
if peer:
    v = next(iter(peer.values())).get("versions", {})
    print("- peer versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
tv = next(iter(tl[engines[0]].values())).get("versions")
if tv:
    print("- tlserve versions: " + ", ".join(f"{k} {tv[k]}" for k in sorted(tv)))
PY

{
  echo "## Embedding throughput: tlserve vs sentence-transformers ($backbone)"
  echo
  cat "$bench_dir/embed-report.md"
  echo "- corpus: $corpus ($corpus_stats)"
  echo "- batch sizes $batch_sizes, at least ${min_seconds}s and one full corpus pass each"
  echo "- machine: $machine"
  echo "- load average (1/5/15 min): at start $load_start; before tlserve:$load_tlserve before sentence-transformers $load_peer"
} | tee "$bench_dir/embed-report.md.tmp"
mv "$bench_dir/embed-report.md.tmp" "$bench_dir/embed-report.md"

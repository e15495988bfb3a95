#!/usr/bin/env bash
# Creates the virtualenv with torch, transformers and peft in which the test
# of tlserve's LoRA export runs peft itself (tests/reference/peft_features.py),
# with the versions pinned in scripts/requirements-peft.txt. It lives outside
# the repository (about 5.6 GB; PyPI's torch is the CUDA build) and takes
# about 2.5 minutes to install from the registry.
#
# Idempotent: a stamp file inside the venv records the requirements it was
# built from; when it matches and the packages import, nothing is reinstalled.
#
# Usage: scripts/setup-peft.sh
#   TLSERVE_PEFT_VENV  where to put the venv (default: ~/.cache/tlserve-peft-venv)
#   PYTHON             interpreter used to create it (default: python3)
#
# On success prints, on stdout, the shell assignment TLSERVE_PEFT_VENV=...
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TLSERVE_PEFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve-peft-venv}"
python="${PYTHON:-python3}"
requirements="$root/scripts/requirements-peft.txt"

log() { printf 'setup-peft: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$requirements" ] || die "missing $requirements"
command -v "$python" >/dev/null || die "'$python' not found; set PYTHON to a Python 3 interpreter"

# shellcheck source=scripts/lib/venv.sh
source "$root/scripts/lib/venv.sh"
ensure_venv "$venv" "$python" TLSERVE_PEFT_VENV

install_pinned "$venv" "$requirements" 'torch, transformers, peft'
"$venv/bin/python" -c 'import peft, torch; print(f"setup-peft: peft {peft.__version__} on torch {torch.__version__}")' >&2 \
  || die "peft does not import in $venv"
printf 'TLSERVE_PEFT_VENV=%q\n' "$venv"

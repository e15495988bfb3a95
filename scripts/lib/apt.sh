# apt-get helpers for the setup scripts that install a missing system tool
# from Debian's packages (setup-tools.sh, setup-node.sh, setup-browser.sh).
# Source it after defining log and die. Installing needs root, as on CI.

# need_apt WHAT: fails with the fix unless apt-get can install WHAT here.
need_apt() {
  command -v apt-get >/dev/null \
    || die "apt-get not found: install $1 by hand (a Debian-based machine is expected)"
  [ "$(id -u)" -eq 0 ] || die "installing $1 needs root (apt-get): run as root, or install it first"
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
  fi
}

# apt_install PACKAGE...: installs the packages without recommended extras.
apt_install() {
  need_apt "$*"
  apt_update
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed (see the output above)"
}

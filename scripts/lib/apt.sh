# Installing Debian packages from the setup scripts. Source it after defining
# `log` and `die` (they prefix messages with the script's name).

# need_apt WHAT: fails with the fix unless apt-get can install WHAT here.
need_apt() {
  command -v apt-get >/dev/null \
    || die "apt-get not found: install $1 by hand (a Debian-based machine is expected)"
  [ "$(id -u)" -eq 0 ] || die "installing $1 needs root (apt-get): run as root, or install it first"
}

apt_updated=0
# Refreshes the package lists, once per run.
apt_update() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
  fi
}

# apt_install PACKAGE...: installs them without recommended extras.
apt_install() {
  need_apt "$*"
  apt_update
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed (see the output above)"
}

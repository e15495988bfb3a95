# Virtualenv helper for the setup scripts that install pinned Python packages
# (setup-python.sh, build-cuda.sh). Source it after defining log and die.

# ensure_venv VENV PYTHON VARIABLE: creates the virtualenv VENV with PYTHON
# unless it is there and its interpreter runs. A venv whose interpreter no
# longer runs (e.g. the base Python was upgraded or removed) cannot be
# repaired in place, so it is rebuilt. Only directories that really are venvs
# (pyvenv.cfg) are ever deleted; VARIABLE names the setting that moves it.
ensure_venv() {
  local venv="$1" python="$2" variable="$3"
  if [ -e "$venv" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    [ -f "$venv/pyvenv.cfg" ] || die "$venv exists but is not a virtualenv; remove it or set $variable"
    log "rebuilding broken virtualenv at $venv"
    rm -rf "$venv"
  fi
  if [ ! -e "$venv" ]; then
    log "creating virtualenv at $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" \
      || die "'$python -m venv' failed (on Debian/Ubuntu install the python3-venv package)"
  fi
}

# install_pinned VENV REQUIREMENTS MODULES [PIP_ARGS...]: installs the pinned
# REQUIREMENTS (wheels only, plus PIP_ARGS) into VENV unless the stamp file
# inside it records the same requirements and MODULES (a comma-separated
# list for `import`) still import; then checks that the installed packages
# are consistent and writes the stamp.
install_pinned() {
  local venv="$1" requirements="$2" modules="$3"
  shift 3
  local stamp="$venv/.tlserve-requirements" check
  if cmp -s "$requirements" "$stamp" \
     && "$venv/bin/python" -c "import $modules" >/dev/null 2>&1; then
    log "virtualenv already matches $(basename "$requirements")"
    return 0
  fi
  log "installing pinned packages from $(basename "$requirements")"
  rm -f "$stamp"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-virtualenv --only-binary=:all: "$@" -r "$requirements" >&2 \
    || die "pip install -r $requirements failed (see pip output above)"
  check="$("$venv/bin/python" -m pip check --disable-pip-version-check 2>&1)" \
    || die "installed packages have inconsistent dependencies: $check"
  cp "$requirements" "$stamp"
}

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

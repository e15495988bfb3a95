#!/usr/bin/env bash
# Installs what the web console's browser test (tests/integration/web_console.rs, which
# runs tests/clients/console_browser.py) needs:
#
#   chromium       Debian's `chromium` package: the headless browser
#   chromedriver   Debian's `chromium-driver` package: built from the same
#                  source as the browser, so their versions match exactly
#   selenium       the Python WebDriver client, pinned in
#                  scripts/requirements-test.txt and installed into the test
#                  virtualenv by scripts/setup-python.sh
#
# The test gives selenium the driver's path (/usr/bin/chromedriver), so
# Selenium Manager never looks for, or downloads, a browser or a driver.
#
# Idempotent: when the browser, the driver and selenium are there and agree,
# it changes nothing. Installing the packages needs root (apt-get), as on CI.
# Fails loudly with the fix when it cannot.
#
# Usage: scripts/setup-browser.sh
#   TLSERVE_VENV  the test virtualenv (default: <repo>/.venv)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TLSERVE_VENV:-$root/.venv}"
chromium=/usr/bin/chromium
chromedriver=/usr/bin/chromedriver

log() { printf 'setup-browser: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=scripts/lib/apt.sh
source "$root/scripts/lib/apt.sh"

# The x.y.z.w version a --version line holds ("Chromium 156.0.8078.108 built
# on Debian", "ChromeDriver 156.0.8078.108 (...)").
version_of() {
  "$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+' | head -n1
}

missing=()
[ -x "$chromium" ] || missing+=(chromium)
[ -x "$chromedriver" ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
  log "missing: ${missing[*]}"
  # Both, so that an upgrade keeps the browser and its driver at one version.
  apt_install chromium chromium-driver
fi
[ -x "$chromium" ] || die "$chromium still missing after installing chromium"
[ -x "$chromedriver" ] || die "$chromedriver still missing after installing chromium-driver"

browser_version="$(version_of "$chromium")" || true
driver_version="$(version_of "$chromedriver")" || true
[ -n "$browser_version" ] || die "'$chromium --version' does not run or names no version"
[ -n "$driver_version" ] || die "'$chromedriver --version' does not run or names no version"
[ "$browser_version" = "$driver_version" ] \
  || die "chromium $browser_version and chromedriver $driver_version differ: run 'apt-get install chromium chromium-driver' to bring both to one version"

# A page load proves the browser's libraries are all there.
dom="$(timeout 60 "$chromium" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
  --no-first-run --disable-extensions --dump-dom 'data:text/html,<p>tlserve</p>' 2>/dev/null)" \
  || die "headless chromium could not load a page: run '$chromium --headless=new --no-sandbox --dump-dom about:blank' to see why"
case "$dom" in
  *"<p>tlserve</p>"*) ;;
  *) die "headless chromium loaded a page but did not render it: $dom" ;;
esac
log "chromium OK: $chromium and $chromedriver ($browser_version)"

# selenium comes from the pinned requirements with the rest of the test tools.
TLSERVE_VENV="$venv" "$root/scripts/setup-python.sh" >/dev/null
pinned="$(sed -n 's/^selenium==\(.*\)$/\1/p' "$root/scripts/requirements-test.txt")"
[ -n "$pinned" ] || die "scripts/requirements-test.txt pins no selenium version"
installed="$("$venv/bin/python" -c 'import selenium; print(selenium.__version__)' 2>/dev/null)" \
  || die "selenium does not import in $venv: run scripts/setup-python.sh"
[ "$installed" = "$pinned" ] \
  || die "selenium $installed in $venv, but scripts/requirements-test.txt pins $pinned: run scripts/setup-python.sh"
log "selenium OK: $installed in $venv"

# Load-average helpers for the benchmark scripts (sourced; expects `log`).
# Benchmarks want an idle machine: candle's thread pool in particular loses
# badly to any other load, so each side records the load before it runs.

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Warns when the 1-minute load average is above 0.5; its argument names the moment.
check_load() {
  local one
  one="$(cut -d' ' -f1 /proc/loadavg)"
  if awk -v l="$one" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average $one $1 is above 0.5; other work on the machine will" \
        "depress both engines' numbers, candle's most (a build that just ended also" \
        "inflates this figure for a minute or so)"
  fi
}

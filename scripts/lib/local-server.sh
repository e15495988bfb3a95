# Helpers for benchmark scripts that start a tlserve on loopback. Source it.

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready BIN ADDR: waits (at most 60 s) until every backbone of the server
# at ADDR is ready; fails otherwise.
wait_ready() {
  local bin="$1" addr="$2"
  local listing
  for _ in $(seq 600); do
    listing="$("$bin" backbones --addr "$addr" 2>/dev/null || true)"
    if grep -q BACKBONE_STATE_READY <<<"$listing" \
        && ! grep -q -e BACKBONE_STATE_LOADING -e BACKBONE_STATE_FAILED <<<"$listing"; then
      return 0
    fi
    sleep 0.1
  done
  echo "the server at $addr did not become ready" >&2
  return 1
}

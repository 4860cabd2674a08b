#!/usr/bin/env bash
# Quick start 1/2: installs what is missing, builds the gateway and the example wasm
# guests, starts the demo upstream on 127.0.0.1:9000 and runs the gateway on
# conf/demo.toml (HTTP 127.0.0.1:8080, HTTPS 127.0.0.1:8443, metrics 127.0.0.1:9091).
# Ctrl-C stops both.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/lib.sh
ensure_packages cmake
ensure_rust_targets
build_release
"$upstream_bin" --listen 127.0.0.1:9000 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
# the demo's operator token for the admin API (127.0.0.1:9092); set your own in real use
if [ -n "${WASMGATE_ADMIN_TOKEN:-}" ]; then
  # yours: not echoed, a terminal scrollback is no place for a real secret
  token_note="the value of your WASMGATE_ADMIN_TOKEN"
else
  export WASMGATE_ADMIN_TOKEN=demo-operator-token
  token_note="$WASMGATE_ADMIN_TOKEN (export WASMGATE_TOKEN=$WASMGATE_ADMIN_TOKEN for the CLI)"
fi
echo "try: curl -s localhost:8080/hello/world ; see the curl lines at the end of conf/demo.toml"
echo "admin API on 127.0.0.1:9092, operator token: $token_note (see README, Tenants)"
echo "access log (JSON lines): $root/data/access.log"
"$bin" serve --config conf/demo.toml

#!/usr/bin/env bash
# A cluster on this machine: a Redis and three gateway nodes sharing it ([cluster]), on
# loopback ports. Installs what is missing, builds, starts them, deploys a function on
# node a and shows every node answering it, then the cluster's status; Ctrl-C stops
# everything it started.
#
#   scripts/cluster-demo.sh            keeps running until Ctrl-C
#   scripts/cluster-demo.sh --check    runs the walkthrough, then stops (CI-friendly)
#
# Ports: free ones, printed at start. Data: a temporary folder, removed at the end.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/lib.sh
ensure_packages cmake python3 redis-server curl
ensure_rust_targets
build_release
with_scratch

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly yes --dir "$tmp" \
  >"$tmp/redis.log" 2>&1 &
pids+=($!)
wait_port "$redis_port"

# the cluster key: the same on every node (tokens and secrets are sealed with keys
# derived from it); a real cluster keeps it in its secret store
export WASMGATE_CLUSTER_KEY
WASMGATE_CLUSTER_KEY=$(head -c 32 /dev/urandom | base64)
export WASMGATE_TOKEN=demo-operator-token
"$upstream_bin" --listen "127.0.0.1:$(free_port)" >/dev/null 2>&1 &
pids+=($!)

http=() admin=()
for n in a b c; do
  hp=$(free_port); ap=$(free_port); mp=$(free_port)
  cat > "$tmp/$n.toml" <<CONF
[server]
data_dir = "$tmp/data-$n"
watch_config = false
[metrics]
listen = "127.0.0.1:$mp"
[admin]
listen = "127.0.0.1:$ap"
token = "$WASMGATE_TOKEN"
[node]
id = "node-$n"
[cluster]
url = "redis://127.0.0.1:$redis_port/0"
[[listeners]]
listen = "127.0.0.1:$hp"
CONF
  "$bin" serve --config "$tmp/$n.toml" >"$tmp/$n.log" 2>&1 &
  pids+=($!)
  wait_port "$hp"
  http+=("127.0.0.1:$hp"); admin+=("127.0.0.1:$ap")
  echo "node-$n: http://127.0.0.1:$hp  admin 127.0.0.1:$ap  metrics http://127.0.0.1:$mp/metrics"
done
echo "redis: 127.0.0.1:$redis_port   operator token: $WASMGATE_TOKEN"
echo

say() { printf '\n$ %s\n' "$*"; }
say "wasmgate tenant create demo (on node-a)"
curl -sf -H "authorization: Bearer $WASMGATE_TOKEN" -X POST \
  -d '{"name": "demo", "limits": {"rate_per_sec": 50}}' "http://${admin[0]}/v1/tenants" >/dev/null
say "wasmgate deploy --tenant demo --name hello --bind hello guests/out/hello_api.wasm (on node-a)"
WASMGATE_ADMIN=${admin[0]} "$bin" deploy --tenant demo --name hello --bind hello guests/out/hello_api.wasm
for i in 0 1 2; do
  say "curl http://${http[$i]}/run/demo/hello/hello/cluster"
  for _ in $(seq 100); do
    code=$(curl -s -o "$tmp/out" -w '%{http_code}' "http://${http[$i]}/run/demo/hello/hello/cluster")
    [ "$code" = 200 ] && break
    sleep 0.01
  done
  echo "$code $(cat "$tmp/out")"
done
say "wasmgate cluster status (on node-c)"
WASMGATE_ADMIN=${admin[2]} "$bin" cluster status

if [ "${1:-}" = "--check" ]; then
  for i in 0 1 2; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://${http[$i]}/run/demo/hello/hello/cluster")
    [ "$code" = 200 ] || { echo "node $i answered $code" >&2; exit 1; }
  done
  echo "cluster demo: every node serves the function deployed on node-a"
  exit 0
fi
echo
echo "The nodes run until Ctrl-C. Try a deploy or a rollback on one node, then the function"
echo "on another; or stop Redis (kill ${pids[0]}): the nodes keep serving, admin writes answer 503."
wait "${pids[@]}"

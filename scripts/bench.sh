#!/usr/bin/env bash
# Benchmarks, side by side in one run on this machine:
#   wrk against: the upstream directly, the gateway (no hook, API-key hook, the same hook
#   with a fresh instance per request, JWT hook,
#   wasm API backend), a bare Pingora proxy with no logic (examples/bare_pingora.rs: the
#   floor under the gateway), and nginx as the same reverse proxy (plain, and with an njs
#   API-key check); a function reading one key of its tenant's state store against the
#   same function answering without it, and the guest-side latency of that read on the
#   embedded store and on Redis; a cluster of three nodes on that Redis (deploy
#   propagation, and a cluster node against the standalone gateway); then the criterion
#   benches (route matching, hook chain costs).
# Each wrk target runs several times, interleaved; the table shows medians, and the CPU
# time (user + system, from /proc) the serving process spent per request.
# Ends with machine-readable lines: `ratio name=value` and `figure name=value`.
#
#   scripts/bench.sh            5 runs x 8 s per target
#   scripts/bench.sh --quick    3 runs x 2 s per target (under 3 minutes in all)
# Env: THREADS (gateway threads = nginx workers, default 1), CONNS (default 32).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/lib.sh

runs=5 dur=8 crit_time=3
if [ "${1:-}" = "--quick" ]; then runs=3 dur=2 crit_time=1; fi
threads="${THREADS:-1}"
conns="${CONNS:-32}"

ensure_packages cmake wrk nginx python3 redis-server
ensure_rust_targets
build_release
# wrk measures the production build: Cargo.toml's `dist` profile (fat LTO), for the
# gateway and for bare Pingora alike (the first build takes ~20 minutes here)
cargo build --profile dist --bin wasmgate --example bare_pingora
bin="$CARGO_TARGET_DIR/dist/wasmgate"
bare_bin="$CARGO_TARGET_DIR/dist/examples/bare_pingora"

with_scratch

up_port=$(free_port); gw_port=$(free_port); ng_port=$(free_port); metrics_port=$(free_port)
admin_port=$(free_port)

# --- upstream: a tiny fixed JSON answer
"$upstream_bin" --fixed --listen "127.0.0.1:$up_port" --name bench 2>/dev/null &
pids+=($!)
up_pid=$!
wait_port "$up_port"

# --- gateway
jwt_secret="bench-secret"
token=$(python3 - "$jwt_secret" <<'PY'
import base64, hmac, hashlib, json, sys
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"sub": "bench", "exp": 4102444800}).encode())
sig = b(hmac.new(sys.argv[1].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
)
{
cat <<CONF
[server]
threads = $threads
data_dir = "$tmp/data"
watch_config = false
[metrics]
listen = "127.0.0.1:$metrics_port"
[admin]
listen = "127.0.0.1:$admin_port"
token = "bench-operator-token"
[state]
ops_per_sec = 0 # the kv targets measure the store, not the tenant's rate limit
CONF
# /plain and /key as on the gateway with the fast path off (below)
proxy_routes "$gw_port" "$up_port" bench-key
cat <<CONF
[modules.key_fresh]
path = "$root/guests/out/api_key_auth.wasm"
config = { keys = ["bench-key"] }
isolation = "request"
[modules.jwt]
path = "$root/guests/out/jwt_auth.wasm"
config = { secret = "$jwt_secret" }
[modules.hello]
path = "$root/guests/out/hello_api.wasm"
[modules.fn_rs]
path = "$root/guests/out/hello-rs.wasm"
[modules.fn_js]
path = "$root/guests/out/hello-js.wasm"
[modules.fn_py]
path = "$root/guests/out/hello-py.wasm"
[modules.fnr_rs]
path = "$root/guests/out/hello-rs.wasm"
requests_per_instance = 100000
[modules.fnr_js]
path = "$root/guests/out/hello-js.wasm"
requests_per_instance = 100000
[modules.fnr_py]
path = "$root/guests/out/hello-py.wasm"
requests_per_instance = 100000
[modules.kv]
path = "$root/guests/out/kv-rs.wasm"
[[routes]]
path_prefix = "/kvb"
hooks = ["kv"]
[[routes]]
path_prefix = "/fn/rs"
hooks = ["fn_rs"]
[[routes]]
path_prefix = "/fn/js"
hooks = ["fn_js"]
[[routes]]
path_prefix = "/fn/py"
hooks = ["fn_py"]
[[routes]]
path_prefix = "/fnr/rs"
hooks = ["fnr_rs"]
[[routes]]
path_prefix = "/fnr/js"
hooks = ["fnr_js"]
[[routes]]
path_prefix = "/fnr/py"
hooks = ["fnr_py"]
[[routes]]
path_prefix = "/isolated"
upstream = "up"
hooks = ["key_fresh"]
[[routes]]
path_prefix = "/jwt"
upstream = "up"
hooks = ["jwt"]
[[routes]]
path_prefix = "/hello"
hooks = ["hello"]
CONF
} >"$tmp/gw.toml"
RUST_LOG=warn "$bin" serve --config "$tmp/gw.toml" >"$tmp/gw.log" 2>&1 &
pids+=($!)
gw_pid=$!
wait_port "$gw_port" 300

# --- the same gateway with the fast path off: every request through Pingora's proxy
gwp_port=$(free_port)
proxy_conf "$tmp/gw-pingora.toml" "$gwp_port" "$up_port" "$tmp/data-pingora" bench-key "$threads" \
  "fast_path = false"
RUST_LOG=warn "$bin" serve --config "$tmp/gw-pingora.toml" >"$tmp/gw-pingora.log" 2>&1 &
pids+=($!)
gwp_pid=$!
wait_port "$gwp_port"

# --- Pingora with no logic of its own: the floor under the gateway
bare_port=$(free_port)
RUST_LOG=warn "$bare_bin" "127.0.0.1:$bare_port" "127.0.0.1:$up_port" "$threads" \
  >"$tmp/bare.log" 2>&1 &
pids+=($!)
bare_pid=$!
wait_port "$bare_port"

# --- nginx as the same reverse proxy, with an njs API-key check on /key
cat > "$tmp/auth.js" <<'JS'
function check(r) { return r.headersIn['x-api-key'] === 'bench-key' ? '1' : '0'; }
export default { check };
JS
cat > "$tmp/nginx.conf" <<CONF
worker_processes $threads;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log;
load_module /usr/lib/nginx/modules/ngx_http_js_module.so;
events { worker_connections 4096; }
http {
  access_log off;
  js_path "$tmp";
  js_import main from auth.js;
  js_set \$key_ok main.check;
  upstream up { server 127.0.0.1:$up_port; keepalive 64; }
  server {
    listen 127.0.0.1:$ng_port;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location /key {
      if (\$key_ok = 0) { return 401; }
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    }
  }
}
CONF
nginx -c "$tmp/nginx.conf" -p "$tmp" &
pids+=($!)
ng_pid=$!
wait_port "$ng_port"

# --- the same kv function on a gateway whose state store is a Redis started here
redis_port=$(free_port); gwr_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" \
  >"$tmp/redis.log" 2>&1 &
pids+=($!)
wait_port "$redis_port"
cat > "$tmp/gw-redis.toml" <<CONF
[server]
threads = $threads
data_dir = "$tmp/data-redis"
watch_config = false
[metrics]
listen = ""
[admin]
listen = ""
[state]
backend = "redis"
url = "redis://127.0.0.1:$redis_port/0"
ops_per_sec = 0
[[listeners]]
listen = "127.0.0.1:$gwr_port"
[modules.kv]
path = "$root/guests/out/kv-rs.wasm"
[[routes]]
path_prefix = "/kvb"
hooks = ["kv"]
CONF
RUST_LOG=warn "$bin" serve --config "$tmp/gw-redis.toml" >"$tmp/gw-redis.log" 2>&1 &
pids+=($!)
wait_port "$gwr_port"
# the key the kv targets read: 100 bytes, on both stores
for p in "$gw_port" "$gwr_port"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT --data-binary "$(printf 'v%.0s' $(seq 100))" \
    "http://127.0.0.1:$p/kvb/kv/bench")
  [ "$code" = 204 ] || { echo "kv seed on $p answered $code" >&2; exit 1; }
done

# --- wrk runs, interleaved across targets
names=(upstream gateway gateway_key gateway_jwt gateway_backend nginx nginx_njs_key pingora_bare kv_read kv_plain
       gateway_key_fresh gateway_pingora gateway_pingora_key)
urls=("http://127.0.0.1:$up_port/" "http://127.0.0.1:$gw_port/plain/x" "http://127.0.0.1:$gw_port/key/x"
      "http://127.0.0.1:$gw_port/jwt/x" "http://127.0.0.1:$gw_port/hello/bench" "http://127.0.0.1:$ng_port/x"
      "http://127.0.0.1:$ng_port/key/x" "http://127.0.0.1:$bare_port/x"
      "http://127.0.0.1:$gw_port/kvb/kv/bench" "http://127.0.0.1:$gw_port/kvb/plain"
      "http://127.0.0.1:$gw_port/isolated/x" "http://127.0.0.1:$gwp_port/plain/x"
      "http://127.0.0.1:$gwp_port/key/x")
hdrs=("" "" "x-api-key: bench-key" "authorization: Bearer $token" "" "" "x-api-key: bench-key" "" "" ""
      "x-api-key: bench-key" "" "x-api-key: bench-key")
# the server process(es) whose CPU each target costs (nginx: master and workers)
servers=("$up_pid" "$gw_pid" "$gw_pid" "$gw_pid" "$gw_pid" ng ng "$bare_pid" "$gw_pid" "$gw_pid" "$gw_pid"
         "$gwp_pid" "$gwp_pid")

# cpu_ticks PID|ng: user + system clock ticks the server has used so far
cpu_ticks() {
  local list="$1" t=0 p
  [ "$1" = ng ] && list="$ng_pid $(pgrep -P "$ng_pid" | tr '\n' ' ')"
  for p in $list; do
    t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
  done
  echo "$t"
}
tick_us=$(( 1000000 / $(getconf CLK_TCK) ))

# sanity: every target answers 200 before measuring
for i in "${!names[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' ${hdrs[$i]:+-H "${hdrs[$i]}"} "${urls[$i]}")
  [ "$code" = 200 ] || { echo "${names[$i]} answered $code" >&2; exit 1; }
done

# wrk_row NAME SERVER WRK_ARGS...: one wrk run, appended to the results as a row: name,
# req/s, p50, p99, the server's CPU (user + system) per request in µs, errors
wrk_row() {
  local name=$1 server=$2 before out used done_n cpu rps p50 p99 errs
  shift 2
  before=$(cpu_ticks "$server")
  out=$(wrk -t1 -d"${dur}s" --latency "$@")
  used=$(( ($(cpu_ticks "$server") - before) * tick_us ))
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  done_n=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk -v u="$used" -v n="$done_n" 'BEGIN {printf "%.1f", (n > 0 ? u / n : 0)}')
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "$name $rps $p50 $p99 $cpu ${errs:-}" >>"$tmp/results"
}

: >"$tmp/results"
for run in $(seq 1 "$runs"); do
  for i in "${!names[@]}"; do
    wrk_row "${names[$i]}" "${servers[$i]}" -c"$conns" ${hdrs[$i]:+-H "${hdrs[$i]}"} "${urls[$i]}"
  done
done

# --- the proxy loops at c128 as well (latency under more connections), interleaved
for run in $(seq 1 "$runs"); do
  for i in 1 5 7 11; do # gateway (fast path), nginx, bare Pingora, gateway on Pingora's path
    wrk_row "${names[$i]}_c128" "${servers[$i]}" -c128 "${urls[$i]}"
  done
done

# --- POST with a 1 KiB body (the request body streamed through each loop), interleaved
printf 'wrk.method = "POST"\nwrk.body = string.rep("b", 1024)\nwrk.headers["Content-Type"] = "application/octet-stream"\n' >"$tmp/post.lua"
for run in $(seq 1 "$runs"); do
  for i in 1 5 11; do # gateway (fast path), nginx, gateway on Pingora's path
    wrk_row "${names[$i]}_post" "${servers[$i]}" -c"$conns" -s "$tmp/post.lua" "${urls[$i]}"
  done
done

# --- one state read timed inside the guest (kv-rs /time/KEY answers the ns its get took),
#     2000 requests on one kept-alive connection per store, interleaved in blocks of 100
python3 - "127.0.0.1:$gw_port" "127.0.0.1:$gwr_port" "$tmp/kv_times" <<'PY'
import http.client, json, statistics, sys
emb, red, out = sys.argv[1:]
conns = {name: http.client.HTTPConnection(host, timeout=10) for name, host in (("embedded", emb), ("redis", red))}
samples = {name: [] for name in conns}
for _ in range(20):
    for name, c in conns.items():
        for _ in range(100):
            c.request("GET", "/kvb/time/bench")
            r = c.getresponse()
            body = r.read()
            assert r.status == 200, (name, r.status, body)
            samples[name].append(int(body) / 1000)
json.dump({k: {"p50": statistics.median(v), "p99": sorted(v)[int(len(v) * 0.99)]} for k, v in samples.items()},
          open(out, "w"))
PY

# --- functions: the gateway against wasmtime serve 48.0.8, each mode against wasmtime
#     serve's best configuration for it, one component at a time, interleaved:
#     fresh (gw, ws): pooling memory kept resident;
#     reuse (gwr, wsr): --max-instance-reuse-count 100000 (the gateway's
#     requests_per_instance = 100000). wasmtime serve's JavaScript reuse answers 500 from
#     the second request on (StarlingMonkey: "respondWith can't be called twice"), so
#     JavaScript reuse is measured on the gateway alone.
wasmtime_bin=$(ensure_wasmtime_cli)
: >"$tmp/fn_results"
ws_flags=(-Scli -O pooling-memory-keep-resident=67108864,pooling-table-keep-resident=1048576,pooling-async-stack-keep-resident=1048576)
for lang in rs js py; do
  for mode in fresh reuse; do
    if [ $mode = fresh ]; then gw_path="fn"; tags=(gw ws); extra=(); else gw_path="fnr"; tags=(gwr wsr); extra=(--max-instance-reuse-count 100000); fi
    [ "$lang/$mode" = js/reuse ] && tags=(gwr)
    ws_port=$(free_port)
    "$wasmtime_bin" serve "${ws_flags[@]}" "${extra[@]}" --addr "127.0.0.1:$ws_port" \
      "$root/guests/out/hello-$lang.wasm" >"$tmp/ws-$lang-$mode.log" 2>&1 &
    ws_pid=$!
    wait_port "$ws_port" 300
    for target in "${tags[@]}"; do
      case $target in gw*) url="http://127.0.0.1:$gw_port/$gw_path/$lang" ;; *) url="http://127.0.0.1:$ws_port/" ;; esac
      for _ in 1 2; do # twice: a reused instance must answer again
        code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
        [ "$code" = 200 ] || { echo "$url answered $code" >&2; exit 1; }
      done
    done
    for run in $(seq 1 "$runs"); do
      for target in "${tags[@]}"; do
        case $target in gw*) url="http://127.0.0.1:$gw_port/$gw_path/$lang" ;; *) url="http://127.0.0.1:$ws_port/" ;; esac
        out=$(wrk -t1 -c"$conns" -d"${dur}s" --latency "$url")
        rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
        bad=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
        [ -z "$bad" ] || echo "functions: $target $lang: $bad" >&2
        echo "${target}_$lang $rps" >>"$tmp/fn_results"
      done
    done
    kill "$ws_pid" 2>/dev/null || true
    wait "$ws_pid" 2>/dev/null || true
  done
done

# --- a JavaScript function from source to its first 200: `wasmgate deploy` componentizes
#     a new script (componentize-js), uploads and binds it; then poll its URL
js_src="$tmp/fresh-$RANDOM.js"
cat >"$js_src" <<JS
addEventListener('fetch', (event) => event.respondWith(new Response('fresh $RANDOM\\n')));
JS
export WASMGATE_ADMIN="127.0.0.1:$admin_port" WASMGATE_TOKEN="bench-operator-token"
curl -s -o /dev/null -H "authorization: Bearer $WASMGATE_TOKEN" -X POST \
  -d '{"name": "jsbench", "limits": {}}' "http://$WASMGATE_ADMIN/v1/tenants"
js_start=$(date +%s%N)
"$bin" deploy --tenant jsbench --name fresh --bind fresh "$js_src" >"$tmp/js-deploy.log" 2>&1 || {
  cat "$tmp/js-deploy.log" >&2; exit 1; }
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gw_port/run/jsbench/fresh/")" = 200 ]; do
  sleep 0.01
done
echo $(( ($(date +%s%N) - js_start) / 1000000 )) >"$tmp/js_deploy_ms"

# --- deploys: time from upload to the first successful request, and requests/s on a
#     function while it is redeployed 10 times per second
cargo run --release --quiet --example gen_module -- 1048576 "$tmp/big.wasm" 2>/dev/null
python3 - "127.0.0.1:$admin_port" "127.0.0.1:$gw_port" "$root/guests/out/hello_api.wasm" "$tmp/big.wasm" \
  "$dur" "$tmp/deploys" <<'PY'
import http.client, json, os, statistics, subprocess, sys, threading, time
admin, gw, small_path, big_path, dur, out = sys.argv[1:]
H = {"authorization": "Bearer bench-operator-token"}
def call(method, path, body=b"", host=admin):
    c = http.client.HTTPConnection(host, timeout=30)
    c.request(method, path, body, H)
    r = c.getresponse()
    return r.status, r.read()
def unique(b, i):
    # a custom section makes the bytes (and digest) new without changing the code
    payload = bytes([1]) + b"x" + os.urandom(8) + i.to_bytes(4, "little")
    return b + bytes([0, len(payload)]) + payload
def first_ok(name, body):
    t0 = time.perf_counter()
    s, d = call("PUT", f"/v1/tenants/bench/modules/{name}", body)
    assert s == 201, d
    s, d = call("PUT", f"/v1/tenants/bench/functions/{name}", json.dumps({"module": name}).encode())
    assert s == 200, d
    while True:
        s, _ = call("GET", f"/run/bench/{name}/hello/x", host=gw)
        if s == 200:
            return (time.perf_counter() - t0) * 1000
s, d = call("POST", "/v1/tenants", json.dumps({"name": "bench", "limits": {"max_module_bytes": 4 << 20}}).encode())
assert s == 201, d
small, big = open(small_path, "rb").read(), open(big_path, "rb").read()
cold = [first_ok(f"cold{i}", unique(small, i)) for i in range(3)]
warm = [first_ok(f"warm{i}", small) for i in range(3)]
bigc = [first_ok(f"big{i}", unique(big, i)) for i in range(3)]
def wrk():
    o = subprocess.run(["wrk", "-t1", "-c32", f"-d{dur}s", f"http://{gw}/run/bench/warm0/hello/x"],
                       capture_output=True, text=True).stdout
    rps = float([l for l in o.splitlines() if l.startswith("Requests/sec")][0].split()[1])
    bad = [l.strip() for l in o.splitlines() if "Non-2xx" in l or "Socket errors" in l]
    return rps, bad
steady, _ = wrk()
stop, deploys = False, [0]
def redeploy():
    i = 0
    while not stop:
        t = time.perf_counter()
        s, d = call("PUT", "/v1/tenants/bench/modules/warm0", small)
        assert s == 201, d
        deploys[0] += 1
        time.sleep(max(0, 0.1 - (time.perf_counter() - t)))
th = threading.Thread(target=redeploy); th.start()
during, bad = wrk()
stop = True; th.join()
with open(out, "w") as f:
    json.dump({"cold": cold, "warm": warm, "big": bigc, "steady": steady, "during": during,
               "errors_during": bad, "deploys": deploys[0]}, f)
PY

# --- a cluster of three nodes on the Redis started above ([cluster], their own key prefix):
#     (1) deploy propagation: 20 deploys, each uploaded on one node in turn, timed from
#     the upload to the new version's first 200 on every node; (2) a node in the cluster
#     against the standalone gateway on the same route (a function of a tenant with a
#     rate limit: shared leases against the node's own limiter), interleaved
export WASMGATE_CLUSTER_KEY
WASMGATE_CLUSTER_KEY=$(head -c 32 /dev/urandom | base64)
cl_http=() cl_admin=()
for n in a b c; do
  hp=$(free_port); ap=$(free_port)
  cat > "$tmp/cluster-$n.toml" <<CONF
[server]
threads = $threads
data_dir = "$tmp/data-cluster-$n"
watch_config = false
[metrics]
listen = ""
[admin]
listen = "127.0.0.1:$ap"
token = "bench-operator-token"
[node]
id = "bench-$n"
[cluster]
url = "redis://127.0.0.1:$redis_port/0"
prefix = "benchcluster"
[state]
prefix = "benchcluster"
[[listeners]]
listen = "127.0.0.1:$hp"
CONF
  RUST_LOG=warn "$bin" serve --config "$tmp/cluster-$n.toml" >"$tmp/cluster-$n.log" 2>&1 &
  pids+=($!)
  wait_port "$hp"
  cl_http+=("127.0.0.1:$hp"); cl_admin+=("127.0.0.1:$ap")
done
cargo run --release --quiet --example gen_module -- 0 "$tmp/marked.wasm" PPPPPPPP 2>/dev/null
python3 - "$tmp/marked.wasm" "$root/guests/out/hello_api.wasm" "127.0.0.1:$admin_port" "127.0.0.1:$gw_port" \
  "$tmp/cluster" "${cl_admin[@]}" "${cl_http[@]}" <<'PY'
import http.client, json, statistics, sys, time
marked, hello, sa_admin, sa_http, out = sys.argv[1:6]
admins, https = sys.argv[6:9], sys.argv[9:12]
H = {"authorization": "Bearer bench-operator-token"}
def call(host, method, path, body=b""):
    c = http.client.HTTPConnection(host, timeout=30)
    c.request(method, path, body, H)
    r = c.getresponse()
    return r.status, r.read()
template = open(marked, "rb").read()
s, d = call(admins[0], "POST", "/v1/tenants", json.dumps({"name": "prop", "limits": {}}).encode())
assert s == 201, d
def deploy(node, i):
    s, d = call(admins[node], "PUT", "/v1/tenants/prop/modules/m",
                template.replace(b"PPPPPPPP", b"p%07d" % i))
    assert s == 201, d
deploy(0, 0)
s, d = call(admins[0], "PUT", "/v1/tenants/prop/functions/f", json.dumps({"module": "m"}).encode())
assert s == 200, d
conns = [http.client.HTTPConnection(h, timeout=10) for h in https]
def body_on(c):
    c.request("GET", "/run/prop/f/")
    r = c.getresponse()
    return r.status, r.read()
times = []
for i in range(1, 21):
    want = b"p%07d" % i
    t0 = time.perf_counter()
    deploy(i % 3, i)
    pending = set(range(3))
    while pending:
        for n in list(pending):
            if body_on(conns[n]) == (200, want):
                pending.discard(n)
    times.append((time.perf_counter() - t0) * 1000)
# the same rate-limited function on the standalone gateway and on a cluster node
for host, admin in ((sa_http, sa_admin), (https[0], admins[0])):
    s, d = call(admin, "POST", "/v1/tenants", json.dumps({"name": "rated", "limits": {"rate_per_sec": 1000000}}).encode())
    assert s == 201, d
    s, d = call(admin, "PUT", "/v1/tenants/rated/modules/h", open(hello, "rb").read())
    assert s == 201, d
    s, d = call(admin, "PUT", "/v1/tenants/rated/functions/f", json.dumps({"module": "h"}).encode())
    assert s == 200, d
json.dump({"propagation": times}, open(out, "w"))
PY
for url in "http://127.0.0.1:$gw_port/run/rated/f/hello/x" "http://${cl_http[0]}/run/rated/f/hello/x"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  [ "$code" = 200 ] || { echo "$url answered $code" >&2; exit 1; }
done
: >"$tmp/cluster_rps"
for run in $(seq 1 "$runs"); do
  for target in single cluster; do
    case $target in single) url="http://127.0.0.1:$gw_port/run/rated/f/hello/x" ;; *) url="http://${cl_http[0]}/run/rated/f/hello/x" ;; esac
    out=$(wrk -t1 -c"$conns" -d"${dur}s" "$url")
    bad=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    [ -z "$bad" ] || echo "cluster: $target: $bad" >&2
    echo "$target $(awk '/^Requests\/sec/ {print $2}' <<<"$out")" >>"$tmp/cluster_rps"
  done
done

# --- criterion benches (short)
scripts/build-components.sh >/dev/null
cargo bench --quiet --bench route_match --bench hooks --bench components -- \
  --warm-up-time 1 --measurement-time "$crit_time" >"$tmp/criterion.log" 2>&1 || {
  cat "$tmp/criterion.log" >&2; exit 1; }

python3 - "$tmp/results" "$CARGO_TARGET_DIR/criterion" "$runs" "$dur" "$threads" "$conns" "$tmp/deploys" "$tmp/fn_results" "$tmp/js_deploy_ms" "$tmp/kv_times" "$tmp/cluster" "$tmp/cluster_rps" <<'PY'
import json, os, statistics, sys
results, crit, runs, dur, threads, conns, deploys, fn_results, js_deploy_ms, kv_times, cluster, cluster_rps = sys.argv[1:]
rows = {}
def ms(v):
    v = v.strip()
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float("nan")
for line in open(results):
    parts = line.split()
    if len(parts) < 5:
        continue
    name, rps, p50, p99, cpu = parts[:5]
    r = rows.setdefault(name, {"rps": [], "p50": [], "p99": [], "cpu": [], "errors": []})
    r["rps"].append(float(rps)); r["p50"].append(ms(p50)); r["p99"].append(ms(p99))
    r["cpu"].append(float(cpu))
    if len(parts) > 5:
        r["errors"].append(" ".join(parts[5:]))
med = {n: statistics.median(r["rps"]) for n, r in rows.items()}
print(f"\nwrk -t1 -c{conns}, {runs} runs x {dur}s per target, interleaved; gateway threads = nginx workers = {threads}")
print(f"{'target':18} {'req/s (median)':>15} {'runs':>28} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/req':>18}")
for n, r in rows.items():
    runs_s = "/".join(f"{x/1000:.1f}k" for x in r["rps"])
    print(f"{n:18} {med[n]:15.0f} {runs_s:>28} {statistics.median(r['p50']):8.3f} {statistics.median(r['p99']):8.3f} {statistics.median(r['cpu']):18.1f}")
    if r["errors"]:
        print(f"  errors: {r['errors']}")
def est(group, bench):
    p = os.path.join(crit, group, bench, "new", "estimates.json")
    with open(p) as f:
        return json.load(f)["median"]["point_estimate"]  # ns
fig = {
    "route_match_10_ns": est("route_match", "10_routes"),
    "route_match_1k_ns": est("route_match", "1000_routes"),
    "route_match_10k_ns": est("route_match", "10000_routes"),
    "hook_chain_pooled_us": est("hook_chain", "pooled_vm") / 1000,
    "hook_chain_fresh_us": est("hook_chain", "fresh_instance") / 1000,
    # the same snapshot instantiated anew for each request instead of renewed
    "hook_chain_fresh_instantiated_us": est("hook_chain", "fresh_instance_instantiated") / 1000,
    # the same fresh instance without a snapshot (the module's start runs in each)
    "hook_chain_fresh_started_us": est("hook_chain", "fresh_instance_started") / 1000,
    "jwt_hook_optimized_us": est("jwt_tier", "optimized") / 1000,
    "jwt_hook_baseline_us": est("jwt_tier", "baseline") / 1000,
    "compile_jwt_optimized_ms": est("compile_jwt", "optimized") / 1e6,
    "compile_jwt_baseline_ms": est("compile_jwt", "baseline") / 1e6,
    "get_header_map_value_ns": est("host_call_x1000", "get_header_map_value") / 1000,
    "send_local_response_ns": est("host_call_x1000", "send_local_response") / 1000,
    "call_no_budget_ns": est("budget_mechanism_call_100_iterations", "none"),
    "call_fuel_ns": est("budget_mechanism_call_100_iterations", "fuel"),
    "call_epoch_ns": est("budget_mechanism_call_100_iterations", "epoch"),
    # a fresh instance + one GET + drop, in-process, epoch-metered (as the gateway runs them)
    "component_rust_request_us": est("component_request_epoch", "rust") / 1000,
    "component_js_request_us": est("component_request_epoch", "js") / 1000,
}
print()
print(f"ratio gateway_vs_nginx={med['gateway'] / med['nginx']:.2f}")
print(f"ratio gateway_vs_bare_pingora={med['gateway'] / med['pingora_bare']:.2f}")
print(f"ratio bare_pingora_vs_nginx={med['pingora_bare'] / med['nginx']:.2f}")
print(f"ratio gateway_vs_upstream_direct={med['gateway'] / med['upstream']:.2f}")
print(f"ratio hook_vs_plain={med['gateway_key'] / med['gateway']:.2f}")
print(f"ratio jwt_hook_vs_plain={med['gateway_jwt'] / med['gateway']:.2f}")
# steady state of the JWT guest on baseline (Winch) code vs optimized (Cranelift) code,
# in-process per request (criterion `jwt_tier`): above 1, baseline code is slower
print(f"ratio jwt_baseline_vs_optimized={fig['jwt_hook_baseline_us'] / fig['jwt_hook_optimized_us']:.2f}")
print(f"ratio wasm_auth_vs_njs_auth={med['gateway_key'] / med['nginx_njs_key']:.2f}")
print(f"ratio wasm_backend_vs_plain={med['gateway_backend'] / med['gateway']:.2f}")
# the API-key route with a fresh instance per request (isolation = "request") vs shared VMs
print(f"ratio isolated_vs_shared={med['gateway_key_fresh'] / med['gateway_key']:.2f}")
# the fast path against Pingora's proxy, the same gateway otherwise
print(f"ratio fast_path_vs_pingora_path={med['gateway'] / med['gateway_pingora']:.2f}")
print(f"ratio fast_path_vs_pingora_path_key={med['gateway_key'] / med['gateway_pingora_key']:.2f}")
# POST, 1 KiB body: the fast path streams request bodies too
print(f"ratio fast_path_vs_pingora_path_post={med['gateway_post'] / med['gateway_pingora_post']:.2f}")
print(f"ratio gateway_post_vs_nginx_post={med['gateway_post'] / med['nginx_post']:.2f}")
print(f"ratio pingora_path_vs_nginx={med['gateway_pingora'] / med['nginx']:.2f}")
# CPU time (user + system, from /proc) the serving process spent per request
cpu = {n: statistics.median(r["cpu"]) for n, r in rows.items()}
for n in ("nginx", "pingora_bare", "gateway", "gateway_key", "gateway_pingora"):
    print(f"figure cpu_us_per_request_{n}={cpu[n]:.1f}")
for n in ("nginx", "pingora_bare", "gateway_pingora", "gateway"):
    print(f"figure p99_c{conns}_ms_{n}={statistics.median(rows[n]['p99']):.2f}")
    print(f"figure p99_c128_ms_{n}={statistics.median(rows[n + '_c128']['p99']):.2f}")
d = json.load(open(deploys))
print(f"\ndeploys (upload -> first 200 on the function URL), median of 3: small cold {statistics.median(d['cold']):.0f} ms,"
      f" small warm {statistics.median(d['warm']):.0f} ms, 1 MB cold {statistics.median(d['big']):.0f} ms")
print(f"function URL: {d['steady']:.0f} req/s steady, {d['during']:.0f} req/s during {d['deploys']} redeploys"
      f" (10/s); errors during: {d['errors_during'] or 'none'}")
fig["deploy_first_ok_cold_ms"] = statistics.median(d["cold"])
fig["deploy_first_ok_warm_ms"] = statistics.median(d["warm"])
fig["deploy_1mb_first_ok_cold_ms"] = statistics.median(d["big"])
print(f"ratio rps_during_redeploys_vs_steady={d['during'] / d['steady']:.2f}")
fn = {}
for line in open(fn_results):
    name, rps = line.split()[:2]
    fn.setdefault(name, []).append(float(rps))
fn = {k: statistics.median(v) for k, v in fn.items()}
print(f"\nfunctions, req/s (median; gw/ws fresh, gwr/wsr reuse): " + ", ".join(f"{k} {v:.0f}" for k, v in fn.items()))
for lang, word in (("rs", "rust"), ("js", "js"), ("py", "py")):
    print(f"ratio component_{word}_vs_wasmtime_serve={fn['gw_' + lang] / fn['ws_' + lang]:.2f}")
for lang, word in (("rs", "rust"), ("py", "py")):
    print(f"ratio component_{word}_reuse_vs_wasmtime_serve_reuse={fn['gwr_' + lang] / fn['wsr_' + lang]:.2f}")
fig["component_js_reuse_rps"] = fn["gwr_js"]
kv = json.load(open(kv_times))
print(f"\nstate read inside a function (µs, 2000 each): embedded p50 {kv['embedded']['p50']:.1f} p99 {kv['embedded']['p99']:.1f},"
      f" redis p50 {kv['redis']['p50']:.1f} p99 {kv['redis']['p99']:.1f}")
print(f"ratio kv_route_vs_plain_backend={med['kv_read'] / med['kv_plain']:.2f}")
cl = json.load(open(cluster))["propagation"]
crps = {}
for line in open(cluster_rps):
    name, rps = line.split()
    crps.setdefault(name, []).append(float(rps))
print(f"\ncluster: deploy propagation over {len(cl)} deploys (upload -> new version on all 3 nodes): "
      f"p50 {statistics.median(cl):.1f} ms, max {max(cl):.1f} ms; rate-limited function req/s: "
      f"single {statistics.median(crps['single']):.0f}, cluster node {statistics.median(crps['cluster']):.0f}")
print(f"ratio cluster_node_rps_vs_single={statistics.median(crps['cluster']) / statistics.median(crps['single']):.2f}")
fig["deploy_propagation_ms"] = statistics.median(cl)
fig["deploy_propagation_max_ms"] = max(cl)
fig["kv_get_embedded_us"] = kv["embedded"]["p50"]
fig["kv_get_redis_us"] = kv["redis"]["p50"]
fig["deploy_js_source_to_first_ok_ms"] = float(open(js_deploy_ms).read())
for k, v in fig.items():
    print(f"figure {k}={v:.3g}" if v < 100 else f"figure {k}={v:.0f}")
PY

#!/usr/bin/env bash
# Soak: healthy traffic (plain proxy, API-key hook, wasm API backend) driven by wrk while,
# at the same time, hostile hooks are hammered, the conf is reloaded every second
# (alternating valid and invalid), a tenant's module is redeployed several times a second,
# one upstream target is killed and restarted, and slow or oversized clients connect.
# Loopback only, bounded in time, stops everything it started. Prints one summary line and
# exits non-zero if a healthy request failed, the gateway died, or its memory grew more
# than RSS_BOUND_MB (default 150).
#
#   scripts/soak.sh [--duration SECONDS]      (default 60)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/lib.sh
duration=60
[ "${1:-}" = "--duration" ] && duration="$2"
rss_bound="${RSS_BOUND_MB:-150}"
ensure_packages cmake wrk python3 curl
ensure_rust_targets
build_release
with_scratch
cargo run --release --quiet --example hostile -- "$tmp/hostile"
pa=$(free_port); pb=$(free_port); gw=$(free_port); mt=$(free_port); ad=$(free_port)

"$upstream_bin" --fixed --listen "127.0.0.1:$pa" --name a 2>/dev/null & pids+=($!)
"$upstream_bin" --fixed --listen "127.0.0.1:$pb" --name b 2>/dev/null & up_b=$!
pids+=("$up_b")
wait_port "$pa"; wait_port "$pb"

write_conf() { # $1 = file; valid conf
cat >"$1" <<CONF
[server]
data_dir = "$tmp/data"
watch_config = false
[metrics]
listen = "127.0.0.1:$mt"
[admin]
listen = "127.0.0.1:$ad"
token = "soak-operator"
[limits]
max_request_header_bytes = 16384
max_request_body_bytes = 65536
client_body_timeout_ms = 1000
client_header_timeout_ms = 1000
[[listeners]]
listen = "127.0.0.1:$gw"
[upstreams.pool]
targets = ["127.0.0.1:$pa", "127.0.0.1:$pb"]
retries = 2
connect_timeout_ms = 200
health_check = { kind = "tcp", interval_ms = 100, timeout_ms = 100 }
[tenants.evil]
[modules.key]
path = "$root/guests/out/api_key_auth.wasm"
config = { keys = ["soak-key"] }
[modules.hello]
path = "$root/guests/out/hello_api.wasm"
[[routes]]
path_prefix = "/plain"
upstream = "pool"
[[routes]]
path_prefix = "/auth"
upstream = "pool"
hooks = ["key"]
[[routes]]
path_prefix = "/hello"
hooks = ["hello"]
CONF
for h in loop bomb recurse trap huge; do
  mem=4; [ $h = huge ] && mem=12
  printf '[modules.%s]\ntenant = "evil"\npath = "%s"\nmemory_mb = %s\n[[routes]]\npath_prefix = "/%s"\nupstream = "pool"\nhooks = ["%s"]\n' \
    "$h" "$tmp/hostile/$h.wasm" "$mem" "$h" "$h" >>"$1"
done
}
write_conf "$tmp/good.toml"
cp "$tmp/good.toml" "$tmp/bad.toml"
echo '[[routes]]
upstream = "nowhere"' >>"$tmp/bad.toml"
cp "$tmp/good.toml" "$tmp/gw.toml"
RUST_LOG=warn "$bin" serve --config "$tmp/gw.toml" >"$tmp/gw.log" 2>&1 &
gwpid=$!; pids+=($gwpid)
wait_port "$gw"; wait_port "$ad"
rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$gwpid/status"; }
admin() { curl -s -m 10 -o /dev/null -w '%{http_code}' -H "authorization: Bearer soak-operator" "$@"; }
admin -X POST "http://127.0.0.1:$ad/v1/tenants" -d '{"name":"soak"}' >/dev/null
admin -X PUT --data-binary @"$root/guests/out/hello_api.wasm" "http://127.0.0.1:$ad/v1/tenants/soak/modules/fn" >/dev/null
admin -X PUT -d '{"module":"fn"}' "http://127.0.0.1:$ad/v1/tenants/soak/functions/fn" >/dev/null

cat >"$tmp/mix.lua" <<'LUA'
local paths = {"/plain/x", "/auth/x", "/hello/soak", "/run/soak/fn/hello/x"}
local i = 0
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function() bad = "" end
request = function()
  i = i % #paths + 1
  last = paths[i]
  return wrk.format("GET", paths[i], {["x-api-key"] = "soak-key"})
end
response = function(status, headers, body)
  if status >= 300 and #bad < 2000 then bad = bad .. status .. " " .. body .. "\n" end
end
done = function()
  for _, t in ipairs(threads) do io.write(t:get("bad")) end
end
LUA
healthy() { # $1 seconds -> "requests errors p99_ms rps"
  local out; out=$(wrk -t1 -c16 -d"${1}s" --latency -s "$tmp/mix.lua" "http://127.0.0.1:$gw")
  echo "$out" >>"$tmp/wrk.log"
  local n e p99 rps
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  e=$(awk '/Non-2xx/ {s+=$NF} /Socket errors/ {gsub(",","");s+=$4+$6+$8+$10} END {print s+0}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}' <<<"$out")
  rps=$(awk '/^Requests\/sec/ {print int($2)}' <<<"$out")
  echo "$n $e $p99 $rps"
}

rss_start=$(rss)
baseline_secs=$(( duration / 6 > 3 ? duration / 6 : 3 ))
read -r _ base_err base_p99 base_rps < <(healthy "$baseline_secs")
max_out=$(wrk -t1 -c32 -d3s "http://127.0.0.1:$gw/plain/x" | awk '/^Requests\/sec/ {print int($2)}')

end=$(( $(date +%s) + duration ))
# chaos, each loop bounded by the same deadline
( n=0; while [ "$(date +%s)" -lt "$end" ]; do
    for h in loop bomb recurse trap huge; do
      c=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gw/$h/x")
      [ "$c" = 503 ] && n=$((n+1))
    done
  done; echo "$n" >"$tmp/hostile_contained" ) &
chaos=($!)
( i=0; while [ "$(date +%s)" -lt "$end" ]; do
    if [ $((i % 2)) = 0 ]; then cp "$tmp/bad.toml" "$tmp/gw.toml"; else cp "$tmp/good.toml" "$tmp/gw.toml"; fi
    kill -HUP "$gwpid" 2>/dev/null || true; i=$((i+1)); sleep 1
  done; cp "$tmp/good.toml" "$tmp/gw.toml"; kill -HUP "$gwpid" 2>/dev/null || true ) &
chaos+=($!)
( n=0; while [ "$(date +%s)" -lt "$end" ]; do
    c=$(admin -X PUT --data-binary @"$root/guests/out/hello_api.wasm" "http://127.0.0.1:$ad/v1/tenants/soak/modules/fn")
    [ "$c" = 201 ] && n=$((n+1)); sleep 0.2
  done; echo "$n" >"$tmp/deploys" ) &
chaos+=($!)
( while [ "$(date +%s)" -lt "$end" ]; do
    sleep 3; kill "$up_b" 2>/dev/null || true; wait "$up_b" 2>/dev/null || true; sleep 2
    "$upstream_bin" --fixed --listen "127.0.0.1:$pb" --name b 2>/dev/null & up_b=$!
  done; kill "$up_b" 2>/dev/null || true ) >/dev/null 2>&1 &
chaos+=($!)
python3 - "$gw" "$end" >"$tmp/abuse" <<'PY' &
import socket, sys, time
port, end = int(sys.argv[1]), float(sys.argv[2])
slow = heads = big = 0
while time.time() < end:
    # slowloris: a head trickled a byte every 50 ms that never ends
    s = socket.create_connection(("127.0.0.1", port), timeout=0.05)
    got = b""
    for b in b"GET /plain/x HTTP/1.1\r\nhost: t\r\nx-pad: " + b"a" * 100:
        try:
            s.send(bytes([b]))
            got += s.recv(100)
            break
        except socket.timeout:
            pass
        except OSError:
            break
    if got.startswith(b"HTTP/1.1 408"): heads += 1
    s.close()
    # slow client: headers trickled byte by byte, then a body that never completes
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    for b in b"POST /plain/x HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nab":
        s.send(bytes([b])); time.sleep(0.002)
    try:
        if s.recv(100).startswith(b"HTTP/1.1 408"): slow += 1
    except OSError:
        pass
    s.close()
    # oversized head and body
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /plain/x HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n")
    if s.recv(100).startswith(b"HTTP/1.1 431"): big += 1
    s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /plain/x HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n")
    if s.recv(100).startswith(b"HTTP/1.1 413"): big += 1
    s.close()
print(slow, heads, big)
PY
chaos+=($!)
sleep 1
read -r chaos_n chaos_err chaos_p99 chaos_rps < <(healthy $(( end - $(date +%s) )))
for p in "${chaos[@]}"; do wait "$p" || true; done
sleep 1
alive=1; kill -0 "$gwpid" 2>/dev/null || alive=0
rss_end=$( [ $alive = 1 ] && rss || echo 0 )
metrics=$(curl -s "http://127.0.0.1:$mt/metrics" || true)
reloads_ok=$(awk '/^wasmgate_config_reloads_total\{result="ok"\}/ {print $2}' <<<"$metrics")
reloads_bad=$(awk '/^wasmgate_config_reloads_total\{result="failed"\}/ {print $2}' <<<"$metrics")
read -r slow_408 slow_heads_408 oversized_rejected <"$tmp/abuse"
healthy_errors=$(( base_err + chaos_err ))
echo "soak: duration_s=$duration healthy_requests=$chaos_n healthy_errors=$healthy_errors healthy_rps=$chaos_rps max_rps=$max_out hostile_contained=$(cat "$tmp/hostile_contained") reloads_ok=${reloads_ok:-0} reloads_rejected=${reloads_bad:-0} deploys=$(cat "$tmp/deploys") slow_clients_408=$slow_408 slow_heads_408=$slow_heads_408 oversized_rejected=$oversized_rejected gateway_restarts=$((1 - alive)) rss_start_mb=$rss_start rss_end_mb=$rss_end p99_healthy_baseline_ms=$base_p99 p99_healthy_chaos_ms=$chaos_p99"
fail=0
grep -E "Non-2xx|Socket errors|^[0-9]{3} " "$tmp/wrk.log" | sort | uniq -c | sort -rn | head -8 >&2 || true
[ "$healthy_errors" = 0 ] || { echo "FAIL: healthy requests failed" >&2; fail=1; }
[ $alive = 1 ] || { echo "FAIL: the gateway died" >&2; fail=1; }
[ $(( rss_end - rss_start )) -le "$rss_bound" ] || { echo "FAIL: RSS grew by more than $rss_bound MB" >&2; fail=1; }
exit $fail

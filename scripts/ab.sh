#!/usr/bin/env bash
# A/B: two gateway binaries on the same conf (a plain proxy route and an API-key hook route
# to a fixed upstream), wrk runs interleaved A, B, A, B, ... Prints the medians and
# `ratio b_vs_a_plain=…`, `ratio b_vs_a_key=…`. Loopback only; stops what it started.
#
#   scripts/ab.sh OLD_BINARY NEW_BINARY [RUNS] [SECONDS]     (default 5 runs x 5 s)
#
# e.g. build the parent commit's binary into a copy, then compare it with the working tree:
#   git stash; cargo build --release; cp "$CARGO_TARGET_DIR/release/wasmgate" /tmp/a; git stash pop
#   cargo build --release; scripts/ab.sh /tmp/a "$CARGO_TARGET_DIR/release/wasmgate"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/lib.sh

[ $# -ge 2 ] || { sed -n 2,10p "$0" >&2; exit 2; }
a="$1" b="$2" runs="${3:-5}" dur="${4:-5}"
ensure_packages wrk python3
build_release # the guests and the demo upstream

with_scratch

up_port=$(free_port)
"$upstream_bin" --fixed --listen "127.0.0.1:$up_port" --name ab 2>/dev/null &
pids+=($!)
wait_port "$up_port"

# start_gw NAME BINARY: runs BINARY on its own conf; sets $gw_port
start_gw() {
  gw_port=$(free_port)
  mkdir -p "$tmp/$1"
  proxy_conf "$tmp/$1/gw.toml" "$gw_port" "$up_port" "$tmp/$1/data" ab-key 1
  RUST_LOG=warn "$2" serve --config "$tmp/$1/gw.toml" >"$tmp/$1/log" 2>&1 &
  pids+=($!)
  wait_port "$gw_port"
}
start_gw a "$a"; port_a=$gw_port
start_gw b "$b"; port_b=$gw_port

# rps PORT PATH
rps() {
  wrk -t1 -c32 -d"${dur}s" -H "x-api-key: ab-key" "http://127.0.0.1:$1$2" |
    awk '/Requests\/sec/ {print $2}'
}
median() { sort -n | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

for p in /plain /key; do rps "$port_a" "$p" >/dev/null; rps "$port_b" "$p" >/dev/null; done # warm
: >"$tmp/res"
for i in $(seq 1 "$runs"); do
  for p in /plain /key; do
    echo "a $p $(rps "$port_a" "$p")" >>"$tmp/res"
    echo "b $p $(rps "$port_b" "$p")" >>"$tmp/res"
  done
done
for p in /plain /key; do
  ma=$(awk -v p="$p" '$1=="a" && $2==p {print $3}' "$tmp/res" | median)
  mb=$(awk -v p="$p" '$1=="b" && $2==p {print $3}' "$tmp/res" | median)
  printf '%-7s a=%9.0f  b=%9.0f req/s (median of %d x %d s)\n' "$p" "$ma" "$mb" "$runs" "$dur"
  echo "ratio b_vs_a_${p#/}=$(python3 -c "print(round($mb/$ma, 3))")"
done

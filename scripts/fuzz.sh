#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 600 s; --seconds N to change),
# one after the other. Crashes land in fuzz/artifacts/TARGET/; copy them to
# fuzz/regressions/TARGET/ to keep them as regression inputs (the tests replay them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs=600
[ "${1:-}" = "--seconds" ] && secs="$2"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cd "$root/fuzz"
for t in conf_parse abi_decode; do
  mkdir -p "corpus/$t"
  # seed the conf fuzzer with the shipped and invalid confs
  [ "$t" = conf_parse ] && cp -f "$root"/conf/*.toml "$root"/tests/ui/invalid/*.toml "corpus/$t/" 2>/dev/null || true
  echo "fuzzing $t for ${secs}s"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 4
done

#!/usr/bin/env bash
# Quick start 2/2: the whole test suite (unit, integration through real listeners,
# conf snapshots, wasm guests built from guests/). CI runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/lib.sh
ensure_packages cmake redis-server
ensure_rust_targets
scripts/build-guests.sh
scripts/build-components.sh
# One profile for tests and benchmarks: dependencies are compiled once.
cargo test --release --lib --bins --tests -- --test-threads 2 "$@"
# The criterion benches run once each as tests, so they keep compiling and working.
cargo test --release --benches

#!/usr/bin/env bash
# Builds the example Proxy-Wasm filters in guests/ for wasm32-wasip1 and copies them to
# guests/out/NAME.wasm, where the confs and tests find them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
# The guests have their own target dir: they never share artifacts with the host build.
cargo build --release --target wasm32-wasip1 \
  --manifest-path "$root/guests/Cargo.toml" --target-dir "$root/guests/target"
mkdir -p "$root/guests/out"
for f in "$root"/guests/target/wasm32-wasip1/release/*.wasm; do
  cp -f "$f" "$root/guests/out/$(basename "$f")"
done
echo "guests: $(ls "$root/guests/out" | tr '\n' ' ')"

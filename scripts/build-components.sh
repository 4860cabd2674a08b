#!/usr/bin/env bash
# Builds the WASI-HTTP components in guests/components/ (function backends exporting
# wasi:http/incoming-handler) to guests/out/NAME.wasm:
#   *-rs      Rust crates for wasm32-wasip2 (the `wasi` crate's wasi:http bindings)
#   hello-js  JavaScript, componentize-js (npm, pinned) into a cache dir
#   hello-py  Python, componentize-py (PyPI, pinned) into a cache dir
# Idempotent: installs what is missing, skips an output newer than its inputs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/guests/components"
out="$root/guests/out"
tools="${WASMGATE_TOOLS:-$HOME/.cache/wasmgate-tools}"
COMPONENTIZE_JS_VERSION=0.23.0
COMPONENTIZE_PY_VERSION=0.25.1
mkdir -p "$out" "$tools"

# True when $1 is missing or older than any file under the other arguments.
stale() {
  local target="$1"; shift
  [[ ! -e "$target" ]] && return 0
  [[ -n "$(find "$@" -newer "$target" -type f -not -path '*/__pycache__/*' -not -path '*/target/*' 2>/dev/null | head -1)" ]]
}

timed() { # timed LABEL command...: runs the command and prints its build time
  local label="$1" start end
  shift
  start=$(date +%s%N)
  "$@"
  end=$(date +%s%N)
  echo "components: built $label in $(( (end - start) / 1000000 )) ms" >&2
}

# --- Rust (wasm32-wasip2) ---
rust_guests=(hello-rs echo-rs fetch-rs loop-rs bomb-rs)
need_rust=0
for g in "${rust_guests[@]}"; do
  stale "$out/$g.wasm" "$src/$g" "$src/Cargo.toml" && need_rust=1
done
if (( need_rust )); then
  rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
  build_rust() {
    cargo build --release --target wasm32-wasip2 --manifest-path "$src/Cargo.toml" \
      --target-dir "$src/target"
  }
  timed rust build_rust
  for g in "${rust_guests[@]}"; do
    cp -f "$src/target/wasm32-wasip2/release/${g//-/_}.wasm" "$out/$g.wasm"
  done
fi

# --- JavaScript (componentize-js) ---
npm_prefix="$tools/npm"
if stale "$out/hello-js.wasm" "$src/hello-js" "$src/componentize.mjs"; then
  if [[ ! -d "$npm_prefix/node_modules/@bytecodealliance/componentize-js" ]] ||
     ! grep -q "\"version\": \"$COMPONENTIZE_JS_VERSION\"" \
       "$npm_prefix/node_modules/@bytecodealliance/componentize-js/package.json"; then
    mkdir -p "$npm_prefix"
    npm install --silent --no-audit --no-fund --prefix "$npm_prefix" \
      "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION"
  fi
  timed hello-js node "$src/componentize.mjs" "$npm_prefix" "$src/hello-js/hello.js" "$out/hello-js.wasm"
fi

# --- Python (componentize-py) ---
py_prefix="$tools/py/componentize-py-$COMPONENTIZE_PY_VERSION"
if stale "$out/hello-py.wasm" "$src/hello-py"; then
  if [[ ! -x "$py_prefix/bin/componentize-py" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$py_prefix" \
      "componentize-py==$COMPONENTIZE_PY_VERSION"
  fi
  # The wasi:http WIT (0.2.12) ships in the wasmtime-wasi-http crate the host builds
  # against: the guest's world is exactly what the host implements.
  wit="$(cd "$root" && cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "wasmtime-wasi-http":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "wit"))
        break')"
  [[ -d "$wit" ]] || { echo "components: wasmtime-wasi-http WIT not found" >&2; exit 1; }
  build_py() {
    (cd "$src/hello-py" && PYTHONPATH="$py_prefix" "$py_prefix/bin/componentize-py" \
      -d "$wit" -w wasi:http/proxy@0.2.12 componentize app -o "$out/hello-py.wasm" >/dev/null)
  }
  timed hello-py build_py
fi

for g in "${rust_guests[@]}" hello-js hello-py; do
  printf 'components: %-10s %9d bytes\n' "$g" "$(stat -c %s "$out/$g.wasm")"
done

#!/usr/bin/env bash
# Builds the WASI-HTTP components in guests/components/ (function backends exporting
# wasi:http/incoming-handler) to guests/out/NAME.wasm:
#   *-rs      Rust crates for wasm32-wasip2 (the `wasi` crate's wasi:http bindings):
#             hello, echo, fetch, stream, work, kv (state); the hostile loop, bomb and misbehave
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

# The wasi:http WIT (0.2.12) ships in the wasmtime-wasi-http crate the host builds against:
# a guest's world is exactly what the host implements.
wasi_http_wit() {
  local dir
  dir="$(cd "$root" && cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "wasmtime-wasi-http":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "wit"))
        break')"
  [[ -d "$dir" ]] || { echo "components: wasmtime-wasi-http WIT not found" >&2; exit 1; }
  echo "$dir"
}

# --- Rust (wasm32-wasip2) ---
rust_guests=(hello-rs echo-rs fetch-rs stream-rs work-rs loop-rs bomb-rs misbehave-rs kv-rs)
need_rust=0
for g in "${rust_guests[@]}"; do
  stale "$out/$g.wasm" "$src/$g" "$src/Cargo.toml" "$root/wit" && need_rust=1
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
  # StarlingMonkey (in componentize-js 0.23) exports wasi:http/incoming-handler@0.2.10#handle,
  # so the world it is built against must name 0.2.10: the host's WIT with its version
  # rewritten, less the one function 0.2.12 added (cli exit-with-code, `@since` gated);
  # the host accepts any 0.2.x.
  js_wit="$tools/wit/wasi-http-0.2.10"
  rm -rf "$js_wit" && mkdir -p "$js_wit"
  cp -r "$(wasi_http_wit)"/. "$js_wit"/
  find "$js_wit" -name '*.wit' -exec sed -i -e '/@since(version = 0\.2\.1[12])/,+1d' \
    -e 's/@0\.2\.12/@0.2.10/g' {} +
  timed hello-js node "$src/componentize.mjs" "$npm_prefix" "$src/hello-js/hello.js" \
    "$out/hello-js.wasm" "$js_wit" "wasi:http/proxy@0.2.10"
fi

# --- Python (componentize-py) ---
py_prefix="$tools/py/componentize-py-$COMPONENTIZE_PY_VERSION"
if stale "$out/hello-py.wasm" "$src/hello-py"; then
  if [[ ! -x "$py_prefix/bin/componentize-py" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$py_prefix" \
      "componentize-py==$COMPONENTIZE_PY_VERSION"
  fi
  wit="$(wasi_http_wit)"
  build_py() {
    (cd "$src/hello-py" && PYTHONPATH="$py_prefix" "$py_prefix/bin/componentize-py" \
      -d "$wit" -w wasi:http/proxy@0.2.12 componentize app -o "$out/hello-py.wasm" >/dev/null)
  }
  timed hello-py build_py
fi

for g in "${rust_guests[@]}" hello-js hello-py; do
  printf 'components: %-10s %9d bytes\n' "$g" "$(stat -c %s "$out/$g.wasm")"
done

# Shared helpers for the scripts: install what is missing, nothing more.

# ensure_packages CMD... : apt-get install the Debian packages providing missing commands.
ensure_packages() {
  local missing=()
  for cmd in "$@"; do
    present "$cmd" && continue
    # one command can need several packages: each must be its own apt-get argument
    local pkgs
    read -ra pkgs <<<"$(pkg_for "$cmd")"
    missing+=("${pkgs[@]}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# present CMD: the command is there, with what the scripts need of it (nginx: its njs
# module, which a plain `apt-get install nginx` does not bring).
present() {
  command -v "$1" >/dev/null 2>&1 || return 1
  case "$1" in
    nginx) [ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] ;;
    *) return 0 ;;
  esac
}

# pkg_for CMD: the Debian packages (space-separated) that provide CMD.
pkg_for() {
  case "$1" in
    nginx) echo "nginx libnginx-mod-http-js" ;;
    *) echo "$1" ;;
  esac
}

# One target dir for the demo, tests and benchmarks, outside the clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wasmgate-target}"

# build_release: the guests, the gateway and the demo upstream in release; sets $bin to
# the gateway binary and $upstream_bin to the demo upstream (examples/demo_upstream).
# Cargo's progress stays visible: a first build takes minutes and must not look stuck.
build_release() {
  [ -x "$CARGO_TARGET_DIR/release/wasmgate" ] ||
    echo "first build into $CARGO_TARGET_DIR: this takes several minutes" >&2
  scripts/build-guests.sh >/dev/null
  scripts/build-components.sh >/dev/null
  cargo build --release
  # on its own: built together, the example's dev-dependencies would change the gateway's
  cargo build --release --example demo_upstream
  bin="$CARGO_TARGET_DIR/release/wasmgate"
  upstream_bin="$CARGO_TARGET_DIR/release/examples/demo_upstream"
}

ensure_rust_targets() {
  rustup target add wasm32-wasip1 wasm32-wasip2 >/dev/null 2>&1 || true
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [SECONDS]: until something listens on 127.0.0.1:PORT (10 s at most by
# default; a gateway that compiles JavaScript and Python components on a machine with no
# artifacts yet takes longer)
wait_port() {
  for _ in $(seq 1 $(( ${2:-10} * 20 ))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 never opened" >&2
  exit 1
}

# with_scratch: a temp dir in $tmp and a list $pids for the processes the script starts;
# on exit those processes are stopped (by their PID, nothing else) and the dir removed.
with_scratch() {
  tmp="$(mktemp -d)"
  pids=()
  trap cleanup_scratch EXIT
}
cleanup_scratch() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # a graceful shutdown gets 5 s; whatever still runs then is killed (Pingora's default
  # grace period is 5 minutes, and a failing script must not leave servers behind)
  for _ in $(seq 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}

# ensure_wasmtime_cli: the reference `wasmtime serve` (wasmtime-cli 48.0.8), installed
# once into the tools cache (several minutes); prints its path
ensure_wasmtime_cli() {
  local root="${WASMGATE_TOOLS:-$HOME/.cache/wasmgate-tools}/wasmtime"
  if [ ! -x "$root/bin/wasmtime" ]; then
    echo "installing wasmtime-cli 48.0.8 (once, several minutes)" >&2
    cargo install --quiet --locked wasmtime-cli --version 48.0.8 --root "$root" \
      --target-dir "$CARGO_TARGET_DIR/wasmtime-cli" >&2
  fi
  echo "$root/bin/wasmtime"
}

# proxy_routes PORT UPSTREAM_PORT KEY: a listener, one upstream, a plain proxy route
# (/plain) and an API-key hook route (/key, key KEY): what every gateway the benchmarks
# compare serves alike
proxy_routes() {
  cat <<CONF
[[listeners]]
listen = "127.0.0.1:$1"
[upstreams.up]
targets = ["127.0.0.1:$2"]
[modules.key]
path = "$root/guests/out/api_key_auth.wasm"
config = { keys = ["$3"] }
[[routes]]
path_prefix = "/plain"
upstream = "up"
[[routes]]
path_prefix = "/key"
upstream = "up"
hooks = ["key"]
CONF
}

# proxy_conf FILE PORT UPSTREAM_PORT DATA_DIR KEY THREADS [SERVER_LINES]: a gateway conf
# of proxy_routes only, no admin API, no metrics; SERVER_LINES go into [server] (e.g.
# "fast_path = false").
proxy_conf() {
  {
    cat <<CONF
[server]
threads = $6
data_dir = "$4"
watch_config = false
${7:-}
[metrics]
listen = ""
[admin]
listen = ""
CONF
    proxy_routes "$2" "$3" "$5"
  } >"$1"
}

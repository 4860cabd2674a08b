# Shared helpers for the scripts: install what is missing, nothing more.

# ensure_packages CMD... : apt-get install the Debian packages providing missing commands.
ensure_packages() {
  local missing=()
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$(pkg_for "$cmd")")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

pkg_for() {
  case "$1" in
    nginx) echo "nginx libnginx-mod-http-js" ;;
    *) echo "$1" ;;
  esac
}

ensure_rust_targets() {
  rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
}

//! Writes hostile Proxy-Wasm modules for `scripts/soak.sh` into a folder: a callback that
//! loops forever, a memory bomb, deep recursion, a trap, and a 10 MB local response.
//!
//!     cargo run --release --example hostile -- OUT_DIR

fn module(on_request_headers: &str, pages: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $recurse (param i32) (result i32) (call $recurse (i32.add (local.get 0) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    {on_request_headers}
    (i32.const 0)))"#
    ))
    .expect("valid WAT")
}

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    std::fs::create_dir_all(&out).expect("out dir");
    let cases = [
        ("loop", module("(loop $l (br $l))", 1)),
        ("bomb", module("(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable", 1)),
        ("recurse", module("(drop (call $recurse (i32.const 0)))", 1)),
        ("trap", module("unreachable", 1)),
        ("huge", module("(drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 10485760) (i32.const 0) (i32.const 0) (i32.const -1))) (return (i32.const 1))", 161)),
    ];
    for (name, bytes) in cases {
        std::fs::write(out.join(format!("{name}.wasm")), bytes).expect("write");
    }
}

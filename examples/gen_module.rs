//! Writes a Proxy-Wasm module of about the given size in bytes, made of real code (many
//! functions), that answers every request with a local response `big` (or the body
//! given). Used by `scripts/bench.sh` to time deploys of a large module, and (size 0,
//! a body to replace in the bytes) to tell one deployed version from the next.
//!
//!     cargo run --release --example gen_module -- 1048576 big.wasm [BODY]

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let out = args.next().unwrap_or_else(|| "big.wasm".into());
    let body = args.next().unwrap_or_else(|| "big".into());
    let mut wat = format!(
        r#"(module
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{body}")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 64) (i32.const {len}) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
"#,
        len = body.len()
    );
    // each function is ~75 bytes of code; all are compiled (wasmtime compiles every
    // function), none runs: the request path stays as cheap as the small module's
    let n = size / 75;
    for i in 0..n {
        let next = if i + 1 < n {
            format!("(call $f{} (local.get $x))", i + 1)
        } else {
            "(local.get $x)".into()
        };
        wat.push_str(&format!(
            "  (func $f{i} (param $x i32) (result i32) (local $y i32)\n    (local.set $y (i32.mul (local.get $x) (i32.const {m})))\n    (local.set $y (i32.xor (local.get $y) (i32.const {k})))\n    (local.set $y (i32.add (local.get $y) (i32.rotl (local.get $y) (i32.const 7))))\n    (if (result i32) (i32.gt_u (local.get $y) (i32.const {k}))\n      (then {next})\n      (else (i32.sub (local.get $y) (i32.const {m})))))\n",
            m = 2 * i + 3,
            k = 7919 * i + 13,
        ));
    }
    wat.push_str(")\n");
    let bytes = wat::parse_str(&wat).expect("valid WAT");
    std::fs::write(&out, &bytes).expect("write module");
    eprintln!("{out}: {} bytes", bytes.len());
}

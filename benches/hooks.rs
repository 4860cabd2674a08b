//! Hook costs without the network: one request's hook chain (request headers in, one
//! header added, continue, then log/done/delete) on a pooled VM and on a fresh instance;
//! single host calls (`proxy_get_header_map_value`, `proxy_send_local_response`); and the
//! cost of a budgeted wasm call with fuel, with epoch interruption, and with neither, which
//! is the measurement behind choosing fuel.
//!
//! Needs the guests built (`scripts/build-guests.sh`); `scripts/bench.sh` does that.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;
use std::sync::Arc;
use std::time::Duration;
use wasmgate::metrics::Metrics;
use wasmgate::wasm::Isolation;
use wasmgate::wasm::{
    Compilers, FailurePolicy, FilterLimits, Outcome, Plugin, PluginSpec, RequestInfo, Runtime, Tier,
};

fn spec(name: &str, config: &str, isolation: Isolation) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        tenant: "bench".into(),
        root_id: String::new(),
        config: config.as_bytes().to_vec(),
        vm_config: Vec::new(),
        isolation,
        policy: FailurePolicy::Deny(503),
        limits: FilterLimits {
            budget: Duration::from_millis(5),
            request_budget: Duration::from_millis(20),
            memory_bytes: 16 << 20,
            max_instances: 4,
            min_tick: Duration::from_millis(10),
        },
        allowed_upstreams: Vec::new(),
    }
}

fn request() -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/api/orders?x=1", None).unwrap();
    r.insert_header("host", "example.com").unwrap();
    r.insert_header("user-agent", "bench").unwrap();
    r.insert_header("x-api-key", "k1").unwrap();
    r
}

/// One request through one module: headers, then the end of the HTTP context. The
/// header map is reused so that building it is not counted (the hook's insert is
/// idempotent).
fn one_request(p: &Arc<Plugin>, req: &mut RequestHeader) {
    let mut lease = p.try_lease().expect("lease");
    let mut info = RequestInfo::default();
    match lease.on_request_headers(req, &mut info, true) {
        Outcome::Continue => {}
        other => panic!("unexpected outcome {other:?}"),
    }
    lease.finish(Some(req), None, &mut info);
    black_box(&req);
}

const PROBE_WAT: &str = r#"(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "x-api-key")
  (data (i32.const 32) "hello")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    ;; a bump allocator that wraps, so the loop never runs out of memory
    (if (i32.gt_u (global.get $heap) (i32.const 60000)) (then (global.set $heap (i32.const 4096))))
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $n))))
  (func (export "proxy_on_context_create") (param i32 i32))
  ;; on_request_headers: 1000 header reads when $n is even, 1000 local responses when odd
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $i i32)
    (loop $l
      (if (i32.and (local.get $eos) (i32.const 1))
        (then (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 32) (i32.const 5) (i32.const 0) (i32.const 0) (i32.const -1))))
        (else (drop (call $get (i32.const 0) (i32.const 16) (i32.const 9) (i32.const 64) (i32.const 68)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1000))))
    (i32.const 0))
)"#;

fn bench(c: &mut Criterion) {
    // the runtime path: a bench binary built by another checkout sharing the target dir
    // keeps that checkout's compile-time path
    let repo = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let guests = repo.join("guests/out");
    let rewrite = std::fs::read(guests.join("rewrite.wasm"))
        .expect("guests/out/rewrite.wasm missing: run scripts/build-guests.sh");
    let metrics = Metrics::new();
    let rt = Runtime::new(false).unwrap();
    let cfg = r#"{"request":{"set_headers":{"x-added":"1"}}}"#;
    let pooled = rt
        .plugin(spec("pooled", cfg, Isolation::Shared), &rewrite, &metrics)
        .unwrap();
    let fresh = rt
        .plugin(spec("fresh", cfg, Isolation::Request), &rewrite, &metrics)
        .unwrap();
    if !fresh.snapshotted() {
        eprintln!("rewrite.wasm has no snapshot: fresh_instance runs its start");
    }
    // the same instantiated anew for every request (no renewal)
    let mut unrenewed = Runtime::new(false).unwrap();
    unrenewed.set_renewal(false);
    let instantiated = unrenewed
        .plugin(
            spec("instantiated", cfg, Isolation::Request),
            &rewrite,
            &metrics,
        )
        .unwrap();
    // the same without a snapshot: every instance runs the module's start
    let mut unsnapped = Runtime::new(false).unwrap();
    unsnapped.set_snapshots(false);
    let started = unsnapped
        .plugin(spec("started", cfg, Isolation::Request), &rewrite, &metrics)
        .unwrap();

    let mut g = c.benchmark_group("hook_chain");
    let mut req = request();
    g.bench_function("pooled_vm", |b| b.iter(|| one_request(&pooled, &mut req)));
    g.bench_function("fresh_instance", |b| {
        b.iter(|| one_request(&fresh, &mut req))
    });
    assert!(fresh.renewals() > 0, "fresh_instance renewed no VM");
    g.bench_function("fresh_instance_instantiated", |b| {
        b.iter(|| one_request(&instantiated, &mut req))
    });
    g.bench_function("fresh_instance_started", |b| {
        b.iter(|| one_request(&started, &mut req))
    });
    g.finish();

    let probe = wat::parse_str(PROBE_WAT).unwrap();
    let p = rt
        .plugin(spec("calls", "", Isolation::Shared), &probe, &metrics)
        .unwrap();
    let mut g = c.benchmark_group("host_call_x1000");
    for (name, eos) in [
        ("get_header_map_value", false),
        ("send_local_response", true),
    ] {
        let mut req = request();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut lease = p.try_lease().unwrap();
                let mut info = RequestInfo::default();
                black_box(lease.on_request_headers(&mut req, &mut info, eos));
            })
        });
    }
    g.finish();

    tiers(c, &guests);
    interruption(c);
}

/// The JWT guest (an SDK-built HS256 check) verifying one valid token per request on a
/// pooled VM, on optimized (Cranelift) and on baseline (Winch) code: what a module costs
/// while it serves on baseline code after a cold deploy. And what compiling it costs on
/// each tier.
fn tiers(c: &mut Criterion, guests: &std::path::Path) {
    use base64::Engine as _;
    use hmac::Mac;
    let jwt = std::fs::read(guests.join("jwt_auth.wasm")).expect("guests/out/jwt_auth.wasm");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(br#"{"sub":"bench","exp":4102444800}"#)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"bench-secret").unwrap();
    mac.update(signed.as_bytes());
    let token = format!("{signed}.{}", b64(&mac.finalize().into_bytes()));
    let mut req = request();
    req.insert_header("authorization", format!("Bearer {token}"))
        .unwrap();
    let metrics = Metrics::new();
    let cfg = r#"{"secret":"bench-secret"}"#;
    let mut g = c.benchmark_group("jwt_tier");
    for (name, compilers, tier) in [
        ("optimized", Compilers::Optimized, Tier::Optimized),
        ("baseline", Compilers::Baseline, Tier::Baseline),
    ] {
        let rt = Runtime::with_compilers(false, compilers).unwrap();
        let p = rt
            .plugin(spec(name, cfg, Isolation::Shared), &jwt, &metrics)
            .unwrap();
        assert_eq!(p.compiled.tier(), tier);
        g.bench_function(name, |b| b.iter(|| one_request(&p, &mut req)));
    }
    g.finish();
    // compiling a module not seen before (a new runtime each time: nothing cached)
    let mut g = c.benchmark_group("compile_jwt");
    g.sample_size(10);
    for (name, compilers) in [
        ("optimized", Compilers::Optimized),
        ("baseline", Compilers::Baseline),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || Runtime::with_compilers(false, compilers).unwrap(),
                |rt| black_box(rt.compile(&jwt).unwrap()),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// The same small loop called on three engines: no interruption, fuel, epochs.
fn interruption(c: &mut Criterion) {
    let wat = r#"(module (func (export "run") (param $n i32) (result i32)
        (local $acc i32)
        (loop $l
          (local.set $acc (i32.add (local.get $acc) (local.get $n)))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br_if $l (i32.gt_s (local.get $n) (i32.const 0))))
        (local.get $acc)))"#;
    let mut g = c.benchmark_group("budget_mechanism_call_100_iterations");
    for mode in ["none", "fuel", "epoch"] {
        let mut cfg = wasmtime::Config::new();
        match mode {
            "fuel" => {
                cfg.consume_fuel(true);
            }
            "epoch" => {
                cfg.epoch_interruption(true);
            }
            _ => {}
        }
        let engine = wasmtime::Engine::new(&cfg).unwrap();
        let module = wasmtime::Module::new(&engine, wat).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let inst = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let run = inst.get_typed_func::<i32, i32>(&mut store, "run").unwrap();
        g.bench_function(mode, |b| {
            b.iter(|| {
                match mode {
                    "fuel" => store.set_fuel(1_000_000).unwrap(),
                    "epoch" => store.set_epoch_deadline(1),
                    _ => {}
                }
                black_box(run.call(&mut store, black_box(100)).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

//! Function backends in-process: a fresh component instance per request (instantiate +
//! handle one GET + drop, the body read to its end) for the Rust, JavaScript and Python
//! hello components, with the CPU budget metered by epochs (the runtime's choice) and, to
//! measure that choice, by fuel; plus echo-rs uppercasing 1 MiB (body streams) and
//! work-rs running 2M PRNG rounds (pure compute, where the mechanism's cost shows). The figures are `component_rust_request_us` and
//! `component_js_request_us` (the `epoch` rows).
//!
//! Needs the components built (`scripts/build-components.sh`); skips those that are not.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::BodyExt;
use std::time::Duration;
use wasmgate::wasm::component::{body, ComponentRuntime, CpuBudget, Function, Io};

fn guest(name: &str) -> Option<Vec<u8>> {
    // the run's checkout: a binary built by another checkout sharing the target dir keeps
    // that checkout's compile-time path
    let repo = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let path = format!("{repo}/guests/out/{name}.wasm");
    let bytes = std::fs::read(&path).ok();
    if bytes.is_none() {
        eprintln!("SKIP: {path} is not built; run scripts/build-components.sh");
    }
    bytes
}

/// Bytes echo-rs uppercases per request: compute-bound guest work, where the cost of the
/// budget mechanism shows (the hello requests are mostly instantiation).
const ECHO_BYTES: usize = 1 << 20;

/// Rounds of work-rs's PRNG per request: a few milliseconds of pure guest compute.
const WORK_PATH: &str = "/?n=2000000";

async fn one_request(f: &Function, path: &str, payload: &Bytes) {
    let request = hyper::Request::builder()
        .method(if payload.is_empty() { "GET" } else { "POST" })
        .uri(format!("http://fn.example{path}"))
        .body(body::full(payload.clone()))
        .unwrap();
    let response = f.handle(request, Io::default()).await.expect("answers");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
}

fn bench(c: &mut Criterion) {
    // One thread, as one gateway thread would serve them.
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (budget, label) in [(CpuBudget::Epoch, "epoch"), (CpuBudget::Fuel, "fuel")] {
        let runtime = ComponentRuntime::with_budget(budget).expect("runtime");
        let mut g = c.benchmark_group(format!("component_request_{label}"));
        let echo = Bytes::from(vec![b'a'; ECHO_BYTES]);
        for (name, id, path, payload) in [
            ("hello-rs", "rust", "/", Bytes::new()),
            ("hello-js", "js", "/", Bytes::new()),
            ("hello-py", "py", "/", Bytes::new()),
            ("echo-rs", "echo_1mb", "/", echo),
            ("work-rs", "work_2m_rounds", WORK_PATH, Bytes::new()),
        ] {
            let Some(bytes) = guest(name) else { continue };
            let f = runtime.compile(&bytes).expect("compiles");
            g.bench_function(id, |b| {
                b.iter(|| tokio.block_on(one_request(&f, path, &payload)))
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

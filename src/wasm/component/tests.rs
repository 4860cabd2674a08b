//! In-process tests of the component runtime against the guests in guests/components/,
//! built to guests/out/ by scripts/build-components.sh (scripts/test.sh runs it first).

use super::*;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn runtime() -> &'static ComponentRuntime {
    static RUNTIME: OnceLock<ComponentRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| ComponentRuntime::new().expect("component runtime"))
}

/// The built guest's bytes, or `None` (and a message) when the guests are not built.
fn guest(name: &str) -> Option<Vec<u8>> {
    // the run's checkout: a binary built by another checkout sharing the target dir keeps
    // that checkout's compile-time path
    let repo = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let path = format!("{repo}/guests/out/{name}.wasm");
    // scripts/test.sh builds them: a missing guest is a failure, never a silent pass
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) => panic!("{path}: {e}; run scripts/build-components.sh"),
    }
}

/// The guest compiled once per test binary (the JS and Python ones take seconds), with
/// `limits`.
fn function(name: &str, limits: Limits) -> Option<Arc<Function>> {
    static COMPILED: OnceLock<Mutex<HashMap<String, Arc<Function>>>> = OnceLock::new();
    let compiled = COMPILED.get_or_init(Default::default);
    if let Some(f) = compiled.lock().unwrap().get(name) {
        return Some(f.with_limits(limits));
    }
    let bytes = guest(name)?;
    let start = Instant::now();
    let f = runtime().compile(&bytes).expect("compiles");
    eprintln!(
        "{name}: {} bytes compiled in {:?}",
        bytes.len(),
        start.elapsed()
    );
    compiled.lock().unwrap().insert(name.into(), f.clone());
    Some(f.with_limits(limits))
}

fn get(path: &str) -> hyper::Request<HyperIncomingBody> {
    hyper::Request::builder()
        .uri(format!("http://fn.example{path}"))
        .body(body::empty())
        .unwrap()
}

async fn text(response: hyper::Response<HyperOutgoingBody>) -> (u16, String) {
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The failure of a GET that must fail.
async fn fails(f: &Function) -> Failure {
    match f.handle(get("/"), Io::default()).await {
        Ok(response) => panic!("answered {}", response.status()),
        Err(failure) => failure,
    }
}

type Lines = Arc<Mutex<Vec<(Stdio, String)>>>;

/// An `Io` whose sink keeps the lines.
fn capture() -> (Io, Lines) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let kept = lines.clone();
    let io = Io {
        sink: Arc::new(move |stream, line: &str| kept.lock().unwrap().push((stream, line.into()))),
        ..Io::default()
    };
    (io, lines)
}

async fn answers(name: &str, expected: &str) {
    let Some(f) = function(name, Limits::default()) else {
        return;
    };
    let response = f.handle(get("/"), Io::default()).await.expect("answers");
    assert_eq!(text(response).await, (200, expected.to_string()));
}

#[tokio::test]
async fn hello_rust_answers() {
    answers("hello-rs", "hello from rust\n").await;
}

#[tokio::test]
async fn hello_js_answers() {
    answers("hello-js", "hello from js\n").await;
}

#[tokio::test]
async fn hello_python_answers() {
    answers("hello-py", "hello from python\n").await;
}

#[tokio::test]
async fn handler_export_versions_are_accepted() {
    for name in ["hello-rs", "hello-js", "hello-py"] {
        let Some(f) = function(name, Limits::default()) else {
            return;
        };
        assert!(
            f.handler_export().starts_with(INCOMING_HANDLER),
            "{name}: {}",
            f.handler_export()
        );
        eprintln!("{name} exports {}", f.handler_export());
    }
}

#[tokio::test]
async fn echo_reads_the_body_and_answers_it_uppercased() {
    let Some(f) = function("echo-rs", Limits::default()) else {
        return;
    };
    let body = "a body\n".repeat(2000);
    let request = hyper::Request::builder()
        .method("POST")
        .uri("http://fn.example/echo")
        .body(body::full(body.clone()))
        .unwrap();
    let response = f.handle(request, Io::default()).await.expect("answers");
    assert_eq!(text(response).await, (200, body.to_uppercase()));
}

#[tokio::test]
async fn fresh_instances_serve_consecutive_requests() {
    let Some(f) = function("hello-js", Limits::default()) else {
        return;
    };
    for _ in 0..3 {
        let response = f.handle(get("/"), Io::default()).await.expect("answers");
        assert_eq!(text(response).await.1, "hello from js\n");
    }
    assert_eq!(f.available_instances(), f.limits().max_instances);
}

#[test]
fn a_core_module_is_refused_with_the_reason() {
    let core = wat::parse_str("(module (func (export \"proxy_on_memory_allocate\")))").unwrap();
    let err = runtime().compile(&core).err().expect("refused");
    assert_eq!(err, "a core module, not a component");
}

#[test]
fn a_component_without_the_handler_is_refused_naming_its_exports() {
    let component = wat::parse_str(
        "(component (core module $m) (export \"wasi:cli/run@0.2.0\" (core module $m)))",
    )
    .unwrap();
    let err = runtime().compile(&component).err().expect("refused");
    assert!(
        err.contains("without a wasi:http/incoming-handler@0.2.x export"),
        "{err}"
    );
    assert!(err.contains("wasi:cli/run@0.2.0"), "{err}");
    let empty = wat::parse_str("(component)").unwrap();
    let err = runtime().compile(&empty).err().expect("refused");
    assert!(err.ends_with("(it exports nothing)"), "{err}");
    assert!(runtime().compile(b"not wasm").is_err());
}

/// loop-rs under `limits`: how it failed, and after how long.
async fn spin(limits: Limits) -> (Failure, Duration) {
    let f = function("loop-rs", limits).expect("built");
    let start = Instant::now();
    (fails(&f).await, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_overruns_its_cpu_budget() {
    let (failure, took) = spin(Limits {
        cpu: Duration::from_millis(50),
        ..Limits::default()
    })
    .await;
    assert_eq!(failure, Failure::Overrun);
    // 50 ticks of 1 ms, plus scheduling slack on a busy machine.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    eprintln!("loop overran its 50 ms budget after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_misses_its_deadline_when_the_deadline_is_shorter() {
    let (failure, took) = spin(Limits {
        cpu: Duration::from_secs(30),
        deadline: Duration::from_millis(100),
        ..Limits::default()
    })
    .await;
    assert_eq!(failure, Failure::Deadline);
    assert!(took < Duration::from_millis(1000), "took {took:?}");
}

#[tokio::test]
async fn a_memory_bomb_hits_its_memory_limit() {
    let limits = Limits {
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    let Some(f) = function("bomb-rs", limits) else {
        return;
    };
    let failure = fails(&f).await;
    assert_eq!(failure, Failure::Memory);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_function_is_busy() {
    let limits = Limits {
        cpu: Duration::from_millis(300),
        max_instances: 1,
        ..Limits::default()
    };
    let Some(f) = function("loop-rs", limits) else {
        return;
    };
    let first = tokio::spawn({
        let f = f.clone();
        async move { f.handle(get("/"), Io::default()).await.err() }
    });
    // Until the first instance ends, its slot is taken.
    while f.available_instances() > 0 && !first.is_finished() {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        f.handle(get("/"), Io::default()).await.err(),
        Some(Failure::Busy)
    );
    assert_eq!(first.await.unwrap(), Some(Failure::Overrun));
    assert_eq!(f.available_instances(), 1);
}

#[tokio::test]
async fn stdout_lines_reach_the_sink() {
    for (name, line) in [
        ("hello-rs", "hello-rs: /logged?x=1"),
        ("hello-js", "hello-js: /logged"),
        ("hello-py", "hello-py: /logged?x=1"),
    ] {
        let Some(f) = function(name, Limits::default()) else {
            return;
        };
        let (io, lines) = capture();
        let response = f.handle(get("/logged?x=1"), io).await.expect("answers");
        text(response).await;
        let lines = lines.lock().unwrap().clone();
        assert!(
            lines
                .iter()
                .any(|(stream, l)| *stream == Stdio::Stdout && l == line),
            "{name}: {lines:?}"
        );
    }
}

#[tokio::test]
async fn outgoing_http_to_an_authority_not_allowed_is_denied() {
    let Some(f) = function("fetch-rs", Limits::default()) else {
        return;
    };
    let allowed = |authority: &str| (authority == "backend").then(|| Outgoing::to("127.0.0.1:9"));
    let io = Io {
        outgoing: Arc::new(allowed),
        ..Io::default()
    };
    let response = f.handle(get("/?evil.example"), io).await.expect("answers");
    assert_eq!(
        text(response).await,
        (200, "error ErrorCode::HttpRequestDenied\n".into())
    );
}

/// A listener on a free loopback port, and its address.
async fn local_listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    (listener, address)
}

#[tokio::test]
async fn outgoing_http_to_an_allowed_upstream_reaches_its_address() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(f) = function("fetch-rs", Limits::default()) else {
        return;
    };
    let (listener, address) = local_listener().await;
    let upstream = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = vec![0; 4096];
        let n = conn.read(&mut head).await.unwrap();
        conn.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&head[..n]).into_owned()
    });
    let io = Io {
        outgoing: Arc::new(move |authority: &str| {
            (authority == "backend").then(|| Outgoing::to(address.clone()))
        }),
        ..Io::default()
    };
    let response = f.handle(get("/?backend"), io).await.expect("answers");
    assert_eq!(text(response).await, (200, "status 204\n".into()));
    let head = upstream.await.unwrap().to_ascii_lowercase();
    assert!(head.contains("host: backend"), "{head}");
}

#[test]
fn wasm_kind_reads_the_preamble() {
    assert_eq!(
        wasm_kind(&wat::parse_str("(module)").unwrap()),
        Some(Kind::Core)
    );
    assert_eq!(
        wasm_kind(&wat::parse_str("(component)").unwrap()),
        Some(Kind::Component)
    );
    assert_eq!(wasm_kind(b"\0asm"), None);
}

#[test]
fn budgets_round_up_to_ticks() {
    assert_eq!(ticks(Duration::from_micros(1)), 1);
    assert_eq!(ticks(Duration::from_millis(50)), 50);
    assert_eq!(ticks(Duration::ZERO), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_returns_before_the_body_and_events_arrive_as_written() {
    let Some(f) = function("stream-rs", Limits::default()) else {
        return;
    };
    let start = Instant::now();
    let response = f.handle(get("/"), Io::default()).await.expect("answers");
    let headers_after = start.elapsed();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            arrivals.push((start.elapsed(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    let text: String = arrivals.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(text, "event 0\nevent 1\nevent 2\n");
    // The guest sleeps 100 ms between events: the head and the first event come before
    // the first sleep ends, the last event after the second.
    assert!(
        headers_after < Duration::from_millis(100),
        "head after {headers_after:?}"
    );
    assert!(arrivals[0].0 < Duration::from_millis(100), "{arrivals:?}");
    assert!(
        arrivals.last().unwrap().0 >= Duration::from_millis(200),
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn a_panic_is_a_trap_and_a_silent_guest_is_no_response() {
    let Some(f) = function("misbehave-rs", Limits::default()) else {
        return;
    };
    let panic = f.handle(get("/panic"), Io::default()).await.err();
    assert!(matches!(panic, Some(Failure::Trap(_))), "{panic:?}");
    let silent = f.handle(get("/silent"), Io::default()).await.err();
    assert_eq!(silent, Some(Failure::NoResponse));
    assert_eq!(f.available_instances(), f.limits().max_instances);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_metering_overruns_too() {
    let Some(bytes) = guest("loop-rs") else {
        return;
    };
    let runtime = ComponentRuntime::with_budget(CpuBudget::Fuel).expect("runtime");
    let limits = Limits {
        cpu: Duration::from_millis(50),
        ..Limits::default()
    };
    let f = runtime.compile_with(&bytes, limits).expect("compiles");
    let start = Instant::now();
    assert_eq!(fails(&f).await, Failure::Overrun);
    eprintln!("fuel for 50 ms ran out after {:?}", start.elapsed());
}

/// An `Io` whose `on_end` hands the outcome over.
fn outcome_channel() -> (Io, tokio::sync::mpsc::UnboundedReceiver<Outcome>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let io = Io {
        on_end: Some(Arc::new(move |outcome: &Outcome| {
            let _ = tx.send(outcome.clone());
        })),
        ..Io::default()
    };
    (io, rx)
}

#[tokio::test]
async fn the_outcome_reports_what_an_instance_used() {
    let Some(f) = function("hello-js", Limits::default()) else {
        return;
    };
    let (io, mut outcomes) = outcome_channel();
    let response = f.handle(get("/"), io).await.expect("answers");
    text(response).await;
    let outcome = outcomes.recv().await.expect("reported");
    assert_eq!(outcome.result, Ok(()));
    assert!(outcome.peak_memory > 1 << 20, "{outcome:?}");
    assert!(outcome.wall > Duration::ZERO);
    eprintln!("hello-js outcome: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_after_the_response_ends_the_body_and_is_reported() {
    let limits = Limits {
        deadline: Duration::from_millis(150),
        ..Limits::default()
    };
    let Some(f) = function("stream-rs", limits) else {
        return;
    };
    let (io, mut outcomes) = outcome_channel();
    let response = f.handle(get("/"), io).await.expect("the head comes first");
    let mut body = response.into_body();
    let mut received = String::new();
    let mut ended_with_error = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    received.push_str(&String::from_utf8_lossy(&data));
                }
            }
            Err(_) => {
                ended_with_error = true;
                break;
            }
        }
    }
    assert!(received.starts_with("event 0\nevent 1\n"), "{received:?}");
    assert!(!received.contains("event 2"), "{received:?}");
    assert!(ended_with_error, "the body must not look complete");
    let outcome = outcomes.recv().await.expect("reported");
    assert_eq!(outcome.result, Err(Failure::Deadline));
}

/// What `/count` says: how many requests the instance that served it has seen.
async fn count(f: &Function) -> String {
    let response = f
        .handle(get("/count"), Io::default())
        .await
        .expect("answers");
    let (status, body) = text(response).await;
    assert_eq!(status, 200);
    body
}

fn reusing(requests_per_instance: u32) -> Limits {
    Limits {
        requests_per_instance,
        memory_bytes: 64 << 20,
        ..Limits::default()
    }
}

#[tokio::test]
async fn fresh_instances_never_see_an_earlier_request() {
    let Some(f) = function("misbehave-rs", Limits::default()) else {
        return;
    };
    for _ in 0..3 {
        assert_eq!(count(&f).await, "1");
    }
}

#[tokio::test]
async fn a_reused_instance_serves_consecutive_requests_up_to_its_count() {
    let Some(f) = function("misbehave-rs", reusing(3)) else {
        return;
    };
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(count(&f).await);
    }
    assert_eq!(got, ["1", "2", "3", "1", "2", "3", "1"]);
    // another function from the same code has its own instances
    let Some(other) = function("misbehave-rs", reusing(3)) else {
        return;
    };
    assert_eq!(count(&other).await, "1");
    assert_eq!(count(&f).await, "2");
}

#[tokio::test]
async fn a_reused_instance_is_retired_after_a_trap_a_leak_or_growth() {
    let Some(f) = function("misbehave-rs", reusing(100)) else {
        return;
    };
    assert_eq!(count(&f).await, "1");
    assert_eq!(count(&f).await, "2");
    // a trap: never called again
    let panic = f.handle(get("/panic"), Io::default()).await.err();
    assert!(matches!(panic, Some(Failure::Trap(_))), "{panic:?}");
    assert_eq!(count(&f).await, "1");
    // (request, its answer, what the next /count says): a response body left open
    // retires the instance; memory below half the limit (64 MiB) keeps it, past it not
    for (path, answer, next) in [
        ("/leak", "leaked", "1"),
        ("/grow?4", "grown", "3"),
        ("/grow?40", "grown", "1"),
    ] {
        let response = f.handle(get(path), Io::default()).await.expect(path);
        assert_eq!(text(response).await, (200, answer.to_string()), "{path}");
        assert_eq!(count(&f).await, next, "after {path}");
    }
}

#[tokio::test]
async fn a_reused_instance_gets_each_request_its_own_budget_and_output() {
    let Some(f) = function("hello-rs", reusing(10)) else {
        return;
    };
    for path in ["/first", "/second"] {
        let (mut io, lines) = capture();
        let (tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
        io.on_end = Some(Arc::new(move |o: &Outcome| {
            let _ = tx.send(o.clone());
        }));
        let response = f.handle(get(path), io).await.expect("answers");
        assert_eq!(text(response).await.1, "hello from rust\n");
        let outcome = outcomes.recv().await.expect("reported");
        assert_eq!(outcome.result, Ok(()));
        assert!(outcome.cpu < Duration::from_millis(50), "{outcome:?}");
        let lines = lines.lock().unwrap().clone();
        assert_eq!(lines, [(Stdio::Stdout, format!("hello-rs: {path}"))]);
    }
}

/// One GET on `f` with its own sink: the answer, the lines, the outcome.
async fn traced(f: &Function, path: &str) -> ((u16, String), Vec<(Stdio, String)>, Outcome) {
    let (mut io, lines) = capture();
    let (tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    io.on_end = Some(Arc::new(move |o: &Outcome| {
        let _ = tx.send(o.clone());
    }));
    let response = f.handle(get(path), io).await.expect("answers");
    let answer = text(response).await;
    let mut outcome = outcomes.recv().await.expect("reported");
    // a replayed request reports its failed first try, then the one that answered
    while let Ok(next) = outcomes.try_recv() {
        outcome = next;
    }
    let lines = lines.lock().unwrap().clone();
    (answer, lines, outcome)
}

/// Python in reuse mode: each request is its own call (its own path in the log), served
/// by the same instance, far faster than the first.
#[tokio::test]
async fn python_instances_are_reused() {
    let Some(f) = function("hello-py", reusing(10)) else {
        return;
    };
    let mut walls = Vec::new();
    for path in ["/one", "/two", "/three"] {
        let (answer, lines, outcome) = traced(&f, path).await;
        assert_eq!(answer, (200, "hello from python\n".to_string()));
        assert_eq!(outcome.result, Ok(()));
        assert_eq!(lines, [(Stdio::Stdout, format!("hello-py: {path}"))]);
        walls.push(outcome.wall);
    }
    eprintln!("hello-py reused: {walls:?}");
    assert!(walls[2] * 4 < walls[0], "{walls:?}");
}

/// StarlingMonkey cannot serve a second request in one instance; the function turns
/// reuse off at the first such failure, replays that (bodiless) request on a fresh
/// instance, says so on its stderr, and every request is answered.
#[tokio::test]
async fn a_guest_that_cannot_be_reused_falls_back_to_fresh_instances() {
    let Some(f) = function("hello-js", reusing(10)) else {
        return;
    };
    let mut notices = 0;
    for path in ["/one", "/two", "/three", "/four"] {
        let (answer, lines, outcome) = traced(&f, path).await;
        assert_eq!(answer, (200, "hello from js\n".to_string()), "{path}");
        assert_eq!(outcome.result, Ok(()), "{path}");
        assert!(
            lines.contains(&(Stdio::Stdout, format!("hello-js: {path}"))),
            "{lines:?}"
        );
        notices += lines
            .iter()
            .filter(|(s, l)| *s == Stdio::Stderr && l.contains("instance reuse turned off"))
            .count();
    }
    assert_eq!(notices, 1);
}

/// Idle instances of all functions together stay within the runtime's cap, so reusing
/// functions cannot take the pool slots fresh instances need; those kept serve again.
#[tokio::test]
async fn idle_instances_stay_within_the_runtime_cap() {
    let Some(bytes) = guest("misbehave-rs") else {
        return;
    };
    let runtime = ComponentRuntime::new().expect("runtime").with_idle_cap(2);
    let f = runtime
        .compile_with(&bytes, reusing(100))
        .expect("compiles");
    let g = f.with_limits(reusing(100));
    // five requests at once on each function: ten instances alive, two kept
    let all = (0..5).flat_map(|_| [count(&f), count(&g)]);
    let seen = futures::future::join_all(all).await;
    assert!(seen.iter().all(|c| c == "1"), "{seen:?}");
    assert_eq!(runtime.idle_instances(), 2);
    let again = [count(&f).await, count(&g).await];
    assert!(again.iter().any(|c| c == "2"), "{again:?}");
    assert_eq!(runtime.idle_instances(), 2);
    drop((f, g));
    assert_eq!(runtime.idle_instances(), 0);
}

/// An upstream that accepts but never answers: the guest's call fails after the upstream's
/// read timeout (not wasmtime's default of 600 s), and a guest cannot ask for longer.
#[tokio::test]
async fn outgoing_http_waits_no_longer_than_the_upstreams_read_timeout() {
    // accepts, then says nothing
    let (listener, address) = local_listener().await;
    let silent = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(conn);
    });
    let Some(f) = function("fetch-rs", Limits::default()) else {
        return;
    };
    let io = Io {
        outgoing: Arc::new(move |_: &str| {
            Some(Outgoing {
                read_timeout: Duration::from_millis(300),
                ..Outgoing::to(address.clone())
            })
        }),
        ..Io::default()
    };
    let start = Instant::now();
    let response = f.handle(get("/?backend"), io).await.expect("answers");
    let (status, body) = text(response).await;
    let waited = start.elapsed();
    assert_eq!(status, 200);
    assert!(body.starts_with("error "), "{body}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?} {body}"
    );
    silent.abort();
}

#[test]
fn a_guests_request_options_cannot_extend_the_upstreams_timeouts() {
    let target = Outgoing {
        read_timeout: Duration::from_secs(2),
        ..Outgoing::to("127.0.0.1:1")
    };
    let asked = wasmtime_wasi_http::RequestOptions {
        connect_timeout: Some(Duration::from_millis(100)),
        first_byte_timeout: Some(Duration::from_secs(600)),
        between_bytes_timeout: None,
    };
    let o = target.options(Some(asked));
    assert_eq!(o.connect_timeout, Some(Duration::from_millis(100)));
    assert_eq!(o.first_byte_timeout, Some(Duration::from_secs(2)));
    assert_eq!(o.between_bytes_timeout, Some(Duration::from_secs(2)));
}

/// Baseline (Winch) code is limited as optimized code is: a loop overruns its CPU budget
/// under epochs and under fuel, misses a shorter deadline, and a memory bomb hits its
/// limit; the hellos of all three languages answer on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_code_answers_and_is_limited_as_optimized_code_is() {
    for budget in [CpuBudget::Epoch, CpuBudget::Fuel] {
        let runtime = ComponentRuntime::with_compilers(budget, Compilers::Baseline).unwrap();
        let compile = |name: &str, limits: Limits| {
            let f = runtime
                .compile_with(&guest(name).unwrap(), limits)
                .expect("compiles");
            assert_eq!(f.tier(), Tier::Baseline, "{name}");
            f
        };
        let spin = compile(
            "loop-rs",
            Limits {
                cpu: Duration::from_millis(50),
                ..Limits::default()
            },
        );
        let start = Instant::now();
        assert_eq!(fails(&spin).await, Failure::Overrun, "{budget:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "{budget:?}");
        if budget == CpuBudget::Fuel {
            continue; // the rest does not depend on the budget's mechanism
        }
        let late = spin.with_limits(Limits {
            cpu: Duration::from_secs(30),
            deadline: Duration::from_millis(100),
            ..Limits::default()
        });
        assert_eq!(fails(&late).await, Failure::Deadline);
        let bomb = compile(
            "bomb-rs",
            Limits {
                memory_bytes: 32 << 20,
                ..Limits::default()
            },
        );
        assert_eq!(fails(&bomb).await, Failure::Memory);
        for (name, says) in [
            ("hello-rs", "hello from rust\n"),
            ("hello-js", "hello from js\n"),
            ("hello-py", "hello from python\n"),
        ] {
            let f = compile(name, Limits::default());
            let response = f.handle(get("/"), Io::default()).await.expect(name);
            assert_eq!(text(response).await, (200, says.to_string()));
        }
    }
}

/// A component compiled nowhere yet goes live on baseline code; the background compiler
/// swaps optimized code in while requests keep coming (reused instances included), none
/// fails, and the optimized code is written as the artifact the next load takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_go_live_on_baseline_code_and_move_to_optimized_code_without_a_failure() {
    let bytes = guest("hello-rs").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("hello.cwasm");
    let runtime = ComponentRuntime::with_compilers(CpuBudget::Epoch, Compilers::Tiered).unwrap();
    let f = runtime
        .compile_cached(&bytes, reusing(1000), Some(&artifact))
        .expect("compiles");
    assert_eq!(f.tier(), Tier::Baseline);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut served = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let tier = f.tier();
                    let response = f.handle(get("/"), Io::default()).await.expect("answers");
                    assert_eq!(text(response).await, (200, "hello from rust\n".into()));
                    served += 1;
                    if tier == Tier::Optimized {
                        break;
                    }
                }
                served
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap() > 1, "served on both tiers");
    }
    assert!(runtime.wait_optimized(Duration::from_secs(60)));
    assert_eq!(f.tier(), Tier::Optimized);
    assert!(artifact.exists(), "the optimized code is kept");
    let again = runtime
        .compile_cached(&bytes, Limits::default(), Some(&artifact))
        .expect("loads");
    assert_eq!(again.tier(), Tier::Optimized, "loaded, not compiled again");
}

//! WASI-HTTP components as function backends, through the real gateway: the Rust,
//! JavaScript and Python hellos built from `guests/components/`, a body echo, a stream of
//! events, outgoing HTTP through the allow-list, a chain of a Proxy-Wasm filter and a
//! JavaScript function, and hostile components (a loop, a memory bomb, a panic) that get
//! their policy while the other routes keep serving.

mod common;

use common::admin::{Admin, OP};
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn conf(upstream: &str) -> String {
    HEAD.to_string()
        + &format!(
            r#"
[upstreams.up]
targets = ["{upstream}"]
[tenants.acme]
[modules.rs]
tenant = "acme"
path = "{{guests}}/hello-rs.wasm"
[modules.js]
tenant = "acme"
path = "{{guests}}/hello-js.wasm"
[modules.py]
tenant = "acme"
path = "{{guests}}/hello-py.wasm"
[modules.echo]
tenant = "acme"
path = "{{guests}}/echo-rs.wasm"
[modules.events]
tenant = "acme"
path = "{{guests}}/stream-rs.wasm"
[modules.fetch]
tenant = "acme"
path = "{{guests}}/fetch-rs.wasm"
allowed_upstreams = ["up"]
[modules.spin]
tenant = "acme"
path = "{{guests}}/loop-rs.wasm"
cpu_ms = 50
[modules.bomb]
tenant = "acme"
path = "{{guests}}/bomb-rs.wasm"
memory_mb = 32
[modules.misbehave]
tenant = "acme"
path = "{{guests}}/misbehave-rs.wasm"
[modules.reused]
tenant = "acme"
path = "{{guests}}/misbehave-rs.wasm"
requests_per_instance = 3
[modules.capped]
tenant = "acme"
path = "{{guests}}/misbehave-rs.wasm"
max_response_bytes = 1048576
[modules.key]
tenant = "acme"
path = "{{guests}}/api_key_auth.wasm"
config = {{ keys = ["k1"] }}
[modules.headers]
tenant = "acme"
path = "{{guests}}/rewrite.wasm"
config = {{ response = {{ set_headers = {{ x-frame-options = "DENY" }}, remove_headers = ["content-type"] }} }}
[[routes]]
path_prefix = "/rs"
hooks = ["rs"]
[[routes]]
path_prefix = "/js"
hooks = ["js"]
[[routes]]
path_prefix = "/py"
hooks = ["py"]
[[routes]]
path_prefix = "/echo"
hooks = ["echo"]
max_request_body_bytes = 1048576
[[routes]]
path_prefix = "/events"
hooks = ["events"]
[[routes]]
path_prefix = "/fetch"
hooks = ["fetch"]
[[routes]]
path_prefix = "/spin"
hooks = ["spin"]
[[routes]]
path_prefix = "/bomb"
hooks = ["bomb"]
[[routes]]
path = "/panic"
hooks = ["misbehave"]
[[routes]]
path = "/silent"
hooks = ["misbehave"]
[[routes]]
path_prefix = "/fresh/"
hooks = ["misbehave"]
[[routes]]
path_prefix = "/reused/"
hooks = ["reused"]
[[routes]]
path_prefix = "/capped/"
hooks = ["capped"]
[[routes]]
path_prefix = "/keyed"
hooks = ["key", "js"]
[[routes]]
path_prefix = "/styled"
hooks = ["headers", "js"]
"#
        )
}

/// A gateway with only the admin API and one listener: tenants bring the functions.
fn admin_conf() -> String {
    format!(
        r#"
[server]
watch_config = false
[admin]
listen = "127.0.0.1:{{port:admin}}"
token = "{OP}"
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
"#
    )
}

async fn get(gw: &Gw, path: &str) -> (u16, String) {
    let r = client().get(gw.url("http", path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_answer_stream_and_are_contained() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&conf(&up.addr()));

    // each language's hello
    for (path, text) in [
        ("/rs", "hello from rust\n"),
        ("/js", "hello from js\n"),
        ("/py", "hello from python\n"),
    ] {
        assert_eq!(get(&gw, path).await, (200, text.to_string()), "{path}");
    }
    // framed for keep-alive (chunked): two requests on one connection, both answered
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
    s.write_all(b"GET /rs HTTP/1.1\r\nHost: x\r\n\r\nGET /rs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert_eq!(all.matches("hello from rust").count(), 2, "{all}");
    assert!(
        all.contains("Transfer-Encoding: chunked") || all.contains("transfer-encoding: chunked"),
        "{all}"
    );
    // stdout reached the tenant's log through the gateway's log
    assert!(gw.wait_log("acme", Duration::from_secs(2)).await);

    // the body streams in: a chunked upload is echoed, uppercased
    let body = "abc".repeat(50_000);
    let r = client()
        .post(gw.url("http", "/echo"))
        .body(reqwest::Body::wrap_stream(futures_chunks(body.clone())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), body.to_uppercase());
    // over the route's limit, declared or found while streaming: 413, never a truncated
    // body passed to the function as whole
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).map(|r| r.0), Some(413));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, "y".repeat(1 << 16));
    for _ in 0..24 {
        if s.write_all(chunk.as_bytes()).is_err() {
            break; // the gateway answered and stopped reading
        }
    }
    assert_eq!(read_response(&mut s).map(|r| r.0), Some(413));

    // events arrive as they are written, not all at the end
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut first_event_at = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if first_event_at.is_none() && text.contains("event ") {
            first_event_at = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("event ").count(), 3, "{text}");
    let first = first_event_at.expect("an event");
    assert!(
        total >= Duration::from_millis(200) && first + Duration::from_millis(150) < total,
        "first event after {first:?}, all after {total:?}"
    );

    // outgoing HTTP: an allowed upstream by name, anything else denied
    assert_eq!(get(&gw, "/fetch?up").await, (200, "status 200\n".into()));
    let (status, text) = get(&gw, &format!("/fetch?{}", up.addr())).await;
    assert_eq!(status, 200);
    assert!(text.contains("HttpRequestDenied"), "{text}");

    // a filter, then a JavaScript function
    let r = client().get(gw.url("http", "/keyed")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(gw.url("http", "/keyed"))
        .header("x-api-key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello from js\n");

    // hostile ones get the policy (503 function_failed), quickly, and nothing else breaks
    for path in ["/spin", "/bomb", "/panic", "/silent"] {
        let t = Instant::now();
        let (status, body) = get(&gw, path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains("function_failed"), "{path}: {body}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            t.elapsed()
        );
        assert_eq!(get(&gw, "/rs").await.0, 200);
    }
    assert!(gw.log().contains("function failed"), "{}", gw.log());
}

/// A body sent in many small chunks (chunked transfer coding).
fn futures_chunks(
    body: String,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .into_bytes()
        .chunks(7_000)
        .map(|c| Ok(c.to_vec()))
        .collect();
    futures::stream::iter(chunks)
}

/// Tenants deploy components through the admin API like filters: the deploy says what
/// it detected, the function URL answers, usage and logs are the tenant's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_deploy_components_as_functions() {
    let gw = Gw::start(&admin_conf());
    let a = Admin::new(&gw);
    for t in ["alpha", "beta"] {
        a.tenant(t, serde_json::json!({})).await;
    }
    let alpha = a.token("alpha", &["deploy", "logs", "usage"]).await;
    let beta = a.token("beta", &["deploy", "logs", "usage"]).await;
    let wasm = |name: &str| std::fs::read(guests().join(format!("{name}.wasm"))).unwrap();
    let (s, v) = a.deploy("alpha", "hello", &alpha, wasm("hello-js")).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["kind"], "function");
    assert!(v["exports"][0]
        .as_str()
        .unwrap()
        .starts_with("wasi:http/incoming-handler@0.2."));
    let (s, v) = a.deploy("beta", "hello", &beta, wasm("hello-rs")).await;
    assert_eq!(
        (s, &v["kind"]),
        (201, &serde_json::json!("function")),
        "{v}"
    );
    // a filter is still a filter
    let (s, v) = a.deploy("beta", "api", &beta, wasm("hello_api")).await;
    assert_eq!((s, &v["kind"]), (201, &serde_json::json!("filter")), "{v}");
    // neither: refused with the reason
    let (s, v) = a
        .deploy("beta", "junk", &beta, b"\0asm\x0d\0\x01\0".to_vec())
        .await;
    assert_eq!(s, 400, "{v}");

    for (t, tok) in [("alpha", &alpha), ("beta", &beta)] {
        let (s, v) = a
            .json(
                "PUT",
                &format!("/v1/tenants/{t}/functions/hi"),
                tok,
                serde_json::json!({ "module": "hello" }),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let c = client();
    for (t, text) in [("alpha", "hello from js\n"), ("beta", "hello from rust\n")] {
        let r = c
            .get(gw.url("http", &format!("/run/{t}/hi/x")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), text);
    }
    // each tenant's log has its own function's lines only
    let logs = |t: &'static str, tok: String| {
        let a = &a;
        async move {
            let (_, v) = a
                .json("GET", &format!("/v1/tenants/{t}/logs"), &tok, Value::Null)
                .await;
            v.to_string()
        }
    };
    let (la, lb) = (
        logs("alpha", alpha.clone()).await,
        logs("beta", beta.clone()).await,
    );
    assert!(la.contains("hello-js") && !la.contains("hello-rs"), "{la}");
    assert!(lb.contains("hello-rs") && !lb.contains("hello-js"), "{lb}");
    // usage counts the invocations and the body bytes, per tenant
    let mut usage = Value::Null;
    for _ in 0..50 {
        let (_, v) = a
            .json("GET", "/v1/tenants/alpha/usage", &alpha, Value::Null)
            .await;
        usage = v["modules"]["hello"].clone();
        if usage["invocations"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(usage["invocations"], 1, "{usage}");
    assert_eq!(usage["bytes_out"], "hello from js\n".len(), "{usage}");
    assert_eq!(usage["bytes_in"], 0, "{usage}");
}

/// A function that answers while the request body still arrives (a streaming echo) gets
/// every byte of it, in order, with a declared length and chunked, several times over:
/// the body reader must not drop a chunk when the response side wakes up first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_function_gets_the_whole_request_body() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&conf(&up.addr()));
    let sent: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for run in 0..6 {
        let body = if run % 2 == 0 {
            reqwest::Body::from(sent.clone())
        } else {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                sent.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
            reqwest::Body::wrap_stream(futures::stream::iter(chunks))
        };
        let request = client().post(gw.url("http", "/echo/stream")).body(body);
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let got = r.bytes().await.expect("a complete body");
        assert_eq!(got.len(), sent.len(), "run {run}");
        assert!(got[..] == sent[..], "run {run}: the echo differs");
    }
}

/// The route's filters see a function's response head as they see an upstream's: a
/// header-setting filter (the rewrite guest here) adds and removes headers on the
/// JavaScript function's answer, whose body still streams through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_change_a_functions_response_head() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&conf(&up.addr()));
    let send = |path: &str| client().get(gw.url("http", path)).send();
    let r = send("/styled").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(
        r.headers().get("content-type").is_none(),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.text().await.unwrap(), "hello from js\n");
    // without the filter the function's own head is untouched
    let r = client().get(gw.url("http", "/js")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert!(r.headers().get("x-frame-options").is_none());
}

/// A function's response trailers reach an HTTP/2 client after the whole body (the
/// streaming guest ends with `x-events: 3`); an HTTP/1.1 client gets the same body, whole,
/// without them (Pingora writes no HTTP/1 trailers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_trailers_reach_http2_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["gw.test".into()]).unwrap();
    let (cert, key) = (dir.path().join("gw.crt"), dir.path().join("gw.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let conf = HEAD.to_string()
        + &format!(
            r#"
[[listeners]]
listen = "127.0.0.1:{{port:https}}"
tls = {{ certs = [{{ cert = "{}", key = "{}" }}] }}
[modules.events]
path = "{{guests}}/stream-rs.wasm"
[[routes]]
path_prefix = "/events"
hooks = ["events"]
"#,
            cert.display(),
            key.display()
        );
    let gw = Gw::start_in(dir, &conf, Default::default());
    let mut h2 = h2_client(gw.port("https"), ck.cert.der().to_vec()).await;
    for _ in 0..2 {
        h2 = h2.ready().await.unwrap();
        let req = http::Request::get("https://gw.test/events")
            .body(())
            .unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            got.extend_from_slice(&chunk);
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        assert_eq!(String::from_utf8_lossy(&got), "event 0\nevent 1\nevent 2\n");
        let trailers = body.trailers().await.unwrap().expect("trailers");
        assert_eq!(trailers["x-events"], "3");
    }
    let (status, text) = get(&gw, "/events").await;
    assert_eq!(
        (status, text.as_str()),
        (200, "event 0\nevent 1\nevent 2\n")
    );
}

/// A function's outgoing HTTP goes through the gateway's upstream pool: consecutive calls
/// reuse one connection, a POST body streams to the upstream (framed by the gateway) and
/// the upstream's answer back to the function, a TLS upstream is reached over TLS with its
/// SNI and CA (here another gateway's TLS listener), and refused without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_call_upstreams_through_the_gateway_pool() {
    let up = Upstream::start("up").await;
    let late = Upstream::with(UpstreamOpts {
        name: "late".into(),
        body_after: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    // a TLS front for the same upstream
    let (front, ca_path) = tls_front(&up.addr(), "up.test");
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.up]
targets = ["{}"]
[upstreams.late]
targets = ["{}"]
[upstreams.secure]
targets = ["127.0.0.1:{}"]
tls = {{ sni = "up.test", ca = "{ca_path}" }}
[upstreams.untrusted]
targets = ["127.0.0.1:{}"]
tls = {{ sni = "up.test" }}
[modules.fetch]
path = "{{guests}}/fetch-rs.wasm"
allowed_upstreams = ["up", "late", "secure", "untrusted"]
[[routes]]
path_prefix = "/fetch"
hooks = ["fetch"]
"#,
            up.addr(),
            late.addr(),
            front.port("https"),
            front.port("https"),
        );
    let gw = Gw::start(&conf);
    let stats = &up.stats;
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    // the guest reads only the status of these answers: what it leaves of the body is
    // drained so the connection serves the next call
    for _ in 0..20 {
        assert_eq!(get(&gw, "/fetch?up").await, (200, "status 200\n".into()));
    }
    assert_eq!(count(&stats.requests), 20);
    // also when the body comes after the guest stopped reading (20 ms after the head;
    // the next call comes once it is in)
    for _ in 0..5 {
        assert_eq!(get(&gw, "/fetch?late").await, (200, "status 200\n".into()));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let late_stats = &late.stats;
    assert_eq!(count(&late_stats.requests), 5);
    assert_eq!(
        count(&late_stats.connections),
        1,
        "the late body was drained"
    );
    assert_eq!(
        count(&stats.connections),
        1,
        "the calls share one pooled connection"
    );

    // a POST body to the upstream and its answer back
    let sent = "x".repeat(100_000);
    let r = client()
        .post(gw.url("http", "/fetch?up"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let (status, echoed) = text.split_once('\n').unwrap();
    assert_eq!(status, "status 200");
    let echo: Value = serde_json::from_str(echoed).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/posted");
    assert_eq!(echo["headers"]["host"], "up");
    assert_eq!(echo["headers"]["x-from"], "fetch-rs");
    assert_eq!(echo["body"].as_str().unwrap().len(), sent.len());
    assert_eq!(count(&stats.connections), 1);

    // over TLS, verified against the upstream's CA; an untrusted certificate is refused
    assert_eq!(
        get(&gw, "/fetch?secure").await,
        (200, "status 200\n".into())
    );
    assert_eq!(count(&stats.requests), 22);
    let (status, text) = get(&gw, "/fetch?untrusted").await;
    assert_eq!(status, 200);
    assert!(text.starts_with("error ErrorCode::Tls"), "{text}");
    assert_eq!(count(&stats.requests), 22);
}

/// The route's filters see a function's response body as they see an upstream's: the SDK
/// guest `body-scan` buffers the whole body and sends it to a scanner with an HTTP callout
/// from `on_response_body`; the scanner's answer (here an echo of what it got) replaces
/// the JavaScript function's body. Holding the head, the guest adds the scanner's status;
/// a scanner it cannot reach makes it answer 451 in place of the whole response. A body
/// that no longer fits the Content-Length the head kept is cut off, never sent as whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_see_and_change_a_functions_response_body() {
    let scanner = Upstream::start("scanner").await;
    let (dead, _dead) = refusing_port();
    let mut conf = HEAD.to_string()
        + &format!(
            "\n[upstreams.scanner]\ntargets = [\"{}\"]\n[upstreams.dead]\ntargets = [\"127.0.0.1:{dead}\"]\n\
             [modules.js]\npath = \"{{guests}}/hello-js.wasm\"\n\
             [modules.big]\npath = \"{{guests}}/misbehave-rs.wasm\"\n",
            scanner.addr()
        );
    // one body-scan module per behaviour, each in front of a function at /NAME
    for (name, target, options, function) in [
        ("held", "scanner", ", hold_head = true", "js"),
        ("streamed", "scanner", "", "js"),
        ("length", "scanner", ", keep_length = true", "big"),
        ("refused", "dead", ", hold_head = true", "js"),
    ] {
        conf += &format!(
            "[modules.{name}]\npath = \"{{guests}}/body_scan.wasm\"\nallowed_upstreams = [\"{target}\"]\n\
             config = {{ upstream = \"{target}\"{options} }}\n\
             [[routes]]\npath_prefix = \"/{name}\"\nhooks = [\"{name}\", \"{function}\"]\n"
        );
    }
    let gw = Gw::start(&conf);
    let send = |path: &str| client().get(gw.url("http", path)).send();
    for path in ["/held", "/streamed", "/held"] {
        let r = send(path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let scanned = r
            .headers()
            .get("x-scanned")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            scanned.as_deref(),
            (path == "/held").then_some("200"),
            "{path}"
        );
        let scan: Value = r.json().await.unwrap();
        assert_eq!(scan["upstream"], "scanner", "{path}");
        assert_eq!(scan["path"], "/scan");
        assert_eq!(
            scan["body"], "hello from js\n",
            "the scanner saw the function's body"
        );
    }
    let scans = scanner
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(scans, 3, "one scan per response");
    let r = send("/refused").await.unwrap();
    assert_eq!(r.status(), 451);
    assert_eq!(r.headers()["x-scanned"], "refused");
    assert_eq!(r.text().await.unwrap(), "refused by the scanner");
    // the scanner's echo of a 1 MiB body is longer than the length the head kept
    let r = send("/length/huge-declared?1").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], (1u64 << 20).to_string());
    assert!(
        r.bytes().await.is_err(),
        "a cut-off body must not read as complete"
    );
    assert_eq!(
        scanner
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    // and the gateway goes on serving
    let r = send("/streamed").await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A function's response limit: a declared length over it gets the failure policy before
/// any byte is sent; a stream past it is cut off (the chunked body never ends cleanly);
/// up to the limit it is delivered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_response_over_its_limit_is_refused_or_cut_off() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&conf(&up.addr()));
    let (status, _) = get(&gw, "/capped/huge-declared?2").await;
    assert_eq!(status, 503);
    let send = |path: &str| client().get(gw.url("http", path)).send();
    let whole = send("/capped/huge?1").await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap().len(), 1 << 20);
    let cut = send("/capped/huge?8").await.unwrap();
    assert_eq!(cut.status(), 200);
    let read = cut.bytes().await;
    assert!(read.is_err(), "a cut-off body must not read as complete");
    // the other routes keep serving
    assert_eq!(get(&gw, "/rs").await, (200, "hello from rust\n".into()));
    let log = gw.log();
    assert!(
        log.contains("max_response_bytes") && log.contains("capped"),
        "{log}"
    );
}

/// Instance reuse through the gateway: a fresh function's instance has seen one request;
/// a reused one counts up to its `requests_per_instance` and is retired after a trap. A
/// deploy can ask for reuse; a filter cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_reuse_instances_when_asked() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&conf(&up.addr()));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get(&gw, "/fresh/count").await.1);
    }
    assert_eq!(seen, ["1", "1", "1", "1"]);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(get(&gw, "/reused/count").await.1);
    }
    assert_eq!(seen, ["1", "2", "3", "1", "2"]);
    assert_eq!(get(&gw, "/reused/panic").await.0, 503);
    assert_eq!(get(&gw, "/reused/count").await, (200, "1".into()));

    // through the admin API
    let gw = Gw::start(&admin_conf());
    let a = Admin::new(&gw);
    a.tenant("delta", serde_json::json!({})).await;
    let wasm = |name: &str| std::fs::read(guests().join(format!("{name}.wasm"))).unwrap();
    let (s, v) = a
        .call(
            "PUT",
            "/v1/tenants/delta/modules/counter?requests_per_instance=2",
            Some(OP),
            wasm("misbehave-rs"),
        )
        .await;
    assert_eq!(
        (s, &v["requests_per_instance"]),
        (201, &serde_json::json!(2)),
        "{v}"
    );
    let (s, v) = a
        .call(
            "PUT",
            "/v1/tenants/delta/modules/api?requests_per_instance=2",
            Some(OP),
            wasm("hello_api"),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("not filters"), "{v}");
    let (s, v) = a
        .json(
            "PUT",
            "/v1/tenants/delta/functions/counter",
            OP,
            serde_json::json!({ "module": "counter" }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(get(&gw, "/run/delta/counter/count").await.1);
    }
    assert_eq!(seen, ["1", "2", "1"]);
}

/// One command from source to a live URL, in each language: the CLI builds a JavaScript
/// file (componentize-js), a Python file (componentize-py) or a Rust crate directory
/// (cargo), installing the toolchain into the tools cache when missing, deploys it, binds
/// it under its name and prints the URL, which answers. A source that does not build gets
/// the toolchain's error and deploys nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_deploys_functions_from_source() {
    let gw = Gw::start(&admin_conf());
    Admin::new(&gw).tenant("gamma", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("shout.js");
    std::fs::write(
        &js,
        "addEventListener('fetch', (e) => e.respondWith(new Response('shouted\\n')));\n",
    )
    .unwrap();
    let py = dir.path().join("greet.py");
    let hello_py = std::fs::read_to_string(guests().join("../components/hello-py/app.py")).unwrap();
    std::fs::write(
        &py,
        hello_py.replace("hello from python", "greetings from python"),
    )
    .unwrap();
    // sources using the tenant's state: wasi:keyvalue and wasi:config are in the world
    // they are built against
    let js_state = dir.path().join("count.js");
    std::fs::write(
        &js_state,
        r#"import { open } from 'wasi:keyvalue/store@0.2.0-draft';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft';
import { get } from 'wasi:config/store@0.2.0-rc.1';
addEventListener('fetch', (event) => {
  const n = increment(open('default'), 'js-hits', 1n);
  event.respondWith(new Response(`js hits ${n} greeting ${get('GREETING') ?? 'none'}\n`));
});
"#,
    )
    .unwrap();
    let py_state = dir.path().join("count.py");
    std::fs::write(
        &py_state,
        hello_py
            .replace(
                "from wit_world import exports",
                "from wit_world import exports\nfrom wit_world.imports import atomics, wasi_keyvalue_store",
            )
            .replace(
                "b\"hello from python\\n\"",
                "f\"py hits {atomics.increment(wasi_keyvalue_store.open('default'), 'py-hits', 1)}\\n\".encode()",
            ),
    )
    .unwrap();
    let crate_dir = guests().join("../components/hello-rs");
    for (name, source, answer) in [
        ("shout", js, "shouted\n"),
        ("greet", py, "greetings from python\n"),
        ("rusty", crate_dir, "hello from rust\n"),
        ("jscount", js_state, "js hits 1 greeting none\n"),
        ("pycount", py_state, "py hits 1\n"),
    ] {
        let started = std::time::Instant::now();
        let out = cli_deploy(&gw, name, source).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stdout}\n{stderr}");
        assert!(stdout.contains("\"kind\":\"function\""), "{stdout}");
        assert!(stdout.contains(&format!("/run/gamma/{name}")), "{stdout}");
        let (status, text) = get(&gw, &format!("/run/gamma/{name}/")).await;
        assert_eq!((status, text.as_str()), (200, answer), "{name}");
        eprintln!("{name}: source to first 200 in {:?}", started.elapsed());
    }
    // the counters are in the tenant's store, and a secret set now reaches the function
    let (s, _) = Admin::new(&gw)
        .call(
            "PUT",
            "/v1/tenants/gamma/secrets/GREETING",
            Some(OP),
            b"hi".to_vec(),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(&gw, "/run/gamma/jscount/").await,
        (200, "js hits 2 greeting hi\n".to_string())
    );
    assert_eq!(
        get(&gw, "/run/gamma/pycount/").await,
        (200, "py hits 2\n".to_string())
    );

    let bad = dir.path().join("bad.js");
    std::fs::write(&bad, "addEventListener('fetch', (e) => {{{").unwrap();
    for (name, source, error) in [
        ("bad", bad, "componentize-js failed"),
        ("empty", dir.path().to_path_buf(), "not a Rust crate"),
    ] {
        let out = cli_deploy(&gw, name, source).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(error), "{stderr}");
        let (s, _) = Admin::new(&gw)
            .json(
                "GET",
                &format!("/v1/tenants/gamma/modules/{name}"),
                OP,
                Value::Null,
            )
            .await;
        assert_eq!(s, 404);
    }
}

/// `wasmgate deploy --tenant gamma --name NAME SOURCE` against `gw`, as the operator.
async fn cli_deploy(gw: &Gw, name: &str, source: std::path::PathBuf) -> std::process::Output {
    let admin = format!("127.0.0.1:{}", gw.port("admin"));
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin())
            .args(["deploy", "--tenant", "gamma", "--name", &name])
            .arg(&source)
            .env("WASMGATE_ADMIN", admin)
            .env("WASMGATE_TOKEN", OP)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

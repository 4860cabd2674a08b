//! Proxy-Wasm hooks through the real gateway: the example guests built from `guests/`,
//! a probe guest that checks every host call from inside, and hostile modules written
//! in WAT that loop, grow memory, recurse, trap, abuse pointers, answer huge bodies or
//! never resume. Each hostile case must get its policy's answer while the gateway and
//! its other routes keep serving.

mod common;

use common::*;
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

fn base(upstream: &str) -> String {
    HEAD.to_string()
        + &format!(
            r#"
[upstreams.echo]
targets = ["{upstream}"]
[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "echo"
"#
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_auth_denies_without_closing_the_connection() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
[modules.auth]
tenant = "acme"
path = "{guests}/api_key_auth.wasm"
config = { keys = ["k1", "k2"] }
[tenants.acme]
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["auth"]
"#;
    let gw = Gw::start(&conf);
    let c = client();
    let r = c.get(gw.url("http", "/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"missing_api_key"}"#);
    let r = c
        .get(gw.url("http", "/api/x"))
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(gw.url("http", "/api/x"))
        .header("x-api-key", "k2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/api/x");

    // several denied requests and one allowed on one connection
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for key in ["bad", "worse", "k1"] {
        write!(
            s,
            "GET /api/y HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\n\r\n"
        )
        .unwrap();
        let (status, head, _) = read_response(&mut s).expect("an answer");
        assert_eq!(status, if key == "k1" { 200 } else { 401 }, "{key}: {head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "wasmgate_hook_invocations_total{module=\"auth\",tenant=\"acme\"}"
        ) >= 6.0,
        "{m}"
    );
}

fn jwt(secret: &str, claims: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{head}.{body}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{head}.{body}.{sig}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_verifies_hs256_and_sets_the_user() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
[modules.jwt]
path = "{guests}/jwt_auth.wasm"
config = { secret = "s3cret" }
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["jwt"]
"#;
    let gw = Gw::start(&conf);
    let c = client();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = jwt(
        "s3cret",
        serde_json::json!({"sub": "alice", "exp": now + 60}),
    );
    let r = c
        .get(gw.url("http", "/api/me"))
        .bearer_auth(&good)
        .header("x-user", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-user"], "alice");
    for (token, reason) in [
        (
            jwt("s3cret", serde_json::json!({"sub": "a", "exp": now - 10})),
            "token_expired",
        ),
        (
            jwt("other", serde_json::json!({"sub": "a"})),
            "bad_signature",
        ),
        ("a.b".to_string(), "malformed_token"),
    ] {
        let r = c
            .get(gw.url("http", "/api/me"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], reason);
    }
    let r = c.get(gw.url("http", "/api/me")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "missing_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_guest_changes_path_and_headers_both_ways() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
[modules.rw]
path = "{guests}/rewrite.wasm"
config = { request = { prefix_from = "/old", prefix_to = "/new/v2", set_headers = { "x-added" = "yes" }, remove_headers = ["x-drop"] }, response = { set_headers = { "x-resp" = "r" }, remove_headers = ["x-upstream"] } }
[[routes]]
path_prefix = "/old"
upstream = "echo"
hooks = ["rw"]
"#;
    let gw = Gw::start(&conf);
    let r = client()
        .get(gw.url("http", "/old/thing?q=1"))
        .header("x-drop", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-resp"], "r");
    assert!(r.headers().get("x-upstream").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/new/v2/thing?q=1");
    assert_eq!(v["headers"]["x-added"], "yes");
    assert!(v["headers"].get("x-drop").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conf_rewrites_apply_to_the_path_a_hook_chose() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
[modules.inside]
path = "{guests}/rewrite.wasm"
config = { request = { prefix_from = "/api/a", prefix_to = "/api/b" } }
[modules.outside]
path = "{guests}/rewrite.wasm"
config = { request = { prefix_from = "/legacy", prefix_to = "/modern" } }
[[routes]]
path_prefix = "/api"
upstream = "echo"
rewrite = { replace_prefix = "/internal" }
hooks = ["inside"]
[[routes]]
path_prefix = "/legacy"
upstream = "echo"
rewrite = { strip_prefix = true }
hooks = ["outside"]
[[routes]]
path = "/u/{id}"
upstream = "echo"
rewrite = { path = "/users/{id}" }
hooks = ["outside"]
"#;
    let gw = Gw::start(&conf);
    let path = |p: &'static str| {
        let url = gw.url("http", p);
        async move {
            let v: Value = client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["path"].as_str().unwrap().to_string()
        }
    };
    // the hook's path is still under the route's prefix: the conf rewrite applies to it
    assert_eq!(path("/api/a/x?q=1").await, "/internal/b/x?q=1");
    // a path the hook did not touch is rewritten as before
    assert_eq!(path("/api/z").await, "/internal/z");
    // the hook moved the path out of the prefix: its path wins, never undone
    assert_eq!(path("/legacy/x").await, "/modern/x");
    // untouched by the hook there, so the template applies
    assert_eq!(path("/u/7").await, "/users/7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_api_backend_answers_without_upstream() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
[modules.hello]
path = "{guests}/hello_api.wasm"
[[routes]]
path_prefix = "/hello"
hooks = ["hello"]
"#;
    let gw = Gw::start(&conf);
    let c = client();
    for i in 1..=3 {
        let r = c.get(gw.url("http", "/hello/bob")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-served-by"], "wasm");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v, serde_json::json!({"hello": "bob", "greetings": i}));
    }
    let r = c.get(gw.url("http", "/hello")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // a POST with a body is answered too (the body is read and offered to the hook)
    let r = c
        .post(gw.url("http", "/hello/post"))
        .body("x".repeat(10_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_need_method_path_and_authority() {
    // a raw-ABI filter that dispatches a callout with the headers in memory at 64 (a map
    // of `len` bytes) and answers 200 + the status proxy_http_call returned
    let filter = |headers: &str, len: usize| {
        wat::parse_str(format!(
            r#"(module
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "auth")
  (data (i32.const 64) "{headers}")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 2048))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $st i32)
    (local.set $st (call $call (i32.const 16) (i32.const 4) (i32.const 64) (i32.const {len})
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1024)))
    (drop (call $send (i32.add (i32.const 200) (local.get $st)) (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)))"#
        ))
        .unwrap()
    };
    // [":method": "GET", ":path": "/"]: no authority
    let no_authority = "\\02\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\01\\00\\00\\00:method\\00GET\\00:path\\00/\\00";
    // [":method": "GET", ":path": "/", ":authority": "a"]
    let complete = "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\01\\00\\00\\00\\0a\\00\\00\\00\\01\\00\\00\\00:method\\00GET\\00:path\\00/\\00:authority\\00a\\00";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.wasm"), filter(no_authority, 40)).unwrap();
    std::fs::write(dir.path().join("good.wasm"), filter(complete, 61)).unwrap();
    let up = Upstream::start("echo").await;
    let auth = Upstream::start("auth").await;
    let d = dir.path().display();
    let conf = base(&up.addr())
        + &format!(
            r#"
[upstreams.auth]
targets = ["{}"]
[modules.bad]
path = "{d}/bad.wasm"
allowed_upstreams = ["auth"]
[modules.good]
path = "{d}/good.wasm"
allowed_upstreams = ["auth"]
[[routes]]
path_prefix = "/bad"
hooks = ["bad"]
[[routes]]
path_prefix = "/good"
hooks = ["good"]
"#,
            auth.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    let status = |p: &'static str| {
        let (c, url) = (c.clone(), gw.url("http", p));
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    };
    // BadArgument (2), and nothing reached the auth upstream
    assert_eq!(status("/bad").await, 202);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        auth.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // with all three the call is dispatched (Ok) even with timeout 0 (the default)
    assert_eq!(status("/good").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_auth_pauses_on_an_http_callout() {
    let up = Upstream::start("echo").await;
    let (dead, _dead) = refusing_port();
    // accepts connections and never answers
    let silent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent_listener.local_addr().unwrap().to_string();
    let conf = base(&up.addr())
        + &format!(
            r#"
[upstreams.auth]
targets = ["{}"]
[upstreams.down]
targets = ["127.0.0.1:{dead}"]
[modules.ext]
path = "{{guests}}/ext_auth.wasm"
config = {{ upstream = "auth", path = "/auth/check" }}
allowed_upstreams = ["auth"]
[modules.ext_down]
path = "{{guests}}/ext_auth.wasm"
config = {{ upstream = "down", path = "/auth/check", timeout_ms = 300 }}
allowed_upstreams = ["down"]
[upstreams.silent]
targets = ["{silent}"]
[modules.ext_slow]
path = "{{guests}}/ext_auth.wasm"
config = {{ upstream = "silent", path = "/auth/check", timeout_ms = 200 }}
allowed_upstreams = ["silent"]
[[routes]]
path_prefix = "/slow"
upstream = "echo"
hooks = ["ext_slow"]
[modules.ext_not_allowed]
path = "{{guests}}/ext_auth.wasm"
config = {{ upstream = "auth" }}
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["ext"]
[[routes]]
path_prefix = "/down"
upstream = "echo"
hooks = ["ext_down"]
[[routes]]
path_prefix = "/sneaky"
upstream = "echo"
hooks = ["ext_not_allowed"]
"#,
            up.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    let r = c
        .get(gw.url("http", "/api/x"))
        .bearer_auth("demo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-user"], "demo-user");
    let r = c
        .get(gw.url("http", "/api/x"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .get(gw.url("http", "/down/x"))
        .bearer_auth("demo-token")
        .send()
        .await
        .unwrap();
    // the refused connection reaches the guest as Envoy's synthesized 503
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"auth_unavailable","status":503}"#
    );
    // an auth service that never answers: a synthesized 504 after the guest's timeout
    let r = c
        .get(gw.url("http", "/slow/x"))
        .bearer_auth("demo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"auth_unavailable","status":504}"#
    );
    // an upstream the module was not granted is refused at dispatch
    let r = c
        .get(gw.url("http", "/sneaky/x"))
        .bearer_auth("demo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

/// The next event the test's auth service reports.
async fn heard(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(&'static str, std::time::Instant)>,
) -> (&'static str, std::time::Instant) {
    let next = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    next.expect("the auth service heard nothing").unwrap()
}

/// A client that closes its connection while its request waits on a module's callout:
/// the wait ends at once and the call is cancelled (the callout upstream sees its
/// connection close long before the module's timeout; Envoy would let it finish and drop
/// its answer), nothing is answered, the access log says 499 with Envoy's `DC` flag, and
/// the module's next request is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_callouts_it_waits_on() {
    use tokio::io::AsyncReadExt;
    let up = Upstream::start("echo").await;
    // an auth service that reads each callout and never answers; it reports when a
    // callout arrives and when the gateway closes that connection
    let auth = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth_addr = auth.local_addr().unwrap().to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = auth.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            head.extend_from_slice(&buf[..n]);
                            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                                let _ = tx.send(("called", std::time::Instant::now()));
                                head.clear();
                            }
                        }
                    }
                }
                let _ = tx.send(("closed", std::time::Instant::now()));
            });
        }
    });
    let conf = base(&up.addr())
        + &format!(
            r#"
[access_log]
enabled = true
[upstreams.auth]
targets = ["{auth_addr}"]
[modules.ext]
path = "{{guests}}/ext_auth.wasm"
config = {{ upstream = "auth", path = "/auth/check", timeout_ms = 10000 }}
allowed_upstreams = ["auth"]
[[routes]]
name = "waits"
path_prefix = "/waits"
upstream = "echo"
hooks = ["ext"]
"#
        );
    let gw = Gw::start(&conf);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
    s.write_all(b"GET /waits/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer demo-token\r\n\r\n")
        .unwrap();
    let (what, _) = heard(&mut rx).await;
    assert_eq!(what, "called");
    let left = std::time::Instant::now();
    drop(s);
    let (what, at) = heard(&mut rx).await;
    assert_eq!(what, "closed");
    let took = at.duration_since(left);
    assert!(
        took < Duration::from_secs(2),
        "the callout outlived its client by {took:?}"
    );
    assert!(
        gw.wait_log("downstream_remote_disconnect", Duration::from_secs(2))
            .await,
        "{}",
        gw.log()
    );
    let v = gw.access_line("waits");
    assert_eq!(v["status"], 499, "{v}");
    // the module was not harmed: a request whose client stays is still waited for
    let c = client();
    let pending = tokio::spawn({
        let url = gw.url("http", "/waits/y");
        async move { c.get(url).bearer_auth("demo-token").send().await }
    });
    let (what, _) = heard(&mut rx).await;
    assert_eq!(what, "called");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "a staying client's request was dropped"
    );
    pending.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_guest_checks_every_host_call_from_inside() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
[node]
id = "probe-node"
cluster = "edge"
metadata = { zone = "z1" }
[modules.probe]
path = "{guests}/abi_probe.wasm"
root_id = "probe-root"
vm_config = "probe-vm"
config = { probe = true }
allowed_upstreams = ["echo"]
[[routes]]
path_prefix = "/probe"
upstream = "echo"
hooks = ["probe"]
"#;
    let gw = Gw::start(&conf);
    let c = client();
    let r = c
        .get(gw.url("http", "/probe?x=1"))
        .header("x-probe", "1")
        .header("x-remove-me", "1")
        .header("referer", "https://from.example/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-probe"], "done");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["failed"], serde_json::json!([]), "{v}");
    assert!(v["checks"].as_u64().unwrap() >= 50, "{v}");

    // ticks run on idle VMs
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .get(gw.url("http", "/probe"))
        .header("x-probe", "1")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["ticks"].as_u64().unwrap() >= 2, "{v}");
    // the first request's enqueue reached the root context through on_queue_ready
    assert!(v["queue_ready_items"].as_u64().unwrap() >= 1, "{v}");

    // bodies: buffered request body replaced, response header and body changed
    let r = c
        .post(gw.url("http", "/probe/body"))
        .body("hello body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-probe-response"], "yes");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["failed"], serde_json::json!([]), "{v}");
    assert_eq!(v["upstream"]["body"], "REPLACED");

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wasmgate_guest_gauge{module=\"probe\",name=\"probe_gauge\""
        ),
        42.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "wasmgate_guest_counter{module=\"probe\",name=\"probe_requests\""
        ) >= 6.0
    );
    // on_log runs in the logging phase, after the client has its answer: wait for it
    let logged = "wasmgate_guest_counter{module=\"probe\",name=\"probe_logged\"";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut m = m;
    while metric(&m, logged) < 3.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = gw.metrics().await;
    }
    assert!(metric(&m, logged) >= 3.0, "{m}");
    // on_log read the sizes sent, and why the answer is what it is
    assert_eq!(
        metric(
            &m,
            "wasmgate_guest_counter{module=\"probe\",name=\"probe_log_wrong\""
        ),
        0.0,
        "{m}"
    );
    assert!(gw.log().contains("probe log line"));
}

/// A Proxy-Wasm module in WAT whose callbacks run the given bodies.
fn wat_module(req_headers: &str, resp_headers: &str, log: &str, memory_pages: u32) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {memory_pages})
  (global $heap (mut i32) (i32.const 4096))
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 16) "x-crash")
  (data (i32.const 32) "x-count")
  (data (i32.const 48) "host")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func $recurse (param i32) (result i32) (call $recurse (i32.add (local.get 0) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {req_headers}
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {resp_headers}
    (i32.const 0))
  (func (export "proxy_on_log") (param $ctx i32) {log})
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)"#
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad WAT: {e}\n{text}"))
}

const SPIN: &str = "(loop $l (br $l))";

/// Gateway with one route per hostile module (tenant `evil`, `budget_us = 2000` unless
/// the module's extra lines say otherwise); returns it and the module names.
fn hostile_gateway(up: &str, cases: &[(&str, Vec<u8>, &str)]) -> Gw {
    hostile_gateway_with(&base(up), cases)
}

fn hostile_gateway_with(head: &str, cases: &[(&str, Vec<u8>, &str)]) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let mut conf = head.to_string();
    for (name, wasm, extra) in cases {
        let p = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&p, wasm).unwrap();
        let mut keys = String::new();
        if !extra.contains("tenant =") {
            keys += "tenant = \"evil\"\n";
        }
        if !extra.contains("budget_us =") {
            keys += "budget_us = 2000\n";
        }
        conf += &format!(
            "[modules.{name}]\n{keys}path = \"{}\"\n{extra}\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"echo\"\nhooks = [\"{name}\"]\n",
            p.display()
        );
    }
    conf += "[tenants.evil]\n[tenants.other]\n";
    Gw::start_in(dir, &conf, Default::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_are_contained() {
    let up = Upstream::start("echo").await;
    let oob = r#"
      ;; pointers past the end of memory and huge lengths must get InvalidMemoryAccess (6)
      (if (i32.ne (call $log (i32.const 2) (i32.const -16) (i32.const 100)) (i32.const 6)) (then unreachable))
      (if (i32.ne (call $log (i32.const 2) (i32.const 16) (i32.const 2147483647)) (i32.const 6)) (then unreachable))
      (if (i32.ne (call $get (i32.const 0) (i32.const 48) (i32.const 4) (i32.const -8) (i32.const 100)) (i32.const 6)) (then unreachable))
      (if (i32.ne (call $add (i32.const 0) (i32.const -1) (i32.const -1) (i32.const 16) (i32.const 7)) (i32.const 6)) (then unreachable))
      (if (i32.ne (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const -100) (i32.const 200) (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 6)) (then unreachable))
    "#;
    let bomb =
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable";
    let huge = "(drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 10485760) (i32.const 0) (i32.const 0) (i32.const -1))) (return (i32.const 1))";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("loop_req", wat_module(SPIN, "", "", 1), ""),
        ("loop_resp", wat_module("", SPIN, "", 1), ""),
        ("loop_log", wat_module("", "", SPIN, 1), ""),
        ("bomb", wat_module(bomb, "", "", 1), "memory_mb = 4"),
        (
            "recurse",
            wat_module("(drop (call $recurse (i32.const 0)))", "", "", 1),
            "",
        ),
        ("trap", wat_module("unreachable", "", "", 1), ""),
        ("oob", wat_module(oob, "", "", 1), ""),
        ("huge", wat_module(huge, "", "", 161), "memory_mb = 12"),
        (
            "never_resumes",
            wat_module("(return (i32.const 1))", "", "", 1),
            "",
        ),
        (
            "fail_open",
            wat_module("unreachable", "", "", 1),
            "on_failure = { action = \"allow\" }",
        ),
        (
            "fixed",
            wat_module(SPIN, "", "", 1),
            "on_failure = { action = \"respond\", status = 418, body = \"teapot\" }",
        ),
        (
            "custom_deny",
            wat_module("unreachable", "", "", 1),
            "on_failure = { action = \"deny\", status = 500 }",
        ),
    ];
    let gw = hostile_gateway(&up.addr(), &cases);
    let c = client();
    let pid = gw.child.id();
    let expect = [
        ("loop_req", 503, "budget_overrun"),
        ("loop_resp", 503, "budget_overrun"),
        ("loop_log", 200, "budget_overrun"),
        ("bomb", 503, "trap"),
        ("recurse", 503, "trap"),
        ("trap", 503, "trap"),
        ("oob", 200, ""),
        ("huge", 503, "local_response_too_large"),
        ("never_resumes", 503, "paused_without_resume"),
        ("fail_open", 200, "trap"),
        ("fixed", 418, "budget_overrun"),
        ("custom_deny", 500, "trap"),
    ];
    for round in 0..2 {
        for (name, status, _) in expect {
            let r = c
                .get(gw.url("http", &format!("/{name}/x")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{name} round {round}");
            let body = r.text().await.unwrap();
            if status == 503 || status == 500 {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(
                    v,
                    serde_json::json!({"error": "hook_failed", "route": name}),
                    "{name}"
                );
                assert!(
                    !body.contains("unreachable") && !body.contains("wasm"),
                    "trap text leaked: {body}"
                );
            }
            if name == "fixed" {
                assert_eq!(body, "teapot");
            }
            // healthy routes are unaffected, every time
            let r = c.get(gw.url("http", "/plain/ok")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let m = gw.metrics().await;
    for (name, _, cause) in expect {
        if cause.is_empty() {
            continue;
        }
        let key = format!(
            "wasmgate_hook_failures_total{{cause=\"{cause}\",module=\"{name}\",tenant=\"evil\"}}"
        );
        assert_eq!(metric(&m, &key), 2.0, "{key}\n{m}");
    }
    assert!(
        gw.log().contains(
            "tenant=evil module=loop_req callback=\"on_request_headers\" cause=\"budget_overrun\""
        ),
        "{}",
        gw.log()
    );

    // memory returns to baseline: many more bomb and huge requests do not grow the process
    let before = rss_kb(pid);
    for _ in 0..100 {
        for name in ["bomb", "huge", "recurse"] {
            let r = c
                .get(gw.url("http", &format!("/{name}/x")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
        }
    }
    let after = rss_kb(pid);
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_vm_is_replaced_and_isolation_modes_hold() {
    let up = Upstream::start("echo").await;
    // counts requests in a global and reports the count in a request header upstream;
    // traps when the request has an x-crash header
    let counting = r#"
      (global.set $count (i32.add (global.get $count) (i32.const 1)))
      (i32.store8 (i32.const 64) (i32.add (i32.const 48) (global.get $count)))
      (drop (call $add (i32.const 0) (i32.const 32) (i32.const 7) (i32.const 64) (i32.const 1)))
      (if (i32.eq (call $get (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 128) (i32.const 132)) (i32.const 0))
        (then unreachable))
    "#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("shared", wat_module(counting, "", "", 1), ""),
        (
            "fresh",
            wat_module(counting, "", "", 1),
            "isolation = \"request\"",
        ),
    ];
    let gw = hostile_gateway(&up.addr(), &cases);
    let c = client();
    let count = |name: &'static str| {
        let c = c.clone();
        let url = gw.url("http", &format!("/{name}/x"));
        async move {
            let v: Value = c.get(url).send().await.unwrap().json().await.unwrap();
            v["headers"]["x-count"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(count("shared").await, "1");
    assert_eq!(count("shared").await, "2");
    assert_eq!(count("fresh").await, "1");
    assert_eq!(count("fresh").await, "1");
    // a trap discards the VM; the next request gets a new one (its count starts over)
    let r = c
        .get(gw.url("http", "/shared/x"))
        .header("x-crash", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(count("shared").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_modules_answer_503_after_a_short_wait() {
    let slow = Upstream::with(UpstreamOpts {
        name: "slow-auth".into(),
        delay: Duration::from_millis(800),
        ..Default::default()
    })
    .await;
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + &format!(
            r#"
[upstreams.auth]
targets = ["{}"]
[modules.ext]
path = "{{guests}}/ext_auth.wasm"
config = {{ upstream = "auth", path = "/auth/check", timeout_ms = 2000 }}
allowed_upstreams = ["auth"]
max_instances = 1
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["ext"]
"#,
            slow.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    let url = gw.url("http", "/api/x");
    let first = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move {
            c.get(url)
                .bearer_auth("demo-token")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let r = c.get(&url).bearer_auth("demo-token").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(t.elapsed() < Duration::from_millis(600));
    assert_eq!(first.await.unwrap(), 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wasmgate_hook_failures_total{cause=\"instances_exhausted\",module=\"ext\""
        ),
        1.0
    );
}

#[test]
fn modules_that_are_not_proxy_wasm_or_loop_at_start_are_conf_errors() {
    let dir = tempfile::tempdir().unwrap();
    let plain =
        wat::parse_str("(module (memory (export \"memory\") 1) (func (export \"run\")))").unwrap();
    let loops = wat_module("", "", "", 1);
    let loops = {
        // same module, but on_configure never returns
        let text = String::from_utf8_lossy(&loops).to_string();
        let _ = text;
        wat::parse_str(
            r#"(module (memory (export "memory") 1)
              (func (export "proxy_abi_version_0_2_1"))
              (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
              (func (export "proxy_on_context_create") (param i32 i32))
              (func (export "proxy_on_configure") (param i32 i32) (result i32) (loop $l (br $l)) (i32.const 1)))"#,
        )
        .unwrap()
    };
    let imports = wat::parse_str(
        r#"(module (import "env" "launch_missiles" (func (param i32)))
          (memory (export "memory") 1)
          (func (export "proxy_abi_version_0_2_1"))
          (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
          (func (export "proxy_on_context_create") (param i32 i32)))"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("plain.wasm"), plain).unwrap();
    std::fs::write(dir.path().join("loops.wasm"), loops).unwrap();
    std::fs::write(dir.path().join("imports.wasm"), imports).unwrap();
    let conf = dir.path().join("c.toml");
    std::fs::write(
        &conf,
        "[[listeners]]\nlisten = \"127.0.0.1:1\"\n\
         [modules.plain]\npath = \"plain.wasm\"\n\
         [modules.loops]\npath = \"loops.wasm\"\n\
         [modules.imports]\npath = \"imports.wasm\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("module `plain`: does not export proxy_abi_version_0_2_1"),
        "{err}"
    );
    assert!(
        err.contains("module `loops`: on_configure failed: ran out of its time budget"),
        "{err}"
    );
    assert!(
        err.contains("module `imports`: imports something this host does not provide"),
        "{err}"
    );
    assert!(err.contains("launch_missiles"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_precompiled_modules() {
    let up = Upstream::start("echo").await;
    let dir = tempfile::tempdir().unwrap();
    let conf = base(&up.addr())
        + r#"
[modules.hello]
path = "{guests}/hello_api.wasm"
[[routes]]
path_prefix = "/hello"
hooks = ["hello"]
"#;
    let gw = Gw::start_in(dir, &conf, Default::default());
    assert!(
        gw.wait_log("precompiled=false", Duration::from_secs(5))
            .await,
        "{}",
        gw.log()
    );
    // it went live on baseline code; the artifact is written with its optimized code
    assert!(
        gw.wait_log("module optimized", Duration::from_secs(30))
            .await,
        "{}",
        gw.log()
    );
    let (dir, ports) = gw.stop();
    let gw = Gw::start_in(dir, &conf, ports);
    assert!(
        gw.wait_log("precompiled=true", Duration::from_secs(5))
            .await,
        "{}",
        gw.log()
    );
    let r = client()
        .get(gw.url("http", "/hello/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A Proxy-Wasm module in WAT with the plumbing the resource tests share: a bump
/// allocator that grows memory (reset for every context, heap from 2 MiB), `$itoa`, and
/// `$respond` answering 200 with a number as the body. `items` adds the callbacks.
fn raw_module(imports: &str, pages: u32, items: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  {imports}
  (memory (export "memory") {pages})
  (global $heap (mut i32) (i32.const 2097152))
  (global $mid (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local $have i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (global.get $heap) (local.get $have))
      (then (drop (memory.grow (i32.add (i32.const 1)
        (i32.div_u (i32.sub (global.get $heap) (local.get $have)) (i32.const 65536)))))))
    (local.get $p))
  (func $itoa (param $n i32) (param $at i32) (result i32)
    (local $len i32) (local $t i32) (local $i i32)
    (local.set $t (local.get $n))
    (local.set $len (i32.const 1))
    (block $d (loop $l
      (br_if $d (i32.lt_u (local.get $t) (i32.const 10)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (br $l)))
    (local.set $i (local.get $len))
    (local.set $t (local.get $n))
    (loop $w
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $at) (local.get $i))
        (i32.add (i32.const 48) (i32.rem_u (local.get $t) (i32.const 10))))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $w (i32.gt_u (local.get $i) (i32.const 0))))
    (local.get $len))
  (func $respond (param $n i32)
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 512)
      (call $itoa (local.get $n) (i32.const 512)) (i32.const 0) (i32.const 0) (i32.const -1))))
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $heap (i32.const 2097152)))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
  {items}
)"#
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad WAT: {e}\n{text}"))
}

/// A guest that stores whatever it is asked to in shared data and queues: `x-op` picks
/// the call (`d`: set key `x-arg` to 1 MiB, `D`: to 9 MiB, `e`: enqueue 1 MiB on queue
/// `x-arg`, `q`: dequeue from it, `n`: register it, `r`: register queues until refused),
/// and the answer's body is the call's status (for `r`, how many queues it registered).
fn hoarder() -> Vec<u8> {
    raw_module(
        r#"
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))"#,
        160,
        r#"
  (data (i32.const 16) "x-op")
  (data (i32.const 32) "x-arg")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $op i32) (local $st i32) (local $i i32) (local $ap i32) (local $an i32)
    (drop (call $get (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 1024) (i32.const 1028)))
    (local.set $op (i32.load8_u (i32.load (i32.const 1024))))
    (drop (call $get (i32.const 0) (i32.const 32) (i32.const 5) (i32.const 1032) (i32.const 1036)))
    (local.set $ap (i32.load (i32.const 1032)))
    (local.set $an (i32.load (i32.const 1036)))
    (if (i32.eq (local.get $op) (i32.const 100))
      (then (local.set $st (call $set (local.get $ap) (local.get $an) (i32.const 65536) (i32.const 1048576) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 68))
      (then (local.set $st (call $set (local.get $ap) (local.get $an) (i32.const 0) (i32.const 9437184) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 101))
      (then
        (drop (call $reg (local.get $ap) (local.get $an) (i32.const 1040)))
        (local.set $st (call $enq (i32.load (i32.const 1040)) (i32.const 65536) (i32.const 1048576)))))
    (if (i32.eq (local.get $op) (i32.const 113))
      (then
        (drop (call $reg (local.get $ap) (local.get $an) (i32.const 1040)))
        (local.set $st (call $deq (i32.load (i32.const 1040)) (i32.const 1044) (i32.const 1048)))))
    (if (i32.eq (local.get $op) (i32.const 110))
      (then (local.set $st (call $reg (local.get $ap) (local.get $an) (i32.const 1040)))))
    (if (i32.eq (local.get $op) (i32.const 114))
      (then
        (block $done (loop $l
          (i32.store16 (i32.const 1100) (local.get $i))
          (br_if $done (i32.ne (call $reg (i32.const 1100) (i32.const 2) (i32.const 1040)) (i32.const 0)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 300)))))
        (local.set $st (local.get $i))))
    (call $respond (local.get $st))
    (i32.const 0))"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_and_queues_are_capped_per_tenant() {
    let up = Upstream::start("echo").await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("hoard", hoarder(), ""),
        ("neighbour", hoarder(), "tenant = \"other\""),
    ];
    let gw = hostile_gateway(&up.addr(), &cases);
    let c = client();
    let call = |module: &'static str, op: &'static str, arg: String| {
        let c = c.clone();
        let url = gw.url("http", &format!("/{module}/x"));
        async move {
            let r = c
                .get(url)
                .header("x-op", op)
                .header("x-arg", arg)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    // shared data: 8 MiB per tenant, counting keys, values and 64 bytes per key
    for i in 1..=7 {
        assert_eq!(call("hoard", "d", format!("k{i}")).await, "0", "key {i}");
    }
    assert_eq!(call("hoard", "d", "k8".into()).await, "10"); // InternalFailure: full
    assert_eq!(call("hoard", "d", "k1".into()).await, "0"); // same size: replaces
    assert_eq!(call("hoard", "D", "big".into()).await, "2"); // BadArgument: can never fit
    assert_eq!(call("neighbour", "d", "k8".into()).await, "0"); // another tenant's quota
                                                                // queues: 4 MiB per queue, 8 MiB per tenant
    for _ in 0..4 {
        assert_eq!(call("hoard", "e", "a".into()).await, "0");
    }
    assert_eq!(call("hoard", "e", "a".into()).await, "10");
    for _ in 0..4 {
        assert_eq!(call("hoard", "e", "b".into()).await, "0");
    }
    assert_eq!(call("hoard", "e", "c".into()).await, "10"); // empty queue, tenant full
    assert_eq!(call("hoard", "q", "a".into()).await, "0");
    assert_eq!(call("hoard", "e", "c".into()).await, "0"); // the dequeue freed 1 MiB
                                                           // names are kept forever: at most 256 bytes (BadArgument beyond)
    assert_eq!(call("hoard", "n", "n".repeat(257)).await, "2");
    assert_eq!(call("hoard", "n", "n".repeat(256)).await, "0");
    // 256 queues per tenant; a, b, c and the 256-byte one exist
    assert_eq!(call("hoard", "r", String::new()).await, "252");

    let m = gw.metrics().await;
    let refused = |cause: &str| {
        metric(
            &m,
            &format!("wasmgate_hook_failures_total{{cause=\"{cause}\",module=\"hoard\",tenant=\"evil\"}}"),
        )
    };
    assert_eq!(refused("shared_data_full"), 2.0, "{m}");
    assert_eq!(refused("queue_full"), 3.0, "{m}");
    assert_eq!(refused("queue_name_too_long"), 1.0, "{m}");
    assert!(
        gw.log()
            .contains("tenant=evil module=hoard cause=\"shared_data_full\""),
        "{}",
        gw.log()
    );

    // a guest that keeps writing new keys no longer grows the gateway
    let before = rss_kb(gw.child.id());
    for i in 0..200 {
        assert_eq!(call("hoard", "d", format!("n{i}")).await, "10");
    }
    let after = rss_kb(gw.child.id());
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
}

/// `/metrics` once `ready` holds for it, or after 5 s: requests are metered in their
/// logging phase, which runs after the client has its answer.
async fn metrics_when(gw: &Gw, ready: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = gw.metrics().await;
        if ready(&m) || std::time::Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wasi_module(on_request_headers: &str, data: &str) -> Vec<u8> {
    raw_module(
        r#"
  (import "wasi_snapshot_preview1" "random_get" (func $rand (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))"#,
        3,
        &format!(
            r#"
  {data}
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $i i32)
    {on_request_headers}
    (i32.const 0))"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_calls_pay_fuel_and_are_capped() {
    let up = Upstream::start("echo").await;
    // 64 KiB of one-character lines, written through 1,024 iovecs per call, forever
    let lines = format!("(data (i32.const 65536) \"{}\")", "a\\n".repeat(32 * 1024));
    let write_loop = r#"
      (loop $fill
        (i32.store (i32.add (i32.const 8192) (i32.mul (local.get $i) (i32.const 8))) (i32.const 65536))
        (i32.store (i32.add (i32.const 8196) (i32.mul (local.get $i) (i32.const 8))) (i32.const 65536))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $fill (i32.lt_u (local.get $i) (i32.const 1024))))
      (loop $l (drop (call $write (i32.const 1) (i32.const 8192) (i32.const 1024) (i32.const 1024))) (br $l))"#;
    let write_ok = r#"
      (i32.store (i32.const 8192) (i32.const 200))
      (i32.store (i32.const 8196) (i32.const 11))
      (drop (call $write (i32.const 1) (i32.const 8192) (i32.const 1) (i32.const 1024)))
      (call $respond (i32.load (i32.const 1024)))"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "rand_loop",
            wasi_module(
                "(loop $l (drop (call $rand (i32.const 65536) (i32.const 65536))) (br $l))",
                "",
            ),
            "",
        ),
        (
            "rand_sizes",
            wasi_module(
                "(call $respond (i32.add (i32.mul (call $rand (i32.const 0) (i32.const 8388608)) (i32.const 100))
                   (call $rand (i32.const 0) (i32.const 16))))",
                "",
            ),
            "",
        ),
        ("write_loop", wasi_module(write_loop, &lines), ""),
        (
            "write_ok",
            wasi_module(write_ok, "(data (i32.const 200) \"hello wasi\\n\")"),
            "",
        ),
    ];
    let gw = hostile_gateway(&up.addr(), &cases);
    let c = client();
    for name in ["rand_loop", "write_loop"] {
        // before WASI calls paid fuel, each of these ran for tens of seconds
        let t = std::time::Instant::now();
        let r = c
            .get(gw.url("http", &format!("/{name}/x")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{name}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            t.elapsed()
        );
    }
    // 8 MiB at once is refused (EINVAL 28), 16 bytes are served (0)
    let r = c.get(gw.url("http", "/rand_sizes/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "2800");
    let r = c.get(gw.url("http", "/write_ok/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "11");
    assert!(gw.wait_log("hello wasi", Duration::from_secs(2)).await);
    let m = gw.metrics().await;
    for name in ["rand_loop", "write_loop"] {
        let key = format!(
            "wasmgate_hook_failures_total{{cause=\"budget_overrun\",module=\"{name}\",tenant=\"evil\"}}"
        );
        assert_eq!(metric(&m, &key), 1.0, "{key}\n{m}");
    }
    // the write that could not be paid for logged nothing
    let log = gw.log();
    let guest_lines = log
        .lines()
        .filter(|l| l.contains("module=write_loop"))
        .filter(|l| !l.contains("module loaded") && !l.contains("hook failed"))
        .count();
    assert_eq!(guest_lines, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overruns_and_traps_are_billed_the_fuel_they_burned() {
    let up = Upstream::start("echo").await;
    let head = base(&up.addr())
        + "[admin]\nlisten = \"127.0.0.1:{port:admin}\"\ntoken = \"operator-secret\"\n";
    let work_then_trap = r#"
      (local.set $n (i32.const 100000))
      (loop $l (br_if $l (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
      unreachable"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("spin", wat_module(SPIN, "", "", 1), ""),
        ("work_trap", wat_module(work_then_trap, "", "", 1), ""),
    ];
    let gw = hostile_gateway_with(&head, &cases);
    let c = client();
    for _ in 0..5 {
        for name in ["spin", "work_trap"] {
            let r = c
                .get(gw.url("http", &format!("/{name}/x")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
        }
    }
    let spins = "wasmgate_hook_cpu_seconds_count{module=\"spin\",tenant=\"evil\"}";
    let traps = "wasmgate_hook_cpu_seconds_count{module=\"work_trap\",tenant=\"evil\"}";
    let m = metrics_when(&gw, |m| metric(m, spins) >= 5.0 && metric(m, traps) >= 5.0).await;
    let fuel = |name: &str| {
        metric(
            &m,
            &format!("wasmgate_hook_fuel_total{{module=\"{name}\",tenant=\"evil\"}}"),
        )
    };
    // budget_us = 2000: each overrun burned its whole 2,000,000 units
    assert!(fuel("spin") >= 10_000_000.0, "{m}");
    assert!(fuel("work_trap") >= 5.0 * 200_000.0, "{m}");
    assert_eq!(metric(&m, spins), 5.0, "{m}");
    let r = c
        .get(gw.url("admin", "/v1/tenants/evil/usage?from=0"))
        .bearer_auth("operator-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let spin = &v["modules"]["spin"];
    assert!(spin["wasm_cpu_us"].as_u64().unwrap() >= 10_000, "{v}");
    assert_eq!(spin["budget_overruns"], 5, "{v}");
    let trap = &v["modules"]["work_trap"];
    assert!(trap["wasm_cpu_us"].as_u64().unwrap() >= 1_000, "{v}");
    assert_eq!(trap["traps"], 5, "{v}");
}

/// An upstream answering every GET with `len` bytes of `x`, written 16 KiB at a time.
async fn big_upstream(len: usize) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let body = vec![b'x'; len];
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    };
                    buf.drain(..end);
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for chunk in body.chunks(16 * 1024) {
                        if s.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A module whose `on_response_body` counts its calls in the guest counter `body_calls`
/// and then runs `on_body` (which leaves the action on the stack).
fn body_module(on_body: &str) -> Vec<u8> {
    raw_module(
        r#"
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $defm (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incm (param i32 i64) (result i32)))"#,
        2,
        &format!(
            r#"
  (data (i32.const 48) "body_calls")
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $defm (i32.const 0) (i32.const 48) (i32.const 10) (i32.const 1060)))
    (global.set $mid (i32.load (i32.const 1060)))
    (i32.const 1))
  ;; sums `len` bytes at `p`: about 8 fuel per byte
  (func $scan (param $p i32) (param $len i32) (result i32)
    (local $end i32) (local $sum i32)
    (local.set $end (i32.add (local.get $p) (local.get $len)))
    (block $d (loop $l
      (br_if $d (i32.ge_u (local.get $p) (local.get $end)))
      (local.set $sum (i32.add (local.get $sum) (i32.load8_u (local.get $p))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $l)))
    (local.get $sum))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (local $i i32)
    (drop (call $incm (global.get $mid) (i64.const 1)))
    {on_body})"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_callbacks_do_not_exhaust_the_request_budget_on_large_bodies() {
    const LEN: usize = 8 << 20;
    let (addr, _up) = big_upstream(LEN).await;
    // ~1.2 ms of fixed work per chunk (the callback budget is 2 ms, the request's 16 ms)
    let per_chunk = r#"
      (local.set $i (i32.const 200000))
      (loop $l (br_if $l (local.tee $i (i32.sub (local.get $i) (i32.const 1)))))
      (i32.const 0)"#;
    // the SDKs' http_body example: buffer to the end, then read and scan the whole body
    let scan_at_end = r#"
      (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
      (drop (call $buf (i32.const 1) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
      (drop (call $scan (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))
      (i32.const 0)"#;
    // hostile: re-reads and scans everything buffered so far on every chunk (quadratic)
    let rescan = r#"
      (drop (call $buf (i32.const 1) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
      (drop (call $scan (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))
      (global.set $heap (i32.const 2097152))
      (i32.eqz (local.get $eos))"#;
    let spin = "(loop $l (br $l)) (i32.const 0)";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("per_chunk", body_module(per_chunk), ""),
        ("scan", body_module(scan_at_end), "memory_mb = 32"),
        ("rescan", body_module(rescan), "memory_mb = 32"),
        ("body_spin", body_module(spin), ""),
    ];
    let gw = hostile_gateway(&addr, &cases);
    let c = client();
    for name in ["per_chunk", "scan"] {
        let r = c
            .get(gw.url("http", &format!("/{name}/x")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), LEN, "{name}");
        assert!(body.iter().all(|b| *b == b'x'), "{name}");
    }
    for name in ["rescan", "body_spin"] {
        let complete = match c.get(gw.url("http", &format!("/{name}/x"))).send().await {
            Ok(r) => {
                let ok = r.status() == 200;
                matches!(r.bytes().await, Ok(b) if ok && b.len() == LEN)
            }
            Err(_) => false,
        };
        assert!(!complete, "{name} got its whole body through");
    }
    let done = |name: &str| format!("wasmgate_hook_cpu_seconds_count{{module=\"{name}\"");
    let m = metrics_when(&gw, |m| {
        ["per_chunk", "scan", "rescan", "body_spin"]
            .iter()
            .all(|n| metric(m, &done(n)) >= 1.0)
    })
    .await;
    let failures = |name: &str| {
        metric(
            &m,
            &format!("wasmgate_hook_failures_total{{cause=\"budget_overrun\",module=\"{name}\""),
        )
    };
    let fuel = |name: &str| {
        metric(
            &m,
            &format!("wasmgate_hook_fuel_total{{module=\"{name}\",tenant=\"evil\"}}"),
        )
    };
    let calls = |name: &str| {
        metric(
            &m,
            &format!("wasmgate_guest_counter{{module=\"{name}\",name=\"body_calls\""),
        )
    };
    assert_eq!(failures("per_chunk"), 0.0, "{m}");
    assert_eq!(failures("scan"), 0.0, "{m}");
    // both did more than the old limits allowed: per_chunk more than the 16 ms request
    // budget in total, scan more than the 2 ms callback budget in its last callback
    assert!(fuel("per_chunk") > 16_000_000.0, "{m}");
    assert!(fuel("scan") > 16_000_000.0, "{m}");
    eprintln!(
        "body callbacks for {LEN} bytes: per_chunk {}, scan {}; fuel per_chunk {}, scan {}",
        calls("per_chunk"),
        calls("scan"),
        fuel("per_chunk"),
        fuel("scan")
    );
    assert_eq!(failures("rescan"), 1.0, "{m}");
    assert_eq!(failures("body_spin"), 1.0, "{m}");
    assert!(
        gw.log().contains(
            "tenant=evil module=rescan callback=\"on_response_body\" cause=\"budget_overrun\""
        ),
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_retire_the_modules_they_replace() {
    // a module whose root context ticks every 20 ms and counts its ticks in a metric
    let ticker = wat::parse_str(
        r#"(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $period (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incr (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ticks")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 64)))
    (drop (call $period (i32.const 20)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $incr (i32.load (i32.const 64)) (i64.const 1)))))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticker.wasm");
    std::fs::write(&path, ticker).unwrap();
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + &format!(
            "[modules.ticker]\npath = \"{}\"\n[[routes]]\npath_prefix = \"/t\"\nupstream = \"echo\"\nhooks = [\"ticker\"]\n",
            path.display()
        );
    let gw = Gw::start(&conf);
    let ticks = || async {
        metric(
            &gw.metrics().await,
            "wasmgate_guest_counter{module=\"ticker\",name=\"ticks\"",
        )
    };
    let rate = || async {
        let a = ticks().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        ticks().await - a
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rate().await;
    assert!(before >= 10.0, "the module does not tick: {before}/s");
    let rss_before = rss_kb(gw.child.id());
    for generation in 2..=21 {
        gw.signal(libc::SIGHUP);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metric(&gw.metrics().await, "wasmgate_config_generation") < generation as f64 {
            assert!(
                std::time::Instant::now() < deadline,
                "reload {generation} never applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // twenty reloads later one module ticks, not twenty-one
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rate().await;
    assert!(
        after < before * 1.8,
        "replaced modules still tick: {before}/s before, {after}/s after 20 reloads"
    );
    let grown_mb = rss_kb(gw.child.id()).saturating_sub(rss_before) / 1024;
    assert!(grown_mb < 30, "20 reloads kept {grown_mb} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_tick_comes_one_period_after_start_and_local_replies_are_typed() {
    // ticks every 600 ms, counting; answers every request locally with an untyped body
    let module = wat::parse_str(
        r#"(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $period (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incr (param i32 i64) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ticks")
  (data (i32.const 32) "plain words")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 64)))
    (drop (call $period (i32.const 600)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $incr (i32.load (i32.const 64)) (i64.const 1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 32) (i32.const 11)
      (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1)))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timer.wasm");
    std::fs::write(&path, module).unwrap();
    // and one that answers in place of the upstream's response, from its headers
    let late = wat_module(
        "",
        "(drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 32) (i32.const 7)
           (i32.const 0) (i32.const 0) (i32.const -1)))",
        "",
        1,
    );
    let late_path = dir.path().join("late.wasm");
    std::fs::write(&late_path, late).unwrap();
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + &format!(
            "[modules.timer]\npath = \"{}\"\n[[routes]]\npath_prefix = \"/t\"\nhooks = [\"timer\"]\n\
             [modules.late]\npath = \"{}\"\n[[routes]]\npath_prefix = \"/late\"\nupstream = \"echo\"\nhooks = [\"late\"]\n",
            path.display(),
            late_path.display()
        );
    let started = std::time::Instant::now();
    let gw = Gw::start(&conf);
    let ticks = || async {
        metric(
            &gw.metrics().await,
            "wasmgate_guest_counter{module=\"timer\",name=\"ticks\"",
        )
    };
    if started.elapsed() < Duration::from_millis(450) {
        assert_eq!(
            ticks().await,
            0.0,
            "a tick came at start, before one period"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed())).await;
    assert!(ticks().await >= 1.0, "no tick after one period");
    // Envoy types a local reply's body as text/plain when the filter did not
    let r = client().get(gw.url("http", "/t")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "plain words");
    // a reply in the response phase replaces the upstream's head: typed the same way
    let r = client().get(gw.url("http", "/late")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "x-count");
}

/// Local replies go down the response callbacks like Envoy's: a CORS-style module that
/// sets a response header applies to another module's denial, to a module's own answer
/// on a route without upstream, and to the gateway's own errors; a module that never saw
/// the request (an earlier one answered first) is not called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_go_through_the_response_callbacks() {
    let up = Upstream::start("echo").await;
    let (dead, _dead) = refusing_port();
    let conf = base(&up.addr())
        + &format!(
            r#"
[upstreams.dead]
targets = ["127.0.0.1:{dead}"]
retries = 0
[modules.cors]
path = "{{guests}}/rewrite.wasm"
config = {{ response = {{ set_headers = {{ "access-control-allow-origin" = "*" }}, remove_headers = ["x-served-by"] }} }}
[modules.auth]
path = "{{guests}}/api_key_auth.wasm"
config = {{ keys = ["k1"] }}
[modules.hello]
path = "{{guests}}/hello_api.wasm"
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["cors", "auth"]
[[routes]]
path_prefix = "/late"
upstream = "echo"
hooks = ["auth", "cors"]
[[routes]]
path_prefix = "/down"
upstream = "dead"
hooks = ["cors"]
[[routes]]
path_prefix = "/hello"
hooks = ["cors", "hello"]
"#
        );
    let gw = Gw::start(&conf);
    let c = client();
    // a later module's denial passes through the earlier module's response callbacks
    let r = c.get(gw.url("http", "/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.text().await.unwrap(), r#"{"error":"missing_api_key"}"#);
    let r = c
        .get(gw.url("http", "/api/x"))
        .header("x-api-key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    // the module that answered first is the only one that saw the request
    let r = c.get(gw.url("http", "/late/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // the gateway's own error on a hooked route is a local reply too
    let r = c.get(gw.url("http", "/down/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "upstream_unreachable");
    // a backend module's own answer: the earlier module changes its headers
    let r = c.get(gw.url("http", "/hello/ann")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers().get("x-served-by").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["hello"], "ann");
    // HEAD of a denied request: headers only, the length of the body it would have had
    let r = c.head(gw.url("http", "/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.headers()["content-length"], "27");
}

/// The root context at work (the token-gate guest, built with the Rust SDK): its callouts
/// from `on_configure` and `on_tick` are answered on the root; a request paused with no
/// body to come is resumed from the root's callout answer (after switching to its context
/// and setting a header), answered from there when the token cannot be had, or resumed
/// from `on_queue_ready` when another request enqueues; switching to an unknown context
/// is BadArgument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_context_calls_out_and_resumes_requests() {
    let up = Upstream::start("echo").await;
    let (dead, _dead) = refusing_port();
    let conf = base(&up.addr())
        + &format!(
            r#"
[upstreams.dead]
targets = ["127.0.0.1:{dead}"]
[modules.fresh]
path = "{{guests}}/token_gate.wasm"
isolation = "request"
allowed_upstreams = ["echo"]
config = {{ upstream = "echo", path = "/token" }}
[modules.nowhere]
path = "{{guests}}/token_gate.wasm"
isolation = "request"
allowed_upstreams = ["dead"]
config = {{ upstream = "dead", path = "/token" }}
[modules.ticking]
path = "{{guests}}/token_gate.wasm"
max_instances = 4
allowed_upstreams = ["echo"]
config = {{ upstream = "echo", path = "/token", tick_ms = 100, queue = "gate" }}
[[routes]]
path_prefix = "/fresh"
upstream = "echo"
hooks = ["fresh"]
[[routes]]
path_prefix = "/nowhere"
upstream = "echo"
hooks = ["nowhere"]
[[routes]]
path_prefix = "/tick"
upstream = "echo"
hooks = ["ticking"]
"#
        );
    let gw = Gw::start(&conf);
    let c = client();
    // A fresh VM per request: its on_configure fetches a token, the request waits for the
    // answer, and the root resumes it with the token in a header.
    for _ in 0..3 {
        let r = c.get(gw.url("http", "/fresh/a")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], "/fresh/a");
        let token = v["headers"]["x-token"].as_str().unwrap_or_default();
        assert!(token.starts_with('t'), "{v}");
    }
    // the token fetches were made to the upstream: one per VM (the conf load's and three)
    let fetches = up.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(fetches >= 6, "{fetches} upstream requests");

    // The token cannot be had: the root answers the paused request itself.
    let r = c.get(gw.url("http", "/nowhere/a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gate"], "no-token");
    assert_eq!(r.text().await.unwrap(), "no token\n");

    // A ticking root refreshes the token; a request waiting on the gate's queue is resumed
    // from on_queue_ready when another request enqueues.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c.get(gw.url("http", "/tick/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let n: u64 = r.headers()["x-fetches"].to_str().unwrap().parse().unwrap();
    assert!(
        n >= 3,
        "only {n} token answers after 600 ms of 100 ms ticks"
    );
    // `x-bad-context` is what the serving VM's own on_tick got; a request can land on a
    // VM the pool just made (the ticker had the idle ones out), so ask until one ticked
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut bad = r.headers()["x-bad-context"].to_str().unwrap().to_string();
    while bad != "2" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = c.get(gw.url("http", "/tick/a")).send().await.unwrap();
        bad = r.headers()["x-bad-context"].to_str().unwrap().to_string();
    }
    assert_eq!(bad, "2");
    let waiter = {
        let (c, url) = (c.clone(), gw.url("http", "/tick/queue"));
        tokio::spawn(async move { c.get(url).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the queue waiter must wait");
    let r = c.get(gw.url("http", "/tick/kick")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("resumed from on_queue_ready")
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-token"], "queued");
    // the gateway still serves, and nothing was logged as a hook failure
    let m = gw.metrics().await;
    assert!(!m.contains("paused_too_long"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_log_comes_after_on_done_and_reads_the_response() {
    // Envoy's order at a stream's end is on_done, on_log, on_delete, and its access-log
    // phase reads the response head as sent (but cannot change it)
    let module = wat::parse_str(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $done (mut i32) (i32.const 0))
  (data (i32.const 16) "x-upstream")
  (data (i32.const 32) "echo")
  (data (i32.const 64) "on_log after on_done saw x-upstream and could not change it")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $done (i32.const 0)))
  (func (export "proxy_on_done") (param i32) (result i32) (global.set $done (i32.const 1)) (i32.const 1))
  (func (export "proxy_on_log") (param i32)
    (if (i32.eqz (global.get $done)) (then (return)))
    (if (call $get (i32.const 2) (i32.const 16) (i32.const 10) (i32.const 200) (i32.const 204)) (then (return)))
    (if (i32.ne (i32.load (i32.const 204)) (i32.const 4)) (then (return)))
    (if (i32.ne (i32.load (i32.load (i32.const 200))) (i32.load (i32.const 32))) (then (return)))
    ;; BadArgument (2): the head is read-only here
    (if (i32.ne (call $add (i32.const 2) (i32.const 16) (i32.const 10) (i32.const 32) (i32.const 4)) (i32.const 2)) (then (return)))
    (drop (call $log (i32.const 2) (i32.const 64) (i32.const 59)))))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("logger.wasm"), module).unwrap();
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + &format!(
            "[modules.logger]\npath = \"{}/logger.wasm\"\n[upstreams.echo]\ntargets = [\"{}\"]\n[[routes]]\nupstream = \"echo\"\nhooks = [\"logger\"]\n",
            dir.path().display(),
            up.addr()
        );
    let gw = Gw::start(&conf);
    let r = client().get(gw.url("http", "/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gw
        .log()
        .contains("on_log after on_done saw x-upstream and could not change it")
    {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! Proxy-Wasm hooks through the real gateway: the example guests built from `guests/`,
//! a probe guest that checks every host call from inside, and hostile modules written
//! in WAT that loop, grow memory, recurse, trap, abuse pointers, answer huge bodies or
//! never resume. Each hostile case must get its policy's answer while the gateway and
//! its other routes keep serving.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
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
        let head = read_response(&mut s);
        let want = if key == "k1" {
            "HTTP/1.1 200"
        } else {
            "HTTP/1.1 401"
        };
        assert!(head.starts_with(want), "{key}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
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

/// Reads one HTTP/1.1 response with a content-length body; returns head and body.
fn read_response(s: &mut std::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        buf.push(b[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
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
async fn external_auth_pauses_on_an_http_callout() {
    let up = Upstream::start("echo").await;
    let dead = free_port();
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
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"auth_unavailable"}"#);
    // an upstream the module was not granted is refused at dispatch
    let r = c
        .get(gw.url("http", "/sneaky/x"))
        .bearer_auth("demo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_guest_checks_every_host_call_from_inside() {
    let up = Upstream::start("echo").await;
    let conf = base(&up.addr())
        + r#"
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
    assert!(
        metric(
            &m,
            "wasmgate_guest_counter{module=\"probe\",name=\"probe_logged\""
        ) >= 3.0
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

/// Gateway with one route per hostile module; returns it and the module names.
fn hostile_gateway(up: &str, cases: &[(&str, Vec<u8>, &str)]) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let mut conf = base(up);
    for (name, wasm, extra) in cases {
        let p = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&p, wasm).unwrap();
        conf += &format!(
            "[modules.{name}]\ntenant = \"evil\"\npath = \"{}\"\nbudget_us = 2000\n{extra}\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"echo\"\nhooks = [\"{name}\"]\n",
            p.display()
        );
    }
    conf += "[tenants.evil]\n";
    Gw::start_in(dir, &conf, Default::default())
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
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
    let slow = Upstream::with(wasmgate::demo::UpstreamOpts {
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

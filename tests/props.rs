//! Proxy-Wasm details Envoy filters rely on, through the real gateway with raw-ABI
//! modules in WAT (the SDKs cannot express these cases): end-of-stream flags, request
//! headers in the response phase, `proxy_done` after `on_done` answered false, v0.1.0
//! modules, and a local reply's details in the access log. The probe guest
//! (`tests/hooks.rs`) checks the properties from inside.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Writes each module to the gateway's folder and gives it a route `/{name}` to `echo`.
fn gateway(head: &str, up: &str, modules: &[(&str, String, &str)]) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let mut conf = format!("{HEAD}{head}\n[upstreams.echo]\ntargets = [\"{up}\"]\n");
    for (name, wat, extra) in modules {
        let wasm = wat::parse_str(wat).unwrap_or_else(|e| panic!("bad WAT: {e}\n{wat}"));
        let p = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&p, wasm).unwrap();
        conf += &format!(
            "[modules.{name}]\npath = \"{}\"\n{extra}\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"echo\"\nhooks = [\"{name}\"]\n",
            p.display()
        );
    }
    Gw::start_in(dir, &conf, Default::default())
}

/// A bump allocator and the metric helpers every module here shares.
const PLUMBING: &str = r#"
  (global $heap (mut i32) (i32.const 8192))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (data (i32.const 200) "0123456789")
"#;

async fn counter(gw: &Gw, module: &str, name: &str) -> f64 {
    metric(
        &gw.metrics().await,
        &format!("wasmgate_guest_counter{{module=\"{module}\",name=\"{name}\""),
    )
}

/// Waits until `module`'s counter `name` is at least `at_least`; its last value.
async fn counter_reaches(
    gw: &Gw,
    module: &str,
    name: &str,
    at_least: f64,
    within: Duration,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = counter(gw, module, name).await;
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reports `end_of_stream` of both header callbacks as response headers `x-req-eos` and
/// `x-resp-eos`, the status of replacing a request header from the response phase as
/// `x-replace-req`, and counts body callbacks in the metric `body_calls`.
fn eos_module() -> String {
    format!(
        r#"(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incr (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  {PLUMBING}
  (global $req_eos (mut i32) (i32.const 9))
  (data (i32.const 100) "x-req-eos")
  (data (i32.const 120) "x-resp-eos")
  (data (i32.const 140) "x-replace-req")
  (data (i32.const 160) "x-remove-req")
  (data (i32.const 220) "x-a")
  (data (i32.const 240) "body_calls")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 240) (i32.const 10) (i32.const 300)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $req_eos (local.get 2))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32) (param $eos i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 100) (i32.const 9)
      (i32.add (i32.const 200) (global.get $req_eos)) (i32.const 1)))
    (drop (call $add (i32.const 2) (i32.const 120) (i32.const 10)
      (i32.add (i32.const 200) (local.get $eos)) (i32.const 1)))
    (drop (call $add (i32.const 2) (i32.const 140) (i32.const 13)
      (i32.add (i32.const 200)
        (call $replace (i32.const 0) (i32.const 220) (i32.const 3) (i32.const 200) (i32.const 1)))
      (i32.const 1)))
    (drop (call $add (i32.const 2) (i32.const 160) (i32.const 12)
      (i32.add (i32.const 200) (call $remove (i32.const 0) (i32.const 220) (i32.const 3)))
      (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (drop (call $incr (i32.load (i32.const 300)) (i64.const 1)))
    (i32.const 0))
)"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_stream_flags_and_request_headers_in_the_response_phase_are_as_in_envoy() {
    let up = Upstream::start("echo").await;
    let gw = gateway("", &up.addr(), &[("eos", eos_module(), "")]);
    let c = client();
    let flags = |r: &reqwest::Response| {
        let h = |n: &str| r.headers()[n].to_str().unwrap().to_string();
        (h("x-req-eos"), h("x-resp-eos"))
    };

    // a GET has no body: its head ends the request; the response has a body
    let r = c.get(gw.url("http", "/eos")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(flags(&r), ("1".into(), "0".into()));
    // as in Envoy, the request header map cannot be changed once the request went on:
    // BadArgument (2) for a replace and a remove
    assert_eq!(r.headers()["x-replace-req"], "2");
    assert_eq!(r.headers()["x-remove-req"], "2");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "GET");
    let bodies = counter_reaches(&gw, "eos", "body_calls", 1.0, Duration::from_secs(2)).await;
    assert!(bodies >= 1.0);

    // a body, and an empty declared one
    let r = c
        .post(gw.url("http", "/eos"))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(flags(&r), ("0".into(), "0".into()));
    let r = c
        .post(gw.url("http", "/eos"))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(flags(&r).0, "1");
    let _ = r.bytes().await;
    let bodies = counter_reaches(
        &gw,
        "eos",
        "body_calls",
        bodies + 2.0,
        Duration::from_secs(2),
    )
    .await;

    // HEAD, 204 and 304: the response head ends the stream, and no body callback follows
    let r = c.head(gw.url("http", "/eos")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(flags(&r), ("1".into(), "1".into()));
    for code in [204u16, 304] {
        let r = c
            .get(gw.url("http", &format!("/eos/status/{code}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code);
        assert_eq!(flags(&r), ("1".into(), "1".into()));
        assert_eq!(r.bytes().await.unwrap().len(), 0);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(counter(&gw, "eos", "body_calls").await, bodies);
}

/// `on_done` answers false for the root context; `on_tick` calls `proxy_done` (counting
/// `done_ok` when it answers Ok) when `$finish` is set; `on_delete` of the root counts
/// `root_deleted`. A request gets the status of `proxy_done` from an HTTP context.
fn lingering_module(finish: bool) -> String {
    format!(
        r#"(module
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $period (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incr (param i32 i64) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  {PLUMBING}
  (data (i32.const 100) "done_ok")
  (data (i32.const 120) "root_deleted")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 100) (i32.const 7) (i32.const 300)))
    (drop (call $define (i32.const 0) (i32.const 120) (i32.const 12) (i32.const 304)))
    (drop (call $period (i32.const 50)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (if (i32.const {finish})
      (then (if (i32.eqz (call $done))
        (then (drop (call $incr (i32.load (i32.const 300)) (i64.const 1))))))))
  (func (export "proxy_on_done") (param $ctx i32) (result i32)
    (i32.ne (local.get $ctx) (i32.const 1)))
  (func (export "proxy_on_delete") (param $ctx i32)
    (if (i32.eq (local.get $ctx) (i32.const 1))
      (then (drop (call $incr (i32.load (i32.const 304)) (i64.const 1))))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0)
      (i32.add (i32.const 200) (call $done)) (i32.const 1) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
)"#,
        finish = finish as i32
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_context_that_answers_on_done_false_is_kept_until_proxy_done_or_a_bound() {
    let up = Upstream::start("echo").await;
    let gw = gateway(
        "",
        &up.addr(),
        &[
            ("finishes", lingering_module(true), ""),
            ("lingers", lingering_module(false), ""),
        ],
    );
    // proxy_done from an HTTP context: nothing waits for it (NotFound), as in Envoy
    let r = client()
        .get(gw.url("http", "/finishes"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "1");
    assert_eq!(counter(&gw, "finishes", "root_deleted").await, 0.0);

    // a reload retires both modules' VMs: their root contexts get on_done
    gw.signal(libc::SIGHUP);
    let reloaded = Instant::now();
    let deleted =
        counter_reaches(&gw, "finishes", "root_deleted", 1.0, Duration::from_secs(3)).await;
    assert!(
        deleted >= 1.0,
        "proxy_done from on_tick did not end the root context"
    );
    assert!(counter(&gw, "finishes", "done_ok").await >= 1.0);
    // the one that never calls proxy_done keeps ticking until the bound (3 s), then goes
    if reloaded.elapsed() < Duration::from_millis(2500) {
        assert_eq!(counter(&gw, "lingers", "root_deleted").await, 0.0);
    }
    let deleted =
        counter_reaches(&gw, "lingers", "root_deleted", 1.0, Duration::from_secs(6)).await;
    assert!(
        deleted >= 1.0,
        "a root waiting for proxy_done was never deleted"
    );
    assert!(reloaded.elapsed() >= Duration::from_millis(2900));
}

/// A v0.1.0 module: header callbacks without end-of-stream, `proxy_get_configuration`,
/// a missing header read as an empty value with Ok, `proxy_clear_route_cache`.
fn v01_module() -> String {
    format!(
        r#"(module
  (import "env" "proxy_get_configuration" (func $config (param i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_clear_route_cache" (func $clear (result i32)))
  (import "env" "proxy_continue_request" (func $continue (result i32)))
  (memory (export "memory") 1)
  {PLUMBING}
  (data (i32.const 100) "x-missing")
  (data (i32.const 120) "x-v01-config")
  (data (i32.const 140) "x-v01-checks")
  (data (i32.const 160) "x-v01")
  (data (i32.const 170) "yes")
  (func (export "proxy_abi_version_0_1_0"))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32) (result i32)
    (local $ok i32)
    (local.set $ok (i32.and
      (i32.and
        (i32.eqz (call $config (i32.const 400) (i32.const 404)))
        (i32.eqz (call $clear)))
      (i32.and
        (i32.eqz (call $get (i32.const 0) (i32.const 100) (i32.const 9) (i32.const 408) (i32.const 412)))
        (i32.eqz (i32.load (i32.const 412))))))
    (drop (call $add (i32.const 0) (i32.const 140) (i32.const 12)
      (i32.add (i32.const 200) (local.get $ok)) (i32.const 1)))
    (drop (call $add (i32.const 0) (i32.const 120) (i32.const 12)
      (i32.load (i32.const 400)) (i32.load (i32.const 404))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 160) (i32.const 5) (i32.const 170) (i32.const 3)))
    (i32.const 0))
)"#
    )
}

/// Answers every request with 403 and the details "denied by rule".
const DENY: &str = r#"(module
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "denied by rule")
  (data (i32.const 48) "no")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 403) (i32.const 16) (i32.const 14) (i32.const 48) (i32.const 2)
      (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v010_modules_load_and_local_reply_details_reach_the_access_log() {
    let up = Upstream::start("echo").await;
    let gw = gateway(
        "[access_log]\nenabled = true\npath = \"access.log\"\n",
        &up.addr(),
        &[
            ("old", v01_module(), "config = { v01 = true }"),
            ("deny", DENY.to_string(), ""),
        ],
    );
    let r = client().get(gw.url("http", "/old")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-v01"], "yes");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-v01-checks"], "1", "{v}");
    assert_eq!(v["headers"]["x-v01-config"], "{\"v01\":true}", "{v}");

    let r = client().get(gw.url("http", "/deny")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.text().await.unwrap(), "no");
    // like Envoy's %RESPONSE_CODE_DETAILS%: whitespace becomes `_`
    let path = gw.dir().join("access.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("\"/deny\"")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["details"], "denied_by_rule", "{line}");
    assert_eq!(v["status"], 403);
}

/// A module that answers every request with the value of one property (or `not found`).
fn property_echo(path: &[&str]) -> String {
    let joined = path.join("\\00");
    let len: usize = path.iter().map(|p| p.len()).sum::<usize>() + path.len() - 1;
    format!(
        r#"(module
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  {PLUMBING}
  (data (i32.const 100) "{joined}")
  (data (i32.const 400) "not found")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.ne (call $prop (i32.const 100) (i32.const {len}) (i32.const 300) (i32.const 304)) (i32.const 0))
      (then (i32.store (i32.const 300) (i32.const 400)) (i32.store (i32.const 304) (i32.const 9))))
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0)
      (i32.load (i32.const 300)) (i32.load (i32.const 304)) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
)"#
    )
}

/// The TLS facts of the client's connection, read by a guest over a real TLS listener
/// (and their absence on a plain one): `connection.tls_version`,
/// `connection.requested_server_name`, `connection.mtls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connection_properties_are_read_from_inside_a_guest() {
    let up = Upstream::start("echo").await;
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let (cert, key) = (certs.path().join("a.crt"), certs.path().join("a.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let head = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:{{port:https}}\"\ntls = {{ certs = [{{ cert = \"{}\", key = \"{}\" }}] }}\n",
        cert.display(),
        key.display()
    );
    let gw = gateway(
        &head,
        &up.addr(),
        &[
            ("tlsv", property_echo(&["connection", "tls_version"]), ""),
            (
                "sni",
                property_echo(&["connection", "requested_server_name"]),
                "",
            ),
            ("mtls", property_echo(&["connection", "mtls"]), ""),
        ],
    );
    let port = gw.port("https");
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(ck.cert.der()).unwrap())
        .resolve("a.test", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let body = |c: reqwest::Client, url: String| async move {
        let r = c.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap().to_vec()
    };
    let https = |p: &str| format!("https://a.test:{port}/{p}");
    assert_eq!(body(tls.clone(), https("tlsv")).await, b"TLSv1.3");
    assert_eq!(body(tls.clone(), https("sni")).await, b"a.test");
    assert_eq!(body(tls.clone(), https("mtls")).await, [0u8]);
    // a plain connection has no TLS version and no server name
    let plain = client();
    assert_eq!(
        body(plain.clone(), gw.url("http", "/tlsv")).await,
        b"not found"
    );
    assert_eq!(body(plain.clone(), gw.url("http", "/sni")).await, b"");
}

//! gRPC through the real gateway: local replies in gRPC form for gRPC requests, and unary
//! `proxy_grpc_call`s from the `grpc-auth` guest (built from the Rust SDK) to a real
//! HTTP/2 gRPC service started here (a hand-rolled unary service on the `h2` crate: it is
//! the upstream, not the thing under test).

mod common;

use bytes::Bytes;
use common::*;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A unary gRPC service over h2c. The request message picks the answer:
/// `good` → `allow:alice`, `deny` → `nope`, `bad` → trailers-only PERMISSION_DENIED with
/// a message, `slow` → `allow:late` after 3 s, `http500` → HTTP 500 without gRPC status.
/// Every request's path, authority and headers of interest are noted in `seen`.
struct GrpcService {
    port: u16,
    requests: Arc<AtomicUsize>,
    /// TCP connections accepted.
    conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

/// TLS with ALPN h2 and a self-signed certificate for `grpc.test`.
fn h2_tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let ck = rcgen::generate_simple_self_signed(vec!["grpc.test".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

impl GrpcService {
    async fn start() -> GrpcService {
        Self::start_with(None).await
    }

    /// The same service over TLS (ALPN h2), with a certificate for `grpc.test`.
    async fn start_tls() -> GrpcService {
        Self::start_with(Some(h2_tls_acceptor())).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> GrpcService {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (r, s, n) = (requests.clone(), seen.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    return;
                };
                n.fetch_add(1, Ordering::Relaxed);
                let (r, s, tls) = (r.clone(), s.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => Self::serve(sock, r, s).await,
                        Some(tls) => {
                            if let Ok(sock) = tls.accept(sock).await {
                                Self::serve(sock, r, s).await
                            }
                        }
                    }
                });
            }
        });
        GrpcService {
            port,
            requests,
            conns,
            seen,
            task,
        }
    }

    async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        sock: S,
        requests: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<String>>>,
    ) {
        let Ok(mut conn) = h2::server::handshake(sock).await else {
            return;
        };
        while let Some(Ok((req, respond))) = conn.accept().await {
            requests.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(Self::answer(req, respond, seen.clone()));
        }
    }

    async fn answer(
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        seen: Arc<Mutex<Vec<String>>>,
    ) {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        seen.lock().unwrap().push(format!(
            "{} {} {} client={} te={} ct={} timeout={}",
            req.method(),
            req.uri().path(),
            req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
            h("x-client"),
            h("te"),
            h("content-type"),
            h("grpc-timeout"),
        ));
        let mut body = req.into_body();
        let mut data = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let msg = data.get(5..).unwrap_or_default().to_vec();
        let ok_head = || {
            http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .unwrap()
        };
        let unary = |mut respond: h2::server::SendResponse<Bytes>, reply: &[u8]| {
            let mut s = respond.send_response(ok_head(), false).unwrap();
            s.send_data(frame(reply), false).unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            s.send_trailers(t).unwrap();
        };
        match msg.as_slice() {
            b"good" => unary(respond, b"allow:alice"),
            b"deny" => unary(respond, b"nope"),
            b"slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                unary(respond, b"allow:late")
            }
            b"http500" => {
                let r = http::Response::builder().status(500).body(()).unwrap();
                let _ = respond.send_response(r, true);
            }
            _ => {
                let r = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "7")
                    .header("grpc-message", "no%20entry%3A%20caf%C3%A9")
                    .body(())
                    .unwrap();
                let _ = respond.send_response(r, true);
            }
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn conf(echo: &str, grpc: &str, dead: u16) -> String {
    HEAD.to_string()
        + &format!(
            r#"
[upstreams.echo]
targets = ["{echo}"]
[upstreams.authz]
targets = ["{grpc}"]
[upstreams.other]
targets = ["{grpc}"]
[upstreams.down]
targets = ["127.0.0.1:{dead}"]
[modules.ga]
path = "{{guests}}/grpc_auth.wasm"
config = {{ upstream = "authz", timeout_ms = 500 }}
allowed_upstreams = ["authz"]
[modules.ga_proto]
path = "{{guests}}/grpc_auth.wasm"
config = {{ upstream = "authz", as_grpc_service = true }}
allowed_upstreams = ["authz"]
[modules.ga_down]
path = "{{guests}}/grpc_auth.wasm"
config = {{ upstream = "down" }}
allowed_upstreams = ["down"]
[modules.ga_sneaky]
path = "{{guests}}/grpc_auth.wasm"
config = {{ upstream = "other", as_grpc_service = true }}
allowed_upstreams = ["authz"]
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["ga"]
[[routes]]
path_prefix = "/proto"
upstream = "echo"
hooks = ["ga_proto"]
[[routes]]
path_prefix = "/down"
upstream = "echo"
hooks = ["ga_down"]
[[routes]]
path_prefix = "/sneaky"
upstream = "echo"
hooks = ["ga_sneaky"]
[[routes]]
path_prefix = "/dead"
upstream = "down"
"#
        )
}

async fn get(c: &reqwest::Client, url: String, token: &str) -> (u16, Value) {
    let r = c.get(url).header("x-token", token).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_grpc_calls_reach_the_guest() {
    let echo = Upstream::start("echo").await;
    let svc = GrpcService::start().await;
    let (dead, _dead) = refusing_port();
    let gw = Gw::start(&conf(&echo.addr(), &svc.addr(), dead));
    let c = client();

    // success: the message reaches the guest, which resumes the request with its user
    let (s, v) = get(&c, gw.url("http", "/api/x"), "good").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["headers"]["x-user"], "alice");
    let seen = svc.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            "POST /test.Auth/Check authz client=wasm te=trailers ct=application/grpc timeout=500m"
        ]
    );
    // the upstream named by a serialized GrpcService, as Envoy filters do
    let (s, v) = get(&c, gw.url("http", "/proto/x"), "good").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["headers"]["x-user"], "alice");
    // an OK answer the guest does not like
    let (s, v) = get(&c, gw.url("http", "/api/x"), "deny").await;
    assert_eq!(
        (s, v),
        (403, serde_json::json!({"error": "denied", "reply": "nope"}))
    );

    // a gRPC error status: on_grpc_close with it, the decoded message from get_status
    let (s, v) = get(&c, gw.url("http", "/api/x"), "bad").await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(
        v,
        serde_json::json!({"error": "auth_failed", "callback_status": 7, "grpc_status": 7,
            "message": "no entry: café"})
    );
    // HTTP 500 without a gRPC status: UNKNOWN (2), as the HTTP status maps
    let (s, v) = get(&c, gw.url("http", "/api/x"), "http500").await;
    assert_eq!((s, v["grpc_status"].clone()), (503, 2.into()), "{v}");

    // the guest's timeout (500 ms) passes: DEADLINE_EXCEEDED (4)
    let t = std::time::Instant::now();
    let (s, v) = get(&c, gw.url("http", "/api/x"), "slow").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["grpc_status"], 4, "{v}");
    assert_eq!(v["message"], "upstream request timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // nothing listens: UNAVAILABLE (14), as Envoy closes a call it cannot connect
    let (s, v) = get(&c, gw.url("http", "/down/x"), "good").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["grpc_status"], 14, "{v}");
    assert_eq!(v["callback_status"], 14, "{v}");

    // an upstream the module was not granted: ParseFailure at dispatch, nothing sent
    let before = svc.requests.load(Ordering::Relaxed);
    let (s, v) = get(&c, gw.url("http", "/sneaky/x"), "good").await;
    assert_eq!(
        (s, v),
        (
            503,
            serde_json::json!({"error": "grpc_call_failed", "status": "ParseFailure"})
        )
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(svc.requests.load(Ordering::Relaxed), before);

    // the calls shared pooled HTTP/2 connections
    assert!(svc.conns.load(Ordering::Relaxed) <= 2);
}

/// Reads one HTTP/1.1 response head and its content-length body.
fn raw(port: u16, req: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        buf.push(b[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_to_grpc_requests_are_grpc_answers() {
    let echo = Upstream::start("echo").await;
    let svc = GrpcService::start().await;
    let (dead, _dead) = refusing_port();
    let gw = Gw::start(&conf(&echo.addr(), &svc.addr(), dead));
    let port = gw.port("http");
    let grpc = "content-type: application/grpc\r\nte: trailers\r\n";

    // send_grpc_response: trailers-only, the message percent-encoded, the guest's metadata
    let (head, body) = raw(
        port,
        &format!(
            "POST /api/x HTTP/1.1\r\nhost: t\r\n{grpc}x-grpc-reply: 1\r\ncontent-length: 0\r\n\r\n"
        ),
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: application/grpc\r\n"),
        "{head}"
    );
    assert!(head.contains("grpc-status: 7\r\n"), "{head}");
    assert!(
        head.contains("grpc-message: denied: caf%c3%a9 100%25\r\n"),
        "{head}"
    );
    assert!(head.contains("x-extra: 1\r\n"), "{head}");
    assert!(head.contains("content-length: 0\r\n"), "{head}");
    assert_eq!(body, "");

    // a guest's plain HTTP answer to a gRPC request: the HTTP status mapped (403 → 7)
    let (head, _) = raw(
        port,
        &format!(
            "POST /api/x HTTP/1.1\r\nhost: t\r\n{grpc}x-token: deny\r\ncontent-length: 0\r\n\r\n"
        ),
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("grpc-status: 7\r\n"), "{head}");
    assert!(
        head.contains("grpc-message: {\"error\":\"denied\",\"reply\":\"nope\"}\r\n"),
        "{head}"
    );

    // gateway errors too: no route → UNIMPLEMENTED (12), an unreachable upstream →
    // UNAVAILABLE (14)
    let (head, _) = raw(
        port,
        &format!("POST /nowhere HTTP/1.1\r\nhost: t\r\n{grpc}content-length: 0\r\n\r\n"),
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("grpc-status: 12\r\n"), "{head}");
    assert!(
        head.contains("grpc-message: {\"error\":\"no_route\"}\r\n"),
        "{head}"
    );
    let (head, _) = raw(
        port,
        &format!("POST /dead/x HTTP/1.1\r\nhost: t\r\n{grpc}content-length: 0\r\n\r\n"),
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("grpc-status: 14\r\n"), "{head}");

    // not a gRPC request: send_grpc_response is a plain answer, as in Envoy
    let (head, body) = raw(
        port,
        "GET /api/x HTTP/1.1\r\nhost: t\r\nx-grpc-reply: 1\r\n\r\n",
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("grpc-status"), "{head}");
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert_eq!(body, "denied: café 100%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_are_never_sent_and_streams_obey_allowed_upstreams() {
    // a raw-ABI filter: makes a call, then tries proxy_grpc_send on it (BadArgument, 2),
    // opens a stream to an upstream it was not granted (ParseFailure, 4), cancels the call
    // twice (Ok, then NotFound 1) and answers 200 + 10 * second cancel + send (212), or
    // 500 if anything else differs
    let filter = wat::parse_str(
        r#"(module
  (import "env" "proxy_grpc_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_stream" (func $stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $gsend (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $cancel (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "authz")
  (data (i32.const 32) "s")
  (data (i32.const 40) "m")
  (data (i32.const 48) "good")
  (data (i32.const 64) "other")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 2048))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $ok i32) (local $send i32) (local $second i32)
    (local.set $ok (i32.eqz (call $call (i32.const 16) (i32.const 5) (i32.const 32) (i32.const 1)
      (i32.const 40) (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 48) (i32.const 4)
      (i32.const 1000) (i32.const 0))))
    (local.set $send (call $gsend (i32.load (i32.const 0)) (i32.const 48) (i32.const 4) (i32.const 1)))
    (local.set $ok (i32.and (local.get $ok) (i32.eq (i32.const 4)
      (call $stream (i32.const 64) (i32.const 5) (i32.const 32) (i32.const 1) (i32.const 40)
        (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 4)))))
    (local.set $ok (i32.and (local.get $ok) (i32.eqz (call $cancel (i32.load (i32.const 0))))))
    (local.set $second (call $cancel (i32.load (i32.const 0))))
    (drop (call $send
      (select (i32.add (i32.const 200) (i32.add (i32.mul (local.get $second) (i32.const 10)) (local.get $send)))
        (i32.const 500) (local.get $ok))
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
  (func (export "proxy_on_grpc_receive") (param i32 i32 i32)))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cancel.wasm"), filter).unwrap();
    let echo = Upstream::start("echo").await;
    let svc = GrpcService::start().await;
    let (dead, _dead) = refusing_port();
    let conf = conf(&echo.addr(), &svc.addr(), dead)
        + &format!(
            r#"
[modules.cancel]
path = "{}/cancel.wasm"
allowed_upstreams = ["authz"]
[[routes]]
path_prefix = "/cancel"
upstream = "echo"
hooks = ["cancel"]
"#,
            dir.path().display()
        );
    let gw = Gw::start(&conf);
    let r = client()
        .get(gw.url("http", "/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 212);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(svc.requests.load(Ordering::Relaxed), 0);
}

/// Over HTTP/2 a local reply to a gRPC request is one HEADERS frame that ends the stream
/// (trailers-only), whether a guest or the gateway made it: not headers and then an empty
/// DATA frame or a reset, which gRPC clients take for a broken call. And an HTTP/1.1 gRPC
/// request forwarded to an HTTP/2 upstream keeps its `te: trailers`, which gRPC servers
/// require.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_http2_ends_answers_cleanly_and_keeps_te_trailers() {
    let echo = Upstream::start("echo").await;
    let svc = GrpcService::start().await;
    let tls_svc = GrpcService::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["gw.test".into()]).unwrap();
    let (cert, key) = (dir.path().join("gw.crt"), dir.path().join("gw.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let (dead, _dead) = refusing_port();
    let conf = conf(&echo.addr(), &svc.addr(), dead)
        + &format!(
            r#"
[[listeners]]
listen = "127.0.0.1:{{port:https}}"
tls = {{ certs = [{{ cert = "{}", key = "{}" }}] }}
[upstreams.grpc_tls]
targets = ["{}"]
tls = {{ sni = "grpc.test", verify = false, http2 = true }}
[[routes]]
path_prefix = "/test.Auth"
upstream = "grpc_tls"
"#,
            cert.display(),
            key.display(),
            tls_svc.addr()
        );
    let gw = Gw::start_in(dir, &conf, Default::default());
    let mut client = h2_client(gw.port("https"), ck.cert.der().to_vec()).await;
    let call = |path: &str, extra: Option<(&str, &str)>| {
        let mut b = http::Request::builder()
            .method("POST")
            .uri(format!("https://gw.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some((k, v)) = extra {
            b = b.header(k, v);
        }
        b.body(()).unwrap()
    };
    // a guest's send_grpc_response, and the gateway's own error (an unreachable upstream)
    for (path, extra, status) in [
        ("/api/x", Some(("x-grpc-reply", "1")), "7"),
        ("/dead/x", None, "14"),
    ] {
        client = client.ready().await.unwrap();
        let (resp, _) = client.send_request(call(path, extra), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], status, "{path}");
        let mut body = resp.into_body();
        assert!(
            body.is_end_stream(),
            "{path}: the HEADERS frame ends the stream"
        );
        assert!(body.data().await.is_none(), "{path}: no data, no reset");
    }

    // HTTP/1.1 gRPC client → HTTP/2 upstream: te: trailers reaches the service
    let msg = frame(b"good");
    let mut req = format!(
        "POST /test.Auth/Check HTTP/1.1\r\nhost: t\r\ncontent-type: application/grpc\r\nte: trailers\r\ncontent-length: {}\r\n\r\n",
        msg.len()
    )
    .into_bytes();
    req.extend_from_slice(&msg);
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&req).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("allow:alice") {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("allow:alice"), "{text}");
    }
    let seen = tls_svc.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("POST /test.Auth/Check") && l.contains("te=trailers")),
        "{seen:?}"
    );
}

/// A streaming gRPC service over h2c (`test.Streamer`), the upstream of the
/// `grpc-stream` guest. `Chat` answers with initial metadata `x-initial: hello-meta`,
/// echoes `echo:ping:1` and `echo:ping:2` once it got `ping:2`, and when the client's
/// side ends, closes with trailers `x-trailer: t1`, the status the request metadata
/// `x-want-status` names and the message `stream done`. `Hold` answers headers and never
/// ends. `Deny` answers trailers-only UNAUTHENTICATED "go away". `Unary` and `Delay`
/// (after 300 ms) answer one message. What each stream got
/// (path, metadata, messages, and whether it ended or was reset) is noted in `seen`.
struct StreamService {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StreamService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StreamService {
    async fn start() -> StreamService {
        Self::start_with(None).await
    }

    /// The same service over TLS (ALPN h2), with a certificate for `grpc.test`.
    async fn start_tls() -> StreamService {
        Self::start_with(Some(h2_tls_acceptor())).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> StreamService {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => Self::serve(sock, s).await,
                        Some(tls) => {
                            if let Ok(sock) = tls.accept(sock).await {
                                Self::serve(sock, s).await
                            }
                        }
                    }
                });
            }
        });
        StreamService { port, seen, task }
    }

    async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        sock: S,
        seen: Arc<Mutex<Vec<String>>>,
    ) {
        let Ok(mut conn) = h2::server::handshake(sock).await else {
            return;
        };
        while let Some(Ok((req, respond))) = conn.accept().await {
            tokio::spawn(Self::answer(req, respond, seen.clone()));
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    async fn answer(
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        seen: Arc<Mutex<Vec<String>>>,
    ) {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        let path = req.uri().path().to_string();
        let method = path.rsplit('/').next().unwrap_or_default().to_string();
        let want = h("x-want-status");
        let note = |s: String| seen.lock().unwrap().push(s);
        note(format!(
            "{path} {} from={} te={} timeout={}",
            req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
            h("x-from"),
            h("te"),
            h("grpc-timeout")
        ));
        let head = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("x-initial", "hello-meta")
            .body(())
            .unwrap();
        let mut body = req.into_body();
        if method == "Deny" {
            let r = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-status", "16")
                .header("grpc-message", "go%20away")
                .body(())
                .unwrap();
            let _ = respond.send_response(r, true);
            return;
        }
        if method == "Unary" || method == "Delay" {
            while let Some(Ok(c)) = body.data().await {
                let _ = body.flow_control().release_capacity(c.len());
            }
            if method == "Delay" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut s = respond.send_response(head, false).unwrap();
            s.send_data(frame(b"late"), false).unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            s.send_trailers(t).unwrap();
            return;
        }
        let Ok(mut s) = respond.send_response(head, false) else {
            note(format!("{method} reset before its answer"));
            return;
        };
        let mut buf = Vec::new();
        loop {
            match body.data().await {
                Some(Ok(c)) => {
                    let _ = body.flow_control().release_capacity(c.len());
                    buf.extend_from_slice(&c);
                    while buf.len() >= 5 {
                        let n = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        if buf.len() < 5 + n {
                            break;
                        }
                        let m = String::from_utf8_lossy(&buf[5..5 + n]).into_owned();
                        buf.drain(..5 + n);
                        note(format!("{method} got {m}"));
                        if method == "Chat" && m == "ping:2" {
                            let _ = s.send_data(frame(b"echo:ping:1"), false);
                            let _ = s.send_data(frame(b"echo:ping:2"), false);
                        }
                    }
                }
                Some(Err(e)) => {
                    note(format!("{method} reset {:?}", e.reason()));
                    return;
                }
                None => break,
            }
        }
        note(format!("{method} ended"));
        if method == "Hold" {
            return;
        }
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", want.parse().unwrap());
        t.insert("grpc-message", "stream%20done".parse().unwrap());
        t.insert("x-trailer", "t1".parse().unwrap());
        let _ = s.send_trailers(t);
    }
}

fn stream_conf(echo: &str, streamer: &str) -> String {
    HEAD.to_string()
        + &format!(
            r#"
[upstreams.echo]
targets = ["{echo}"]
[upstreams.streamer]
targets = ["{streamer}"]
[upstreams.other]
targets = ["{streamer}"]
[modules.gs]
path = "{{guests}}/grpc_stream.wasm"
allowed_upstreams = ["streamer"]
# room for the guest to build a message over 1 MiB
budget_us = 20000
request_budget_us = 200000
[[routes]]
path_prefix = "/s"
upstream = "echo"
hooks = ["gs"]
"#
        )
}

async fn stream_get(gw: &Gw, mode: &str, want: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client()
        .get(gw.url("http", "/s/x"))
        .header("x-mode", mode)
        .header("x-want-status", want)
        .send()
        .await
        .unwrap();
    let (s, h) = (r.status().as_u16(), r.headers().clone());
    (s, h, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_carry_messages_both_ways_and_decide_the_request() {
    let echo = Upstream::start("echo").await;
    let svc = StreamService::start().await;
    let gw = Gw::start(&stream_conf(&echo.addr(), &svc.addr()));

    // status 0: every event reached the guest in order (initial metadata, both echoes,
    // trailing metadata, close with its status and message), and the request went on
    let (s, _, body) = stream_get(&gw, "chat", "0").await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["headers"]["x-stream-log"],
        "open:0,init:hello-meta,msg:echo:ping:1,msg:echo:ping:2,trailers:t1,close:0:0:stream done"
    );
    // the guest's metadata and messages reached the upstream, then its end of stream
    assert_eq!(
        svc.seen(),
        vec![
            "/test.Streamer/Chat streamer from=guest te=trailers timeout=",
            "Chat got ping:1",
            "Chat got ping:2",
            "Chat got bye",
            "Chat ended",
        ]
    );

    // proxy_grpc_close half-closes: the upstream sees the end of the guest's side, and the
    // events still come until the stream closes
    svc.seen.lock().unwrap().clear();
    let r = client()
        .get(gw.url("http", "/s/x"))
        .header("x-half-close", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["headers"]["x-stream-log"],
        "open:0,init:hello-meta,msg:echo:ping:1,msg:echo:ping:2,trailers:t1,close:0:0:stream done"
    );
    assert_eq!(
        svc.seen()[1..],
        ["Chat got ping:1", "Chat got ping:2", "Chat ended"]
    );

    // a trailers-only refusal: trailing metadata only, then the close with its status
    let (s, h, _) = stream_get(&gw, "deny", "0").await;
    assert_eq!(s, 403);
    assert_eq!(h["x-stream-log"], "open:0,trailers:,close:16:16:go away");

    // another status: the guest denies the request from on_grpc_stream_close
    let (s, h, body) = stream_get(&gw, "chat", "7").await;
    assert_eq!((s, body.as_str()), (403, "denied\n"));
    assert_eq!(
        h["x-stream-log"],
        "open:0,init:hello-meta,msg:echo:ping:1,msg:echo:ping:2,trailers:t1,close:7:7:stream done"
    );

    // the same stream to an upstream over TLS (ALPN h2)
    let tls = StreamService::start_tls().await;
    let conf = stream_conf(&echo.addr(), &tls.addr()).replace(
        "[upstreams.other]",
        "tls = { sni = \"grpc.test\", verify = false }\n[upstreams.other]",
    );
    let gw = Gw::start(&conf);
    let (s, _, body) = stream_get(&gw, "chat", "0").await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["headers"]["x-stream-log"],
        "open:0,init:hello-meta,msg:echo:ping:1,msg:echo:ping:2,trailers:t1,close:0:0:stream done"
    );
    assert_eq!(tls.seen().len(), 5, "{:?}", tls.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stream_errors_cancel_and_clients_leaving() {
    let echo = Upstream::start("echo").await;
    let svc = StreamService::start().await;
    let gw = Gw::start(&stream_conf(&echo.addr(), &svc.addr()));

    // an upstream the module was not granted: ParseFailure, nothing sent
    let (s, h, _) = stream_get(&gw, "refused", "0").await;
    assert_eq!(
        (s, h["x-result"].to_str().unwrap()),
        (200, "Err(ParseFailure)")
    );
    // proxy_grpc_send on a call's token: BadArgument; on, close and cancel of an unknown
    // stream: NotFound
    let (s, h, _) = stream_get(&gw, "send-errors", "0").await;
    assert_eq!(
        (s, h["x-result"].to_str().unwrap()),
        (
            200,
            "Err(BadArgument),Err(NotFound),Err(NotFound),Err(NotFound)"
        )
    );
    // at most 8 open streams per context, then InternalFailure; a message over 1 MiB is
    // BadArgument
    let (s, h, _) = stream_get(&gw, "limits", "0").await;
    assert_eq!(
        (s, h["x-result"].to_str().unwrap()),
        (200, "8,InternalFailure,Err(BadArgument)")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        svc.seen().iter().all(|l| !l.contains("Chat")),
        "{:?}",
        svc.seen()
    );

    // cancelled at its initial metadata: the echoes and the close that follow never reach
    // the guest (the unary call answers the request), and the upstream sees a reset
    svc.seen.lock().unwrap().clear();
    let (s, h, _) = stream_get(&gw, "cancel", "0").await;
    assert_eq!(s, 200);
    assert_eq!(h["x-stream-log"], "open:0,init:hello-meta,call:0");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !svc.seen().iter().any(|l| l.starts_with("Chat reset")) {
        assert!(std::time::Instant::now() < deadline, "{:?}", svc.seen());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // a client that leaves while its request waits on a stream: the stream is reset
    // (at the latest when the wait's bound passes), nothing is left running
    svc.seen.lock().unwrap().clear();
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap();
        c.write_all(b"GET /s/x HTTP/1.1\r\nhost: t\r\nx-mode: hold\r\n\r\n")
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !svc.seen().iter().any(|l| l == "Hold got ping:2") {
            assert!(std::time::Instant::now() < deadline, "{:?}", svc.seen());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !svc.seen().iter().any(|l| l.starts_with("Hold reset")) {
        assert!(std::time::Instant::now() < deadline, "{:?}", svc.seen());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the gateway serves on
    let (s, _, _) = stream_get(&gw, "chat", "0").await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_context_grpc_streams_run_while_the_vm_is_idle() {
    let echo = Upstream::start("echo").await;
    let svc = StreamService::start().await;
    let conf = stream_conf(&echo.addr(), &svc.addr())
        + r#"
[modules.gs_root]
path = "{guests}/grpc_stream.wasm"
config = "root"
allowed_upstreams = ["streamer"]
[[routes]]
path_prefix = "/r"
upstream = "echo"
hooks = ["gs_root"]
"#;
    let gw = Gw::start(&conf);

    // the root context of `gs_root` opens its stream from its first on_tick, with no
    // request around; every event reaches the root context, which ends its side on the
    // second echo
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !svc.seen().iter().any(|l| l == "Chat ended") {
        assert!(std::time::Instant::now() < deadline, "{:?}", svc.seen());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        svc.seen(),
        vec![
            "/test.Streamer/Chat streamer from=root te=trailers timeout=",
            "Chat got ping:1",
            "Chat got ping:2",
            "Chat got bye",
            "Chat ended",
        ]
    );
    let want =
        "open:0,init:hello-meta,msg:echo:ping:1,msg:echo:ping:2,trailers:t1,close:0:0:stream done";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = client()
            .get(gw.url("http", "/r/x"))
            .header("x-mode", "root-log")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let log = r.headers()["x-root-log"].to_str().unwrap().to_string();
        if log == want {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

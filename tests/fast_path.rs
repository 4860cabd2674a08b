//! The HTTP/1.1 fast path against Pingora's proxy: one corpus of requests (plain, hop-by-
//! hop fields, odd paths, HEAD/204/304, chunked and close-delimited answers, pipelined,
//! bodies, smuggling attempts, malformed heads, a hooked route, a dead and a silent
//! upstream) through two gateways on the same conf, one with `[server] fast_path = false`,
//! to one recording upstream. The upstream must see the same bytes and the client the
//! same answers (the `Date` field aside); the fast gateway's counter shows which requests
//! it served itself.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every request the upstream received, as raw bytes, in order.
type Seen = Arc<Mutex<Vec<u8>>>;

/// An upstream that records each request (head and `Content-Length` or chunked body) and
/// answers by path: `/cl`, `/chunked`, `/close` (no framing, then closes), `/204`, `/304`,
/// `/hang` (never answers), anything else a `Content-Length` echo of the path.
async fn recording_upstream() -> (u16, Seen, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::Relaxed);
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(req) = read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    log.lock().unwrap().extend_from_slice(&req);
                    let head = String::from_utf8_lossy(&req).to_string();
                    let line = head.lines().next().unwrap_or("").to_string();
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let answer: Vec<u8> = match path.as_str() {
                        "/cl" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello".to_vec(),
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
                        "/close" => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbye, then close").await;
                            return;
                        }
                        "/204" => b"HTTP/1.1 204 No Content\r\nx-up: 1\r\n\r\n".to_vec(),
                        "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n".to_vec(),
                        "/hang" => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            return;
                        }
                        _ if line.starts_with("HEAD ") => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
                        p => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{p}", p.len()).into_bytes(),
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen, accepted)
}

/// One request from `buf` + the socket: head and body, raw.
async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let chunked = head.contains("transfer-encoding: chunked");
    let total = loop {
        if chunked {
            if let Some(i) = buf[end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                break end + i + 5;
            }
        } else if buf.len() >= end + length {
            break end + length;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    Some(buf.drain(..total).collect())
}

/// Sends `bytes` on a new connection and reads until the gateway closes it (or 2 s of
/// silence): what the client saw, without `Date` lines, chunked bodies joined.
fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(bytes).unwrap();
    let out = read_until(&mut s, |_| false);
    let text = String::from_utf8_lossy(&out)
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n");
    dechunk(&text)
}

/// What `s` reads until it closes, its read timeout passes, or `done` says so.
fn read_until(s: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        if done(&out) {
            break;
        }
    }
    out
}

/// `s` with each chunked body as one canonical chunk: where a proxy cuts chunks is
/// its own (Pingora's channels join the chunks that arrive together, the fast path
/// forwards them as read); the bytes are what must agree.
fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(h) = rest.find("\r\n\r\n") {
        let head = &rest[..h + 4];
        out.push_str(head);
        rest = &rest[h + 4..];
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut body = String::new();
            while let Some(e) = rest.find("\r\n") {
                let size = usize::from_str_radix(rest[..e].trim(), 16).unwrap_or(0);
                rest = &rest[e + 2..];
                if size == 0 {
                    rest = rest.strip_prefix("\r\n").unwrap_or(rest);
                    break;
                }
                body.push_str(&rest[..size.min(rest.len())]);
                rest = &rest[(size + 2).min(rest.len())..];
            }
            out.push_str(&format!("<chunked body {body:?}>"));
        } else {
            let next = rest.find("HTTP/1.").unwrap_or(rest.len());
            out.push_str(&rest[..next]);
            rest = &rest[next..];
        }
    }
    out.push_str(rest);
    out
}

const CLOSE: &str = "GET /cl HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";

/// (name, bytes the client sends, how many of its requests the fast path serves); each
/// case ends its connection. What the fast path does not admit (upgrades, smuggling
/// attempts, malformed heads, HTTP/1.0, absolute form) goes to Pingora with the rest of
/// its connection.
fn corpus() -> Vec<(&'static str, String, usize)> {
    let c = |s: &str| format!("{s}{CLOSE}");
    vec![
        ("plain keep-alive", c("GET /cl HTTP/1.1\r\nhost: t\r\n\r\nGET /x?a=1&b=%20 HTTP/1.1\r\nhost: t\r\n\r\n"), 3),
        ("chunked answer", c("GET /chunked HTTP/1.1\r\nhost: t\r\n\r\n"), 2),
        ("close-delimited answer", "GET /close HTTP/1.1\r\nhost: t\r\n\r\n".into(), 1),
        ("HEAD", c("HEAD /head HTTP/1.1\r\nhost: t\r\n\r\n"), 2),
        ("204 and 304", c("GET /204 HTTP/1.1\r\nhost: t\r\n\r\nGET /304 HTTP/1.1\r\nhost: t\r\nif-none-match: \"v1\"\r\n\r\n"), 3),
        ("hop-by-hop fields", c("GET /cl HTTP/1.1\r\nhost: t\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nte: trailers\r\nproxy-connection: x\r\nproxy-authorization: Basic eA==\r\ntrailer: x-t\r\nx-custom: 1\r\nX-Case: MiXeD\r\n\r\n"), 2),
        ("odd path spellings", c("GET /a/../cl HTTP/1.1\r\nhost: t\r\n\r\nGET //cl HTTP/1.1\r\nhost: t\r\n\r\nGET /%2e%2e/cl HTTP/1.1\r\nhost: t\r\n\r\nGET /cl;p=1 HTTP/1.1\r\nhost: T.\r\n\r\n"), 5),
        ("pipelined", c("GET /one HTTP/1.1\r\nhost: t\r\n\r\nGET /two HTTP/1.1\r\nhost: t\r\n\r\nHEAD /three HTTP/1.1\r\nhost: t\r\n\r\n"), 4),
        ("pipelined after a body", c("POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabcGET /after HTTP/1.1\r\nhost: t\r\n\r\n"), 3),
        ("chunked request body", c("POST /p HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), 2),
        ("Content-Length body", c("POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello"), 2),
        ("Expect: 100-continue", c("PUT /p HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\nabc"), 2),
        ("a body past the retry buffer", c(&format!("POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 300000\r\n\r\n{}", "b".repeat(300_000))), 2),
        ("chunked body in pieces", c("POST /p HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), 2),
        ("a body over the route's limit", "POST /small HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n8\r\n12345678\r\n0\r\n\r\n".into(), 1),
        ("a declared length over the route's limit", "POST /small HTTP/1.1\r\nhost: t\r\ncontent-length: 8\r\n\r\n12345678".into(), 1),
        ("hooked with a body", c("POST /keyed/p HTTP/1.1\r\nhost: t\r\nx-api-key: k\r\ncontent-length: 3\r\n\r\nabcPOST /keyed/q HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc"), 3),
        // one of the two meets the dead target first and is retried on the other: only an
        // idempotent method is (a POST would get its 502, on either loop)
        ("idempotent bodies retried after a connect failure", c("PUT /pair/a HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabcPUT /pair/b HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"), 3),
        ("an upgrade", c("GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"), 0),
        ("CL and TE", "POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n".into(), 0),
        ("duplicate CL", c("GET /cl HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n"), 0),
        ("bad chunk size", "POST /p HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into(), 1),
        ("malformed head", "GET /cl HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n".into(), 0),
        ("HTTP/1.0", "GET /cl HTTP/1.0\r\nhost: t\r\n\r\n".into(), 0),
        ("absolute form", c("GET http://t/cl HTTP/1.1\r\nhost: t\r\n\r\n"), 0),
        ("no host", c("GET /cl HTTP/1.1\r\n\r\n"), 1),
        ("hooked without and with a key", c("GET /keyed/a HTTP/1.1\r\nhost: t\r\n\r\nGET /keyed/b HTTP/1.1\r\nhost: t\r\nx-api-key: k\r\n\r\n"), 3),
        ("refused upstream", "GET /dead/x HTTP/1.1\r\nhost: t\r\n\r\n".into(), 1),
        ("silent upstream", "GET /hang HTTP/1.1\r\nhost: t\r\n\r\n".into(), 1),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_forwards_and_answers_as_pingoras_proxy_does() {
    let (up, seen, accepted) = recording_upstream().await;
    let (dead, _hold) = refusing_port();
    let routes = format!(
        r#"
[tenants.ops]
[modules.auth]
tenant = "ops"
path = "{{guests}}/api_key_auth.wasm"
config = {{ keys = ["k"] }}
[upstreams.rec]
targets = ["127.0.0.1:{up}"]
read_timeout_ms = 300
[upstreams.dead]
targets = ["127.0.0.1:{dead}"]
[[routes]]
path_prefix = "/keyed"
upstream = "rec"
hooks = ["auth"]
[[routes]]
path_prefix = "/dead"
upstream = "dead"
[upstreams.pair]
targets = ["127.0.0.1:{dead}", "127.0.0.1:{up}"]
retries = 1
[[routes]]
path_prefix = "/pair"
upstream = "pair"
[[routes]]
path_prefix = "/small"
upstream = "rec"
max_request_body_bytes = 4
[[routes]]
path_prefix = "/"
upstream = "rec"
"#
    );
    let fast = Gw::start(&(HEAD.to_string() + &routes));
    let slow_head = HEAD.replace(
        "watch_config = false",
        "watch_config = false\nfast_path = false",
    );
    let slow = Gw::start(&(slow_head + &routes));
    let mut differ = Vec::new();
    let mut served_before = 0.0;
    for (name, bytes, fast_requests) in corpus() {
        let mut answers = Vec::new();
        let mut upstream = Vec::new();
        for gw in [&slow, &fast] {
            seen.lock().unwrap().clear();
            let port = gw.port("http");
            let bytes = bytes.clone();
            let answer = tokio::task::spawn_blocking(move || exchange(port, bytes.as_bytes()))
                .await
                .unwrap();
            // the upstream recorded each request before it answered
            upstream.push(String::from_utf8_lossy(&seen.lock().unwrap()).to_string());
            answers.push(answer);
        }
        assert!(!answers[0].is_empty(), "{name}: no answer");
        let served = metric(&fast.metrics().await, "wasmgate_fast_path_requests_total");
        assert_eq!(
            served - served_before,
            fast_requests as f64,
            "{name}: requests the fast path served"
        );
        served_before = served;
        if answers[0] != answers[1] || upstream[0] != upstream[1] {
            differ.push(format!(
                "== {name}\n-- client, Pingora:\n{}\n-- client, fast:\n{}\n-- upstream, Pingora:\n{}\n-- upstream, fast:\n{}",
                answers[0], answers[1], upstream[0], upstream[1]
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    let none = metric(&slow.metrics().await, "wasmgate_fast_path_requests_total");
    assert_eq!(none, 0.0);

    // upstream connections are kept: 30 requests one after another, each on a client
    // connection of its own, take one upstream connection on either loop
    for gw in [&slow, &fast] {
        let port = gw.port("http");
        let before = accepted.load(Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            for _ in 0..30 {
                let answer = exchange(port, CLOSE.as_bytes());
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            }
        })
        .await
        .unwrap();
        let opened = accepted.load(Ordering::Relaxed) - before;
        assert!(opened <= 1, "{opened} upstream connections for 30 requests");
    }
}

/// An upstream that answers as soon as it has a request head, before it reads the body
/// (as a server refusing an upload does), then reads the body to its end and closes.
async fn early_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 65536];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                // drain until the gateway stops sending
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await
                {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_before_the_body_is_sent_is_heard_on_both_loops() {
    let up = early_upstream().await;
    let routes = format!(
        "[upstreams.early]\ntargets = [\"127.0.0.1:{up}\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"early\"\n"
    );
    let fast = Gw::start(&(HEAD.to_string() + &routes));
    let slow_head = HEAD.replace(
        "watch_config = false",
        "watch_config = false\nfast_path = false",
    );
    let slow = Gw::start(&(slow_head + &routes));
    // 4 MiB: more than the sockets between client, gateway and upstream hold
    let body = "u".repeat(4 << 20);
    let request = format!(
        "POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut answers = Vec::new();
    for gw in [&slow, &fast] {
        let port = gw.port("http");
        let request = request.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // the client writes from another thread, as a browser uploading would, and
            // reads the answer as it comes
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = w.write_all(request.as_bytes());
            });
            let out = read_until(&mut s, |o| o.ends_with(b"too big\n"));
            drop(s);
            let _ = writer.join();
            String::from_utf8_lossy(&out).to_string()
        })
        .await
        .unwrap();
        answers.push(answer);
    }
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 413"), "{a}");
        assert!(a.ends_with("too big\n"), "{a}");
    }
    let served = metric(&fast.metrics().await, "wasmgate_fast_path_requests_total");
    assert_eq!(served, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_http2_upstreams_stay_on_pingoras_path() {
    let (up, _seen, _) = recording_upstream().await;
    let gw = Gw::start(&format!(
        "{HEAD}[upstreams.h2]\ntargets = [\"127.0.0.1:{up}\"]\ntls = {{ sni = \"up.test\", http2 = true }}\n\
         [upstreams.h1]\ntargets = [\"127.0.0.1:{up}\"]\n\
         [[routes]]\npath_prefix = \"/h2\"\nupstream = \"h2\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"h1\"\n"
    ));
    let port = gw.port("http");
    let served = || async { metric(&gw.metrics().await, "wasmgate_fast_path_requests_total") };
    let answer = tokio::task::spawn_blocking(move || exchange(port, CLOSE.as_bytes()))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(served().await, 1.0);
    // the upstream speaks no TLS: Pingora's proxy offers h2 through ALPN and gets no
    // handshake (504)
    let answer = tokio::task::spawn_blocking(move || {
        exchange(
            port,
            b"GET /h2/x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert_eq!(
        served().await,
        1.0,
        "a request to an HTTP/2 upstream took the fast path"
    );
}

/// An upstream that closes a kept-alive connection (FIN) when it has been idle 50 ms, but
/// keeps reading it: a request that still arrives on it was sent on a connection the
/// upstream had closed, and is counted in `late` (and never answered).
async fn closing_upstream() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted, late) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (count, too_late) = (accepted.clone(), late.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let too_late = too_late.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let wait = tokio::time::timeout(
                        Duration::from_millis(50),
                        read_request(&mut s, &mut buf),
                    );
                    match wait.await {
                        Ok(Some(_)) => {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(_) => break, // idle: close our side
                    }
                }
                let _ = s.shutdown().await;
                if read_request(&mut s, &mut buf).await.is_some() {
                    too_late.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (port, accepted, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    let (up, accepted, late) = closing_upstream().await;
    let gw = Gw::start(&format!(
        "{HEAD}[upstreams.up]\ntargets = [\"127.0.0.1:{up}\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\n"
    ));
    let port = gw.port("http");
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answers = Vec::new();
        for i in 0..3 {
            // a POST: not idempotent, so a failure on a dead connection would show
            let req = format!("POST /p{i} HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc");
            if s.write_all(req.as_bytes()).is_err() {
                answers.push(format!(
                    "request {i}: the gateway had closed the connection"
                ));
                break;
            }
            let out = read_until(&mut s, |o| o.ends_with(b"ok"));
            answers.push(String::from_utf8_lossy(&out).to_string());
            // the upstream closes its side meanwhile
            std::thread::sleep(Duration::from_millis(250));
        }
        answers
    })
    .await
    .unwrap();
    assert_eq!(answers.len(), 3, "{answers:?}");
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }
    assert_eq!(
        late.load(Ordering::Relaxed),
        0,
        "a request went to a closed connection"
    );
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        3,
        "one new connection per request"
    );
    let served = metric(&gw.metrics().await, "wasmgate_fast_path_requests_total");
    assert_eq!(served, 3.0);
}

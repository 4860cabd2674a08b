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
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&out)
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n");
    dechunk(&text)
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

/// (name, bytes the client sends); each case ends its connection.
fn corpus() -> Vec<(&'static str, String)> {
    let c = |s: &str| format!("{s}{CLOSE}");
    vec![
        ("plain keep-alive", c("GET /cl HTTP/1.1\r\nhost: t\r\n\r\nGET /x?a=1&b=%20 HTTP/1.1\r\nhost: t\r\n\r\n")),
        ("chunked answer", c("GET /chunked HTTP/1.1\r\nhost: t\r\n\r\n")),
        ("close-delimited answer", "GET /close HTTP/1.1\r\nhost: t\r\n\r\n".into()),
        ("HEAD", c("HEAD /head HTTP/1.1\r\nhost: t\r\n\r\n")),
        ("204 and 304", c("GET /204 HTTP/1.1\r\nhost: t\r\n\r\nGET /304 HTTP/1.1\r\nhost: t\r\nif-none-match: \"v1\"\r\n\r\n")),
        ("hop-by-hop fields", c("GET /cl HTTP/1.1\r\nhost: t\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nte: trailers\r\nproxy-connection: x\r\nproxy-authorization: Basic eA==\r\ntrailer: x-t\r\nx-custom: 1\r\nX-Case: MiXeD\r\n\r\n")),
        ("odd path spellings", c("GET /a/../cl HTTP/1.1\r\nhost: t\r\n\r\nGET //cl HTTP/1.1\r\nhost: t\r\n\r\nGET /%2e%2e/cl HTTP/1.1\r\nhost: t\r\n\r\nGET /cl;p=1 HTTP/1.1\r\nhost: T.\r\n\r\n")),
        ("pipelined", c("GET /one HTTP/1.1\r\nhost: t\r\n\r\nGET /two HTTP/1.1\r\nhost: t\r\n\r\nHEAD /three HTTP/1.1\r\nhost: t\r\n\r\n")),
        ("pipelined after a body", c("POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabcGET /after HTTP/1.1\r\nhost: t\r\n\r\n")),
        ("chunked request body", c("POST /p HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")),
        ("CL and TE", "POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n".into()),
        ("duplicate CL", c("GET /cl HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n")),
        ("bad chunk size", "POST /p HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into()),
        ("malformed head", "GET /cl HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n".into()),
        ("HTTP/1.0", "GET /cl HTTP/1.0\r\nhost: t\r\n\r\n".into()),
        ("absolute form", c("GET http://t/cl HTTP/1.1\r\nhost: t\r\n\r\n")),
        ("no host", c("GET /cl HTTP/1.1\r\n\r\n")),
        ("hooked without and with a key", c("GET /keyed/a HTTP/1.1\r\nhost: t\r\n\r\nGET /keyed/b HTTP/1.1\r\nhost: t\r\nx-api-key: k\r\n\r\n")),
        ("refused upstream", "GET /dead/x HTTP/1.1\r\nhost: t\r\n\r\n".into()),
        ("silent upstream", "GET /hang HTTP/1.1\r\nhost: t\r\n\r\n".into()),
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
    for (name, bytes) in corpus() {
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
        if answers[0] != answers[1] || upstream[0] != upstream[1] {
            differ.push(format!(
                "== {name}\n-- client, Pingora:\n{}\n-- client, fast:\n{}\n-- upstream, Pingora:\n{}\n-- upstream, fast:\n{}",
                answers[0], answers[1], upstream[0], upstream[1]
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    let served = metric(&fast.metrics().await, "wasmgate_fast_path_requests_total");
    assert!(served >= 20.0, "the fast path served {served} requests");
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

//! HTTP faithfulness and security through a real gateway, spoken over raw sockets: path
//! and host spellings that must not skip an auth hook, request bodies held back by
//! filters, responses cut off upstream, pipelining, oversized heads, and the framing
//! rules of RFC 9112 (Host, HTTP/1.0, chunked bodies, hop-by-hop headers).

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One response read off a raw connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// The body ended by its own framing (length or last chunk), not by a close.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        let name = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&name))
            .map(|l| l[name.len()..].trim().to_string())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A raw HTTP/1 client: writes bytes as given, parses what comes back.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    /// Writes; a failed write (the server closed) is left for the response to explain.
    fn send(&mut self, bytes: &[u8]) -> &mut Self {
        let _ = self.s.write_all(bytes);
        self
    }

    /// Reads more; false on close or error.
    fn fill(&mut self) -> bool {
        let mut b = [0u8; 65536];
        match self.s.read(&mut b) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    /// The next response (to a request of `method`), or `None` if the connection closed
    /// before a head arrived. 1xx heads are skipped.
    fn response_to(&mut self, method: &str) -> Option<Resp> {
        loop {
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                if !self.fill() {
                    return None;
                }
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
            self.buf.drain(..end + 4);
            let status: u16 = head[9..12].parse().unwrap();
            if (100..200).contains(&status) {
                continue;
            }
            let mut r = Resp {
                status,
                head,
                body: Vec::new(),
                complete: true,
            };
            if method == "HEAD" || status == 204 || status == 304 {
                return Some(r);
            }
            let chunked = r
                .header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            if chunked {
                r.complete = self.read_chunks(&mut r.body);
            } else if let Some(n) = r.header("content-length") {
                let n: usize = n.parse().unwrap();
                while self.buf.len() < n && self.fill() {}
                let take = n.min(self.buf.len());
                r.body = self.buf.drain(..take).collect();
                r.complete = take == n;
            } else {
                while self.fill() {}
                r.body = std::mem::take(&mut self.buf);
            }
            return Some(r);
        }
    }

    fn response(&mut self) -> Option<Resp> {
        self.response_to("GET")
    }

    /// Decodes a chunked body; false when the connection closed before the last chunk.
    fn read_chunks(&mut self, body: &mut Vec<u8>) -> bool {
        loop {
            let line = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if !self.fill() {
                    return false;
                }
            };
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&self.buf[..line])
                    .split(';')
                    .next()
                    .unwrap()
                    .trim(),
                16,
            )
            .unwrap();
            while self.buf.len() < line + 2 + size + 2 {
                if !self.fill() {
                    return false;
                }
            }
            body.extend_from_slice(&self.buf[line + 2..line + 2 + size]);
            self.buf.drain(..line + 2 + size + 2);
            if size == 0 {
                return true;
            }
        }
    }

    /// True when the server closed the connection (within the read timeout).
    fn closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn get(port: u16, target: &str, host: &str, extra: &str) -> Resp {
    Raw::connect(port)
        .send(format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n").as_bytes())
        .response()
        .unwrap_or_else(|| panic!("no answer to {target}"))
}

const AUTH: &str = r#"
[tenants.ops]
[modules.auth]
tenant = "ops"
path = "{guests}/api_key_auth.wasm"
config = { keys = ["k"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_host_spellings_never_skip_a_hooked_route() {
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + AUTH
        + &format!(
            r#"
[upstreams.echo]
targets = ["{}"]
[[routes]]
name = "hooked"
path_prefix = "/hooked"
upstream = "echo"
hooks = ["auth"]
[[routes]]
name = "admin"
host = "admin.example.com"
path_prefix = "/"
upstream = "echo"
hooks = ["auth"]
[[routes]]
name = "all"
path_prefix = "/"
upstream = "echo"
"#,
            up.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");

    // every spelling of /hooked/x reaches the hook (401) or is refused (400)
    for (target, want) in [
        ("/hooked/x", 401),
        ("/hooked", 401),
        ("/hooked/", 401),
        ("/hooked//", 401),
        ("/hooked/.", 401),
        ("/hooked/x/..", 401),
        ("/hooked/x/%2e%2e/", 401),
        ("/%68ooked/", 401),
        ("/hooked/?a=1", 401),
        ("/hooked;x/", 401),
        ("/%68ooked/x", 401),
        ("//hooked/x", 401),
        ("/hooked//x", 401),
        ("/x/../hooked/x", 401),
        ("/./hooked/x", 401),
        ("/%2e%2e/hooked/x", 401),
        ("/x/%2E%2E/hooked/x", 401),
        ("/hooked;p=1/x", 401),
        ("/x/..;/hooked/x", 401),
        ("http://t/hooked/x", 401),
        ("HTTP://t/%68ooked/x", 401),
        ("/hooked%2fx", 400),
        ("/hooked%2Fx", 400),
        ("/hooked%5cx", 400),
        ("/hooked\\x", 400),
        ("hooked/x", 400),
        ("*", 400),
        ("/hooked%00/x", 400),
        ("/hooked%zz", 400),
    ] {
        let r = get(port, target, "t", "");
        assert_eq!(r.status, want, "{target}: {}", r.head);
        if want == 400 {
            assert_eq!(r.json()["error"], "bad_request", "{target}");
        } else {
            assert_eq!(r.json()["error"], "missing_api_key", "{target}");
        }
    }
    // two spaces: Pingora repairs the line to `%20/hooked/x`, which is not origin-form
    let r = Raw::connect(port)
        .send(b"GET  /hooked/x HTTP/1.1\r\nhost: t\r\n\r\n")
        .response()
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.head);

    // host spellings of admin.example.com reach its hook
    for host in [
        "admin.example.com",
        "admin.example.com.",
        "ADMIN.Example.com",
        "admin.example.com:8080",
        "Admin.Example.Com.:80",
    ] {
        let r = get(port, "/anything", host, "");
        assert_eq!(r.status, 401, "{host}: {}", r.head);
    }

    // what the upstream gets is what was matched: the normalized path, origin-form
    let r = get(
        port,
        "/%68ooked/./y//z/../x?q=%2F1",
        "t",
        "x-api-key: k\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.json()["path"], "/hooked/y/x?q=%2F1");
    let r = get(port, "/hooked;v=2/x", "t", "x-api-key: k\r\n");
    assert_eq!(r.json()["path"], "/hooked;v=2/x");
    let r = get(
        port,
        "http://Admin.Example.com/a/%7euser",
        "Admin.Example.com",
        "x-api-key: k\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let v = r.json();
    assert_eq!(v["path"], "/a/~user");
    assert_eq!(v["headers"]["host"], "Admin.Example.com");
    // the catch-all still serves everything else, untouched
    let r = get(port, "/other/p%C3%A9?x=1", "t", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/other/p%C3%A9?x=1");
    assert_eq!(r.json()["headers"]["host"], "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_rules_of_rfc_9112() {
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + &format!(
            "[upstreams.echo]\ntargets = [\"{}\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"echo\"\n",
            up.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    let one = |req: &str| {
        Raw::connect(port)
            .send(req.as_bytes())
            .response()
            .unwrap_or_else(|| panic!("no answer to {req:?}"))
    };
    // HTTP/1.1 needs exactly one valid Host
    for req in [
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a b\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: \r\n\r\n",
        "GET / HTTP/1.1\r\nhost: 127.0.0.1/evil\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a@b\r\n\r\n",
        "GET http://u@t/ HTTP/1.1\r\nhost: t\r\n\r\n",
        // absolute-form whose authority is not the Host (Pingora refuses it; the answer
        // is the gateway's)
        "GET http://a/ HTTP/1.1\r\nhost: b\r\n\r\n",
    ] {
        let r = one(req);
        assert_eq!(r.status, 400, "{req:?}: {}", r.head);
        assert_eq!(r.json()["error"], "bad_request");
    }
    // HTTP/1.0 without Host is fine, and the upstream still gets a Host
    let mut c = Raw::connect(port);
    let r = c.send(b"GET /ten HTTP/1.0\r\n\r\n").response().unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let v = r.json();
    assert_eq!(v["path"], "/ten");
    let host = v["headers"]["host"].as_str().unwrap_or("");
    assert!(!host.is_empty(), "upstream got no Host: {v}");
    assert!(c.closed(), "an HTTP/1.0 request without keep-alive closes");
}

/// A Proxy-Wasm filter in WAT that holds the request body back (Pause) until its end,
/// then runs `at_end` (with `$size`, the whole body's length, in scope); on the response
/// side it runs `resp_body` in each `on_response_body`.
fn body_filter(at_end: &str, resp_body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (global $seen (mut i32) (i32.const 0))
  (data (i32.const 16) "X")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    {at_end}
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (global.set $seen (i32.add (global.get $seen) (local.get $size)))
    {resp_body}
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)"#
    ))
    .unwrap()
}

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Sends `data` as one request, with Content-Length or in chunks of 7 000 bytes.
fn post(port: u16, path: &str, data: &[u8], chunked: bool) -> Resp {
    let mut c = Raw::connect(port);
    if chunked {
        c.send(
            format!("POST {path} HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
                .as_bytes(),
        );
        for piece in data.chunks(7000) {
            c.send(format!("{:x}\r\n", piece.len()).as_bytes());
            c.send(piece).send(b"\r\n");
        }
        c.send(b"0\r\n\r\n");
    } else {
        c.send(
            format!(
                "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
                data.len()
            )
            .as_bytes(),
        );
        c.send(data);
    }
    c.response().expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_arrive_whole_and_keep_their_framing() {
    let up = Upstream::start("echo").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hold.wasm"), body_filter("", "")).unwrap();
    let replace = "(drop (call $set (i32.const 0) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 1)))";
    std::fs::write(dir.path().join("replace.wasm"), body_filter(replace, "")).unwrap();
    let d = dir.path().display();
    let conf = HEAD.to_string()
        + AUTH
        + &format!(
            r#"
[limits]
max_request_body_bytes = 20000000
[modules.hold]
path = "{d}/hold.wasm"
[modules.replace]
path = "{d}/replace.wasm"
[upstreams.echo]
targets = ["{}"]
[[routes]]
path_prefix = "/hold"
upstream = "echo"
hooks = ["hold"]
[[routes]]
path_prefix = "/replace"
upstream = "echo"
hooks = ["replace"]
[[routes]]
path_prefix = "/keyed"
upstream = "echo"
hooks = ["auth"]
"#,
            up.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    for n in [1_000, 16_000, 70_000, 1_000_000, 10_000_000] {
        let data = body(n);
        for chunked in [false, true] {
            for path in ["/hold", "/keyed"] {
                let r = if path == "/keyed" {
                    let mut c = Raw::connect(port);
                    let framing = if chunked {
                        "transfer-encoding: chunked".to_string()
                    } else {
                        format!("content-length: {n}")
                    };
                    c.send(
                        format!(
                            "POST /keyed HTTP/1.1\r\nhost: t\r\nx-api-key: k\r\n{framing}\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                    if chunked {
                        c.send(format!("{n:x}\r\n").as_bytes())
                            .send(&data)
                            .send(b"\r\n0\r\n\r\n");
                    } else {
                        c.send(&data);
                    }
                    c.response().unwrap()
                } else {
                    post(port, path, &data, chunked)
                };
                assert_eq!(r.status, 200, "{path} {n} chunked={chunked}: {}", r.head);
                let v = r.json();
                let got = v["body"].as_str().unwrap();
                assert_eq!(got.len(), n, "{path} {n} chunked={chunked}");
                assert!(
                    got.as_bytes() == data.as_slice(),
                    "{path} {n}: body changed"
                );
                // a body no hook changed keeps the client's framing
                let h = &v["headers"];
                if chunked {
                    assert_eq!(h["transfer-encoding"], "chunked", "{path} {n}");
                } else {
                    assert_eq!(h["content-length"], n.to_string(), "{path} {n}: {h}");
                    assert!(h.get("transfer-encoding").is_none(), "{path} {n}: {h}");
                }
            }
        }
    }
    // a hook that replaces a body it held whole: small bodies get their new length...
    for chunked in [false, true] {
        let r = post(port, "/replace", &body(1000), chunked);
        assert_eq!(r.status, 200, "{}", r.head);
        let v = r.json();
        assert_eq!(v["body"], "X");
        if !chunked {
            assert_eq!(v["headers"]["content-length"], "1");
        }
    }
    // ...a chunked one of any size stays chunked...
    let r = post(port, "/replace", &body(300_000), true);
    assert_eq!(r.json()["body"], "X");
    // ...and a streamed one that kept a Content-Length that is no longer true is refused,
    // never sent upstream with a wrong length
    let before = up.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    let r = post(port, "/replace", &body(300_000), false);
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(r.json()["error"], "hook_changed_body_length");
    assert_eq!(
        up.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "the upstream answered a request with a wrong length"
    );
}

/// An upstream speaking raw bytes: for each connection, reads one request head, then
/// writes each step (bytes, then a pause) and closes.
async fn scripted_upstream(steps: Vec<(Vec<u8>, u64)>) -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let steps = steps.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                for (bytes, pause) in steps {
                    if s.write_all(&bytes).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_cut_off_after_their_head_never_look_complete() {
    let part = vec![b'p'; 10_000];
    let with_length = {
        let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 20000\r\n\r\n".to_vec();
        v.extend_from_slice(&part);
        v
    };
    let chunked = {
        let mut v = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2710\r\n".to_vec();
        v.extend_from_slice(&part);
        v.extend_from_slice(b"\r\n");
        v
    };
    // upstreams that reset mid-body, with a length and chunked, and one that is whole
    // but slow, for a filter that fails on its second body chunk
    let (cut_len, _t1) = scripted_upstream(vec![(with_length.clone(), 100)]).await;
    let (cut_chunked, _t2) = scripted_upstream(vec![(chunked, 100)]).await;
    let (slow, _t3) = scripted_upstream(vec![(with_length, 300), (part.clone(), 100)]).await;
    let dir = tempfile::tempdir().unwrap();
    // fails once the body is past the first 10 000 bytes (the head is out by then)
    let trap = "(if (i32.gt_u (global.get $seen) (i32.const 10000)) (then unreachable))";
    std::fs::write(dir.path().join("trap.wasm"), body_filter("", trap)).unwrap();
    let d = dir.path().display();
    let conf = HEAD.to_string()
        + &format!(
            r#"
[modules.trap]
path = "{d}/trap.wasm"
[upstreams.cut_len]
targets = ["{cut_len}"]
[upstreams.cut_chunked]
targets = ["{cut_chunked}"]
[upstreams.slow]
targets = ["{slow}"]
[[routes]]
path_prefix = "/len"
upstream = "cut_len"
[[routes]]
path_prefix = "/chunked"
upstream = "cut_chunked"
[[routes]]
path_prefix = "/trap"
upstream = "slow"
hooks = ["trap"]
"#
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    for path in ["/len", "/chunked", "/trap"] {
        let mut c = Raw::connect(port);
        let r = c
            .send(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
            .response()
            .unwrap();
        assert_eq!(r.status, 200, "{path}");
        assert!(!r.complete, "{path}: a cut-off response read as complete");
        assert!(r.body.len() <= 20_000, "{path}");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("error"),
            "{path}: an error body was appended to the response"
        );
        assert!(
            r.body.iter().all(|&b| b == b'p'),
            "{path}: foreign bytes in the body"
        );
    }
    // curl, a real client, reports the truncation as a failure
    let curl = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(gw.url("http", "/chunked"))
        .output();
    if let Ok(out) = curl {
        assert!(
            !out.status.success(),
            "curl took a truncated response as complete"
        );
    }
    let m = gw.metrics().await;
    assert!(metric(&m, "wasmgate_responses_aborted_total") >= 3.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + AUTH
        + &format!(
            r#"
[upstreams.echo]
targets = ["{}"]
[[routes]]
path_prefix = "/keyed"
upstream = "echo"
hooks = ["auth"]
[[routes]]
path_prefix = "/"
upstream = "echo"
"#,
            up.addr()
        );
    let gw = Gw::start(&conf);
    let mut c = Raw::connect(gw.port("http"));
    c.send(
        b"GET /one HTTP/1.1\r\nhost: t\r\n\r\n\
          POST /two HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc\
          GET /keyed/three HTTP/1.1\r\nhost: t\r\n\r\n\
          GET /keyed/four HTTP/1.1\r\nhost: t\r\nx-api-key: k\r\n\r\n\
          HEAD /five HTTP/1.1\r\nhost: t\r\n\r\n\
          GET /six HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    );
    let r = c.response().unwrap();
    assert_eq!(r.json()["path"], "/one");
    let r = c.response().unwrap();
    assert_eq!(
        (r.json()["path"].clone(), r.json()["body"].clone()),
        ("/two".into(), "abc".into())
    );
    let r = c.response().unwrap();
    assert_eq!(r.status, 401);
    let r = c.response().unwrap();
    assert_eq!(r.json()["path"], "/keyed/four");
    let r = c.response_to("HEAD").unwrap();
    assert_eq!(r.status, 200);
    let r = c.response().unwrap();
    assert_eq!(r.json()["path"], "/six");
    assert!(c.closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused_while_read() {
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + &format!(
            "[limits]\nmax_request_header_bytes = 16384\n[upstreams.echo]\ntargets = [\"{}\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"echo\"\n",
            up.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    // one head over the limit, never finished: 431 and closed, long before 1 MiB
    let mut c = Raw::connect(port);
    c.send(b"GET / HTTP/1.1\r\nhost: t\r\n");
    let filler = format!("x-filler: {}\r\n", "f".repeat(1000));
    let mut sent = 0;
    let mut refused = false;
    while sent < 1 << 20 {
        if c.s.write_all(filler.as_bytes()).is_err() {
            refused = true;
            break;
        }
        sent += filler.len();
    }
    let r = c.response();
    if let Some(r) = r {
        assert_eq!(r.status, 431, "{}", r.head);
        assert_eq!(r.json()["error"], "request_headers_too_large");
    } else {
        assert!(refused, "the gateway read a 1 MiB head");
    }
    // a head just under the limit is fine
    let big = format!("x-big: {}\r\n", "b".repeat(15_000));
    let r = get(port, "/ok", "t", &big);
    assert_eq!(r.status, 200);

    // 300 connections each holding an unfinished head cannot inflate the gateway
    let pid = gw.child.id();
    let before = rss_kb(pid);
    let chunk = format!("x-pad: {}\r\n", "p".repeat(4000));
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n");
        for _ in 0..16 {
            if s.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mb = rss_kb(pid).saturating_sub(before) / 1024;
    assert!(
        grown_mb < 64,
        "RSS grew {grown_mb} MiB for 300 oversized heads"
    );
    let m = gw.metrics().await;
    assert!(
        metric(&m, "wasmgate_request_heads_too_large_total") >= 300.0,
        "{m}"
    );
    drop(conns);
    let log = gw.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && !l.contains("admin API"))
        .collect();
    assert!(
        errors.is_empty(),
        "client errors logged as ERROR: {errors:?}"
    );
}

/// An upstream whose answer depends on the path: chunked bodies, hop-by-hop headers,
/// bodiless statuses with a Transfer-Encoding, an interim 103; anything else is the echo
/// upstream's answer from `echo`.
async fn quirky_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i;
                        }
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let answer: &[u8] = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                        "/hop" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=5\r\nconnection: x-foo, keep-alive\r\nx-foo: secret\r\nupgrade: h2c\r\nproxy-connection: keep-alive\r\nx-ok: 1\r\n\r\nok",
                        "/204" => b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
                        "/304" => b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
                        "/ten" => b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        "/early" => b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_and_hop_by_hop_rules_of_rfc_9112() {
    let up = Upstream::start("echo").await;
    let (quirky, _q) = quirky_upstream().await;
    // a filter answering 204 with a body: the client gets neither body nor length
    let dir = tempfile::tempdir().unwrap();
    let nothing = dir.path().join("nothing.wasm");
    std::fs::write(
        &nothing,
        wat::parse_str(
            r#"(module
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ignored")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 204) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1)))"#,
        )
        .unwrap(),
    )
    .unwrap();
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.echo]
targets = ["{}"]
[upstreams.quirky]
targets = ["{quirky}"]
[modules.nothing]
path = "{nothing}"
[[routes]]
path = "/nothing"
hooks = ["nothing"]
[[routes]]
name = "get-only"
path = "/get-only"
methods = ["GET"]
upstream = "echo"
[[routes]]
path_prefix = "/q"
upstream = "quirky"
rewrite = {{ strip_prefix = true }}
[[routes]]
path_prefix = "/"
upstream = "echo"
"#,
            up.addr(),
            nothing = nothing.display()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    let mut c = Raw::connect(port);
    let r = c
        .send(b"GET /nothing HTTP/1.1\r\nhost: t\r\n\r\n")
        .response()
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(r.header("content-length").is_none(), "{}", r.head);
    c.send(b"GET /after-204 HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(
        c.response().unwrap().json()["path"],
        "/after-204",
        "the 204 left bytes behind"
    );

    // the gateway answers in its own HTTP version, whatever the upstream's
    let r = get(port, "/q/ten", "t", "");
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    assert_eq!(r.body, b"ok");

    // an HTTP/1.0 client never gets chunks: the body ends with the connection
    let mut c = Raw::connect(port);
    let r = c
        .send(b"GET /q/chunked HTTP/1.0\r\n\r\n")
        .response()
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("transfer-encoding").is_none(), "{}", r.head);
    assert_eq!(r.body, b"hello world");
    // ...nor interim answers, which an HTTP/1.1 client does get
    let mut raw = Vec::new();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /q/early HTTP/1.0\r\n\r\n").unwrap();
    let _ = s.read_to_end(&mut raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let mut raw = Vec::new();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /q/early HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let _ = s.read_to_end(&mut raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 103"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // hop-by-hop headers stay with the upstream's connection
    let r = get(port, "/q/hop", "t", "");
    assert_eq!(r.body, b"ok");
    assert_eq!(r.header("x-ok").as_deref(), Some("1"));
    for h in ["keep-alive", "x-foo", "upgrade", "proxy-connection"] {
        assert!(r.header(h).is_none(), "{h} passed on: {}", r.head);
    }
    // bodiless answers carry no Transfer-Encoding, and the connection goes on
    let mut c = Raw::connect(port);
    for p in ["/q/204", "/q/304"] {
        c.send(format!("GET {p} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes());
        let r = c.response().unwrap();
        assert!(r.header("transfer-encoding").is_none(), "{p}: {}", r.head);
    }
    c.send(b"GET /after HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(c.response().unwrap().json()["path"], "/after");

    // Expect: 100-continue is answered by the gateway, and the connection stays open
    let mut c = Raw::connect(port);
    c.send(
        b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    );
    let mut first = [0u8; 25];
    c.s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    let r = c.send(b"hello").response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], "hello");
    assert!(r.json()["headers"].get("expect").is_none());
    assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
    c.send(b"GET /second HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(c.response().unwrap().json()["path"], "/second");

    // request framing: bad chunks 400, other codings 501, one Content-Length upstream
    let one = |req: &[u8]| Raw::connect(port).send(req).response().unwrap();
    let r = one(b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, "bad_request".into())
    );
    let r = one(
        b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    // trailers past Pingora's limit (64 KiB) are the client's fault: 400, not a 500
    let mut req =
        b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
            .to_vec();
    for i in 0..2000 {
        req.extend(format!("x-t{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    req.extend(b"\r\n");
    let r = one(&req);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, "bad_request".into())
    );
    let r = one(b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (501, "unsupported_transfer_encoding".into())
    );
    let r =
        one(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello");
    assert_eq!(r.status, 400);
    for req in [
        &b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 5, 5\r\n\r\nhello"[..],
        b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
    ] {
        let v = one(req).json();
        assert_eq!(v["headers"]["content-length"], "5");
        assert_eq!(v["body"], "hello");
    }
    // the upstream's connections were never desynchronized by any of this
    for i in 0..4 {
        let p = format!("/check/{i}");
        assert_eq!(get(port, &p, "t", "").json()["method"], "GET");
    }

    // Pingora's own refusals speak the gateway's JSON, and a wrong method names the route
    let r = one(b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (405, "method_not_allowed".into())
    );
    let r = one(b"GET /x HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, "bad_request".into())
    );
    let r = one(b"POST /get-only HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["route"], "get-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_learn_the_client_address_per_listener() {
    let up = Upstream::start("echo").await;
    let conf = format!(
        r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
[[listeners]]
listen = "127.0.0.1:{{port:behind_lb}}"
trusted_proxies = ["127.0.0.0/8"]
[[listeners]]
listen = "127.0.0.1:{{port:replace}}"
forwarded = "replace"
trusted_proxies = ["127.0.0.1"]
[[listeners]]
listen = "127.0.0.1:{{port:off}}"
forwarded = "off"
[upstreams.echo]
targets = ["{}"]
[[routes]]
upstream = "echo"
"#,
        up.addr()
    );
    let gw = Gw::start(&conf);
    let forged =
        "x-forwarded-for: 6.6.6.6\r\nx-forwarded-proto: https\r\nforwarded: for=6.6.6.6\r\n";
    let seen = |listener: &str| {
        get(gw.port(listener), "/who", "api.test:8080", forged).json()["headers"].clone()
    };

    // the default: a client's own claims are replaced by what the gateway saw
    let h = seen("http");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.test:8080");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=\"api.test:8080\""
    );
    // behind a trusted proxy, its headers are kept and this hop appended
    let h = seen("behind_lb");
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["forwarded"],
        "for=6.6.6.6, for=127.0.0.1;proto=http;host=\"api.test:8080\""
    );
    // replace trusts nobody; off passes the client's headers as they came
    assert_eq!(seen("replace")["x-forwarded-for"], "127.0.0.1");
    let h = seen("off");
    assert_eq!(h["x-forwarded-for"], "6.6.6.6");
    assert_eq!(h["forwarded"], "for=6.6.6.6");
    // an HTTP/1.0 request without Host still says who asked
    let r = Raw::connect(gw.port("http"))
        .send(b"GET /old HTTP/1.0\r\n\r\n")
        .response()
        .unwrap();
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert!(h.get("x-forwarded-host").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_can_hold_the_request_head_until_the_body_is_in() {
    // on_request_headers pauses while a body is coming; at the body's end the filter adds
    // a header and continues (a body-inspecting auth or WAF filter)
    let hold = wat::parse_str(
        r#"(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-held")
  (data (i32.const 32) "yes")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32) (param i32) (param $eos i32) (result i32)
    (i32.eqz (local.get $eos)))
  (func (export "proxy_on_request_body") (param i32) (param i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (drop (call $add (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 32) (i32.const 3)))
    (i32.const 0)))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hold.wasm"), hold).unwrap();
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + &format!(
            r#"
[limits]
max_request_body_bytes = 5000000
[modules.hold]
path = "{}/hold.wasm"
[modules.second]
path = "{{guests}}/rewrite.wasm"
config = {{ request = {{ set_headers = {{ "x-second" = "1" }} }} }}
[upstreams.echo]
targets = ["{}"]
[[routes]]
path_prefix = "/"
upstream = "echo"
hooks = ["hold", "second"]
"#,
            dir.path().display(),
            up.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    // a small body: the head waits for it, so the filter's late header goes upstream
    let small = body(20_000);
    let r = post(port, "/small", &small, false);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["headers"]["x-held"], "yes", "{v}");
    assert_eq!(
        v["headers"]["x-second"], "1",
        "the next filter never saw the request"
    );
    assert_eq!(v["body"].as_str().unwrap().as_bytes(), small.as_slice());
    // a bodiless request is not held
    let r = get(port, "/nobody", "t", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-second"], "1");
    // larger or chunked bodies: the head goes upstream first (Pingora sends it before the
    // body), the body still arrives whole and the next filter still sees the request
    for chunked in [false, true] {
        let big = body(2_000_000);
        let r = post(port, "/big", &big, chunked);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["headers"]["x-second"], "1");
        assert!(
            v["body"].as_str().unwrap().as_bytes() == big.as_slice(),
            "body changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_from_the_request_body_and_the_response_headers_are_awaited() {
    // at the request body's end the filter asks `auth` and waits; the answer continues the
    // request. On the response headers it asks again and waits; the answer adds a header
    // and continues the response.
    let map = "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\01\\00\\00\\00\\0a\\00\\00\\00\\01\\00\\00\\00:method\\00GET\\00:path\\00/\\00:authority\\00a\\00";
    let filter = wat::parse_str(format!(
        r#"(module
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $phase (mut i32) (i32.const 0))
  (data (i32.const 16) "auth")
  (data (i32.const 32) "x-enriched")
  (data (i32.const 48) "yes")
  (data (i32.const 64) "{map}")
  (func $ask
    (drop (call $call (i32.const 16) (i32.const 4) (i32.const 64) (i32.const 61)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 1024))))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 2048))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $phase (i32.const 0))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32) (param i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (call $ask)
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (global.set $phase (i32.const 1))
    (call $ask)
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (if (global.get $phase)
      (then
        (drop (call $add (i32.const 2) (i32.const 32) (i32.const 10) (i32.const 48) (i32.const 3)))
        (drop (call $continue (i32.const 1))))
      (else (drop (call $continue (i32.const 0)))))))"#
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("asks.wasm"), filter).unwrap();
    let up = Upstream::start("echo").await;
    let auth = Upstream::start("auth").await;
    let conf = HEAD.to_string()
        + &format!(
            r#"
[modules.asks]
path = "{}/asks.wasm"
allowed_upstreams = ["auth"]
[upstreams.echo]
targets = ["{}"]
[upstreams.auth]
targets = ["{}"]
[[routes]]
path_prefix = "/"
upstream = "echo"
hooks = ["asks"]
"#,
            dir.path().display(),
            up.addr(),
            auth.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    for (n, chunked) in [(1_000, false), (200_000, false), (50_000, true)] {
        let data = body(n);
        let before = auth
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed);
        let r = post(port, "/p", &data, chunked);
        assert_eq!(r.status, 200, "{n}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-enriched").as_deref(), Some("yes"), "{}", r.head);
        assert!(r.json()["body"].as_str().unwrap().as_bytes() == data.as_slice());
        let calls = auth
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            - before;
        assert_eq!(calls, 2, "one callout per phase");
    }
}

/// A module that holds the response head until it has seen the body (a response-
/// inspecting WAF): `on_response_headers` pauses, the body callback at its end either adds
/// a header (the head goes out only then, with it) or answers 403 instead of the whole
/// response. The client's connection stays usable after either.
fn inspector() -> Vec<u8> {
    wat::parse_str(
        r#"(module
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $rep (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 100) "x-inspected")
  (data (i32.const 120) "yes")
  (data (i32.const 130) "blocked")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $heap (i32.const 4096)))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (result i32) (local.get 2) (then (i32.const 0)) (else (i32.const 1))))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (i32.store (i32.const 200) (i32.const 0))
    (drop (call $buf (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 200) (i32.const 204)))
    (if (i32.and (i32.ne (i32.load (i32.const 200)) (i32.const 0))
          (i32.eq (i32.load8_u (i32.load (i32.const 200))) (i32.const 66)))
      (then
        (drop (call $send (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 130) (i32.const 7)
          (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 1))))
    (drop (call $rep (i32.const 2) (i32.const 100) (i32.const 11) (i32.const 120) (i32.const 3)))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)"#,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_can_hold_the_response_head_until_it_saw_the_body() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-up: 1\r\n\r\n".to_vec();
    let (good, _g) = scripted_upstream(vec![
        (head.clone(), 50),
        (b"good ".to_vec(), 50),
        (b"body!".to_vec(), 0),
    ])
    .await;
    let (bad, _b) = scripted_upstream(vec![(head, 50), (b"Bad body!!".to_vec(), 0)]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inspect.wasm"), inspector()).unwrap();
    let d = dir.path().display();
    let conf = HEAD.to_string()
        + &format!(
            r#"
[modules.inspect]
path = "{d}/inspect.wasm"
[upstreams.good]
targets = ["{good}"]
[upstreams.bad]
targets = ["{bad}"]
[[routes]]
path_prefix = "/good"
upstream = "good"
hooks = ["inspect"]
[[routes]]
path_prefix = "/bad"
upstream = "bad"
hooks = ["inspect"]
"#
        );
    let gw = Gw::start(&conf);
    let mut c = Raw::connect(gw.port("http"));
    for path in ["/good", "/bad", "/good"] {
        c.send(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes());
        let r = c.response().expect("an answer");
        assert!(r.complete, "{path}: {}", r.head);
        if path == "/good" {
            // the header the module added after seeing the body is in the head
            assert_eq!(r.status, 200, "{}", r.head);
            assert_eq!(
                r.header("x-inspected").as_deref(),
                Some("yes"),
                "{}",
                r.head
            );
            assert_eq!(r.header("x-up").as_deref(), Some("1"));
            assert_eq!(r.body, b"good body!");
        } else {
            // its answer replaced the whole response: nothing of the upstream's got out
            assert_eq!(r.status, 403, "{}", r.head);
            assert_eq!(r.body, b"blocked");
            assert!(r.header("x-up").is_none(), "{}", r.head);
        }
    }
    // HTTP/1.0 cannot have its head held: the module's failure policy answers
    let mut c = Raw::connect(gw.port("http"));
    c.send(b"GET /good HTTP/1.0\r\nhost: t\r\n\r\n");
    let r = c.response().expect("an answer");
    assert_eq!(r.status, 503, "{}", r.head);
}

/// A request denied from its headers, before its body was read: a small body is read and
/// dropped, so pipelined requests behind it are still answered on the same connection; a
/// client waiting for `100 Continue` is answered without being asked for its body, and its
/// connection closes (its body may or may not follow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_with_a_small_body_keeps_the_connection() {
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + AUTH
        + &format!(
            r#"
[upstreams.echo]
targets = ["{}"]
[[routes]]
path_prefix = "/api"
upstream = "echo"
hooks = ["auth"]
"#,
            up.addr()
        );
    let gw = Gw::start(&conf);
    let post = |key: &str| {
        format!("POST /api/p HTTP/1.1\r\nhost: t\r\n{key}content-length: 5\r\n\r\nabcde")
    };
    let mut c = Raw::connect(gw.port("http"));
    let three = post("") + &post("x-api-key: k\r\n") + &post("");
    c.send(three.as_bytes());
    for want in [401, 200, 401] {
        let r = c
            .response_to("POST")
            .expect("an answer on the same connection");
        assert_eq!(r.status, want, "{}", r.head);
        assert!(
            r.header("connection").is_none_or(|v| v != "close"),
            "{}",
            r.head
        );
    }
    // the upstream got the allowed request with its body
    assert_eq!(
        up.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let mut c = Raw::connect(gw.port("http"));
    c.send(b"POST /api/p HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n");
    let r = c.response_to("POST").expect("an answer");
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(c.closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_from_the_response_body_are_awaited() {
    // The SDK guest `body-scan` sends the whole response body to a scanner from
    // `on_http_response_body` and waits: the scanner's answer (here the echo of what it
    // was sent) replaces the body. With the head held, the scanner's status is added as a
    // header and a scanner that cannot be reached makes the guest answer 451 in place of
    // the whole response; the connection stays usable after each.
    let up = Upstream::start("echo").await;
    let scanner = Upstream::start("scanner").await;
    let slow = Upstream::with(UpstreamOpts {
        name: "slow-scanner".into(),
        delay: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    let (dead, _dead) = refusing_port();
    // one worker thread: a response that blocked it would stall every other request
    let conf = HEAD.replace("watch_config = false", "watch_config = false\nthreads = 1")
        + &format!(
            r#"
[modules.held]
path = "{{guests}}/body_scan.wasm"
allowed_upstreams = ["scanner"]
config = {{ upstream = "scanner", hold_head = true }}
[modules.streamed]
path = "{{guests}}/body_scan.wasm"
allowed_upstreams = ["scanner"]
config = {{ upstream = "scanner" }}
[modules.length]
path = "{{guests}}/body_scan.wasm"
allowed_upstreams = ["scanner"]
config = {{ upstream = "scanner", keep_length = true }}
[modules.refused]
path = "{{guests}}/body_scan.wasm"
allowed_upstreams = ["dead"]
config = {{ upstream = "dead", hold_head = true }}
[modules.slow]
path = "{{guests}}/body_scan.wasm"
allowed_upstreams = ["slow"]
config = {{ upstream = "slow", hold_head = true }}
[upstreams.echo]
targets = ["{}"]
[upstreams.scanner]
targets = ["{}"]
[upstreams.slow]
targets = ["{}"]
[upstreams.dead]
targets = ["127.0.0.1:{dead}"]
[[routes]]
path_prefix = "/held"
upstream = "echo"
hooks = ["held"]
[[routes]]
path_prefix = "/streamed"
upstream = "echo"
hooks = ["streamed"]
[[routes]]
path_prefix = "/length"
upstream = "echo"
hooks = ["length"]
[[routes]]
path_prefix = "/refused"
upstream = "echo"
hooks = ["refused"]
[[routes]]
path_prefix = "/slow"
upstream = "echo"
hooks = ["slow"]
[[routes]]
path_prefix = "/"
upstream = "echo"
"#,
            up.addr(),
            scanner.addr(),
            slow.addr(),
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");

    let mut c = Raw::connect(port);
    for path in ["/held/a", "/streamed/b", "/held/c"] {
        c.send(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes());
        let r = c.response().expect("an answer");
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.complete, "{path}: the body ends by its framing");
        // the body is the scanner's echo of the upstream's body
        let scan = r.json();
        assert_eq!(scan["upstream"], "scanner", "{path}");
        assert_eq!(scan["path"], "/scan");
        let original: Value = serde_json::from_str(scan["body"].as_str().unwrap()).unwrap();
        assert_eq!(
            original["path"], path,
            "the scanner saw the upstream's body"
        );
        let held = path.starts_with("/held");
        assert_eq!(
            r.header("x-scanned").as_deref(),
            held.then_some("200"),
            "{path}: {}",
            r.head
        );
    }
    let scans = scanner
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(scans, 3, "one scan per response");

    // HTTP/1.0: the body ends with the connection
    let r = Raw::connect(port)
        .send(b"GET /streamed/old HTTP/1.0\r\n\r\n")
        .response()
        .expect("an answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["upstream"], "scanner", "{}", r.head);

    // the head went out with the upstream's Content-Length and the scanner changed the
    // body's length: the response is cut off, never sent as if whole
    let mut cut = Raw::connect(port);
    let r = cut
        .send(b"GET /length/x HTTP/1.1\r\nhost: t\r\n\r\n")
        .response()
        .expect("a head");
    assert_eq!(r.status, 200);
    assert!(r.header("content-length").is_some(), "{}", r.head);
    assert!(
        !r.complete,
        "a changed body under the old length is cut off"
    );
    assert!(cut.closed());

    c.send(b"GET /refused/x HTTP/1.1\r\nhost: t\r\n\r\n");
    let r = c.response().expect("an answer");
    assert_eq!(r.status, 451, "{}", r.head);
    assert_eq!(r.body, b"refused by the scanner");
    assert_eq!(r.header("x-scanned").as_deref(), Some("refused"));
    c.send(b"GET /plain HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(c.response().expect("the connection is kept").status, 200);

    // A response waiting on its scanner does not stall the gateway's only worker thread:
    // a request sent after it is answered before it.
    let waiting = std::thread::spawn(move || {
        let r = get(port, "/slow/x", "t", "");
        (r.status, std::time::Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = get(port, "/plain", "t", "");
    let plain_done = std::time::Instant::now();
    assert_eq!(r.status, 200);
    let (status, slow_done) = waiting.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        plain_done < slow_done,
        "the plain request was answered while the slow scan waited"
    );
}

/// Bytes as a WAT data string.
fn wat_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("\\{x:02x}")).collect()
}

/// A header map as `proxy_http_call` takes it.
fn header_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

/// A gateway with upstreams `echo` and `auth` and, for each module name `m`, the module
/// `dir/m.wasm` (allowed to call `auth`) on a route `/m` to `echo`. The upstreams are
/// returned so that they live as long as the test needs them.
async fn routed_modules(dir: &std::path::Path, modules: &[&str]) -> (Gw, [Upstream; 2]) {
    let up = Upstream::start("echo").await;
    let auth = Upstream::start("auth").await;
    let mut conf = HEAD.to_string()
        + &format!(
            "[upstreams.echo]\ntargets = [\"{}\"]\n[upstreams.auth]\ntargets = [\"{}\"]\n",
            up.addr(),
            auth.addr()
        );
    for m in modules {
        conf += &format!(
            "[modules.{m}]\npath = \"{}/{m}.wasm\"\nallowed_upstreams = [\"auth\"]\n[[routes]]\npath_prefix = \"/{m}\"\nupstream = \"echo\"\nhooks = [\"{m}\"]\n",
            dir.display()
        );
    }
    (Gw::start(&conf), [up, auth])
}

/// A module that, in `callback` (a headers callback), calls upstream `auth` with the
/// header map `map` and `body`, pauses, and from the answer continues stream `direction`
/// (0 the request, 1 the response).
fn calling_module(callback: &str, map: &[u8], body: &[u8], direction: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "auth")
  (data (i32.const 64) "{}")
  (data (i32.const 512) "{}")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 2048))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "{callback}") (param i32 i32 i32) (result i32)
    (drop (call $call (i32.const 16) (i32.const 4) (i32.const 64) (i32.const {})
      (i32.const 512) (i32.const {}) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 1024)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (drop (call $continue (i32.const {direction})))))"#,
        wat_bytes(map),
        wat_bytes(body),
        map.len(),
        body.len()
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_cannot_reframe_responses_or_callouts() {
    // a module that, in the response headers, sets header `$1` to `$2` (by add or
    // replace), and one that makes its response body longer than the upstream's length
    let reframe = |op: &str, name: &str, value: &str| {
        wat::parse_str(format!(
            r#"(module
  (import "env" "{op}" (func $h (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{name}")
  (data (i32.const 64) "{value}")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $h (i32.const 2) (i32.const 16) (i32.const {}) (i32.const 64) (i32.const {})))
    (i32.const 0)))"#,
            name.len(),
            value.len()
        ))
        .unwrap()
    };
    let grow = wat::parse_str(
        r#"(module
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "and some more")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_response_body") (param i32 i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (drop (call $set (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 13)))
    (i32.const 0)))"#,
    )
    .unwrap();
    // a callout whose guest headers try to frame it: chunked, a Host of its own, a length
    let map = header_map(&[
        (":method", "POST"),
        (":path", "/c"),
        (":authority", "auth"),
        ("transfer-encoding", "chunked"),
        ("host", "evil"),
        ("content-length", "3"),
        ("connection", "x-private"),
        ("x-private", "1"),
    ]);
    let smuggle = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let caller = calling_module("proxy_on_request_headers", &map, smuggle, 0);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("add-length.wasm"),
        reframe("proxy_add_header_map_value", "content-length", "7"),
    )
    .unwrap();
    std::fs::write(
        d.join("set-chunked.wasm"),
        reframe(
            "proxy_replace_header_map_value",
            "transfer-encoding",
            "chunked",
        ),
    )
    .unwrap();
    std::fs::write(d.join("grow.wasm"), grow).unwrap();
    std::fs::write(d.join("caller.wasm"), caller).unwrap();
    let (gw, [_up, auth]) =
        routed_modules(d, &["add-length", "set-chunked", "grow", "caller"]).await;
    let port = gw.port("http");

    // one framing: the response reads whole, and the pipelined request after it is
    // answered
    for path in ["/add-length/a", "/set-chunked/b"] {
        let mut c = Raw::connect(port);
        c.send(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\nGET /set-chunked/next HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes());
        let r = c.response().expect("an answer");
        assert_eq!(r.status, 200, "{path}");
        let lengths = r
            .head
            .to_ascii_lowercase()
            .matches("content-length:")
            .count();
        let chunked = r.head.to_ascii_lowercase().contains("transfer-encoding");
        // one framing: a single length, or chunks (the lengths disagreed)
        assert!(
            lengths <= 1 && (lengths == 1) != chunked,
            "{path}: {}",
            r.head
        );
        assert!(r.complete);
        assert_eq!(r.json()["path"], path);
        let next = c.response().expect("the pipelined request is answered");
        assert_eq!(next.json()["path"], "/set-chunked/next");
    }

    // a body grown past the upstream's Content-Length is cut off, not cut short
    let mut c = Raw::connect(port);
    let r = c
        .send(b"GET /grow/x HTTP/1.1\r\nhost: t\r\n\r\n")
        .response()
        .expect("a head");
    assert!(
        r.status != 200 || !r.complete,
        "a grown body sent as if whole: {}{:?}",
        r.head,
        String::from_utf8_lossy(&r.body)
    );
    assert!(c.closed(), "the connection ends with the cut-off response");

    // the callout goes out framed by the gateway: one request, the guest's body whole
    let r = get(port, "/caller/x", "t", "");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        auth.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the guest's framing smuggled a request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_change_from_the_body_only_before_the_head_went_upstream() {
    // at the body's end the module adds `x-late: 1` to the request; what that call
    // answered comes back to the client as the response header `x-late-status`
    let module = wat::parse_str(
        r#"(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $st (mut i32) (i32.const -1))
  (data (i32.const 16) "x-late")
  (data (i32.const 32) "1")
  (data (i32.const 48) "x-late-status")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $st (i32.const -1)))
  (func (export "proxy_on_request_body") (param i32 i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 0))))
    (global.set $st (call $add (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 32) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (i32.store8 (i32.const 64) (i32.add (i32.const 48) (global.get $st)))
    (drop (call $add (i32.const 2) (i32.const 48) (i32.const 13) (i32.const 64) (i32.const 1)))
    (i32.const 0)))"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("late.wasm"), module).unwrap();
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + &format!(
            "[limits]\nmax_request_body_bytes = 1000000\n[modules.late]\npath = \"{}/late.wasm\"\n[upstreams.echo]\ntargets = [\"{}\"]\n[[routes]]\nupstream = \"echo\"\nhooks = [\"late\"]\n",
            dir.path().display(),
            up.addr()
        );
    let gw = Gw::start(&conf);
    let port = gw.port("http");
    // a small body is read before the head goes upstream: the change arrives (Ok = 0)
    let r = post(port, "/small", &body(1000), false);
    assert_eq!(r.json()["headers"]["x-late"], "1", "{}", r.head);
    assert_eq!(r.header("x-late-status").as_deref(), Some("0"));
    // a large one streams after the head: the change is refused (BadArgument = 2), as
    // Envoy refuses it once the headers continued, never silently lost
    let r = post(port, "/large", &body(200_000), false);
    assert!(r.json()["headers"].get("x-late").is_none(), "{}", r.head);
    assert_eq!(r.header("x-late-status").as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_cannot_hold_more_response_body_than_the_limit() {
    // the inspector holds the head and the body until the body's end; the upstream sends
    // 3 000 bytes in three pieces, and the gateway lets a module hold 1 500
    let piece = vec![b'g'; 1000];
    let (up, _u) = scripted_upstream(vec![
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3000\r\n\r\n".to_vec(),
            50,
        ),
        (piece.clone(), 50),
        (piece.clone(), 50),
        (piece, 0),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inspect.wasm"), inspector()).unwrap();
    let conf = HEAD.to_string()
        + &format!(
            "[limits]\nmax_buffered_response_bytes = 1500\n[modules.inspect]\npath = \"{}/inspect.wasm\"\n[upstreams.up]\ntargets = [\"{up}\"]\n[[routes]]\nupstream = \"up\"\nhooks = [\"inspect\"]\n",
            dir.path().display()
        );
    let gw = Gw::start(&conf);
    let r = get(gw.port("http"), "/x", "t", "");
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body).contains("hook_failed"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("response_body_too_large") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A module pauses a bodiless response on a callout, then resumes from the callout's
/// answer. As in Envoy, only `proxy_continue_stream(Response)` resumes it: continuing the
/// request (already sent upstream) leaves the response paused, so the module fails with
/// `paused_in_response` and its policy answers. (A response with a body would go on when
/// the module's body callback continues, as in Envoy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_continuing_the_response_resumes_a_paused_response() {
    let map = header_map(&[(":method", "GET"), (":path", "/c"), (":authority", "auth")]);
    let resumer = |direction| calling_module("proxy_on_response_headers", &map, b"", direction);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("response.wasm"), resumer(1)).unwrap();
    std::fs::write(dir.path().join("request.wasm"), resumer(0)).unwrap();
    let (gw, _ups) = routed_modules(dir.path(), &["response", "request"]).await;
    // HEAD: the response ends with its head, so no body callback can resume it either
    let r = client()
        .head(gw.url("http", "/response/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .head(gw.url("http", "/request/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        gw.wait_log("paused_in_response", Duration::from_secs(2))
            .await,
        "{}",
        gw.log()
    );
}

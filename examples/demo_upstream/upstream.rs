//! A tiny HTTP/1.1 upstream: the demo's backend, the benchmark's target, and the tests'
//! real server (they include this file). It answers every request with JSON describing what it received (or a
//! fixed body), keeps connections alive, and can be told to misbehave for fault tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug, Default)]
pub struct UpstreamOpts {
    /// Reported in every answer, so tests can tell targets apart.
    pub name: String,
    /// Answer `{"ok":true}` without echoing (the benchmark's target).
    pub fixed: bool,
    /// Wait this long before answering (slow upstream).
    pub delay: Duration,
    /// Close the connection after reading the request, without answering.
    pub reset: bool,
    /// Send the response head, wait this long, then the body (a body that comes later).
    pub body_after: Duration,
}

/// Requests answered and connections accepted, for tests.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
}

/// Serves until the listener's task is dropped.
pub async fn serve(listener: TcpListener, opts: UpstreamOpts, stats: Arc<Stats>) {
    let opts = Arc::new(opts);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (opts, stats) = (opts.clone(), stats.clone());
        tokio::spawn(async move {
            let _ = conn(sock, &opts, &stats).await;
        });
    }
}

async fn conn(mut sock: TcpStream, opts: &UpstreamOpts, stats: &Stats) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    loop {
        // read one request head
        let (head_len, body_len, close, parsed) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let mut len = 0usize;
                let mut close = false;
                let mut chunked = false;
                let mut echo = serde_json::Map::new();
                for h in req.headers.iter() {
                    let v = String::from_utf8_lossy(h.value).to_string();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    } else if h.name.eq_ignore_ascii_case("connection")
                        && v.eq_ignore_ascii_case("close")
                    {
                        close = true;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = v.to_ascii_lowercase().contains("chunked");
                    }
                    echo.insert(h.name.to_ascii_lowercase(), v.into());
                }
                let info = (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    echo,
                    chunked,
                );
                break (n, len, close, info);
            }
            if buf.len() > 64 * 1024 {
                return Ok(());
            }
            let mut tmp = [0u8; 4096];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let (method, path, headers, chunked) = parsed;
        // read the body (content-length or chunked)
        buf.drain(..head_len);
        let body = if chunked {
            read_chunked(&mut sock, &mut buf).await?
        } else {
            while buf.len() < body_len {
                let mut tmp = [0u8; 8192];
                let n = sock.read(&mut tmp).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            buf.drain(..body_len).collect::<Vec<u8>>()
        };
        if opts.reset {
            return Ok(());
        }
        if !opts.delay.is_zero() {
            tokio::time::sleep(opts.delay).await;
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if path.starts_with("/auth/check") {
            // a stand-in auth service for the ext-auth demo: one good token
            let ok =
                headers.get("authorization").and_then(|v| v.as_str()) == Some("Bearer demo-token");
            let head: &[u8] = if ok {
                b"HTTP/1.1 200 OK\r\nx-user: demo-user\r\ncontent-length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
            };
            sock.write_all(head).await?;
            if close {
                return Ok(());
            }
            continue;
        }
        if let Some((_, code @ ("204" | "304"))) = path.split_once("/status/") {
            // a bodiless status (tests of end-of-stream flags)
            sock.write_all(
                format!(
                    "HTTP/1.1 {code} No Body\r\nx-upstream: {}\r\n\r\n",
                    opts.name
                )
                .as_bytes(),
            )
            .await?;
            if close {
                return Ok(());
            }
            continue;
        }
        let payload = if opts.fixed {
            b"{\"ok\":true}".to_vec()
        } else {
            serde_json::json!({
                "upstream": opts.name,
                "method": method,
                "path": path,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            })
            .to_string()
            .into_bytes()
        };
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-upstream: ");
        out.extend_from_slice(opts.name.as_bytes());
        out.extend_from_slice(format!("\r\ncontent-length: {}\r\n\r\n", payload.len()).as_bytes());
        if !opts.body_after.is_zero() {
            sock.write_all(&out).await?;
            tokio::time::sleep(opts.body_after).await;
            out.clear();
        }
        if method != "HEAD" {
            out.extend_from_slice(&payload);
        }
        sock.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
}

async fn read_chunked(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        // need a full size line
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let mut tmp = [0u8; 8192];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Ok(body);
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let size_str = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        while buf.len() < line_end + 2 + size + 2 {
            let mut tmp = [0u8; 8192];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Ok(body);
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..line_end + 2 + size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

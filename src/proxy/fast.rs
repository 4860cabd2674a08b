//! The HTTP/1.1 fast path: a bodiless HTTP/1.1 request on an HTTP/1 client connection is
//! proxied by a plain request → response loop on the connection's own task, with a
//! per-thread pool of upstream connections, instead of Pingora's proxy machinery (a task
//! and two channels per request, a pool behind locks that spawns a task per idle
//! connection and asks the kernel for the peer's address on every reuse).
//!
//! Only the machinery is replaced. The request runs the gateway's own phases, the same
//! [`ProxyHttp`] methods of [`Gateway`] Pingora calls, in the order Pingora calls them:
//! routing, limits, hooks, rewrites, the error answers, the access log and the metrics
//! are the same code on both paths. Pingora's HTTP/1 session still parses the request,
//! writes the response and frames both (smuggling checks, keep-alive, HEAD/204/304,
//! chunked and close-delimited bodies).
//!
//! Everything else goes to Pingora, decided from the request head before any of it is
//! consumed ([`Loop::of`]): HTTP/2, requests with a body or `Expect`, upgrades, HTTP/1.0,
//! connection-nominated headers, heads this loop's parser cannot read. A connection
//! handed to Pingora stays with it. Upstreams are always spoken to in HTTP/1.1 here (as
//! nginx does); an upstream that only speaks HTTP/2 is reached by HTTP/2 clients.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::http::HttpTask;
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, Peer, ALPN};
use pingora::{Error, ErrorType, Result};

use super::{Ctx, Gateway};

/// How many times one request is tried (Pingora's own limit).
const MAX_TRIES: usize = 16;
/// Idle upstream connections kept per target on each thread.
const IDLE_PER_TARGET: usize = 128;

/// What the next request head on a connection asks for.
pub enum Loop {
    /// The fast path serves it.
    Fast,
    /// Pingora serves it (and the rest of the connection).
    Pingora,
}

impl Loop {
    /// Decides from a complete request head (`None`: not complete yet). A head the
    /// parser refuses goes to Pingora, which answers it as it always has.
    pub fn of(head: &[u8]) -> Option<Loop> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let fast = match req.parse(head) {
            Ok(httparse::Status::Partial) => return None,
            Err(_) => false,
            Ok(httparse::Status::Complete(_)) => {
                req.version == Some(1)
                    && req.path.is_some_and(|p| p.starts_with('/'))
                    && req.headers.iter().all(plain)
            }
        };
        Some(if fast { Loop::Fast } else { Loop::Pingora })
    }
}

/// A header the fast path forwards as Pingora would without special handling: no body
/// framing, no upgrade, no `Expect`, no connection-nominated fields.
fn plain(h: &httparse::Header) -> bool {
    let v = h.value;
    let name = h.name;
    if name.eq_ignore_ascii_case("content-length") {
        return v == b"0";
    }
    if name.eq_ignore_ascii_case("connection") {
        return v.split(|b| *b == b',').all(|t| {
            let t = t.trim_ascii();
            t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
        });
    }
    if name.eq_ignore_ascii_case("host") {
        return !v.contains(&b'@');
    }
    !["transfer-encoding", "upgrade", "expect", "http2-settings"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

/// The fields Pingora's default request policy strips before the phases see the upstream
/// request (the fast path admits no connection-nominated ones), in Pingora's order: not
/// [`crate::headers::HOP_BY_HOP`], which is the RFC's set. The order is part of the bytes
/// sent: a removal moves the map's last field into the hole, so another order forwards
/// the remaining fields in another order (the differential test shows it).
const HOP_BY_HOP: [&str; 10] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "connection",
    "upgrade",
    "http2-settings",
];

thread_local! {
    /// Idle upstream connections of this thread, by peer (address, TLS, pool key).
    static IDLE: RefCell<HashMap<u64, Vec<(Stream, Instant)>>> = RefCell::new(HashMap::new());
}

/// The fast path's state: the gateway's phases and a connector for new upstream
/// connections (TLS included).
pub struct FastPath {
    gateway: Gateway,
    connector: TransportConnector,
}

impl FastPath {
    pub fn new(gateway: Gateway, connector: TransportConnector) -> FastPath {
        FastPath { gateway, connector }
    }

    /// Serves one request whose head is in `stream`'s replay buffer; the stream back
    /// when the client connection may carry another, with the bytes of the next
    /// (pipelined) requests Pingora's session read past this one.
    pub async fn serve(&self, stream: Stream, shutting_down: bool) -> Option<Reusable> {
        let gw = &self.gateway;
        let mut session = Session::new_h1(stream);
        // as Pingora's HTTP/1 server does: 60 s unless the conf sets another (the
        // request phase does) or the server is shutting down
        session.set_keepalive((!shutting_down).then_some(60));
        match session.downstream_session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype, ErrorType::InvalidHTTPHeader) {
                    let _ = session.downstream_session.respond_error(400).await;
                }
                return None;
            }
        }
        gw.metrics.fast_path_requests.inc();
        let mut ctx = gw.new_ctx();
        if let Err(e) = gw.early_request_filter(&mut session, &mut ctx).await {
            return self.fail(session, &mut ctx, e).await;
        }
        match gw.request_filter(&mut session, &mut ctx).await {
            Ok(true) => {
                gw.logging(&mut session, None, &mut ctx).await;
                return reusable(session).await;
            }
            Ok(false) => {}
            Err(e) => return self.fail(session, &mut ctx, e).await,
        }
        let mut reuse = false;
        let mut error = None;
        for _ in 0..MAX_TRIES {
            let (r, e) = self.proxy(&mut session, &mut ctx).await;
            reuse = r;
            let retry = e.as_ref().is_some_and(|e| e.retry());
            error = e;
            if !retry {
                break;
            }
        }
        if let Some(e) = &error {
            gw.fail_to_proxy(&mut session, e, &mut ctx).await;
        }
        gw.logging(&mut session, error.as_deref(), &mut ctx).await;
        if let Some(e) = error {
            session.downstream_session.on_proxy_failure(e);
        }
        if reuse {
            reusable(session).await
        } else {
            None
        }
    }

    /// An error before the upstream: the gateway's answer, the log, and the connection
    /// kept if the answer allows.
    async fn fail(&self, mut session: Session, ctx: &mut Ctx, e: Box<Error>) -> Option<Reusable> {
        let gw = &self.gateway;
        let res = gw.fail_to_proxy(&mut session, &e, ctx).await;
        gw.logging(&mut session, Some(&e), ctx).await;
        session.downstream_session.on_proxy_failure(e);
        if res.can_reuse_downstream {
            reusable(session).await
        } else {
            None
        }
    }

    /// One try: a peer, a connection, the request, the response. Whether the client
    /// connection may be reused, and the error.
    async fn proxy(&self, session: &mut Session, ctx: &mut Ctx) -> (bool, Option<Box<Error>>) {
        let gw = &self.gateway;
        let mut peer = match gw.upstream_peer(session, ctx).await {
            Ok(p) => p,
            Err(e) => return (false, Some(e)),
        };
        // this loop speaks HTTP/1.1 to every upstream
        if peer.options.alpn != ALPN::H1 {
            peer.options.alpn = ALPN::H1;
        }
        let (stream, reused) = match self.connect(&peer).await {
            Ok(c) => c,
            Err(mut e) => {
                e.as_up();
                return (
                    false,
                    Some(gw.fail_to_connect(session, &peer, ctx, e).into_up()),
                );
            }
        };
        let mut client = UpstreamSession::new(stream);
        client.read_timeout = peer.options.read_timeout;
        client.write_timeout = peer.options.write_timeout;
        let (server_reuse, client_reuse, error) = self.exchange(session, &mut client, ctx).await;
        if client_reuse && error.is_none() {
            // keep-alive as the answer allows (Pingora's pool does the same on release)
            client.respect_keepalive();
            if let Some(stream) = client.reuse().await {
                put_idle(peer.reuse_hash(), stream);
            }
        }
        let error = error.map(|e| {
            // a reused connection the upstream had closed: tried again, before any answer
            let reused = reused && session.response_written().is_none();
            gw.error_while_proxy(&peer, session, e, ctx, reused)
        });
        (server_reuse, error)
    }

    /// A pooled connection to `peer` that is still open, or a new one.
    async fn connect(&self, peer: &HttpPeer) -> Result<(Stream, bool)> {
        if let Some(s) = take_idle(peer.reuse_hash(), peer.idle_timeout()) {
            return Ok((s, true));
        }
        Ok((self.connector.new_stream(peer).await?, false))
    }

    /// The request head upstream, then the response to the client, one task at a time:
    /// (client reusable, upstream reusable, error).
    async fn exchange(
        &self,
        session: &mut Session,
        client: &mut UpstreamSession,
        ctx: &mut Ctx,
    ) -> (bool, bool, Option<Box<Error>>) {
        let gw = &self.gateway;
        let mut req = Box::new(session.req_header().clone());
        let had_host = req.headers.contains_key(http::header::HOST);
        req.set_version(http::Version::HTTP_11);
        for name in HOP_BY_HOP {
            req.remove_header(name);
        }
        if let Err(e) = gw.upstream_request_filter(session, &mut req, ctx).await {
            return (false, true, Some(e));
        }
        if let Err(e) = host_after_filters(&mut req, had_host) {
            return (false, true, Some(e.into_in()));
        }
        if let Err(e) = client.write_request_header(req).await {
            return (false, false, Some(e.into_up()));
        }
        let head_only = session.req_header().method == http::Method::HEAD;
        loop {
            let task = match client.read_response_task().await {
                Ok(t) => t,
                Err(e) => return (false, false, Some(e.into_up())),
            };
            let (task, end) = match task {
                HttpTask::Header(mut head, end) => {
                    // Pingora's rule: a response without framing becomes chunked, so the
                    // client connection can stay open
                    let no_body = head_only || matches!(head.status.as_u16(), 204 | 304);
                    if !no_body
                        && !head.status.is_informational()
                        && !head.headers.contains_key(http::header::TRANSFER_ENCODING)
                        && !head.headers.contains_key(http::header::CONTENT_LENGTH)
                        && !end
                    {
                        head.set_version(http::Version::HTTP_11);
                        if let Err(e) =
                            head.insert_header(http::header::TRANSFER_ENCODING, "chunked")
                        {
                            return (false, false, Some(e));
                        }
                    }
                    if let Err(e) = gw.response_filter(session, &mut head, ctx).await {
                        return (false, false, Some(e));
                    }
                    (HttpTask::Header(head, end), end)
                }
                HttpTask::Body(mut data, end) => {
                    if let Err(e) = gw.response_body_filter(session, &mut data, end, ctx) {
                        return (false, false, Some(e));
                    }
                    (HttpTask::Body(data, end), end)
                }
                HttpTask::Done => (HttpTask::Done, true),
                HttpTask::Failed(e) => return (false, false, Some(e)),
                // HTTP/1 upstreams send neither here (no upgrade was asked for)
                other => (other, false),
            };
            if let Err(e) = session.write_response_tasks(vec![task]).await {
                return (false, false, Some(e));
            }
            if end {
                break;
            }
        }
        let client_reuse = client.is_body_done();
        match session.downstream_session.finish_body().await {
            Ok(_) => (true, client_reuse, None),
            Err(_) => (false, client_reuse, None),
        }
    }
}

/// A client connection after a response, and what was read of the next request.
pub type Reusable = (Stream, Option<bytes::BytesMut>);

async fn reusable(session: Session) -> Option<Reusable> {
    let back = session.downstream_session.finish().await.ok().flatten()?;
    Some(back.into_parts())
}

/// Pingora's Host rules after the filters, for an origin-form target: no userinfo, and a
/// Host the client sent is never dropped (an empty one stands in).
fn host_after_filters(req: &mut RequestHeader, had_host: bool) -> Result<()> {
    if let Some(host) = req.headers.get(http::header::HOST) {
        if host.as_bytes().contains(&b'@') {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "userinfo in Host header");
        }
        return Ok(());
    }
    if had_host {
        req.insert_header(http::header::HOST, "")?;
    }
    Ok(())
}

/// An idle connection to the peer keyed `key` that is still open and has been idle less
/// than `max_idle`. Closed ones (the upstream hung up) and stale ones are dropped.
fn take_idle(key: u64, max_idle: Option<Duration>) -> Option<Stream> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.get_mut(&key)?;
        while let Some((stream, since)) = list.pop() {
            if max_idle.is_some_and(|m| since.elapsed() >= m) || !quiet(&stream) {
                continue;
            }
            return Some(stream);
        }
        None
    })
}

fn put_idle(key: u64, stream: Stream) {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_PER_TARGET {
            list.push((stream, Instant::now()));
        }
    });
}

/// Whether an idle connection has nothing to read: no bytes, no end of stream. A pooled
/// HTTP/1 connection that became readable was closed by the upstream (or sent bytes it
/// should not have): either way it cannot carry a request.
fn quiet(stream: &Stream) -> bool {
    use std::os::fd::FromRawFd;
    let fd = stream.id();
    // SAFETY: `fd` is the socket `stream` owns and keeps open for this call; the
    // `TcpStream` made from it is never dropped (`ManuallyDrop`), so it does not close
    // it. `peek` only reads the socket's receive queue; the socket is non-blocking
    // (tokio set it so), so an empty queue is `WouldBlock`, never a wait.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    matches!(socket.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

//! The HTTP/1.1 fast path: an HTTP/1.1 request on an HTTP/1 client connection is proxied
//! by a plain request → response loop on the connection's own task, with a per-thread
//! pool of upstream connections, instead of Pingora's proxy machinery (a task and two
//! channels per request, a pool behind locks that spawns a task per idle connection and
//! asks the kernel for the peer's address on every reuse). Bodies stream both ways at
//! once, in one `select!` over the client's body and the upstream's answer.
//!
//! Only the machinery is replaced. The request runs the gateway's own phases, the same
//! [`ProxyHttp`] methods of [`Gateway`] Pingora calls, in the order Pingora calls them:
//! routing, limits, hooks and their body callbacks, rewrites, `Expect: 100-continue`, the
//! error answers, the access log and the metrics are the same code on both paths.
//! Pingora's HTTP/1 sessions still parse the request, write the response and frame both
//! (keep-alive, HEAD/204/304, chunked and close-delimited bodies); a retry sends the body
//! again from Pingora's retry buffer, under Pingora's retry rules.
//!
//! Everything else goes to Pingora, decided from the request head before any of it is
//! consumed ([`Loop::of`]): HTTP/2, upgrades, HTTP/1.0, absolute-form targets,
//! connection-nominated headers, any framing but one `Content-Length` or `chunked`
//! (smuggling attempts are Pingora's to refuse), heads this loop's parser cannot read,
//! and routes whose upstream asks for HTTP/2 ([`FastPath::takes`]). A connection handed
//! to Pingora stays with it.

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

use super::target::{normalize_host, normalize_path};
use super::{Ctx, Gateway};

/// How many times one request is tried (Pingora's own limit).
const MAX_TRIES: usize = 16;
/// Idle upstream connections kept per target on each thread.
const IDLE_PER_TARGET: usize = 128;

/// What the next request head on a connection asks for.
pub enum Loop {
    /// The fast path serves it; the head is this many bytes (what follows is its body
    /// or the next request).
    Fast { head: usize },
    /// Pingora serves it (and the rest of the connection).
    Pingora,
}

impl Loop {
    /// Decides from the bytes read so far, once they hold a whole request head (`None`:
    /// not yet). A head the parser refuses goes to Pingora, which answers it as it
    /// always has.
    pub fn of(buf: &[u8]) -> Option<Loop> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Partial) => None,
            Ok(httparse::Status::Complete(head))
                if req.version == Some(1)
                    && req.path.is_some_and(|p| p.starts_with('/'))
                    && admits(req.headers) =>
            {
                Some(Loop::Fast { head })
            }
            _ => Some(Loop::Pingora),
        }
    }
}

/// Whether the fast path forwards these fields as Pingora would without special handling:
/// one body framing at most (a `Content-Length` of digits or `Transfer-Encoding: chunked`,
/// never both), `Expect: 100-continue` only, no upgrade, no connection-nominated fields.
/// Anything else (smuggling attempts included) is Pingora's to refuse or handle.
fn admits(headers: &[httparse::Header]) -> bool {
    let mut framings = 0;
    for h in headers {
        let (name, v) = (h.name, h.value);
        let ok = if name.eq_ignore_ascii_case("content-length") {
            framings += 1;
            !v.is_empty() && v.len() <= 18 && v.iter().all(u8::is_ascii_digit)
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            framings += 1;
            v.eq_ignore_ascii_case(b"chunked")
        } else if name.eq_ignore_ascii_case("expect") {
            v.eq_ignore_ascii_case(b"100-continue")
        } else if name.eq_ignore_ascii_case("connection") {
            v.split(|b| *b == b',').all(|t| {
                let t = t.trim_ascii();
                t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
            })
        } else if name.eq_ignore_ascii_case("host") {
            !v.contains(&b'@')
        } else {
            !["upgrade", "http2-settings"]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
        };
        if !ok || framings > 1 {
            return false;
        }
    }
    true
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
    static IDLE: RefCell<Idle> = RefCell::new(Idle::default());
}

/// A thread's idle upstream connections, each with the instant it expires.
#[derive(Default)]
struct Idle {
    by_peer: HashMap<u64, Vec<(Stream, Option<Instant>)>>,
    /// When expired connections of every peer were last dropped.
    swept: Option<Instant>,
}

/// How often a thread drops its expired idle connections, those of peers no longer asked
/// for included (an upstream a reload removed, a target gone from DNS).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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

    /// Whether this loop takes a request [`Loop::of`] admitted: not one whose route's
    /// upstream asks for HTTP/2, which Pingora's proxy speaks (this loop speaks HTTP/1.1
    /// upstream). Looked up only when the conf has such a route, by the normalized host
    /// and path the gateway routes by.
    pub fn takes(&self, head: &[u8]) -> bool {
        let snap = self.gateway.live.load();
        if !snap.h2_routes {
            return true;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if req.parse(head).is_err() {
            return false;
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return false;
        };
        let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
            return false;
        };
        let host = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .unwrap_or("");
        let path = path.split('?').next().unwrap_or(path);
        // the host and path `request_filter` routes by; a target it refuses is answered
        // alike on either loop
        let (Ok(host), Ok(path)) = (normalize_host(host), normalize_path(path)) else {
            return true;
        };
        match snap.router.find(&host, &path.key, &method) {
            Ok(m) => !snap.routes[m.route]
                .upstream
                .as_ref()
                .is_some_and(|u| u.wants_h2()),
            Err(_) => true,
        }
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
        // the pool key: what a pooled connection must match (hashed once per try)
        let key = peer.reuse_hash();
        let (stream, reused) = match self.connect(&peer, key).await {
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
                put_idle(key, stream, peer.idle_timeout());
            }
        }
        let error = error.map(|e| {
            // a reused connection the upstream had closed: tried again, before any answer
            let reused = reused && session.response_written().is_none();
            gw.error_while_proxy(&peer, session, e, ctx, reused)
        });
        (server_reuse, error)
    }

    /// A pooled connection to `peer` (pool key `key`) that is still open, or a new one.
    async fn connect(&self, peer: &HttpPeer, key: u64) -> Result<(Stream, bool)> {
        if let Some(s) = take_idle(key) {
            return Ok((s, true));
        }
        Ok((self.connector.new_stream(peer).await?, false))
    }

    /// The request upstream and the response to the client, both ways at once as
    /// Pingora's proxy does (an upstream may answer before it has read the body): (client
    /// reusable, upstream reusable, error).
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
        // a body whose length the filters removed goes chunked (Pingora's rule)
        let has_body = !session.is_body_empty();
        if has_body
            && !req.headers.contains_key(http::header::CONTENT_LENGTH)
            && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
        {
            if let Err(e) = req.insert_header(http::header::TRANSFER_ENCODING, "chunked") {
                return (false, true, Some(e));
            }
        }
        if let Err(e) = client.write_request_header(req).await {
            return (false, false, Some(e.into_up()));
        }
        // what was read of the body so far is kept, so a retry can send it again
        let replay = session.as_ref().get_retry_buffer();
        session.as_mut().enable_retry_buffering();
        let mut reading = !session.is_body_done();
        let mut sending = true;
        let mut send_error = None;
        if replay.is_some() || !has_body {
            match self.send_body(session, client, replay, !reading, ctx).await {
                Ok(true) => sending = false,
                Ok(false) => {}
                Err(Side::Filter(e)) => return (false, false, Some(e)),
                Err(Side::Upstream(e)) => (sending, send_error) = (false, Some(e)),
            }
        }
        let mut response_done = false;
        while !response_done || (reading && sending) {
            tokio::select! {
                task = client.read_response_task(), if !response_done => {
                    let task = match task {
                        Ok(t) => t,
                        Err(e) => {
                            let e = send_error.unwrap_or(e);
                            return (false, false, Some(e.into_up()));
                        }
                    };
                    match self.respond(session, task, ctx).await {
                        Ok(done) => response_done = done,
                        Err(e) => return (false, false, Some(e)),
                    }
                }
                body = session.downstream_session.read_body_or_idle(false), if reading => {
                    let body = match body {
                        Ok(b) => b,
                        Err(e) => return (false, false, Some(e.into_down())),
                    };
                    reading = !(body.is_none() || session.is_body_done());
                    if !sending {
                        continue;
                    }
                    match self.send_body(session, client, body, !reading, ctx).await {
                        Ok(done) => sending = !done,
                        Err(Side::Filter(e)) => return (false, false, Some(e)),
                        Err(Side::Upstream(e)) => (sending, send_error) = (false, Some(e)),
                    }
                }
            }
        }
        // a connection whose request was cut short carries no other
        let client_reuse = send_error.is_none() && !sending && client.is_body_done();
        match session.downstream_session.finish_body().await {
            Ok(_) => (true, client_reuse, None),
            Err(_) => (false, client_reuse, None),
        }
    }

    /// One piece of the request body through the body phase, then upstream (an empty
    /// piece mid-body is "nothing yet", not the end): whether the request is complete.
    async fn send_body(
        &self,
        session: &mut Session,
        client: &mut UpstreamSession,
        mut data: Option<bytes::Bytes>,
        end: bool,
        ctx: &mut Ctx,
    ) -> std::result::Result<bool, Side> {
        let end = end || data.is_none();
        self.gateway
            .request_body_filter(session, &mut data, end, ctx)
            .await
            .map_err(Side::Filter)?;
        let end = end || data.is_none();
        if let Some(d) = data.filter(|d| !d.is_empty()) {
            client
                .write_body(&d)
                .await
                .map_err(|e| Side::Upstream(e.into_up()))?;
        }
        if end {
            client
                .finish_body()
                .await
                .map_err(|e| Side::Upstream(e.into_up()))?;
        }
        Ok(end)
    }

    /// One piece of the upstream's response through the response phases, then to the
    /// client: whether the response is complete.
    async fn respond(&self, session: &mut Session, task: HttpTask, ctx: &mut Ctx) -> Result<bool> {
        let gw = &self.gateway;
        let (task, end) = match task {
            HttpTask::Header(mut head, end) => {
                // Pingora's rule: a response without framing becomes chunked, so the
                // client connection can stay open
                let head_only = session.req_header().method == http::Method::HEAD;
                let no_body = head_only || matches!(head.status.as_u16(), 204 | 304);
                if !no_body
                    && !head.status.is_informational()
                    && !head.headers.contains_key(http::header::TRANSFER_ENCODING)
                    && !head.headers.contains_key(http::header::CONTENT_LENGTH)
                    && !end
                {
                    head.set_version(http::Version::HTTP_11);
                    head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                }
                gw.response_filter(session, &mut head, ctx).await?;
                (HttpTask::Header(head, end), end)
            }
            HttpTask::Body(mut data, end) => {
                gw.response_body_filter(session, &mut data, end, ctx)?;
                (HttpTask::Body(data, end), end)
            }
            HttpTask::Done => (HttpTask::Done, true),
            HttpTask::Failed(e) => return Err(e),
            // HTTP/1 upstreams send neither here (no upgrade was asked for)
            other => (other, false),
        };
        session.write_response_tasks(vec![task]).await?;
        Ok(end)
    }
}

/// Which side of a request body's trip failed: the body phase (the request ends with its
/// answer) or the upstream (its answer may still come).
enum Side {
    Filter(Box<Error>),
    Upstream(Box<Error>),
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

/// An idle connection to the peer keyed `key` that is still open and not expired.
/// Closed ones (the upstream hung up) and expired ones are dropped.
fn take_idle(key: u64) -> Option<Stream> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.by_peer.get_mut(&key)?;
        let now = Instant::now();
        while let Some((mut stream, until)) = list.pop() {
            if until.is_some_and(|u| now >= u) || !quiet(&mut stream) {
                continue;
            }
            return Some(stream);
        }
        None
    })
}

/// Keeps `stream` for `max_idle` (`None`: until the upstream closes it), and now and
/// then drops every expired connection of this thread.
fn put_idle(key: u64, stream: Stream, max_idle: Option<Duration>) {
    IDLE.with_borrow_mut(|idle| {
        let now = Instant::now();
        if idle
            .swept
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
        {
            idle.swept = Some(now);
            idle.by_peer.retain(|_, list| {
                list.retain(|(_, until)| until.is_none_or(|u| now < u));
                !list.is_empty()
            });
        }
        let list = idle.by_peer.entry(key).or_default();
        if list.len() < IDLE_PER_TARGET {
            list.push((stream, max_idle.map(|m| now + m)));
        }
    });
}

/// Whether an idle connection has nothing to read: no bytes, no end of stream. A pooled
/// HTTP/1 connection that became readable was closed by the upstream (or sent bytes it
/// should not have): either way it cannot carry a request.
///
/// Asked of the runtime, not the kernel: one read polled with a waker that does nothing.
/// While the reactor has seen no event on the socket since its last read drained it, the
/// read is pending without a system call (nginx, too, learns of a closed idle upstream
/// connection from its event loop); otherwise the read tells. A close the reactor has not
/// seen yet is the race every pool has: the request fails on a reused connection before
/// any answer, and is tried again (Pingora's rule, [`FastPath::proxy`]).
fn quiet(stream: &mut Stream) -> bool {
    use std::task::{Context, Poll, Waker};
    use tokio::io::{AsyncRead, ReadBuf};
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(
        std::pin::Pin::new(stream).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

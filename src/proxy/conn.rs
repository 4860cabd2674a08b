//! Client connections. Every stream the proxy listeners accept is wrapped once, before
//! Pingora reads from it, so that the gateway
//!
//! - counts open client connections exactly (an atomic gauge, up on accept and down on
//!   drop), which `[limits] max_connections` reads, and
//! - bounds how long a client may take to send a request head (`[limits]
//!   client_header_timeout_ms`, the slowloris defence): Pingora reads the head before any
//!   gateway code runs, so the deadline lives in the stream itself. When it passes with
//!   part of a head received, the client gets `408 {"error":"client_timeout"}` and the
//!   connection is closed; a connection that sent nothing is closed quietly;
//! - bounds how large a request head may grow while it is read (`[limits]
//!   max_request_header_bytes`): Pingora would buffer up to 1 MiB of an unfinished head
//!   per connection. When Pingora asks for more bytes of a head that is already over the
//!   limit, the client gets `431 {"error":"request_headers_too_large"}` and the
//!   connection is closed;
//! - answers in the gateway's JSON error format where Pingora answers by itself: a
//!   response written before the gateway saw a request head (a head Pingora could not
//!   parse, or a method it refuses) is Pingora's bodiless error page; the stream writes
//!   the gateway's answer with the same status instead.
//!
//! The clock starts at accept for the first request and when a later request's head on a
//! kept-alive connection first has to wait for more bytes (idle time between requests is
//! Pingora's keep-alive timeout, not a slow head; a head that arrives in one read never
//! arms a timer). The proxy tells the stream where heads end through a
//! task-local handle: [`head_received`] when the request phases start, [`request_done`]
//! when the response is logged. HTTP/2 connections (ALPN `h2`) frame their own headers
//! and are never armed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;
use crate::proxy::fast::{FastPath, Loop};
use crate::proxy::respond::{error_body, GatewayError};
use crate::reload::Live;

/// Where the connection stands in reading a request head.
const AWAIT_HEAD: u8 = 0; // kept alive between requests: the first byte arms the clock
const IN_HEAD: u8 = 1; // reading a head: the clock runs
const HEAD_READ: u8 = 2; // head parsed, body or response under way: no head clock

tokio::task_local! {
    static CONN: Arc<HeadPhase>;
}

/// The phase shared by a connection's stream and the proxy running its requests, the
/// connection's id, and its socket's descriptor (for [`client_gone`]).
#[derive(Debug)]
struct HeadPhase(AtomicU8, u64, HeldHead, UniqueIDType);

/// A response kept back while hooks finish it (Proxy-Wasm's "pause the response headers
/// until the body is in", and callouts from the response body). Pingora runs a batch of
/// response phases (head, then body) before it writes any of them, so the proxy changes
/// how the stream writes before or after Pingora's own head went out, and the stream
/// tells Pingora's head from its body by the blank line that ends it.
#[derive(Debug, Default)]
struct HeldHead {
    /// Fast check on the write path: a hold is in place.
    on: std::sync::atomic::AtomicBool,
    state: std::sync::Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// Pingora's head for this response is still to be written: `Some(pass)` passes it
    /// to the client or (`false`) drops it, and then the hold applies to what follows.
    pingora_head: Option<HeadScan>,
    hold: Hold,
}

/// Finds the end of Pingora's head (`\r\n\r\n`) across writes.
#[derive(Debug, Default, Clone, Copy)]
struct HeadScan {
    pass: bool,
    /// Bytes of the blank line matched so far.
    matched: u8,
}

impl HeadScan {
    /// The length of the head's part in `buf`, and whether the head ends there.
    fn scan(&mut self, buf: &[u8]) -> (usize, bool) {
        const END: &[u8; 4] = b"\r\n\r\n";
        for (i, b) in buf.iter().enumerate() {
            self.matched = if *b == END[self.matched as usize] {
                self.matched + 1
            } else if *b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == 4 {
                return (i + 1, true);
            }
        }
        (buf.len(), false)
    }
}

#[derive(Debug, Default)]
enum Hold {
    #[default]
    Off,
    /// Pingora's bytes are discarded as they are written.
    Holding,
    /// Write these bytes (the final head) first, then Pingora's as they come.
    Release(Vec<u8>, usize),
    /// Write these bytes (a whole local reply) and discard the rest of this response.
    Replace(Vec<u8>, usize),
    /// Write nothing until the hooks' callouts are answered (see [`gate_response`]).
    Gate(tokio::sync::oneshot::Receiver<Resume>),
    /// Fail every write: the response is cut off.
    Abort,
}

/// How a gated response goes on (see [`gate_response`]).
#[derive(Debug)]
pub enum Resume {
    /// Write these bytes first (the rest of the head and body as the hooks left them),
    /// then Pingora's as they come.
    Write(Vec<u8>),
    /// Write these bytes (a whole local reply) in place of the response.
    Replace(Vec<u8>),
    /// Cut the response off: a hook answered once its head had gone out.
    Abort,
}

fn set_hold(f: impl FnOnce(&mut Held)) -> bool {
    CONN.try_with(|p| {
        f(&mut p.2.state.lock().expect("hold lock"));
        p.2.on.store(true, Ordering::Release);
    })
    .is_ok()
}

/// Holds back the response head of this task's connection (HTTP/1.1 only), from the
/// headers phase: Pingora's head is dropped when it is written.
pub fn hold_response_head() -> bool {
    set_hold(|h| {
        h.pingora_head = Some(HeadScan::default());
        h.hold = Hold::Holding;
    })
}

/// Ends a hold: `head` goes out in place of the head Pingora wrote, then the body.
pub fn release_response_head(head: Vec<u8>) {
    set_hold(|h| h.hold = Hold::Release(head, 0));
}

/// Ends a hold with a whole other response (`bytes`: head and body); what Pingora writes
/// of this response from now on is discarded.
pub fn replace_response(bytes: Vec<u8>) {
    set_hold(|h| h.hold = Hold::Replace(bytes, 0));
}

/// Holds every write of this task's connection (HTTP/1) after Pingora's head until
/// `Resume` comes through the returned sender: Pingora's response body phase cannot wait
/// for a hook's callouts, so the connection does, while the hooks finish in a task of
/// their own. `head_to_come`: Pingora has not written this response's head yet (it goes
/// out first, unless a hold already drops it). `None` outside a client connection's task
/// (HTTP/2 streams).
pub fn gate_response(head_to_come: bool) -> Option<tokio::sync::oneshot::Sender<Resume>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    set_hold(|h| {
        if head_to_come && h.pingora_head.is_none() {
            h.pingora_head = Some(HeadScan {
                pass: true,
                matched: 0,
            });
        }
        h.hold = Hold::Gate(rx);
    })
    .then_some(tx)
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// A new client connection id, unique in this process (never 0).
pub fn next_connection_id() -> u64 {
    CONNECTION_IDS.fetch_add(1, Ordering::Relaxed)
}

/// The id of this task's client connection (HTTP/1; HTTP/2 streams run in tasks of
/// their own, and TLS connections carry their id in the handshake's facts instead).
pub fn connection_id() -> Option<u64> {
    CONN.try_with(|p| p.1).ok()
}

/// Runs `work` (hooks that may wait on callouts) unless this task's client closes its
/// connection first: then `None`, and `work` is dropped with the callouts it waits on,
/// so no callback runs into a request nobody waits for. Envoy resets the stream and
/// cancels its filters' calls the same way. Work that finishes at its first poll (the
/// usual hook run) never sets up the watch.
pub async fn unless_client_leaves<F: Future>(work: F) -> Option<F::Output> {
    use futures::FutureExt;
    let mut work = std::pin::pin!(work);
    if let Some(out) = work.as_mut().now_or_never() {
        return Some(out);
    }
    let gone = client_gone();
    tokio::select! {
        out = work => Some(out),
        () = gone => None,
    }
}

/// Resolves when this task's client has closed its end of the connection (a FIN or a
/// reset), and never where that cannot be watched (HTTP/2 streams run in tasks of their
/// own). Bytes the client sends meanwhile (a request body, a pipelined request) stay
/// where they are for the proxy to read: the watch sees readiness, it reads nothing.
/// Made in the connection's task, the future may be awaited anywhere.
pub fn client_gone() -> impl Future<Output = ()> + Send + 'static {
    let watch = CONN.try_with(|p| p.3).ok().and_then(|fd| {
        use std::os::fd::BorrowedFd;
        // SAFETY: the descriptor is the connection's socket, owned by the stream this
        // task serves; the stream outlives every request of the task (the task-local is
        // scoped inside `process_new`, which holds it), so it is open here. It is
        // duplicated at once; the duplicate is an `OwnedFd` the `AsyncFd` owns, so it
        // stays open and names the same socket until the watch is dropped (what
        // `register_with_interest` asks).
        unsafe {
            let own = BorrowedFd::borrow_raw(fd).try_clone_to_owned().ok()?;
            tokio::io::unix::AsyncFd::register_with_interest(own, tokio::io::Interest::READABLE)
                .ok()
        }
    });
    async move {
        let Some(fd) = watch else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return std::future::pending().await;
            };
            if ready.ready().is_read_closed() {
                return;
            }
            // bytes to read, not a close: wait for the next change
            ready.clear_ready();
        }
    }
}

/// The request head has been parsed: stop the head clock of this task's connection.
pub fn head_received() {
    let _ = CONN.try_with(|p| p.0.store(HEAD_READ, Ordering::Relaxed));
}

/// The response is done: the next byte on this task's connection starts a new head.
pub fn request_done() {
    let _ = CONN.try_with(|p| {
        p.0.store(AWAIT_HEAD, Ordering::Relaxed);
        if p.2.on.swap(false, Ordering::AcqRel) {
            *p.2.state.lock().expect("hold lock") = Held::default();
        }
    });
}

/// Wraps the proxy application so each accepted stream becomes a [`ClientStream`], and
/// serves what it can of an HTTP/1 connection on the fast path ([`FastPath`]).
pub struct ClientApp<A> {
    inner: Arc<A>,
    fast: Option<FastPath>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
}

impl<A> ClientApp<A> {
    pub fn new(inner: A, fast: Option<FastPath>, live: Arc<Live>, metrics: Arc<Metrics>) -> Self {
        ClientApp {
            inner: Arc::new(inner),
            fast,
            live,
            metrics,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ClientApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if (*stream).as_any().is::<ClientStream>() {
            // handed back for reuse: already wrapped and counted
            return self.inner.process_new(stream, shutdown).await;
        }
        let (limit, head_limit, fast_on) = {
            let snap = self.live.load();
            (
                snap.limits.client_header_timeout,
                snap.limits.max_request_header_bytes,
                snap.server.fast_path,
            )
        };
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let phase = Arc::new(HeadPhase(
            AtomicU8::new(if h2 { HEAD_READ } else { IN_HEAD }),
            next_connection_id(),
            HeldHead::default(),
            stream.id(),
        ));
        let wrapped = ClientStream::new(
            stream,
            phase.clone(),
            limit,
            head_limit,
            self.metrics.clone(),
        );
        match self.fast.as_ref().filter(|_| fast_on && !h2) {
            Some(fast) => {
                CONN.scope(phase, self.serve_h1(fast, wrapped, shutdown))
                    .await
            }
            None => {
                CONN.scope(phase, self.inner.process_new(Box::new(wrapped), shutdown))
                    .await
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

impl<A: ServerApp + Send + Sync + 'static> ClientApp<A> {
    /// An HTTP/1 connection: each request the fast path takes is served there; the first
    /// it does not take goes to Pingora with the rest of the connection.
    async fn serve_h1(
        self: &Arc<Self>,
        fast: &FastPath,
        stream: ClientStream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = Box::new(stream);
        // the first head waits as long as the head clock allows; later ones as long as
        // keep-alive does
        let mut idle = None;
        loop {
            match stream.next_head(idle).await? {
                Loop::Fast { .. } if fast.takes(&stream.replay) => {}
                _ => return self.inner.process_new(stream, shutdown).await,
            }
            let shutting_down = *shutdown.borrow();
            let (back, read_ahead) = fast.serve(stream, shutting_down).await?;
            stream = back.into_any().downcast::<ClientStream>().ok()?;
            if let Some(mut next) = read_ahead {
                next.extend_from_slice(&stream.replay);
                stream.replay = next;
            }
            let keepalive = self.live.load().limits.client_keepalive_timeout_secs;
            idle = Some(Duration::from_secs(keepalive.max(1)));
        }
    }
}

impl ClientStream {
    /// A write while a response is held or gated (see [`HeldHead`]).
    fn poll_write_held(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let phase = self.phase.clone();
        let mut held = phase.2.state.lock().expect("hold lock");
        if let Some(scan) = held.pingora_head.as_mut() {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let mut probe = *scan;
            let (head, mut ended) = probe.scan(buf);
            let n = if scan.pass {
                ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..head]))?
            } else {
                head
            };
            if n == head {
                *scan = probe;
            } else {
                ended = scan.scan(&buf[..n]).1; // a short write: only what went out
            }
            if ended {
                held.pingora_head = None;
            }
            return Poll::Ready(Ok(n));
        }
        let (bytes, written, pass) = loop {
            match &mut held.hold {
                Hold::Off => {
                    drop(held);
                    return Pin::new(&mut self.inner).poll_write(cx, buf);
                }
                Hold::Holding => return Poll::Ready(Ok(buf.len())),
                Hold::Gate(rx) => {
                    held.hold = match ready!(Pin::new(rx).poll(cx)) {
                        Ok(Resume::Write(b)) => Hold::Release(b, 0),
                        Ok(Resume::Replace(b)) => Hold::Replace(b, 0),
                        Ok(Resume::Abort) | Err(_) => Hold::Abort,
                    };
                }
                Hold::Abort => return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into())),
                Hold::Release(b, w) => break (b, w, true),
                Hold::Replace(b, w) => break (b, w, false),
            }
        };
        while *written < bytes.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !pass {
            return Poll::Ready(Ok(buf.len())); // the rest of the replaced response
        }
        held.hold = Hold::Off;
        phase.2.on.store(false, Ordering::Release);
        drop(held);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
}

/// An accepted client stream with an exact connection count and a request-head deadline.
pub struct ClientStream {
    inner: Stream,
    phase: Arc<HeadPhase>,
    limit: Duration,
    /// The head deadline. Set lazily, on the first read of a head that has to wait: a head
    /// that arrives in one read (nearly all of them) never touches the timer wheel.
    clock: Pin<Box<Sleep>>,
    clock_set: bool,
    /// Bytes of the current head seen so far (only counted while the clock runs).
    head_bytes: usize,
    /// Largest request head, in bytes.
    head_limit: usize,
    /// Once the head is refused (408, 431): the answer and how much of it is written.
    refusing: Option<(&'static [u8], usize)>,
    /// Pingora's own error answer being replaced: ours, and how much of it is written.
    replacing: Option<(&'static [u8], usize)>,
    /// Bytes read to look at a request head first ([`ClientStream::next_head`]), read
    /// again from here.
    replay: bytes::BytesMut,
    /// The keep-alive clock between requests on the fast path: armed once and left in the
    /// timer wheel while requests keep coming; when it goes off, it is moved to the
    /// current wait's deadline unless that has passed (see [`ClientStream::next_head`]).
    keepalive: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
}

impl ClientStream {
    fn new(
        inner: Stream,
        phase: Arc<HeadPhase>,
        limit: Duration,
        head_limit: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.connections.inc();
        metrics.connections_accepted.inc();
        ClientStream {
            inner,
            phase,
            limit,
            // the first request's clock starts at accept
            clock: Box::pin(tokio::time::sleep(limit)),
            clock_set: true,
            head_bytes: 0,
            head_limit,
            refusing: None,
            replacing: None,
            replay: bytes::BytesMut::new(),
            keepalive: None,
            metrics,
        }
    }

    /// Reads until the next request head is whole, keeping what it read to be read again,
    /// and says who serves it. `None`: the connection ended (closed, idle past `idle`, a
    /// head refused: 408 or 431, as on Pingora's path). A head over
    /// `max_request_header_bytes` that arrived at once is refused here, as Pingora's path
    /// refuses one that arrives in parts.
    async fn next_head(&mut self, idle: Option<Duration>) -> Option<Loop> {
        loop {
            if !self.replay.is_empty() {
                if let Some(route) = Loop::of(&self.replay) {
                    if matches!(route, Loop::Fast { head } if head > self.head_limit) {
                        let _ = std::future::poll_fn(|cx| self.refuse_large_head(cx)).await;
                        return None;
                    }
                    return Some(route);
                }
            }
            let waiting = self.replay.is_empty();
            // between requests, wait at most `idle` for the next one: on the connection's
            // one clock, which moves only when it goes off early (one timer per idle
            // period, not one per request)
            let idle = idle.filter(|_| waiting).map(|idle| {
                let until = Instant::now() + idle;
                let mut clock = self
                    .keepalive
                    .take()
                    .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(until)));
                if clock.deadline() > until {
                    clock.as_mut().reset(until); // the keep-alive a reload shortened
                }
                (clock, until)
            });
            self.replay.reserve(4096);
            let mut chunk = std::mem::take(&mut self.replay);
            let read = std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::uninit(chunk.spare_capacity_mut());
                ready!(self.poll_read_counted(cx, &mut buf))?;
                Poll::Ready(Ok::<_, io::Error>(buf.filled().len()))
            });
            let n = match idle {
                Some((mut clock, until)) => {
                    let mut read = std::pin::pin!(read);
                    let n = std::future::poll_fn(|cx| {
                        if let Poll::Ready(n) = read.as_mut().poll(cx) {
                            return Poll::Ready(Some(n));
                        }
                        loop {
                            ready!(clock.as_mut().poll(cx));
                            if Instant::now() >= until {
                                return Poll::Ready(None);
                            }
                            clock.as_mut().reset(until);
                        }
                    })
                    .await;
                    self.keepalive = Some(clock);
                    n?
                }
                None => read.await,
            }
            .ok()?;
            // SAFETY: `poll_read_counted` initialized and filled these `n` bytes of the
            // spare capacity (a `ReadBuf` over it counts what was written).
            unsafe { chunk.set_len(chunk.len() + n) };
            self.replay = chunk;
            if n == 0 {
                // the client ended mid-head: Pingora answers that as it always has
                return (!waiting).then_some(Loop::Pingora);
            }
        }
    }

    /// The head deadline passed: answers 408 (only if part of a head arrived; a silent
    /// connection is closed quietly).
    fn poll_expire(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.refusing.is_none() {
            if self.head_bytes == 0 {
                tracing::debug!("connection sent nothing in time: closed");
                self.refusing = Some((b"", 0));
            } else {
                self.metrics
                    .unrouted
                    .record(GatewayError::ClientTimeout.status());
                tracing::debug!(
                    error = GatewayError::ClientTimeout.code(),
                    received = self.head_bytes,
                    limit_ms = self.limit.as_millis() as u64,
                    "request head not received in time"
                );
                self.refusing = Some((answer(GatewayError::ClientTimeout), 0));
            }
        }
        self.poll_refuse(cx)
    }

    /// Writes the refusal, then fails the read so Pingora closes the connection.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (answer, mut written) = self.refusing.expect("refusal chosen");
        while written < answer.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[written..])) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
            self.refusing = Some((answer, written));
        }
        let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request head refused",
        )))
    }

    /// Pingora asks for more of a head that is already over the limit: 431.
    fn refuse_large_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.metrics.heads_too_large.inc();
        self.metrics
            .unrouted
            .record(GatewayError::HeadersTooLarge.status());
        tracing::debug!(
            received = self.head_bytes,
            limit = self.head_limit,
            "request head over max_request_header_bytes"
        );
        self.refusing = Some((answer(GatewayError::HeadersTooLarge), 0));
        self.poll_refuse(cx)
    }
}

/// Errors the stream answers itself, each built once.
const OWN_ANSWERS: [GatewayError; 6] = [
    GatewayError::ClientTimeout,
    GatewayError::HeadersTooLarge,
    GatewayError::BadRequest,
    GatewayError::MethodNotAllowed,
    GatewayError::BodyTooLarge,
    GatewayError::Internal,
];

/// A whole answer with the gateway's JSON error body, closing the connection.
fn answer(e: GatewayError) -> &'static [u8] {
    static ANSWERS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let all = ANSWERS.get_or_init(|| {
        OWN_ANSWERS
            .iter()
            .map(|e| {
                let body = error_body(e.code(), None);
                let status = http::StatusCode::from_u16(e.status()).expect("valid status");
                let mut a = format!(
                    "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or(""),
                    body.len()
                )
                .into_bytes();
                a.extend_from_slice(&body);
                a
            })
            .collect()
    });
    let i = OWN_ANSWERS
        .iter()
        .position(|x| *x == e)
        .unwrap_or(OWN_ANSWERS.len() - 1);
    &all[i]
}

/// Our answer for a response Pingora writes by itself (before any request reached the
/// gateway): the same status, the gateway's body.
fn replacement(pingora_bytes: &[u8]) -> Option<&'static [u8]> {
    let status = pingora_bytes.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    // Pingora's error pages (`gen_error_response`) carry its Server header
    if !pingora_bytes
        .windows(17)
        .any(|w| w.eq_ignore_ascii_case(b"\r\nserver: pingora"))
    {
        return None;
    }
    let e = match status {
        b"400" => GatewayError::BadRequest,
        b"405" => GatewayError::MethodNotAllowed,
        b"413" => GatewayError::BodyTooLarge,
        b"431" => GatewayError::HeadersTooLarge,
        b"408" => GatewayError::ClientTimeout,
        [b'4' | b'5', ..] => GatewayError::Internal,
        _ => return None,
    };
    Some(answer(e))
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            // already counted against the head's limits when first read
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        this.poll_read_counted(cx, buf)
    }
}

impl ClientStream {
    /// A read from the client with the head's clock and size limit.
    fn poll_read_counted(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if this.refusing.is_some() {
            return this.poll_refuse(cx);
        }
        match this.phase.0.load(Ordering::Relaxed) {
            HEAD_READ => Pin::new(&mut this.inner).poll_read(cx, buf),
            AWAIT_HEAD => {
                let before = buf.filled().len();
                let r = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
                let n = buf.filled().len() - before;
                if r.is_ok() && n > 0 {
                    this.phase.0.store(IN_HEAD, Ordering::Relaxed);
                    this.head_bytes = n;
                    this.clock_set = false;
                }
                Poll::Ready(r)
            }
            _ => {
                if this.head_bytes > this.head_limit {
                    // everything read so far is an unfinished head
                    return this.refuse_large_head(cx);
                }
                let before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(r) => {
                        this.head_bytes += buf.filled().len() - before;
                        Poll::Ready(r)
                    }
                    Poll::Pending => {
                        if !this.clock_set {
                            this.clock.as_mut().reset(Instant::now() + this.limit);
                            this.clock_set = true;
                        }
                        match this.clock.as_mut().poll(cx) {
                            Poll::Ready(()) => this.poll_expire(cx),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.phase.2.on.load(Ordering::Acquire) {
            return this.poll_write_held(cx, buf);
        }
        if this.replacing.is_none() && this.phase.0.load(Ordering::Relaxed) != HEAD_READ {
            // no request reached the gateway: only Pingora's own error page is written now
            this.replacing = replacement(buf).map(|a| (a, 0));
        }
        let Some((ours, mut written)) = this.replacing else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while written < ours.len() {
            match ready!(Pin::new(&mut this.inner).poll_write(cx, &ours[written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
            this.replacing = Some((ours, written));
        }
        // Pingora's bytes (and any it writes after them) are taken as written; it closes
        // the connection after its error page
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_some()
            || this.phase.0.load(Ordering::Relaxed) != HEAD_READ
            || this.phase.2.on.load(Ordering::Acquire)
        {
            // rare (an error page): one slice at a time through poll_write
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(this).poll_write(cx, first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase.2.on.load(Ordering::Acquire) {
            // a released head (or replacing response) goes out with the flush
            ready!(this.poll_write_held(cx, &[]))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

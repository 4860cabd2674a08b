//! Client connections. Every stream the proxy listeners accept is wrapped once, before
//! Pingora reads from it, so that the gateway
//!
//! - counts open client connections exactly (an atomic gauge, up on accept and down on
//!   drop), which `[limits] max_connections` reads, and
//! - bounds how long a client may take to send a request head (`[limits]
//!   client_header_timeout_ms`, the slowloris defence): Pingora reads the head before any
//!   gateway code runs, so the deadline lives in the stream itself. When it passes with
//!   part of a head received, the client gets `408 {"error":"client_timeout"}` and the
//!   connection is closed; a connection that sent nothing is closed quietly.
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
use std::sync::atomic::{AtomicU8, Ordering};
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
use crate::proxy::respond::{error_body, GatewayError};
use crate::reload::Live;

/// Where the connection stands in reading a request head.
const AWAIT_HEAD: u8 = 0; // kept alive between requests: the first byte arms the clock
const IN_HEAD: u8 = 1; // reading a head: the clock runs
const HEAD_READ: u8 = 2; // head parsed, body or response under way: no head clock

tokio::task_local! {
    static CONN: Arc<HeadPhase>;
}

/// The phase shared by a connection's stream and the proxy running its requests.
#[derive(Debug)]
struct HeadPhase(AtomicU8);

/// The request head has been parsed: stop the head clock of this task's connection.
pub fn head_received() {
    let _ = CONN.try_with(|p| p.0.store(HEAD_READ, Ordering::Relaxed));
}

/// The response is done: the next byte on this task's connection starts a new head.
pub fn request_done() {
    let _ = CONN.try_with(|p| p.0.store(AWAIT_HEAD, Ordering::Relaxed));
}

/// Wraps the proxy application so each accepted stream becomes a [`ClientStream`].
pub struct ClientApp<A> {
    inner: Arc<A>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
}

impl<A> ClientApp<A> {
    pub fn new(inner: A, live: Arc<Live>, metrics: Arc<Metrics>) -> Self {
        ClientApp {
            inner: Arc::new(inner),
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
        let limit =
            Duration::from_millis(*self.live.load().limits.client_header_timeout_ms.get_ref());
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let phase = Arc::new(HeadPhase(AtomicU8::new(if h2 {
            HEAD_READ
        } else {
            IN_HEAD
        })));
        let wrapped = ClientStream::new(stream, phase.clone(), limit, self.metrics.clone());
        CONN.scope(phase, self.inner.process_new(Box::new(wrapped), shutdown))
            .await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
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
    /// Once the deadline passed: how much of the 408 answer has been written.
    expired: Option<usize>,
    metrics: Arc<Metrics>,
}

impl ClientStream {
    fn new(inner: Stream, phase: Arc<HeadPhase>, limit: Duration, metrics: Arc<Metrics>) -> Self {
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
            expired: None,
            metrics,
        }
    }

    /// Writes the 408 answer (only if part of a head arrived), then fails the read so
    /// Pingora closes the connection.
    fn poll_expire(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let answer = timeout_answer();
        let mut written = *self.expired.get_or_insert_with(|| {
            if self.head_bytes == 0 {
                tracing::debug!("connection sent nothing in time: closed");
                return answer.len(); // nothing to answer: close quietly
            }
            self.metrics
                .unrouted
                .record(GatewayError::ClientTimeout.status());
            tracing::info!(
                error = GatewayError::ClientTimeout.code(),
                received = self.head_bytes,
                limit_ms = self.limit.as_millis() as u64,
                "request head not received in time"
            );
            0
        });
        while written < answer.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[written..])) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
            self.expired = Some(written);
        }
        let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head not received in time",
        )))
    }
}

/// `408` with the gateway's JSON error body; built once.
fn timeout_answer() -> &'static [u8] {
    static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ANSWER.get_or_init(|| {
        let body = error_body(GatewayError::ClientTimeout.code(), None);
        let mut a = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend_from_slice(&body);
        a
    })
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
        if this.expired.is_some() {
            return this.poll_expire(cx);
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
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
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

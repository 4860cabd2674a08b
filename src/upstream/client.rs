//! Requests the gateway makes to an upstream on a guest's behalf (a function's outgoing
//! HTTP), through the same machinery the proxy uses: the upstream's balancer picks a
//! healthy target, Pingora's connector opens a connection or reuses a pooled one (TLS
//! with the upstream's CAs and SNI, HTTP/2 where the upstream offers it), within the
//! upstream's timeouts, which the caller may shorten but not extend.
//!
//! The request body streams to the upstream as the guest writes it and the response body
//! to the guest as it arrives; a connection whose exchange ended cleanly goes back to the
//! pool for the next call. Framing is the gateway's: the guest's `Host`, `Content-Length`
//! checks aside, hop-by-hop and framing headers it set are dropped, so it cannot smuggle
//! a second request onto a pooled connection.

use super::Upstream;
use crate::headers::is_hop_by_hop;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::ErrorType;
use std::sync::LazyLock;
use std::time::Duration;

/// One pool for every call the gateway makes for its guests (Pingora keys it by target,
/// TLS settings and the upstream's own key, so upstreams never share a connection).
static CONNECTOR: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

/// Frames of a response body in flight to the caller before the reader waits.
const BODY_FRAMES: usize = 4;

/// The most of a response body the caller left unread that is read and dropped to keep
/// its connection for the next call; past that the connection is closed instead.
const DRAIN: usize = 64 << 10;

/// How long each step may take: the upstream's timeouts, or shorter ones the caller asked.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    pub first_byte: Duration,
    pub between_bytes: Duration,
}

impl Upstream {
    /// The deadlines of a call: the upstream's, each shortened where `asked` is shorter.
    pub fn deadlines(&self, asked: [Option<Duration>; 3]) -> Deadlines {
        let t = self.connect.timeouts;
        let cap = |a: Option<Duration>, max: Duration| a.map_or(max, |a| a.min(max));
        Deadlines {
            connect: cap(asked[0], t.connect),
            first_byte: cap(asked[1], t.read),
            between_bytes: cap(asked[2], t.read),
        }
    }
}

/// Why a call failed, in the terms WASI-HTTP's `error-code` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No healthy target.
    Unavailable,
    ConnectionRefused,
    ConnectionTimeout,
    Tls,
    ReadTimeout,
    WriteTimeout,
    /// The connection ended before the response did.
    Terminated,
    /// The request could not be written as HTTP (a bad method, path or header).
    BadRequest,
    /// The caller's request body failed.
    Body(String),
    Protocol(String),
}

impl From<pingora::BError> for CallError {
    fn from(e: pingora::BError) -> Self {
        use ErrorType::*;
        match e.etype() {
            ConnectRefused => CallError::ConnectionRefused,
            ConnectTimedout => CallError::ConnectionTimeout,
            ConnectNoRoute | ConnectError | SocketError => CallError::ConnectionRefused,
            TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | TLSWantX509Lookup => {
                CallError::Tls
            }
            ReadTimedout => CallError::ReadTimeout,
            WriteTimedout => CallError::WriteTimeout,
            ConnectionClosed | ReadError | WriteError => CallError::Terminated,
            _ => CallError::Protocol(e.to_string()),
        }
    }
}

/// A response head, with its body arriving as the upstream sends it.
pub type Answer = http::Response<ResponseBody>;

/// The body of an [`Answer`].
pub type ResponseBody = http_body_util::StreamBody<mpsc::Receiver<Result<Frame<Bytes>, CallError>>>;

/// Sends `request` to `upstream` (its URI's path and query; `Host` stays what the caller
/// named) and returns the response head once it arrives, and the task that moves the
/// response body, to be run beside it (it returns the connection to the pool when the
/// body ended cleanly).
pub async fn send<B>(
    upstream: &Upstream,
    request: http::Request<B>,
    deadlines: Deadlines,
) -> Result<
    (
        Answer,
        impl std::future::Future<Output = ()> + Send + 'static,
    ),
    CallError,
>
where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: std::fmt::Display,
{
    let mut peer = upstream.peer(b"").ok_or(CallError::Unavailable)?;
    peer.options.connection_timeout = Some(deadlines.connect);
    peer.options.total_connection_timeout = Some(deadlines.connect);
    let idle = upstream.connect.timeouts.idle;
    let (parts, mut body) = request.into_parts();
    let (mut s, _reused) =
        tokio::time::timeout(deadlines.connect, CONNECTOR.get_http_session(&*peer))
            .await
            .map_err(|_| CallError::ConnectionTimeout)??;
    s.set_write_timeout(Some(upstream.connect.timeouts.write));
    s.set_read_timeout(Some(deadlines.first_byte));
    let h2 = matches!(s, HttpSession::H2(_));
    let head = request_head(&parts, body.is_end_stream(), body.size_hint().exact(), h2)?;
    s.write_request_header(Box::new(head)).await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CallError::Body(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                s.write_request_body(data, false).await?;
            }
        }
    }
    s.finish_request_body().await?;
    let head = tokio::time::timeout(deadlines.first_byte, final_head(&mut s))
        .await
        .map_err(|_| CallError::ReadTimeout)??;
    s.set_read_timeout(Some(deadlines.between_bytes));
    let (mut tx, rx) = mpsc::channel(BODY_FRAMES);
    let pump = async move {
        // what is left of the body once the caller stopped reading it (a guest that only
        // wanted the status): read and dropped, up to DRAIN bytes, so the connection can
        // serve the next call
        let mut drain: Option<usize> = None;
        loop {
            match s.read_response_body().await {
                Ok(Some(data)) => match drain.as_mut() {
                    Some(left) if data.len() > *left => return, // too much: not reused
                    Some(left) => *left -= data.len(),
                    None => {
                        if tx.send(Ok(Frame::data(data))).await.is_err() {
                            drain = Some(DRAIN);
                        }
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(CallError::from(e))).await;
                    return;
                }
            }
        }
        drop(tx);
        if s.response_done() {
            CONNECTOR.release_http_session(s, &*peer, Some(idle)).await;
        }
    };
    Ok((head.map(|()| http_body_util::StreamBody::new(rx)), pump))
}

/// The head the upstream gets: the caller's method, path and headers but for hop-by-hop
/// and framing ones, then the gateway's framing: the caller's Content-Length when its
/// body is known to be that long, chunked otherwise (HTTP/1.1; HTTP/2 frames itself).
fn request_head(
    parts: &http::request::Parts,
    empty: bool,
    exact: Option<u64>,
    h2: bool,
) -> Result<RequestHeader, CallError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = RequestHeader::build(parts.method.clone(), path.as_bytes(), None)
        .map_err(|_| CallError::BadRequest)?;
    let bad = |_| CallError::BadRequest;
    for (k, v) in &parts.headers {
        if !(is_hop_by_hop(k.as_str()) || k == CONTENT_LENGTH) {
            head.append_header(k.clone(), v.clone()).map_err(bad)?;
        }
    }
    if !head.headers.contains_key(HOST) {
        if let Some(a) = parts.uri.authority() {
            head.insert_header(HOST, a.as_str()).map_err(bad)?;
        }
    }
    let declared = parts.headers.get(CONTENT_LENGTH);
    let expects_body = !matches!(parts.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS");
    let length = if empty {
        Some(0)
    } else {
        exact.or_else(|| declared?.to_str().ok()?.parse().ok())
    };
    match length {
        Some(0) if !expects_body && declared.is_none() => {}
        Some(n) => head.insert_header(CONTENT_LENGTH, n).map_err(bad)?,
        None if !h2 => head
            .insert_header(TRANSFER_ENCODING, "chunked")
            .map_err(bad)?,
        None => {}
    }
    Ok(head)
}

/// Reads response heads until the final one (informational 1xx heads are skipped).
async fn final_head(s: &mut HttpSession) -> Result<http::Response<()>, CallError> {
    loop {
        s.read_response_header().await?;
        let h = s.response_header().ok_or(CallError::Terminated)?;
        let status = h.status.as_u16();
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut resp = http::Response::new(());
        *resp.status_mut() = h.status;
        for (k, v) in &h.headers {
            if !is_hop_by_hop(k.as_str()) {
                resp.headers_mut().append(k.clone(), v.clone());
            }
        }
        return Ok(resp);
    }
}

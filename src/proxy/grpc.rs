//! gRPC for the hooks: local replies in gRPC form for gRPC requests (as Envoy's
//! `sendLocalReply`), and the client behind `proxy_grpc_call` and `proxy_grpc_stream`,
//! over HTTP/2 (h2c with prior knowledge to plain upstreams, h2 through ALPN to TLS ones).
//!
//! A gRPC callout travels through the same path as an HTTP callout ([`PendingCall`] with
//! its `grpc` part set); its answer is a [`CallResponse`] whose `grpc` part carries the
//! status, delivered to the guest as `proxy_on_grpc_receive` (status 0) or
//! `proxy_on_grpc_close` (any other status). A stream runs on a task of its own
//! ([`GrpcClient::stream`]); each of its events is a [`CallResponse`] with its `stream`
//! part set, handed to the guest the same way.

use crate::wasm::{CallResponse, GrpcStatus, PendingCall, StreamCmd, StreamEvent};
use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v2::client::Http2Session;
use std::time::Duration;

/// gRPC status codes the gateway produces itself.
pub mod code {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Largest message a unary call may answer with (as HTTP callouts' bodies), and a
/// stream may carry either way.
const MAX_MESSAGE: usize = crate::wasm::host::MAX_GRPC_MESSAGE;

/// Whether a request is gRPC, as Envoy decides it: `content-type` is `application/grpc` or
/// `application/grpc+<codec>` (gRPC-Web is not).
pub fn is_grpc_request(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| {
            let v = v.as_bytes();
            let base = b"application/grpc";
            v.len() >= base.len()
                && v[..base.len()].eq_ignore_ascii_case(base)
                && (v.len() == base.len() || v[base.len()] == b'+' || v[base.len()] == b';')
        })
        .unwrap_or(false)
}

/// The gRPC status for an HTTP status, as Envoy's `Grpc::Utility::httpToGrpcStatus` (from
/// gRPC's http-grpc-status-mapping.md).
pub fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// What gRPC percent-encodes in a `grpc-message`: bytes outside printable ASCII
/// (non-ASCII always is), and `%`.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// `grpc-message` encoding.
pub fn percent_encode(msg: &[u8]) -> String {
    percent_encoding::percent_encode(msg, GRPC_MESSAGE).to_string()
}

/// Decodes a `grpc-message`; a malformed escape is kept as it is (as gRPC clients do).
pub fn percent_decode(v: &[u8]) -> Vec<u8> {
    percent_encoding::percent_decode(v).collect()
}

/// A local reply to a gRPC request, as Envoy builds it: HTTP 200, `content-type:
/// application/grpc`, the guest's headers, `grpc-status` (the guest's, or the HTTP status
/// mapped, unless the headers carry one already) and the body as a percent-encoded
/// `grpc-message`; headers only (trailers-only). `h1` adds the `content-length: 0` an
/// HTTP/1 answer needs to end.
pub fn reply_head(
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    grpc_status: Option<u32>,
    h1: bool,
) -> pingora::Result<pingora::http::ResponseHeader> {
    let mut resp = super::respond::local_head(200, headers, None, h1.then_some(0))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    if !resp.headers.contains_key("grpc-status") {
        let s = grpc_status.unwrap_or_else(|| http_to_grpc_status(status));
        resp.insert_header("grpc-status", s.to_string())?;
    }
    if !body.is_empty() {
        let text = body.strip_suffix(b"\n").unwrap_or(body);
        resp.insert_header("grpc-message", percent_encode(text))?;
    }
    Ok(resp)
}

/// One length-prefixed gRPC message (uncompressed).
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 5);
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// Splits a response body into its messages; `Err` for a compressed or truncated frame.
pub fn unframe(mut body: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err("truncated gRPC frame");
        }
        if body[0] != 0 {
            return Err("compressed gRPC message (no encoding was offered)");
        }
        let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let rest = &body[5..];
        if rest.len() < n {
            return Err("truncated gRPC frame");
        }
        out.push(&rest[..n]);
        body = &rest[n..];
    }
    Ok(out)
}

/// Makes `proxy_grpc_call`s, with its own pool of HTTP/2 connections.
pub struct GrpcClient {
    connector: Connector,
}

impl Default for GrpcClient {
    fn default() -> Self {
        GrpcClient {
            connector: Connector::new(None),
        }
    }
}

fn answer(token: u32, code: u32, message: &str) -> CallResponse {
    CallResponse {
        token,
        grpc: Some(GrpcStatus {
            code,
            message: message.as_bytes().to_vec(),
        }),
        ..CallResponse::default()
    }
}

impl GrpcClient {
    /// One unary call. Failures close it with a status, as Envoy's async gRPC client does:
    /// no connection is `UNAVAILABLE` (14), a timeout `DEADLINE_EXCEEDED` (4), a reset
    /// stream `INTERNAL` (13), a non-200 answer its HTTP status mapped.
    pub async fn call(&self, c: PendingCall) -> CallResponse {
        let token = c.token;
        match tokio::time::timeout(c.timeout, self.exchange(&c)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(upstream = %c.upstream_name(), error = %e, "gRPC callout failed");
                let g = failed(&e);
                answer(token, g.code, std::str::from_utf8(&g.message).unwrap_or(""))
            }
            Err(_) => answer(token, code::DEADLINE_EXCEEDED, "upstream request timeout"),
        }
    }

    /// One gRPC stream, until it closes or the guest's context resets it (see
    /// [`crate::wasm::Dispatch::open_stream`]). Events go out as Envoy's async stream
    /// client reports them: initial metadata, each message, trailing metadata (a
    /// trailers-only answer has only these), then the close status. Failures close it as
    /// they close a call; a message over 1 MiB closes it RESOURCE_EXHAUSTED; after
    /// [`crate::wasm::host::GRPC_STREAM_LIFETIME`] it closes DEADLINE_EXCEEDED.
    pub async fn stream(
        &self,
        c: PendingCall,
        mut cmds: tokio::sync::mpsc::UnboundedReceiver<StreamCmd>,
        mut events: futures::channel::mpsc::Sender<CallResponse>,
    ) {
        let token = c.token;
        let run = self.run_stream(&c, &mut cmds, &mut events);
        let status = match tokio::time::timeout(c.timeout, run).await {
            Ok(Ok(Some(g))) => g,
            Ok(Ok(None)) => return, // reset by the guest or its context's end
            Ok(Err(e)) => {
                tracing::debug!(upstream = %c.upstream_name(), error = %e, "gRPC stream failed");
                failed(&e)
            }
            Err(_) => GrpcStatus::new(code::DEADLINE_EXCEEDED, "upstream request timeout"),
        };
        // the stream (dropped above) was reset unless it had ended
        let _ = events
            .send(stream_event(token, StreamEvent::Close, status))
            .await;
    }

    /// Runs the stream: `Ok(Some(status))` when it closed, `Ok(None)` when the guest reset
    /// it (or its context is gone).
    async fn run_stream(
        &self,
        c: &PendingCall,
        cmds: &mut tokio::sync::mpsc::UnboundedReceiver<StreamCmd>,
        events: &mut futures::channel::mpsc::Sender<CallResponse>,
    ) -> pingora::Result<Option<GrpcStatus>> {
        let (mut s, peer) = self.open(c, false).await?;
        let mut writer = s.take_request_body_writer().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "no request body writer")
        })?;
        let mut ended = false;
        let r = {
            let read = read_stream(&mut s, c.token, events);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    r = &mut read => break r,
                    cmd = cmds.recv() => match cmd {
                        // h2 buffers what flow control holds back; the guest's messages are
                        // bounded by its budget and the 1 MiB cap per message
                        Some(StreamCmd::Send(msg, end)) if !ended => {
                            ended = end;
                            let _ = writer.send_data(frame(&msg), end);
                        }
                        Some(StreamCmd::Close) if !ended => {
                            ended = true;
                            let _ = writer.send_data(Bytes::new(), true);
                        }
                        Some(_) => {}
                        // dropping the stream's handles resets it (RST_STREAM CANCEL)
                        None => return Ok(None),
                    },
                }
            }
        };
        drop(writer);
        // over on both sides: the connection goes back to the pool, as a call's does
        if ended && matches!(r, Ok(Some(_))) && s.response_finished() {
            self.connector
                .release_http_session(HttpSession::H2(s), &*peer, Some(Duration::from_secs(60)))
                .await;
        }
        r
    }

    /// Opens the HTTP/2 stream of a call (`unary`: with its deadline in `grpc-timeout`
    /// and as the read timeout) and sends its headers.
    async fn open(
        &self,
        c: &PendingCall,
        unary: bool,
    ) -> pingora::Result<(Http2Session, Box<pingora::upstreams::peer::HttpPeer>)> {
        let Some(target) = &c.grpc else {
            return pingora::Error::e_explain(pingora::ErrorType::InternalError, "not gRPC");
        };
        let mut peer = c.peer().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::ConnectNoRoute, "no healthy upstream")
        })?;
        // h2 only: prior knowledge on plain TCP, ALPN h2 on TLS
        peer.options.set_http_version(2, 2);
        peer.options.max_h2_streams = 100;
        if unary {
            peer.options.read_timeout = Some(c.timeout);
        }
        let path = format!("/{}/{}", target.service, target.method);
        let mut req = RequestHeader::build("POST", path.as_bytes(), Some(c.headers.len() + 4))?;
        req.insert_header(http::header::HOST, target.authority.as_str())?;
        req.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
        req.insert_header(http::header::TE, "trailers")?;
        if unary {
            req.insert_header("grpc-timeout", format!("{}m", c.timeout.as_millis()))?;
        }
        for (k, v) in &c.headers {
            req.append_header(k.clone(), v.as_slice())?;
        }
        let (session, _reused) = self.connector.get_http_session(&*peer).await?;
        let mut s = match session {
            HttpSession::H2(s) => s,
            _ => {
                return pingora::Error::e_explain(
                    pingora::ErrorType::ConnectError,
                    "the upstream does not speak HTTP/2",
                )
            }
        };
        s.write_request_header(Box::new(req), false)?;
        Ok((s, peer))
    }

    async fn exchange(&self, c: &PendingCall) -> pingora::Result<CallResponse> {
        let (mut s, peer) = self.open(c, true).await?;
        s.write_request_body(frame(&c.body), true).await?;
        let (status, headers) = response_head(&mut s).await?;
        let mut body = Vec::new();
        while let Some(chunk) = s.read_response_body().await? {
            if body.len() + chunk.len() > MAX_MESSAGE + 5 {
                return Ok(answer(
                    c.token,
                    code::RESOURCE_EXHAUSTED,
                    "gRPC callout response over 1 MiB",
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let trailers = s.read_trailers().await?.map(|t| pairs(&t));
        self.connector
            .release_http_session(HttpSession::H2(s), &*peer, Some(Duration::from_secs(60)))
            .await;
        // trailers-only answers carry the status in the headers
        let meta = trailers.as_ref().unwrap_or(&headers);
        let get = |n: &str| meta.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_slice());
        let grpc_status = get("grpc-status")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        let message = get("grpc-message").map(percent_decode).unwrap_or_default();
        let (code, message) = match (grpc_status, status) {
            (Some(s), 200) => (s, message),
            (Some(s), _) if trailers.is_none() => (s, message),
            (_, st) if st != 200 => (http_to_grpc_status(st), Vec::new()),
            _ => (code::UNKNOWN, message),
        };
        let mut r = CallResponse {
            token: c.token,
            status,
            headers: if trailers.is_some() {
                headers.clone()
            } else {
                Vec::new()
            },
            trailers: trailers.clone().unwrap_or(headers),
            body: Vec::new(),
            grpc: Some(GrpcStatus { code, message }),
            root: false,
            stream: None,
            foreign: false,
        };
        if code == code::OK {
            match unframe(&body) {
                // as Envoy's async client, the last message is the answer
                Ok(msgs) => match msgs.last() {
                    Some(m) => r.body = m.to_vec(),
                    None => r.grpc = Some(GrpcStatus::new(code::INTERNAL, "")),
                },
                Err(e) => r.grpc = Some(GrpcStatus::new(code::INTERNAL, e)),
            }
        }
        Ok(r)
    }
}

/// The status a call or stream that failed closes with, as Envoy's async client: no
/// connection is `UNAVAILABLE` (14), a reset or broken stream `INTERNAL` (13).
fn failed(e: &pingora::Error) -> GrpcStatus {
    use pingora::ErrorType::*;
    match e.etype() {
        ConnectRefused | ConnectNoRoute | ConnectTimedout | ConnectError | TLSHandshakeFailure
        | TLSHandshakeTimedout | InvalidCert | SocketError => GrpcStatus::new(
            code::UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
        ),
        _ => GrpcStatus::new(code::INTERNAL, ""),
    }
}

fn stream_event(token: u32, ev: StreamEvent, status: GrpcStatus) -> CallResponse {
    CallResponse {
        token,
        grpc: Some(status),
        stream: Some(ev),
        ..CallResponse::default()
    }
}

/// The status in trailing metadata (or a trailers-only answer's headers); `None` when
/// it has none.
fn grpc_status_of(meta: &[(String, Vec<u8>)]) -> Option<GrpcStatus> {
    let get = |n: &str| meta.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_slice());
    let code = get("grpc-status")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())?;
    let message = get("grpc-message").map(percent_decode).unwrap_or_default();
    Some(GrpcStatus { code, message })
}

/// Reads a stream's answer, handing each event to `events`; the close status, or `None`
/// when the events' receiver is gone (the guest's context ended).
async fn read_stream(
    s: &mut Http2Session,
    token: u32,
    events: &mut futures::channel::mpsc::Sender<CallResponse>,
) -> pingora::Result<Option<GrpcStatus>> {
    let (status, headers) = response_head(s).await?;
    let ok = GrpcStatus::default;
    if s.response_finished() {
        // trailers-only: the headers are the trailing metadata and carry the status
        let st = grpc_status_of(&headers)
            .unwrap_or_else(|| GrpcStatus::new(http_to_grpc_status(status), ""));
        let mut ev = stream_event(token, StreamEvent::TrailingMetadata, ok());
        ev.trailers = headers;
        if events.send(ev).await.is_err() {
            return Ok(None);
        }
        return Ok(Some(st));
    }
    if status != 200 {
        return Ok(Some(GrpcStatus::new(http_to_grpc_status(status), "")));
    }
    let mut ev = stream_event(token, StreamEvent::InitialMetadata, ok());
    ev.headers = headers;
    if events.send(ev).await.is_err() {
        return Ok(None);
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = s.read_response_body().await? {
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            if buf[0] != 0 {
                let e = "compressed gRPC message (no encoding was offered)";
                return Ok(Some(GrpcStatus::new(code::INTERNAL, e)));
            }
            let n = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if n > MAX_MESSAGE {
                let e = "gRPC stream message over 1 MiB";
                return Ok(Some(GrpcStatus::new(code::RESOURCE_EXHAUSTED, e)));
            }
            if buf.len() < 5 + n {
                break;
            }
            let msg = buf.split_to(5 + n);
            let mut ev = stream_event(token, StreamEvent::Message, ok());
            ev.body = msg[5..].to_vec();
            if events.send(ev).await.is_err() {
                return Ok(None);
            }
        }
    }
    if !buf.is_empty() {
        return Ok(Some(GrpcStatus::new(
            code::INTERNAL,
            "truncated gRPC frame",
        )));
    }
    let Some(trailers) = s.read_trailers().await?.map(|t| pairs(&t)) else {
        return Ok(Some(GrpcStatus::new(
            code::UNKNOWN,
            "no grpc-status trailer",
        )));
    };
    let st = grpc_status_of(&trailers)
        .unwrap_or_else(|| GrpcStatus::new(code::UNKNOWN, "bad grpc-status trailer"));
    let mut ev = stream_event(token, StreamEvent::TrailingMetadata, ok());
    ev.trailers = trailers;
    if events.send(ev).await.is_err() {
        return Ok(None);
    }
    Ok(Some(st))
}

/// Reads the answer's head: its status and headers.
async fn response_head(s: &mut Http2Session) -> pingora::Result<(u16, Vec<(String, Vec<u8>)>)> {
    s.read_response_header().await?;
    let h = s.response_header().ok_or_else(|| {
        pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "no response")
    })?;
    Ok((h.status.as_u16(), pairs(&h.headers)))
}

fn pairs(h: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_are_recognized_like_envoy() {
        let req = |ct: &str| {
            let mut r = RequestHeader::build("POST", b"/s/m", None).unwrap();
            r.insert_header("content-type", ct).unwrap();
            r
        };
        assert!(is_grpc_request(&req("application/grpc")));
        assert!(is_grpc_request(&req("application/grpc+proto")));
        assert!(is_grpc_request(&req("Application/GRPC")));
        assert!(!is_grpc_request(&req("application/grpc-web")));
        assert!(!is_grpc_request(&req("application/json")));
        assert!(!is_grpc_request(
            &RequestHeader::build("GET", b"/", None).unwrap()
        ));
    }

    #[test]
    fn statuses_and_messages() {
        assert_eq!(http_to_grpc_status(401), 16);
        assert_eq!(http_to_grpc_status(403), 7);
        assert_eq!(http_to_grpc_status(404), 12);
        assert_eq!(http_to_grpc_status(503), 14);
        assert_eq!(http_to_grpc_status(504), 14);
        assert_eq!(http_to_grpc_status(500), 2);
        assert_eq!(percent_encode("a b%é\n".as_bytes()), "a b%25%C3%A9%0A");
        assert_eq!(percent_decode(b"a b%25%C3%A9%0A"), "a b%é\n".as_bytes());
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%zz%4"), b"%zz%4");
    }

    #[test]
    fn frames_round_trip() {
        let mut b = frame(b"hello").to_vec();
        b.extend_from_slice(&frame(b""));
        assert_eq!(unframe(&b).unwrap(), vec![&b"hello"[..], &b""[..]]);
        assert!(unframe(&b[..4]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn local_reply_head() {
        let h = vec![("x-extra".to_string(), b"1".to_vec())];
        let r = reply_head(403, &h, b"no entry: %", None, true).unwrap();
        assert_eq!(r.status.as_u16(), 200);
        assert_eq!(r.headers["content-type"], "application/grpc");
        assert_eq!(r.headers["grpc-status"], "7");
        assert_eq!(r.headers["grpc-message"], "no entry: %25");
        assert_eq!(r.headers["content-length"], "0");
        assert_eq!(r.headers["x-extra"], "1");
        let r = reply_head(200, &[], b"", Some(16), false).unwrap();
        assert_eq!(r.headers["grpc-status"], "16");
        assert!(!r.headers.contains_key("grpc-message"));
        assert!(!r.headers.contains_key("content-length"));
    }
}

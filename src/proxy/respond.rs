//! The one place errors become client responses: a status, a small JSON body, and the
//! connection kept alive (`respond_error` would close it; a denied request must not cost
//! the client its connection).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

/// Errors the gateway answers itself, each with its status and JSON `error` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayError {
    NoRoute,
    /// Under the function namespace, but no such tenant or function.
    NoFunction,
    MethodNotAllowed,
    BodyTooLarge,
    HeadersTooLarge,
    NoHealthyUpstream,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamError,
    ClientTimeout,
    BadRequest,
    NoHookResponse,
    RateLimited,
    TenantBusy,
    TooManyConnections,
    /// A hook changed the length of a streamed request body whose Content-Length it kept.
    HookChangedLength,
    /// A transfer coding other than `chunked` (the gateway cannot forward it faithfully).
    UnsupportedTransferEncoding,
    Internal,
}

impl GatewayError {
    pub fn status(self) -> u16 {
        match self {
            GatewayError::NoRoute | GatewayError::NoFunction => 404,
            GatewayError::MethodNotAllowed => 405,
            GatewayError::BodyTooLarge => 413,
            GatewayError::HeadersTooLarge => 431,
            GatewayError::ClientTimeout => 408,
            GatewayError::BadRequest => 400,
            GatewayError::NoHealthyUpstream
            | GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamError
            | GatewayError::NoHookResponse => 502,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::RateLimited => 429,
            GatewayError::TenantBusy => 503,
            GatewayError::TooManyConnections => 503,
            GatewayError::HookChangedLength => 502,
            GatewayError::UnsupportedTransferEncoding => 501,
            GatewayError::Internal => 500,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::NoFunction => "no_function",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::BodyTooLarge => "request_body_too_large",
            GatewayError::HeadersTooLarge => "request_headers_too_large",
            GatewayError::NoHealthyUpstream => "no_healthy_upstream",
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamError => "upstream_error",
            GatewayError::ClientTimeout => "client_timeout",
            GatewayError::BadRequest => "bad_request",
            GatewayError::NoHookResponse => "no_response_from_hooks",
            GatewayError::RateLimited => "rate_limited",
            GatewayError::TenantBusy => "tenant_busy",
            GatewayError::TooManyConnections => "too_many_connections",
            GatewayError::HookChangedLength => "hook_changed_body_length",
            GatewayError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            GatewayError::Internal => "internal_error",
        }
    }

    /// Envoy's response flag bits for this error (`response.flags`): UH 0x2, UT 0x4,
    /// UF 0x20, UC 0x40, NR 0x100, RL 0x800, SI 0x10000 (stream idle timeout), IH 0x20000
    /// (invalid request headers), DPE 0x40000; 0 for errors Envoy has no flag for.
    pub fn envoy_flags(self) -> u64 {
        match self {
            GatewayError::NoHealthyUpstream => 0x2,
            GatewayError::UpstreamTimeout => 0x4,
            GatewayError::UpstreamUnreachable => 0x20,
            GatewayError::UpstreamError => 0x40,
            GatewayError::NoRoute | GatewayError::NoFunction => 0x100,
            GatewayError::RateLimited => 0x800,
            GatewayError::ClientTimeout => 0x10000,
            GatewayError::HeadersTooLarge => 0x20000,
            GatewayError::BadRequest | GatewayError::UnsupportedTransferEncoding => 0x40000,
            _ => 0,
        }
    }

    /// Errors a client causes at will (bad requests, slow or oversized ones).
    pub fn clients_fault(self) -> bool {
        matches!(
            self,
            GatewayError::BadRequest
                | GatewayError::UnsupportedTransferEncoding
                | GatewayError::ClientTimeout
                | GatewayError::BodyTooLarge
                | GatewayError::HeadersTooLarge
        )
    }

    /// Classifies a Pingora error that ended a proxied request.
    pub fn from_pingora(e: &Error) -> Option<GatewayError> {
        use ErrorType::*;
        let upstream = matches!(e.esource(), pingora::ErrorSource::Upstream);
        Some(match e.etype() {
            ConnectTimedout | TLSHandshakeTimedout => GatewayError::UpstreamTimeout,
            ReadTimedout | WriteTimedout if upstream => GatewayError::UpstreamTimeout,
            ReadTimedout | WriteTimedout => GatewayError::ClientTimeout,
            ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError
            | TLSHandshakeFailure | InvalidCert => GatewayError::UpstreamUnreachable,
            HTTPStatus(413) => GatewayError::BodyTooLarge,
            HTTPStatus(_) => return None,
            ConnectionClosed | ReadError | WriteError if !upstream => return None,
            InvalidHTTPHeader | H1Error | H2Error | InvalidH2 if !upstream => {
                GatewayError::BadRequest
            }
            // a malformed chunked request body
            Custom("InvalidChunk") if !upstream => GatewayError::BadRequest,
            _ if upstream => GatewayError::UpstreamError,
            _ => GatewayError::Internal,
        })
    }
}

/// `{"error":"…","route":"…"}`, without anything internal.
pub fn error_body(code: &str, route: Option<&str>) -> Bytes {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        route: Option<&'a str>,
    }
    // one buffer, no intermediate JSON map; route names are escaped like any string
    let v = serde_json::to_vec(&Body { error: code, route }).unwrap_or_default();
    Bytes::from(v)
}

/// Writes a complete response (header and body) and keeps the connection reusable.
pub async fn send(
    session: &mut Session,
    status: u16,
    headers: &[(String, Vec<u8>)],
    content_type: Option<&str>,
    body: Bytes,
) -> Result<()> {
    send_reply(session, status, headers, content_type, body, None).await
}

/// [`send`], with the gRPC status a guest chose (`proxy_send_local_response`). To a gRPC
/// request every local reply (a guest's, a failure policy's, a gateway error) is a gRPC
/// answer, as Envoy's `sendLocalReply` makes it: 200 with `grpc-status` (`grpc_status`, or
/// the HTTP status mapped) and the body as `grpc-message`, headers only.
pub async fn send_reply(
    session: &mut Session,
    status: u16,
    headers: &[(String, Vec<u8>)],
    content_type: Option<&str>,
    body: Bytes,
    grpc_status: Option<u32>,
) -> Result<()> {
    if super::grpc::is_grpc_request(session.req_header()) {
        let h1 = !session.is_http2();
        let resp = super::grpc::reply_head(status, headers, &body, grpc_status, h1)?;
        return write_head_only(session, resp).await;
    }
    // a 204 or 304 has no body, and a 204 must not carry a length (RFC 9110 §8.6)
    let bodiless = status == 204 || status == 304;
    let body = if bodiless { Bytes::new() } else { body };
    let resp = local_head(status, headers, content_type, Some(body.len()))?;
    let head_only = session.req_header().method == http::Method::HEAD;
    if head_only || body.is_empty() {
        return write_head_only(session, resp).await;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a response that ends with its head. Pingora's `write_response_header` does not
/// end an HTTP/2 stream, which then closes with an empty DATA frame or a reset (a gRPC
/// client takes either as a broken trailers-only answer); a header task marked as the end
/// goes out as one HEADERS frame with END_STREAM.
async fn write_head_only(session: &mut Session, resp: ResponseHeader) -> Result<()> {
    let task = pingora::protocols::http::HttpTask::Header(Box::new(resp), true);
    session.write_response_tasks(vec![task]).await.map(drop)
}

/// The head of a local reply: `status`, the given headers lower-cased but for the framing
/// headers (`content-length`, `transfer-encoding`) and pseudo-headers, which the gateway
/// sets itself; `content_type` unless the headers name one; and `length` as the
/// `content-length`, except on a 204 or 304, which carry none.
pub fn local_head(
    status: u16,
    headers: &[(String, Vec<u8>)],
    content_type: Option<&str>,
    length: Option<usize>,
) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 2))?;
    for (k, v) in headers {
        let lower = k.to_ascii_lowercase();
        if lower == "content-length" || lower == "transfer-encoding" || lower.starts_with(':') {
            continue;
        }
        resp.append_header(lower, v.as_slice())?;
    }
    if let Some(ct) = content_type {
        if !resp.headers.contains_key(http::header::CONTENT_TYPE) {
            resp.insert_header(http::header::CONTENT_TYPE, ct)?;
        }
    }
    if let Some(n) = length.filter(|_| status != 204 && status != 304) {
        resp.insert_header(http::header::CONTENT_LENGTH, n)?;
    }
    Ok(resp)
}

/// Sends a gateway error as JSON.
pub async fn send_error(session: &mut Session, e: GatewayError, route: Option<&str>) -> Result<()> {
    send_error_with(session, e, route, &[]).await
}

/// Sends a gateway error as JSON with extra headers (e.g. `Retry-After`).
pub async fn send_error_with(
    session: &mut Session,
    e: GatewayError,
    route: Option<&str>,
    headers: &[(String, Vec<u8>)],
) -> Result<()> {
    send(
        session,
        e.status(),
        headers,
        Some("application/json"),
        error_body(e.code(), route),
    )
    .await
}

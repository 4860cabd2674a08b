//! The one place errors become client responses: a status, a small JSON body, and the
//! connection kept alive (`respond_error` would close it; a denied request must not cost
//! the client its connection).

use crate::wasm::LocalResponse;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

/// Errors the gateway answers itself. This is the one place an error becomes a
/// response: its status ([`GatewayError::status`]), its JSON `error` code
/// ([`GatewayError::code`]), its headers (`Retry-After` where waiting helps) and its
/// body ([`GatewayError::reply`]); the `Display` text is what logs say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches the request")]
    NoRoute,
    /// Under the function namespace, but no such tenant or function.
    #[error("no such tenant or function")]
    NoFunction,
    #[error("the route does not allow the method")]
    MethodNotAllowed,
    #[error("the request body is larger than the route allows")]
    BodyTooLarge,
    #[error("the request head is larger than the gateway allows")]
    HeadersTooLarge,
    #[error("no healthy target in the upstream")]
    NoHealthyUpstream,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream timed out")]
    UpstreamTimeout,
    #[error("the upstream failed mid-exchange")]
    UpstreamError,
    #[error("the client was too slow")]
    ClientTimeout,
    /// The client closed its connection while the request's modules waited on callouts:
    /// nothing is answered; logged as nginx's 499 with Envoy's `DC` flag and details.
    #[error("the client closed the connection before the answer")]
    ClientClosed,
    #[error("the request is malformed")]
    BadRequest,
    #[error("the hooks neither answered nor allowed a backend")]
    NoHookResponse,
    /// The tenant's request rate is used up; a request would pass in `retry_after_s`.
    #[error("the tenant's rate limit is reached (retry in {retry_after_s} s)")]
    RateLimited { retry_after_s: u64 },
    #[error("the tenant's concurrent requests are at their limit")]
    TenantBusy,
    /// Every instance of a module on the route is busy.
    #[error("no module instance is free")]
    HookBusy,
    /// Every instance of the route's function is busy.
    #[error("no function instance is free")]
    FunctionBusy,
    /// The route's function trapped, overran or missed its deadline before answering.
    #[error("the function failed before answering")]
    FunctionFailed,
    #[error("the gateway's connections are at their limit")]
    TooManyConnections,
    /// A hook changed the length of a streamed request body whose Content-Length it kept.
    #[error("a hook changed the length of a streamed body")]
    HookChangedLength,
    /// A transfer coding other than `chunked` (the gateway cannot forward it faithfully).
    #[error("a transfer coding other than chunked")]
    UnsupportedTransferEncoding,
    #[error("an internal error")]
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
            GatewayError::ClientClosed => 499,
            GatewayError::BadRequest => 400,
            GatewayError::NoHealthyUpstream
            | GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamError
            | GatewayError::NoHookResponse => 502,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::TenantBusy | GatewayError::HookBusy | GatewayError::FunctionBusy => 503,
            GatewayError::FunctionFailed => 503,
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
            GatewayError::ClientClosed => "downstream_remote_disconnect",
            GatewayError::BadRequest => "bad_request",
            GatewayError::NoHookResponse => "no_response_from_hooks",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::TenantBusy => "tenant_busy",
            GatewayError::HookBusy => "hook_busy",
            GatewayError::FunctionBusy => "function_busy",
            GatewayError::FunctionFailed => "function_failed",
            GatewayError::TooManyConnections => "too_many_connections",
            GatewayError::HookChangedLength => "hook_changed_body_length",
            GatewayError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            GatewayError::Internal => "internal_error",
        }
    }

    /// Seconds a client should wait before trying again (`Retry-After`), where waiting
    /// helps: a rate limit's own wait, a second for capacity that frees up.
    pub fn retry_after(self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after_s } => Some(retry_after_s),
            GatewayError::TenantBusy
            | GatewayError::HookBusy
            | GatewayError::TooManyConnections => Some(1),
            _ => None,
        }
    }

    /// The response for this error: status, `content-type: application/json`,
    /// `Retry-After` where [`GatewayError::retry_after`] says, and
    /// `{"error":"…","route":"…"}` as the body.
    pub fn reply(self, route: Option<&str>) -> LocalResponse {
        let mut headers = vec![("content-type".into(), b"application/json".to_vec())];
        if let Some(s) = self.retry_after() {
            headers.push(("retry-after".into(), s.to_string().into_bytes()));
        }
        LocalResponse {
            status: self.status(),
            headers,
            body: error_body(self.code(), route).to_vec(),
            grpc_status: -1,
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
            GatewayError::RateLimited { .. } => 0x800,
            GatewayError::ClientClosed => 0x4000,
            GatewayError::ClientTimeout => 0x10000,
            GatewayError::HeadersTooLarge => 0x20000,
            GatewayError::BadRequest | GatewayError::UnsupportedTransferEncoding => 0x40000,
            _ => 0,
        }
    }

    /// Records this error where guests and the access log read it: Envoy's response flag
    /// and `response.code_details`.
    pub fn mark(self, info: &mut crate::wasm::RequestInfo) {
        info.response_flags |= self.envoy_flags();
        info.code_details = Some(std::borrow::Cow::Borrowed(self.code()));
    }

    /// Errors a client causes at will (bad requests, slow or oversized ones).
    pub fn clients_fault(self) -> bool {
        matches!(
            self,
            GatewayError::BadRequest
                | GatewayError::UnsupportedTransferEncoding
                | GatewayError::ClientTimeout
                | GatewayError::ClientClosed
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
            // a malformed chunked request body, or trailers past Pingora's limit
            Custom("InvalidChunk" | "InvalidTrailerEnd") if !upstream => GatewayError::BadRequest,
            // the client closed the connection in the middle of its body
            Custom("PrematureBodyEnd") if !upstream => return None,
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

/// Writes a complete response (header and body) and keeps the connection reusable, with
/// the gRPC status a guest chose, if any (`proxy_send_local_response`). To a gRPC
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

/// Sends a gateway error (see [`GatewayError::reply`]).
pub async fn send_error(session: &mut Session, e: GatewayError, route: Option<&str>) -> Result<()> {
    let r = e.reply(route);
    send_reply(
        session,
        r.status,
        &r.headers,
        None,
        Bytes::from(r.body),
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::GatewayError;

    fn header<'a>(r: &'a crate::wasm::LocalResponse, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn a_reply_carries_status_json_code_route_and_retry_after_where_waiting_helps() {
        let r = GatewayError::RateLimited { retry_after_s: 7 }.reply(Some("api"));
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some(&b"7"[..]));
        assert_eq!(header(&r, "content-type"), Some(&b"application/json"[..]));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "rate_limited", "route": "api"})
        );

        for e in [
            GatewayError::TenantBusy,
            GatewayError::HookBusy,
            GatewayError::TooManyConnections,
        ] {
            let r = e.reply(None);
            assert_eq!(
                (r.status, header(&r, "retry-after")),
                (503, Some(&b"1"[..]))
            );
        }
        let r = GatewayError::UpstreamTimeout.reply(None);
        assert_eq!((r.status, header(&r, "retry-after")), (504, None));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, serde_json::json!({"error": "upstream_timeout"}));
    }
}

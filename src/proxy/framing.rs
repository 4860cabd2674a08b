//! Message framing as RFC 9112 wants it on both sides of the gateway, where Pingora's
//! defaults differ: one unambiguous Content-Length or plain `chunked` on requests,
//! `100 Continue` sent by the gateway itself, no hop-by-hop headers passed on, and no
//! chunked bodies or interim answers for HTTP/1.0 clients.

use super::respond::GatewayError;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;

/// Checks a request's framing headers. A Content-Length repeated or listed with one value
/// (`5, 5`) becomes one header, so no upstream reads it differently than the gateway
/// did; differing values are 400. `Transfer-Encoding` must be exactly `chunked`: another
/// coding (`gzip, chunked`) would be dropped by the decoding on the way, so it is 501.
pub fn request_head(session: &mut Session) -> Result<(), GatewayError> {
    let req = session.req_header();
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let mut value: Option<u64> = None;
        let mut count = 0;
        for v in std::iter::once(first).chain(lengths) {
            let text = v.to_str().map_err(|_| GatewayError::BadRequest)?;
            for part in text.split(',') {
                let n: u64 = part.trim().parse().map_err(|_| GatewayError::BadRequest)?;
                if value.is_some_and(|x| x != n) {
                    return Err(GatewayError::BadRequest);
                }
                value = Some(n);
                count += 1;
            }
        }
        if count > 1 {
            let n = value.expect("at least one value");
            session
                .req_header_mut()
                .insert_header(http::header::CONTENT_LENGTH, n)
                .map_err(|_| GatewayError::BadRequest)?;
        }
    }
    let req = session.req_header();
    let mut codings = req.headers.get_all(http::header::TRANSFER_ENCODING).iter();
    if let Some(te) = codings.next() {
        if codings.next().is_some() || !te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")
        {
            return Err(GatewayError::UnsupportedTransferEncoding);
        }
    }
    if req.version == http::Version::HTTP_10 {
        // an HTTP/1.0 client cannot read interim (1xx) answers
        if let ServerSession::H1(h1) = session.as_mut() {
            h1.set_ignore_info_resp(true);
        }
    }
    Ok(())
}

/// Answers `Expect: 100-continue` before the body is read, as nginx does, and does not
/// pass the expectation on: the client sends its body at once instead of waiting, and
/// the upstream sees an ordinary request.
pub async fn continue_if_expected(session: &mut Session) -> Result<()> {
    let req = session.req_header();
    let expects = req
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects {
        return Ok(());
    }
    let send = req.version == http::Version::HTTP_11 && !session.is_http2();
    session
        .req_header_mut()
        .remove_header(&http::header::EXPECT);
    if send && !session.is_body_empty() {
        let interim = ResponseHeader::build(100, Some(0))?;
        // Pingora turns keep-alive off for any answer written before the body is read;
        // an interim answer is not one (the client sends its body next)
        let ServerSession::H1(h1) = session.as_mut() else {
            return Ok(());
        };
        h1.set_close_on_response_before_downstream_finish(false);
        let sent = h1.write_response_header(Box::new(interim)).await;
        h1.set_close_on_response_before_downstream_finish(true);
        sent?;
    }
    Ok(())
}

pub use crate::headers::{is_hop_by_hop, HOP_BY_HOP};

/// Cleans a response head before the client gets it: hop-by-hop headers go (`Upgrade`
/// stays on a 101), a 1xx/204/304 carries no Transfer-Encoding, and an HTTP/1.0 client
/// gets a body delimited by the connection's close instead of chunks.
pub fn response_head(session: &mut Session, resp: &mut ResponseHeader) -> Result<()> {
    // most upstreams say only `keep-alive` or `close`: nothing to collect, no allocation
    let named: Vec<String> = resp
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case("keep-alive")
        })
        .map(str::to_ascii_lowercase)
        .collect();
    for name in named {
        resp.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        if name == "upgrade" && resp.status == 101 {
            continue;
        }
        if resp.headers.contains_key(name) {
            resp.remove_header(name);
        }
    }
    // the gateway speaks its own HTTP version, whatever the upstream's (RFC 9110 §6.2)
    if !session.is_http2() {
        resp.set_version(http::Version::HTTP_11);
    }
    let status = resp.status.as_u16();
    let bodiless = resp.status.is_informational() || status == 204 || status == 304;
    let old_client = session.req_header().version == http::Version::HTTP_10;
    if (bodiless || old_client) && resp.headers.contains_key(http::header::TRANSFER_ENCODING) {
        resp.remove_header(&http::header::TRANSFER_ENCODING);
        if old_client && !bodiless {
            // no length known: the body ends when the connection does
            session.set_keepalive(None);
        }
    }
    Ok(())
}

/// A status whose response never has a body (1xx, 204, 304), whatever its head says.
pub fn status_without_body(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// Whether a response can carry no body, so its head ends the stream: the answer to a
/// HEAD request, 204, 304, or a declared length of 0 (the end-of-stream flag Envoy gives
/// `on_http_response_headers`).
pub fn bodiless_response(req: &pingora::http::RequestHeader, resp: &ResponseHeader) -> bool {
    req.method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304)
        || resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().trim_ascii() == b"0")
}

/// `TE: trailers` on a request going upstream over HTTP/2. Pingora drops `TE` with the
/// other hop-by-hop headers, but HTTP/2 allows it with the value `trailers` (RFC 9113
/// §8.2.2) and gRPC servers require it: without it a gRPC call from an HTTP/1.1 client
/// fails. As Envoy, the client's `te` is kept when it names `trailers`.
pub fn keep_te_trailers(
    client: &pingora::http::RequestHeader,
    upstream: &mut pingora::http::RequestHeader,
) -> Result<()> {
    let trailers = client
        .headers
        .get_all(http::header::TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
    if trailers {
        upstream.insert_header(http::header::TE, "trailers")?;
    }
    Ok(())
}

/// After the hooks changed a response head: the gateway, not a guest, decides how the
/// body is framed (RFC 9112 §6). A `Transfer-Encoding` the hooks added or changed is put
/// back as the upstream sent it; `Content-Length` values that disagree are all dropped
/// (the body then goes out chunked), equal ones are folded into one; a length next to a
/// transfer coding is dropped. Without this a guest could make the client read the body
/// as something else, and the next response on the connection with it.
pub fn keep_framing(resp: &mut ResponseHeader, te_before: Option<http::HeaderValue>) {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    // the common case, checked without allocating: framing as the upstream sent it
    let mut te = resp.headers.get_all(TRANSFER_ENCODING).iter();
    let te_kept = te.next() == te_before.as_ref() && te.next().is_none();
    let mut cl = resp.headers.get_all(CONTENT_LENGTH).iter();
    let (first, second) = (cl.next().is_some(), cl.next().is_some());
    if te_kept && (!first || (!second && te_before.is_none())) {
        return;
    }
    if !te_kept {
        resp.remove_header(&TRANSFER_ENCODING);
        if let Some(te) = te_before {
            let _ = resp.insert_header(TRANSFER_ENCODING, te);
        }
    }
    let lengths: Vec<_> = resp
        .headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .cloned()
        .collect();
    if lengths.is_empty() {
        return;
    }
    let one = lengths
        .first()
        .filter(|v| lengths.iter().all(|w| w == *v))
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    resp.remove_header(&CONTENT_LENGTH);
    if let (Some(n), false) = (one, resp.headers.contains_key(TRANSFER_ENCODING)) {
        let _ = resp.insert_header(CONTENT_LENGTH, n);
    }
}

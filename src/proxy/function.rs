//! Function backends on the request path: the request (head, then its body as it
//! arrives) goes into a WASI-HTTP component, and its response goes out to the client as
//! the guest writes it, so a server-sent-events function delivers each event when it
//! writes it. Nothing is buffered whole, except a body the route's Proxy-Wasm filters
//! read: they see the function's answer as they see an upstream's (`on_response_headers`,
//! `on_response_body` chunk by chunk, `on_response_trailers`), may hold its head until
//! they have seen the body, change it, or answer in its place.
//!
//! A failure before the response head gets the function's failure policy (or 503
//! `function_busy` with `Retry-After` when all its instances are busy); a failure after
//! the head cuts the response off (see `fail_to_proxy`): what cannot be delivered whole
//! is never made to look complete.

use super::framing::is_hop_by_hop;
use super::hooks::Flow;
use super::respond::GatewayError;
use crate::wasm::component::{self, HyperIncomingBody};
use crate::wasm::{FailurePolicy, FunctionBackend, LocalResponse};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use std::sync::Arc;

/// Chunks of the request body in flight to the guest before the reader waits for it.
const BODY_CHANNEL: usize = 4;

type BodyTx = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>;

/// How a function request ended, for the proxy to answer or log.
pub enum Served {
    /// The function's response was sent whole.
    Answered,
    /// No response head was sent: answer this instead.
    Reply(LocalResponse, GatewayError),
    /// A module of the route answered in place of the function's response head: send it
    /// as it is (the chain's response callbacks already ran).
    Filtered(LocalResponse),
}

/// The route's filters, when it has any: they see the function's response head.
pub type Filters<'a> = Option<(&'a mut super::hooks::HookState, &'a super::hooks::Callouts)>;

/// What the function is given of the request's body.
pub enum RequestBody {
    /// Read from the client as the guest reads it, up to the route's limit.
    Stream { max: u64 },
    /// Already read (the route's filters saw it).
    Read(Bytes),
}

/// Runs the request through `backend`. `Err` after the head was sent means the response
/// was cut off. The body bytes in (from the client) and out (to it) count in the
/// function's usage, however the request ended (see [`Tally`]).
pub async fn serve(
    session: &mut Session,
    backend: &Arc<FunctionBackend>,
    authority: &str,
    body: RequestBody,
    route: &str,
    filters: Filters<'_>,
) -> Result<Served> {
    let mut tally = Tally {
        backend,
        bytes_in: 0,
        bytes_out: 0,
    };
    let seen = &mut tally.bytes_in;
    if let RequestBody::Read(b) = &body {
        *seen = b.len() as u64;
    }
    let (incoming, mut tx, max) = match body {
        RequestBody::Read(b) if b.is_empty() => (component::body::empty(), None, 0),
        RequestBody::Read(b) => (component::body::full(b), None, 0),
        RequestBody::Stream { .. } if session.is_body_empty() => {
            (component::body::empty(), None, 0)
        }
        RequestBody::Stream { max } => {
            let (tx, rx) = tokio::sync::mpsc::channel(BODY_CHANNEL);
            (channel_body(rx), Some(tx), max)
        }
    };
    let request = match request(session, authority, incoming) {
        Some(r) => r,
        None => return Ok(bad_request(route)),
    };
    let handle = backend.function.handle(request, backend.io());
    tokio::pin!(handle);
    // a chunk read from the client but not yet handed to the guest (see `feed`)
    let mut pending: Option<Bytes> = None;
    let answer = loop {
        tokio::select! {
            r = &mut handle => break r,
            more = feed(session, &mut tx, &mut pending, seen, max), if tx.is_some() => {
                if let Some(reply) = more? {
                    return Ok(reply);
                }
            }
        }
    };
    let response = match answer {
        Ok(r) => r,
        Err(component::Failure::Busy) => {
            let e = GatewayError::FunctionBusy;
            return Ok(Served::Reply(e.reply(Some(route)), e));
        }
        Err(_) => return Ok(policy_reply(&backend.spec.policy, route)),
    };
    let (parts, mut body) = response.into_parts();
    let mut head = ResponseHeader::build(parts.status.as_u16(), Some(parts.headers.len()))?;
    for (k, v) in &parts.headers {
        if !is_hop_by_hop(k.as_str()) {
            head.append_header(k.clone(), v.clone())?;
        }
    }
    let max_out = backend.spec.max_response_bytes;
    let declared = (head.headers.get(http::header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > max_out) {
        backend.report(&format!(
            "the function declared a {len}-byte response, over its max_response_bytes {max_out}"
        ));
        return Ok(policy_reply(&backend.spec.policy, route));
    }
    let status = parts.status.as_u16();
    let bodiless = super::framing::status_without_body(status);
    let mut out = Out {
        head: Some(Box::new(head)),
        head_only: session.req_header().method == http::Method::HEAD,
        h11: session.req_header().version == http::Version::HTTP_11 && !session.is_http2(),
        length: None,
        sent: &mut tally.bytes_out,
    };
    // The route's filters see the head as the function set it (a CORS or security-header
    // filter applies to a function's answer as to an upstream's), then the body as it
    // comes. A module may hold the head until it has seen the body: nothing has gone out
    // yet, so it can still replace the whole answer.
    let mut filters = filters;
    if let Some((state, callouts)) = filters.as_mut() {
        let head = out.head.as_deref_mut().expect("not written yet");
        let req = session.req_header();
        match state
            .response_headers(req, head, bodiless, true, callouts)
            .await
        {
            Flow::Respond(r) => return Ok(Served::Filtered(r)),
            Flow::Buffer => state.held_head = out.head.take(),
            Flow::Continue => {}
        }
    }
    out.send_head(session).await?;
    let mut trailers = None;
    // bytes the function wrote, whatever the filters make of them
    let mut written = 0u64;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            more = feed(session, &mut tx, &mut pending, seen, max), if tx.is_some() => {
                // the guest answered before the whole body came: it keeps reading it
                if more?.is_some() {
                    return Error::e_explain(InternalError, "request body over the limit mid-response");
                }
                continue;
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => data,
                Err(f) => {
                    trailers = f.into_trailers().ok();
                    continue;
                }
            },
            Some(Err(e)) => {
                return Error::e_explain(InternalError, format!("function body failed: {e}"));
            }
        };
        written += data.len() as u64;
        if written > max_out {
            let cause = format!(
                "the function's response went past its max_response_bytes {max_out}: cut off"
            );
            backend.report(&cause);
            return Error::e_explain(InternalError, cause);
        }
        match filters.as_mut() {
            Some((state, callouts)) if !bodiless => {
                let req = session.req_header();
                let mut flow = state.response_body(req, Some(&data), false);
                if state.waiting_on_callouts() {
                    flow = state.response_body_wait(req, callouts).await;
                }
                if let Some(r) = out.filtered(session, state, flow).await? {
                    return Ok(Served::Filtered(r));
                }
            }
            _ => out.send(session, data).await?,
        }
    }
    if let Some((state, callouts)) = filters.as_mut() {
        let req = session.req_header();
        if !bodiless {
            let mut flow = state.response_body(req, None, true);
            if state.waiting_on_callouts() {
                flow = state.response_body_wait(req, callouts).await;
            }
            if let Some(r) = out.filtered(session, state, flow).await? {
                return Ok(Served::Filtered(r));
            }
        }
        if let Some(head) = state.held_head.take() {
            // a module held the head to the end and failed there (its policy let the
            // response go on)
            out.head = Some(head);
            out.send_head(session).await?;
            if let Some(rest) = super::take_nonempty(&mut state.resp_body) {
                out.send(session, rest).await?;
            }
        }
        if let Some(t) = trailers.as_mut() {
            state.response_trailers(session.req_header(), t);
        }
    }
    if let Some(n) = out.length.filter(|n| *out.sent != *n && !out.head_only) {
        let cause = format!(
            "the response body is {} bytes, its Content-Length says {n}: cut off",
            out.sent
        );
        return Error::e_explain(InternalError, cause);
    }
    // over HTTP/2 the trailers end the stream; HTTP/1 gets none (Pingora writes no
    // HTTP/1 trailers) and its body ends with its framing
    match trailers {
        Some(t) if session.is_http2() => session.write_response_trailers(t).await?,
        _ => {
            session
                .write_response_body(Some(Bytes::new()), true)
                .await?
        }
    }
    Ok(Served::Answered)
}

/// Body bytes one request moved, counted in the function's usage when the request ends,
/// however it ends (answered, failed, cut off, or dropped because the client left).
struct Tally<'a> {
    backend: &'a Arc<FunctionBackend>,
    bytes_in: u64,
    bytes_out: u64,
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.backend.count_bytes(self.bytes_in, self.bytes_out);
    }
}

/// The function's response on its way to the client.
struct Out<'a> {
    /// Not written yet (a module holds it, or it comes next).
    head: Option<Box<ResponseHeader>>,
    head_only: bool,
    h11: bool,
    /// The Content-Length the head went out with: the body must be that long.
    length: Option<u64>,
    sent: &'a mut u64,
}

impl Out<'_> {
    /// Writes the head, framed by the gateway: one valid Content-Length the guest (or a
    /// filter) set, else chunked on HTTP/1.1 so the connection stays open for the next
    /// request (an HTTP/1.0 client reads to the close; HTTP/2 frames itself).
    async fn send_head(&mut self, session: &mut Session) -> Result<()> {
        let Some(mut head) = self.head.take() else {
            return Ok(());
        };
        super::framing::keep_framing(&mut head, None);
        let bodiless = super::framing::status_without_body(head.status.as_u16());
        self.length = (head.headers.get(http::header::CONTENT_LENGTH))
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if self.h11 && !bodiless && self.length.is_none() {
            head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        session.write_response_header(head, false).await
    }

    /// Writes a body chunk (none for HEAD), within the length the head announced.
    async fn send(&mut self, session: &mut Session, data: Bytes) -> Result<()> {
        if self.head_only || data.is_empty() {
            return Ok(());
        }
        *self.sent += data.len() as u64;
        if self.length.is_some_and(|n| *self.sent > n) {
            return Error::e_explain(
                InternalError,
                "the response body went past its Content-Length: cut off",
            );
        }
        session.write_response_body(Some(data), false).await
    }

    /// Acts on what the filters made of a body chunk: sends what they let through (and a
    /// head a module let go), or their answer in place of the response while its head has
    /// not gone out; once it has, an answer cuts the response off, as Envoy resets the
    /// stream.
    async fn filtered(
        &mut self,
        session: &mut Session,
        state: &mut super::hooks::HookState,
        flow: Flow,
    ) -> Result<Option<LocalResponse>> {
        match flow {
            Flow::Buffer => Ok(None),
            Flow::Respond(r) if state.held_head.is_some() || self.head.is_some() => Ok(Some(r)),
            Flow::Respond(_) => Error::e_explain(
                InternalError,
                "a hook answered or failed during the function's response body: cut off",
            ),
            Flow::Continue => {
                if let Some(head) = state.head_ready() {
                    self.head = Some(head);
                    self.send_head(session).await?;
                }
                if let Some(body) = super::take_nonempty(&mut state.resp_body) {
                    self.send(session, body).await?;
                }
                Ok(None)
            }
        }
    }
}

/// Moves one chunk of the request body to the guest. `Some` is the answer when the body
/// is over the limit (before the response head).
///
/// Cancellation-safe, as the `select!` loops above need: it runs beside the guest's
/// response and is dropped whenever that side is ready first. A chunk read from the
/// client waits in `pending` until the channel has room for it, so dropping the future
/// while it waits loses nothing (a chunk read, then dropped with the future that held
/// it, was once how a streaming function lost parts of its request body). Pingora's
/// body read is itself safe to drop, as its own proxy loop does.
async fn feed(
    session: &mut Session,
    tx: &mut Option<BodyTx>,
    pending: &mut Option<Bytes>,
    seen: &mut u64,
    max: u64,
) -> Result<Option<Served>> {
    if pending.is_none() {
        match session.read_request_body().await? {
            None => {
                *tx = None; // dropping the sender ends the guest's body
                return Ok(None);
            }
            Some(c) => {
                *seen += c.len() as u64;
                if *seen > max {
                    if let Some(sender) = tx.take() {
                        let limit = wasmtime_wasi_http::Error::HttpRequestBodySize(Some(*seen));
                        let _ = sender.try_send(Err(limit));
                    }
                    let e = GatewayError::BodyTooLarge;
                    return Ok(Some(Served::Reply(e.reply(None), e)));
                }
                *pending = Some(c);
            }
        }
    }
    let Some(sender) = tx.as_ref() else {
        return Ok(None);
    };
    let delivered = match sender.reserve().await {
        Ok(permit) => {
            permit.send(Ok(Frame::data(pending.take().unwrap_or_default())));
            true
        }
        Err(_) => false,
    };
    if !delivered {
        // the guest no longer reads its body
        *tx = None;
        *pending = None;
    }
    Ok(None)
}

fn channel_body(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>,
) -> HyperIncomingBody {
    let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    http_body_util::StreamBody::new(frames).boxed_unsync()
}

/// The request as the guest sees it: an absolute URI (`http://authority/path?query`), the
/// client's headers but for hop-by-hop ones.
fn request(
    session: &Session,
    authority: &str,
    body: HyperIncomingBody,
) -> Option<hyper::Request<HyperIncomingBody>> {
    let req = session.req_header();
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let authority = if authority.is_empty() {
        "localhost"
    } else {
        authority
    };
    let mut b = hyper::Request::builder()
        .method(req.method.clone())
        .uri(format!("http://{authority}{path}"));
    for (k, v) in &req.headers {
        if !is_hop_by_hop(k.as_str()) {
            b = b.header(k, v);
        }
    }
    b.body(body).ok()
}

fn bad_request(route: &str) -> Served {
    let e = GatewayError::BadRequest;
    Served::Reply(e.reply(Some(route)), e)
}

/// What a failed function answers: its policy's answer (a function cannot fail open:
/// `allow` is a 502).
fn policy_reply(policy: &FailurePolicy, route: &str) -> Served {
    let e = GatewayError::FunctionFailed;
    let r = super::hooks::policy_answer(policy, route, e.code()).unwrap_or_else(|| {
        let mut r = e.reply(Some(route));
        r.status = 502;
        r
    });
    Served::Reply(r, e)
}

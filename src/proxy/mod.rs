//! The one `ProxyHttp` implementation. Each phase loads what it needs from the request's
//! CTX and delegates: routing to [`crate::routing`], hooks to [`hooks`], error answers to
//! [`respond`]. The conf snapshot is loaded once per request, in `request_filter`, and the
//! request keeps it to the end, so a reload never changes a request midway.

pub mod access_log;
pub mod conn;
pub mod fast;
pub mod forwarded;
pub mod framing;
mod function;
use function::{RequestBody, Served};
pub mod grpc;
pub mod hooks;
pub mod respond;
pub mod target;

use crate::config::Snapshot;
use crate::metrics::Metrics;
use crate::reload::Live;
use crate::route::Route;
use crate::upstream::HashKey;
use crate::wasm::{LocalResponse, RequestInfo};
use access_log::AccessLog;
use async_trait::async_trait;
use bytes::Bytes;
use hooks::{Callouts, Flow, HookState};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use respond::GatewayError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The proxy's phases. Cheap to clone (shared handles): Pingora's proxy owns one, the
/// fast path another.
#[derive(Clone)]
pub struct Gateway {
    pub live: Arc<Live>,
    /// Tenants' function URLs and limits (when the admin API is on).
    pub control: Option<Arc<crate::control::Control>>,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<AccessLog>,
    callouts: Arc<Callouts>,
}

impl Gateway {
    /// The callout client, which also sends the root contexts' callouts
    /// ([`crate::wasm::Runtime::set_dispatch`]).
    pub fn callouts(&self) -> Arc<Callouts> {
        self.callouts.clone()
    }

    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>, access_log: Option<AccessLog>) -> Gateway {
        Gateway {
            live,
            control: None,
            metrics,
            access_log,
            callouts: Arc::default(),
        }
    }
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    snapshot: Option<Arc<Snapshot>>,
    route: Option<Arc<Route>>,
    /// Path (and query) for the upstream, from the route's rewrite.
    rewritten: Option<String>,
    hooks: Option<Box<HookState>>,
    /// A response decided in a body phase, sent by `fail_to_proxy`.
    pending: Option<LocalResponse>,
    upstream_sent: Option<Instant>,
    error: Option<GatewayError>,
    body_seen: u64,
    counted: bool,
    retries: usize,
    /// Targets this request failed to connect to: retries go elsewhere.
    failed_targets: Vec<String>,
    /// Pingora closes the client connection after errors past peer selection, so answers
    /// from then on must say `Connection: close`.
    peer_selected: bool,
    /// The request body as the hooks left it, when it was read in `request_filter`.
    prebuffered: Option<Bytes>,
    /// The Content-Length sent upstream with a body the hooks stream.
    upstream_length: Option<u64>,
    /// Body bytes sent upstream after the hooks.
    body_out: u64,
    /// A slot under the tenant's `max_concurrency`, held for the request's life.
    _tenant_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The normalized host, when it differs from a slice of the request's own (case).
    host: Option<String>,
    /// Otherwise its length: the normalized host is that prefix of [`raw_host`] (port and
    /// trailing dot dropped), found once by `check_target`.
    host_len: usize,
    /// The path routes match, when it differs from the request's path (`;` parameters).
    route_key: Option<String>,
    /// The hooks got the response head with end of stream (HEAD, 204, 304, no body).
    response_ended_at_head: bool,
    /// How Pingora frames the response body it writes to the client (for a length: what
    /// is left of it).
    resp_framing: Framing,
    /// The hooks, while they finish the response in a task of their own (see
    /// [`Gateway::finish_response_off_phase`]); back for `logging`.
    hooks_away: Option<tokio::sync::oneshot::Receiver<HookState>>,
}

impl Ctx {
    fn route_name(&self) -> Option<&str> {
        self.route.as_ref().map(|r| &*r.name)
    }

    /// Ends a body phase with a hook's answer: Pingora's error path (`fail_to_proxy`)
    /// sends it, with the status `why` explains.
    fn answer_from_body_phase<T>(&mut self, r: LocalResponse, why: &'static str) -> Result<T> {
        let status = r.status;
        self.pending = Some(r);
        Error::e_explain(HTTPStatus(status), why)
    }
}

/// The request's host as routes match it: normalized by [`check_target`] (lower case, no
/// port, no trailing dot). Empty for an HTTP/1.0 request without one.
fn host_of<'a>(session: &'a Session, ctx: &'a Ctx) -> &'a str {
    match &ctx.host {
        Some(h) => h,
        None => raw_host(session)
            .and_then(|h| h.get(..ctx.host_len))
            .unwrap_or(""),
    }
}

/// The `Host` header, or the authority of an HTTP/2 request.
fn raw_host(session: &Session) -> Option<&str> {
    let req = session.req_header();
    match req.headers.get(http::header::HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri.authority().map(|a| a.as_str()),
    }
}

/// The path routes match: the normalized path without `;` parameters.
fn route_path<'a>(session: &'a Session, ctx: &'a Ctx) -> &'a str {
    ctx.route_key
        .as_deref()
        .unwrap_or_else(|| session.req_header().uri.path())
}

/// Refuses request targets and hosts that could route one way here and another way
/// upstream, and puts the normalized path in the request (see [`target`]): what is
/// forwarded is what was matched. Absolute-form targets are forwarded in origin-form,
/// their authority as `Host`.
fn check_target(session: &mut Session, ctx: &mut Ctx) -> Result<(), target::TargetError> {
    use target::TargetError;
    let h2 = session.is_http2();
    let req = session.req_header();
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let (first_host, more) = (hosts.next(), hosts.next().is_some());
    if more {
        return Err(TargetError::Host);
    }
    // h1: the target as it came on the wire
    let mut authority = None;
    if !h2 {
        let raw = req.raw_path();
        if !req.raw_path_is_utf8() {
            return Err(TargetError::Escape);
        }
        if raw.first() != Some(&b'/') {
            let lower = raw
                .get(..8)
                .map(|b| b.to_ascii_lowercase())
                .unwrap_or_default();
            let skip = if lower.starts_with(b"http://") {
                7
            } else if lower.starts_with(b"https://") {
                8
            } else {
                return Err(TargetError::Form);
            };
            let rest = &raw[skip..];
            let end = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?' || b == b'#')
                .unwrap_or(rest.len());
            let a = std::str::from_utf8(&rest[..end]).map_err(|_| TargetError::Host)?;
            if a.contains('@') {
                return Err(TargetError::Host);
            }
            authority = Some(a.to_string());
        }
    }
    let host = match (&authority, first_host) {
        (Some(a), _) => Some(a.as_str()),
        (None, Some(h)) => Some(h.to_str().map_err(|_| TargetError::Host)?),
        (None, None) if h2 => req.uri.authority().map(|a| a.as_str()),
        (None, None) => None,
    };
    match host {
        Some(h) => match target::normalize_host(h)? {
            std::borrow::Cow::Owned(o) => ctx.host = Some(o),
            std::borrow::Cow::Borrowed(b) => ctx.host_len = b.len(),
        },
        None if req.version == http::Version::HTTP_10 => {}
        None => return Err(TargetError::Host),
    }
    let n = target::normalize_path(req.uri.path())?;
    let changed = matches!(n.path, std::borrow::Cow::Owned(_));
    if let std::borrow::Cow::Owned(k) = n.key {
        if n.path != k {
            ctx.route_key = Some(k);
        }
    }
    if changed || authority.is_some() {
        let mut pq = n.path.into_owned();
        if let Some(q) = req.uri.query() {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = req.uri.clone().into_parts();
        parts.path_and_query = Some(pq.parse().map_err(|_| TargetError::Form)?);
        if authority.is_some() {
            // origin-form upstream; the authority becomes the Host
            parts.scheme = None;
            parts.authority = None;
        }
        let uri = http::Uri::from_parts(parts).map_err(|_| TargetError::Form)?;
        let req = session.req_header_mut();
        req.set_uri(uri);
        if let Some(a) = authority {
            req.insert_header(http::header::HOST, a)
                .map_err(|_| TargetError::Host)?;
        }
    }
    Ok(())
}

fn request_info(session: &Session, route: &Route) -> RequestInfo {
    let ssl = session.digest().and_then(|d| d.ssl_digest.as_ref());
    let tls = ssl.is_some();
    let facts = ssl.and_then(|s| s.extension.get::<crate::tls::TlsFacts>());
    RequestInfo {
        connection_id: facts
            .map(|f| f.id)
            .or_else(conn::connection_id)
            .unwrap_or(0),
        tls: facts.map(|f| f.tls.clone()).or_else(|| {
            ssl.map(|s| {
                Arc::new(crate::wasm::ConnTls {
                    version: crate::tls::tls_version_name(&s.version),
                    ..Default::default()
                })
            })
        }),
        request_body_bytes: 0,
        upstream_address: None,
        code_details: None,
        response_flags: 0,
        response_body_bytes: 0,
        response_header_bytes: None,
        id: hooks::request_id(),
        scheme: if tls { "https" } else { "http" },
        protocol: if session.is_http2() {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        source: session.client_addr().and_then(|a| a.as_inet()).copied(),
        destination: session.server_addr().and_then(|a| a.as_inet()).copied(),
        route: route.name.clone(),
        upstream: route.upstream.as_ref().map(|u| u.name.clone()),
        response_code: 0,
        props: Vec::new(),
        start: Some(std::time::SystemTime::now()),
    }
}

/// 431 when the request head is over the conf's size or count limits.
fn over_header_limits(session: &Session, l: &crate::config::Limits) -> Option<GatewayError> {
    let req = session.req_header();
    if req.headers.len() > l.max_request_headers {
        return Some(GatewayError::HeadersTooLarge);
    }
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    let size: usize = target
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    (size > l.max_request_header_bytes).then_some(GatewayError::HeadersTooLarge)
}

/// The conf rewrite of a path a hook changed. Like Envoy's router, which rewrites after
/// the filters ran, a prefix rewrite applies to the hook's path while it is still under the
/// route's prefix; a hook's path outside it, or a route with a template rewrite (built from
/// the matched path's parameters), is forwarded as the hook left it. A hook's change is
/// never silently undone.
fn rewrite_hook_path(route: &Route, path: &str, query: Option<&str>) -> Option<String> {
    match route.rewrite.as_ref()? {
        rw @ crate::route::Rewrite::Prefix { from, .. } => {
            let under = path.strip_prefix(from.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || from.ends_with('/')
            });
            under.then(|| rw.apply(path, query, &[]))
        }
        crate::route::Rewrite::Template(_) => None,
    }
}

/// Bodies up to this size that hooks see are read before the request goes upstream, so
/// the upstream gets their final length (Pingora's retry buffer holds this much).
const PREREAD_LIMIT: u64 = 64 * 1024;

/// The buffered body as the next chunk; `None` when empty, so Pingora never writes an
/// empty chunk after the end of a body.
pub(super) fn take_nonempty(buf: &mut Vec<u8>) -> Option<Bytes> {
    if buf.is_empty() {
        None
    } else {
        Some(Bytes::from(std::mem::take(buf)))
    }
}

/// A local reply decided in the response headers phase replaces the upstream's head and
/// body, as it is (Envoy's direct local reply); to a gRPC request, in gRPC form.
fn replace_response(
    req: &RequestHeader,
    resp: &mut ResponseHeader,
    state: &mut HookState,
    r: LocalResponse,
) -> Result<()> {
    if grpc::is_grpc_request(req) {
        // a gRPC answer: the status in the head, no body
        let grpc = u32::try_from(r.grpc_status).ok();
        *resp = grpc::reply_head(r.status, &r.headers, &r.body, grpc, false)?;
        state.replace_body = Some(Bytes::new());
    } else {
        // typed like every local reply (see `hooks::reply_head`); framed when sent
        let default_type = (!r.body.is_empty()).then_some("text/plain");
        *resp = respond::local_head(r.status, &r.headers, default_type, None)?;
        state.replace_body = Some(Bytes::from(r.body));
    }
    Ok(())
}

/// A held response head as HTTP/1.1 bytes, framed as chunks like the body Pingora writes
/// after it.
/// How the response body reaches the client (HTTP/1).
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// A hook holds the head: the connection writes head and body, in chunks.
    Held,
    /// Pingora frames the body in chunks.
    Chunked,
    /// Pingora writes this many body bytes (Content-Length).
    Length(u64),
    /// The body ends with the connection (HTTP/1.0).
    Close,
}

/// The Content-Length of a head, when it has a valid one.
fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `body` framed as one chunk (nothing for an empty body: the last chunk ends it).
fn push_chunk(out: &mut Vec<u8>, body: &[u8]) {
    if !body.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
}

fn held_head_bytes(mut head: Box<ResponseHeader>) -> Vec<u8> {
    head.remove_header(&http::header::CONTENT_LENGTH);
    let _ = head.insert_header(http::header::TRANSFER_ENCODING, "chunked");
    let mut out = Vec::with_capacity(256);
    h1_head(&head, &mut out);
    out
}

/// A whole local reply as HTTP/1.1 bytes (head and body, with its length).
fn local_reply_bytes(req: &RequestHeader, r: &LocalResponse) -> Vec<u8> {
    let Ok(head) = hooks::reply_head(r) else {
        // not reached: the host checked the reply's headers when the guest sent it
        return b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n".to_vec();
    };
    let mut out = Vec::with_capacity(256 + r.body.len());
    h1_head(&head, &mut out);
    let bodiless = r.status == 204 || r.status == 304 || req.method == http::Method::HEAD;
    if !bodiless {
        out.extend_from_slice(&r.body);
    }
    out
}

/// A response head as HTTP/1.1 writes it.
fn h1_head(head: &ResponseHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in &head.headers {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

async fn send_local(session: &mut Session, r: LocalResponse) -> Result<()> {
    // as Envoy's local replies: a body without a declared type is text/plain
    let default_type = (!r.body.is_empty()).then_some("text/plain");
    respond::send_reply(
        session,
        r.status,
        &r.headers,
        default_type,
        Bytes::from(r.body),
        u32::try_from(r.grpc_status).ok(),
    )
    .await
}

impl Gateway {
    /// Finishes the response body phase in a task of its own: the hooks' callouts are
    /// sent and awaited there while the client connection holds every write (see
    /// [`conn::gate_response`]); then the connection writes what the hooks left, the
    /// held head and the body framed as Pingora frames the rest, or their reply in place
    /// of the response, or cuts the response off when a hook answers after its head went
    /// out. The hooks come back through the returned receiver for `logging`.
    fn finish_response_off_phase(
        &self,
        req: &RequestHeader,
        mut state: HookState,
        framing: Framing,
        gate: tokio::sync::oneshot::Sender<conn::Resume>,
    ) -> tokio::sync::oneshot::Receiver<HookState> {
        let (back, away) = tokio::sync::oneshot::channel();
        let req = Box::new(req.clone());
        let callouts = self.callouts.clone();
        let gone = conn::client_gone();
        tokio::spawn(async move {
            let flow = tokio::select! {
                flow = state.response_body_wait(&req, &callouts) => Some(flow),
                () = gone => None,
            };
            let Some(flow) = flow else {
                // nobody to write to: the calls are dropped, the connection closed
                GatewayError::ClientClosed.mark(&mut state.info);
                let _ = gate.send(conn::Resume::Abort);
                let _ = back.send(state);
                return;
            };
            let body = std::mem::take(&mut state.resp_body);
            let resume = match (flow, framing) {
                (Flow::Respond(r), Framing::Held) => {
                    state.replaced_status = Some(r.status);
                    conn::Resume::Replace(local_reply_bytes(&req, &r))
                }
                // the head went out: like Envoy, the stream is reset
                (Flow::Respond(_), _) => conn::Resume::Abort,
                (_, Framing::Held) => {
                    let mut out = state.head_ready().map(held_head_bytes).unwrap_or_default();
                    push_chunk(&mut out, &body);
                    conn::Resume::Write(out)
                }
                (_, Framing::Chunked) => {
                    let mut out = Vec::new();
                    push_chunk(&mut out, &body);
                    conn::Resume::Write(out)
                }
                (_, Framing::Length(left)) if body.len() as u64 == left => {
                    conn::Resume::Replace(body)
                }
                // a body whose length no longer matches the Content-Length sent is cut
                // off rather than sent as if whole
                (_, Framing::Length(_)) => conn::Resume::Abort,
                (_, Framing::Close) => conn::Resume::Write(body),
            };
            let _ = gate.send(resume);
            let _ = back.send(state);
        });
        away
    }

    async fn answer_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: GatewayError,
    ) -> Result<bool> {
        ctx.error = Some(e);
        self.send_error(session, ctx, e).await?;
        Ok(true)
    }

    /// A gateway error as JSON; on a hooked route it is a local reply like a hook's and
    /// goes through the response callbacks (see [`Gateway::reply`]).
    async fn send_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: GatewayError,
    ) -> Result<()> {
        if ctx.hooks.is_none() {
            return respond::send_error(session, e, ctx.route_name()).await;
        }
        let r = e.reply(ctx.route_name());
        self.reply(session, ctx, r).await
    }

    /// Sends a local reply: a hook's answer, or the gateway's own on a hooked route. Like
    /// Envoy's local replies it first goes through the response callbacks of the modules
    /// that saw the request, so their response headers and body changes apply to it.
    async fn reply(&self, session: &mut Session, ctx: &mut Ctx, r: LocalResponse) -> Result<()> {
        // An answer before the request's body was read (a denial from the headers): a
        // small declared body is read and dropped first, so the connection stays usable
        // for the next request (as nginx discards a body it will not use). A client
        // still waiting for `100 Continue` is not asked for its body.
        let small =
            content_length(&session.req_header().headers).is_some_and(|n| n <= PREREAD_LIMIT);
        let waits = session
            .req_header()
            .headers
            .contains_key(http::header::EXPECT);
        if small && !waits && !session.is_body_done() {
            let _ = session.drain_request_body().await;
        }
        let r = match ctx.hooks.as_mut() {
            Some(state) => {
                let reply = state.local_reply(session.req_header(), r, &self.callouts);
                match conn::unless_client_leaves(reply).await {
                    Some(r) => r,
                    None => return Err(client_left(ctx)),
                }
            }
            None => r,
        };
        send_local(session, r).await
    }

    /// Ends the request phase before the upstream: with the hooks' answer, or (`None`)
    /// for a client that left while they waited. The hooks stay for `logging`.
    async fn stop_early(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        state: HookState,
        flow: Option<Flow>,
    ) -> Result<bool> {
        ctx.hooks = Some(Box::new(state));
        match flow {
            Some(Flow::Respond(r)) => self.reply(session, ctx, r).await.map(|()| true),
            Some(_) => Ok(false),
            None => Err(client_left(ctx)),
        }
    }

    /// The rest of `request_filter` once a route is chosen: body limit, then hooks.
    async fn routed(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: Arc<Route>,
    ) -> Result<bool> {
        let declared = content_length(&session.req_header().headers);
        if declared.is_some_and(|n| n > route.max_request_body) {
            return self
                .answer_error(session, ctx, GatewayError::BodyTooLarge)
                .await;
        }
        let attached = self
            .control
            .as_ref()
            .and_then(|c| c.route_chain(&route.name));
        if !route.hooks.is_empty() || attached.is_some() {
            let chain = attached.as_deref().unwrap_or(&route.hooks);
            return self.run_request_hooks(session, ctx, chain, declared).await;
        }
        if let Some(b) = &route.backend {
            let body = RequestBody::Stream {
                max: route.max_request_body,
            };
            return self.serve_function(session, ctx, b.clone(), body).await;
        }
        framing::continue_if_expected(session).await?;
        Ok(false)
    }

    /// Answers with the route's function (see [`function::serve`]).
    async fn serve_function(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        backend: Arc<crate::wasm::FunctionBackend>,
        body: RequestBody,
    ) -> Result<bool> {
        framing::continue_if_expected(session).await?;
        let authority = host_of(session, ctx).to_string();
        let route = ctx.route_name().unwrap_or("-").to_string();
        let filters = ctx.hooks.as_deref_mut().map(|h| (h, &*self.callouts));
        match function::serve(session, &backend, &authority, body, &route, filters).await? {
            Served::Answered => {}
            Served::Filtered(r) => send_local(session, r).await?,
            Served::Reply(r, e) => {
                ctx.error = Some(e);
                if ctx.hooks.is_some() {
                    self.reply(session, ctx, r).await?;
                } else {
                    send_local(session, r).await?;
                }
            }
        }
        Ok(true)
    }

    /// Function URLs (`{function_prefix}/{tenant}/{function}/...` or by host): tenant rate and concurrency
    /// limits, then the function's route. `None` when the request is not for a function.
    async fn function_request(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Option<bool>> {
        use crate::control::FnLookup;
        let Some(control) = &self.control else {
            return Ok(None);
        };
        let f = match control.function_for(host_of(session, ctx), route_path(session, ctx)) {
            FnLookup::NotFunction => return Ok(None),
            // the namespace is the functions' alone: never fall through to a conf route
            FnLookup::Missing => {
                return self
                    .answer_error(session, ctx, GatewayError::NoFunction)
                    .await
                    .map(Some)
            }
            FnLookup::Found(f) => f,
        };
        ctx.route = Some(f.route.clone());
        if let Err(wait) = f.tenant.admit() {
            let retry_after_s = wait.as_secs_f64().ceil().max(1.0) as u64;
            let e = GatewayError::RateLimited { retry_after_s };
            ctx.error = Some(e);
            respond::send_error(session, e, ctx.route_name()).await?;
            return Ok(Some(true));
        }
        if let Some(sem) = &f.tenant.concurrency {
            let slot = match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => tokio::time::timeout(
                    crate::control::CONCURRENCY_WAIT,
                    sem.clone().acquire_owned(),
                )
                .await
                .ok()
                .and_then(|r| r.ok()),
            };
            match slot {
                Some(p) => ctx._tenant_slot = Some(p),
                None => {
                    ctx.error = Some(GatewayError::TenantBusy);
                    respond::send_error(session, GatewayError::TenantBusy, ctx.route_name())
                        .await?;
                    return Ok(Some(true));
                }
            }
        }
        // A function sees its own path: {prefix}/{tenant}/{function}/rest becomes /rest, for its
        // hooks and for the upstream it guards.
        let req = session.req_header();
        if let Some(p) = f
            .route
            .rewrite
            .as_ref()
            .map(|rw| rw.apply(route_path(session, ctx), req.uri.query(), &[]))
        {
            let uri = p
                .parse::<http::Uri>()
                .or_err(InternalError, "function path is not a valid URI")?;
            session.req_header_mut().set_uri(uri);
        }
        self.routed(session, ctx, f.route.clone()).await.map(Some)
    }

    /// Hooks for the request: headers first, then (for routes without an upstream) the
    /// whole body, since nothing else will read it.
    async fn run_request_hooks(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        chain: &crate::wasm::HookChain,
        declared: Option<u64>,
    ) -> Result<bool> {
        let route = ctx.route.clone().expect("route set");
        let info = request_info(session, &route);
        let mut state = match HookState::start(chain, info).await {
            Ok(s) => s,
            Err(_) => {
                let busy = GatewayError::HookBusy.reply(Some(&route.name));
                send_local(session, busy).await?;
                return Ok(true);
            }
        };
        if let Some(snap) = &ctx.snapshot {
            state.max_buffered_response = snap.limits.max_buffered_response_bytes;
        }
        let eos = session.is_body_empty();
        // the conf rewrite was computed from the matched path; a hook may change it
        let before = ctx
            .rewritten
            .is_some()
            .then(|| session.req_header().uri.path().to_string());
        let flow = state.request_headers(session.req_header_mut(), eos, &self.callouts);
        let flow = conn::unless_client_leaves(flow).await;
        if !matches!(flow, Some(Flow::Continue | Flow::Buffer)) {
            return self.stop_early(session, ctx, state, flow).await;
        }
        // Routes without an upstream read the whole body here: nothing else will. Small
        // bodies of proxied requests are read here too, so that the upstream gets the
        // hooks' body with its exact Content-Length (Pingora sends the request head
        // before it reads the body; it replays what was read here from its retry buffer).
        let preread = route.upstream.is_some() && declared.is_some_and(|n| n <= PREREAD_LIMIT);
        if !(route.upstream.is_none() || preread) {
            // A module holds the request for its body, but the head must go upstream before
            // the body is read here: the modules after it see the request now, and the
            // holding module still keeps the body back until it continues.
            while let Some(h) = state.held.take() {
                let flow = state.request_headers_from(
                    h + 1,
                    session.req_header_mut(),
                    false,
                    &self.callouts,
                );
                let flow = conn::unless_client_leaves(flow).await;
                if !matches!(flow, Some(Flow::Continue | Flow::Buffer)) {
                    return self.stop_early(session, ctx, state, flow).await;
                }
            }
        }
        let rewrite_after_body = before.is_some() && state.held.is_some();
        if let Some(before) = before.as_deref().filter(|_| !rewrite_after_body) {
            let req = session.req_header();
            if req.uri.path() != before {
                ctx.rewritten = rewrite_hook_path(&route, req.uri.path(), req.uri.query());
            }
        }
        framing::continue_if_expected(session).await?;
        let mut out = Vec::new();
        if !eos && (route.upstream.is_none() || preread) {
            if preread {
                session.as_mut().enable_retry_buffering();
            }
            loop {
                let chunk = session.read_request_body().await?;
                let end = chunk.is_none() || session.is_body_done();
                if let Some(c) = &chunk {
                    ctx.body_seen += c.len() as u64;
                    state.info.request_body_bytes = ctx.body_seen;
                    if ctx.body_seen > route.max_request_body {
                        ctx.hooks = Some(Box::new(state));
                        return self
                            .answer_error(session, ctx, GatewayError::BodyTooLarge)
                            .await;
                    }
                }
                let flow = state.request_body(
                    session.req_header_mut(),
                    chunk.as_deref(),
                    end,
                    &self.callouts,
                );
                match conn::unless_client_leaves(flow).await {
                    Some(Flow::Continue) => out.append(&mut state.req_body),
                    Some(Flow::Buffer) => {}
                    flow => return self.stop_early(session, ctx, state, flow).await,
                }
                if end {
                    break;
                }
            }
            if preread {
                ctx.prebuffered = Some(Bytes::from(std::mem::take(&mut out)));
            }
            if let Some(before) = before.as_deref().filter(|_| rewrite_after_body) {
                // the held modules changed the path once they saw the body
                let req = session.req_header();
                if req.uri.path() != before {
                    ctx.rewritten = rewrite_hook_path(&route, req.uri.path(), req.uri.query());
                }
            }
        }
        ctx.hooks = Some(Box::new(state));
        if let Some(b) = route.backend.as_ref().filter(|_| route.upstream.is_none()) {
            let body = RequestBody::Read(Bytes::from(out));
            return self.serve_function(session, ctx, b.clone(), body).await;
        }
        if route.upstream.is_none() {
            return self
                .answer_error(session, ctx, GatewayError::NoHookResponse)
                .await;
        }
        Ok(false)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    /// No downstream modules: Pingora's default adds a response-compression module at
    /// level 0 (disabled), which still costs a box and a call per request and phase.
    /// The gateway compresses nothing; measured with `scripts/ab.sh` (see Benchmarks).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            snapshot: None,
            route: None,
            rewritten: None,
            hooks: None,
            pending: None,
            upstream_sent: None,
            error: None,
            body_seen: 0,
            counted: false,
            retries: 0,
            failed_targets: Vec::new(),
            peer_selected: false,
            _tenant_slot: None,
            host: None,
            host_len: 0,
            route_key: None,
            prebuffered: None,
            upstream_length: None,
            body_out: 0,
            response_ended_at_head: false,
            resp_framing: Framing::Close,
            hooks_away: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        conn::head_received();
        // Pipelined requests (several in one write) are answered in order; without this
        // Pingora answers the first and closes, dropping the rest. It sticks to the
        // connection once set.
        if !session.is_http2() {
            session.as_mut().set_pipelining_enabled(true);
        }
        self.metrics.inflight.inc();
        ctx.counted = true;
        // the one snapshot load of the request
        let snap = self.live.load();
        if let Some(e) = over_header_limits(session, &snap.limits) {
            return self.answer_error(session, ctx, e).await;
        }
        if let Err(e) = check_target(session, ctx) {
            tracing::debug!(reason = e.reason(), "bad request target");
            session.set_keepalive(None);
            return self
                .answer_error(session, ctx, GatewayError::BadRequest)
                .await;
        }
        if let Err(e) = framing::request_head(session) {
            session.set_keepalive(None);
            return self.answer_error(session, ctx, e).await;
        }
        let local = session.server_addr().and_then(|a| a.as_inet()).copied();
        forwarded::apply(session, local.and_then(|a| snap.listener_at(&a)));
        let max_conns = snap.limits.max_connections;
        if max_conns > 0 && self.metrics.connections.get() > max_conns as i64 {
            // shed load: answer, and close this connection to make room
            session.set_keepalive(None);
            return self
                .answer_error(session, ctx, GatewayError::TooManyConnections)
                .await;
        }
        let keepalive = snap.limits.client_keepalive_timeout_secs;
        // idle time allowed before the next request (0: none, close after this one), on a
        // connection Pingora keeps: never one it closes (`Connection: close`, HTTP/1.0,
        // or Content-Length with Transfer-Encoding, after which RFC 9112 wants the
        // connection closed: the bytes a length-reading proxy in front took for body
        // must never run as a request)
        if keepalive != crate::config::file::DEFAULT_KEEPALIVE_SECS
            && session.get_keepalive().is_some()
        {
            session.set_keepalive((keepalive > 0).then_some(keepalive));
        }
        // a slow client must not hold the request: each body read has a deadline (408)
        session.set_read_timeout(Some(snap.limits.client_body_timeout));
        if let Some(done) = self.function_request(session, ctx).await? {
            return Ok(done);
        }
        let found = {
            let req = session.req_header();
            let path = route_path(session, ctx);
            snap.router
                .find(host_of(session, ctx), path, &req.method)
                .map(|m| {
                    let route = snap.routes[m.route].clone();
                    let rewritten = route
                        .rewrite
                        .as_ref()
                        .map(|rw| rw.apply(path, req.uri.query(), &m.params));
                    (route, rewritten)
                })
        };
        ctx.snapshot = Some(snap);
        let (route, rewritten) = match found {
            Ok(x) => x,
            Err(crate::routing::Miss::NoRoute) => {
                return self.answer_error(session, ctx, GatewayError::NoRoute).await
            }
            Err(crate::routing::Miss::MethodNotAllowed(r)) => {
                // the body names the route whose path matched
                ctx.route = Some(ctx.snapshot.as_ref().expect("set above").routes[r].clone());
                return self
                    .answer_error(session, ctx, GatewayError::MethodNotAllowed)
                    .await;
            }
        };
        ctx.route = Some(route.clone());
        ctx.rewritten = rewritten;
        self.routed(session, ctx, route).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        if let Some(b) = &ctx.prebuffered {
            // read and run through the hooks in request_filter; Pingora replays the raw
            // bytes from its retry buffer (again on a retry): send the hooks' body instead
            *body = Some(if end_of_stream {
                b.clone()
            } else {
                Bytes::new()
            });
            return Ok(());
        }
        if let Some(b) = body.as_ref() {
            ctx.body_seen += b.len() as u64;
            if ctx.body_seen > route.max_request_body {
                ctx.error = Some(GatewayError::BodyTooLarge);
                return Error::e_explain(HTTPStatus(413), "request body over the route's limit");
            }
        }
        let Some(state) = ctx.hooks.as_mut() else {
            return Ok(());
        };
        state.info.request_body_bytes = ctx.body_seen;
        if ctx.body_seen == 0 && end_of_stream {
            return Ok(()); // no body at all: like Envoy, no body callback
        }
        // Pingora sent the head upstream before this phase
        state.head_sent = true;
        let flow = state.request_body(
            session.req_header_mut(),
            body.as_deref(),
            end_of_stream,
            &self.callouts,
        );
        let Some(flow) = conn::unless_client_leaves(flow).await else {
            return Err(client_left(ctx));
        };
        match flow {
            // To Pingora, `None` ends the request body and an empty chunk is "nothing yet":
            // mid-body, an empty result (a held chunk, or an empty read of a chunked body)
            // must be the latter, or the upstream gets a truncated body.
            Flow::Continue if end_of_stream => *body = take_nonempty(&mut state.req_body),
            Flow::Continue => *body = Some(Bytes::from(std::mem::take(&mut state.req_body))),
            Flow::Buffer => *body = Some(Bytes::new()),
            Flow::Respond(r) => {
                return ctx.answer_from_body_phase(r, "a hook answered during the request body")
            }
        }
        // A streamed body keeps the client's Content-Length (see upstream_request_filter):
        // a hook that changes its length without removing the header in its headers
        // callback gets the request aborted rather than sent with a wrong length.
        ctx.body_out += body.as_ref().map_or(0, |b| b.len() as u64);
        if let Some(n) = ctx.upstream_length {
            if ctx.body_out > n || (end_of_stream && ctx.body_out != n) {
                ctx.error = Some(GatewayError::HookChangedLength);
                return Error::e_explain(
                    InternalError,
                    "a hook changed the length of a body whose Content-Length it kept",
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.peer_selected = true;
        let route = ctx.route.as_ref().expect("request_filter routed");
        let up = route
            .upstream
            .as_ref()
            .expect("routes without upstream answered earlier");
        let avoid = &ctx.failed_targets;
        let peer = match up.balancer.hash_key() {
            None => up.peer_avoiding(b"", avoid),
            Some(HashKey::Path) => {
                up.peer_avoiding(session.req_header().uri.path().as_bytes(), avoid)
            }
            Some(HashKey::Header(h)) => {
                let v = session.req_header().headers.get(h).map(|v| v.as_bytes());
                up.peer_avoiding(v.unwrap_or(b""), avoid)
            }
            Some(HashKey::ClientIp) => {
                // the address's octets: no text to build per request
                let ip = session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip());
                match ip {
                    Some(std::net::IpAddr::V4(v4)) => up.peer_avoiding(&v4.octets(), avoid),
                    Some(std::net::IpAddr::V6(v6)) => up.peer_avoiding(&v6.octets(), avoid),
                    None => up.peer_avoiding(b"", avoid),
                }
            }
        };
        match peer {
            Some(p) => {
                if let Some(h) = ctx.hooks.as_mut() {
                    // `upstream.address` for the response phase (the last target tried)
                    h.info.upstream_address = pingora::upstreams::peer::Peer::address(&*p)
                        .as_inet()
                        .copied();
                }
                Ok(p)
            }
            None => {
                ctx.error = Some(GatewayError::NoHealthyUpstream);
                Error::e_explain(
                    ConnectNoRoute,
                    format!("upstream `{}` has no healthy target", up.name),
                )
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let route = ctx.route.as_ref().expect("routed");
        if !upstream_request.headers.contains_key(http::header::HOST) {
            // an HTTP/1.0 client may omit Host; HTTP/1.1 upstreams need one: the
            // authority the client reached, i.e. this listener's address
            if let Some(a) = session.server_addr().and_then(|a| a.as_inet()) {
                upstream_request.insert_header(http::header::HOST, a.to_string())?;
            }
        }
        if let Some(p) = &ctx.rewritten {
            let uri = p
                .parse::<http::Uri>()
                .or_err(InternalError, "rewritten path is not a valid URI")?;
            upstream_request.set_uri(uri);
        }
        if upstream_request.version == http::Version::HTTP_2 {
            framing::keep_te_trailers(session.req_header(), upstream_request)?;
        }
        if !route.request_headers.is_empty() {
            route.request_headers.apply(upstream_request);
        }
        if let Some(b) = &ctx.prebuffered {
            // the hooks' whole body is known: its exact length
            upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
            upstream_request.insert_header(http::header::CONTENT_LENGTH, b.len())?;
        } else if ctx.hooks.is_some() {
            // Streamed through hooks: the Content-Length is kept unless a hook removed it
            // (then Pingora sends the body chunked); its length is checked as it streams.
            ctx.upstream_length = content_length(&upstream_request.headers);
            ctx.body_out = 0;
        }
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        framing::response_head(session, resp)?;
        if resp.status.is_informational() {
            return Ok(()); // interim answers are passed on as they are, not to hooks
        }
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        if let (Some(sent), Some(up)) = (ctx.upstream_sent.take(), route.upstream.as_ref()) {
            up.metrics.latency.observe(sent.elapsed().as_secs_f64());
        }
        if !route.response_headers.is_empty() {
            route.response_headers.apply(resp);
        }
        let Some(state) = ctx.hooks.as_mut() else {
            return Ok(());
        };
        let had_length = resp.headers.contains_key(http::header::CONTENT_LENGTH);
        let te_before = resp.headers.get(http::header::TRANSFER_ENCODING).cloned();
        state
            .info
            .code_details
            .get_or_insert(std::borrow::Cow::Borrowed("via_upstream"));
        // as Envoy reports it: a response that can have no body ends with its head, and
        // then no body callback follows
        let eos = framing::bodiless_response(session.req_header(), resp);
        ctx.response_ended_at_head = eos;
        let flow = state.response_headers(session.req_header(), resp, eos, true, &self.callouts);
        let Some(flow) = conn::unless_client_leaves(flow).await else {
            return Err(client_left(ctx));
        };
        framing::keep_framing(resp, te_before);
        match flow {
            Flow::Respond(r) => replace_response(session.req_header(), resp, state, r)?,
            Flow::Buffer => {
                // A module holds the head until it has seen the body. Pingora writes the
                // head when this phase ends, so the connection keeps its bytes back and
                // the head the modules settle on goes out in their place, framed as chunks
                // (the body's length is not known yet). HTTP/1.1 only.
                let h11 =
                    !session.is_http2() && session.req_header().version == http::Version::HTTP_11;
                if h11 && conn::hold_response_head() {
                    state.held_head = Some(Box::new(resp.clone()));
                    resp.remove_header(&http::header::CONTENT_LENGTH);
                    resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                    ctx.resp_framing = Framing::Chunked; // once the head is released
                    return Ok(());
                }
                if let Flow::Respond(r) = state.cannot_hold() {
                    replace_response(session.req_header(), resp, state, r)?;
                }
            }
            Flow::Continue => {}
        }
        // Like Envoy, a hook that changes the body's length removes Content-Length in its
        // headers callback; the body is then framed as chunks (HTTP/1.1).
        if let Some(b) = &state.replace_body {
            resp.insert_header(http::header::CONTENT_LENGTH, b.len())?;
        } else if had_length
            && !resp.headers.contains_key(http::header::CONTENT_LENGTH)
            && !session.is_http2()
        {
            if session.req_header().version == http::Version::HTTP_10 {
                session.set_keepalive(None); // HTTP/1.0: the close ends the body
            } else {
                resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
        }
        ctx.resp_framing = if let Some(n) = content_length(&resp.headers) {
            Framing::Length(n)
        } else if resp
            .headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"))
        {
            Framing::Chunked
        } else {
            Framing::Close
        };
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        let Some(state) = ctx.hooks.as_mut() else {
            return Ok(None);
        };
        if ctx.response_ended_at_head && state.replace_body.is_none() {
            return Ok(None); // the guests were told the response ended with its head
        }
        if let Some(r) = &state.replace_body {
            *body = if end_of_stream { Some(r.clone()) } else { None };
            return Ok(None);
        }
        let req = session.req_header();
        let mut flow = state.response_body(req, body.as_deref(), end_of_stream);
        if state.waiting_on_callouts() {
            // Callouts at the body's end: this phase cannot wait, the client connection
            // can. It writes nothing more of this response until the hooks are done.
            let gate = if session.is_http2() {
                None
            } else {
                conn::gate_response(session.response_written().is_none())
            };
            if let Some(gate) = gate {
                let state = ctx.hooks.take().expect("checked above");
                let framing = match ctx.resp_framing {
                    _ if state.held_head.is_some() => {
                        *body = None;
                        Framing::Held
                    }
                    // what is left of the length: Pingora writes a placeholder that long,
                    // the connection writes the body in its place
                    Framing::Length(left) => {
                        *body = Some(Bytes::from(vec![0; left as usize]));
                        Framing::Length(left)
                    }
                    other => {
                        *body = None;
                        other
                    }
                };
                ctx.hooks_away = Some(self.finish_response_off_phase(req, *state, framing, gate));
                return Ok(None);
            }
            flow = state.response_body_wait_here(req, &self.callouts);
        }
        if state.held_head.is_some() {
            // the head is still held: nothing has reached the client yet
            match flow {
                Flow::Buffer => *body = None,
                Flow::Continue => {
                    if let Some(head) = state.head_ready() {
                        conn::release_response_head(held_head_bytes(head));
                    }
                    *body = take_nonempty(&mut state.resp_body);
                }
                Flow::Respond(r) => {
                    // a module answers after seeing the body (a response-inspecting WAF):
                    // its answer replaces the whole response, Pingora's bytes are dropped
                    conn::replace_response(local_reply_bytes(session.req_header(), &r));
                    state.replaced_status = Some(r.status);
                    state.replace_body = Some(Bytes::new());
                    *body = None;
                }
            }
            return Ok(None);
        }
        match flow {
            Flow::Continue => *body = take_nonempty(&mut state.resp_body),
            Flow::Buffer => *body = None,
            Flow::Respond(r) => {
                // Like Envoy, a local reply once the response is under way resets the
                // stream: fail_to_proxy answers it if the head is still unsent, and
                // otherwise cuts the response off.
                let why = "a hook answered or failed during the response body";
                return ctx.answer_from_body_phase(r, why);
            }
        }
        if let Framing::Length(n) = &mut ctx.resp_framing {
            // the hooks' body must fit the length the head announced: Pingora would cut a
            // longer one short and send it as if whole
            let len = body.as_ref().map_or(0, |b| b.len() as u64);
            match n.checked_sub(len) {
                Some(left) => *n = left,
                None => {
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "the hooks' response body is longer than its Content-Length",
                    )
                }
            }
        }
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<Option<Bytes>> {
        if let Some(state) = ctx.hooks.as_mut() {
            state.response_trailers(session.req_header(), trailers);
        }
        Ok(None)
    }

    /// A connect failure is retried on a fresh connection (to the next target, since the
    /// balancer moves on) for idempotent requests, up to the upstream's `retries`.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.failed_targets
            .push(pingora::upstreams::peer::Peer::address(peer).to_string());
        let (allowed, targets) = ctx
            .route
            .as_ref()
            .and_then(|r| r.upstream.as_ref())
            .map_or((0, 0), |u| (u.retries, u.balancer.targets()));
        // a retry needs a target this request has not failed on yet
        if ctx.retries < allowed
            && targets > ctx.failed_targets.len()
            && session.req_header().method.is_idempotent()
        {
            ctx.retries += 1;
            e.set_retry(true);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if ctx.peer_selected {
            session.set_keepalive(None);
        }
        if session
            .response_written()
            .is_some_and(|r| !r.status.is_informational())
        {
            // The head is out: anything written now would read as the rest of that
            // response (an error body inside a 200, or a terminating chunk that makes a
            // truncated answer look complete). Drop the connection instead, mid-body.
            self.metrics.responses_aborted.inc();
            ctx.pending = None;
            ctx.error = ctx.error.or_else(|| GatewayError::from_pingora(e));
            match ctx.error {
                Some(kind) => tracing::warn!(
                    route = ctx.route_name().unwrap_or("-"),
                    error = kind.code(),
                    cause = %e,
                    "response aborted after its head was sent"
                ),
                // the client went away mid-response: nothing failed on this side
                None => tracing::debug!(
                    route = ctx.route_name().unwrap_or("-"),
                    cause = %e,
                    "client left during the response"
                ),
            }
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if ctx.error == Some(GatewayError::ClientClosed) {
            tracing::debug!(
                route = ctx.route_name().unwrap_or("-"),
                "client left while modules waited"
            );
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if let Some(r) = ctx.pending.take() {
            let ok = self.reply(session, ctx, r).await.is_ok();
            let status = session.response_written().map_or(0, |h| h.status.as_u16());
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: ok && !ctx.peer_selected,
            };
        }
        let kind = ctx.error.or_else(|| GatewayError::from_pingora(e));
        if let (Some(k), Some(up)) = (kind, ctx.route.as_ref().and_then(|r| r.upstream.as_ref())) {
            match k {
                GatewayError::UpstreamUnreachable | GatewayError::NoHealthyUpstream => {
                    up.metrics.refused.inc()
                }
                GatewayError::UpstreamTimeout => up.metrics.timeout.inc(),
                GatewayError::UpstreamError => up.metrics.other.inc(),
                _ => {}
            }
        }
        let Some(kind) = kind else {
            // the client went away or sent something unparseable: nothing to answer
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        ctx.error = Some(kind);
        if kind.clients_fault() {
            // a client can make as many of these as it likes: not worth an operator's eye
            tracing::debug!(route = ctx.route_name().unwrap_or("-"), error = kind.code(), cause = %e, "request refused");
        } else {
            tracing::info!(
                route = ctx.route_name().unwrap_or("-"),
                error = kind.code(),
                cause = %e,
                "request failed"
            );
        }
        let ok = self.send_error(session, ctx, kind).await.is_ok();
        FailToProxy {
            error_code: session
                .response_written()
                .map_or(kind.status(), |h| h.status.as_u16()),
            can_reuse_downstream: ok && !ctx.peer_selected && kind != GatewayError::ClientTimeout,
        }
    }

    /// Every failed request is logged once by `fail_to_proxy`, at a level that fits who
    /// caused it; Pingora's own ERROR line would repeat it (and let clients fill the log).
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        conn::request_done();
        if let Some(away) = ctx.hooks_away.take() {
            ctx.hooks = away.await.ok().map(Box::new);
        }
        let status = ctx
            .hooks
            .as_ref()
            .and_then(|h| h.replaced_status)
            .or(session.response_written().map(|r| r.status.as_u16()))
            .or(ctx.error.map(|e| e.status()))
            .unwrap_or(0);
        let mut details = None;
        if let Some(state) = ctx.hooks.as_mut() {
            let sent = session.body_bytes_sent() as u64;
            let info = &mut state.info;
            info.response_body_bytes = sent;
            info.response_header_bytes = session
                .response_written()
                .map(crate::wasm::host::response_head_bytes);
            if let Some(e) = ctx.error {
                e.mark(info);
            }
            let resp = session.response_written();
            state.finish(session.req_header(), resp, status, ctx.body_seen, sent);
            details = state.info.code_details.take();
        }
        if let Some(r) = &ctx.route {
            r.metrics.record(status);
        } else if let Some(e) = ctx.error {
            self.metrics.unrouted.record(e.status());
        }
        if ctx.counted {
            self.metrics.inflight.dec();
        }
        if let Some(log) = &self.access_log {
            log.record(
                session,
                ctx.route_name(),
                status,
                ctx.start.elapsed(),
                ctx.error.map(|e| e.code()),
                details.as_deref().filter(|d| *d != "via_upstream"),
            );
        }
    }
}

/// Ends a request whose client left while its modules waited on callouts (see
/// [`conn::unless_client_leaves`]): nothing is answered, and the access log says why.
fn client_left(ctx: &mut Ctx) -> Box<Error> {
    ctx.error = Some(GatewayError::ClientClosed);
    Error::explain(
        ErrorType::ConnectionClosed,
        "the client left while modules waited",
    )
}

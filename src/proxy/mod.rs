//! The one `ProxyHttp` implementation. Each phase loads what it needs from the request's
//! CTX and delegates: routing to [`crate::routing`], hooks to [`hooks`], error answers to
//! [`respond`]. The conf snapshot is loaded once per request, in `request_filter`, and the
//! request keeps it to the end, so a reload never changes a request midway.

pub mod access_log;
pub mod conn;
pub mod hooks;
pub mod respond;

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

pub struct Gateway {
    pub live: Arc<Live>,
    /// Tenants' function URLs and limits (when the admin API is on).
    pub control: Option<Arc<crate::control::Control>>,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<AccessLog>,
    callouts: Callouts,
}

impl Gateway {
    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>, access_log: Option<AccessLog>) -> Gateway {
        Gateway {
            live,
            control: None,
            metrics,
            access_log,
            callouts: Callouts::default(),
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
    /// A slot under the tenant's `max_concurrency`, held for the request's life.
    _tenant_slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Ctx {
    fn route_name(&self) -> Option<&str> {
        self.route.as_ref().map(|r| &*r.name)
    }
}

fn host_of(session: &Session) -> &str {
    let req = session.req_header();
    let raw = req
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.host())
        .unwrap_or("");
    // strip the port, keeping IPv6 literals whole
    match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    }
}

fn request_info(session: &Session, route: &Route) -> RequestInfo {
    let tls = session
        .digest()
        .map(|d| d.ssl_digest.is_some())
        .unwrap_or(false);
    RequestInfo {
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
    }
}

/// 431 when the request head is over the conf's size or count limits.
fn over_header_limits(
    session: &Session,
    l: &crate::config::file::LimitsSection,
) -> Option<GatewayError> {
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

/// The buffered body as the next chunk; `None` when empty, so Pingora never writes an
/// empty chunk after the end of a body.
fn take_nonempty(buf: &mut Vec<u8>) -> Option<Bytes> {
    if buf.is_empty() {
        None
    } else {
        Some(Bytes::from(std::mem::take(buf)))
    }
}

async fn send_local(session: &mut Session, r: LocalResponse) -> Result<()> {
    respond::send(session, r.status, &r.headers, None, Bytes::from(r.body)).await
}

impl Gateway {
    async fn answer_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: GatewayError,
    ) -> Result<bool> {
        ctx.error = Some(e);
        respond::send_error(session, e, ctx.route_name()).await?;
        Ok(true)
    }

    /// The rest of `request_filter` once a route is chosen: body limit, then hooks.
    async fn routed(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: Arc<Route>,
    ) -> Result<bool> {
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
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
            return self.run_request_hooks(session, ctx, chain).await;
        }
        Ok(false)
    }

    /// Function URLs (`{function_prefix}/{tenant}/{function}/...` or by host): tenant rate and concurrency
    /// limits, then the function's route. `None` when the request is not for a function.
    async fn function_request(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Option<bool>> {
        use crate::control::FnLookup;
        let Some(control) = &self.control else {
            return Ok(None);
        };
        let f = match control.function_for(host_of(session), session.req_header().uri.path()) {
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
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            ctx.error = Some(GatewayError::RateLimited);
            let h = [("retry-after".to_string(), secs.to_string().into_bytes())];
            respond::send_error_with(session, GatewayError::RateLimited, ctx.route_name(), &h)
                .await?;
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
                    let h = [("retry-after".to_string(), b"1".to_vec())];
                    respond::send_error_with(
                        session,
                        GatewayError::TenantBusy,
                        ctx.route_name(),
                        &h,
                    )
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
            .map(|rw| rw.apply(req.uri.path(), req.uri.query(), &[]))
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
    ) -> Result<bool> {
        let route = ctx.route.clone().expect("route set");
        let info = request_info(session, &route);
        let mut state = match HookState::start(chain, info).await {
            Ok(s) => s,
            Err(_) => {
                send_local(session, hooks::busy_response(&route.name)).await?;
                return Ok(true);
            }
        };
        let eos = session.is_body_empty();
        let flow = state
            .request_headers(session.req_header_mut(), eos, &self.callouts)
            .await;
        if let Flow::Respond(r) = flow {
            ctx.hooks = Some(Box::new(state));
            send_local(session, r).await?;
            return Ok(true);
        }
        if route.upstream.is_none() && !eos {
            loop {
                let chunk = session.read_request_body().await?;
                let end = chunk.is_none();
                if let Some(c) = &chunk {
                    ctx.body_seen += c.len() as u64;
                    if ctx.body_seen > route.max_request_body {
                        ctx.hooks = Some(Box::new(state));
                        return self
                            .answer_error(session, ctx, GatewayError::BodyTooLarge)
                            .await;
                    }
                }
                match state.request_body(session.req_header_mut(), chunk.as_deref(), end) {
                    Flow::Respond(r) => {
                        ctx.hooks = Some(Box::new(state));
                        send_local(session, r).await?;
                        return Ok(true);
                    }
                    Flow::Continue | Flow::Buffer if end => break,
                    _ => {}
                }
            }
        }
        ctx.hooks = Some(Box::new(state));
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
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        conn::head_received();
        self.metrics.inflight.inc();
        ctx.counted = true;
        // the one snapshot load of the request
        let snap = self.live.load();
        if let Some(e) = over_header_limits(session, &snap.limits) {
            return self.answer_error(session, ctx, e).await;
        }
        let max_conns = snap.limits.max_connections;
        if max_conns > 0 && self.metrics.connections.get() > max_conns as i64 {
            // shed load: answer, and close this connection to make room
            session.set_keepalive(None);
            return self
                .answer_error(session, ctx, GatewayError::TooManyConnections)
                .await;
        }
        let keepalive = snap.limits.client_keepalive_timeout_secs;
        if keepalive != crate::config::file::DEFAULT_KEEPALIVE_SECS {
            // idle time allowed before the next request (0: none, close after this one)
            session.set_keepalive((keepalive > 0).then_some(keepalive));
        }
        // a slow client must not hold the request: each body read has a deadline (408)
        session.set_read_timeout(Some(Duration::from_millis(
            *snap.limits.client_body_timeout_ms.get_ref(),
        )));
        if let Some(done) = self.function_request(session, ctx).await? {
            return Ok(done);
        }
        let found = {
            let req = session.req_header();
            snap.router
                .find(host_of(session), req.uri.path(), &req.method)
                .map(|m| {
                    let route = snap.routes[m.route].clone();
                    let rewritten = route
                        .rewrite
                        .as_ref()
                        .map(|rw| rw.apply(req.uri.path(), req.uri.query(), &m.params));
                    (route, rewritten)
                })
        };
        ctx.snapshot = Some(snap);
        let (route, rewritten) = match found {
            Ok(x) => x,
            Err(crate::routing::Miss::NoRoute) => {
                return self.answer_error(session, ctx, GatewayError::NoRoute).await
            }
            Err(crate::routing::Miss::MethodNotAllowed) => {
                return self
                    .answer_error(session, ctx, GatewayError::MethodNotAllowed)
                    .await
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
        if ctx.body_seen == 0 && end_of_stream {
            return Ok(()); // no body at all: like Envoy, no body callback
        }
        match state.request_body(session.req_header_mut(), body.as_deref(), end_of_stream) {
            Flow::Continue => {
                *body = take_nonempty(&mut state.req_body);
                Ok(())
            }
            Flow::Buffer => {
                *body = None;
                Ok(())
            }
            Flow::Respond(r) => {
                let status = r.status;
                ctx.pending = Some(r);
                Error::e_explain(
                    HTTPStatus(status),
                    "a hook answered during the request body",
                )
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.peer_selected = true;
        let route = ctx.route.as_ref().expect("request_filter routed");
        let up = route
            .upstream
            .as_ref()
            .expect("routes without upstream answered earlier");
        let avoid = &ctx.failed_targets;
        let peer = match &up.hash_key {
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
            Some(p) => Ok(p),
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
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let route = ctx.route.as_ref().expect("routed");
        if let Some(p) = &ctx.rewritten {
            let uri = p
                .parse::<http::Uri>()
                .or_err(InternalError, "rewritten path is not a valid URI")?;
            upstream_request.set_uri(uri);
        }
        if !route.request_headers.is_empty() {
            route.request_headers.apply(upstream_request);
        }
        let has_body = upstream_request
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
            || upstream_request
                .headers
                .contains_key(http::header::TRANSFER_ENCODING);
        if ctx.hooks.is_some() && has_body {
            // hooks may change the body's length: Pingora frames it as chunks instead
            upstream_request.remove_header(&http::header::CONTENT_LENGTH);
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
        match state.response_headers(session.req_header(), resp) {
            Flow::Respond(r) => {
                let mut new = ResponseHeader::build(r.status, Some(r.headers.len() + 1))?;
                for (k, v) in &r.headers {
                    new.append_header(k.to_ascii_lowercase(), v.as_slice())?;
                }
                *resp = new;
                state.replace_body = Some(Bytes::from(r.body));
            }
            Flow::Continue | Flow::Buffer => {}
        }
        // Like Envoy, a hook that changes the body's length removes Content-Length in its
        // headers callback; the body is then framed as chunks (HTTP/1.1).
        if let Some(b) = &state.replace_body {
            resp.insert_header(http::header::CONTENT_LENGTH, b.len())?;
        } else if had_length
            && !resp.headers.contains_key(http::header::CONTENT_LENGTH)
            && !session.is_http2()
        {
            resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
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
        if let Some(r) = &state.replace_body {
            *body = if end_of_stream { Some(r.clone()) } else { None };
            return Ok(None);
        }
        match state.response_body(session.req_header(), body.as_deref(), end_of_stream) {
            Flow::Continue => *body = take_nonempty(&mut state.resp_body),
            Flow::Buffer => *body = None,
            Flow::Respond(r) => {
                // headers are gone already: the local body replaces the rest
                *body = Some(Bytes::from(r.body));
                state.replace_body = Some(Bytes::new());
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
            .map_or((0, 0), |u| (u.retries, u.targets.len()));
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
        if let Some(r) = ctx.pending.take() {
            let status = r.status;
            let ok = send_local(session, r).await.is_ok();
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
        tracing::info!(
            route = ctx.route_name().unwrap_or("-"),
            error = kind.code(),
            cause = %e,
            "request failed"
        );
        let ok = respond::send_error(session, kind, ctx.route_name())
            .await
            .is_ok();
        FailToProxy {
            error_code: kind.status(),
            can_reuse_downstream: ok && !ctx.peer_selected && kind != GatewayError::ClientTimeout,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        conn::request_done();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.error.map(|e| e.status()))
            .unwrap_or(0);
        if let Some(state) = ctx.hooks.as_mut() {
            let sent = session.body_bytes_sent() as u64;
            state.finish(session.req_header(), status, ctx.body_seen, sent);
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
            );
        }
    }
}

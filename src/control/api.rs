//! The admin API: JSON over HTTP/1.1 (hyper) on its own listener (loopback by default), one
//! request per connection. A client has 10 s to send its request head and 60 s for its
//! body; heads are limited to 16 KiB (431 beyond), bodies to 64 MiB (413). Every call needs `Authorization: Bearer <token>`: the operator
//! token (conf `[admin] token` or the env var named by `token_env`) can do everything; a
//! tenant token (a JWT this gateway issued) only what its `ops` allow, on its own tenant.
//! Missing, invalid, expired or revoked tokens get 401; a token without the right get 403.
//! Every action is logged with who did it (never the token).
//!
//! | method | path | who |
//! | --- | --- | --- |
//! | GET | /v1/tenants | operator |
//! | POST | /v1/tenants `{"name", "limits": {max_budget_us, max_memory_mb, max_module_bytes, rate_per_sec, burst, max_concurrency, allowed_upstreams}}` | operator |
//! | GET | /v1/tenants/{t} | operator, tenant (any op) |
//! | PATCH | /v1/tenants/{t} `{"rate_per_sec": 50, "burst": null, ...}` (given limits replace, null clears) | operator |
//! | DELETE | /v1/tenants/{t} | operator |
//! | POST | /v1/tenants/{t}/tokens `{"ops": ["deploy","logs","usage"], "ttl_secs": 3600}` | operator |
//! | DELETE | /v1/tokens/{jti} (revoke) | operator |
//! | GET | /v1/tenants/{t}/modules | deploy |
//! | PUT | /v1/tenants/{t}/modules/{m}?config=…&budget_us=…&memory_mb=…&requests_per_instance=… (body: the wasm bytes) | deploy |
//! | GET | /v1/tenants/{t}/modules/{m} (versions: digest, size, upload time, exports, compile time) | deploy |
//! | POST | /v1/tenants/{t}/modules/{m}/activate `{"version": N}` | deploy |
//! | POST | /v1/tenants/{t}/modules/{m}/rollback | deploy |
//! | DELETE | /v1/tenants/{t}/modules/{m} | deploy |
//! | GET | /v1/tenants/{t}/functions | deploy |
//! | PUT | /v1/tenants/{t}/functions/{f} `{"module": m, "upstream": optional}` | deploy |
//! | DELETE | /v1/tenants/{t}/functions/{f} | deploy |
//! | GET | /v1/tenants/{t}/routes (modules attached to the tenant's conf routes) | deploy |
//! | PUT | /v1/tenants/{t}/routes/{route} `{"modules": [m, ...]}` (route has `tenant = "t"` in the conf) | deploy |
//! | GET | /v1/tenants/{t}/usage?from=&to= (unix seconds) | usage |
//! | GET | /v1/tenants/{t}/logs[?follow=true] (server-sent events when following) | logs |
//! | GET | /v1/tenants/{t}/kv?prefix=&after=&limit= (keys, bytes stored) | kv |
//! | GET | /v1/tenants/{t}/kv/{key} (`value` or `value_base64`, `version`) | kv |
//! | PUT | /v1/tenants/{t}/kv/{key}?version=N&ttl_ms=M (body: the value; `version` makes it a compare-and-swap, 0: only if absent; 409 on a conflict) | kv |
//! | DELETE | /v1/tenants/{t}/kv/{key}?version=N | kv |
//! | GET | /v1/tenants/{t}/secrets (names and update times, never values) | secrets |
//! | PUT | /v1/tenants/{t}/secrets/{name} (body: the value) | secrets |
//! | DELETE | /v1/tenants/{t}/secrets/{name} | secrets |
//! | POST | /v1/secrets/rotate-key (a new key; every secret re-sealed) | operator |
//! | GET | /v1/cluster (this node's cluster state and every node heard from) | operator |
//!
//! A key or secret name with `/` in it is sent percent-encoded (`%2F`).

use super::token::{self, Claims};
use super::{ApiError, ApiResult, Control, DeployOpts, FunctionRec};
use crate::tenant::TenantLimits;
use crate::wasm::meter::now_secs;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 << 10;
/// Largest request body (a module upload); a tenant's `max_module_bytes` is checked after.
const MAX_BODY: usize = 64 << 20;
/// A client has this long to send its request head, then the connection is closed.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// And this long for the whole body, then it gets 408.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct AdminService {
    pub control: Arc<Control>,
    pub listen: String,
}

#[async_trait::async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let l = match TcpListener::bind(&self.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("admin API cannot listen on {}: {e}", self.listen);
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Ok((sock, _)) = l.accept() => {
                    let c = self.control.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        let ended = shutdown_signal(stop.clone());
                        let svc = hyper::service::service_fn(move |req| {
                            let (c, stop) = (c.clone(), stop.clone());
                            async move { Ok::<_, Infallible>(serve(c, req, stop).await) }
                        });
                        connection(sock, HEAD_TIMEOUT, svc, ended).await;
                    });
                }
            }
        }
    }
}

async fn shutdown_signal(mut stop: ShutdownWatch) {
    let _ = stop.changed().await;
}

/// One client connection: HTTP/1.1, one request (no keep-alive), the head within
/// `head_timeout`. On shutdown, a request in progress finishes (a log stream ends).
async fn connection<S>(
    sock: TcpStream,
    head_timeout: Duration,
    svc: S,
    stop: impl std::future::Future<Output = ()>,
) where
    S: hyper::service::Service<
        hyper::Request<Incoming>,
        Response = hyper::Response<Body>,
        Error = Infallible,
    >,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    auth: Option<String>,
    body: Vec<u8>,
}

enum Resp {
    Json(u16, serde_json::Value),
    Follow(Arc<crate::wasm::meter::TenantLog>),
}

fn err_json(e: &ApiError) -> Resp {
    Resp::Json(
        e.status,
        serde_json::json!({ "error": e.code, "reason": e.reason }),
    )
}

async fn serve(
    c: Arc<Control>,
    req: hyper::Request<Incoming>,
    shutdown: ShutdownWatch,
) -> hyper::Response<Body> {
    let req = match read_request(req, MAX_BODY, BODY_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => return json_response(&err_json(&e)),
    };
    let (method, path) = (req.method.clone(), req.path.clone());
    let who_label;
    let resp = match authenticate(&c, req.auth.as_deref()) {
        Err(e) => {
            who_label = "anonymous".to_string();
            err_json(&e)
        }
        Ok(who) => {
            who_label = who.label();
            match dispatch(&c, &who, req).await {
                Ok(r) => r,
                Err(e) => err_json(&e),
            }
        }
    };
    let status = match &resp {
        Resp::Json(s, _) => *s,
        Resp::Follow(_) => 200,
    };
    tracing::info!(target: "wasmgate::admin", who = %who_label, method = %method, path = %path, status, "admin request");
    match resp {
        Resp::Json(..) => json_response(&resp),
        Resp::Follow(log) => follow(log, shutdown),
    }
}

fn json_response(r: &Resp) -> hyper::Response<Body> {
    let (status, body) = match r {
        Resp::Json(status, v) => (*status, v.to_string()),
        Resp::Follow(_) => (500, String::new()),
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Server-sent events: the recent lines, then new ones as they come, like `tail -f`.
/// A follower that falls behind loses lines (reported as a comment), never the gateway.
/// The stream ends when the gateway shuts down.
fn follow(
    log: Arc<crate::wasm::meter::TenantLog>,
    shutdown: ShutdownWatch,
) -> hyper::Response<Body> {
    use futures::StreamExt;
    let rx = log.follow();
    let recent: String = log
        .recent()
        .iter()
        .map(|line| format!("data: {line}\n\n"))
        .collect();
    let first = futures::stream::iter((!recent.is_empty()).then_some(recent));
    let next = futures::stream::unfold(
        (rx, log, shutdown),
        |(mut rx, log, mut shutdown)| async move {
            let chunk = tokio::select! {
                _ = shutdown.changed() => return None,
                m = rx.recv() => match m {
                    Ok(line) => format!("data: {line}\n\n"),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        log.dropped.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        format!(": dropped {n} lines\n\n")
                    }
                    Err(_) => return None,
                }
            };
            Some((chunk, (rx, log, shutdown)))
        },
    );
    let frames = first
        .chain(next)
        .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))));
    let mut resp = hyper::Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The request with its whole body: at most `max_body` bytes (413), within `timeout` (408).
async fn read_request(
    req: hyper::Request<Incoming>,
    max_body: usize,
    timeout: Duration,
) -> Result<Req, ApiError> {
    let (parts, body) = req.into_parts();
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("bodies are limited to {max_body} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if declared > max_body as u64 {
        return Err(too_large());
    }
    let body = match tokio::time::timeout(timeout, Limited::new(body, max_body).collect()).await {
        Ok(Ok(b)) => b.to_bytes().to_vec(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => return Err(ApiError::new(400, "bad_request", e.to_string())),
        Err(_) => {
            return Err(ApiError::new(
                408,
                "request_timeout",
                format!("the body must arrive within {} s", timeout.as_secs()),
            ))
        }
    };
    let query = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    Ok(Req {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query,
        auth: parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body,
    })
}

enum Who {
    Operator,
    Tenant(Claims),
}

impl Who {
    fn label(&self) -> String {
        match self {
            Who::Operator => "operator".into(),
            Who::Tenant(c) => format!("tenant:{}:{}", c.sub, c.jti),
        }
    }
}

fn authenticate(c: &Control, auth: Option<&str>) -> ApiResult<Who> {
    let unauthorized = |why: &str| ApiError::new(401, "unauthorized", why.to_string());
    let t = auth
        .and_then(|a| a.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("missing bearer token"))?
        .trim();
    if let Some(op) = &c.operator_token {
        if token::same(t, op) {
            return Ok(Who::Operator);
        }
    }
    let claims = token::verify(&c.secret, t, now_secs()).map_err(unauthorized)?;
    if c.is_revoked(&claims.jti) {
        return Err(unauthorized("token revoked"));
    }
    Ok(Who::Tenant(claims))
}

fn operator(who: &Who) -> ApiResult<()> {
    match who {
        Who::Operator => Ok(()),
        Who::Tenant(_) => Err(ApiError::new(
            403,
            "forbidden",
            "this needs the operator token",
        )),
    }
}

/// A tenant token may act on its own tenant, for the operations it carries.
fn allowed(who: &Who, tenant: &str, op: Option<&str>) -> ApiResult<()> {
    match who {
        Who::Operator => Ok(()),
        Who::Tenant(c) if c.sub != tenant => Err(ApiError::new(
            403,
            "forbidden",
            format!("this token is for tenant `{}`", c.sub),
        )),
        Who::Tenant(c) => match op {
            Some(op) if !c.ops.iter().any(|o| o == op) => Err(ApiError::new(
                403,
                "forbidden",
                format!("this token does not allow `{op}`"),
            )),
            _ => Ok(()),
        },
    }
}

fn json_body<T: for<'de> Deserialize<'de>>(b: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(b).map_err(|e| ApiError::new(400, "bad_json", e.to_string()))
}

fn exists(c: &Control, t: &str) -> ApiResult<()> {
    if c.tenant_exists(t) {
        Ok(())
    } else {
        Err(ApiError::new(
            404,
            "not_found",
            format!("tenant `{t}` does not exist"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    #[serde(default)]
    limits: TenantLimits,
}

/// `PUT …/functions/NAME`: the module that answers, and the upstream it guards.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bind {
    module: String,
    upstream: Option<String>,
}

impl From<Bind> for FunctionRec {
    fn from(b: Bind) -> FunctionRec {
        FunctionRec {
            module: b.module,
            upstream: b.upstream,
        }
    }
}

/// `PUT …/routes/NAME`: the tenant's modules to run after the route's own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    modules: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    ops: Vec<String>,
    #[serde(default = "default_ttl")]
    ttl_secs: u64,
}

fn default_ttl() -> u64 {
    3600
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Activate {
    version: u32,
}

async fn dispatch(c: &Arc<Control>, who: &Who, req: Req) -> ApiResult<Resp> {
    // a segment that is not UTF-8 once decoded is refused: decoding it lossily would make
    // two different keys (`%FE`, `%FF`) the same one
    let segs: Vec<String> = req
        .path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| ApiError::new(400, "bad_path", "a path segment is not UTF-8"))
        })
        .collect::<ApiResult<_>>()?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let ok = |v: serde_json::Value| Ok(Resp::Json(200, v));
    let by = who.label();
    if let ["v1", "tenants", t, resource, ..] = segs.as_slice() {
        // everything under a tenant: the operator, or a token of that tenant carrying the
        // operation the resource names (tokens are the operator's alone)
        match *resource {
            "tokens" => operator(who)?,
            "modules" | "functions" | "routes" => allowed(who, t, Some("deploy"))?,
            op => allowed(who, t, Some(op))?,
        }
        exists(c, t)?;
    }
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["v1", "cluster"]) => {
            operator(who)?;
            ok(c.cluster_status().await?)
        }
        ("GET", ["v1", "tenants"]) => {
            operator(who)?;
            ok(c.list_tenants())
        }
        ("POST", ["v1", "tenants"]) => {
            operator(who)?;
            let n: NewTenant = json_body(&req.body)?;
            c.create_tenant(&n.name, n.limits)?;
            Ok(Resp::Json(201, c.tenant_view(&n.name)?))
        }
        ("GET", ["v1", "tenants", t]) => {
            allowed(who, t, None)?;
            ok(c.tenant_view(t)?)
        }
        ("PATCH", ["v1", "tenants", t]) => {
            operator(who)?;
            let patch: serde_json::Value = json_body(&req.body)?;
            c.update_tenant(t, patch)?;
            ok(c.tenant_view(t)?)
        }
        ("DELETE", ["v1", "tenants", t]) => {
            operator(who)?;
            c.delete_tenant(t)?;
            ok(serde_json::json!({ "deleted": t }))
        }
        ("POST", ["v1", "tenants", t, "tokens"]) => {
            let n: NewToken = json_body(&req.body)?;
            if n.ops.is_empty() || n.ops.iter().any(|o| !token::OPS.contains(&o.as_str())) {
                return Err(ApiError::new(
                    400,
                    "bad_ops",
                    format!("ops must be a non-empty subset of {:?}", token::OPS),
                ));
            }
            let claims = Claims {
                sub: t.to_string(),
                ops: n.ops,
                exp: now_secs() + n.ttl_secs.max(1),
                jti: new_jti(),
            };
            let tok = token::sign(&c.secret, &claims);
            tracing::info!(target: "wasmgate::admin", who = %by, tenant = %t, jti = %claims.jti, "token issued");
            Ok(Resp::Json(
                201,
                serde_json::json!({ "token": tok, "jti": claims.jti, "exp": claims.exp, "ops": claims.ops }),
            ))
        }
        ("DELETE", ["v1", "tokens", jti]) => {
            operator(who)?;
            c.revoke(jti)?;
            ok(serde_json::json!({ "revoked": jti }))
        }
        ("GET", ["v1", "tenants", t, "modules"]) => ok(serde_json::json!(c.modules_view(t))),
        ("PUT", ["v1", "tenants", t, "modules", m]) => {
            let num = |k: &str| query_num(&req, k);
            let opts = DeployOpts {
                config: req.query.get("config").cloned().unwrap_or_default(),
                budget_us: num("budget_us")?,
                memory_mb: num("memory_mb")?,
                requests_per_instance: num("requests_per_instance")?
                    .map(|n: u64| u32::try_from(n).unwrap_or(u32::MAX)),
            };
            let (c2, t2, m2) = (c.clone(), t.to_string(), m.to_string());
            let v = tokio::task::spawn_blocking(move || c2.deploy(&t2, &m2, &req.body, opts, &by))
                .await
                .map_err(|e| ApiError::new(500, "internal", e.to_string()))??;
            Ok(Resp::Json(201, serde_json::to_value(v).unwrap_or_default()))
        }
        ("GET", ["v1", "tenants", t, "modules", m]) => ok(serde_json::json!(c.module_view(t, m)?)),
        ("POST", ["v1", "tenants", t, "modules", m, action @ ("activate" | "rollback")]) => {
            let version = if *action == "activate" {
                Some(json_body::<Activate>(&req.body)?.version)
            } else {
                None
            };
            let (c2, t2, m2) = (c.clone(), t.to_string(), m.to_string());
            let v = tokio::task::spawn_blocking(move || c2.activate(&t2, &m2, version, &by))
                .await
                .map_err(|e| ApiError::new(500, "internal", e.to_string()))??;
            ok(serde_json::json!({ "active": v }))
        }
        ("DELETE", ["v1", "tenants", t, "modules", m]) => {
            c.delete_module(t, m, &by)?;
            ok(serde_json::json!({ "deleted": m }))
        }
        ("GET", ["v1", "tenants", t, "functions"]) => ok(serde_json::json!(c.functions_view(t))),
        ("PUT", ["v1", "tenants", t, "functions", f]) => {
            c.bind(t, f, json_body::<Bind>(&req.body)?.into(), &by)?;
            ok(serde_json::json!({ "bound": c.function_url(t, f) }))
        }
        ("DELETE", ["v1", "tenants", t, "functions", f]) => {
            c.unbind(t, f, &by)?;
            ok(serde_json::json!({ "unbound": f }))
        }
        ("GET", ["v1", "tenants", t, "routes"]) => ok(serde_json::json!(c.route_hooks_view(t))),
        ("PUT", ["v1", "tenants", t, "routes", r]) => {
            let a: Attach = json_body(&req.body)?;
            c.attach(t, r, a.modules, &by)?;
            ok(serde_json::json!({ "route": r, "attached": c.route_hooks_view(t).get(*r) }))
        }
        ("GET", ["v1", "tenants", t, "usage"]) => {
            let n = |k: &str, d: u64| req.query.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
            ok(c.usage_now(t, n("from", 0), n("to", u64::MAX)).await)
        }
        ("GET", ["v1", "tenants", t, "kv"]) => {
            let q = |k: &str| req.query.get(k).map(String::as_str);
            let limit = match query_num(&req, "limit")? {
                None => 100,
                Some(n @ 1..=999) => n as usize,
                Some(_) => {
                    return Err(ApiError::new(400, "bad_query", "`limit` is 1 to 999"));
                }
            };
            ok(c.kv_list(t, q("prefix").unwrap_or(""), q("after"), limit)
                .await?)
        }
        ("GET", ["v1", "tenants", t, "kv", key]) => {
            let v = c.kv_get(t, key).await?;
            if v["found"] == false {
                return Err(ApiError::new(
                    404,
                    "not_found",
                    format!("`{key}` is not set"),
                ));
            }
            ok(v)
        }
        ("PUT", ["v1", "tenants", t, "kv", key]) => {
            let version = query_num(&req, "version")?;
            let ttl = query_num(&req, "ttl_ms")?.map(Duration::from_millis);
            ok(c.kv_put(t, key, req.body.clone(), version, ttl, &by)
                .await?)
        }
        ("DELETE", ["v1", "tenants", t, "kv", key]) => ok(c
            .kv_delete(t, key, query_num(&req, "version")?, &by)
            .await?),
        ("GET", ["v1", "tenants", t, "secrets"]) => ok(c.secret_list(t).await?),
        ("PUT", ["v1", "tenants", t, "secrets", name]) => {
            ok(c.secret_set(t, name, &req.body, &by).await?)
        }
        ("DELETE", ["v1", "tenants", t, "secrets", name]) => {
            ok(c.secret_delete(t, name, &by).await?)
        }
        ("POST", ["v1", "secrets", "rotate-key"]) => {
            operator(who)?;
            ok(c.rotate_secret_key(&by).await?)
        }
        ("GET", ["v1", "tenants", t, "logs"]) => {
            let log = c.log(t);
            if req
                .query
                .get("follow")
                .is_some_and(|v| v == "true" || v == "1")
            {
                Ok(Resp::Follow(log))
            } else {
                ok(serde_json::json!(log.recent()))
            }
        }
        _ => Err(ApiError::new(
            404,
            "not_found",
            format!("no endpoint {} {}", req.method, req.path),
        )),
    }
}

/// A numeric query parameter, if given; 400 when it is not a number.
fn query_num(req: &Req, key: &str) -> ApiResult<Option<u64>> {
    match req.query.get(key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::new(400, "bad_query", format!("`{key}` must be a whole number"))
        }),
    }
}

fn new_jti() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 12];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that reads every request as the admin API does and answers its body size.
    async fn server(head: Duration, body: Duration, max_body: usize) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (sock, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| async move {
                        Ok::<_, Infallible>(match read_request(req, max_body, body).await {
                            Ok(r) => json_response(&Resp::Json(
                                200,
                                serde_json::json!({ "len": r.body.len(), "path": r.path }),
                            )),
                            Err(e) => json_response(&err_json(&e)),
                        })
                    });
                    connection(sock, head, svc, std::future::pending()).await;
                });
            }
        });
        addr
    }

    /// What the server sends until it closes the connection (`None`: reset).
    async fn answer(s: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("the server must close the connection");
        r.ok().map(|_| String::from_utf8_lossy(&buf).into_owned())
    }

    async fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        answer(&mut s).await.expect("an answer, not a reset")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_client_is_cut_off_while_others_are_served() {
        let addr = server(Duration::from_millis(600), Duration::from_secs(5), 1000).await;
        let t = Instant::now();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /v1/tenants HTTP/1.1\r\nhost: x\r\nauthor")
            .await
            .unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            let a = exchange(addr, b"GET /v1/x%20y?a=1 HTTP/1.1\r\nhost: x\r\n\r\n").await;
            assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
            assert!(a.contains("connection: close\r\n"), "{a}");
            assert!(a.contains("content-type: application/json\r\n"), "{a}");
            assert!(a.ends_with(r#"{"len":0,"path":"/v1/x%20y"}"#), "{a}");
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "served while others stall"
        );
        for s in [&mut half, &mut silent] {
            let a = answer(s).await.unwrap_or_default();
            assert!(!a.contains("200"), "{a}");
            let waited = t.elapsed();
            assert!(
                waited >= Duration::from_millis(550) && waited < Duration::from_secs(3),
                "{waited:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_are_limited_in_size_and_time() {
        let addr = server(Duration::from_secs(5), Duration::from_millis(500), 1000).await;
        let a = exchange(
            addr,
            b"PUT /m HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
        )
        .await;
        assert!(a.ends_with(r#"{"len":5,"path":"/m"}"#), "{a}");
        // declared too large: refused before reading
        let a = exchange(
            addr,
            b"PUT /m HTTP/1.1\r\nhost: x\r\ncontent-length: 1001\r\n\r\n",
        )
        .await;
        assert!(a.starts_with("HTTP/1.1 413 Payload Too Large\r\n"), "{a}");
        assert!(
            a.ends_with(
                r#"{"error":"body_too_large","reason":"bodies are limited to 1000 bytes"}"#
            ),
            "{a}"
        );
        // chunked and too large: refused once over
        let mut req = b"PUT /m HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            req.extend_from_slice(b"190\r\n");
            req.extend_from_slice(&[b'a'; 400]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let a = exchange(addr, &req).await;
        assert!(a.starts_with("HTTP/1.1 413 "), "{a}");
        assert!(a.contains(r#""error":"body_too_large""#), "{a}");
        // a body that stops coming: 408 after the body timeout
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PUT /m HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let a = answer(&mut s).await.unwrap_or_default();
        assert!(a.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{a}");
        assert!(a.contains(r#""error":"request_timeout""#), "{a}");
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
        // an oversized head
        let mut req = b"GET /m HTTP/1.1\r\nhost: x\r\n".to_vec();
        for i in 0..400 {
            req.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&req).await;
        let a = answer(&mut s).await.unwrap_or_default();
        assert!(a.starts_with("HTTP/1.1 431 "), "{a}");
    }
}

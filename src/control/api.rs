//! The admin API: JSON over HTTP/1.1 on its own listener (loopback by default), one
//! request per connection. Every call needs `Authorization: Bearer <token>`: the operator
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
//! | PUT | /v1/tenants/{t}/modules/{m}?config=…&budget_us=…&memory_mb=… (body: the wasm bytes) | deploy |
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

use super::token::{self, Claims};
use super::{ApiError, ApiResult, Control, DeployOpts, FunctionRec};
use crate::config::file::TenantFile;
use crate::wasm::meter::now_secs;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 64 << 20;

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
                        let _ = serve(c, sock, stop).await;
                    });
                }
            }
        }
    }
}

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
    mut sock: TcpStream,
    shutdown: ShutdownWatch,
) -> std::io::Result<()> {
    let req = match read_request(&mut sock).await? {
        Ok(r) => r,
        Err(e) => return write_json(&mut sock, &err_json(&e)).await,
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
        Resp::Json(..) => write_json(&mut sock, &resp).await,
        Resp::Follow(log) => follow(&mut sock, log, shutdown).await,
    }
}

async fn write_json(sock: &mut TcpStream, r: &Resp) -> std::io::Result<()> {
    let Resp::Json(status, v) = r else {
        return Ok(());
    };
    let body = v.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        http::StatusCode::from_u16(*status).ok().and_then(|s| s.canonical_reason()).unwrap_or(""),
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// Server-sent events: the recent lines, then new ones as they come, like `tail -f`.
/// A follower that falls behind loses lines (reported as a comment), never the gateway.
async fn follow(
    sock: &mut TcpStream,
    log: Arc<crate::wasm::meter::TenantLog>,
    mut shutdown: ShutdownWatch,
) -> std::io::Result<()> {
    let mut rx = log.follow();
    sock.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n",
    )
    .await?;
    for line in log.recent() {
        sock.write_all(format!("data: {line}\n\n").as_bytes())
            .await?;
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            m = rx.recv() => match m {
                Ok(line) => sock.write_all(format!("data: {line}\n\n").as_bytes()).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    log.dropped.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    sock.write_all(format!(": dropped {n} lines\n\n").as_bytes()).await?
                }
                Err(_) => return Ok(()),
            }
        }
    }
}

async fn read_request(sock: &mut TcpStream) -> std::io::Result<Result<Req, ApiError>> {
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 8192];
    loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Request::new(&mut headers);
        match r.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let mut len = 0usize;
                let mut auth = None;
                for h in r.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                    } else if h.name.eq_ignore_ascii_case("authorization") {
                        auth = std::str::from_utf8(h.value).ok().map(str::to_string);
                    }
                }
                if len > MAX_BODY {
                    return Ok(Err(ApiError::new(
                        413,
                        "body_too_large",
                        format!("bodies are limited to {MAX_BODY} bytes"),
                    )));
                }
                let target = r.path.unwrap_or("/").to_string();
                let method = r.method.unwrap_or("GET").to_string();
                let mut body = buf[head..].to_vec();
                while body.len() < len {
                    let n = sock.read(&mut tmp).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    body.extend_from_slice(&tmp[..n]);
                }
                body.truncate(len);
                let (path, q) = target.split_once('?').unwrap_or((&target, ""));
                let query = form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                return Ok(Ok(Req {
                    method,
                    path: path.to_string(),
                    query,
                    auth,
                    body,
                }));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => {
                return Ok(Err(ApiError::new(
                    400,
                    "bad_request",
                    "malformed or oversized request head",
                )))
            }
        }
    }
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
    limits: TenantFile,
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
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let ok = |v: serde_json::Value| Ok(Resp::Json(200, v));
    let by = who.label();
    match (req.method.as_str(), segs.as_slice()) {
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
            operator(who)?;
            exists(c, t)?;
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
        ("GET", ["v1", "tenants", t, "modules"]) => {
            allowed(who, t, Some("deploy"))?;
            exists(c, t)?;
            ok(serde_json::to_value(c.modules_view(t)).unwrap_or_default())
        }
        ("PUT", ["v1", "tenants", t, "modules", m]) => {
            allowed(who, t, Some("deploy"))?;
            exists(c, t)?;
            let num = |k: &str| -> ApiResult<Option<u64>> {
                req.query
                    .get(k)
                    .map(|v| {
                        v.parse().map_err(|_| {
                            ApiError::new(400, "bad_query", format!("{k} must be a number"))
                        })
                    })
                    .transpose()
            };
            let opts = DeployOpts {
                config: req.query.get("config").cloned().unwrap_or_default(),
                budget_us: num("budget_us")?,
                memory_mb: num("memory_mb")?,
            };
            let (c2, t2, m2) = (c.clone(), t.to_string(), m.to_string());
            let v = tokio::task::spawn_blocking(move || c2.deploy(&t2, &m2, &req.body, opts, &by))
                .await
                .map_err(|e| ApiError::new(500, "internal", e.to_string()))??;
            Ok(Resp::Json(201, serde_json::to_value(v).unwrap_or_default()))
        }
        ("GET", ["v1", "tenants", t, "modules", m]) => {
            allowed(who, t, Some("deploy"))?;
            ok(serde_json::to_value(c.module_view(t, m)?).unwrap_or_default())
        }
        ("POST", ["v1", "tenants", t, "modules", m, action @ ("activate" | "rollback")]) => {
            allowed(who, t, Some("deploy"))?;
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
            allowed(who, t, Some("deploy"))?;
            c.delete_module(t, m, &by)?;
            ok(serde_json::json!({ "deleted": m }))
        }
        ("GET", ["v1", "tenants", t, "functions"]) => {
            allowed(who, t, Some("deploy"))?;
            exists(c, t)?;
            ok(serde_json::to_value(c.functions_view(t)).unwrap_or_default())
        }
        ("PUT", ["v1", "tenants", t, "functions", f]) => {
            allowed(who, t, Some("deploy"))?;
            exists(c, t)?;
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Bind {
                module: String,
                upstream: Option<String>,
            }
            let b: Bind = json_body(&req.body)?;
            c.bind(
                t,
                f,
                FunctionRec {
                    module: b.module,
                    upstream: b.upstream,
                },
                &by,
            )?;
            ok(serde_json::json!({ "bound": c.function_url(t, f) }))
        }
        ("DELETE", ["v1", "tenants", t, "functions", f]) => {
            allowed(who, t, Some("deploy"))?;
            c.unbind(t, f, &by)?;
            ok(serde_json::json!({ "unbound": f }))
        }
        ("GET", ["v1", "tenants", t, "routes"]) => {
            allowed(who, t, Some("deploy"))?;
            exists(c, t)?;
            ok(serde_json::to_value(c.route_hooks_view(t)).unwrap_or_default())
        }
        ("PUT", ["v1", "tenants", t, "routes", r]) => {
            allowed(who, t, Some("deploy"))?;
            exists(c, t)?;
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Attach {
                modules: Vec<String>,
            }
            let a: Attach = json_body(&req.body)?;
            c.attach(t, r, a.modules, &by)?;
            ok(serde_json::json!({ "route": r, "attached": c.route_hooks_view(t).get(*r) }))
        }
        ("GET", ["v1", "tenants", t, "usage"]) => {
            allowed(who, t, Some("usage"))?;
            exists(c, t)?;
            let n = |k: &str, d: u64| req.query.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
            ok(c.usage(t, n("from", 0), n("to", u64::MAX)))
        }
        ("GET", ["v1", "tenants", t, "logs"]) => {
            allowed(who, t, Some("logs"))?;
            exists(c, t)?;
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

fn new_jti() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 12];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    hex::encode(b)
}

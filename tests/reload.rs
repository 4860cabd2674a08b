//! A conf reload and the control plane are one flow: a reload publishes a new snapshot and
//! the control plane rebuilds what the request path reads from it (function routes,
//! attached chains, tenant limits), while what the old view started stops; an admin
//! action restarts only what it changed. Real gateway, real upstreams, SIGHUP reloads.

mod common;

use common::admin::OP;
use common::*;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn head() -> String {
    format!(
        r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[admin]
listen = "127.0.0.1:{{port:admin}}"
token = "{OP}"
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
"#
    )
}

/// Calls the admin API as the operator.
async fn admin(gw: &Gw, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    admin::Admin::new(gw)
        .call(method, path, Some(OP), body)
        .await
}

async fn deploy(gw: &Gw, tenant: &str, module: &str, query: &str, guest: &str) {
    let bytes = std::fs::read(guests().join(format!("{guest}.wasm"))).unwrap();
    let path = format!("/v1/tenants/{tenant}/modules/{module}{query}");
    let (s, v) = admin(gw, "PUT", &path, bytes).await;
    assert_eq!(s, 201, "{v}");
}

async fn get_json(gw: &Gw, path: &str) -> (u16, Value) {
    let r = client().get(gw.url("http", path)).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn reload(gw: &mut Gw, conf: &str) {
    gw.rewrite_conf(conf);
    gw.signal(libc::SIGHUP);
}

/// Waits until `done` holds (a reload's swap follows its signal).
async fn until<F, Fut>(gw: &Gw, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn form(json: &str) -> String {
    form_urlencoded::byte_serialize(json.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_routes_follow_a_reload_and_old_health_checks_stop() {
    let first = Upstream::start("first").await;
    let second = Upstream::start("second").await;
    let conf = |target: &str| {
        head()
            + &format!(
                r#"
[upstreams.backend]
targets = ["{target}"]
health_check = {{ kind = "http", path = "/health", interval_ms = 100 }}
[tenants.acme]
allowed_upstreams = ["backend"]
"#
            )
    };
    let mut gw = Gw::start(&conf(&first.addr()));
    deploy(&gw, "acme", "pass", "?config=%7B%7D", "rewrite").await;
    let bind = serde_json::json!({"module": "pass", "upstream": "backend"});
    let (s, v) = admin(
        &gw,
        "PUT",
        "/v1/tenants/acme/functions/f",
        bind.to_string().into(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = get_json(&gw, "/run/acme/f/x").await;
    assert_eq!((s, &v["upstream"]), (200, &Value::from("first")), "{v}");

    reload(&mut gw, &conf(&second.addr()));
    until(&gw, "the function kept the old upstream", || async {
        get_json(&gw, "/run/acme/f/x").await.1["upstream"] == "second"
    })
    .await;
    // nothing uses the old snapshot's upstream now: its health checks end with it
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = first.stats.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = first.stats.requests.load(Ordering::Relaxed);
    assert_eq!(before, after, "the old upstream is still health-checked");
    assert!(
        second.stats.requests.load(Ordering::Relaxed) > 2,
        "the new one is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_chains_start_from_the_new_conf_hooks() {
    let up = Upstream::start("echo").await;
    let conf = |tag: &str| {
        head()
            + &format!(
                r#"
[upstreams.echo]
targets = ["{}"]
[tenants.acme]
[modules.conf-tag]
path = "{{guests}}/rewrite.wasm"
config = {{ request = {{ set_headers = {{ x-conf = "{tag}" }} }} }}
[[routes]]
name = "acme-api"
path_prefix = "/api"
upstream = "echo"
tenant = "acme"
hooks = ["conf-tag"]
"#,
                up.addr()
            )
    };
    let mut gw = Gw::start(&conf("one"));
    let cfg = form(r#"{"request":{"set_headers":{"x-attached":"yes"}}}"#);
    deploy(&gw, "acme", "tag", &format!("?config={cfg}"), "rewrite").await;
    let attach = serde_json::json!({"modules": ["tag"]}).to_string();
    let (s, v) = admin(
        &gw,
        "PUT",
        "/v1/tenants/acme/routes/acme-api",
        attach.into(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = get_json(&gw, "/api/x").await;
    assert_eq!(v["headers"]["x-conf"], "one", "{v}");
    assert_eq!(v["headers"]["x-attached"], "yes", "{v}");

    reload(&mut gw, &conf("two"));
    until(&gw, "the route kept the old conf hooks", || async {
        get_json(&gw, "/api/x").await.1["headers"]["x-conf"] == "two"
    })
    .await;
    let (_, v) = get_json(&gw, "/api/x").await;
    assert_eq!(v["headers"]["x-attached"], "yes", "still attached: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_in_the_conf_follow_a_reload() {
    let up = Upstream::start("echo").await;
    let conf = |limits: &str| {
        head()
            + &format!(
                r#"
[upstreams.echo]
targets = ["{}"]
[tenants.acme]
{limits}
"#,
                up.addr()
            )
    };
    let mut gw = Gw::start(&conf(""));
    deploy(&gw, "acme", "hello", "", "hello_api").await;
    let bind = serde_json::json!({"module": "hello"}).to_string();
    let (s, v) = admin(&gw, "PUT", "/v1/tenants/acme/functions/f", bind.into()).await;
    assert_eq!(s, 200, "{v}");
    for _ in 0..5 {
        assert_eq!(get_json(&gw, "/run/acme/f/hello/x").await.0, 200);
    }
    // one request per second: of two at once, the second is refused
    reload(&mut gw, &conf("rate_per_sec = 1\nburst = 1"));
    until(&gw, "the conf's new rate never applied", || async {
        let a = get_json(&gw, "/run/acme/f/hello/x").await.0;
        let b = get_json(&gw, "/run/acme/f/hello/x").await.0;
        a == 429 || b == 429
    })
    .await;
}

/// The token-gate guest fetches a token from its `upstream` on every tick: an upstream
/// of its own counts the ticks of one plugin.
fn gate_config(upstream: &str, tick_ms: u64) -> String {
    format!(r#"{{"upstream": "{upstream}", "path": "/token", "tick_ms": {tick_ms}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_timers_stop_after_a_reload() {
    let old_tokens = Upstream::start("old-tokens").await;
    let new_tokens = Upstream::start("new-tokens").await;
    let conf = |tokens: &str| {
        head()
            + &format!(
                r#"
[upstreams.tokens]
targets = ["{tokens}"]
[modules.gate]
path = "{{guests}}/token_gate.wasm"
allowed_upstreams = ["tokens"]
config = {cfg}
"#,
                cfg = toml::Value::String(gate_config("tokens", 100))
            )
    };
    let mut gw = Gw::start(&conf(&old_tokens.addr()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while old_tokens.stats.requests.load(Ordering::Relaxed) < 3 {
        assert!(
            Instant::now() < deadline,
            "the timer never ticked\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reload(&mut gw, &conf(&new_tokens.addr()));
    until(&gw, "the new timer never ticked", || async {
        new_tokens.stats.requests.load(Ordering::Relaxed) >= 3
    })
    .await;
    let before = old_tokens.stats.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        old_tokens.stats.requests.load(Ordering::Relaxed),
        before,
        "the old plugin's timer still ticks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_leave_other_modules_timers_alone() {
    let tokens = Upstream::start("tokens").await;
    let conf = head()
        + &format!(
            r#"
[upstreams.tokens]
targets = ["{}"]
[tenants.acme]
allowed_upstreams = ["tokens"]
"#,
            tokens.addr()
        );
    let gw = Gw::start(&conf);
    let cfg = form(&gate_config("tokens", 300));
    deploy(&gw, "acme", "gate", &format!("?config={cfg}"), "token_gate").await;
    // admin actions every 100 ms for 2 s, each publishing a new view: a timer restarted
    // by each would never reach its first 300 ms tick
    let start = tokens.stats.requests.load(Ordering::Relaxed);
    for i in 0..20 {
        let body = serde_json::json!({"name": format!("t{i}"), "limits": {}}).to_string();
        let (s, v) = admin(&gw, "POST", "/v1/tenants", body.into()).await;
        assert_eq!(s, 201, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = tokens.stats.requests.load(Ordering::Relaxed) - start;
    assert!(
        ticks >= 3,
        "{ticks} ticks in 2 s of a 300 ms timer\n{}",
        gw.log()
    );
}

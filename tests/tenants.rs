//! Tenants and live deploys through a real gateway: the admin API and its tokens,
//! function URLs, deploys under load, rollback, limits, usage, log streaming and
//! persistence across a restart.

mod common;

use common::admin::{fixed_answer, Admin, OP};
use common::*;
use serde_json::Value;
use std::time::Duration;

fn conf(upstream: &str) -> String {
    format!(
        r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[admin]
listen = "127.0.0.1:{{port:admin}}"
token = "{OP}"
base_domain = "fn.test"
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
[upstreams.echo]
targets = ["{upstream}"]
[upstreams.secret]
targets = ["{upstream}"]
[[routes]]
path_prefix = "/plain"
upstream = "echo"
[tenants.confco]
max_module_bytes = 300000
allowed_upstreams = ["echo"]
"#
    )
}

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(guests().join(format!("{name}.wasm"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_deploy_call_redeploy_under_load_rollback_delete() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr()));
    let a = Admin::new(&gw);
    a.tenant("acme", serde_json::json!({})).await;
    let tok = a.token("acme", &["deploy", "logs", "usage"]).await;
    let (s, v) = a.deploy("acme", "hello", &tok, guest("hello_api")).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["version"], 1);
    assert!(v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "proxy_on_request_headers"));
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/acme/functions/greet",
            &tok,
            serde_json::json!({ "module": "hello" }),
        )
        .await;
    assert_eq!(s, 200);
    let c = client();
    let url = gw.url("http", "/run/acme/greet/hello/bob");
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["hello"], "bob");
    // host form: {function}.{tenant}.<base_domain>
    let r = c
        .get(gw.url("http", "/hello/ann"))
        .header("host", "greet.acme.fn.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["hello"], "ann");

    // redeploy under load: no request fails while a new version is swapped in
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut bad, mut v2) = (0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok += 1;
                        if r.text().await.unwrap() == "v2" {
                            v2 += 1;
                        }
                    }
                    _ => bad += 1,
                }
            }
            (ok, bad, v2)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, v) = a.deploy("acme", "hello", &tok, fixed_answer("v2")).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["version"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut bad, mut v2) = (0, 0, 0);
    for l in load {
        let (o, b, n) = l.await.unwrap();
        ok += o;
        bad += b;
        v2 += n;
    }
    assert_eq!(bad, 0, "{bad} requests failed during the redeploy");
    assert!(ok > 20 && v2 > 0, "ok={ok} v2={v2}");

    // versions, rollback, delete
    let (s, v) = a
        .call("GET", "/v1/tenants/acme/modules/hello", Some(&tok), vec![])
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["versions"].as_array().unwrap().len(), 2);
    assert_eq!(v["active"], 2);
    let (s, v) = a
        .call(
            "POST",
            "/v1/tenants/acme/modules/hello/rollback",
            Some(&tok),
            vec![],
        )
        .await;
    assert_eq!((s, v["active"].as_u64()), (200, Some(1)));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["hello"], "bob");
    let (s, _) = a
        .json(
            "POST",
            "/v1/tenants/acme/modules/hello/activate",
            &tok,
            serde_json::json!({"version": 2}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        c.get(&url).send().await.unwrap().text().await.unwrap(),
        "v2"
    );
    let (s, _) = a
        .call(
            "DELETE",
            "/v1/tenants/acme/modules/hello",
            Some(&tok),
            vec![],
        )
        .await;
    assert_eq!(s, 200);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "no_function");
    let (s, _) = a.call("DELETE", "/v1/tenants/acme", Some(OP), vec![]).await;
    assert_eq!(s, 200);
    assert!(
        gw.log().contains("who=tenant:acme:"),
        "admin actions are logged with who did them"
    );
    assert!(!gw.log().contains(&tok), "a token leaked into the log");
    assert!(
        !gw.log().contains(OP),
        "the operator token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr()));
    let a = Admin::new(&gw);
    a.tenant("alpha", serde_json::json!({})).await;
    a.tenant("beta", serde_json::json!({})).await;
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let alpha = leak(a.token("alpha", &["deploy", "logs", "usage"]).await);
    let alpha_usage_only = leak(a.token("alpha", &["usage"]).await);
    let beta = leak(a.token("beta", &["deploy", "logs", "usage"]).await);
    let (s, v) = a.deploy("alpha", "m", alpha, guest("hello_api")).await;
    assert_eq!(s, 201, "{v}");
    // revoked and expired tokens
    let (_, v) = a
        .json(
            "POST",
            "/v1/tenants/alpha/tokens",
            OP,
            serde_json::json!({"ops": ["deploy"]}),
        )
        .await;
    let revoked = leak(v["token"].as_str().unwrap().to_string());
    let (s, _) = a
        .call(
            "DELETE",
            &format!("/v1/tokens/{}", v["jti"].as_str().unwrap()),
            Some(OP),
            vec![],
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = a
        .json(
            "POST",
            "/v1/tenants/alpha/tokens",
            OP,
            serde_json::json!({"ops": ["deploy"], "ttl_secs": 1}),
        )
        .await;
    let expired = leak(v["token"].as_str().unwrap().to_string());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let forged = leak({
        let mut t = alpha.to_string();
        t.pop();
        t.push(if alpha.ends_with('A') { 'B' } else { 'A' });
        t
    });

    let endpoints: Vec<(&str, &str, Option<&str>)> = vec![
        // (method, path, op needed by a tenant token; None = operator only)
        ("GET", "/v1/tenants", None),
        ("POST", "/v1/tenants/alpha/tokens", None),
        ("DELETE", "/v1/tokens/x", None),
        ("GET", "/v1/tenants/alpha", Some("any")),
        ("GET", "/v1/tenants/alpha/modules", Some("deploy")),
        ("GET", "/v1/tenants/alpha/modules/m", Some("deploy")),
        ("GET", "/v1/tenants/alpha/functions", Some("deploy")),
        ("GET", "/v1/tenants/alpha/usage", Some("usage")),
        ("GET", "/v1/tenants/alpha/logs", Some("logs")),
    ];
    for (method, path, op) in endpoints {
        let body = if path.ends_with("/tokens") {
            br#"{"ops":["usage"]}"#.to_vec()
        } else {
            vec![]
        };
        let status = |t: Option<&'static str>| a.call(method, path, t, body.clone());
        // the operator can do everything
        let (s, v) = status(Some(OP)).await;
        assert!(s < 300, "operator {method} {path}: {s} {v}");
        // bad tokens: 401
        for bad in [
            None,
            Some("garbage"),
            Some(forged),
            Some(revoked),
            Some(expired),
        ] {
            let (s, v) = status(bad).await;
            assert_eq!(s, 401, "{method} {path} with {bad:?}: {v}");
        }
        // tenant beta never reaches alpha's anything: 403
        let (s, v) = status(Some(beta)).await;
        assert_eq!(s, 403, "beta on {method} {path}: {v}");
        // alpha: allowed exactly by its ops
        let (s, v) = status(Some(alpha)).await;
        match op {
            None => assert_eq!(s, 403, "alpha on operator endpoint {path}: {v}"),
            Some(_) => assert_eq!(s, 200, "alpha on {path}: {v}"),
        }
        let (s, _) = status(Some(alpha_usage_only)).await;
        let expect = match op {
            Some("usage") | Some("any") => 200,
            _ => 403,
        };
        assert_eq!(s, expect, "alpha(usage only) on {method} {path}");
    }
    // writes: beta cannot deploy into alpha, alpha cannot create tenants
    assert_eq!(
        a.deploy("alpha", "x", beta, guest("hello_api")).await.0,
        403
    );
    assert_eq!(
        a.deploy("alpha", "x", alpha_usage_only, guest("hello_api"))
            .await
            .0,
        403
    );
    assert_eq!(
        a.json(
            "POST",
            "/v1/tenants",
            alpha,
            serde_json::json!({"name": "gamma"})
        )
        .await
        .0,
        403
    );
    assert_eq!(
        a.call("DELETE", "/v1/tenants/alpha", Some(alpha), vec![])
            .await
            .0,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_with_the_reason() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr()));
    let a = Admin::new(&gw);
    let tok = a.token("confco", &["deploy", "logs"]).await;
    let (s, v) = a
        .deploy("confco", "m", &tok, b"hello, not wasm".to_vec())
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("not_wasm")), "{v}");
    let (s, v) = a.deploy("confco", "m", &tok, vec![0u8; 300_001]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (413, Some("module_too_large")),
        "{v}"
    );
    let plain = wat::parse_str("(module (memory (export \"memory\") 1))").unwrap();
    let (s, v) = a.deploy("confco", "m", &tok, plain).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("module_rejected")),
        "{v}"
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("proxy_abi_version_0_2_1"),
        "{v}"
    );
    let (s, v) = a
        .deploy("confco", "m", &tok, b"\0asm\x01\0\0\0\x01garbage".to_vec())
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("module_rejected")),
        "{v}"
    );
    assert!(
        v["reason"].as_str().unwrap().contains("does not compile"),
        "{v}"
    );
    let (s, v) = a
        .call(
            "PUT",
            "/v1/tenants/confco/modules/m?config=%7B%22keys%22%3A%5B%5D%7D",
            Some(&tok),
            guest("api_key_auth"),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("rejected its plugin configuration"),
        "{v}"
    );
    // binding to an upstream the operator did not allow
    let (s, _) = a.deploy("confco", "ok", &tok, guest("hello_api")).await;
    assert_eq!(s, 201);
    let (s, v) = a
        .json(
            "PUT",
            "/v1/tenants/confco/functions/f",
            &tok,
            serde_json::json!({"module": "ok", "upstream": "secret"}),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("upstream_not_allowed")),
        "{v}"
    );
    // rejected deploys are in the tenant's log
    let (_, v) = a
        .call("GET", "/v1/tenants/confco/logs", Some(&tok), vec![])
        .await;
    assert!(v.to_string().contains("deploy rejected"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_concurrency_limits() {
    let up = Upstream::start("echo").await;
    let slow = Upstream::with(UpstreamOpts {
        name: "slow".into(),
        delay: Duration::from_millis(600),
        ..Default::default()
    })
    .await;
    let conf = conf(&up.addr()) + &format!("[upstreams.slow]\ntargets = [\"{}\"]\n", slow.addr());
    let gw = Gw::start(&conf);
    let a = Admin::new(&gw);
    a.tenant(
        "limited",
        serde_json::json!({"rate_per_sec": 5, "burst": 5}),
    )
    .await;
    a.tenant(
        "narrow",
        serde_json::json!({"max_concurrency": 1, "allowed_upstreams": ["slow"]}),
    )
    .await;
    let lt = a.token("limited", &["deploy"]).await;
    let nt = a.token("narrow", &["deploy"]).await;
    assert_eq!(
        a.deploy("limited", "h", &lt, guest("hello_api")).await.0,
        201
    );
    assert_eq!(
        a.json(
            "PUT",
            "/v1/tenants/limited/functions/f",
            &lt,
            serde_json::json!({"module": "h"})
        )
        .await
        .0,
        200
    );
    let (s, v) = a
        .call(
            "PUT",
            "/v1/tenants/narrow/modules/pass?config=%7B%7D",
            Some(&nt),
            guest("rewrite"),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        a.json(
            "PUT",
            "/v1/tenants/narrow/functions/f",
            &nt,
            serde_json::json!({"module": "pass", "upstream": "slow"})
        )
        .await
        .0,
        200
    );
    let c = client();
    let (mut ok, mut limited) = (0, 0);
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let r = c
            .get(gw.url("http", "/run/limited/f/hello/x"))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let after: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(after >= 1);
                assert_eq!(r.json::<Value>().await.unwrap()["error"], "rate_limited");
            }
            s => panic!("unexpected {s}"),
        }
    }
    // a burst of 5, plus 5 per second of refill while the requests were sent
    let refill = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        ok >= 5 && ok <= 5 + refill + 1,
        "burst 5 + refill {refill} expected, got {ok} ok"
    );
    assert!(limited > 0);
    assert_eq!(ok + limited, 20);

    let url = gw.url("http", "/run/narrow/f/x");
    let first = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = std::time::Instant::now();
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "tenant_busy");
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "it must not queue unboundedly"
    );
    assert_eq!(first.await.unwrap(), 200);
    // the guarded upstream saw the function's own path
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_matches_traffic_and_logs_stream_live() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr()));
    let a = Admin::new(&gw);
    a.tenant("meter", serde_json::json!({"allowed_upstreams": ["echo"]}))
        .await;
    let tok = a.token("meter", &["deploy", "logs", "usage"]).await;
    let t0 = wasmgate::wasm::meter::now_secs() - 1;
    assert_eq!(
        a.deploy("meter", "hello", &tok, guest("hello_api")).await.0,
        201
    );
    assert_eq!(
        a.json(
            "PUT",
            "/v1/tenants/meter/functions/hi",
            &tok,
            serde_json::json!({"module": "hello"})
        )
        .await
        .0,
        200
    );
    let c = client();
    let mut out_bytes = 0;
    for i in 0..7 {
        let r = c
            .get(gw.url("http", &format!("/run/meter/hi/hello/u{i}")))
            .send()
            .await
            .unwrap();
        out_bytes += r.bytes().await.unwrap().len() as u64;
    }
    // a request is metered when it is logged, just after its last byte went out: poll
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let v = loop {
        let (s, v) = a
            .call(
                "GET",
                &format!("/v1/tenants/meter/usage?from={t0}"),
                Some(&tok),
                vec![],
            )
            .await;
        assert_eq!(s, 200);
        let m = &v["modules"]["hello"];
        if m["bytes_out"] == out_bytes || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let m = &v["modules"]["hello"];
    assert_eq!(m["invocations"], 7, "{v}");
    assert_eq!(m["local_responses"], 7, "{v}");
    assert_eq!(m["bytes_out"], out_bytes, "{v}");
    assert!(m["wasm_cpu_us"].as_u64().unwrap() > 0, "{v}");
    assert!(m["peak_memory_bytes"].as_u64().unwrap() >= 65536, "{v}");
    assert_eq!(v["totals"]["invocations"], 7);
    // a window before the traffic has none of it
    let (_, v) = a
        .call(
            "GET",
            &format!("/v1/tenants/meter/usage?from=0&to={}", t0 - 10),
            Some(&tok),
            vec![],
        )
        .await;
    assert_eq!(v["totals"]["invocations"], 0, "{v}");

    // logs: follow, then cause a line
    assert_eq!(
        a.call(
            "PUT",
            "/v1/tenants/meter/modules/auth?config=%7B%22keys%22%3A%5B%22k%22%5D%7D",
            Some(&tok),
            guest("api_key_auth")
        )
        .await
        .0,
        201
    );
    assert_eq!(
        a.json(
            "PUT",
            "/v1/tenants/meter/functions/guard",
            &tok,
            serde_json::json!({"module": "auth", "upstream": "echo"})
        )
        .await
        .0,
        200
    );
    let mut stream = c
        .get(gw.url("admin", "/v1/tenants/meter/logs?follow=true"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let r = c
        .get(gw.url("http", "/run/meter/guard/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = stream.chunk().await.unwrap() {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("denied (missing_api_key)") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(found, "log line not streamed: {seen}");
    assert!(seen.contains("\"module\":\"auth\""), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_survive_a_restart_without_recompiling() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr()));
    let a = Admin::new(&gw);
    let tok = a.token("confco", &["deploy"]).await;
    assert_eq!(
        a.deploy("confco", "hello", &tok, guest("hello_api"))
            .await
            .0,
        201
    );
    assert_eq!(
        a.json(
            "PUT",
            "/v1/tenants/confco/functions/hi",
            &tok,
            serde_json::json!({"module": "hello"})
        )
        .await
        .0,
        200
    );
    // the deploy went live on baseline code; its optimized code is the artifact kept
    assert!(
        gw.wait_log("module optimized", Duration::from_secs(30))
            .await,
        "{}",
        gw.log()
    );
    let (dir, ports) = gw.stop();
    let gw = Gw::start_in(dir, &conf(&up.addr()), ports);
    let r = client()
        .get(gw.url("http", "/run/confco/hi/hello/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["hello"], "again");
    assert!(
        gw.wait_log("module=hello digest=", Duration::from_secs(2))
            .await
    );
    let line = gw
        .log()
        .lines()
        .find(|l| l.contains("module=hello") && l.contains("module loaded"))
        .unwrap()
        .to_string();
    assert!(line.contains("precompiled=true"), "{line}");
    // the tenant token still works after the restart (same signing key)
    let a = Admin::new(&gw);
    assert_eq!(
        a.call("GET", "/v1/tenants/confco/modules", Some(&tok), vec![])
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_attach_modules_to_their_conf_routes() {
    let up = Upstream::start("echo").await;
    let conf = conf(&up.addr())
        + r#"
[tenants.other]
[[routes]]
name = "confco-api"
path_prefix = "/api"
upstream = "echo"
tenant = "confco"
"#;
    let gw = Gw::start(&conf);
    let a = Admin::new(&gw);
    let tok = a.token("confco", &["deploy"]).await;
    let other = a.token("other", &["deploy"]).await;
    let cfg = "%7B%22request%22%3A%7B%22set_headers%22%3A%7B%22x-attached%22%3A%22yes%22%7D%7D%7D";
    let (s, v) = a
        .call(
            "PUT",
            &format!("/v1/tenants/confco/modules/tag?config={cfg}"),
            Some(&tok),
            guest("rewrite"),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let c = client();
    let v: Value = c
        .get(gw.url("http", "/api/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["headers"].get("x-attached").is_none());
    let (s, v) = a
        .json(
            "PUT",
            "/v1/tenants/confco/routes/confco-api",
            &tok,
            serde_json::json!({"modules": ["tag"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let v: Value = c
        .get(gw.url("http", "/api/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["headers"]["x-attached"], "yes");
    // another tenant cannot attach to this route, nor to a route without a tenant
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/other/routes/confco-api",
            &other,
            serde_json::json!({"modules": []}),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/confco/routes/route[0]",
            &tok,
            serde_json::json!({"modules": ["tag"]}),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/confco/routes/confco-api",
            &tok,
            serde_json::json!({"modules": ["nope"]}),
        )
        .await;
    assert_eq!(s, 404);
}

/// Issue 9, points 2 and 3: function URLs live under `/run` (and the function hosts), a
/// tenant named like a conf route cannot take it over, anything under the namespace that
/// is not a function is 404 `no_function` (never another route), and deleting a bound
/// module closes its URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_namespace_belongs_to_the_operator() {
    let up = Upstream::start("echo").await;
    let conf = conf(&up.addr())
        + r#"
[[routes]]
name = "keyed"
path_prefix = "/keyed"
upstream = "echo"
request_headers = { set = { "x-route" = "keyed" } }
[[routes]]
name = "catch-all"
path_prefix = "/"
upstream = "echo"
request_headers = { set = { "x-route" = "catch-all" } }
"#;
    let gw = Gw::start(&conf);
    let a = Admin::new(&gw);
    // tenant names are DNS labels
    for bad in [
        "Keyed",
        "-keyed",
        "keyed-",
        "kee_yed",
        "a.b",
        "",
        &"x".repeat(64),
    ] {
        let (s, v) = a
            .json(
                "POST",
                "/v1/tenants",
                OP,
                serde_json::json!({ "name": bad }),
            )
            .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("bad_name")),
            "{bad:?}: {v}"
        );
    }
    a.tenant("keyed", serde_json::json!({"allowed_upstreams": ["echo"]}))
        .await;
    let tok = a.token("keyed", &["deploy"]).await;
    assert_eq!(
        a.deploy("keyed", "m", &tok, guest("hello_api")).await.0,
        201
    );
    let (s, v) = a
        .json(
            "PUT",
            "/v1/tenants/keyed/functions/orders",
            &tok,
            serde_json::json!({"module": "m"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["bound"], "/run/keyed/orders");
    let c = client();
    let get = |path: &str, host: Option<&str>| {
        let mut r = c.get(gw.url("http", path));
        if let Some(h) = host {
            r = r.header("host", h);
        }
        async move {
            let r = r.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // the operator's route is untouched by a tenant of the same name
    let (s, v) = get("/keyed/orders/hello/x", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["headers"]["x-route"], "keyed", "{v}");
    assert_eq!(v["path"], "/keyed/orders/hello/x", "{v}");
    // the function answers in its namespace, by path and by host
    let (s, v) = get("/run/keyed/orders/hello/ann", None).await;
    assert_eq!((s, v["hello"].as_str()), (200, Some("ann")), "{v}");
    let (s, v) = get("/hello/bo", Some("ORDERS.Keyed.fn.test")).await;
    assert_eq!((s, v["hello"].as_str()), (200, Some("bo")), "{v}");
    // inside the namespace without such a function: 404 no_function, never the catch-all
    let seen = up.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    for (path, host) in [
        ("/run", None),
        ("/run/", None),
        ("/run/keyed", None),
        ("/run/keyed/", None),
        ("/run/keyed/nope/x", None),
        ("/run/nobody/orders/x", None),
        ("/x", Some("nope.keyed.fn.test")),
        ("/x", Some("orders.nobody.fn.test.")),
    ] {
        let (s, v) = get(path, host).await;
        assert_eq!(
            (s, v),
            (404, serde_json::json!({"error": "no_function"})),
            "{path} host {host:?}"
        );
    }
    assert_eq!(
        up.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        seen,
        "a request under the function namespace reached the upstream"
    );
    // only whole segments: `/running` is not under `/run`; other hosts of the base domain
    // are not function hosts
    let (s, v) = get("/running", None).await;
    assert_eq!(
        (s, &v["headers"]["x-route"]),
        (200, &Value::from("catch-all"))
    );
    let (s, v) = get("/x", Some("www.fn.test")).await;
    assert_eq!(
        (s, &v["headers"]["x-route"]),
        (200, &Value::from("catch-all"))
    );

    // point 3: deleting the bound module closes its URL (it never falls through)
    let (s, _) = a
        .call("DELETE", "/v1/tenants/keyed/modules/m", Some(&tok), vec![])
        .await;
    assert_eq!(s, 200);
    let (_, v) = a
        .call("GET", "/v1/tenants/keyed/functions", Some(&tok), vec![])
        .await;
    assert_eq!(v, serde_json::json!({}), "the binding went with the module");
    let seen = up.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    for (path, host) in [
        ("/run/keyed/orders/admin/secret", None),
        ("/admin/secret", Some("orders.keyed.fn.test")),
    ] {
        let (s, v) = get(path, host).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (404, Some("no_function")),
            "{path}"
        );
    }
    assert_eq!(
        up.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        seen
    );
}

/// A conf whose namespace changes on reload: the function follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_prefix_is_configurable_and_follows_a_reload() {
    let up = Upstream::start("echo").await;
    let with_prefix = |p: &str| {
        conf(&up.addr()).replace(
            "base_domain = \"fn.test\"",
            &format!("function_prefix = \"{p}\""),
        ) + "[limits]\nmax_request_body_bytes = 1000\n[[routes]]\npath_prefix = \"/\"\nupstream = \"echo\"\n"
    };
    let mut gw = Gw::start(&with_prefix("/fn/v1"));
    let a = Admin::new(&gw);
    let tok = a.token("confco", &["deploy"]).await;
    assert_eq!(
        a.deploy("confco", "m", &tok, guest("hello_api")).await.0,
        201
    );
    let (_, v) = a
        .json(
            "PUT",
            "/v1/tenants/confco/functions/f",
            &tok,
            serde_json::json!({"module": "m"}),
        )
        .await;
    assert_eq!(v["bound"], "/fn/v1/confco/f");
    let c = client();
    let status = |path: &str| {
        let r = c.get(gw.url("http", path)).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (s, b) = status("/fn/v1/confco/f/hello/x").await;
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"hello\":\"x\""), "{b}");
    assert_eq!(status("/fn/v1/confco/g/hello/x").await.0, 404);
    // functions take the conf's body limit ([limits] max_request_body_bytes)
    let r = c
        .post(gw.url("http", "/fn/v1/confco/f/hello/x"))
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // /run is an ordinary path now: the catch-all echoes it
    let (s, b) = status("/run/confco/f/hello/x").await;
    assert_eq!(s, 200);
    assert!(b.contains("\"path\":\"/run/confco/f/hello/x\""), "{b}");
    gw.rewrite_conf(&with_prefix("/run"));
    gw.signal(libc::SIGHUP);
    // the swap happens after the reload is logged: poll, with a deadline
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get(gw.url("http", "/run/confco/f/hello/y"))
            .send()
            .await
            .unwrap();
        let v = r.json::<Value>().await.unwrap_or(Value::Null);
        if v["hello"] == "y" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never moved to /run: {v}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c
        .get(gw.url("http", "/fn/v1/confco/f/hello/y"))
        .send()
        .await
        .unwrap();
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("\"path\":\"/fn/v1/confco/f/hello/y\""));
}

/// Runs the real `wasmgate` CLI against `gw`'s admin API: (success, stdout, stderr).
/// The token goes after the subcommand on purpose: that is where users put it.
fn cli(gw: &Gw, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .env("WASMGATE_ADMIN", format!("127.0.0.1:{}", gw.port("admin")))
        .env_remove("WASMGATE_TOKEN")
        .env_remove("RUST_LOG");
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_json(gw: &Gw, token: &str, args: &[&str]) -> Value {
    let (ok, out, err) = cli(gw, Some(token), args);
    assert!(ok, "wasmgate {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Issue 9, point 16: the CLI reaches every admin endpoint, versions count per tenant and
/// module, PATCH changes a tenant's limits (operator only), and the CLI's errors help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_covers_every_admin_endpoint() {
    let up = Upstream::start("echo").await;
    let conf = conf(&up.addr())
        + r#"
[[routes]]
name = "confco-api"
path_prefix = "/api"
upstream = "echo"
tenant = "confco"
"#;
    let gw = Gw::start(&conf);
    let hello = guests().join("hello_api.wasm");
    let hello = hello.to_str().unwrap();
    let rewrite = guests().join("rewrite.wasm");
    let rewrite = rewrite.to_str().unwrap();

    // no token: the error names WASMGATE_TOKEN
    let (ok, _, err) = cli(&gw, None, &["tenants", "list"]);
    assert!(!ok);
    assert!(err.contains("WASMGATE_TOKEN"), "{err}");
    let (ok, _, err) = cli(&gw, Some("wrong"), &["tenants", "list"]);
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("WASMGATE_TOKEN"),
        "{err}"
    );

    // tenants: create, list, show, update (PATCH), and a token with --token after the
    // subcommand (it used to fail with a misleading tip)
    let v = cli_json(
        &gw,
        OP,
        &[
            "tenants",
            "create",
            "--name",
            "cli",
            "--limits",
            r#"{"rate_per_sec": 1000}"#,
        ],
    );
    assert_eq!(v["limits"]["rate_per_sec"], 1000);
    let v = cli_json(&gw, OP, &["tenants", "list"]);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"cli") && names.contains(&"confco"), "{v}");
    let v = cli_json(
        &gw,
        OP,
        &[
            "tenants",
            "update",
            "cli",
            "--limits",
            r#"{"rate_per_sec": null, "max_concurrency": 4, "allowed_upstreams": ["echo"]}"#,
        ],
    );
    assert_eq!(v["limits"]["max_concurrency"], 4, "{v}");
    assert!(
        v["limits"].get("rate_per_sec").is_none_or(Value::is_null),
        "{v}"
    );
    assert_eq!(
        cli_json(&gw, OP, &["tenants", "show", "cli"])["limits"]["allowed_upstreams"],
        serde_json::json!(["echo"])
    );
    let v = cli_json(
        &gw,
        OP,
        &[
            "token",
            "create",
            "--tenant",
            "cli",
            "--ops",
            "deploy,logs,usage",
        ],
    );
    let tok = v["token"].as_str().unwrap().to_string();

    // modules: deploy twice, versions, activate, rollback; numbered per tenant and module
    let v = cli_json(
        &gw,
        &tok,
        &[
            "deploy",
            "--tenant",
            "cli",
            "--name",
            "hello",
            hello,
            "--budget-us",
            "900",
        ],
    );
    assert_eq!(
        (v["version"].as_u64(), v["budget_us"].as_u64()),
        (Some(1), Some(900)),
        "{v}"
    );
    let v = cli_json(
        &gw,
        &tok,
        &["deploy", "--tenant", "cli", "--name", "hello", hello],
    );
    assert_eq!(v["version"], 2, "{v}");
    let ctok = a_token(&gw, "confco").await;
    let v = cli_json(
        &gw,
        &ctok,
        &["deploy", "--tenant", "confco", "--name", "other", hello],
    );
    assert_eq!(v["version"], 1, "another tenant's versions start at 1: {v}");
    let v = cli_json(
        &gw,
        &ctok,
        &["deploy", "--tenant", "confco", "--name", "hello", hello],
    );
    assert_eq!(v["version"], 1, "another module's versions start at 1: {v}");
    let v = cli_json(&gw, &tok, &["modules", "list", "--tenant", "cli"]);
    assert_eq!(v["hello"]["active"], 2, "{v}");
    let v = cli_json(
        &gw,
        &tok,
        &["modules", "versions", "--tenant", "cli", "hello"],
    );
    assert_eq!(v["versions"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        cli_json(
            &gw,
            &tok,
            &[
                "modules",
                "activate",
                "--tenant",
                "cli",
                "hello",
                "--version",
                "1"
            ]
        )["active"],
        1
    );
    assert_eq!(
        cli_json(
            &gw,
            &tok,
            &[
                "modules",
                "activate",
                "--tenant",
                "cli",
                "hello",
                "--version",
                "2"
            ]
        )["active"],
        2
    );
    assert_eq!(
        cli_json(
            &gw,
            &tok,
            &["modules", "rollback", "--tenant", "cli", "hello"]
        )["active"],
        1
    );

    // functions: bind (answering, and guarding the echo upstream), list, call, unbind
    let v = cli_json(
        &gw,
        &tok,
        &[
            "functions",
            "bind",
            "--tenant",
            "cli",
            "hi",
            "--module",
            "hello",
        ],
    );
    assert_eq!(v["bound"], "/run/cli/hi");
    let (ok, out, err) = cli(
        &gw,
        Some(&tok),
        &[
            "deploy",
            "--tenant",
            "cli",
            "--name",
            "pass",
            rewrite,
            "--config",
            "{}",
            "--bind",
            "/cli/ignored",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"bound\":\"/run/cli/ignored\""), "{out}");
    let v = cli_json(
        &gw,
        &tok,
        &[
            "functions",
            "bind",
            "--tenant",
            "cli",
            "guard",
            "--module",
            "pass",
            "--upstream",
            "echo",
        ],
    );
    assert_eq!(v["bound"], "/run/cli/guard");
    let (ok, _, err) = cli(
        &gw,
        Some(&tok),
        &[
            "functions",
            "bind",
            "--tenant",
            "cli",
            "bad",
            "--module",
            "pass",
            "--upstream",
            "secret",
        ],
    );
    assert!(!ok && err.contains("upstream_not_allowed"), "{err}");
    let v = cli_json(&gw, &tok, &["functions", "list", "--tenant", "cli"]);
    assert_eq!(v["guard"]["upstream"], "echo", "{v}");
    let c = client();
    let r = c
        .get(gw.url("http", "/run/cli/hi/hello/cli"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["hello"], "cli");
    let r = c
        .get(gw.url("http", "/run/cli/guard/behind"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["upstream"].as_str(), v["path"].as_str()),
        (Some("echo"), Some("/behind")),
        "{v}"
    );
    cli_json(
        &gw,
        &tok,
        &["functions", "unbind", "--tenant", "cli", "guard"],
    );
    let r = c
        .get(gw.url("http", "/run/cli/guard/behind"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // routes: attach a module to the tenant's conf route, list
    let v = cli_json(
        &gw,
        &ctok,
        &[
            "routes",
            "attach",
            "--tenant",
            "confco",
            "confco-api",
            "--modules",
            "hello",
        ],
    );
    assert_eq!(v["attached"], serde_json::json!(["hello"]), "{v}");
    assert_eq!(
        cli_json(&gw, &ctok, &["routes", "list", "--tenant", "confco"])["confco-api"],
        serde_json::json!(["hello"])
    );
    let r = c
        .get(gw.url("http", "/api/hello/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["hello"], "route");

    // logs without --follow: plain lines, one JSON object each, like --follow prints
    let (ok, out, err) = cli(
        &gw,
        Some(&tok),
        &["deploy", "--tenant", "cli", "--name", "junk", "/dev/null"],
    );
    assert!(!ok && err.contains("not_wasm"), "{err}");
    let (ok, out2, err) = cli(&gw, Some(&tok), &["logs", "--tenant", "cli"]);
    assert!(ok, "{err}");
    assert!(!out2.trim_start().starts_with('['), "{out2}");
    let lines: Vec<Value> = out2
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"].as_str().unwrap().contains("not_wasm")
                || l["message"].as_str().unwrap().contains("wasm module")),
        "{out2} {out}"
    );

    // usage, then deletes
    let v = cli_json(&gw, &tok, &["usage", "--tenant", "cli"]);
    assert!(
        v["modules"]["hello"]["invocations"].as_u64().unwrap() >= 1,
        "{v}"
    );
    cli_json(
        &gw,
        &tok,
        &["modules", "delete", "--tenant", "cli", "hello"],
    );
    assert_eq!(
        cli_json(&gw, &tok, &["functions", "list", "--tenant", "cli"]).get("hi"),
        None
    );
    let (ok, _, err) = cli(&gw, Some(&tok), &["tenants", "delete", "cli"]);
    assert!(
        !ok && err.contains("403"),
        "a tenant token cannot delete its tenant: {err}"
    );
    cli_json(&gw, OP, &["tenants", "delete", "cli"]);
    let (ok, _, err) = cli(&gw, Some(OP), &["tenants", "show", "cli"]);
    assert!(!ok && err.contains("404"), "{err}");
    assert!(
        !gw.log().contains(&tok) && !gw.log().contains(OP),
        "a token leaked into the log"
    );
}

async fn a_token(gw: &Gw, tenant: &str) -> String {
    Admin::new(gw)
        .token(tenant, &["deploy", "logs", "usage"])
        .await
}

/// PATCH /v1/tenants/{t}: operator only, API tenants only, validated, effective at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_can_be_changed() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr()));
    let a = Admin::new(&gw);
    a.tenant("lim", serde_json::json!({"allowed_upstreams": ["echo"]}))
        .await;
    let tok = a.token("lim", &["deploy"]).await;
    assert_eq!(a.deploy("lim", "h", &tok, guest("hello_api")).await.0, 201);
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/lim/functions/f",
            &tok,
            serde_json::json!({"module": "h"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        patch(&a, &tok, "lim", serde_json::json!({"rate_per_sec": 1}))
            .await
            .0,
        403
    );
    let (s, v) = patch(&a, OP, "confco", serde_json::json!({"rate_per_sec": 1})).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("conf_tenant")), "{v}");
    assert_eq!(patch(&a, OP, "nobody", serde_json::json!({})).await.0, 404);
    let (s, v) = patch(&a, OP, "lim", serde_json::json!({"rate_per_sec": "fast"})).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_limits")), "{v}");
    let (s, v) = patch(&a, OP, "lim", serde_json::json!({"max_qps": 1})).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_limits")), "{v}");
    let (s, v) = patch(
        &a,
        OP,
        "lim",
        serde_json::json!({"allowed_upstreams": ["nope"]}),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_upstream")), "{v}");
    // a function guarding an upstream keeps it allowed until unbound
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/lim/functions/g",
            &tok,
            serde_json::json!({"module": "h", "upstream": "echo"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = patch(&a, OP, "lim", serde_json::json!({"allowed_upstreams": []})).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("upstream_in_use")),
        "{v}"
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("g (upstream `echo`)"),
        "{v}"
    );
    // the rate applies to the next request
    let url = gw.url("http", "/run/lim/f/hello/x");
    let c = client();
    for _ in 0..5 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    let (s, v) = patch(
        &a,
        OP,
        "lim",
        serde_json::json!({"rate_per_sec": 1, "burst": 1}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["limits"]["allowed_upstreams"],
        serde_json::json!(["echo"]),
        "untouched fields stay: {v}"
    );
    let statuses: Vec<u16> = futures_statuses(&c, &url, 5).await;
    assert!(statuses.contains(&429), "{statuses:?}");
    let (s, v) = patch(
        &a,
        OP,
        "lim",
        serde_json::json!({"rate_per_sec": null, "burst": null}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["limits"]["rate_per_sec"].is_null(), "{v}");
    let statuses: Vec<u16> = futures_statuses(&c, &url, 5).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

async fn futures_statuses(c: &reqwest::Client, url: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.get(url).send().await.unwrap().status().as_u16());
    }
    out
}

async fn patch(a: &Admin, who: &str, t: &str, v: Value) -> (u16, Value) {
    a.json("PATCH", &format!("/v1/tenants/{t}"), who, v).await
}

/// Sum of one field over a tenant's modules in `data_dir/control/usage.json`.
fn saved_invocations(gw_dir: &std::path::Path, tenant: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(gw_dir.join("data/control/usage.json")) else {
        return 0;
    };
    let v: Value = serde_json::from_str(&text).unwrap();
    v["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["tenant"] == tenant)
        .flat_map(|u| u["buckets"].as_array().unwrap().iter())
        .map(|b| b[1][0].as_u64().unwrap())
        .sum()
}

/// Issue 9, point 15: usage (the billing record) survives a graceful restart (saved on
/// SIGTERM) and a crash (saved every 10 s), and comes back with its time buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_restart_and_a_crash() {
    let up = Upstream::start("echo").await;
    let conf = conf(&up.addr()).replace(
        "watch_config = false",
        "watch_config = false\ngrace_period_secs = 1",
    );
    let gw = Gw::start(&conf);
    let a = Admin::new(&gw);
    a.tenant("billed", serde_json::json!({})).await;
    let tok = a.token("billed", &["deploy", "usage"]).await;
    assert_eq!(
        a.deploy("billed", "m", &tok, guest("hello_api")).await.0,
        201
    );
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/billed/functions/f",
            &tok,
            serde_json::json!({"module": "m"}),
        )
        .await;
    assert_eq!(s, 200);
    let c = client();
    let traffic = |n: usize, port: u16| {
        let c = c.clone();
        async move {
            for i in 0..n {
                let r = c
                    .get(format!("http://127.0.0.1:{port}/run/billed/f/hello/{i}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }
    };
    traffic(5, gw.port("http")).await;
    // requests are metered in their logging phase, after the client has its answer
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // (invocations count as callbacks run, bytes when the request is logged): wait until
    // all 5 are in and the record holds still
    let mut last = Value::Null;
    let before = loop {
        let v = billed_usage(&a, &tok).await;
        let settled = v["modules"]["m"]["invocations"] == 5 && v == last;
        if settled || std::time::Instant::now() > deadline {
            break v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(before["modules"]["m"]["invocations"], 5, "{before}");

    // graceful restart: saved on SIGTERM, identical afterwards
    let (dir, ports) = gw.stop_gracefully();
    assert_eq!(saved_invocations(dir.path(), "billed"), 5);
    let gw = Gw::start_in(dir, &conf, ports);
    let a = Admin::new(&gw);
    let after = billed_usage(&a, &tok).await;
    assert_eq!(
        after["modules"], before["modules"],
        "usage changed across a restart"
    );
    assert_eq!(after["totals"]["invocations"], 5);
    // a window before the traffic still has none of it: the buckets kept their times
    let (_, v) = a
        .call(
            "GET",
            &format!(
                "/v1/tenants/billed/usage?from=0&to={}",
                wasmgate::wasm::meter::now_secs() - 3600
            ),
            Some(&tok),
            vec![],
        )
        .await;
    assert_eq!(v["totals"]["invocations"], 0, "{v}");

    // a crash: what was saved periodically (every 10 s) survives
    traffic(2, gw.port("http")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while saved_invocations(gw.dir(), "billed") < 7 {
        assert!(
            std::time::Instant::now() < deadline,
            "usage never saved periodically:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (dir, ports) = gw.stop(); // SIGKILL: no shutdown path runs
    let gw = Gw::start_in(dir, &conf, ports);
    let a = Admin::new(&gw);
    let v = billed_usage(&a, &tok).await;
    assert_eq!(v["totals"]["invocations"], 7, "{v}");
    assert!(!gw.dir().join("data/control/usage.json.tmp").exists());
}

async fn billed_usage(a: &Admin, tok: &str) -> Value {
    let (s, v) = a
        .call("GET", "/v1/tenants/billed/usage?from=0", Some(tok), vec![])
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

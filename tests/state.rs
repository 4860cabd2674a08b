//! Tenant state through real gateways: the key-value store from filters
//! (`wasmgate.kv.*`, the `kv_demo` filter) and functions (`wasi:keyvalue`, the `kv-rs`
//! component) on the embedded store and on a real Redis; secrets; tenant isolation through
//! every interface; durability across `kill -9`; Redis going away and coming back.

mod common;

use common::admin::{Admin, OP};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Two conf tenants, each with the `kv_demo` filter guarding the echo upstream and the
/// `kv-rs` function; `state` is the `[state]` section.
fn conf(upstream: &str, state: &str) -> String {
    let mut c = format!(
        r#"{HEAD}
[admin]
listen = "127.0.0.1:{{port:admin}}"
token = "{OP}"
{state}
[upstreams.echo]
targets = ["{upstream}"]
[[routes]]
path_prefix = "/plain"
upstream = "echo"
[tenants.acme]
[tenants.other]
state_max_bytes = 200
"#
    );
    for t in ["acme", "other"] {
        c.push_str(&format!(
            r#"
[modules.{t}-filter]
path = "{{guests}}/kv_demo.wasm"
tenant = "{t}"
[modules.{t}-fn]
path = "{{guests}}/kv-rs.wasm"
tenant = "{t}"
[[routes]]
path_prefix = "/{t}/filter"
upstream = "echo"
hooks = ["{t}-filter"]
[[routes]]
path_prefix = "/{t}/fn"
hooks = ["{t}-fn"]
"#
        ));
    }
    c
}

/// `[state]` on `redis`, with a short timeout (tests kill it).
fn redis_state(redis: &RedisServer) -> String {
    format!(
        "[state]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout_ms = 300",
        redis.url()
    )
}

/// One `wasmgate.kv.OP` call through tenant `t`'s filter: (status, JSON result).
async fn filter_call(gw: &Gw, t: &str, op: &str, args: Value) -> (u16, Value) {
    let r = client()
        .get(gw.url("http", &format!("/{t}/filter")))
        .header("x-kv-call", op)
        .header("x-kv-args", args.to_string())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// A request to tenant `t`'s function: (status, body).
async fn function(gw: &Gw, t: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = client()
        .request(m, gw.url("http", &format!("/{t}/fn{path}")))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// What both backends must do: filters and functions of one tenant share its store, no
/// tenant reaches another's, compare-and-swap from concurrent requests loses no update,
/// limits answer clear errors, usage counts the calls.
async fn state_works_through_every_interface(gw: &Gw) {
    // a filter writes, reads, and compares-and-swaps
    let (s, v) = filter_call(gw, "acme", "set", json!({"key": "color", "value": "blue"})).await;
    assert_eq!(s, 200, "{v}");
    let v1 = v["version"].as_u64().unwrap();
    let (s, v) = filter_call(gw, "acme", "get", json!({"key": "color"})).await;
    assert_eq!(
        (s, &v["value"], v["version"].as_u64()),
        (200, &json!("blue"), Some(v1))
    );
    let (s, v) = filter_call(
        gw,
        "acme",
        "cas",
        json!({"key": "color", "value": "red", "version": v1 + 100}),
    )
    .await;
    assert_eq!(
        (s, &v["error"], v["version"].as_u64()),
        (409, &json!("conflict"), Some(v1))
    );
    let (s, _) = filter_call(
        gw,
        "acme",
        "cas",
        json!({"key": "color", "value": "red", "version": v1}),
    )
    .await;
    assert_eq!(s, 200);
    // malformed arguments are refused at once
    let (s, v) = filter_call(gw, "acme", "get", json!({"nokey": 1})).await;
    assert_eq!(s, 400, "{v}");

    // the function of the same tenant sees the same store, and writes to it
    assert_eq!(
        function(gw, "acme", "GET", "/kv/color", "").await,
        (200, "red".into())
    );
    assert_eq!(
        function(gw, "acme", "PUT", "/kv/shape", "round").await.0,
        204
    );
    let (_, v) = filter_call(gw, "acme", "get", json!({"key": "shape"})).await;
    assert_eq!(v["value"], "round");
    assert_eq!(
        function(gw, "acme", "POST", "/incr/n", "").await,
        (200, "1".into())
    );
    assert_eq!(
        function(gw, "acme", "POST", "/incr/n", "").await,
        (200, "2".into())
    );
    // wasi:keyvalue's counter is a u64: a negative value is an error that writes nothing
    assert_eq!(function(gw, "acme", "PUT", "/kv/neg", "-5").await.0, 204);
    let (s, body) = function(gw, "acme", "POST", "/incr/neg", "").await;
    assert_eq!(s, 503);
    assert!(body.contains("not_a_number"), "{body}");
    assert_eq!(
        function(gw, "acme", "GET", "/kv/neg", "").await,
        (200, "-5".into())
    );
    // a bucket of another name does not exist, and the tenant's log says why
    let (s, body) = function(gw, "acme", "GET", "/bucket/counter", "").await;
    assert_eq!((s, body.as_str()), (503, "no-such-store"));
    assert_eq!(
        function(gw, "acme", "GET", "/bucket/default", "").await.0,
        200
    );
    let (_, v) = filter_call(gw, "acme", "list", json!({})).await;
    let keys: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(
        keys.contains(&"color") && keys.contains(&"shape") && keys.contains(&"n"),
        "{keys:?}"
    );

    // every request through the filter counts in `hits` and goes on to the upstream
    let r = client()
        .get(gw.url("http", "/acme/filter"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first: i64 = r.json::<Value>().await.unwrap()["headers"]["x-hits"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let r = client()
        .get(gw.url("http", "/acme/filter"))
        .send()
        .await
        .unwrap();
    let second: i64 = r.json::<Value>().await.unwrap()["headers"]["x-hits"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(second, first + 1);

    // the other tenant sees none of it, through its filter, its function or the API
    let (_, v) = filter_call(gw, "other", "get", json!({"key": "color"})).await;
    assert_eq!(v["found"], false, "{v}");
    assert_eq!(function(gw, "other", "GET", "/kv/color", "").await.0, 404);
    let (_, v) = filter_call(gw, "other", "list", json!({})).await;
    assert!(
        !v["keys"].as_array().unwrap().iter().any(|k| k == "color"),
        "{v}"
    );
    let a = Admin::new(gw);
    let other = a.token("other", &["kv"]).await;
    let (s, _) = a
        .call("GET", "/v1/tenants/acme/kv/color", Some(&other), vec![])
        .await;
    assert_eq!(s, 403);
    let (s, v) = a
        .call("GET", "/v1/tenants/acme/kv/color", Some(OP), vec![])
        .await;
    assert_eq!((s, &v["value"]), (200, &json!("red")), "{v}");
    let acme = a.token("acme", &["kv", "usage", "logs"]).await;
    let (_, logs) = a
        .call("GET", "/v1/tenants/acme/logs", Some(&acme), vec![])
        .await;
    assert!(logs.to_string().contains("no bucket `counter`"), "{logs}");
    let (s, v) = a
        .call(
            "PUT",
            "/v1/tenants/acme/kv/from-api?version=0",
            Some(&acme),
            b"x".to_vec(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = a
        .call(
            "PUT",
            "/v1/tenants/acme/kv/from-api?version=0",
            Some(&acme),
            b"y".to_vec(),
        )
        .await;
    assert_eq!(s, 409, "only if absent");

    // the root context's own call (from on_configure) reached the store
    let (s, v) = a
        .call("GET", "/v1/tenants/acme/kv/configured", Some(OP), vec![])
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["value"].as_str().unwrap().parse::<u64>().unwrap() >= 1);

    // compare-and-swap from concurrent requests: 4 clients add 10 each, retrying
    // conflicts; not one update is lost
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = gw.url("http", "/acme/filter");
        tasks.push(tokio::spawn(async move {
            let c = client();
            let call = |op: &'static str, args: Value| {
                c.get(&url)
                    .header("x-kv-call", op)
                    .header("x-kv-args", args.to_string())
                    .send()
            };
            let mut done = 0;
            while done < 10 {
                let v: Value = call("get", json!({"key": "race"}))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let (n, ver) = match v["found"].as_bool() {
                    Some(true) => (
                        v["value"].as_str().unwrap().parse::<u64>().unwrap(),
                        v["version"].as_u64().unwrap(),
                    ),
                    _ => (0, 0),
                };
                let args = json!({"key": "race", "value": (n + 1).to_string(), "version": ver});
                if call("cas", args).await.unwrap().status() == 200 {
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, v) = filter_call(gw, "acme", "get", json!({"key": "race"})).await;
    assert_eq!(v["value"], "40");

    // limits: `other` may store 200 bytes
    let big = "x".repeat(300);
    let (s, v) = filter_call(gw, "other", "set", json!({"key": "big", "value": big})).await;
    assert_eq!((s, &v["error"]), (503, &json!("over_quota")), "{v}");
    let (s, body) = function(gw, "other", "PUT", "/kv/big", &big).await;
    assert_eq!(s, 503);
    assert!(body.contains("over_quota"), "{body}");

    // usage counts the calls per module, and the bytes the tenant stores
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, u) = a
        .call("GET", "/v1/tenants/acme/usage", Some(&acme), vec![])
        .await;
    assert_eq!(s, 200);
    assert!(
        u["modules"]["acme-filter"]["state_reads"].as_u64().unwrap() >= 40,
        "{u}"
    );
    assert!(
        u["modules"]["acme-filter"]["state_writes"]
            .as_u64()
            .unwrap()
            >= 40,
        "{u}"
    );
    assert!(
        u["modules"]["acme-fn"]["state_writes"].as_u64().unwrap() >= 3,
        "{u}"
    );
    assert!(u["state_bytes_stored"].as_u64().unwrap() > 0, "{u}");
    // state calls are not counted as HTTP callouts
    assert_eq!(u["modules"]["acme-filter"]["http_callouts"], 0, "{u}");
    // a key that is not UTF-8 is refused, not turned into another key
    let (s, _) = a
        .call("PUT", "/v1/tenants/acme/kv/%FE", Some(&acme), b"x".to_vec())
        .await;
    assert_eq!(s, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_on_the_embedded_store() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr(), ""));
    state_works_through_every_interface(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_on_redis_and_redis_going_away() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("echo").await;
    let state = redis_state(&redis);
    let gw = Gw::start(&conf(&up.addr(), &state));
    state_works_through_every_interface(&gw).await;

    // Redis stops mid-load: store calls fail with a clear error, every other route serves
    redis.kill();
    let (s, v) = filter_call(&gw, "acme", "get", json!({"key": "color"})).await;
    assert_eq!((s, &v["error"]), (503, &json!("unavailable")), "{v}");
    let (s, body) = function(&gw, "acme", "GET", "/kv/color", "").await;
    assert_eq!(s, 503);
    assert!(body.contains("unavailable"), "{body}");
    for _ in 0..20 {
        let r = client()
            .get(gw.url("http", "/plain/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            function(&gw, "acme", "GET", "/hello", "").await,
            (200, "plain".into())
        );
    }
    // and back: the gateway reconnects by itself, the data is there (append-only file)
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (s, body) = function(&gw, "acme", "GET", "/kv/color", "").await;
        if s == 200 {
            assert_eq!(body, "red");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {s} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_and_usage_survive_kill_9() {
    let up = Upstream::start("echo").await;
    let text = conf(&up.addr(), "");
    let gw = Gw::start(&text);
    for i in 0..50 {
        let (s, _) = function(&gw, "acme", "PUT", &format!("/kv/k{i}"), &format!("v{i}")).await;
        assert_eq!(s, 204);
    }
    // usage is saved every USAGE_SAVE_EVERY (10 s): wait past one save
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (dir, ports) = gw.stop(); // SIGKILL
    let gw = Gw::start_in(dir, &text, ports);
    for i in 0..50 {
        assert_eq!(
            function(&gw, "acme", "GET", &format!("/kv/k{i}"), "").await,
            (200, format!("v{i}"))
        );
    }
    let a = Admin::new(&gw);
    let (_, u) = a
        .call("GET", "/v1/tenants/acme/usage", Some(OP), vec![])
        .await;
    assert!(
        u["modules"]["acme-fn"]["state_writes"].as_u64().unwrap() >= 50,
        "{u}"
    );
    assert!(
        u["modules"]["acme-fn"]["invocations"].as_u64().unwrap() >= 50,
        "{u}"
    );
    // usage is in the state store too: without usage.json it comes back from there
    let (dir, ports) = gw.stop();
    std::fs::remove_file(dir.path().join("data/control/usage.json")).unwrap();
    let gw = Gw::start_in(dir, &text, ports);
    let (_, u) = Admin::new(&gw)
        .call("GET", "/v1/tenants/acme/usage", Some(OP), vec![])
        .await;
    assert!(
        u["modules"]["acme-fn"]["state_writes"].as_u64().unwrap() >= 50,
        "{u}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_filters_and_functions_and_never_leak() {
    secrets_on("", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_on_redis_reach_guests_and_never_leak() {
    let redis = RedisServer::start();
    let state = format!("[state]\nbackend = \"redis\"\nurl = \"{}\"", redis.url());
    secrets_on(&state, Some(redis.dir.path())).await;
}

/// Secrets on the store `state` names; `store_dir` holds that store's files when they
/// are not in the gateway's data dir (Redis's), scanned for clear text too.
async fn secrets_on(state: &str, store_dir: Option<&std::path::Path>) {
    const VALUE: &str = "s3cr3t-value-7f1c";
    const NEXT: &str = "n3xt-value-99ab";
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&conf(&up.addr(), state));
    let a = Admin::new(&gw);
    let acme = a.token("acme", &["deploy", "secrets"]).await;
    let other = a.token("other", &["secrets"]).await;

    // set with the CLI: the value comes from stdin, never the command line
    let set = |name: &str, value: &str| {
        let mut child = std::process::Command::new(bin())
            .args([
                "secret",
                "--admin",
                &format!("127.0.0.1:{}", gw.port("admin")),
            ])
            .args(["set", "--tenant", "acme", name])
            .env("WASMGATE_TOKEN", &acme)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{value}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let answer = set("API_KEY", VALUE);
    assert!(!answer.contains(VALUE), "{answer}");

    // a function reads it through wasi:config
    assert_eq!(
        function(&gw, "acme", "GET", "/config/API_KEY", "").await,
        (200, VALUE.into())
    );
    assert_eq!(
        function(&gw, "acme", "GET", "/config/NOPE", "").await.0,
        404
    );
    // another tenant's function does not
    assert_eq!(
        function(&gw, "other", "GET", "/config/API_KEY", "").await.0,
        404
    );

    // a filter gets it substituted into its configuration; a missing one is refused
    let guest = std::fs::read(guests().join("kv_demo.wasm")).unwrap();
    let deploy = |config: &str| {
        let path = format!("/v1/tenants/acme/modules/demo?config={}", urlencode(config));
        let (a, acme, guest) = (&a, acme.clone(), guest.clone());
        async move { a.call("PUT", &path, Some(&acme), guest).await }
    };
    let (s, v) = deploy(r#"{"key":"{{secret:MISSING}}"}"#).await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("MISSING"), "{v}");
    let (s, v) = deploy(r#"{"key":"{{secret:API_KEY}}"}"#).await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = a
        .json(
            "PUT",
            "/v1/tenants/acme/functions/demo",
            &acme,
            json!({"module": "demo"}),
        )
        .await;
    assert_eq!(s, 200);
    let config = || async {
        client()
            .get(gw.url("http", "/run/acme/demo/"))
            .header("x-kv-config", "1")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert_eq!(config().await, format!(r#"{{"key":"{VALUE}"}}"#));

    // a secret a filter's configuration names cannot be deleted (it would keep running
    // with it, and fail to load on the next start)
    let (s, v) = a
        .call(
            "DELETE",
            "/v1/tenants/acme/secrets/API_KEY",
            Some(&acme),
            vec![],
        )
        .await;
    assert_eq!((s, &v["error"]), (409, &json!("secret_in_use")), "{v}");
    // a new value reaches both: the filter is reconfigured, the function reads it
    set("API_KEY", NEXT);
    assert_eq!(config().await, format!(r#"{{"key":"{NEXT}"}}"#));
    assert_eq!(
        function(&gw, "acme", "GET", "/config/API_KEY", "").await,
        (200, NEXT.into())
    );

    // listed by name and time only; another tenant's token cannot list them
    let (s, v) = a
        .call("GET", "/v1/tenants/acme/secrets", Some(&acme), vec![])
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["secrets"][0]["name"], "API_KEY");
    assert!(v["secrets"][0]["updated_at"].as_u64().unwrap() > 0);
    let (s, _) = a
        .call("GET", "/v1/tenants/acme/secrets", Some(&other), vec![])
        .await;
    assert_eq!(s, 403);
    let (s, _) = a
        .call(
            "PUT",
            "/v1/tenants/acme/secrets/X",
            Some(&other),
            b"v".to_vec(),
        )
        .await;
    assert_eq!(s, 403);

    // the key rotates; secrets still open
    let (s, v) = a
        .call("POST", "/v1/secrets/rotate-key", Some(OP), vec![])
        .await;
    assert_eq!((s, v["resealed"].as_u64()), (200, Some(1)), "{v}");

    // never in a log, an answer or the store file in clear
    let seen = format!("{}{answer}{v}", gw.log());
    assert!(!seen.contains(VALUE) && !seen.contains(NEXT));
    let (dir, ports) = gw.stop();
    let mut files = Vec::new();
    collect(dir.path(), &mut files);
    if let Some(d) = store_dir {
        collect(d, &mut files);
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for secret in [VALUE, NEXT] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a secret in clear",
                f.display()
            );
        }
    }
    // after a restart (the key from its file), the function still reads it
    let gw = Gw::start_in(dir, &conf(&up.addr(), state), ports);
    assert_eq!(
        function(&gw, "acme", "GET", "/config/API_KEY", "").await,
        (200, NEXT.into())
    );
    assert!(!gw.log().contains(VALUE) && !gw.log().contains(NEXT));
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_every_node_adds_up_on_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start("echo").await;
    let node = |id: &str| {
        conf(
            &up.addr(),
            &format!(
                "[state]\nbackend = \"redis\"\nurl = \"{}\"\n[node]\nid = \"{id}\"",
                redis.url()
            ),
        )
    };
    let (a, b) = (Gw::start(&node("node-a")), Gw::start(&node("node-b")));
    for _ in 0..5 {
        assert_eq!(function(&a, "acme", "GET", "/hello", "").await.0, 200);
    }
    for _ in 0..7 {
        assert_eq!(function(&b, "acme", "GET", "/hello", "").await.0, 200);
    }
    // each node publishes its usage with every save (USAGE_SAVE_EVERY, 10 s)
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    for gw in [&a, &b] {
        loop {
            let (_, u) = Admin::new(gw)
                .call("GET", "/v1/tenants/acme/usage", Some(OP), vec![])
                .await;
            if u["modules"]["acme-fn"]["invocations"] == 12 {
                assert_eq!(u["nodes"].as_array().map(Vec::len), Some(2), "{u}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{u}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_redis_is_away_gets_its_secrets_when_it_is_back() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("echo").await;
    let state = redis_state(&redis);
    let gw = Gw::start(&conf(&up.addr(), &state));
    let (s, _) = Admin::new(&gw)
        .call(
            "PUT",
            "/v1/tenants/acme/secrets/API_KEY",
            Some(OP),
            b"kept".to_vec(),
        )
        .await;
    assert_eq!(s, 200);
    let (dir, ports) = gw.stop();
    redis.kill();
    // starts and serves with Redis away; the secret is not there yet
    let gw = Gw::start_in(dir, &conf(&up.addr(), &state), ports);
    assert_eq!(function(&gw, "acme", "GET", "/hello", "").await.0, 200);
    assert_eq!(
        function(&gw, "acme", "GET", "/config/API_KEY", "").await.0,
        404
    );
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while function(&gw, "acme", "GET", "/config/API_KEY", "").await != (200, "kept".into()) {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

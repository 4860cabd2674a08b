//! Many gateways, one platform: three (and a late fourth) real gateway processes sharing
//! a real `redis-server` this test starts. Deploys, rollbacks, revocations and secrets
//! made on one node reach the others within a second; one rate limit holds across the
//! nodes; Redis dying under load fails no healthy request, and nodes converge when it
//! comes back, even empty.

mod common;

use common::admin::{fixed_answer, Admin, OP};
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster key every node of these tests shares (base64 of 32 bytes).
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn node_conf(name: &str, redis: &RedisServer, upstream: &str) -> String {
    format!(
        r#"{HEAD}
[admin]
listen = "127.0.0.1:{{port:admin}}"
token = "{OP}"
[node]
id = "{name}"
[cluster]
url = "{url}"
sync_interval_ms = 300
timeout_ms = 300
[upstreams.echo]
targets = ["{upstream}"]
[[routes]]
path_prefix = "/plain"
upstream = "echo"
"#,
        url = redis.url()
    )
}

/// Starts a node of the cluster on `redis`.
fn node(name: &str, redis: &RedisServer, upstream: &str) -> Gw {
    // every node reads the same key; the value never changes, so setting it again from
    // another test thread is harmless
    std::env::set_var("WASMGATE_CLUSTER_KEY", KEY);
    Gw::start(&node_conf(name, redis, upstream))
}

/// A Redis, an echo upstream and one node per name on them.
async fn cluster(names: &[&str]) -> (RedisServer, Upstream, Vec<Gw>) {
    let redis = RedisServer::start();
    let up = Upstream::start("echo").await;
    let nodes = names.iter().map(|n| node(n, &redis, &up.addr())).collect();
    (redis, up, nodes)
}

/// (status, body) of a GET.
async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    match c.get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Waits until `url` answers `body` (200); how long it took. Panics after `within`.
async fn until_serves(url: &str, body: &str, within: Duration) -> Duration {
    let c = client();
    let started = Instant::now();
    loop {
        let (s, b) = get(&c, url).await;
        if s == 200 && b == body {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{url} still answers {s} {b:?}, not {body:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn deploy_and_bind(a: &Admin, tok: &str, module: &str, body: &str) {
    let (s, v) = a.deploy("acme", module, tok, fixed_answer(body)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = a
        .json(
            "PUT",
            "/v1/tenants/acme/functions/f",
            tok,
            json!({ "module": module }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

/// Deploys a new version of `acme/m` answering `body` on `a` as soon as the cluster
/// takes writes again (within 10 s).
async fn deploy_when_writable(a: &Admin, tok: &str, body: &str) -> Value {
    let started = Instant::now();
    loop {
        let (s, v) = a.deploy("acme", "m", tok, fixed_answer(body)).await;
        if s == 201 {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no deploy within 10 s: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(a: &Admin) -> Value {
    let (s, v) = a.call("GET", "/v1/cluster", Some(OP), Vec::new()).await;
    assert_eq!(s, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_rollbacks_revocations_and_secrets_reach_every_node_within_a_second() {
    let (redis, up, nodes) = cluster(&["a", "b", "c"]).await;
    let admins: Vec<Admin> = nodes.iter().map(Admin::new).collect();
    let fn_url = |i: usize| nodes[i].url("http", "/run/acme/f/");

    // a tenant created on A; its token, issued on A, works on B and C
    admins[0].tenant("acme", json!({})).await;
    let tok = admins[0].token("acme", &["deploy", "secrets"]).await;
    deploy_and_bind(&admins[0], &tok, "m", "v1").await;
    for i in 0..3 {
        let took = until_serves(&fn_url(i), "v1", Duration::from_secs(1)).await;
        eprintln!("v1 on node {i} after {took:?}");
    }
    let (s, v) = admins[2]
        .call("GET", "/v1/tenants/acme/modules", Some(&tok), Vec::new())
        .await;
    assert_eq!(s, 200, "a token issued on A is accepted on C: {v}");

    // a new version deployed on B reaches A and C
    let (s, v) = admins[1]
        .deploy("acme", "m", &tok, fixed_answer("v2"))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["version"], 2, "{v}");
    for i in [0, 2] {
        until_serves(&fn_url(i), "v2", Duration::from_secs(1)).await;
    }
    // a rollback on B: everywhere
    let (s, v) = admins[1]
        .call(
            "POST",
            "/v1/tenants/acme/modules/m/rollback",
            Some(&tok),
            Vec::new(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for i in 0..3 {
        until_serves(&fn_url(i), "v1", Duration::from_secs(1)).await;
    }

    // a secret set on C is sealed with the shared key: A lists it, and a function on A
    // reads it (wasi:config) within a second
    let (s, v) = admins[0]
        .deploy(
            "acme",
            "kv",
            &tok,
            std::fs::read(guests().join("kv-rs.wasm")).unwrap(),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = admins[0]
        .json(
            "PUT",
            "/v1/tenants/acme/functions/kv",
            &tok,
            json!({ "module": "kv" }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    until_serves(
        &nodes[0].url("http", "/run/acme/kv/plain"),
        "plain",
        Duration::from_secs(1),
    )
    .await;
    let (s, v) = admins[2]
        .call(
            "PUT",
            "/v1/tenants/acme/secrets/api",
            Some(&tok),
            b"s3cret".to_vec(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let config_url = nodes[0].url("http", "/run/acme/kv/config/api");
    let took = until_serves(&config_url, "s3cret", Duration::from_secs(1)).await;
    eprintln!("a secret set on C read by a function on A after {took:?}");
    let (s, v) = admins[0]
        .call("GET", "/v1/tenants/acme/secrets", Some(&tok), Vec::new())
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["secrets"][0]["name"], "api", "{v}");

    // the secret key is the cluster's: a node cannot rotate it on its own
    let (s, v) = admins[1]
        .call("POST", "/v1/secrets/rotate-key", Some(OP), Vec::new())
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("cluster key"), "{v}");

    // revoked on C: refused on A within a second
    let claims = tok.split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    let jti = claims["jti"].as_str().unwrap();
    let (s, v) = admins[2]
        .call("DELETE", &format!("/v1/tokens/{jti}"), Some(OP), Vec::new())
        .await;
    assert_eq!(s, 200, "{v}");
    let started = Instant::now();
    loop {
        let (s, _) = admins[0]
            .call("GET", "/v1/tenants/acme/modules", Some(&tok), Vec::new())
            .await;
        if s == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the revoked token still works on A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // every node reports the same sequence and sees the others
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let seqs: Vec<Value> = futures::future::join_all(admins.iter().map(status)).await;
    for st in &seqs {
        assert_eq!(st["connected"], true, "{st}");
        assert_eq!(st["seq"], seqs[0]["seq"], "{seqs:?}");
        let alive = st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["alive"] == true)
            .count();
        assert_eq!(alive, 3, "{st}");
    }
    let m = get(&client(), &nodes[1].url("metrics", "/metrics")).await.1;
    assert_eq!(metric(&m, "wasmgate_cluster_connected"), 1.0);
    assert_eq!(metric(&m, "wasmgate_cluster_nodes"), 3.0);
    assert_eq!(
        metric(&m, "wasmgate_cluster_control_seq"),
        seqs[0]["seq"].as_f64().unwrap()
    );

    // the CLI shows the same
    let out = std::process::Command::new(bin())
        .args(["cluster", "status", "--admin"])
        .arg(format!("127.0.0.1:{}", nodes[0].port("admin")))
        .env("WASMGATE_TOKEN", OP)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"node\": \"a\"") || text.contains("\"node\":\"a\""),
        "{text}"
    );

    // a fourth node started now serves everything before its listeners open
    let late = node("d", &redis, &up.addr());
    let (s, b) = get(&client(), &late.url("http", "/run/acme/f/")).await;
    assert_eq!((s, b.as_str()), (200, "v1"));
    let la = Admin::new(&late);
    let (s, _) = la
        .call("GET", "/v1/tenants/acme/modules", Some(&tok), Vec::new())
        .await;
    assert_eq!(s, 401, "the late node knows the revocation");
    let (s, v) = la
        .call("GET", "/v1/tenants/acme/secrets", Some(OP), Vec::new())
        .await;
    assert_eq!(
        (s, v["secrets"][0]["name"].as_str()),
        (200, Some("api")),
        "{v}"
    );

    // a tenant deleted on B takes its state and secrets along: one created again under
    // its name on C starts empty everywhere
    let (s, v) = admins[0]
        .call(
            "PUT",
            "/v1/tenants/acme/kv/left",
            Some(OP),
            b"over".to_vec(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admins[1]
        .call("DELETE", "/v1/tenants/acme", Some(OP), Vec::new())
        .await;
    assert_eq!(s, 200, "{v}");
    admins[2].tenant("acme", json!({})).await;
    let started = Instant::now();
    let (s, v) = loop {
        let (s, v) = la
            .call("GET", "/v1/tenants/acme/secrets", Some(OP), Vec::new())
            .await;
        if s != 404 || started.elapsed() > Duration::from_secs(1) {
            break (s, v);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        (s, v["secrets"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    let (s, v) = admins[0]
        .call("GET", "/v1/tenants/acme/kv/left", Some(OP), Vec::new())
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_limit_holds_across_three_nodes_under_uneven_load() {
    let (_redis, _up, nodes) = cluster(&["a", "b", "c"]).await; // kept until the end
    let a = Admin::new(&nodes[0]);
    let (rate, burst) = (100u64, 20u64);
    a.tenant("acme", json!({ "rate_per_sec": rate, "burst": burst }))
        .await;
    let tok = a.token("acme", &["deploy"]).await;
    deploy_and_bind(&a, &tok, "m", "ok").await;
    for n in &nodes {
        until_serves(&n.url("http", "/run/acme/f/"), "ok", Duration::from_secs(2)).await;
    }
    // let the burst the readiness probes used refill
    tokio::time::sleep(Duration::from_secs(1)).await;

    // uneven: node A gets 6 clients, B 2, C 1; together far over the rate
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let run = Duration::from_secs(4);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, clients) in [(0usize, 6), (1, 2), (2, 1)] {
        for _ in 0..clients {
            let url = nodes[i].url("http", "/run/acme/f/");
            let (ok, limited, other) = (ok.clone(), limited.clone(), other.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                while started.elapsed() < run {
                    match get(&c, &url).await.0 {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => limited.fetch_add(1, Ordering::Relaxed),
                        _ => other.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed) as f64;
    let expected = rate as f64 * secs + burst as f64;
    let err = (ok - expected) / expected;
    eprintln!(
        "shared limit: {ok} allowed in {secs:.2} s, expected {expected:.0} ({:+.1}%), {} refused",
        err * 100.0,
        limited.load(Ordering::Relaxed)
    );
    assert_eq!(other.load(Ordering::Relaxed), 0);
    assert!(
        limited.load(Ordering::Relaxed) > ok as u64,
        "the load was over the limit"
    );
    assert!(
        err.abs() <= 0.10,
        "allowed {ok}, expected {expected:.0}: {:+.1}%",
        err * 100.0
    );
}

/// Keeps requesting `urls` until `stop`; counts answers other than 200.
fn load(
    urls: Vec<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        let c = client();
        let (mut ok, mut failed, mut why) = (0, 0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            for u in &urls {
                let (s, b) = get(&c, u).await;
                if s == 200 {
                    ok += 1;
                } else {
                    failed += 1;
                    if why.len() < 5 {
                        why.push(format!("{u}: {s} {b}"));
                    }
                }
            }
        }
        (ok, failed, why)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_under_load_fails_no_request_and_nodes_converge_when_it_returns() {
    let (mut redis, up, nodes) = cluster(&["a", "b", "c"]).await;
    let admins: Vec<Admin> = nodes.iter().map(Admin::new).collect();
    admins[0].tenant("acme", json!({})).await;
    let tok = admins[0].token("acme", &["deploy"]).await;
    deploy_and_bind(&admins[0], &tok, "m", "v1").await;
    for n in &nodes {
        until_serves(&n.url("http", "/run/acme/f/"), "v1", Duration::from_secs(1)).await;
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls: Vec<String> = nodes
        .iter()
        .flat_map(|n| [n.url("http", "/plain/x"), n.url("http", "/run/acme/f/")])
        .collect();
    let loader = load(urls, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Redis dies: nodes keep serving, admin writes answer 503 with the reason
    redis.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (s, v) = admins[1]
        .deploy("acme", "m", &tok, fixed_answer("v2"))
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"], "cluster_unavailable", "{v}");
    let (s, v) = admins[2]
        .json("POST", "/v1/tenants", OP, json!({"name": "other"}))
        .await;
    assert_eq!(s, 503, "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = get(&client(), &nodes[0].url("metrics", "/metrics")).await.1;
    assert_eq!(metric(&m, "wasmgate_cluster_connected"), 0.0, "{m}");

    // Redis returns with its data: writes work again and reach everyone (a node's
    // connection comes back within its reconnect backoff, 0.5 s at most)
    redis.restart();
    deploy_when_writable(&admins[1], &tok, "v2").await;
    for n in &nodes {
        until_serves(&n.url("http", "/run/acme/f/"), "v2", Duration::from_secs(3)).await;
    }

    // Redis returns empty (no persistence): the nodes give it back what they serve, the
    // secrets they hold open included
    let (s, v) = admins[0]
        .call(
            "PUT",
            "/v1/tenants/acme/secrets/api",
            Some(OP),
            b"kept".to_vec(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    redis.kill();
    for f in std::fs::read_dir(redis.dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    redis.restart();
    let v = deploy_when_writable(&admins[2], &tok, "v3").await;
    // 3, or more if an attempt Redis received was answered 503 (its outcome unknown)
    assert!(
        v["version"].as_u64().unwrap() >= 3,
        "the version history survived: {v}"
    );
    let (s, m) = admins[0]
        .call("GET", "/v1/tenants/acme/modules/m", Some(&tok), Vec::new())
        .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["versions"][0]["version"], 1, "{m}");
    assert_eq!(m["versions"][1]["version"], 2, "{m}");
    for n in &nodes {
        until_serves(&n.url("http", "/run/acme/f/"), "v3", Duration::from_secs(3)).await;
    }
    // a node joining now fetches the module bytes the nodes gave back
    let late = node("d", &redis, &up.addr());
    let (s, b) = get(&client(), &late.url("http", "/run/acme/f/")).await;
    assert_eq!((s, b.as_str()), (200, "v3"));
    let (s, v) = Admin::new(&late)
        .call("GET", "/v1/tenants/acme/secrets", Some(OP), Vec::new())
        .await;
    assert_eq!(
        (s, v["secrets"][0]["name"].as_str()),
        (200, Some("api")),
        "{v}"
    );

    stop.store(true, Ordering::Relaxed);
    let (ok, failed, why) = loader.await.unwrap();
    eprintln!("under Redis failures: {ok} requests answered, {failed} failed");
    assert!(ok > 100, "{ok}");
    assert_eq!(failed, 0, "failed requests: {why:?}");

    // a node restarted while Redis is away serves its own last copy
    let mut nodes = nodes;
    let (dir, ports) = nodes.pop().unwrap().stop();
    redis.kill();
    let c = Gw::start_in(dir, &node_conf("c", &redis, &up.addr()), ports);
    let (s, b) = get(&client(), &c.url("http", "/run/acme/f/")).await;
    assert_eq!((s, b.as_str()), (200, "v3"));
    assert!(
        c.log().contains("serving this node's last known record"),
        "{}",
        c.log()
    );
}

/// `redis-cli` on the test's Redis.
fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_to_redis_without_the_cluster_key_is_never_served() {
    let (redis, up, nodes) = cluster(&["a", "b"]).await;
    let admins: Vec<Admin> = nodes.iter().map(Admin::new).collect();
    admins[0].tenant("acme", json!({})).await;
    let tok = admins[0].token("acme", &["deploy"]).await;
    deploy_and_bind(&admins[0], &tok, "m", "v1").await;
    until_serves(
        &nodes[1].url("http", "/run/acme/f/"),
        "v1",
        Duration::from_secs(1),
    )
    .await;

    // someone with access to Redis but not the key rewrites the record: no tenants, a
    // higher sequence number, a made-up authentication
    let seq: u64 = redis_cli(&redis, &["HGET", "wasmgate:cluster:control", "seq"])
        .trim()
        .parse()
        .unwrap();
    let forged = json!({"tenants": {}, "modules": {}, "functions": {}, "revoked": []}).to_string();
    let next = (seq + 5).to_string();
    redis_cli(
        &redis,
        &[
            "HSET",
            "wasmgate:cluster:control",
            "rec",
            &forged,
            "seq",
            &next,
            "mac",
            &"0".repeat(64),
        ],
    );
    redis_cli(&redis, &["PUBLISH", "wasmgate:cluster:events", "control"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for n in &nodes {
        let (s, b) = get(&client(), &n.url("http", "/run/acme/f/")).await;
        assert_eq!(
            (s, b.as_str()),
            (200, "v1"),
            "the forged record is not served"
        );
        assert!(n.log().contains("fails its authentication"), "{}", n.log());
    }
    let (s, v) = admins[1]
        .deploy("acme", "m", &tok, fixed_answer("v2"))
        .await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("fails its authentication"),
        "{v}"
    );

    // the operator deletes it: the nodes give Redis their record back
    redis_cli(&redis, &["DEL", "wasmgate:cluster:control"]);
    deploy_when_writable(&admins[1], &tok, "v2").await;
    until_serves(
        &nodes[0].url("http", "/run/acme/f/"),
        "v2",
        Duration::from_secs(1),
    )
    .await;

    // a second process given node a's id: told, in the log of one of them
    let twin = node("a", &redis, &up.addr());
    let started = Instant::now();
    let said = "another running node uses this node's id";
    while !twin.log().contains(said) && !nodes[0].log().contains(said) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no warning of a shared id"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_cluster_conf_without_its_key_or_with_embedded_state_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[cluster]\nurl = \"redis://127.0.0.1:1/0\"\n[state]\nbackend = \"embedded\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("WASMGATE_CLUSTER_KEY")
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        err.contains("c.toml:1:1") && err.contains("needs the cluster key"),
        "{err}"
    );
    assert!(
        err.contains("c.toml:4:") && err.contains("must be \"redis\""),
        "{err}"
    );
}

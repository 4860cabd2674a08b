//! The gateway core through a real `wasmgate serve` process: routing, rewrites, header
//! operations, load balancing and health checks, TLS with SNI, HTTP/2, error answers,
//! live reloads and metrics.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.unwrap();
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_precedence_by_host_path_and_method() {
    let names = [
        "catchall",
        "api",
        "user",
        "me",
        "wild",
        "exact_host",
        "delete",
    ];
    let mut ups = Vec::new();
    for n in names {
        ups.push(Upstream::start(n).await);
    }
    let mut conf = String::from(
        "[metrics]\nlisten = \"127.0.0.1:{port:metrics}\"\n[server]\nwatch_config = false\n\
         [[listeners]]\nlisten = \"127.0.0.1:{port:http}\"\n",
    );
    for (n, u) in names.iter().zip(&ups) {
        conf += &format!("[upstreams.{n}]\ntargets = [\"{}\"]\n", u.addr());
    }
    conf += r#"
[[routes]]
name = "catchall"
upstream = "catchall"
[[routes]]
path_prefix = "/api"
upstream = "api"
[[routes]]
path = "/api/users/{id}"
upstream = "user"
[[routes]]
path = "/api/users/me"
upstream = "me"
[[routes]]
host = "*.example.com"
path_prefix = "/api"
upstream = "wild"
[[routes]]
host = "a.example.com"
path_prefix = "/api"
upstream = "exact_host"
[[routes]]
path = "/api/users/{id}"
methods = ["DELETE"]
upstream = "delete"
"#;
    let gw = Gw::start(&conf);
    let c = client();
    let hit = |host: &'static str, method: reqwest::Method, path: &'static str| {
        let c = c.clone();
        let url = gw.url("http", path);
        async move {
            let r = c
                .request(method, url)
                .header("host", host)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{host} {path}");
            r.headers()["x-upstream"].to_str().unwrap().to_string()
        }
    };
    use reqwest::Method as M;
    assert_eq!(hit("x.org", M::GET, "/").await, "catchall");
    assert_eq!(hit("x.org", M::GET, "/apix").await, "catchall");
    assert_eq!(hit("x.org", M::GET, "/api").await, "api");
    assert_eq!(hit("x.org", M::GET, "/api/deep/path").await, "api");
    assert_eq!(hit("x.org", M::GET, "/api/users/42").await, "user");
    assert_eq!(hit("x.org", M::GET, "/api/users/me").await, "me");
    assert_eq!(hit("x.org", M::DELETE, "/api/users/42").await, "delete");
    assert_eq!(hit("z.example.com", M::GET, "/api/x").await, "wild");
    assert_eq!(
        hit("A.EXAMPLE.COM:8080", M::GET, "/api/x").await,
        "exact_host"
    );
    // a host whose routes do not match the path falls back to host-less routes
    assert_eq!(hit("a.example.com", M::GET, "/other").await, "catchall");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_header_operations() {
    let up = Upstream::start("echo").await;
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.echo]
targets = ["{addr}"]
[[routes]]
path_prefix = "/strip"
upstream = "echo"
rewrite = {{ strip_prefix = true }}
request_headers = {{ set = {{ "x-set" = "s" }}, add = {{ "x-multi" = "added" }}, remove = ["x-secret"] }}
response_headers = {{ set = {{ "x-gw" = "wasmgate" }}, remove = ["x-upstream"] }}
[[routes]]
path_prefix = "/v1"
upstream = "echo"
rewrite = {{ replace_prefix = "/internal/v2" }}
[[routes]]
path = "/u/{{id}}/posts/{{post}}"
upstream = "echo"
rewrite = {{ path = "/posts/{{post}}?user={{id}}" }}
"#,
            addr = up.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    let r = c
        .get(gw.url("http", "/strip/a/b?q=1"))
        .header("x-secret", "hide")
        .header("x-multi", "orig")
        .header("x-set", "client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-gw"], "wasmgate");
    assert!(r.headers().get("x-upstream").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/a/b?q=1");
    assert_eq!(v["headers"]["x-set"], "s");
    assert!(v["headers"].get("x-secret").is_none());
    // the echo joins repeated headers' last value; both must have reached it
    assert!(v["headers"]["x-multi"] == "added" || v["headers"]["x-multi"] == "orig");
    let (_, v, _) = get_json(&c, &gw.url("http", "/strip")).await;
    assert_eq!(v["path"], "/");
    let (_, v, _) = get_json(&c, &gw.url("http", "/v1/things")).await;
    assert_eq!(v["path"], "/internal/v2/things");
    let (_, v, _) = get_json(&c, &gw.url("http", "/u/7/posts/99")).await;
    assert_eq!(v["path"], "/posts/99?user=7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_health_check_ejection_and_return() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let b_port = b.port;
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.pool]
targets = ["{}", "{}"]
health_check = {{ kind = "http", path = "/healthz", interval_ms = 50, timeout_ms = 200 }}
[[routes]]
upstream = "pool"
"#,
            a.addr(),
            b.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        let r = c.get(gw.url("http", "/")).send().await.unwrap();
        *seen
            .entry(r.headers()["x-upstream"].to_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");

    // b dies: after the health check notices, every request goes to a and succeeds
    drop(b);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..20 {
        let r = c.get(gw.url("http", "/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "a");
    }
    // b returns on the same port and gets traffic again
    let l = tokio::net::TcpListener::bind(("127.0.0.1", b_port))
        .await
        .unwrap();
    let back = tokio::spawn(upstream::serve(
        l,
        UpstreamOpts {
            name: "b".into(),
            ..Default::default()
        },
        Default::default(),
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut b_hits = 0;
    for _ in 0..20 {
        let r = c.get(gw.url("http", "/")).send().await.unwrap();
        if r.headers()["x-upstream"] == "b" {
            b_hits += 1;
        }
    }
    back.abort();
    assert!(b_hits >= 5, "b came back but got {b_hits}/20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_balancing_is_sticky() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.pool]
targets = ["{}", "{}"]
balance = "hash"
hash_key = "header:x-user"
[[routes]]
upstream = "pool"
"#,
            a.addr(),
            b.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    let mut targets = std::collections::HashSet::new();
    // the ring depends on the targets' (random) ports: enough users that all landing on
    // one target is practically impossible (2 * 2^-40)
    let users: Vec<String> = (0..40).map(|i| format!("user{i}")).collect();
    for user in &users {
        let mut first = None;
        for _ in 0..5 {
            let r = c
                .get(gw.url("http", "/"))
                .header("x-user", user)
                .send()
                .await
                .unwrap();
            let t = r.headers()["x-upstream"].to_str().unwrap().to_string();
            assert_eq!(first.get_or_insert(t.clone()), &t, "user {user} moved");
        }
        targets.insert(first.unwrap());
    }
    assert_eq!(targets.len(), 2, "forty users all hashed to one target");
}

fn tls_conf(up: &str, dir: &std::path::Path) -> (String, Vec<Vec<u8>>) {
    let mut ders = Vec::new();
    let mut certs = String::new();
    for name in ["a.test", "b.test"] {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string(), format!("*.{name}")])
            .unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        ders.push(ck.cert.der().to_vec());
        certs += &format!(
            "{{ cert = \"{}\", key = \"{}\", sni = [\"{name}\", \"*.{name}\"] }},",
            cert.display(),
            key.display()
        );
    }
    let conf = format!(
        r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[[listeners]]
listen = "127.0.0.1:{{port:https}}"
tls = {{ certs = [{certs}] }}
[upstreams.echo]
targets = ["{up}"]
[[routes]]
upstream = "echo"
"#
    );
    (conf, ders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_picks_certificates_by_sni_and_speaks_http2() {
    let up = Upstream::start("echo").await;
    let dir = tempfile::tempdir().unwrap();
    let (conf, ders) = tls_conf(&up.addr(), dir.path());
    // a short head deadline: HTTP/2 connections must not be subject to it
    let conf = conf + "[limits]\nclient_header_timeout_ms = 300\n";
    let gw = Gw::start_in(dir, &conf, Default::default());
    let accepted = || async { metric(&gw.metrics().await, "wasmgate_connections_accepted_total") };
    let accepted_at_start = accepted().await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", gw.port("https")).parse().unwrap();
    for (i, host) in ["a.test", "x.b.test"].iter().enumerate() {
        let mut builder = reqwest::Client::builder()
            .resolve(host, addr)
            .tls_info(true)
            .timeout(Duration::from_secs(5));
        for d in &ders {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(d).unwrap());
        }
        let c = builder.build().unwrap();
        let r = c
            .get(format!("https://{host}:{}/hello", addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN should pick h2");
        let info = r.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
        assert_eq!(
            info.peer_certificate().unwrap(),
            ders[i].as_slice(),
            "wrong cert for {host}"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], "/hello");
        // idle beyond the head deadline, then a second stream on the same connection
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = c
            .get(format!("https://{host}:{}/again", addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        accepted().await - accepted_at_start,
        2.0,
        "one h2 connection per client"
    );
    // HTTP/1.1 still works on the same listener
    let c = reqwest::Client::builder()
        .resolve("a.test", addr)
        .add_root_certificate(reqwest::Certificate::from_der(&ders[0]).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let r = c
        .get(format!("https://a.test:{}/", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_precise_json_and_keep_the_connection() {
    let slow = Upstream::with(UpstreamOpts {
        name: "slow".into(),
        delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let (dead_port, _dead) = refusing_port();
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.slow]
targets = ["{}"]
read_timeout_ms = 200
[upstreams.dead]
targets = ["127.0.0.1:{dead_port}"]
connect_timeout_ms = 200
[[routes]]
name = "slow"
path_prefix = "/slow"
upstream = "slow"
[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"
[[routes]]
name = "post-only"
path = "/post"
methods = ["POST"]
upstream = "dead"
"#,
            slow.addr()
        );
    let gw = Gw::start(&conf);
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let (s, v, h) = get_json(&c, &gw.url("http", "/nothing-here")).await;
    assert_eq!(
        (s, v.clone()),
        (404, serde_json::json!({"error": "no_route"}))
    );
    assert_ne!(
        h.get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let (s, v, _) = get_json(&c, &gw.url("http", "/post")).await;
    assert_eq!((s, v["error"].as_str()), (405, Some("method_not_allowed")));
    let (s, v, _) = get_json(&c, &gw.url("http", "/dead/x")).await;
    assert_eq!(s, 502);
    assert_eq!(
        v,
        serde_json::json!({"error": "upstream_unreachable", "route": "dead"})
    );
    let t = std::time::Instant::now();
    let (s, v, _) = get_json(&c, &gw.url("http", "/slow/x")).await;
    assert_eq!(s, 504);
    assert_eq!(
        v,
        serde_json::json!({"error": "upstream_timeout", "route": "slow"})
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "timeout took {:?}",
        t.elapsed()
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wasmgate_upstream_errors_total{kind=\"timeout\",upstream=\"slow\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "wasmgate_upstream_errors_total{kind=\"unreachable\",upstream=\"dead\"}"
        ),
        1.0
    );
    assert!(
        gw.wait_log("upstream_timeout", Duration::from_secs(2))
            .await
    );
}

const RELOAD_A: &str = r#"
[metrics]
listen = "127.0.0.1:{port:metrics}"
[[listeners]]
listen = "127.0.0.1:{port:http}"
[upstreams.echo]
targets = ["UP"]
[[routes]]
path_prefix = "/a"
upstream = "echo"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_good_confs_and_rejects_bad_ones() {
    let up = Upstream::start("echo").await;
    let a = RELOAD_A.replace("UP", &up.addr());
    let mut gw = Gw::start(&a);
    let c = client();
    assert_eq!(
        c.get(gw.url("http", "/a")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(gw.url("http", "/b")).send().await.unwrap().status(),
        404
    );

    // file watch: a new route appears, the old one goes
    gw.rewrite_conf(&a.replace("/a\"", "/b\""));
    let mut ok = false;
    for _ in 0..100 {
        if c.get(gw.url("http", "/b")).send().await.unwrap().status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(ok, "file change never applied:\n{}", gw.log());
    assert_eq!(
        c.get(gw.url("http", "/a")).send().await.unwrap().status(),
        404
    );

    // a bad conf is rejected with its line, the old one keeps serving
    gw.rewrite_conf(&a.replace("upstream = \"echo\"", "upstream = \"billing\""));
    assert!(
        gw.wait_log(
            "upstream `billing` in route `route[0]` is not defined; defined upstreams: echo",
            Duration::from_secs(5)
        )
        .await,
        "{}",
        gw.log()
    );
    assert!(
        gw.log().contains("gw.toml:10:12"),
        "error must name file:line:col\n{}",
        gw.log()
    );
    for _ in 0..5 {
        assert_eq!(
            c.get(gw.url("http", "/b")).send().await.unwrap().status(),
            200
        );
    }
    let m = gw.metrics().await;
    assert!(metric(&m, "wasmgate_config_reloads_total{result=\"failed\"}") >= 1.0);
    assert_eq!(metric(&m, "wasmgate_config_generation"), 2.0);

    // SIGHUP reloads too
    gw.rewrite_conf(&a.replace("/a\"", "/c\""));
    gw.signal(libc::SIGHUP);
    let mut ok = false;
    for _ in 0..100 {
        if c.get(gw.url("http", "/c")).send().await.unwrap().status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(ok, "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_on_their_snapshot() {
    let slow = Upstream::with(UpstreamOpts {
        name: "slow".into(),
        delay: Duration::from_millis(600),
        ..Default::default()
    })
    .await;
    let a = RELOAD_A.replace("UP", &slow.addr());
    let mut gw = Gw::start(&a);
    let c = client();
    let url = gw.url("http", "/a/slow");
    let inflight = tokio::spawn(async move { c.get(url).send().await.unwrap().status() });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // the route the request is on goes away while it waits for the upstream
    gw.rewrite_conf(&a.replace("/a\"", "/z\""));
    gw.signal(libc::SIGHUP);
    assert_eq!(inflight.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_access_log_is_json() {
    let up = Upstream::start("echo").await;
    let conf = format!(
        r#"
[server]
watch_config = false
[access_log]
enabled = true
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
[upstreams.echo]
targets = ["{}"]
[[routes]]
name = "all"
upstream = "echo"
"#,
        up.addr()
    );
    let gw = Gw::start(&conf);
    let c = client();
    for _ in 0..7 {
        c.get(gw.url("http", "/x")).send().await.unwrap();
    }
    // a request is counted when it is logged, just after its response went out
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut m = gw.metrics().await;
    while metric(&m, "wasmgate_requests_total{route=\"all\",status=\"2xx\"}") < 7.0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = gw.metrics().await;
    }
    assert_eq!(
        metric(&m, "wasmgate_requests_total{route=\"all\",status=\"2xx\"}"),
        7.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "wasmgate_upstream_latency_seconds_count{upstream=\"echo\"}"
        ),
        7.0
    );
    assert!(m.contains("wasmgate_open_connections"));
    assert_eq!(metric(&m, "wasmgate_config_generation"), 1.0);
    assert!(
        gw.wait_log("\"route\":\"all\"", Duration::from_secs(2))
            .await
    );
    let v = gw.access_line("all");
    assert_eq!(v["status"], 200);
    assert_eq!(v["path"], "/x");
}

/// `[access_log] path` is relative to the conf file like every other path (the demo puts
/// its log under data_dir, not on stdout), whatever the working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_path_is_relative_to_the_conf() {
    let up = Upstream::start("echo").await;
    let conf = format!(
        "{HEAD}[access_log]\nenabled = true\npath = \"access.log\"\n[upstreams.echo]\ntargets = [\"{}\"]\n[[routes]]\nname = \"all\"\nupstream = \"echo\"\n",
        up.addr()
    );
    let gw = Gw::start(&conf);
    client()
        .get(gw.url("http", "/logged"))
        .send()
        .await
        .unwrap();
    let file = gw.dir().join("access.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while !text.contains("\"path\":\"/logged\"") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = std::fs::read_to_string(&file).unwrap_or_default();
    }
    assert!(
        text.contains("\"path\":\"/logged\""),
        "{}: {text:?}",
        file.display()
    );
    assert!(
        !gw.log().contains("\"path\":\"/logged\""),
        "the access log went to stdout"
    );
    // a burst: every line reaches the file without a later request to push it out (the
    // writer once left a line queued behind another in its buffer until the next one)
    let c = client();
    let burst = (0..64).map(|i| {
        let (c, url) = (c.clone(), gw.url("http", &format!("/burst/{i}")));
        async move { c.get(url).send().await.unwrap().status() }
    });
    for status in futures::future::join_all(burst).await {
        assert_eq!(status, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let lines = |text: &str| text.matches("\"path\":\"/burst/").count();
    while lines(&text) < 64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = std::fs::read_to_string(&file).unwrap_or_default();
    }
    assert_eq!(lines(&text), 64, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_sni_and_verification() {
    let echo = Upstream::start("echo").await;
    // gateway A: the TLS upstream, fronting the echo server
    let (a, ca_path) = tls_front(&echo.addr(), "up.test");
    let a_addr = format!("127.0.0.1:{}", a.port("https"));
    // gateway B: proxies to A over TLS, verifying A's certificate against the CA
    let b_conf = format!(
        r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
[upstreams.good]
targets = ["{a_addr}"]
tls = {{ sni = "up.test", ca = "{ca_path}" }}
[upstreams.wrong_name]
targets = ["{a_addr}"]
tls = {{ sni = "other.test", ca = "{ca_path}" }}
[upstreams.untrusted]
targets = ["{a_addr}"]
tls = {{ sni = "up.test" }}
[[routes]]
path_prefix = "/good"
upstream = "good"
[[routes]]
path_prefix = "/wrong"
upstream = "wrong_name"
[[routes]]
path_prefix = "/untrusted"
upstream = "untrusted"
"#
    );
    let b = Gw::start(&b_conf);
    let c = client();
    let r = c.get(b.url("http", "/good/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/good/x");
    for bad in ["/wrong/x", "/untrusted/x"] {
        let (s, v, _) = get_json(&c, &b.url("http", bad)).await;
        assert_eq!(s, 502, "{bad}: {v}");
        assert_eq!(v["error"], "upstream_unreachable", "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_hands_over_the_listeners() {
    let up = Upstream::start("echo").await;
    let conf = RELOAD_A.replace("UP", &up.addr())
        + "[server]\ngrace_period_secs = 1\nwatch_config = false\n";
    let mut gw = Gw::start(&conf);
    // a new connection per request: what the handover promises is that no new
    // connection is refused; an idle kept-alive one the old process closes while a request
    // is being sent on it is reset (as with any server that closes idle connections)
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_eq!(
        c.get(gw.url("http", "/a")).send().await.unwrap().status(),
        200
    );
    let mut new = gw.spawn_upgrade();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.signal(libc::SIGQUIT);
    // requests keep succeeding through the handover, until and after the old process is
    // gone (Pingora waits a few seconds, then the grace period, before exiting)
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    let mut after_exit = 0;
    let mut old_exit = None;
    while std::time::Instant::now() < deadline && after_exit < 10 {
        let r = c.get(gw.url("http", "/a")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        n += 1;
        if old_exit.is_none() {
            old_exit = gw.child.try_wait().unwrap();
        } else {
            after_exit += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = new.kill();
    let _ = new.wait();
    assert!(
        old_exit.is_some(),
        "the old process should have exited after its grace period"
    );
    assert!(n > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protective_limits_answer_431_413_408() {
    let up = Upstream::start("echo").await;
    let conf = format!(
        r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{{port:metrics}}"
[limits]
max_request_header_bytes = 2048
max_request_headers = 20
max_request_body_bytes = 1000
client_body_timeout_ms = 300
[[listeners]]
listen = "127.0.0.1:{{port:http}}"
[upstreams.echo]
targets = ["{}"]
[[routes]]
upstream = "echo"
[[routes]]
path_prefix = "/big"
upstream = "echo"
max_request_body_bytes = 100000
"#,
        up.addr()
    );
    let gw = Gw::start(&conf);
    let c = client();
    let (s, v, _) = get_json(&c, &gw.url("http", "/ok")).await;
    assert_eq!(s, 200, "{v}");
    // header size and count
    let r = c
        .get(gw.url("http", "/x"))
        .header("x-big", "a".repeat(3000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "request_headers_too_large"
    );
    let mut req = c.get(gw.url("http", "/x"));
    for i in 0..25 {
        req = req.header(format!("x-h{i}"), "1");
    }
    assert_eq!(req.send().await.unwrap().status(), 431);
    // body size: declared, and streamed without a length
    let r = c
        .post(gw.url("http", "/x"))
        .body("a".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "request_body_too_large"
    );
    use std::io::{Read, Write};
    let mut s = raw_client(gw.port("http"));
    write!(
        s,
        "POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for _ in 0..3 {
        write!(s, "1f4\r\n{}\r\n", "a".repeat(500)).unwrap();
    }
    let _ = write!(s, "0\r\n\r\n");
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 413"),
        "chunked body over the limit: {head}"
    );
    let r = c
        .post(gw.url("http", "/big/x"))
        .body("a".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "per-route limit");
    // a client that stops sending its body gets 408
    let mut s = raw_client(gw.port("http"));
    write!(
        s,
        "POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 500\r\n\r\nonly-a-little"
    )
    .unwrap();
    let t = std::time::Instant::now();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("client_timeout"), "{head}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

/// `HEAD` plus one `[limits]` line and a catch-all route to `up`.
fn echo_conf(limits: &str, up: &Upstream) -> String {
    HEAD.to_string()
        + &format!(
            "[limits]\n{limits}\n[upstreams.echo]\ntargets = [\"{}\"]\n[[routes]]\nupstream = \"echo\"\n",
            up.addr()
        )
}

/// A raw loopback connection with a 5 s read timeout, for byte-exact requests.
fn raw_client(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A response's status and body, `None` once the peer closed.
fn status_and_body(s: &mut std::net::TcpStream) -> Option<(u16, String)> {
    read_response(s).map(|(status, _, body)| (status, String::from_utf8_lossy(&body).into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_get_408_but_idle_keepalive_does_not() {
    use std::io::Write;
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&echo_conf("client_header_timeout_ms = 400", &up));
    let accepted = || async { metric(&gw.metrics().await, "wasmgate_connections_accepted_total") };
    let connect = || raw_client(gw.port("http"));

    // slowloris: every byte arrives well within any per-read timeout, the head never ends
    let mut s = connect();
    let mut w = s.try_clone().unwrap();
    let t = std::time::Instant::now();
    let trickler = std::thread::spawn(move || {
        let head = b"GET /x HTTP/1.1\r\nhost: t\r\nx-pad: ";
        for b in head.iter().chain(std::iter::repeat_n(&b'a', 100)) {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    let (status, body) = status_and_body(&mut s).expect("an answer before the close");
    assert_eq!(status, 408, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "client_timeout"
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    assert!(
        status_and_body(&mut s).is_none(),
        "the connection is closed"
    );
    trickler.join().unwrap();

    // a connection that never sends anything is closed without an answer
    let mut silent = connect();
    let t = std::time::Instant::now();
    assert!(status_and_body(&mut silent).is_none());
    assert!(t.elapsed() < Duration::from_secs(3));

    // idle time between kept-alive requests is not a slow head
    let before_keepalive = accepted().await;
    let mut ka = connect();
    for round in 0..3 {
        write!(ka, "GET /ka HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
        let (status, body) = status_and_body(&mut ka).expect("kept alive");
        assert_eq!(status, 200, "round {round}: {body}");
        std::thread::sleep(Duration::from_millis(700));
    }
    // a head that arrives in pieces but in time is served
    write!(ka, "GET /ka HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    write!(ka, "host: t\r\n\r\n").unwrap();
    assert_eq!(status_and_body(&mut ka).unwrap().0, 200);

    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "wasmgate_requests_total{route=\"-\",status=\"4xx\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        accepted().await - before_keepalive,
        1.0,
        "the kept-alive connection served every request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_timeout_is_the_operators() {
    use std::io::{Read, Write};
    let up = Upstream::start("echo").await;
    let conf = |secs: u64| echo_conf(&format!("client_keepalive_timeout_secs = {secs}"), &up);
    let mut gw = Gw::start(&conf(1));
    // waits for the gateway to close an idle `s`, which must take at least `min`
    let closes_after = |s: &mut std::net::TcpStream, min: u64| {
        let t = std::time::Instant::now();
        assert!(status_and_body(s).is_none(), "closed while idle");
        let idle = t.elapsed();
        assert!(
            idle >= Duration::from_millis(min) && idle < Duration::from_secs(3),
            "closed after {idle:?}"
        );
    };
    // idle past one second: closed by the gateway
    let mut s = raw_client(gw.port("http"));
    write!(s, "GET /a HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
    assert_eq!(status_and_body(&mut s).unwrap().0, 200);
    closes_after(&mut s, 900);
    // within the timeout it is reused, for longer than the timeout in all (the idle
    // clock armed at the first wait goes off mid-way and is moved, not obeyed)
    let mut s = raw_client(gw.port("http"));
    for _ in 0..6 {
        write!(s, "GET /a HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
        assert_eq!(status_and_body(&mut s).unwrap().0, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    // and closed once it is idle past it again (300 ms of it passed in the loop)
    closes_after(&mut s, 600);
    // the operator's keep-alive never reopens a connection RFC 9112 wants closed: after
    // a request with both Content-Length and Transfer-Encoding (in either order), what a
    // proxy in front reading the length took for body never runs as a request
    for framing in [
        "content-length: 42\r\ntransfer-encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 42",
    ] {
        let mut s = raw_client(gw.port("http"));
        write!(
            s,
            "POST /a HTTP/1.1\r\nhost: t\r\n{framing}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let raw = String::from_utf8_lossy(&raw);
        assert_eq!(
            raw.matches("HTTP/1.1 ").count(),
            1,
            "one answer, then closed: {raw}"
        );
        assert!(!raw.contains("smuggled"), "{raw}");
    }
    // 0 turns keep-alive off: one request per connection
    gw.rewrite_conf(&conf(0));
    gw.signal(libc::SIGHUP);
    let mut reloaded = false;
    for _ in 0..100 {
        if metric(&gw.metrics().await, "wasmgate_config_generation") == 2.0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(reloaded, "{}", gw.log());
    let mut s = raw_client(gw.port("http"));
    write!(s, "GET /a HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
    assert_eq!(status_and_body(&mut s).unwrap().0, 200);
    let t = std::time::Instant::now();
    assert!(status_and_body(&mut s).is_none());
    assert!(t.elapsed() < Duration::from_millis(500), "closed at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_reset_and_retry_on_another_target() {
    let good = Upstream::start("good").await;
    let resetting = Upstream::with(UpstreamOpts {
        name: "reset".into(),
        reset: true,
        ..Default::default()
    })
    .await;
    let (dead, _dead) = refusing_port();
    let conf = HEAD.to_string()
        + &format!(
            r#"
[upstreams.flaky]
targets = ["127.0.0.1:{dead}", "{}"]
retries = 1
connect_timeout_ms = 300
[upstreams.noretry]
targets = ["127.0.0.1:{dead}", "{}"]
retries = 0
[upstreams.reset]
targets = ["{}"]
[[routes]]
path_prefix = "/flaky"
upstream = "flaky"
[[routes]]
path_prefix = "/noretry"
upstream = "noretry"
[[routes]]
path_prefix = "/reset"
upstream = "reset"
"#,
            good.addr(),
            good.addr(),
            resetting.addr()
        );
    let gw = Gw::start(&conf);
    let c = client();
    // one target refuses: idempotent requests are retried on the other and all succeed
    for _ in 0..10 {
        let r = c.get(gw.url("http", "/flaky/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // without retries, half of them fail with 502
    let mut failed = 0;
    for _ in 0..10 {
        if c.get(gw.url("http", "/noretry/x"))
            .send()
            .await
            .unwrap()
            .status()
            == 502
        {
            failed += 1;
        }
    }
    assert_eq!(failed, 5);
    // POST is not idempotent: not retried
    let mut post_failed = 0;
    for _ in 0..4 {
        if c.post(gw.url("http", "/flaky/x"))
            .body("x")
            .send()
            .await
            .unwrap()
            .status()
            == 502
        {
            post_failed += 1;
        }
    }
    assert_eq!(post_failed, 2);
    // an upstream that drops the connection instead of answering: 502 upstream_error
    let (s, v, _) = get_json(&c, &gw.url("http", "/reset/x")).await;
    assert_eq!(s, 502, "{v}");
    assert!(
        v["error"] == "upstream_error" || v["error"] == "upstream_unreachable",
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_are_shed_with_503() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&echo_conf("max_connections = 4", &up));
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_eq!(
        c.get(gw.url("http", "/x")).send().await.unwrap().status(),
        200
    );
    // idle connections beyond the limit
    let idle: Vec<_> = (0..6)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", gw.port("http"))).unwrap())
        .collect();
    // counted exactly once accepted (no polling)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let open = metric(&gw.metrics().await, "wasmgate_open_connections");
    assert!((6.0..=7.0).contains(&open), "{open} open connections");
    let r = c.get(gw.url("http", "/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "too_many_connections"
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        c.get(gw.url("http", "/x")).send().await.unwrap().status(),
        200
    );
    let m = gw.metrics().await;
    assert!(metric(&m, "wasmgate_open_connections") <= 2.0, "{m}");
}

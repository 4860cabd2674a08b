//! The admin API's HTTP server through a real gateway: a client that stalls in its request
//! head is cut off after the head timeout (10 s) while others are served.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OP: &str = "operator-secret-for-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_admin_client_is_cut_off_while_others_are_served() {
    let up = Upstream::start("echo").await;
    let gw = Gw::start(&format!(
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
[upstreams.echo]
targets = ["{}"]
[[routes]]
path_prefix = "/"
upstream = "echo"
"#,
        up.addr()
    ));
    let admin = format!("127.0.0.1:{}", gw.port("admin"));
    let t = Instant::now();
    let mut half = tokio::net::TcpStream::connect(&admin).await.unwrap();
    half.write_all(b"GET /v1/tenants HTTP/1.1\r\nhost: x\r\nauthorization: Bea")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(&admin).await.unwrap();
    let c = client();
    for _ in 0..3 {
        let r = c
            .get(gw.url("admin", "/v1/tenants"))
            .bearer_auth(OP)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["connection"], "close");
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    for s in [&mut half, &mut silent] {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
            .await
            .expect("the stalled connection is closed");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(9) && waited < Duration::from_secs(15),
            "{waited:?}"
        );
        let a = String::from_utf8_lossy(&buf);
        assert!(!a.contains("200 OK"), "{a}");
    }
    // and the API still answers
    let r = c
        .get(gw.url("admin", "/v1/tenants"))
        .bearer_auth(OP)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

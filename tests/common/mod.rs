//! Test harness: real gateway processes on free loopback ports, real upstreams, real wasm.
//!
//! `Gw::start(conf)` writes the conf (with `{port:NAME}` placeholders replaced by free
//! ports, `{guests}` by the built guests' folder, and the admin API on a free port
//! `{port:admin}` unless the conf sets `[admin] listen`) into a temp dir, starts
//! `wasmgate serve` on it and waits until every listener accepts. Dropping it kills the
//! process it started.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
pub mod admin;
#[path = "../../examples/demo_upstream/upstream.rs"]
pub mod upstream;

pub use upstream::{Stats, UpstreamOpts};

/// The start most test confs share: no file watch, metrics and one HTTP listener on free
/// ports (`{port:metrics}`, `{port:http}`).
pub const HEAD: &str = r#"
[server]
watch_config = false
[metrics]
listen = "127.0.0.1:{port:metrics}"
[[listeners]]
listen = "127.0.0.1:{port:http}"
"#;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_wasmgate")
}

/// The checkout the tests run in: Cargo's runtime `CARGO_MANIFEST_DIR` (the compile-time
/// one may name another checkout that shares the target dir).
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Folder of the built guests; builds them once per test binary if missing.
pub fn guests() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = repo().join("guests/out");
            if !out.join("abi_probe.wasm").exists() {
                let st = Command::new(repo().join("scripts/build-guests.sh"))
                    .status()
                    .expect("run build-guests.sh");
                assert!(st.success(), "building guests failed");
            }
            out
        })
        .clone()
}

/// A free loopback port, never one this test process handed out before: tests run side
/// by side, and a port freed here could otherwise go to another test's gateway before
/// this one binds it (a node's listener then answered as another test's admin API).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A port where nothing listens, kept that way: a socket bound to it but never listening
/// refuses every connection, and holds the port so no other test's server takes it.
/// Keep the socket alive for as long as the port must stay dead.
pub fn refusing_port() -> (u16, tokio::net::TcpSocket) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (s.local_addr().unwrap().port(), s)
}

/// A real upstream on a free port, served from the test's runtime.
pub struct Upstream {
    pub port: u16,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::with(UpstreamOpts {
            name: name.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn with(opts: UpstreamOpts) -> Upstream {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(upstream::serve(l, opts, stats.clone()));
        Upstream { port, stats, task }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Gw {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub ports: HashMap<String, u16>,
    pub conf_path: PathBuf,
    log: Arc<Mutex<String>>,
}

/// Every gateway a test starts has its admin API on a free port: the default
/// (127.0.0.1:9092) would collide with another test's gateway or a running demo, and the
/// loser would silently run without an admin API.
fn admin_on_free_port(conf: &str) -> String {
    if !conf.contains("[admin]") {
        return format!("{conf}\n[admin]\nlisten = \"127.0.0.1:{{port:admin}}\"\n");
    }
    assert!(
        conf.contains("{port:admin}") || conf.contains("listen = \"\""),
        "a test conf with [admin] must listen on \"127.0.0.1:{{port:admin}}\" (or \"\")"
    );
    conf.to_string()
}

/// Replaces `{port:NAME}` (allocating a free port per new NAME) and `{guests}`, and puts
/// the admin API on a free port unless the conf places it.
pub fn render(conf: &str, ports: &mut HashMap<String, u16>) -> String {
    let conf = admin_on_free_port(conf);
    let mut out = String::new();
    let mut rest = conf.as_str();
    while let Some(i) = rest.find("{port:") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').unwrap() + i;
        let name = &rest[i + 6..end];
        let p = *ports.entry(name.to_string()).or_insert_with(free_port);
        out.push_str(&p.to_string());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out.replace("{guests}", &guests().display().to_string())
}

impl Gw {
    pub fn start(conf: &str) -> Gw {
        Self::start_in(tempfile::tempdir().unwrap(), conf, HashMap::new())
    }

    pub fn start_in(dir: tempfile::TempDir, conf: &str, mut ports: HashMap<String, u16>) -> Gw {
        let text = render(conf, &mut ports);
        let conf_path = dir.path().join("gw.toml");
        std::fs::write(&conf_path, text).unwrap();
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&conf_path)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wasmgate");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let gw = Gw {
            child,
            dir,
            ports,
            conf_path,
            log,
        };
        for p in gw.ports.values() {
            // only ports the gateway listens on matter; upstream ports are already open
            gw.wait_port(*p);
        }
        gw
    }

    fn wait_port(&self, port: u16) {
        // JavaScript and Python components take seconds each to compile before the
        // gateway listens
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("port {port} never opened; gateway log:\n{}", self.log());
    }

    /// Starts a second gateway on the same conf with `--upgrade`: it waits for this one's
    /// listening sockets, handed over when this one gets SIGQUIT.
    pub fn spawn_upgrade(&self) -> Child {
        Command::new(bin())
            .args(["serve", "--upgrade", "--config"])
            .arg(&self.conf_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start upgraded wasmgate")
    }

    /// Stops the gateway, keeping its folder and ports for a restart.
    pub fn stop(mut self) -> (tempfile::TempDir, HashMap<String, u16>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.ports.clone())
    }

    /// Stops the gateway with SIGTERM (a graceful shutdown, which saves state) and waits
    /// for it to exit, keeping its folder and ports for a restart.
    pub fn stop_gracefully(mut self) -> (tempfile::TempDir, HashMap<String, u16>) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // exited by itself: killed by a signal would mean no graceful path ran
                assert!(
                    st.code().is_some(),
                    "gateway died from a signal: {st:?}\n{}",
                    self.log()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.ports.clone())
    }

    pub fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    pub fn url(&self, name: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port(name), path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The first access log line (JSON on standard output) of route `route`.
    pub fn access_line(&self, route: &str) -> serde_json::Value {
        let needle = format!("\"route\":\"{route}\"");
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.starts_with('{') && l.contains(&needle))
            .unwrap_or_else(|| panic!("no access log line of route {route}:\n{log}"));
        serde_json::from_str(line).unwrap()
    }

    /// Waits until the gateway's log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Rewrites the conf file (same placeholders and ports).
    pub fn rewrite_conf(&mut self, conf: &str) {
        let text = render(conf, &mut self.ports);
        let tmp = self.conf_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.conf_path).unwrap();
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("metrics", "/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- gateway log ----\n{}", self.log());
        }
    }
}

/// Value of a counter line in Prometheus text (`name{labels} value`), 0 if absent.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Resident memory of a process, in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One HTTP/1.1 response read off a raw socket: status, head (lowercase) and its
/// Content-Length body. Reads the head byte by byte, so a pipelined response after it
/// stays in the socket. `None` once the peer closed (or the read timed out) first.
pub fn read_response(s: &mut std::net::TcpStream) -> Option<(u16, String, Vec<u8>)> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, head, body))
}

/// A `redis-server` this test starts on a free loopback port (append-only, so a restart
/// on the same folder keeps its data), stopped by its PID when dropped. The test scripts
/// install Redis; without it the test fails saying so.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port and folder.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP/2 client over TLS to the gateway's `https` listener (which presents `der`).
pub async fn h2_client(port: u16, der: Vec<u8>) -> h2::client::SendRequest<bytes::Bytes> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("gw.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

/// A test CA and a certificate for `name` it signed, written into `dir` as `ca.pem`,
/// `{name}.crt` and `{name}.key`; returns the three paths.
pub fn ca_signed(dir: &Path, name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let p = |n: &str| dir.join(n).display().to_string();
    let paths = (
        p("ca.pem"),
        p(&format!("{name}.crt")),
        p(&format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

/// A gateway whose TLS listener `https` (certificate for `name`, signed by a test CA)
/// proxies everything to `upstream`: a TLS upstream for other gateways. Returns it and the
/// CA's path.
pub fn tls_front(upstream: &str, name: &str) -> (Gw, String) {
    let dir = tempfile::tempdir().unwrap();
    let (_, crt, key) = ca_signed(dir.path(), name);
    let conf = format!(
        r#"
[server]
watch_config = false
[metrics]
listen = ""
[admin]
listen = ""
[[listeners]]
listen = "127.0.0.1:{{port:https}}"
tls = {{ certs = [{{ cert = "{crt}", key = "{key}", sni = ["{name}"] }}] }}
[upstreams.up]
targets = ["{upstream}"]
[[routes]]
upstream = "up"
"#
    );
    let gw = Gw::start_in(dir, &conf, Default::default());
    let ca = gw.dir().join("ca.pem").display().to_string();
    (gw, ca)
}

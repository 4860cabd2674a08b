//! Validation and lowering: from [`ConfFile`] to the immutable [`Snapshot`] the proxy reads.

use super::file::*;
use super::{ConfError, ConfErrors, Source};
use crate::metrics::Metrics;
use crate::route::{path_params, HeaderOps, Rewrite, Route};
use crate::routing::{PathPattern, RouteKey, Router};
use crate::tenant::TenantLimits;
use crate::upstream::{self, Balancer, Connect, HashKey, Timeouts, Upstream, UpstreamTls};
use crate::wasm::{self, FunctionBackend, FunctionSpec, HookChain, Plugin, PluginSpec};
use http::{HeaderName, HeaderValue, Method};
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// Everything one generation of the conf serves with. Immutable once built.
pub struct Snapshot {
    pub generation: u64,
    pub path: PathBuf,
    pub server: Server,
    pub metrics_listen: Option<SocketAddr>,
    pub access_log: AccessLog,
    pub admin: Admin,
    pub limits: Limits,
    /// Tenants declared in the conf, with their limits.
    pub tenants: BTreeMap<String, TenantLimits>,
    pub listeners: Vec<Listener>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub routes: Vec<Arc<Route>>,
    pub router: Router,
    /// Some route's upstream asks for HTTP/2: the fast path looks such requests up first.
    pub h2_routes: bool,
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    /// The `[node]` guests see.
    pub node: Arc<wasm::NodeInfo>,
    /// `[state]`: the backend is the first conf's (a change needs a restart); the limits
    /// follow reloads.
    pub state: crate::state::StateConf,
    /// `[cluster]`: read with the first conf (a change needs a restart).
    pub cluster: Option<Arc<crate::cluster::ClusterConf>>,
}

/// `[server]` as the process runs with it.
#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
    pub work_stealing: bool,
    pub fast_path: bool,
    pub grace_period: Duration,
    /// Resolved against the conf file's folder.
    pub data_dir: PathBuf,
    pub watch_config: bool,
}

/// `[admin]`: the admin API and the function namespace.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Empty: no admin API.
    pub listen: String,
    /// Where the operator token comes from when the conf does not hold it (named in logs).
    pub token_env: String,
    /// The operator token: `[admin] token`, else `$token_env`; never empty.
    pub token: Option<String>,
    pub functions: FunctionNames,
}

/// Where function URLs live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionNames {
    /// `{prefix}/{tenant}/{function}/...`: `""` or `/seg...` without a trailing slash;
    /// `""` leaves only hosts.
    pub prefix: String,
    /// `{function}.{tenant}.<base_domain>`, lowercase, without a trailing dot.
    pub base_domain: Option<String>,
}

/// `[limits]` on client connections and requests.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_body_bytes: u64,
    pub max_request_header_bytes: usize,
    pub max_request_headers: usize,
    pub client_header_timeout: Duration,
    /// Whole seconds, as Pingora takes it; zero turns keep-alive off.
    pub client_keepalive_timeout_secs: u64,
    pub client_body_timeout: Duration,
    pub max_connections: usize,
    pub max_buffered_response_bytes: usize,
}

/// `[access_log]`.
#[derive(Debug, Clone)]
pub struct AccessLog {
    pub enabled: bool,
    /// Resolved against the conf file's folder; standard output when absent.
    pub path: Option<PathBuf>,
}

/// The machine's host name (the default node id), or `wasmgate` when it has none.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wasmgate".to_string())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub addr: String,
    pub tls: Option<ListenerTls>,
    /// The address as parsed, to tell which listener a request came in on.
    pub local: Option<SocketAddr>,
    pub forwarded: Forwarded,
}

/// What a listener tells upstreams about the client (see `proxy::forwarded`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub mode: ForwardedMode,
    pub trusted: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedMode {
    /// Extend a trusted peer's headers with this hop; replace anyone else's.
    #[default]
    Append,
    /// Always start the headers afresh with this hop.
    Replace,
    /// Pass whatever the client sent, add nothing.
    Off,
}

impl Snapshot {
    /// The listener whose socket `local` is (a wildcard listen address matches by port).
    pub fn listener_at(&self, local: &SocketAddr) -> Option<&Listener> {
        self.listeners.iter().find(|l| {
            l.local.is_some_and(|a| {
                a.port() == local.port() && (a.ip() == local.ip() || a.ip().is_unspecified())
            })
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub certs: Vec<CertSpec>,
    pub http2: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub sni: Vec<String>,
}

/// What loading needs from the running process.
pub struct LoadEnv<'a> {
    pub metrics: &'a Metrics,
    pub wasm: &'a wasm::Runtime,
    pub generation: u64,
}

impl Snapshot {
    /// One line for `wasmgate check` and reload logs.
    pub fn summary(&self) -> String {
        // functions are held by their routes: count each once
        let mut functions: Vec<*const wasm::FunctionBackend> = (self.routes.iter())
            .filter_map(|r| r.backend.as_ref().map(Arc::as_ptr))
            .collect();
        functions.sort();
        functions.dedup();
        format!(
            "{}: ok: {} listener(s), {} upstream(s), {} route(s), {} filter(s), {} function(s)",
            self.path.display(),
            self.listeners.len(),
            self.upstreams.len(),
            self.routes.len(),
            self.plugins.len(),
            functions.len()
        )
    }

    /// Starts the background work the snapshot owns (health checks); call once published.
    pub fn start(&self) {
        for u in self.upstreams.values() {
            u.spawn_health_checks();
        }
        for p in self.plugins.values() {
            p.spawn_ticks();
        }
    }
}

/// A snapshot's plugins are its own (a reload builds new ones): when the last request
/// on it ends, they retire, which ends their timers and frees their idle VMs.
impl Drop for Snapshot {
    fn drop(&mut self) {
        for p in self.plugins.values() {
            p.retire();
        }
    }
}

/// Reads, validates and lowers the conf file at `path`.
pub fn load(path: &Path, env: &LoadEnv) -> Result<Snapshot, ConfErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfErrors(vec![ConfError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read conf file: {e}"),
        }])
    })?;
    load_str(path, &text, env)
}

pub fn load_str(path: &Path, text: &str, env: &LoadEnv) -> Result<Snapshot, ConfErrors> {
    let src = Source { path, text };
    let file: ConfFile = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        // The TOML parser cannot resynchronize after a syntax error (an unclosed string or
        // bracket changes the meaning of everything after it), and serde stops at the first
        // key of the wrong name or type; say so, so "one error" is not read as "the rest is
        // fine". Everything past parsing is reported all at once.
        let stop = if toml::from_str::<toml::Table>(text).is_err() {
            "(syntax error: the rest of the file was not checked)"
        } else {
            "(the rest of the file is checked once this is fixed)"
        };
        ConfErrors(vec![
            src.error(span, format!("{} {stop}", e.message().trim_end()))
        ])
    })?;
    Lowering {
        src: &src,
        env,
        base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        errors: Vec::new(),
    }
    .run(file)
}

struct Lowering<'a> {
    src: &'a Source<'a>,
    env: &'a LoadEnv<'a>,
    /// Relative paths in the conf are relative to the conf file's folder.
    base: PathBuf,
    errors: Vec<ConfError>,
}

impl Lowering<'_> {
    /// A conf tenant's limits: counts are at least 1 (0 would refuse every request; a
    /// limit left out is no limit), and the upstreams it names exist.
    fn tenant_limits(&mut self, name: &str, t: &TenantFile, f: &ConfFile) {
        for (key, v) in [
            ("rate_per_sec", &t.rate_per_sec),
            ("burst", &t.burst),
            ("max_concurrency", &t.max_concurrency),
        ] {
            if let Some(v) = v.as_ref().filter(|v| *v.get_ref() == 0) {
                self.err(
                    v,
                    format!("tenant `{name}`: {key} must be at least 1; leave it out for no limit"),
                );
            }
        }
        for u in &t.allowed_upstreams {
            if !f.upstreams.contains_key(u.get_ref()) {
                let defined = join_names(f.upstreams.keys());
                self.err(u, format!("tenant `{name}`: allowed upstream `{}` is not defined; defined upstreams: {defined}", u.get_ref()));
            }
        }
    }

    fn err<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>) {
        let e = self.src.error(s.span(), msg);
        self.errors.push(e);
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn run(mut self, f: ConfFile) -> Result<Snapshot, ConfErrors> {
        let metrics_listen = if f.metrics.listen.is_empty() {
            None
        } else {
            match f.metrics.listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.errors.push(self.src.error(
                        0..0,
                        format!(
                            "[metrics] listen: `{}` is not an address like 127.0.0.1:9091",
                            f.metrics.listen
                        ),
                    ));
                    None
                }
            }
        };
        if f.server.threads == 0 {
            self.errors
                .push(self.src.error(0..0, "[server] threads must be at least 1"));
        }
        for (name, ms) in [
            (
                "client_header_timeout_ms",
                &f.limits.client_header_timeout_ms,
            ),
            ("client_body_timeout_ms", &f.limits.client_body_timeout_ms),
        ] {
            if *ms.get_ref() == 0 {
                self.err(ms, format!("[limits] {name} must be at least 1 ms"));
            }
        }
        let fp = &f.admin.function_prefix;
        if !valid_function_prefix(fp.get_ref()) {
            self.err(
                fp,
                format!(
                    "[admin] function_prefix `{}` must be \"\" or a path like \"/run\": segments of a-z, A-Z, 0-9, -, _, ~ and ., no trailing /",
                    fp.get_ref()
                ),
            );
        }
        for (name, t) in &f.tenants {
            if !super::is_dns_label(name) {
                self.err(t, format!("tenant `{name}`: tenant names are DNS labels (they appear in function hosts): 1-63 of a-z, 0-9 and -, not starting or ending with -"));
            }
            self.tenant_limits(name, t.get_ref(), &f);
        }
        // compiled modules are cached under the data dir from the first load on
        if let Err(e) = self
            .env
            .wasm
            .set_cache_dir(&self.resolve(&f.server.data_dir).join("modules"))
        {
            self.errors
                .push(self.src.error(0..0, format!("[server] data_dir: {e:#}")));
        }
        // tenant state opens with the first conf, before modules are built: a filter's
        // configuration may name the tenant's secrets
        let cluster = f.cluster.as_ref().and_then(|c| self.cluster(c, &f.state));
        let mut state = self.state(&f.state, cluster.as_deref());
        if f.cluster.is_some() && cluster.is_none() {
            // a cluster conf with errors opens no state of its own meanwhile
            state = None;
        }
        if let (Some(state), Some(cluster)) = (&mut state, &cluster) {
            state.shared_key = Some(crate::cluster::derive_key(&cluster.key, "tenant secrets"));
        }
        if let Some(state) = &state {
            if let Err(e) = self
                .env
                .wasm
                .open_state(&self.resolve(&f.server.data_dir), state)
            {
                self.err(&f.state.backend, format!("[state]: {e:#}"));
            }
        }
        let listeners = self.listeners(&f.listeners);
        let upstreams = self.upstreams(&f.upstreams);
        let node = Arc::new(self.node(&f.node));
        // guests see the conf's node from on_configure on
        self.env.wasm.set_node(node.clone());
        let modules = self.plugins(&f, &upstreams);
        let (routes, router) = self.routes(&f, &upstreams, &modules);
        let plugins = modules.filters;
        let h2_routes = routes
            .iter()
            .any(|r| r.upstream.as_ref().is_some_and(|u| u.wants_h2()));
        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| (e.line, e.column));
            return Err(ConfErrors(self.errors));
        }
        let (server, admin, limits) = (f.server, f.admin, f.limits);
        Ok(Snapshot {
            generation: self.env.generation,
            path: self.src.path.to_path_buf(),
            server: Server {
                threads: server.threads,
                work_stealing: server.work_stealing,
                fast_path: server.fast_path,
                grace_period: Duration::from_secs(server.grace_period_secs),
                data_dir: self.resolve(&server.data_dir),
                watch_config: server.watch_config,
            },
            metrics_listen,
            // relative to the conf file, like every path in it
            access_log: AccessLog {
                enabled: f.access_log.enabled,
                path: f.access_log.path.as_deref().map(|p| self.resolve(p)),
            },
            admin: Admin {
                listen: admin.listen,
                token: admin
                    .token
                    .or_else(|| std::env::var(&admin.token_env).ok())
                    .filter(|t| !t.is_empty()),
                token_env: admin.token_env,
                functions: FunctionNames {
                    prefix: admin.function_prefix.into_inner(),
                    base_domain: admin
                        .base_domain
                        .map(|d| d.trim_end_matches('.').to_ascii_lowercase()),
                },
            },
            limits: Limits {
                max_request_body_bytes: limits.max_request_body_bytes,
                max_request_header_bytes: limits.max_request_header_bytes,
                max_request_headers: limits.max_request_headers,
                client_header_timeout: Duration::from_millis(
                    limits.client_header_timeout_ms.into_inner(),
                ),
                client_keepalive_timeout_secs: limits.client_keepalive_timeout_secs,
                client_body_timeout: Duration::from_millis(
                    limits.client_body_timeout_ms.into_inner(),
                ),
                max_connections: limits.max_connections,
                max_buffered_response_bytes: limits.max_buffered_response_bytes,
            },
            tenants: f
                .tenants
                .into_iter()
                .map(|(k, v)| (k, tenant_limits(v.into_inner())))
                .collect(),
            listeners,
            upstreams,
            routes,
            router: router.unwrap_or_default(),
            h2_routes,
            plugins,
            node,
            state: state.unwrap_or_default(),
            cluster,
        })
    }

    fn node(&mut self, n: &NodeSection) -> wasm::NodeInfo {
        let id = match &n.id {
            Some(id) => {
                let v = id.get_ref();
                if v.is_empty() || v.len() > 256 || v.chars().any(|c| c.is_control()) {
                    self.err(
                        id,
                        "[node] id must be 1-256 characters with no control characters",
                    );
                }
                v.clone()
            }
            None => host_name(),
        };
        let mut metadata = BTreeMap::new();
        for (k, v) in &n.metadata {
            if v.get_ref().len() > 4096 {
                self.err(v, format!("[node] metadata `{k}` is over 4096 bytes"));
            }
            metadata.insert(k.clone(), v.get_ref().clone());
        }
        wasm::NodeInfo {
            id,
            cluster: n.cluster.clone(),
            metadata,
        }
    }

    fn listeners(&mut self, list: &[Spanned<ListenerFile>]) -> Vec<Listener> {
        if list.is_empty() {
            self.errors.push(self.src.error(
                0..0,
                "no [[listeners]]: add one, e.g. [[listeners]] listen = \"127.0.0.1:8080\"",
            ));
        }
        let mut out = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, l) in list.iter().enumerate() {
            let lf = l.get_ref();
            let name = lf.name.clone().unwrap_or_else(|| format!("listener[{i}]"));
            let addr = lf.listen.get_ref().clone();
            if addr
                .to_socket_addrs()
                .map(|mut a| a.next().is_none())
                .unwrap_or(true)
            {
                self.err(
                    &lf.listen,
                    format!("listener `{name}`: listen `{addr}` is not a host:port address"),
                );
            }
            if let Some(prev) = seen.insert(addr.clone(), i) {
                self.err(
                    &lf.listen,
                    format!(
                        "listener `{name}`: address `{addr}` is already used by listener[{prev}]"
                    ),
                );
            }
            let tls = lf.tls.as_ref().map(|t| {
                if t.certs.is_empty() {
                    self.err(
                        &lf.listen,
                        format!("listener `{name}`: tls needs at least one entry in certs"),
                    );
                }
                let certs = t
                    .certs
                    .iter()
                    .map(|c| {
                        let cf = c.get_ref();
                        let spec = CertSpec {
                            cert: self.resolve(&cf.cert),
                            key: self.resolve(&cf.key),
                            sni: cf.sni.iter().map(|s| s.to_ascii_lowercase()).collect(),
                        };
                        if let Err(e) = crate::tls::load_certified_key(&spec.cert, &spec.key) {
                            self.err(c, format!("listener `{name}`: {e}"));
                        }
                        spec
                    })
                    .collect();
                ListenerTls {
                    certs,
                    http2: t.http2,
                }
            });
            let mode = match lf.forwarded.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("append") => ForwardedMode::Append,
                Some("replace") => ForwardedMode::Replace,
                Some("off") => ForwardedMode::Off,
                Some(other) => {
                    let span = lf.forwarded.as_ref().expect("some");
                    self.err(
                        span,
                        format!("listener `{name}`: forwarded is `append`, `replace` or `off`, not `{other}`"),
                    );
                    ForwardedMode::Append
                }
            };
            let mut trusted = Vec::new();
            for t in &lf.trusted_proxies {
                let text = t.get_ref();
                let net = text
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                match net {
                    Ok(n) => trusted.push(n),
                    Err(_) => self.err(
                        t,
                        format!("listener `{name}`: trusted proxy `{text}` is not an address or CIDR range"),
                    ),
                }
            }
            let local = addr.parse().ok();
            out.push(Listener {
                name,
                addr,
                tls,
                local,
                forwarded: Forwarded { mode, trusted },
            });
        }
        out
    }

    fn upstreams(
        &mut self,
        map: &BTreeMap<String, Spanned<UpstreamFile>>,
    ) -> BTreeMap<String, Arc<Upstream>> {
        let mut out = BTreeMap::new();
        for (name, u) in map {
            let uf = u.get_ref();
            if uf.targets.is_empty() {
                self.err(u, format!("upstream `{name}` has no targets"));
                continue;
            }
            let mut ok = true;
            for t in &uf.targets {
                if t.get_ref()
                    .to_socket_addrs()
                    .map(|mut a| a.next().is_none())
                    .unwrap_or(true)
                {
                    self.err(
                        t,
                        format!(
                            "upstream `{name}`: target `{}` is not a host:port address",
                            t.get_ref()
                        ),
                    );
                    ok = false;
                }
            }
            let hash_key = match (&uf.balance, &uf.hash_key) {
                (Balance::Hash, None) => Some(HashKey::ClientIp),
                (Balance::Hash, Some(k)) => match parse_hash_key(k.get_ref()) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        self.err(k, format!("upstream `{name}`: {e}"));
                        None
                    }
                },
                (Balance::RoundRobin, Some(k)) => {
                    self.err(
                        k,
                        format!("upstream `{name}`: hash_key needs balance = \"hash\""),
                    );
                    None
                }
                (Balance::RoundRobin, None) => None,
            };
            let tls = uf.tls.as_ref().and_then(|t| {
                let ca = match &t.ca {
                    None => None,
                    Some(p) => match crate::tls::load_ca(&self.resolve(p)) {
                        Ok(ca) => Some(ca),
                        Err(e) => {
                            self.err(u, format!("upstream `{name}`: {e}"));
                            return None;
                        }
                    },
                };
                Some(UpstreamTls {
                    sni: t.sni.clone(),
                    verify: t.verify,
                    ca,
                    http2: t.http2,
                })
            });
            if !ok {
                continue;
            }
            let addrs: Vec<String> = uf.targets.iter().map(|t| t.get_ref().clone()).collect();
            let mut balancer = match Balancer::new(&addrs, hash_key) {
                Ok(b) => b,
                Err(e) => {
                    self.err(u, format!("upstream `{name}`: {e}"));
                    continue;
                }
            };
            let health_interval = uf.health_check.as_ref().map(|h| {
                if h.kind == HealthKind::Http && !h.path.starts_with('/') {
                    self.err(
                        u,
                        format!("upstream `{name}`: health_check.path must start with /"),
                    );
                }
                balancer.set_health_check(upstream::health_check(
                    h.kind == HealthKind::Http,
                    &h.host,
                    &h.path,
                    Duration::from_millis(h.timeout_ms.max(1)),
                    h.healthy_threshold.max(1),
                    h.unhealthy_threshold.max(1),
                    tls.as_ref(),
                ));
                Duration::from_millis(h.interval_ms.max(10))
            });
            out.insert(
                name.clone(),
                Arc::new(Upstream {
                    name: name.as_str().into(),
                    balancer,
                    connect: Connect {
                        timeouts: Timeouts {
                            connect: Duration::from_millis(uf.connect_timeout_ms.max(1)),
                            read: Duration::from_millis(uf.read_timeout_ms.max(1)),
                            write: Duration::from_millis(uf.write_timeout_ms.max(1)),
                            idle: Duration::from_secs(uf.idle_timeout_secs),
                        },
                        tls,
                        pool_key: {
                            use std::hash::{Hash, Hasher};
                            let mut h = std::collections::hash_map::DefaultHasher::new();
                            name.hash(&mut h);
                            if let Some(ca) = uf.tls.as_ref().and_then(|t| t.ca.as_ref()) {
                                std::fs::read(self.resolve(ca))
                                    .unwrap_or_default()
                                    .hash(&mut h);
                            }
                            h.finish()
                        },
                    },
                    retries: uf.retries,
                    health_interval,
                    metrics: self.env.metrics.upstream(name),
                }),
            );
        }
        out
    }

    /// Loads every `[modules.NAME]`: a core module as a Proxy-Wasm filter, a component as
    /// a function backend.
    fn plugins(&mut self, f: &ConfFile, upstreams: &BTreeMap<String, Arc<Upstream>>) -> Modules {
        let mut out = BTreeMap::new();
        let mut functions = BTreeMap::new();
        for (name, m) in &f.modules {
            let mf = m.get_ref();
            let tenant_name = mf
                .tenant
                .as_ref()
                .map(|t| t.get_ref().clone())
                .unwrap_or_else(|| "default".into());
            let tenant = f.tenants.get(&tenant_name).map(|t| t.get_ref());
            if let (Some(t), None) = (&mf.tenant, tenant) {
                if t.get_ref() != "default" {
                    let defined = join_names(f.tenants.keys());
                    self.err(
                        t,
                        format!(
                            "module `{name}`: tenant `{}` is not defined; defined tenants: {defined}",
                            t.get_ref()
                        ),
                    );
                    continue;
                }
            }
            let wasm_path = self.resolve(mf.path.get_ref());
            let bytes = match std::fs::read(&wasm_path) {
                Ok(b) => b,
                Err(e) => {
                    self.err(
                        &mf.path,
                        format!(
                            "module `{name}`: cannot read `{}`: {e}",
                            wasm_path.display()
                        ),
                    );
                    continue;
                }
            };
            let function = wasm::component::is_component(&bytes);
            let memory_mb = mf.memory_mb.unwrap_or(if function {
                DEFAULT_FUNCTION_MEMORY_MB
            } else {
                wasm::DEFAULT_MEMORY_MB
            });
            if let Some(t) = tenant {
                if let Some(max) = (t.max_budget_us.as_ref().map(|m| *m.get_ref()))
                    .filter(|max| mf.budget_us > *max)
                {
                    self.err(m, format!("module `{name}`: budget_us {} exceeds tenant `{tenant_name}`'s max_budget_us {max}", mf.budget_us));
                }
                if let Some(max) =
                    (t.max_memory_mb.as_ref().map(|m| *m.get_ref())).filter(|max| memory_mb > *max)
                {
                    self.err(m, format!("module `{name}`: memory_mb {memory_mb} exceeds tenant `{tenant_name}`'s max_memory_mb {max}"));
                }
            }
            let action = mf.on_failure.action.as_ref();
            let policy = match wasm::FailurePolicy::parse(
                action.map_or("deny", |a| a.get_ref()),
                mf.on_failure.status,
                mf.on_failure.body.as_deref(),
            ) {
                Ok(p) => p,
                Err(e) => {
                    // a bad status without an action: the module's line
                    self.err(action.unwrap_or(&mf.path), format!("module `{name}`: {e}"));
                    continue;
                }
            };
            let mut allowed = Vec::new();
            for a in &mf.allowed_upstreams {
                match upstreams.get(a.get_ref()) {
                    Some(u) => allowed.push(u.clone()),
                    None => self.err(
                        a,
                        format!(
                            "module `{name}`: allowed upstream `{}` is not defined; defined upstreams: {}",
                            a.get_ref(),
                            join_names(upstreams.keys())
                        ),
                    ),
                }
            }
            if mf.budget_us == 0
                || memory_mb == 0
                || mf.max_instances == 0
                || mf.cpu_ms == 0
                || mf.requests_per_instance == 0
            {
                self.err(m, format!("module `{name}`: budget_us, cpu_ms, memory_mb, max_instances and requests_per_instance must be at least 1"));
                continue;
            }
            if !function && mf.requests_per_instance != 1 {
                self.err(m, format!("module `{name}`: requests_per_instance applies to functions (components); a filter's instances are chosen by `isolation`"));
                continue;
            }
            if !function && mf.max_response_bytes != wasm::DEFAULT_MAX_RESPONSE_BYTES {
                self.err(m, format!("module `{name}`: max_response_bytes applies to functions (components); a filter's responses are the upstream's"));
                continue;
            }
            if let Some(max) = tenant
                .and_then(|t| t.max_module_bytes.as_ref().map(|m| *m.get_ref()))
                .filter(|max| bytes.len() as u64 > *max)
            {
                self.err(&mf.path, format!("module `{name}`: {} bytes exceeds tenant `{tenant_name}`'s max_module_bytes {max}", bytes.len()));
                continue;
            }
            if function {
                let spec = FunctionSpec {
                    name: name.clone(),
                    tenant: tenant_name,
                    limits: wasm::component::Limits {
                        memory_bytes: memory_mb.saturating_mul(1024 * 1024) as usize,
                        cpu: Duration::from_millis(mf.cpu_ms),
                        deadline: Duration::from_millis(mf.deadline_ms.max(1)),
                        max_instances: mf.max_instances,
                        requests_per_instance: u32::try_from(mf.requests_per_instance)
                            .unwrap_or(u32::MAX),
                    },
                    policy,
                    allowed_upstreams: allowed,
                    max_response_bytes: mf.max_response_bytes,
                };
                match self.env.wasm.function(spec, &bytes) {
                    Ok(f) => {
                        functions.insert(name.clone(), f);
                    }
                    Err(e) => self.err(&mf.path, format!("module `{name}`: {e}")),
                }
                continue;
            }
            let spec = PluginSpec {
                name: name.clone(),
                tenant: tenant_name,
                root_id: mf.root_id.clone(),
                config: value_bytes(mf.config.as_ref()),
                vm_config: value_bytes(mf.vm_config.as_ref()),
                isolation: mf.isolation.into(),
                policy,
                limits: wasm::FilterLimits {
                    budget: Duration::from_micros(mf.budget_us),
                    request_budget: Duration::from_micros(
                        mf.request_budget_us
                            .unwrap_or(mf.budget_us.saturating_mul(8)),
                    ),
                    memory_bytes: memory_mb.saturating_mul(1024 * 1024),
                    max_instances: mf.max_instances,
                    min_tick: Duration::from_millis(mf.min_tick_ms.max(1)),
                },
                allowed_upstreams: allowed,
            };
            match self.env.wasm.plugin(spec, &bytes, self.env.metrics) {
                Ok(p) => {
                    out.insert(name.clone(), p);
                }
                Err(e) => self.err(&mf.path, format!("module `{name}`: {e}")),
            }
        }
        Modules {
            filters: out,
            functions,
        }
    }

    fn routes(
        &mut self,
        f: &ConfFile,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        modules: &Modules,
    ) -> (Vec<Arc<Route>>, Option<Router>) {
        let mut routes = Vec::new();
        let mut keys = Vec::new();
        let mut names = Vec::new();
        let mut spans = Vec::new();
        for (i, r) in f.routes.iter().enumerate() {
            let rf = r.get_ref();
            let name = rf.name.clone().unwrap_or_else(|| format!("route[{i}]"));
            let before = self.errors.len();
            let path = match (&rf.path, &rf.path_prefix) {
                (Some(p), None) => self.check_path(p, &name).map(PathPattern::Exact),
                (None, Some(p)) => {
                    if p.get_ref().contains('{') {
                        self.err(p, format!("route `{name}`: path_prefix cannot have {{param}} segments; use path"));
                        None
                    } else {
                        self.check_path(p, &name).map(PathPattern::Prefix)
                    }
                }
                (Some(p), Some(_)) => {
                    self.err(
                        p,
                        format!("route `{name}`: set either path or path_prefix, not both"),
                    );
                    None
                }
                (None, None) => Some(PathPattern::Prefix("/".into())),
            };
            let in_namespace = match (&path, &rf.path, &rf.path_prefix) {
                (Some(pat), Some(at), _) | (Some(pat), None, Some(at)) => {
                    overlaps_functions(pat, f.admin.function_prefix.get_ref()).then_some(at)
                }
                _ => None,
            };
            if let Some(at) = in_namespace {
                self.err(
                    at,
                    format!(
                        "route `{name}`: path `{}` lies in the function namespace `{}` ([admin] function_prefix), where only function URLs answer; move the route or change function_prefix",
                        at.get_ref(),
                        f.admin.function_prefix.get_ref()
                    ),
                );
            }
            if let (Some(h), Some(base)) = (&rf.host, &f.admin.base_domain) {
                if is_function_host(h.get_ref(), base) {
                    self.err(
                        h,
                        format!(
                            "route `{name}`: host `{}` lies in the function namespace `{{function}}.{{tenant}}.{base}` ([admin] base_domain), where only function URLs answer",
                            h.get_ref()
                        ),
                    );
                }
            }
            if let Some(h) = &rf.host {
                let host = h.get_ref();
                let bad = host.is_empty()
                    || host.contains(['/', ':', ' '])
                    || (host.contains('*')
                        && !(host.starts_with("*.") && host[2..].find('*').is_none()));
                if bad {
                    self.err(h, format!("route `{name}`: host `{host}` must be a name like api.example.com or *.example.com (no port)"));
                }
            }
            let mut methods = Vec::new();
            for m in &rf.methods {
                match Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes()) {
                    Ok(mm) => methods.push(mm),
                    Err(_) => self.err(
                        m,
                        format!("route `{name}`: `{}` is not an HTTP method", m.get_ref()),
                    ),
                }
            }
            let upstream = rf.upstream.as_ref().and_then(|u| match upstreams.get(u.get_ref()) {
                Some(up) => Some(up.clone()),
                None => {
                    let defined = join_names(f.upstreams.keys());
                    self.err(
                        u,
                        format!(
                            "upstream `{}` in route `{name}` is not defined; defined upstreams: {defined}",
                            u.get_ref()
                        ),
                    );
                    None
                }
            });
            let mut hooks = Vec::new();
            let mut backend = None;
            for (k, h) in rf.hooks.iter().enumerate() {
                if let Some(b) = modules.functions.get(h.get_ref()) {
                    // a function answers the request: after the filters, instead of an upstream
                    if k + 1 != rf.hooks.len() || rf.upstream.is_some() {
                        self.err(h, format!("route `{name}`: `{}` is a function (a WASI-HTTP component): it answers the request, so it comes last and the route has no upstream", h.get_ref()));
                    }
                    backend = Some(b.clone());
                    continue;
                }
                match modules.filters.get(h.get_ref()) {
                    Some(p) => hooks.push(p.clone()),
                    None if f.modules.contains_key(h.get_ref()) => {} // its own error was reported
                    None => self.err(
                        h,
                        format!(
                            "module `{}` in route `{name}` is not defined; defined modules: {}",
                            h.get_ref(),
                            join_names(f.modules.keys())
                        ),
                    ),
                }
            }
            if let Some(t) = &rf.tenant {
                if !f.tenants.contains_key(t.get_ref()) {
                    self.err(
                        t,
                        format!(
                            "route `{name}`: tenant `{}` is not defined; defined tenants: {}",
                            t.get_ref(),
                            join_names(f.tenants.keys())
                        ),
                    );
                }
            }
            if rf.upstream.is_none() && rf.hooks.is_empty() {
                self.err(
                    r,
                    format!("route `{name}` has neither an upstream nor hooks to answer it"),
                );
            }
            let rewrite = rf
                .rewrite
                .as_ref()
                .and_then(|rw| self.rewrite(rw, &path, &name, r));
            let request_headers = self.header_ops(&rf.request_headers, &name, r);
            let response_headers = self.header_ops(&rf.response_headers, &name, r);
            if self.errors.len() > before {
                continue;
            }
            let Some(path) = path else { continue };
            keys.push(RouteKey {
                host: rf.host.as_ref().map(|h| h.get_ref().clone()),
                path,
                methods,
            });
            names.push(name.clone());
            spans.push(r.span());
            routes.push(Arc::new(Route {
                metrics: self.env.metrics.route(&name),
                name: name.into(),
                upstream,
                rewrite,
                request_headers,
                response_headers,
                hooks: HookChain::new(hooks),
                backend,
                max_request_body: rf
                    .max_request_body_bytes
                    .unwrap_or(f.limits.max_request_body_bytes),
                tenant: rf.tenant.as_ref().map(|t| t.get_ref().clone()),
            }));
        }
        let mut seen = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            if let Some(prev) = seen.insert(n.clone(), i) {
                let _ = prev;
                self.errors.push(
                    self.src
                        .error(spans[i].clone(), format!("route name `{n}` is used twice")),
                );
            }
        }
        match Router::build(&keys, &names) {
            Ok(router) => (routes, Some(router)),
            Err(errs) => {
                for e in errs {
                    self.errors
                        .push(self.src.error(spans[e.route].clone(), e.message));
                }
                (routes, None)
            }
        }
    }

    fn check_path(&mut self, p: &Spanned<String>, name: &str) -> Option<String> {
        let path = p.get_ref();
        if !path.starts_with('/') {
            self.err(
                p,
                format!("route `{name}`: path `{path}` must start with /"),
            );
            return None;
        }
        if path.contains(['?', '#', ' ']) || path.contains("{*") {
            self.err(p, format!("route `{name}`: path `{path}` may contain only segments and {{param}} segments"));
            return None;
        }
        Some(path.clone())
    }

    fn rewrite<T>(
        &mut self,
        rw: &RewriteFile,
        path: &Option<PathPattern>,
        name: &str,
        at: &Spanned<T>,
    ) -> Option<Rewrite> {
        let chosen =
            rw.strip_prefix as u8 + rw.replace_prefix.is_some() as u8 + rw.path.is_some() as u8;
        if chosen != 1 {
            self.err(at, format!("route `{name}`: rewrite needs exactly one of strip_prefix, replace_prefix, path"));
            return None;
        }
        if let Some(t) = &rw.path {
            let known = match path {
                Some(PathPattern::Exact(p)) => path_params(p),
                _ => Vec::new(),
            };
            if !t.get_ref().starts_with('/') {
                self.err(t, format!("route `{name}`: rewrite path must start with /"));
                return None;
            }
            return match Rewrite::template(t.get_ref(), &known) {
                Ok(r) => Some(r),
                Err(e) => {
                    self.err(t, format!("route `{name}`: {e}"));
                    None
                }
            };
        }
        let Some(PathPattern::Prefix(prefix)) = path else {
            self.err(
                at,
                format!("route `{name}`: strip_prefix and replace_prefix need a path_prefix route"),
            );
            return None;
        };
        let to = rw.replace_prefix.clone().unwrap_or_default();
        if !to.is_empty() && !to.starts_with('/') {
            self.err(
                at,
                format!("route `{name}`: replace_prefix must start with /"),
            );
            return None;
        }
        Some(Rewrite::Prefix {
            from: prefix.trim_end_matches('/').to_string(),
            to: to.trim_end_matches('/').to_string(),
        })
    }

    fn header_ops<T>(&mut self, h: &HeaderOpsFile, route: &str, at: &Spanned<T>) -> HeaderOps {
        let mut ops = HeaderOps::default();
        let pair = |this: &mut Self, k: &str, v: &str| -> Option<(HeaderName, HeaderValue)> {
            let n = HeaderName::from_bytes(k.as_bytes());
            let val = HeaderValue::from_str(v);
            match (n, val) {
                (Ok(n), Ok(v)) => Some((n, v)),
                (Err(_), _) => {
                    this.err(
                        at,
                        format!("route `{route}`: `{k}` is not a valid header name"),
                    );
                    None
                }
                (_, Err(_)) => {
                    this.err(
                        at,
                        format!("route `{route}`: value of header `{k}` is not valid"),
                    );
                    None
                }
            }
        };
        ops.set = h.set.iter().filter_map(|(k, v)| pair(self, k, v)).collect();
        ops.add = h.add.iter().filter_map(|(k, v)| pair(self, k, v)).collect();
        for k in &h.remove {
            match HeaderName::from_bytes(k.as_bytes()) {
                Ok(n) => ops.remove.push(n),
                Err(_) => self.err(
                    at,
                    format!("route `{route}`: `{k}` is not a valid header name"),
                ),
            }
        }
        ops
    }
}

fn parse_hash_key(k: &str) -> Result<HashKey, String> {
    match k {
        "client_ip" => Ok(HashKey::ClientIp),
        "path" => Ok(HashKey::Path),
        _ => match k.strip_prefix("header:") {
            Some(h) => HeaderName::from_bytes(h.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("hash_key `{k}`: `{h}` is not a header name")),
            None => Err(format!(
                "hash_key `{k}` is not one of client_ip, path, header:<name>"
            )),
        },
    }
}

/// Plugin and VM configuration as the guest receives it: strings as is, tables as JSON.
fn value_bytes(v: Option<&toml::Value>) -> Vec<u8> {
    match v {
        None => Vec::new(),
        Some(toml::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => serde_json::to_vec(other).unwrap_or_default(),
    }
}

/// `""` (no path form) or `/seg[/seg...]` of URL-safe characters: compared against
/// normalized request paths, so dot segments and empty segments could never match.
fn valid_function_prefix(p: &str) -> bool {
    p.is_empty()
        || (p.starts_with('/')
            && p[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_~.".contains(&b))
            }))
}

/// Whether some path the route matches falls under the function prefix. Function URLs are
/// looked up before the routes, so such a route would be (partly) unreachable. A route
/// that merely covers the namespace (`path_prefix = "/"`) keeps everything else.
fn overlaps_functions(pat: &PathPattern, prefix: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let fsegs: Vec<&str> = prefix[1..].split('/').collect();
    let (p, params) = match pat {
        PathPattern::Exact(p) => (p, true),
        PathPattern::Prefix(p) => (p, false),
    };
    let rsegs: Vec<&str> = p.trim_start_matches('/').split('/').collect();
    rsegs.len() >= fsegs.len()
        && fsegs
            .iter()
            .zip(&rsegs)
            .all(|(f, r)| f == r || (params && r.starts_with('{')))
}

/// `a.b.<base>` and `*.b.<base>`: hosts of the form `{function}.{tenant}.<base>`.
fn is_function_host(host: &str, base: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let base = base.trim_end_matches('.').to_ascii_lowercase();
    host.strip_suffix(base.as_str())
        .and_then(|p| p.strip_suffix('.'))
        .is_some_and(|p| p.split('.').count() == 2 && p.split('.').all(|l| !l.is_empty()))
}

fn join_names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = it.map(|s| s.as_str()).collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

/// The conf's modules, loaded.
struct Modules {
    filters: BTreeMap<String, Arc<Plugin>>,
    functions: BTreeMap<String, Arc<FunctionBackend>>,
}

impl Lowering<'_> {
    /// `[cluster]`, checked: a Redis URL (its own or `[state]`'s), the cluster key in
    /// the environment.
    fn cluster(
        &mut self,
        c: &Spanned<ClusterSection>,
        state: &StateSection,
    ) -> Option<Arc<crate::cluster::ClusterConf>> {
        let sec = c.get_ref();
        let url = match (&sec.url, &state.url) {
            (Some(u), _) if !u.get_ref().starts_with("redis://") => {
                self.err(u, "[cluster] url: a Redis URL starts with `redis://`");
                return None;
            }
            (Some(u), _) => u.get_ref().clone(),
            (None, Some(u)) if state.backend.get_ref() == "redis" => u.get_ref().clone(),
            (None, _) => {
                self.err(
                    c,
                    "[cluster] needs a `url` (or `[state] backend = \"redis\"` with one)",
                );
                return None;
            }
        };
        if state.backend.span() != (0..0) && state.backend.get_ref() != "redis" {
            self.err(
                &state.backend,
                "[cluster]: every node must share tenant state and secrets, so `[state] backend` must be \"redis\" (or left out: it then uses the cluster's Redis)",
            );
        }
        for (v, what) in [
            (&sec.sync_interval_ms, "sync_interval_ms"),
            (&sec.timeout_ms, "timeout_ms"),
        ] {
            if *v.get_ref() == 0 {
                self.err(v, format!("[cluster] {what} must be at least 1"));
            }
        }
        use base64::Engine as _;
        let key = match std::env::var(&sec.key_env) {
            Ok(k) if !k.trim().is_empty() => {
                match base64::engine::general_purpose::STANDARD.decode(k.trim()) {
                    Ok(b) if b.len() >= 32 => b,
                    Ok(b) => {
                        self.err(
                            c,
                            format!(
                                "[cluster] the key in ${} is {} bytes; it needs at least 32",
                                sec.key_env,
                                b.len()
                            ),
                        );
                        return None;
                    }
                    Err(e) => {
                        self.err(
                            c,
                            format!("[cluster] the key in ${} is not base64: {e}", sec.key_env),
                        );
                        return None;
                    }
                }
            }
            _ => {
                self.err(c, format!("[cluster] needs the cluster key (the same on every node; e.g. `openssl rand -base64 32`) in ${}", sec.key_env));
                return None;
            }
        };
        Some(Arc::new(crate::cluster::ClusterConf {
            url,
            prefix: sec.prefix.clone().unwrap_or_else(|| state.prefix.clone()),
            key: Arc::new(key),
            sync_interval: Duration::from_millis((*sec.sync_interval_ms.get_ref()).max(1)),
            timeout: Duration::from_millis((*sec.timeout_ms.get_ref()).max(1)),
        }))
    }

    /// `[state]`, checked: a known backend, a Redis URL when it is Redis's. In a cluster,
    /// a `[state]` that names no backend is the cluster's Redis.
    fn state(
        &mut self,
        s: &StateSection,
        cluster: Option<&crate::cluster::ClusterConf>,
    ) -> Option<crate::state::StateConf> {
        use crate::state::{BackendConf, StateConf, StateLimits};
        let redis = |url: &str| BackendConf::Redis {
            url: url.to_string(),
            prefix: s.prefix.clone(),
            timeout: Duration::from_millis(*s.timeout_ms.get_ref()),
        };
        let backend = match (s.backend.get_ref().as_str(), cluster) {
            (_, Some(c)) if s.backend.span() == (0..0) => redis(&c.url),
            ("embedded", _) => BackendConf::Embedded,
            ("redis", _) => match &s.url {
                Some(url) if url.get_ref().starts_with("redis://") => redis(url.get_ref()),
                Some(url) => {
                    self.err(url, "[state] url: a Redis URL starts with `redis://`");
                    return None;
                }
                None => {
                    self.err(&s.backend, "[state] backend = \"redis\" needs a `url`");
                    return None;
                }
            },
            (other, _) => {
                self.err(
                    &s.backend,
                    format!("[state] backend `{other}` is not known; use `embedded` or `redis`"),
                );
                return None;
            }
        };
        if *s.timeout_ms.get_ref() == 0 {
            self.err(&s.timeout_ms, "[state] timeout_ms must be at least 1");
        }
        Some(StateConf {
            backend,
            limits: StateLimits {
                max_key_bytes: s.max_key_bytes,
                max_value_bytes: s.max_value_bytes,
                max_total_bytes: s.max_bytes,
                ops_per_sec: s.ops_per_sec,
            },
            shared_key: None,
        })
    }
}

/// The runtime limits of a conf tenant (checked by `Lowering::tenant_limits`).
fn tenant_limits(t: TenantFile) -> TenantLimits {
    let value = |v: Option<Spanned<u64>>| v.map(Spanned::into_inner);
    let count = |v: Option<Spanned<u32>>| v.map(Spanned::into_inner);
    TenantLimits {
        max_budget_us: value(t.max_budget_us),
        max_memory_mb: value(t.max_memory_mb),
        max_module_bytes: value(t.max_module_bytes),
        rate_per_sec: count(t.rate_per_sec),
        burst: count(t.burst),
        max_concurrency: count(t.max_concurrency),
        state_max_bytes: value(t.state_max_bytes),
        state_ops_per_sec: count(t.state_ops_per_sec),
        state_max_key_bytes: value(t.state_max_key_bytes),
        state_max_value_bytes: value(t.state_max_value_bytes),
        allowed_upstreams: t
            .allowed_upstreams
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
    }
}

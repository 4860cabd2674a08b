//! The conf file as written by the operator: serde structs, one per TOML table.
//!
//! Every struct denies unknown fields so a typo is an error, not a silently ignored key.
//! Fields that later validation must point at are `Spanned`, so errors carry a line.
//! Nothing here is validated beyond what serde checks; see `validate.rs`.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfFile {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub access_log: AccessLogSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub listeners: Vec<Spanned<ListenerFile>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<UpstreamFile>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteFile>>,
    /// Wasm modules (Proxy-Wasm filters) that routes chain by name.
    #[serde(default)]
    pub modules: BTreeMap<String, Spanned<ModuleFile>>,
    /// Tenants that own modules. A module without a tenant belongs to `default`.
    #[serde(default)]
    pub tenants: BTreeMap<String, Spanned<TenantFile>>,
    /// This gateway as guests see it in Envoy's `node` property.
    #[serde(default)]
    pub node: NodeSection,
    /// Where tenant state and secrets live.
    #[serde(default)]
    pub state: StateSection,
    /// Nodes sharing one platform through Redis; absent: a standalone node.
    pub cluster: Option<Spanned<ClusterSection>>,
}

/// `[cluster]`: what tenants do at runtime (tenants, deploys, tokens, secrets, usage, rate
/// limits) is shared by every node through Redis; the conf stays each node's own.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `redis://…`; absent: `[state]`'s (which must then be Redis).
    pub url: Option<Spanned<String>>,
    /// Prefix of the cluster's Redis keys; absent: `[state]`'s.
    pub prefix: Option<String>,
    /// The environment variable holding the cluster key (base64, 32 bytes or more), the
    /// same on every node.
    pub key_env: String,
    /// How often a node checks for changes it may have missed (ms).
    pub sync_interval_ms: Spanned<u64>,
    /// Longest one Redis call may take (ms).
    pub timeout_ms: Spanned<u64>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            url: None,
            prefix: None,
            key_env: crate::cluster::KEY_ENV.into(),
            sync_interval_ms: Spanned::new(0..0, 500),
            timeout_ms: Spanned::new(0..0, 500),
        }
    }
}

/// `[state]`: the key-value store and secrets backend, and every tenant's default limits
/// on it (a tenant's own `state_*` keys override them).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSection {
    /// `embedded` (a file in `data_dir/state`) or `redis`.
    pub backend: Spanned<String>,
    /// `redis://[user:password@]host:port/db`, for `backend = "redis"`.
    pub url: Option<Spanned<String>>,
    /// Prefix of every Redis key the gateway writes.
    pub prefix: String,
    /// Longest a state call waits for Redis (ms).
    pub timeout_ms: Spanned<u64>,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Bytes (keys and values) one tenant may store.
    pub max_bytes: u64,
    /// State operations a tenant may make per second (0: no limit).
    pub ops_per_sec: u32,
}

impl Default for StateSection {
    fn default() -> Self {
        let l = crate::state::StateLimits::default();
        StateSection {
            backend: Spanned::new(0..0, "embedded".into()),
            url: None,
            prefix: "wasmgate".into(),
            timeout_ms: Spanned::new(0..0, 500),
            max_key_bytes: l.max_key_bytes,
            max_value_bytes: l.max_value_bytes,
            max_bytes: l.max_total_bytes,
            ops_per_sec: l.ops_per_sec,
        }
    }
}

/// `[node]`: the proxy's identity for guests (`node.id`, `node.cluster`,
/// `node.metadata.<key>`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node id; the machine's host name when absent.
    pub id: Option<Spanned<String>>,
    #[serde(default)]
    pub cluster: String,
    /// String values only, like the `Struct` an Envoy bootstrap usually carries.
    #[serde(default)]
    pub metadata: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// Let idle workers steal tasks from busy ones (tokio multi-thread). Off by default:
    /// on small machines the per-thread runtimes are cheaper.
    pub work_stealing: bool,
    /// Seconds to keep serving in-flight requests after SIGTERM / graceful upgrade.
    pub grace_period_secs: u64,
    /// Directory for precompiled modules and deployed state.
    pub data_dir: String,
    /// Re-read the conf file when it changes on disk (debounced), besides SIGHUP.
    pub watch_config: bool,
    /// Serve bodiless HTTP/1.1 requests on the fast path (`proxy/fast.rs`); off, Pingora's
    /// proxy serves every request. Read for each new client connection.
    pub fast_path: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: 1,
            work_stealing: false,
            grace_period_secs: 5,
            data_dir: "data".into(),
            watch_config: true,
            fast_path: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus `/metrics` listener; empty string disables it.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: "127.0.0.1:9091".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin API; empty disables it. Loopback by default.
    pub listen: String,
    /// Environment variable holding the operator token (never put secrets in the conf
    /// file unless it is protected like one).
    pub token_env: String,
    /// The operator token itself, when not taken from the environment.
    pub token: Option<String>,
    /// Function URLs by host: `{function}.{tenant}.<base_domain>`.
    pub base_domain: Option<String>,
    /// Path namespace of function URLs: `{function_prefix}/{tenant}/{function}/...`.
    /// Everything under it belongs to functions (unknown ones get 404 `no_function`), so
    /// tenants can never take over a conf route; `""` leaves only the host form.
    pub function_prefix: Spanned<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:9092".into(),
            token_env: "WASMGATE_ADMIN_TOKEN".into(),
            token: None,
            base_domain: None,
            function_prefix: Spanned::new(0..0, "/run".into()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSection {
    #[serde(default)]
    pub enabled: bool,
    /// File to append JSON lines to; standard output when absent.
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest request body accepted on routes that do not set their own (bytes).
    pub max_request_body_bytes: u64,
    /// Largest request head (request line and headers), in bytes: 431 beyond.
    pub max_request_header_bytes: usize,
    /// Most request headers: 431 beyond.
    pub max_request_headers: usize,
    /// How long the client may take to send a whole request head (from accept, or from
    /// the first byte of a later request on a kept-alive connection): 408 beyond.
    pub client_header_timeout_ms: Spanned<u64>,
    /// How long a kept-alive client connection may sit idle between requests before it is
    /// closed (whole seconds); 0 turns keep-alive off.
    pub client_keepalive_timeout_secs: u64,
    /// How long the client may take to send each piece of its body: 408 beyond.
    pub client_body_timeout_ms: Spanned<u64>,
    /// Open client connections beyond which new requests get 503 and their connection
    /// closed (counted every 100 ms); 0 disables the check.
    pub max_connections: usize,
    /// Most response body a hook may hold back (buffering it to read it whole); beyond
    /// it the buffering module fails with `response_body_too_large`.
    pub max_buffered_response_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_request_body_bytes: 8 * 1024 * 1024,
            max_request_header_bytes: 32 * 1024,
            max_request_headers: 100,
            client_header_timeout_ms: Spanned::new(0..0, 10_000),
            client_keepalive_timeout_secs: DEFAULT_KEEPALIVE_SECS,
            client_body_timeout_ms: Spanned::new(0..0, 10_000),
            max_connections: 10_000,
            max_buffered_response_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Pingora's own idle keep-alive timeout; the gateway only overrides a different value.
pub const DEFAULT_KEEPALIVE_SECS: u64 = 60;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: Option<String>,
    pub listen: Spanned<String>,
    pub tls: Option<ListenerTlsFile>,
    /// X-Forwarded-For/-Proto/-Host and Forwarded sent upstream: `append` (the default),
    /// `replace` or `off`.
    pub forwarded: Option<Spanned<String>>,
    /// Peers (addresses or CIDR ranges) whose forwarding headers are believed and
    /// extended; anyone else's are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    /// Certificates; the first is the default when no SNI name matches.
    pub certs: Vec<Spanned<CertFile>>,
    /// Offer HTTP/2 through ALPN (h2, then http/1.1).
    #[serde(default = "yes")]
    pub http2: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    pub cert: String,
    pub key: String,
    /// Server names this certificate answers (exact or `*.example.com`). Empty: taken
    /// from nothing, usable only as the default certificate.
    #[serde(default)]
    pub sni: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Hash,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub targets: Vec<Spanned<String>>,
    #[serde(default)]
    pub balance: Balance,
    /// With `balance = "hash"`: what to hash: `client_ip`, `path`, or `header:<name>`.
    pub hash_key: Option<Spanned<String>>,
    #[serde(default = "num::<1000>")]
    pub connect_timeout_ms: u64,
    #[serde(default = "num::<30_000>")]
    pub read_timeout_ms: u64,
    #[serde(default = "num::<30_000>")]
    pub write_timeout_ms: u64,
    /// How long an idle pooled connection to this upstream is kept.
    #[serde(default = "num::<60>")]
    pub idle_timeout_secs: u64,
    /// Retries of idempotent requests on another connection after a connect failure.
    #[serde(default = "count::<1>")]
    pub retries: usize,
    pub tls: Option<UpstreamTlsFile>,
    pub health_check: Option<HealthCheckFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// SNI and the name the certificate is verified against.
    pub sni: String,
    #[serde(default = "yes")]
    pub verify: bool,
    /// Extra CA bundle (PEM) to trust for this upstream.
    pub ca: Option<String>,
    /// Ask the upstream for HTTP/2 through ALPN.
    #[serde(default)]
    pub http2: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    #[default]
    Tcp,
    Http,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckFile {
    pub kind: HealthKind,
    /// Path requested by `kind = "http"`; any 200 is healthy.
    pub path: String,
    /// Host header of `kind = "http"` checks.
    pub host: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: usize,
    pub unhealthy_threshold: usize,
}

impl Default for HealthCheckFile {
    fn default() -> Self {
        HealthCheckFile {
            kind: HealthKind::Tcp,
            path: "/".into(),
            host: "localhost".into(),
            interval_ms: 1000,
            timeout_ms: 500,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Option<String>,
    /// `api.example.com`, `*.example.com`; absent matches any host.
    pub host: Option<Spanned<String>>,
    /// Exact path, with optional `{param}` segments.
    pub path: Option<Spanned<String>>,
    /// Segment prefix: `/api` matches `/api` and `/api/...`, not `/apix`.
    pub path_prefix: Option<Spanned<String>>,
    /// Methods this route answers; absent or empty matches all.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Upstream to proxy to; a route without one must have hooks that answer.
    pub upstream: Option<Spanned<String>>,
    pub rewrite: Option<RewriteFile>,
    #[serde(default)]
    pub request_headers: HeaderOpsFile,
    #[serde(default)]
    pub response_headers: HeaderOpsFile,
    /// Ordered chain of module names run on this route.
    #[serde(default)]
    pub hooks: Vec<Spanned<String>>,
    /// Largest request body accepted (bytes); default from `[limits]`.
    pub max_request_body_bytes: Option<u64>,
    /// Tenant allowed to attach its deployed modules to this route (admin API).
    pub tenant: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteFile {
    /// Remove the route's `path_prefix` before proxying.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the route's `path_prefix` with this one.
    pub replace_prefix: Option<String>,
    /// New path; `{param}` names of the route's path are substituted.
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsFile {
    /// Replace (or create) these headers.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append these headers, keeping existing values.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IsolationFile {
    /// One VM per module reused across requests (Envoy's model).
    #[default]
    Shared,
    /// A fresh instance for every request.
    Request,
}

impl From<IsolationFile> for crate::wasm::Isolation {
    fn from(i: IsolationFile) -> Self {
        match i {
            IsolationFile::Shared => Self::Shared,
            IsolationFile::Request => Self::Request,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleFile {
    /// Path to the `.wasm` file, relative to the conf file.
    pub path: Spanned<String>,
    pub tenant: Option<Spanned<String>>,
    /// Passed to `on_configure`: a string as is, a table as JSON.
    pub config: Option<toml::Value>,
    /// Passed to `on_vm_start`: a string as is, a table as JSON.
    pub vm_config: Option<toml::Value>,
    /// Root id the guest's root context is created with.
    #[serde(default)]
    pub root_id: String,
    /// Time budget of one callback, in microseconds.
    #[serde(default = "num::<DEFAULT_BUDGET_US>")]
    pub budget_us: u64,
    /// Time budget of all callbacks of one request together, in microseconds.
    pub request_budget_us: Option<u64>,
    /// Linear memory limit per instance, in MiB (16 for filters, 128 for functions).
    pub memory_mb: Option<u64>,
    /// A function's CPU budget per request, in milliseconds (components only).
    #[serde(default = "num::<DEFAULT_FUNCTION_CPU_MS>")]
    pub cpu_ms: u64,
    /// A function's wall-clock deadline per request, body included, in milliseconds.
    #[serde(default = "num::<DEFAULT_FUNCTION_DEADLINE_MS>")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub isolation: IsolationFile,
    /// A function's instance serves this many requests, one after another, before it is
    /// retired; 1 (the default) is a fresh instance per request. Functions only.
    #[serde(default = "num::<1>")]
    pub requests_per_instance: u64,
    /// The most response body bytes a function may send (functions only).
    #[serde(default = "num::<{ crate::wasm::DEFAULT_MAX_RESPONSE_BYTES }>")]
    pub max_response_bytes: u64,
    /// Most instances of this module alive at once (requests beyond wait briefly, then 503).
    #[serde(default = "count::<64>")]
    pub max_instances: usize,
    #[serde(default)]
    pub on_failure: FailurePolicyFile,
    /// Upstreams this module may reach with `proxy_http_call`.
    #[serde(default)]
    pub allowed_upstreams: Vec<Spanned<String>>,
    /// Timer period floor for `proxy_set_tick_period`, in milliseconds.
    #[serde(default = "num::<10>")]
    pub min_tick_ms: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailurePolicyFile {
    /// `deny` (when absent), `allow` or `respond`.
    pub action: Option<Spanned<String>>,
    /// Status for `deny` and `respond`.
    pub status: Option<u16>,
    /// Body for `respond`.
    pub body: Option<String>,
}

/// `[tenants.NAME]`, each value with its place for error messages; lowered into
/// [`crate::tenant::TenantLimits`] (see its fields for what each means).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantFile {
    pub max_budget_us: Option<Spanned<u64>>,
    pub max_memory_mb: Option<Spanned<u64>>,
    pub max_module_bytes: Option<Spanned<u64>>,
    pub rate_per_sec: Option<Spanned<u32>>,
    pub burst: Option<Spanned<u32>>,
    pub max_concurrency: Option<Spanned<u32>>,
    pub allowed_upstreams: Vec<Spanned<String>>,
    /// The tenant's own state limits (default: `[state]`'s).
    pub state_max_bytes: Option<Spanned<u64>>,
    pub state_ops_per_sec: Option<Spanned<u32>>,
    pub state_max_key_bytes: Option<Spanned<u64>>,
    pub state_max_value_bytes: Option<Spanned<u64>>,
}

use crate::wasm::DEFAULT_BUDGET_US;

/// A function's CPU budget per request when the conf sets none (ms).
pub const DEFAULT_FUNCTION_CPU_MS: u64 = 100;
/// A function's deadline per request when the conf sets none (ms).
pub const DEFAULT_FUNCTION_DEADLINE_MS: u64 = 10_000;
/// A function's memory when the conf sets none (MiB): interpreters need more than filters.
pub const DEFAULT_FUNCTION_MEMORY_MB: u64 = 128;

// Field defaults for sections with required keys (the others have one `Default` each):
// serde takes a function, these take the value as a const parameter.
fn yes() -> bool {
    true
}
fn num<const N: u64>() -> u64 {
    N
}
fn count<const N: usize>() -> usize {
    N
}

//! The control plane: tenants, runtime deploys, function URLs, tokens.
//!
//! Admin actions change a `Stored` record (persisted as `data_dir/control.json`, module
//! bytes beside it) under a mutex that only the admin API takes. What the request path
//! reads — function routes and tenant limits — is rebuilt after each change and published
//! through `ArcSwap`, so requests never wait on the control plane. A deploy compiles and
//! configures the module on a blocking thread before anything is swapped; requests in
//! flight keep the version they started with.

pub mod api;
pub mod client;
mod cluster;
pub mod componentize;
pub mod limit;
mod state;
pub mod store;
pub mod token;

use crate::cluster::Cluster;
use crate::config::{is_dns_label, FunctionNames};
use crate::metrics::Metrics;
use crate::reload::Live;
use crate::route::{HeaderOps, Rewrite, Route};
use crate::tenant::TenantLimits;
use crate::wasm::meter::now_secs;
use crate::wasm::{FailurePolicy, FilterLimits, HookChain, Plugin, PluginSpec};
use crate::wasm::{FunctionBackend, FunctionSpec, Isolation};
use crate::wasm::{DEFAULT_BUDGET_US, DEFAULT_MEMORY_MB};
use arc_swap::ArcSwap;
pub use cluster::ClusterService;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use store::{FunctionRec, ModuleRec, Stored, VersionRec};

/// A deployed function's CPU budget per request when the deploy sets none (µs).
const DEFAULT_FUNCTION_CPU_US: u64 = 100_000;
/// A deployed function's memory when the deploy sets none (MiB).
const DEFAULT_FUNCTION_MEMORY_MB: u64 = 128;

/// Limits applied when neither the conf nor the API set one.
/// 32 MiB: a JavaScript or Python component carries its interpreter (13-18 MB).
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 32 << 20;
/// How long a request waits for a slot under its tenant's `max_concurrency`.
pub const CONCURRENCY_WAIT: Duration = Duration::from_millis(50);

/// Options of a deploy, from the request's query.
#[derive(Debug, Default, Clone)]
pub struct DeployOpts {
    /// Plugin configuration handed to `on_configure`.
    pub config: String,
    pub budget_us: Option<u64>,
    pub memory_mb: Option<u64>,
    /// A function's requests per instance (1, the default: a fresh instance each).
    pub requests_per_instance: Option<u32>,
}

/// `data_dir/control/usage.json`: the billing record, kept across restarts.
#[derive(Serialize, Deserialize)]
struct UsageFile {
    version: u32,
    usage: Vec<crate::wasm::meter::SavedUsage>,
}

/// Where nodes publish their usage in a shared state store (key: the node id).
const USAGE_NS: &str = "usage";

/// How often usage is folded into time buckets, and how often new buckets are saved. A
/// crash (not a graceful stop, which saves) loses at most the last `USAGE_SAVE_EVERY`.
const USAGE_FOLD_EVERY: Duration = Duration::from_secs(1);
pub const USAGE_SAVE_EVERY: Duration = Duration::from_secs(10);

/// Background service: folds usage every second, saves it when it changed (every
/// `USAGE_SAVE_EVERY`) and once more on shutdown.
pub struct UsageKeeper {
    pub control: Arc<Control>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for UsageKeeper {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let meter = &self.control.live.wasm.meter;
        let mut fold = tokio::time::interval(USAGE_FOLD_EVERY);
        let mut saved = meter.buckets_pushed();
        let mut last_save = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    let c = self.control.clone();
                    match tokio::task::spawn_blocking(move || c.save_and_publish_usage()).await {
                        Ok(Ok(())) => tracing::info!("usage saved"),
                        Ok(Err(e)) => tracing::error!("cannot save usage: {e}"),
                        Err(e) => tracing::error!("cannot save usage: {e}"),
                    }
                    return;
                }
                _ = fold.tick() => {
                    meter.fold_all();
                    let pushed = meter.buckets_pushed();
                    if pushed != saved && last_save.elapsed() >= USAGE_SAVE_EVERY {
                        let c = self.control.clone();
                        match tokio::task::spawn_blocking(move || c.save_and_publish_usage()).await {
                            Ok(Ok(())) => saved = pushed,
                            Ok(Err(e)) => tracing::error!("cannot save usage: {e}"),
                            Err(e) => tracing::error!("cannot save usage: {e}"),
                        }
                        last_save = Instant::now();
                    }
                }
            }
        }
    }
}

/// A tenant as the request path sees it: its limits and their live state.
pub struct TenantRt {
    pub name: String,
    pub limits: TenantLimits,
    rate: Rate,
    /// Per node, also in a cluster.
    pub concurrency: Option<Arc<tokio::sync::Semaphore>>,
}

/// A tenant's rate limit: this node's own, or one shared by the cluster's nodes.
enum Rate {
    None,
    Node(limit::Limiter),
    Shared(Arc<crate::cluster::lease::Lease>),
}

impl TenantRt {
    fn new(name: &str, limits: TenantLimits, cluster: Option<&Arc<Cluster>>) -> TenantRt {
        let rate = match (limits.rate_per_sec, cluster) {
            (None, _) => Rate::None,
            (Some(r), Some(c)) => Rate::Shared(crate::cluster::lease::Lease::new(
                c,
                name,
                r,
                limits.burst.unwrap_or(r.max(1)),
            )),
            (Some(_), None) => limit::Limiter::for_limits(limits.rate_per_sec, limits.burst)
                .map_or(Rate::None, Rate::Node),
        };
        TenantRt {
            name: name.into(),
            rate,
            concurrency: limits
                .max_concurrency
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
            limits,
        }
    }

    /// Rate check: `Err(retry_after)` when over the tenant's rate.
    pub fn admit(&self) -> Result<(), Duration> {
        match &self.rate {
            Rate::None => Ok(()),
            Rate::Node(g) => g.check(),
            Rate::Shared(l) => l.admit(),
        }
    }
}

/// A bound function as the request path uses it.
pub struct Function {
    pub route: Arc<Route>,
    pub tenant: Arc<TenantRt>,
}

/// A deployed module serving, with the version record it was built from.
#[derive(Clone)]
struct Installed {
    version: VersionRec,
    deployed: Deployed,
}

/// A tenant's deployed module, as it serves: a Proxy-Wasm filter (a plugin with its
/// VMs) or a function (a WASI-HTTP component).
#[derive(Clone)]
pub enum Deployed {
    Filter(Arc<Plugin>),
    Function(Arc<FunctionBackend>),
}

impl Deployed {
    /// What the deploy answer and the module view call it.
    pub fn kind(&self) -> &'static str {
        match self {
            Deployed::Filter(_) => "filter",
            Deployed::Function(_) => "function",
        }
    }

    fn filter(&self) -> Option<&Arc<Plugin>> {
        match self {
            Deployed::Filter(p) => Some(p),
            Deployed::Function(_) => None,
        }
    }

    /// Starts its timers (a filter's root context ticks).
    fn start(&self) {
        if let Deployed::Filter(p) = self {
            p.spawn_ticks();
        }
    }

    /// Stops what it runs: it no longer serves.
    fn retire(&self) {
        if let Deployed::Filter(p) = self {
            p.retire();
        }
    }

    fn set_upstreams(&self, upstreams: Vec<Arc<crate::upstream::Upstream>>) {
        match self {
            Deployed::Filter(p) => p.set_upstreams(upstreams),
            Deployed::Function(f) => f.set_upstreams(upstreams),
        }
    }
}

/// What a request's host and path say about function URLs.
pub enum FnLookup {
    /// Outside the function namespace: the conf routes decide.
    NotFunction,
    /// Inside the namespace, but no such tenant or function: 404 `no_function`, never
    /// another route (a tenant must not be able to expose what the operator routes).
    Missing,
    Found(Arc<Function>),
}

/// The function table with the namespace it was built for; swapped as one.
#[derive(Default)]
struct FnTable {
    names: FunctionNames,
    /// tenant -> function -> route; nested so a lookup borrows the request's `&str`s.
    map: HashMap<String, HashMap<String, Arc<Function>>>,
}

/// Why an admin action failed: a status and a reason for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub reason: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            reason: reason.into(),
        }
    }
}

impl From<crate::wasm::ModuleError> for ApiError {
    /// A module the runtime refuses is the caller's to fix: 400 with the reason.
    fn from(e: crate::wasm::ModuleError) -> ApiError {
        ApiError::new(400, "module_rejected", e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A name outside its rule (`rule` says it).
fn bad_name(rule: &str) -> ApiError {
    ApiError::new(400, "bad_name", rule)
}

/// 409: something still depends on what a change would take away.
fn in_use(code: &'static str, reason: String) -> ApiError {
    ApiError::new(409, code, reason)
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(404, "not_found", format!("{what} does not exist"))
}

/// 404 unless tenant `t` has deployed module `m`.
fn deployed(s: &Stored, t: &str, m: &str) -> ApiResult<()> {
    if s.modules.get(t).is_some_and(|ms| ms.contains_key(m)) {
        Ok(())
    } else {
        Err(not_found(&format!("module `{m}` of tenant `{t}`")))
    }
}

pub struct Control {
    data_dir: PathBuf,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    pub(crate) operator_token: Option<String>,
    pub(crate) secret: Vec<u8>,
    stored: Mutex<Stored>,
    /// Active plugin per (tenant, module).
    plugins: Mutex<HashMap<(String, String), Installed>>,
    /// Set once the services run: from then on, a newly installed module starts its
    /// timers at once.
    started: std::sync::atomic::AtomicBool,
    /// `[cluster]`: the records are shared through Redis.
    cluster: Option<Arc<Cluster>>,
    tenants: ArcSwap<HashMap<String, Arc<TenantRt>>>,
    functions: ArcSwap<FnTable>,
    /// Route name -> the hook chain with the tenant's attached modules appended.
    route_hooks: ArcSwap<HashMap<String, Arc<HookChain>>>,
}

/// Background service of the control plane: starts the timers of the modules restored
/// at startup, then rebuilds the request path's view each time a reload publishes a
/// new snapshot (the conf side knows nothing of the control plane).
pub struct ControlService {
    control: Arc<Control>,
    reloads: tokio::sync::watch::Receiver<u64>,
}

impl ControlService {
    /// Subscribes now, so no reload between this and the service's start is missed.
    pub fn new(control: Arc<Control>) -> ControlService {
        let reloads = control.live.subscribe();
        ControlService { control, reloads }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ControlService {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        self.control.start();
        let mut reloads = self.reloads.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.control.refresh();
                }
            }
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Control {
    /// Opens the control plane in `data_dir`, reloading what was deployed before (from the
    /// precompiled cache, so nothing is recompiled).
    pub fn open(
        live: Arc<Live>,
        metrics: Arc<Metrics>,
        data_dir: &Path,
    ) -> anyhow::Result<Control> {
        std::fs::create_dir_all(data_dir)?;
        let snap = live.load();
        let operator_token = snap.admin.token.clone();
        let cluster = match &snap.cluster {
            Some(conf) => Some(Cluster::open((**conf).clone(), &snap.node.id)?),
            None => None,
        };
        // in a cluster every node signs and checks tenant tokens with the same key
        let secret = match &cluster {
            Some(c) => crate::cluster::derive_key(&c.conf.key, "tenant tokens").to_vec(),
            None => token::load_or_create_secret(&data_dir.join("admin.key"))?,
        };
        let stored = Stored::load(&data_dir.join("control.json"))?;
        drop(snap);
        let c = Control {
            data_dir: data_dir.to_path_buf(),
            live,
            metrics,
            operator_token,
            secret,
            stored: Mutex::new(Stored::default()),
            plugins: Mutex::new(HashMap::new()),
            started: Default::default(),
            cluster,
            tenants: ArcSwap::from_pointee(HashMap::new()),
            functions: ArcSwap::from_pointee(FnTable::default()),
            route_hooks: ArcSwap::from_pointee(HashMap::new()),
        };
        // a cluster node serves what the cluster holds (the local record when Redis
        // does not answer) before its listeners open
        let stored = c.join(stored);
        {
            let mut s = c.lock();
            c.apply(&mut s, stored);
        }
        c.restore_usage();
        Ok(c)
    }

    fn usage_path(&self) -> PathBuf {
        self.data_dir.join("usage.json")
    }

    /// Reloads the usage saved before the last stop. An unreadable file is set aside (never
    /// overwritten: it is the billing record) and the gateway starts with empty usage.
    fn restore_usage(&self) {
        let path = self.usage_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(rows) = self.stored_usage() {
                    self.live.wasm.meter.restore(rows);
                }
                return;
            }
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot read saved usage: {e}");
                return;
            }
        };
        match serde_json::from_slice::<UsageFile>(&bytes) {
            Ok(f) => {
                // the newer of the file and the state store's copy (a crash between the
                // two writes leaves one a save behind)
                let latest = |rows: &[crate::wasm::meter::SavedUsage]| {
                    rows.iter()
                        .filter_map(|r| r.buckets.last().map(|b| b.0))
                        .max()
                        .unwrap_or(0)
                };
                let rows = match self.stored_usage() {
                    Some(stored) if latest(&stored) > latest(&f.usage) => stored,
                    _ => f.usage,
                };
                self.live.wasm.meter.restore(rows)
            }
            Err(e) => {
                let aside = path.with_extension(format!("json.bad-{}", now_secs()));
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(path = %path.display(), aside = %aside.display(), "saved usage is unreadable, set aside: {e}");
            }
        }
    }

    /// Writes every usage bucket to `data_dir/control/usage.json`: a temporary file,
    /// synced, then renamed over the old one, so a crash leaves the old or the new record,
    /// never half of one.
    pub fn save_usage(&self) -> std::io::Result<()> {
        let file = UsageFile {
            version: 1,
            usage: self.live.wasm.meter.save(),
        };
        let path = self.usage_path();
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    }

    /// [`Control::save_usage`], then [`Control::publish_usage`]: the local record is the
    /// durable one; a shared store that is away misses one publication, logged.
    fn save_and_publish_usage(&self) -> std::io::Result<()> {
        self.save_usage()?;
        if let Err(e) = self.publish_usage() {
            tracing::warn!("usage saved, but not published to the shared state store: {e}");
        }
        Ok(())
    }

    /// Writes this node's usage to the state store, under its node id: there the usage
    /// API of every node sharing the store (Redis) adds it up, and a restart reads it
    /// back if it is newer than `usage.json`. Runs on a blocking thread (it waits for
    /// the store).
    pub fn publish_usage(&self) -> Result<(), String> {
        let Some(state) = self.live.wasm.state().cloned() else {
            return Ok(());
        };
        let node = self.live.load().node.id.clone();
        let bytes = serde_json::to_vec(&self.live.wasm.meter.save()).map_err(|e| e.to_string())?;
        let store = state.store.clone();
        state
            .wait(async move { store.system_set(USAGE_NS, &node, bytes.into()).await })
            .map_err(|e| e.to_string())
    }

    /// This node's usage as last written to the state store.
    fn stored_usage(&self) -> Option<Vec<crate::wasm::meter::SavedUsage>> {
        let state = self.live.wasm.state()?.clone();
        let node = self.live.load().node.id.clone();
        let store = state.store.clone();
        let bytes = state
            .wait(async move { store.system_get(USAGE_NS, &node).await })
            .map_err(|e| tracing::warn!("usage in the state store unavailable: {e}"))
            .ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Other nodes' published usage (a shared store only): node id → records.
    async fn other_nodes_usage(&self) -> Vec<(String, Vec<crate::wasm::meter::SavedUsage>)> {
        let Some(state) = self.live.wasm.state().cloned() else {
            return Vec::new();
        };
        if !state.store.is_shared() {
            return Vec::new();
        }
        let me = self.live.load().node.id.clone();
        let nodes = match state.store.system_keys(USAGE_NS).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("usage of other nodes unavailable: {e}");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for node in nodes.into_iter().filter(|n| *n != me) {
            if let Ok(Some(b)) = state.store.system_get(USAGE_NS, &node).await {
                if let Ok(rows) = serde_json::from_slice(&b) {
                    out.push((node, rows));
                }
            }
        }
        out
    }

    /// Starts the timers of restored modules; called once the services run.
    fn start(&self) {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        for p in plugins.values() {
            p.deployed.start();
        }
    }

    pub fn has_operator_token(&self) -> bool {
        self.operator_token.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record, locked, for a change: in a cluster, first brought up to date with
    /// the shared one (503 when Redis does not answer).
    fn lock_for_change(&self) -> ApiResult<std::sync::MutexGuard<'_, Stored>> {
        let mut s = self.lock();
        self.catch_up(&mut s)?;
        Ok(s)
    }

    /// Saves `s` (see [`Control::save`]), then makes it live: what every admin change
    /// ends with.
    fn commit(&self, s: &mut Stored) -> ApiResult<()> {
        self.save(s)?;
        self.publish(s);
        Ok(())
    }

    fn persist(&self, s: &Stored) -> ApiResult<()> {
        s.save(&self.data_dir.join("control.json"))
            .map_err(|e| ApiError::new(500, "internal", format!("cannot persist: {e}")))
    }

    /// Conf tenants plus API tenants (the conf wins for a name in both).
    fn all_tenants(&self, s: &Stored) -> BTreeMap<String, TenantLimits> {
        let mut all = s.tenants.clone();
        for (k, v) in &self.live.load().tenants {
            all.insert(k.clone(), v.clone());
        }
        all
    }

    /// 400 `bad_upstream` when a tenant's `allowed_upstreams` names one the conf lacks.
    fn upstreams_defined(&self, limits: &TenantLimits) -> ApiResult<()> {
        let snap = self.live.load();
        match limits
            .allowed_upstreams
            .iter()
            .find(|u| !snap.upstreams.contains_key(*u))
        {
            Some(bad) => Err(ApiError::new(
                400,
                "bad_upstream",
                format!("upstream `{bad}` is not defined"),
            )),
            None => Ok(()),
        }
    }

    /// Installs a tenant module's plugin; the one it replaces retires (its timer ends,
    /// its idle VMs go).
    fn install_plugin(&self, t: &str, m: &str, version: &VersionRec, plugin: Deployed) {
        let replaced = self
            .plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (t.into(), m.into()),
                Installed {
                    version: version.clone(),
                    deployed: plugin.clone(),
                },
            );
        if let Some(old) = replaced {
            old.deployed.retire();
        }
        // only the new module's timer starts: the others keep their rhythm
        if self.started.load(std::sync::atomic::Ordering::Acquire) {
            plugin.start();
        }
    }

    pub fn tenant_exists(&self, t: &str) -> bool {
        self.tenants.load().contains_key(t)
    }

    /// Rebuilds what the request path reads from the stored records and the serving
    /// snapshot, and publishes it. A tenant whose limits did not change keeps its live
    /// state (rate and concurrency in use); nothing else starts or stops here.
    fn publish(&self, s: &Stored) {
        let before = self.tenants.load();
        let tenants: HashMap<String, Arc<TenantRt>> = self
            .all_tenants(s)
            .into_iter()
            .map(|(k, v)| {
                let rt = match before.get(&k) {
                    Some(old) if old.limits == v => old.clone(),
                    _ => Arc::new(TenantRt::new(&k, v, self.cluster.as_ref())),
                };
                (k, rt)
            })
            .collect();
        let snap = self.live.load();
        if let Some(state) = self.live.wasm.state() {
            for (name, rt) in &tenants {
                let limits = rt.limits.state(snap.state.limits);
                if state.store.limits(name) != limits {
                    state.store.set_limits(name, limits);
                }
            }
        }
        let plugins = self
            .plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, i)| (k.clone(), i.deployed.clone()))
            .collect::<HashMap<_, _>>();
        for ((t, _), p) in &plugins {
            let allowed = tenants
                .get(t)
                .map_or(&[][..], |rt| &rt.limits.allowed_upstreams);
            p.set_upstreams(
                allowed
                    .iter()
                    .filter_map(|u| snap.upstreams.get(u).cloned())
                    .collect(),
            );
        }
        let mut functions: HashMap<String, HashMap<String, Arc<Function>>> = HashMap::new();
        for (t, fns) in &s.functions {
            let Some(tenant) = tenants.get(t) else {
                continue;
            };
            for (f, rec) in fns {
                let Some(p) = plugins.get(&(t.clone(), rec.module.clone())) else {
                    continue;
                };
                let (hooks, backend) = match p {
                    Deployed::Filter(p) => (HookChain::new(vec![p.clone()]), None),
                    Deployed::Function(f) => (HookChain::default(), Some(f.clone())),
                };
                // a function answers itself: it guards no upstream
                let upstream = (rec.upstream.as_ref())
                    .filter(|_| backend.is_none())
                    .and_then(|u| snap.upstreams.get(u).cloned());
                let name = format!("fn:{t}/{f}");
                let route = Arc::new(Route {
                    metrics: self.metrics.route(&name),
                    name: name.into(),
                    upstream,
                    rewrite: Some(Rewrite::Prefix {
                        from: format!("{}/{t}/{f}", snap.admin.functions.prefix),
                        to: String::new(),
                    }),
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                    hooks,
                    backend,
                    max_request_body: snap.limits.max_request_body_bytes,
                    tenant: Some(t.clone()),
                });
                functions.entry(t.clone()).or_default().insert(
                    f.clone(),
                    Arc::new(Function {
                        route,
                        tenant: tenant.clone(),
                    }),
                );
            }
        }
        let mut route_hooks = HashMap::new();
        for (t, routes) in &s.route_hooks {
            for (r, mods) in routes {
                let Some(route) = snap
                    .routes
                    .iter()
                    .find(|x| &*x.name == r && x.tenant.as_deref() == Some(t))
                else {
                    continue;
                };
                let mut chain = route.hooks.plugins.clone();
                chain.extend(
                    mods.iter()
                        .filter_map(|m| plugins.get(&(t.clone(), m.clone())))
                        .filter_map(|d| d.filter().cloned()),
                );
                route_hooks.insert(r.clone(), Arc::new(HookChain::new(chain)));
            }
        }
        self.route_hooks.store(Arc::new(route_hooks));
        self.tenants.store(Arc::new(tenants));
        self.functions.store(Arc::new(FnTable {
            names: snap.admin.functions.clone(),
            map: functions,
        }));
    }

    /// Rebuilds the request path's view after a conf reload: function routes point at the
    /// new snapshot's upstreams (the old ones, and their health checks, end with the old
    /// snapshot), attached chains start from the new conf hooks, tenant limits and the
    /// function namespace follow the conf.
    fn refresh(&self) {
        let s = self.lock();
        self.publish(&s);
    }

    /// Where a function answers, for the caller of a bind.
    pub fn function_url(&self, t: &str, f: &str) -> String {
        let table = self.functions.load();
        match (&table.names.base_domain, table.names.prefix.as_str()) {
            (Some(base), "") => format!("{f}.{t}.{base}"),
            (_, prefix) => format!("{prefix}/{t}/{f}"),
        }
    }

    /// The function a request addresses: `{prefix}/{tenant}/{function}/...`, or
    /// `{function}.{tenant}.<base_domain>` when a base domain is set. `path` is already
    /// normalized (no empty or dot segments), so one spelling means one namespace. At most
    /// two hash lookups; outside the namespace only string comparisons.
    pub fn function_for(&self, host: &str, path: &str) -> FnLookup {
        let table = self.functions.load();
        let found = |t: &str, f: &str| match table.map.get(t).and_then(|m| m.get(f)) {
            Some(found) => FnLookup::Found(found.clone()),
            None => FnLookup::Missing,
        };
        if let Some(base) = &table.names.base_domain {
            let host = host.strip_suffix('.').unwrap_or(host);
            let labels = host
                .len()
                .checked_sub(base.len() + 1)
                .filter(|&i| {
                    host.as_bytes()[i] == b'.'
                        && host.is_char_boundary(i + 1)
                        && host[i + 1..].eq_ignore_ascii_case(base)
                })
                .map(|i| &host[..i]);
            if let Some((f, t)) = labels.and_then(|l| l.split_once('.')) {
                if !f.is_empty() && !t.is_empty() && !t.contains('.') {
                    // hosts are case-insensitive; tenant names are lowercase
                    return if host.bytes().any(|b| b.is_ascii_uppercase()) {
                        found(&t.to_ascii_lowercase(), &f.to_ascii_lowercase())
                    } else {
                        found(t, f)
                    };
                }
            }
        }
        if table.names.prefix.is_empty() {
            return FnLookup::NotFunction;
        }
        let Some(rest) = path.strip_prefix(table.names.prefix.as_str()) else {
            return FnLookup::NotFunction;
        };
        if !rest.is_empty() && !rest.starts_with('/') {
            return FnLookup::NotFunction; // `/running` is not under `/run`
        }
        let mut seg = rest.trim_start_matches('/').splitn(3, '/');
        match (seg.next(), seg.next()) {
            (Some(t), Some(f)) if !t.is_empty() && !f.is_empty() => found(t, f),
            _ => FnLookup::Missing,
        }
    }

    /// The hook chain of a conf route with its tenant's attached modules, if any.
    pub fn route_chain(&self, route: &str) -> Option<Arc<HookChain>> {
        let m = self.route_hooks.load();
        if m.is_empty() {
            return None;
        }
        m.get(route).cloned()
    }

    /// Attaches deployed modules (in order, after the conf's hooks) to a conf route the
    /// tenant owns (`tenant = "…"` on the route).
    pub fn attach(&self, t: &str, route: &str, modules: Vec<String>, by: &str) -> ApiResult<()> {
        let snap = self.live.load();
        let r = snap
            .routes
            .iter()
            .find(|x| &*x.name == route)
            .ok_or_else(|| not_found(&format!("route `{route}`")))?;
        if r.tenant.as_deref() != Some(t) {
            return Err(ApiError::new(
                403,
                "not_your_route",
                format!("route `{route}` does not belong to tenant `{t}`"),
            ));
        }
        let mut s = self.lock_for_change()?;
        for m in &modules {
            deployed(&s, t, m)?;
        }
        let attached = s.route_hooks.entry(t.into()).or_default();
        attached.insert(route.into(), modules);
        self.commit(&mut s)?;
        tracing::info!(tenant = %t, route = %route, by = %by, "modules attached to route");
        Ok(())
    }

    pub fn route_hooks_view(&self, t: &str) -> BTreeMap<String, Vec<String>> {
        self.lock().route_hooks.get(t).cloned().unwrap_or_default()
    }

    // ---- admin actions ----------------------------------------------------------------

    pub fn list_tenants(&self) -> serde_json::Value {
        let s = self.lock();
        let conf = self.live.load();
        let all = self.all_tenants(&s);
        serde_json::json!(all
            .iter()
            .map(|(k, v)| serde_json::json!({
                "name": k,
                "source": if conf.tenants.contains_key(k) { "conf" } else { "api" },
                "limits": v,
            }))
            .collect::<Vec<_>>())
    }

    pub fn tenant_view(&self, t: &str) -> ApiResult<serde_json::Value> {
        let s = self.lock();
        let all = self.all_tenants(&s);
        let limits = all
            .get(t)
            .ok_or_else(|| not_found(&format!("tenant `{t}`")))?;
        Ok(serde_json::json!({
            "name": t,
            "limits": limits,
            "modules": s.modules.get(t).map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            "functions": s.functions.get(t).cloned().unwrap_or_default(),
        }))
    }

    pub fn create_tenant(&self, name: &str, limits: TenantLimits) -> ApiResult<()> {
        if !is_dns_label(name) {
            return Err(bad_name("tenant names are DNS labels: 1-63 of a-z, 0-9 and -, not starting or ending with -"));
        }
        let mut s = self.lock_for_change()?;
        if self.all_tenants(&s).contains_key(name) {
            return Err(ApiError::new(
                409,
                "exists",
                format!("tenant `{name}` already exists"),
            ));
        }
        self.upstreams_defined(&limits)?;
        s.tenants.insert(name.into(), limits);
        self.commit(&mut s)?;
        Ok(())
    }

    /// Changes an API tenant's limits: the fields given replace the current ones, `null`
    /// clears one. Rate and concurrency apply to the next request; allowed upstreams
    /// re-configure the tenant's active modules (from the precompiled cache); the module
    /// limits (`max_budget_us`, `max_memory_mb`, `max_module_bytes`) apply to later deploys.
    /// 409 when tenant `name` is declared in the conf file: the API does not change it,
    /// the operator does (`to_do`) there.
    fn not_in_conf(&self, name: &str, to_do: &str) -> ApiResult<()> {
        if self.live.load().tenants.contains_key(name) {
            return Err(ApiError::new(
                409,
                "conf_tenant",
                format!("tenant `{name}` is declared in the conf file; {to_do}"),
            ));
        }
        Ok(())
    }

    pub fn update_tenant(&self, name: &str, patch: serde_json::Value) -> ApiResult<TenantLimits> {
        let serde_json::Value::Object(patch) = patch else {
            return Err(ApiError::new(
                400,
                "bad_json",
                "the body must be a JSON object of limits",
            ));
        };
        self.not_in_conf(name, "change its limits there")?;
        let mut s = self.lock_for_change()?;
        let current = s
            .tenants
            .get(name)
            .ok_or_else(|| not_found(&format!("tenant `{name}`")))?
            .clone();
        let mut merged = match serde_json::to_value(&current) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        merged.extend(patch);
        merged.retain(|_, v| !v.is_null());
        let limits: TenantLimits = serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| ApiError::new(400, "bad_limits", e.to_string()))?;
        self.upstreams_defined(&limits)?;
        let stranded: Vec<String> = s
            .functions
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|(f, rec)| {
                let u = rec.upstream.as_ref()?;
                (!limits.allowed_upstreams.contains(u)).then(|| format!("{f} (upstream `{u}`)"))
            })
            .collect();
        if !stranded.is_empty() {
            return Err(in_use(
                "upstream_in_use",
                format!(
                    "functions guard upstreams this change disallows; unbind them first: {}",
                    stranded.join(", ")
                ),
            ));
        }
        // the tenant's modules keep running: `publish` points their callouts at the
        // upstreams now allowed
        s.tenants.insert(name.into(), limits.clone());
        self.commit(&mut s)?;
        tracing::info!(tenant = %name, "tenant limits changed");
        Ok(limits)
    }

    pub fn delete_tenant(&self, name: &str) -> ApiResult<()> {
        self.not_in_conf(name, "remove it there")?;
        let mut s = self.lock_for_change()?;
        if s.tenants.remove(name).is_none() {
            return Err(not_found(&format!("tenant `{name}`")));
        }
        let modules = s.modules.remove(name).unwrap_or_default();
        s.functions.remove(name);
        self.commit(&mut s)?;
        self.plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(t, _), p| {
                if t == name {
                    p.deployed.retire();
                }
                t != name
            });
        self.forget_modules(modules.values());
        let _ = std::fs::remove_dir_all(self.data_dir.join("tenants").join(name));
        // its state and secrets go with it: a new tenant of the same name starts empty
        if let Some(state) = self.live.wasm.state().cloned() {
            let (st, t) = (state.clone(), name.to_string());
            match state.wait(async move { st.forget_tenant(&t).await }) {
                Ok(n) => tracing::info!(tenant = %name, entries = n, "tenant state deleted"),
                Err(e) => {
                    tracing::error!(tenant = %name, "tenant deleted, but not its state: {e}")
                }
            }
        }
        Ok(())
    }

    fn module_file(&self, t: &str, m: &str, digest: &str) -> PathBuf {
        self.data_dir
            .join("tenants")
            .join(t)
            .join(m)
            .join(format!("{digest}.wasm"))
    }

    fn build_plugin(
        &self,
        t: &str,
        m: &str,
        v: &VersionRec,
        limits: &TenantLimits,
    ) -> ApiResult<Deployed> {
        let bytes = self.module_bytes(t, m, &v.digest)?;
        self.compile(t, m, v, &bytes, limits)
    }

    /// Compiles and configures one version; the tenant's allowed upstreams are the only
    /// ones its `proxy_http_call` can reach.
    fn compile(
        &self,
        t: &str,
        m: &str,
        v: &VersionRec,
        bytes: &[u8],
        limits: &TenantLimits,
    ) -> ApiResult<Deployed> {
        let snap = self.live.load();
        let allowed = limits
            .allowed_upstreams
            .iter()
            .filter_map(|u| snap.upstreams.get(u).cloned())
            .collect();
        if crate::wasm::component::is_component(bytes) {
            let spec = FunctionSpec {
                name: m.into(),
                tenant: t.into(),
                limits: crate::wasm::component::Limits {
                    memory_bytes: (v.memory_mb << 20) as usize,
                    cpu: Duration::from_micros(v.budget_us),
                    requests_per_instance: v.requests_per_instance,
                    ..Default::default()
                },
                policy: FailurePolicy::Deny(503),
                allowed_upstreams: allowed,
                max_response_bytes: crate::wasm::DEFAULT_MAX_RESPONSE_BYTES,
            };
            return (self.live.wasm.function(spec, bytes))
                .map(Deployed::Function)
                .map_err(ApiError::from);
        }
        let spec = PluginSpec {
            name: m.into(),
            tenant: t.into(),
            root_id: String::new(),
            config: v.config.clone().into_bytes(),
            vm_config: Vec::new(),
            isolation: Isolation::Shared,
            policy: FailurePolicy::Deny(503),
            limits: FilterLimits {
                budget: Duration::from_micros(v.budget_us),
                request_budget: Duration::from_micros(v.budget_us * 8),
                memory_bytes: v.memory_mb << 20,
                max_instances: 64,
                min_tick: Duration::from_millis(10),
            },
            allowed_upstreams: allowed,
        };
        self.live
            .wasm
            .plugin(spec, bytes, &self.metrics)
            .map(Deployed::Filter)
            .map_err(ApiError::from)
    }

    /// Deploys `bytes` as a new version of module `m` of tenant `t` and activates it.
    /// Runs on a blocking thread (it compiles).
    pub fn deploy(
        &self,
        t: &str,
        m: &str,
        bytes: &[u8],
        opts: DeployOpts,
        by: &str,
    ) -> ApiResult<VersionRec> {
        if !valid_name(m) {
            return Err(bad_name("module names are 1-63 of a-z, 0-9, - and _"));
        }
        let limits = {
            // in a cluster, up to date first: the tenant may be minutes old on another node
            let s = self.lock_for_change()?;
            self.all_tenants(&s)
                .get(t)
                .cloned()
                .ok_or_else(|| not_found(&format!("tenant `{t}`")))?
        };
        let reject = |e: ApiError| {
            self.live
                .wasm
                .meter
                .log(t)
                .push(m, "error", &format!("deploy rejected: {}", e.reason));
            tracing::warn!(tenant = %t, module = %m, by = %by, reason = %e.reason, "deploy rejected");
            e
        };
        let max = limits.max_module_bytes.unwrap_or(DEFAULT_MAX_MODULE_BYTES);
        if bytes.len() as u64 > max {
            return Err(reject(ApiError::new(
                413,
                "module_too_large",
                format!("{} bytes is over the tenant's limit of {max}", bytes.len()),
            )));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(reject(ApiError::new(
                400,
                "not_wasm",
                "the body is not a wasm module (missing the \\0asm header)",
            )));
        }
        let within =
            |asked: Option<u64>, default: u64, max: Option<u64>, what: &str| -> ApiResult<u64> {
                match (asked, max) {
                    (Some(a), Some(mx)) if a > mx => Err(ApiError::new(
                        400,
                        "over_limit",
                        format!("{what} {a} is over the tenant's limit of {mx}"),
                    )),
                    (Some(0), _) => Err(ApiError::new(
                        400,
                        "over_limit",
                        format!("{what} must be at least 1"),
                    )),
                    (Some(a), _) => Ok(a),
                    (None, mx) => Ok(mx.map_or(default, |mx| default.min(mx))),
                }
            };
        // a function runs for milliseconds, a filter for microseconds
        let function = crate::wasm::component::is_component(bytes);
        let (default_budget_us, default_memory_mb) = if function {
            (DEFAULT_FUNCTION_CPU_US, DEFAULT_FUNCTION_MEMORY_MB)
        } else {
            (DEFAULT_BUDGET_US, DEFAULT_MEMORY_MB)
        };
        let budget_us = within(
            opts.budget_us,
            default_budget_us,
            limits.max_budget_us,
            "budget_us",
        )
        .map_err(reject)?;
        let memory_mb = within(
            opts.memory_mb,
            default_memory_mb,
            limits.max_memory_mb,
            "memory_mb",
        )
        .map_err(reject)?;
        let requests_per_instance = match opts.requests_per_instance.unwrap_or(1) {
            0 => Err("requests_per_instance must be at least 1"),
            n if n > 1 && !function => {
                Err("requests_per_instance applies to functions (components), not filters")
            }
            n => Ok(n),
        }
        .map_err(|why| reject(ApiError::new(400, "bad_query", why)))?;
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
        let mut v = VersionRec {
            version: 0,
            digest: digest.clone(),
            size: bytes.len() as u64,
            uploaded_at: now_secs(),
            uploaded_by: by.into(),
            exports: Vec::new(),
            compile_ms: 0,
            config: opts.config,
            budget_us,
            memory_mb,
            kind: String::new(),
            requests_per_instance,
        };
        let started = Instant::now();
        let plugin = self.compile(t, m, &v, bytes, &limits).map_err(reject)?;
        v.compile_ms = started.elapsed().as_millis() as u64;
        v.kind = plugin.kind().into();
        v.exports = match &plugin {
            Deployed::Filter(p) => p.compiled.exports.clone(),
            Deployed::Function(f) => vec![f.function.handler_export().to_string()],
        };
        store::write_whole(&self.module_file(t, m, &digest), bytes)
            .map_err(|e| ApiError::new(500, "internal", format!("cannot store module: {e}")))?;
        let mut s = self.lock_for_change()?;
        self.share_module(&digest, bytes)?;
        let rec = s
            .modules
            .entry(t.into())
            .or_default()
            .entry(m.into())
            .or_default();
        // numbered per tenant and module: a tenant never sees others' deploy activity
        v.version = rec.versions.iter().map(|x| x.version).max().unwrap_or(0) + 1;
        rec.versions.push(v.clone());
        rec.active = Some(v.version);
        self.save(&mut s)?;
        self.install_plugin(t, m, &v, plugin);
        self.publish(&s);
        tracing::info!(tenant = %t, module = %m, version = v.version, digest = &digest[..12], by = %by, "module deployed");
        Ok(v)
    }

    pub fn module_view(&self, t: &str, m: &str) -> ApiResult<ModuleRec> {
        self.lock()
            .modules
            .get(t)
            .and_then(|ms| ms.get(m))
            .cloned()
            .ok_or_else(|| not_found(&format!("module `{m}` of tenant `{t}`")))
    }

    pub fn modules_view(&self, t: &str) -> BTreeMap<String, ModuleRec> {
        self.lock().modules.get(t).cloned().unwrap_or_default()
    }

    /// Activates `version` (or, with `None`, the version before the active one).
    pub fn activate(&self, t: &str, m: &str, version: Option<u32>, by: &str) -> ApiResult<u32> {
        drop(self.lock_for_change()?);
        let rec = self.module_view(t, m)?;
        let limits = {
            let s = self.lock();
            self.all_tenants(&s).get(t).cloned().unwrap_or_default()
        };
        let target = match version {
            Some(v) => rec.versions.iter().find(|x| x.version == v).cloned(),
            None => {
                let pos = rec
                    .versions
                    .iter()
                    .position(|x| Some(x.version) == rec.active);
                pos.and_then(|p| p.checked_sub(1))
                    .map(|p| rec.versions[p].clone())
            }
        }
        .ok_or_else(|| ApiError::new(404, "no_such_version", "no such version to activate"))?;
        let plugin = self.build_plugin(t, m, &target, &limits)?;
        let mut s = self.lock_for_change()?;
        match s.modules.get_mut(t).and_then(|ms| ms.get_mut(m)) {
            Some(r) if r.versions.contains(&target) => r.active = Some(target.version),
            // changed by another node meanwhile
            _ => {
                return Err(not_found(&format!(
                    "version {} of module `{m}`",
                    target.version
                )))
            }
        }
        self.save(&mut s)?;
        self.install_plugin(t, m, &target, plugin);
        self.publish(&s);
        tracing::info!(tenant = %t, module = %m, version = target.version, by = %by, "module version activated");
        Ok(target.version)
    }

    pub fn delete_module(&self, t: &str, m: &str, by: &str) -> ApiResult<()> {
        let mut s = self.lock_for_change()?;
        let Some(module) = s.modules.get_mut(t).and_then(|ms| ms.remove(m)) else {
            return Err(not_found(&format!("module `{m}` of tenant `{t}`")));
        };
        if let Some(fns) = s.functions.get_mut(t) {
            fns.retain(|_, f| f.module != m);
        }
        self.commit(&mut s)?;
        let removed = self
            .plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(t.to_string(), m.to_string()));
        if let Some(old) = removed {
            old.deployed.retire();
        }
        self.forget_modules([&module]);
        let _ = std::fs::remove_dir_all(self.data_dir.join("tenants").join(t).join(m));
        tracing::info!(tenant = %t, module = %m, by = %by, "module deleted");
        Ok(())
    }

    pub fn bind(&self, t: &str, f: &str, rec: FunctionRec, by: &str) -> ApiResult<()> {
        if !valid_name(f) {
            return Err(bad_name("function names are 1-63 of a-z, 0-9, - and _"));
        }
        let mut s = self.lock_for_change()?;
        deployed(&s, t, &rec.module)?;
        if let Some(u) = &rec.upstream {
            let allowed = self
                .all_tenants(&s)
                .get(t)
                .map(|l| l.allowed_upstreams.contains(u))
                .unwrap_or(false);
            if !allowed {
                return Err(ApiError::new(
                    403,
                    "upstream_not_allowed",
                    format!("the operator has not allowed tenant `{t}` to use upstream `{u}`"),
                ));
            }
        }
        s.functions
            .entry(t.into())
            .or_default()
            .insert(f.into(), rec);
        self.commit(&mut s)?;
        tracing::info!(tenant = %t, function = %f, by = %by, "function bound");
        Ok(())
    }

    pub fn unbind(&self, t: &str, f: &str, by: &str) -> ApiResult<()> {
        let mut s = self.lock_for_change()?;
        if s.functions.get_mut(t).and_then(|fs| fs.remove(f)).is_none() {
            return Err(not_found(&format!("function `{f}` of tenant `{t}`")));
        }
        self.commit(&mut s)?;
        tracing::info!(tenant = %t, function = %f, by = %by, "function unbound");
        Ok(())
    }

    pub fn functions_view(&self, t: &str) -> BTreeMap<String, FunctionRec> {
        self.lock().functions.get(t).cloned().unwrap_or_default()
    }

    pub fn revoke(&self, jti: &str) -> ApiResult<()> {
        let mut s = self.lock_for_change()?;
        s.revoked.insert(jti.into());
        self.save(&mut s)
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        self.lock().revoked.contains(jti)
    }

    pub fn usage(&self, t: &str, from: u64, to: u64) -> serde_json::Value {
        let rows = self.live.wasm.meter.tenant_usage(t, from, to);
        let mut modules = serde_json::Map::new();
        let mut totals = crate::wasm::meter::Tally::default();
        for (m, c) in &rows {
            totals.merge(c);
            modules.insert(m.clone(), serde_json::json!(c));
        }
        serde_json::json!({ "tenant": t, "from": from, "to": to, "modules": modules, "totals": totals })
    }

    /// [`Control::usage`], plus what the other nodes sharing the state store published
    /// (their last save), and the bytes the tenant stores in the state store now.
    pub async fn usage_now(&self, t: &str, from: u64, to: u64) -> serde_json::Value {
        let mut v = self.usage(t, from, to);
        let others = self.other_nodes_usage().await;
        if !others.is_empty() {
            use crate::wasm::meter::Tally;
            let mut totals: Tally = serde_json::from_value(v["totals"].clone()).unwrap_or_default();
            let mut nodes = vec![self.live.load().node.id.clone()];
            for (node, rows) in &others {
                nodes.push(node.clone());
                for row in rows.iter().filter(|r| r.tenant == t) {
                    let add = row.between(from, to);
                    totals.merge(&add);
                    let mut m: Tally = serde_json::from_value(v["modules"][&row.module].clone())
                        .unwrap_or_default();
                    m.merge(&add);
                    v["modules"][&row.module] = serde_json::json!(m);
                }
            }
            v["totals"] = serde_json::json!(totals);
            v["nodes"] = serde_json::json!(nodes);
        }
        if let Some(s) = self.live.wasm.state() {
            v["state_bytes_stored"] = match s.store.tenant(t, None).bytes_used().await {
                Ok(b) => b.into(),
                Err(e) => format!("unavailable: {e}").into(),
            };
        }
        v
    }

    pub fn log(&self, t: &str) -> Arc<crate::wasm::meter::TenantLog> {
        self.live.wasm.meter.log(t)
    }
}

//! Tenant state: a key-value store with versions, compare-and-swap, atomic increments and
//! TTLs, one namespace per tenant, behind one [`Backend`] trait with two implementations:
//! [`embedded`] (redb in `data_dir`, the default) and [`redis`] (`[state] backend =
//! "redis"`, shared by every node). Guests reach it through `wasi:keyvalue` (functions)
//! and `wasmgate.kv.*` foreign functions (filters); the admin API and CLI reach it for
//! debugging. [`Store`] wraps a backend with the tenant's limits and usage counters; the
//! backends only keep the semantics below identical.
//!
//! **Semantics (both backends).**
//! - A key lives in its tenant's namespace; no call names another tenant's.
//! - Every write gives the entry a new *version*: a per-tenant sequence number, so a
//!   version is never reused, not even after a delete and a re-create (no ABA for a
//!   compare-and-swap).
//! - `set` with `expect = Some(v)` stores only if the entry's version is `v` now
//!   (`Some(0)`: only if the key is absent); otherwise it answers the current version.
//! - `incr` treats the value as a decimal `i64` (an absent key as 0) and stores the
//!   result as decimal text, so a counter reads the same from every interface.
//! - A TTL makes an entry invisible once it passes; its bytes are released when the key
//!   is next written or deleted. Until then they count toward the tenant's bytes stored
//!   (an expired entry nobody writes again stays counted: documented, not hidden).
//! - *Bytes stored* are the key and value lengths of every live entry; a write that
//!   would take a tenant past its quota is refused and changes nothing.

pub mod embedded;
pub mod redis;
pub mod secrets;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An entry as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub version: u64,
}

/// How a write went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Stored (or deleted) at this version (a delete's is 0).
    Done(u64),
    /// The entry's version was not the one expected; this is its version now (0: absent).
    Conflict(u64),
}

/// What a write asks for besides the value.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOpts {
    /// Write only if the entry's version is this now (`Some(0)`: only if absent).
    pub expect: Option<u64>,
    /// The entry disappears this long after the write.
    pub ttl: Option<Duration>,
    /// Bytes the tenant may have stored after the write.
    pub quota: u64,
}

/// Why a state call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("key is empty or longer than {0} bytes")]
    BadKey(usize),
    #[error("value is longer than {0} bytes")]
    ValueTooLarge(usize),
    #[error("the tenant's state is full ({0} bytes)")]
    OverQuota(u64),
    #[error("too many state operations; retry later")]
    RateLimited,
    #[error("the value is not a decimal integer")]
    NotANumber,
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
}

impl StateError {
    /// A short machine-readable name, used by the guest interfaces and the admin API.
    pub fn code(&self) -> &'static str {
        match self {
            StateError::BadKey(_) => "bad_key",
            StateError::ValueTooLarge(_) => "value_too_large",
            StateError::OverQuota(_) => "over_quota",
            StateError::RateLimited => "rate_limited",
            StateError::NotANumber => "not_a_number",
            StateError::Unavailable(_) => "unavailable",
        }
    }
}

pub type Result<T> = std::result::Result<T, StateError>;

/// A state store: the semantics in the module doc, per namespace (`ns`, the tenant).
#[async_trait]
pub trait Backend: Send + Sync {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Entry>>;
    async fn set(&self, ns: &str, key: &str, value: Bytes, opts: WriteOpts) -> Result<Written>;
    /// Deletes the entry (if `expect` matches); `Done(0)` whether or not it existed.
    async fn delete(&self, ns: &str, key: &str, expect: Option<u64>) -> Result<Written>;
    /// Adds `delta` to the entry read as a decimal `i64`; answers the new value.
    async fn incr(&self, ns: &str, key: &str, delta: i64, quota: u64) -> Result<i64>;
    /// One page of live keys, in byte order (see [`Page`]).
    async fn list(&self, ns: &str, page: Page<'_>) -> Result<Vec<String>>;
    /// Bytes the namespace stores.
    async fn bytes_used(&self, ns: &str) -> Result<u64>;
    /// Which backend, for logs and the status page.
    fn name(&self) -> &'static str;
    /// Whether other gateways may use the same store.
    fn is_shared(&self) -> bool {
        false
    }
}

/// A page of keys: those starting with `prefix`, after `after`, at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    pub prefix: &'a str,
    pub after: Option<&'a str>,
    pub limit: usize,
}

impl<'a> Page<'a> {
    pub fn new(prefix: &'a str, after: Option<&'a str>, limit: usize) -> Self {
        Page {
            prefix,
            after,
            limit,
        }
    }
}

/// Every live key of namespace `ns`, page by page.
pub(crate) async fn all_keys(backend: &dyn Backend, ns: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let page = backend
            .list(ns, Page::new("", out.last().map(String::as_str), 500))
            .await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

/// Milliseconds since the epoch, the clock TTLs are kept in.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// When an entry written now with `ttl` expires (0: never).
pub(crate) fn expiry(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| now_ms().saturating_add(t.as_millis().max(1) as u64))
}

/// Parses a counter's value: absent is 0, otherwise decimal text.
pub(crate) fn counter(value: Option<&[u8]>) -> Result<i64> {
    match value {
        None => Ok(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(StateError::NotANumber),
    }
}

/// A tenant's state limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_total_bytes: u64,
    /// Operations a second (reads and writes), with as much burst; 0: no limit.
    pub ops_per_sec: u32,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            max_key_bytes: 512,
            max_value_bytes: 1 << 20,
            max_total_bytes: 64 << 20,
            ops_per_sec: 1000,
        }
    }
}

/// The store every interface goes through: a backend, each tenant's limits and usage.
pub struct Store {
    backend: Arc<dyn Backend>,
    defaults: StateLimits,
    limits: DashMap<String, StateLimits>,
    rate: DashMap<String, Arc<crate::control::limit::Limiter>>,
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>, defaults: StateLimits) -> Arc<Store> {
        Arc::new(Store {
            backend,
            defaults,
            limits: DashMap::new(),
            rate: DashMap::new(),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Whether other gateways may share this store (Redis): then the usage API adds up
    /// what the other nodes wrote there.
    pub fn is_shared(&self) -> bool {
        self.backend.is_shared()
    }

    /// The gateway's own records (usage published per node): outside every tenant's
    /// namespace, limits and usage.
    pub async fn system_set(&self, ns: &str, key: &str, value: Bytes) -> Result<()> {
        let opts = WriteOpts {
            quota: u64::MAX,
            ..WriteOpts::default()
        };
        self.backend
            .set(&format!("x/{ns}"), key, value, opts)
            .await
            .map(|_| ())
    }

    pub async fn system_get(&self, ns: &str, key: &str) -> Result<Option<Bytes>> {
        Ok(self
            .backend
            .get(&format!("x/{ns}"), key)
            .await?
            .map(|e| e.value))
    }

    /// Every key of a system namespace.
    pub async fn system_keys(&self, ns: &str) -> Result<Vec<String>> {
        all_keys(&*self.backend, &format!("x/{ns}")).await
    }

    /// Sets a tenant's limits (its rate starts afresh).
    pub fn set_limits(&self, tenant: &str, limits: StateLimits) {
        self.limits.insert(tenant.to_string(), limits);
        self.rate.remove(tenant);
    }

    pub fn limits(&self, tenant: &str) -> StateLimits {
        self.limits.get(tenant).map_or(self.defaults, |l| *l)
    }

    /// A handle bound to one tenant, counting its calls into `usage` (the module that
    /// makes them: a filter's or function's usage; the admin API counts nowhere).
    pub fn tenant(
        self: &Arc<Self>,
        tenant: &str,
        usage: Option<Arc<crate::wasm::meter::Usage>>,
    ) -> TenantState {
        TenantState {
            store: self.clone(),
            tenant: Arc::from(tenant),
            ns: Arc::from(format!("t/{tenant}")),
            usage,
        }
    }

    fn admit(&self, tenant: &str, limits: &StateLimits) -> Result<()> {
        if limits.ops_per_sec == 0 {
            return Ok(());
        }
        let limiter = match self.rate.get(tenant) {
            Some(l) => l.clone(),
            None => self
                .rate
                .entry(tenant.to_string())
                .or_insert_with(|| {
                    Arc::new(crate::control::limit::Limiter::new(
                        limits.ops_per_sec,
                        limits.ops_per_sec,
                    ))
                })
                .clone(),
        };
        limiter.check().map_err(|_| StateError::RateLimited)
    }
}

/// Which backend, and where (`[state]` in the conf).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendConf {
    /// `data_dir/state/state.redb`.
    Embedded,
    Redis {
        url: String,
        /// Prefix of every key the gateway writes.
        prefix: String,
        /// Longest a call waits for Redis.
        timeout: Duration,
    },
}

/// `[state]` as the gateway runs with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateConf {
    pub backend: BackendConf,
    /// Every tenant's limits unless its own say otherwise.
    pub limits: StateLimits,
    /// In a cluster: the secret key every node derives from the cluster key (unless
    /// `WASMGATE_SECRET_KEY` is set), so a secret one node seals, every node opens.
    pub shared_key: Option<[u8; 32]>,
}

impl Default for StateConf {
    fn default() -> Self {
        StateConf {
            backend: BackendConf::Embedded,
            limits: StateLimits::default(),
            shared_key: None,
        }
    }
}

/// The gateway's state services: the store and the secrets over one backend, and a small
/// runtime of their own (one thread) that owns the Redis connection and serves the few
/// places that must wait for the store outside any async context (conf loading).
pub struct Services {
    pub store: Arc<Store>,
    pub secrets: Arc<secrets::Secrets>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Services {
    /// Opens the backend `conf` names (the embedded file under `data_dir/state`), the
    /// secret key (see [`secrets`]), and loads every tenant's secrets. A Redis that does
    /// not answer is not an error here: the gateway starts, and state calls fail with
    /// `unavailable` until it answers.
    pub fn open(data_dir: &std::path::Path, conf: &StateConf) -> anyhow::Result<Arc<Services>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wasmgate-state")
            .enable_all()
            .build()?;
        let backend: Arc<dyn Backend> = match &conf.backend {
            BackendConf::Embedded => Arc::new(embedded::Embedded::open(
                &data_dir.join("state").join("state.redb"),
            )?),
            BackendConf::Redis {
                url,
                prefix,
                timeout,
            } => {
                let _in = rt.enter();
                Arc::new(redis::Redis::connect(url, prefix, *timeout)?)
            }
        };
        let keys = match conf.shared_key {
            Some(k) if std::env::var(secrets::KEY_ENV).map_or(true, |v| v.trim().is_empty()) => {
                secrets::Keyring::shared(&k)?
            }
            _ => secrets::Keyring::load(data_dir)?,
        };
        let services = Arc::new(Services {
            store: Store::new(backend.clone(), conf.limits),
            secrets: secrets::Secrets::new(backend, keys),
            rt: Some(rt),
        });
        let s = services.secrets.clone();
        match services.wait(async move { s.load_all().await }) {
            Ok(n) => tracing::info!(
                backend = services.store.backend_name(),
                tenants = n,
                "state opened"
            ),
            Err(e) => {
                tracing::error!(
                    backend = services.store.backend_name(),
                    "state opened, but secrets could not be loaded (functions see none, and filters naming one cannot load, until they can; retrying every 2 s): {e}"
                );
                let s = services.secrets.clone();
                services.rt.as_ref().expect("just built").spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        if let Ok(n) = s.load_all().await {
                            tracing::info!(tenants = n, "secrets loaded");
                            return;
                        }
                    }
                });
            }
        }
        Ok(services)
    }

    /// Deletes everything tenant `t` keeps: its key-value entries and its secrets (a
    /// deleted tenant; a new one of the same name starts empty). How many entries.
    pub async fn forget_tenant(&self, t: &str) -> std::result::Result<usize, String> {
        let ns = format!("t/{t}");
        let backend = &*self.store.backend;
        let keys = all_keys(backend, &ns).await.map_err(|e| e.to_string())?;
        for k in &keys {
            backend
                .delete(&ns, k, None)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(keys.len() + self.secrets.forget_tenant(t).await?)
    }

    /// Runs `fut` on the state runtime and waits for it from synchronous code.
    pub fn wait<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt
            .as_ref()
            .expect("the state runtime lives as long as its services")
            .spawn(async move {
                let _ = tx.send(fut.await);
            });
        rx.recv()
            .expect("the state runtime runs every task it is given")
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        // may be dropped inside another runtime (tests): do not block on shutdown
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One tenant's view of the store. Every call checks the tenant's limits, counts usage
/// and reaches only the tenant's namespace.
#[derive(Clone)]
pub struct TenantState {
    store: Arc<Store>,
    tenant: Arc<str>,
    /// The tenant's key-value namespace in the backend (`t/NAME`).
    ns: Arc<str>,
    usage: Option<Arc<crate::wasm::meter::Usage>>,
}

impl TenantState {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    fn check(&self, key: &str) -> Result<StateLimits> {
        let limits = self.store.limits(&self.tenant);
        if key.is_empty() || key.len() > limits.max_key_bytes {
            return Err(StateError::BadKey(limits.max_key_bytes));
        }
        self.store.admit(&self.tenant, &limits)?;
        Ok(limits)
    }

    fn read(&self) {
        if let Some(u) = &self.usage {
            u.state_reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        if let Some(u) = &self.usage {
            u.state_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>> {
        self.check(key)?;
        let e = self.store.backend.get(&self.ns, key).await?;
        self.read();
        Ok(e)
    }

    pub async fn set(
        &self,
        key: &str,
        value: Bytes,
        expect: Option<u64>,
        ttl: Option<Duration>,
    ) -> Result<Written> {
        let limits = self.check(key)?;
        if value.len() > limits.max_value_bytes {
            return Err(StateError::ValueTooLarge(limits.max_value_bytes));
        }
        let opts = WriteOpts {
            expect,
            ttl,
            quota: limits.max_total_bytes,
        };
        let w = self.store.backend.set(&self.ns, key, value, opts).await?;
        self.wrote();
        Ok(w)
    }

    pub async fn delete(&self, key: &str, expect: Option<u64>) -> Result<Written> {
        self.check(key)?;
        let w = self.store.backend.delete(&self.ns, key, expect).await?;
        self.wrote();
        Ok(w)
    }

    pub async fn incr(&self, key: &str, delta: i64) -> Result<i64> {
        let limits = self.check(key)?;
        let v = self
            .store
            .backend
            .incr(&self.ns, key, delta, limits.max_total_bytes)
            .await?;
        self.wrote();
        Ok(v)
    }

    pub async fn list(&self, page: Page<'_>) -> Result<Vec<String>> {
        let limits = self.store.limits(&self.tenant);
        self.store.admit(&self.tenant, &limits)?;
        let keys = self
            .store
            .backend
            .list(
                &self.ns,
                Page {
                    limit: page.limit.min(1000),
                    ..page
                },
            )
            .await?;
        self.read();
        Ok(keys)
    }

    /// Bytes stored, as the backend counts them now.
    pub async fn bytes_used(&self) -> Result<u64> {
        self.store.backend.bytes_used(&self.ns).await
    }
}

#[cfg(test)]
pub(crate) mod conformance;

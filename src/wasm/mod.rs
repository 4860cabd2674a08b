//! The wasm runtime: one engine, compiled modules cached by content digest, Proxy-Wasm
//! plugins with pooled VMs, budgets and failure policies.
//!
//! Knows nothing of Pingora's sessions: the proxy hands it header maps and bodies for the
//! length of one callback (see [`host::Frame`]) and gets back an [`Outcome`].
//!
//! Budgets are measured in fuel, not wall-clock time: fuel is deterministic, so a valid
//! callback never trips because the thread was descheduled on a busy machine, and it costs
//! about what epoch checks cost (see the README's measurements). One microsecond of budget
//! buys [`FUEL_PER_US`] units (roughly one wasm instruction each); host calls are charged
//! too, so a guest cannot escape its budget by looping over cheap host calls.

pub mod abi;
pub mod component;
mod function;
pub mod host;
pub mod meter;
mod renew;
mod vm;

pub use function::{FunctionBackend, FunctionSpec, DEFAULT_MAX_RESPONSE_BYTES};
pub use host::View;
pub use host::{
    CallResponse, ConnTls, GrpcStatus, GrpcTarget, LocalResponse, NodeInfo, PendingCall,
    RequestInfo, StreamCmd, StreamEvent, StreamEvents,
};
pub use vm::{Lease, Outcome, RootEvent};

use crate::metrics::Metrics;
use crate::upstream::Upstream;
use anyhow::Context as _;
use crossbeam_queue::ArrayQueue;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, OptLevel};

/// A module's callback budget when neither the conf nor a deploy sets one (µs).
pub const DEFAULT_BUDGET_US: u64 = 1000;
/// A module's memory limit when neither the conf nor a deploy sets one (MiB).
pub const DEFAULT_MEMORY_MB: u64 = 16;
/// Fuel granted per microsecond of budget.
pub const FUEL_PER_US: u64 = 1_000;
/// Fuel a host call costs before any bytes are copied, and per byte copied.
pub const HOST_CALL_FUEL: u64 = 50;
/// Largest linear memory any module may be configured with.
pub const MAX_MEMORY_BYTES: u64 = 512 << 20;
/// Wasm stack per instance; deep recursion traps at this depth.
pub const MAX_WASM_STACK: usize = 512 << 10;
/// Largest body a guest may answer with through `proxy_send_local_response`.
pub const MAX_LOCAL_RESPONSE_BYTES: usize = 1 << 20;
/// Instances the pooling allocator can hold at once, across all modules.
const POOL_INSTANCES: u32 = 1000;
/// Idle VMs kept across all plugins: half the pool, so VMs that wait for their module's
/// next request (every module keeps up to its `max_instances`) can never take the slots
/// that fresh instances, busier modules, or the modules of a reloaded conf need. Past it
/// a returned VM is let go (`on_done`, `on_delete`) and its module starts one when needed.
const MAX_IDLE_VMS: usize = POOL_INSTANCES as usize / 2;
/// How long a request waits for a busy module's instance before getting 503.
pub const INSTANCE_WAIT: Duration = Duration::from_millis(100);
/// Fuel a body callback may spend, beyond its per-callback budget, per body byte that
/// arrived since the module's previous body callback. Lets a filter that reads and scans
/// the whole buffered body at end of stream finish on bodies of any size (the Rust SDK's
/// `http_body` example burned 6.97 fuel per byte at 150 KB, 1 MiB and 8 MiB, so it failed
/// its 1 ms callback budget from ~143 KB on), while a filter whose work grows faster than
/// the body still runs out.
pub const BODY_FUEL_PER_BYTE: u64 = 16;
/// How long a root context that answered `on_done` with false may take to call
/// `proxy_done` (getting `on_tick` meanwhile) before it gets `on_delete` anyway.
pub const DONE_WAIT: Duration = Duration::from_secs(3);
/// Fuel one guest log line costs (`proxy_log`, a line written to WASI stdout/stderr) on
/// top of the bytes: 10,000 lines took 32-50 ms through a gateway here (3-5 µs each, for
/// the tenant's log and the gateway's), against 4 µs of budget.
pub const LOG_LINE_FUEL: u64 = 4_000;

/// Sends the callouts guests make (`proxy_http_call`, `proxy_grpc_call`). The proxy
/// provides it; the runtime uses it for the root context's callouts, made outside any
/// request (a token or key-set fetched from `on_configure` or `on_tick`).
pub trait Dispatch: Send + Sync {
    fn dispatch(
        self: Arc<Self>,
        call: PendingCall,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = CallResponse> + Send>>;

    /// Starts a gRPC stream (`proxy_grpc_stream`) on its own task: it takes the guest's
    /// messages from `cmds` (the stream is reset when `cmds` closes) and hands its events
    /// to `events` in order, ending with a [`StreamEvent::Close`] unless it was reset.
    fn open_stream(
        self: Arc<Self>,
        call: PendingCall,
        cmds: tokio::sync::mpsc::UnboundedReceiver<StreamCmd>,
        events: futures::channel::mpsc::Sender<CallResponse>,
    );
}

/// Where plugins find the dispatcher, once the proxy has set it.
type DispatchSlot = Arc<std::sync::OnceLock<Arc<dyn Dispatch>>>;

/// What the guest's failure turns into for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Answer with this status and a JSON error body.
    Deny(u16),
    /// Fail open: skip this module for the rest of the request.
    Allow,
    /// Answer with a fixed status and body.
    Respond(u16, String),
}

impl FailurePolicy {
    pub fn parse(action: &str, status: Option<u16>, body: Option<&str>) -> Result<Self, String> {
        let status_ok = |s: u16| {
            if (200..=599).contains(&s) {
                Ok(s)
            } else {
                Err(format!(
                    "on_failure.status {s} is not an HTTP status (200-599)"
                ))
            }
        };
        match action {
            "deny" => Ok(FailurePolicy::Deny(status_ok(status.unwrap_or(503))?)),
            "allow" => Ok(FailurePolicy::Allow),
            "respond" => Ok(FailurePolicy::Respond(
                status_ok(status.unwrap_or(503))?,
                body.unwrap_or("").to_string(),
            )),
            other => Err(format!(
                "on_failure.action `{other}` is not one of deny, allow, respond"
            )),
        }
    }
}

/// Why a callback failed; [`Cause::label`] is the failure metric's label, the
/// `Display` text the detail a log line gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    /// Ran out of its fuel budget (per callback or per request).
    #[error("ran out of its time budget")]
    Overrun,
    /// Trapped: unreachable, out-of-bounds access, stack overflow, failed allocation.
    #[error("{0}")]
    Trap(String),
    /// Broke the ABI's rules (paused without a way to resume, oversized local response).
    #[error("{0}")]
    Misbehaved(&'static str),
    /// No instance could be had in time (module at its max_instances).
    #[error("no instance free within the wait limit")]
    Busy,
}

impl Cause {
    pub fn label(&self) -> &'static str {
        match self {
            Cause::Overrun => "budget_overrun",
            Cause::Trap(_) => "trap",
            Cause::Misbehaved(m) => m,
            Cause::Busy => "instances_exhausted",
        }
    }
}

/// A callback that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{callback} failed: {cause}")]
pub struct Failure {
    pub callback: &'static str,
    pub cause: Cause,
}

/// Why a module cannot be loaded: the reason a deploy or a conf load is refused with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("not a wasm module (missing the \\0asm header)")]
    NotWasm,
    #[error("does not compile: {0}")]
    DoesNotCompile(String),
    /// Not a Proxy-Wasm module this host runs: what it lacks.
    #[error("{0}")]
    NotProxyWasm(String),
    #[error("imports something this host does not provide: {0}")]
    MissingImport(String),
    #[error("memory_mb {mb} exceeds the gateway's maximum of {max} MiB")]
    MemoryTooLarge { mb: u64, max: u64 },
    /// Its configuration names a secret its tenant has not set.
    #[error("{0}")]
    Secret(String),
    /// Its first VM failed to start (`on_vm_start` or `on_configure` refused or broke).
    #[error("{0}")]
    Start(Failure),
}

/// How a module's instances are shared between requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Isolation {
    /// One VM per module reused across requests (Envoy's model).
    #[default]
    Shared,
    /// A fresh instance for every request.
    Request,
}

/// A module as the conf declares it, before it is instantiated.
pub struct PluginSpec {
    /// The module's name, unique within its tenant.
    pub name: String,
    /// Whose module it is: named in its log lines, metrics and usage.
    pub tenant: String,
    /// Proxy-Wasm's `root_id`: which root context of a multi-root module serves.
    pub root_id: String,
    /// Given to `on_configure` (the plugin configuration).
    pub config: Vec<u8>,
    /// Given to `on_vm_start`.
    pub vm_config: Vec<u8>,
    pub isolation: Isolation,
    /// What a request gets when the module fails.
    pub policy: FailurePolicy,
    pub limits: FilterLimits,
    /// Where its callouts may go; the plugin takes them over (see [`Plugin::set_upstreams`]).
    pub allowed_upstreams: Vec<Arc<Upstream>>,
}

/// What a Proxy-Wasm module may use (a function's are [`component::Limits`]).
#[derive(Debug, Clone, Copy)]
pub struct FilterLimits {
    /// CPU time one callback may take (counted as fuel).
    pub budget: Duration,
    /// CPU time all callbacks of one request may take together.
    pub request_budget: Duration,
    /// Largest linear memory an instance may have.
    pub memory_bytes: u64,
    /// Instances (VMs and fresh ones) that may exist at once.
    pub max_instances: usize,
    /// The shortest tick period the module may set.
    pub min_tick: Duration,
}

/// A compiled module, ready to instantiate. Shared by every plugin using the same bytes.
pub struct Compiled {
    pub digest: String,
    /// A Proxy-Wasm v0.1.0 module (known once, not per instance).
    pub abi01: bool,
    pub exports: Vec<String>,
    pub size: usize,
    /// Its machine code: swapped once when a module that went live on baseline code has
    /// its optimized code (see [`Tier`]); instances and VMs started from then on use it.
    code: arc_swap::ArcSwap<Code>,
    pub compile_time: Duration,
    pub from_disk: bool,
}

impl Compiled {
    /// The code new instances start from.
    pub fn code(&self) -> Arc<Code> {
        self.code.load_full()
    }

    pub fn tier(&self) -> Tier {
        self.code.load().tier
    }

    /// `code` is what new instances start from.
    pub(crate) fn is_current(&self, code: &Arc<Code>) -> bool {
        Arc::ptr_eq(&self.code.load(), code)
    }
}

/// Which compiler made a module's code. A module nowhere compiled yet (a deploy, a conf
/// load without a cached artifact) goes live on baseline code at once, and a background
/// thread compiles its optimized code, which then replaces it for new instances and VMs
/// (running ones finish on the code they started with). Precompiled artifacts are always
/// optimized code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Winch, wasmtime's baseline compiler: one pass, several times faster to compile,
    /// slower to run.
    Baseline,
    /// Cranelift, the optimizing compiler.
    Optimized,
}

/// Which compilers a runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compilers {
    /// Baseline first, optimized in the background (serving).
    Tiered,
    /// Optimized only (a conf check; benchmarks).
    Optimized,
    /// Baseline only, never upgraded (tests and benchmarks of the baseline tier).
    Baseline,
}

/// A module's machine code for one engine, ready to instantiate.
pub struct Code {
    pub tier: Tier,
    pub pre: InstancePre<host::Host>,
    /// The callbacks' export indices, in the order `Vm::boot` looks them up, once the
    /// first instance of this code checked their types.
    pub(crate) callbacks: std::sync::OnceLock<Box<[Option<wasmtime::ModuleExport>]>>,
    /// A snapshot's memory and globals as its instances start, for renewing its VMs
    /// (`None`: they cannot be; see [`renew`]). Taken by the code's first VM.
    pub(crate) pristine: std::sync::OnceLock<Option<renew::Pristine>>,
}

impl Code {
    fn new(linker: &Linker<host::Host>, module: &Module, tier: Tier) -> Result<Code, ModuleError> {
        let mut linker = linker.clone();
        host::wasi::stub_unknown(&mut linker, module).map_err(ModuleError::MissingImport)?;
        let pre = linker
            .instantiate_pre(module)
            .map_err(|e| ModuleError::MissingImport(root_cause(&e)))?;
        Ok(Code {
            tier,
            pre,
            callbacks: Default::default(),
            pristine: Default::default(),
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        self.pre.module().engine()
    }
}

/// A module that went live on baseline code, for the background compiler.
struct Upgrade {
    compiled: Arc<Compiled>,
    bytes: Vec<u8>,
    artifact: Option<PathBuf>,
}

/// A module pre-initialized with one configuration (see [`Runtime::snapshot`]).
struct Snap {
    compiled: Arc<Compiled>,
    config_gen: u64,
}

/// A configured module: compiled code, its conf, its idle VMs.
pub struct Plugin {
    pub spec: PluginSpec,
    pub compiled: Arc<Compiled>,
    pub(crate) shared: Arc<SharedState>,
    idle: ArrayQueue<Box<vm::Vm>>,
    permits: Arc<tokio::sync::Semaphore>,
    pub(crate) metrics: PluginMetrics,
    pub usage: Arc<meter::Usage>,
    pub log: Arc<meter::TenantLog>,
    /// Tick period asked by the guest, in ms (0: none).
    pub(crate) tick_ms: AtomicU32,
    pub(crate) metric_ids: DashMap<String, u32>,
    pub(crate) guest_metrics: DashMap<u32, host::GuestMetric>,
    next_metric: AtomicU32,
    generation: AtomicU64,
    /// Queues with items waiting for `on_queue_ready`.
    pending_queues: crossbeam_queue::SegQueue<u32>,
    /// The tenant's shared data and queue accounting (shared by all its plugins).
    pub(crate) quota: Arc<TenantQuota>,
    /// Unix second of the last "quota exceeded" log line, so a guest hammering a full
    /// quota costs one log line per second, not one per call.
    quota_warned: AtomicU64,
    /// Replaced or removed (a reload, a redeploy): VMs are no longer pooled, timers stop.
    retired: std::sync::atomic::AtomicBool,
    /// The guest registered a shared queue: its `on_queue_ready` may resume a request.
    pub(crate) has_queues: std::sync::atomic::AtomicBool,
    /// The tenant's state store handle, made on first use.
    kv: std::sync::OnceLock<crate::state::TenantState>,
    /// The configuration its VMs start with: `spec.config` with the tenant's secrets
    /// substituted, replaced when a secret changes ([`Plugin::reconfigure`]).
    pub(crate) config: arc_swap::ArcSwap<Vec<u8>>,
    /// Bumped by each reconfiguration: a VM started before it is not pooled again.
    pub(crate) config_gen: AtomicU64,
    /// Requests waiting on their VM's root context, and the signal that a queue of this
    /// plugin has items for them.
    queue_waiters: std::sync::atomic::AtomicUsize,
    queue_signal: tokio::sync::Notify,
    dispatch: DispatchSlot,
    /// Fresh instances (`isolation = "request"`) start from this snapshot of the
    /// module's start, while the configuration is the one it was taken with.
    snap: arc_swap::ArcSwapOption<Snap>,
    /// VMs renewed for another request (see [`Plugin::renew`]).
    renewals: AtomicU64,
    /// Whether its VMs are renewed at all (the runtime's [`Runtime::set_renewal`]).
    renews: bool,
    /// The upstreams its callouts may reach, by name: first `spec.allowed_upstreams`,
    /// then whatever the embedder hands over when the upstreams are rebuilt (a deployed
    /// module outlives the conf snapshot it was built against).
    upstreams: arc_swap::ArcSwap<Vec<Arc<Upstream>>>,
}

#[derive(Clone)]
pub(crate) struct PluginMetrics {
    pub invocations: prometheus::IntCounter,
    pub fuel: prometheus::IntCounter,
    pub cpu: prometheus::Histogram,
    pub failures: prometheus::IntCounterVec,
    pub guest_counters: prometheus::IntCounterVec,
    pub guest_gauges: prometheus::IntGaugeVec,
}

/// State shared by guests of one tenant: key-value data with CAS, and queues.
#[derive(Default)]
pub struct SharedState {
    pub data: DashMap<(String, Vec<u8>), (Vec<u8>, u32)>,
    pub queue_ids: DashMap<(String, Vec<u8>), u32>,
    pub queues: DashMap<u32, Queue>,
    pub next_queue: AtomicU32,
    quotas: DashMap<String, Arc<TenantQuota>>,
    /// The gateway's `node` (the conf's `[node]`), as every guest sees it.
    node: arc_swap::ArcSwap<host::NodeInfo>,
    /// Tenant state and secrets, once the server opened them (`serve`; none in `check`
    /// or tests that do not set them).
    pub services: std::sync::OnceLock<Arc<crate::state::Services>>,
    /// VMs idle in any plugin's pool (see [`MAX_IDLE_VMS`]).
    idle_vms: std::sync::atomic::AtomicUsize,
}

impl SharedState {
    pub fn node(&self) -> Arc<host::NodeInfo> {
        self.node.load_full()
    }

    fn quota(&self, tenant: &str) -> Arc<TenantQuota> {
        if let Some(q) = self.quotas.get(tenant) {
            return q.clone();
        }
        self.quotas.entry(tenant.to_string()).or_default().clone()
    }
}

/// A shared queue: its tenant, its items, and the plugin that registered it (which gets
/// `on_queue_ready` when items arrive).
pub struct Queue {
    pub tenant: String,
    pub items: std::collections::VecDeque<Vec<u8>>,
    /// Sum of the items' lengths.
    pub bytes: u64,
    pub owner: std::sync::Weak<Plugin>,
}

/// What one tenant may keep in shared data and queues. Without caps one tenant's guest
/// could grow the gateway's memory until the kernel kills it, taking every tenant down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedLimits {
    /// Keys plus values plus [`SHARED_ENTRY_OVERHEAD`] per key, over all its keys.
    pub data_bytes: u64,
    /// Bytes queued in one queue.
    pub queue_bytes: u64,
    /// Items queued in one queue.
    pub queue_items: u64,
    /// Bytes queued over all its queues.
    pub tenant_queue_bytes: u64,
    /// Queues it may register.
    pub queues: u64,
}

impl Default for SharedLimits {
    fn default() -> Self {
        SharedLimits {
            data_bytes: 8 << 20,
            queue_bytes: 4 << 20,
            queue_items: 10_000,
            tenant_queue_bytes: 8 << 20,
            queues: 256,
        }
    }
}

/// Longest shared queue name (`proxy_register_shared_queue` answers `BadArgument` beyond).
pub const MAX_QUEUE_NAME_BYTES: usize = 256;

/// Bytes a shared-data key costs beyond its key and value (map slot, two vectors, CAS):
/// without it, millions of empty keys would be free.
pub const SHARED_ENTRY_OVERHEAD: u64 = 64;

/// A tenant's usage of shared data and queues, checked on every write with atomics only
/// (the map's shard lock is held anyway for the write itself).
pub(crate) struct TenantQuota {
    pub data_bytes: AtomicU64,
    pub queue_bytes: AtomicU64,
    pub queues: AtomicU64,
    limits: [AtomicU64; 5],
}

impl Default for TenantQuota {
    fn default() -> Self {
        let q = TenantQuota {
            data_bytes: AtomicU64::new(0),
            queue_bytes: AtomicU64::new(0),
            queues: AtomicU64::new(0),
            limits: Default::default(),
        };
        q.set_limits(SharedLimits::default());
        q
    }
}

impl TenantQuota {
    pub fn limits(&self) -> SharedLimits {
        let l = |i: usize| self.limits[i].load(Ordering::Relaxed);
        SharedLimits {
            data_bytes: l(0),
            queue_bytes: l(1),
            queue_items: l(2),
            tenant_queue_bytes: l(3),
            queues: l(4),
        }
    }

    fn set_limits(&self, s: SharedLimits) {
        for (i, v) in [
            s.data_bytes,
            s.queue_bytes,
            s.queue_items,
            s.tenant_queue_bytes,
            s.queues,
        ]
        .into_iter()
        .enumerate()
        {
            self.limits[i].store(v, Ordering::Relaxed);
        }
    }

    /// Takes `n` more of `counter` if that stays within `max`; all or nothing.
    pub fn reserve(counter: &AtomicU64, n: u64, max: u64) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                cur.checked_add(n).filter(|v| *v <= max)
            })
            .is_ok()
    }
}

/// The engine, the host functions, and the compiled-module cache.
pub struct Runtime {
    /// Cranelift: optimized code, with the pooling allocator.
    engine: Engine,
    linker: Linker<host::Host>,
    /// Winch, for modules not compiled yet ([`Compilers::Tiered`] or `Baseline`).
    baseline: Option<(Engine, Linker<host::Host>)>,
    compilers: Compilers,
    /// Where baseline modules go for their optimized code (the thread starts with the
    /// first one).
    optimizer: Background<Upgrade>,
    cache: DashMap<[u8; 32], Arc<Compiled>>,
    /// Where precompiled artifacts persist across restarts, once the conf named it.
    cache_dir: std::sync::OnceLock<PathBuf>,
    /// The component runtime, once a component is loaded.
    components: std::sync::OnceLock<component::ComponentRuntime>,
    /// Artifacts go to disk at all (`serve`, not `check`).
    persist: bool,
    /// Fresh-instance modules get snapshots ([`Runtime::snapshot`]).
    snapshots: bool,
    /// VMs started from snapshots are renewed for the next request ([`renew`]).
    renewal: bool,
    shared: Arc<SharedState>,
    pub meter: Arc<meter::Meter>,
    dispatch: DispatchSlot,
}

impl Runtime {
    /// Sets the `node` guests see (from the conf being loaded).
    pub fn set_node(&self, node: Arc<NodeInfo>) {
        self.shared.node.store(node);
    }

    /// The `node` guests see now.
    pub fn node(&self) -> Arc<NodeInfo> {
        self.shared.node()
    }

    /// `persist`: precompiled artifacts are kept on disk, in the folder the first conf
    /// names ([`Runtime::set_cache_dir`]), and modules are compiled in tiers; otherwise
    /// artifacts stay in memory and every module is compiled optimized at once.
    pub fn new(persist: bool) -> anyhow::Result<Runtime> {
        let compilers = if persist {
            Compilers::Tiered
        } else {
            Compilers::Optimized
        };
        Self::with_compilers(persist, compilers)
    }

    pub fn with_compilers(persist: bool, compilers: Compilers) -> anyhow::Result<Runtime> {
        let werr = |e: wasmtime::Error| anyhow::anyhow!("{e:#}");
        let linked = |config: &Config| -> anyhow::Result<(Engine, Linker<host::Host>)> {
            let engine = Engine::new(config).map_err(werr)?;
            let mut linker = Linker::new(&engine);
            host::define(&mut linker).map_err(werr)?;
            host::wasi::define(&mut linker).map_err(werr)?;
            Ok((engine, linker))
        };
        let (engine, linker) = linked(&engine_config())?;
        let baseline = match compilers {
            Compilers::Optimized => None,
            _ => Some(linked(&baseline_config())?),
        };
        if let Some((engine, _)) = &baseline {
            // the compiler's one-time set-up, here rather than in the first deploy
            let _ = Module::new(
                engine,
                "(module (func (export \"f\") (result i32) (i32.const 1)))",
            );
        }
        Ok(Runtime {
            engine,
            linker,
            baseline,
            compilers,
            optimizer: Default::default(),
            cache: DashMap::new(),
            cache_dir: std::sync::OnceLock::new(),
            components: std::sync::OnceLock::new(),
            persist,
            snapshots: true,
            renewal: true,
            shared: Arc::new(SharedState::default()),
            meter: Arc::default(),
            dispatch: Arc::default(),
        })
    }

    /// Where precompiled artifacts go: the first conf's `data_dir/modules` (a reload that
    /// names another folder changes nothing until a restart). No-op for a memory-only
    /// runtime.
    pub fn set_cache_dir(&self, dir: &Path) -> anyhow::Result<()> {
        if !self.persist || self.cache_dir.get().is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating module cache {}", dir.display()))?;
        let _ = self.cache_dir.set(dir.to_path_buf());
        Ok(())
    }

    /// Sets the tenant state and secrets guests reach (once, when the server starts).
    pub fn set_state(&self, services: Arc<crate::state::Services>) {
        let _ = self.shared.services.set(services);
    }

    /// A filter's configuration as its VMs get it: the tenant's secrets substituted for
    /// `{{secret:NAME}}` (see [`crate::state::secrets::substitute`]). Without state (a
    /// conf check) placeholders stay as written.
    pub fn configuration(&self, tenant: &str, config: &[u8]) -> Result<Vec<u8>, ModuleError> {
        use crate::state::secrets;
        match self.state() {
            Some(s) if secrets::names_secrets(config) => {
                secrets::substitute(config, s.secrets.cached(tenant).as_deref())
                    .map_err(ModuleError::Secret)
            }
            _ => Ok(config.to_vec()),
        }
    }

    /// Opens the tenant state the first conf names, under its `data_dir` (a serving
    /// runtime only: `check` opens nothing; later confs change only the limits).
    pub fn open_state(
        &self,
        data_dir: &Path,
        conf: &crate::state::StateConf,
    ) -> anyhow::Result<()> {
        if !self.persist || self.shared.services.get().is_some() {
            return Ok(());
        }
        self.set_state(crate::state::Services::open(data_dir, conf)?);
        Ok(())
    }

    /// The tenant state and secrets, if the server opened them.
    pub fn state(&self) -> Option<&Arc<crate::state::Services>> {
        self.shared.services.get()
    }

    /// Sets who sends root-context callouts (the proxy's callout client); until then they
    /// wait, unsent.
    pub fn set_dispatch(&self, d: Arc<dyn Dispatch>) {
        let _ = self.dispatch.set(d);
    }

    /// Sets what `tenant` may keep in shared data and queues (defaults: [`SharedLimits`]'s).
    /// Takes effect on the next write; what is stored already stays.
    pub fn set_shared_limits(&self, tenant: &str, limits: SharedLimits) {
        self.shared.quota(tenant).set_limits(limits);
    }

    /// Compiles `bytes` (or finds it compiled, in memory or on disk) and checks that it
    /// is a Proxy-Wasm module this host can run. A module not compiled before goes live on
    /// baseline code when the runtime is tiered (see [`Tier`]).
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<Compiled>, ModuleError> {
        self.compile_found(bytes).map(|(c, _)| c)
    }

    /// [`Runtime::compile`], and whether the module was already compiled in memory.
    fn compile_found(&self, bytes: &[u8]) -> Result<(Arc<Compiled>, bool), ModuleError> {
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(c) = self.cache.get(&digest) {
            return Ok((c.clone(), true));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(ModuleError::NotWasm);
        }
        let start = Instant::now();
        let artifact = self.artifact_path(&self.engine, &hex::encode(digest), "cwasm");
        let precompiled = load_artifact(&self.engine, artifact.as_deref());
        // Winch does not compile every proposal Cranelift does: then Cranelift it is
        let baseline = match (&precompiled, &self.baseline) {
            (None, Some((engine, linker))) => Some((Module::new(engine, bytes).ok(), linker)),
            _ => None,
        };
        let (code, from_disk) = match (precompiled, baseline) {
            (Some(module), _) => (checked(&self.linker, &module, Tier::Optimized)?, true),
            (None, Some((Some(module), linker))) => {
                (checked(linker, &module, Tier::Baseline)?, false)
            }
            (None, _) => {
                let module = optimize(&self.engine, bytes, artifact.as_deref())?;
                (checked(&self.linker, &module, Tier::Optimized)?, false)
            }
        };
        let module = code.pre.module();
        let compiled = Arc::new(Compiled {
            abi01: module.get_export("proxy_abi_version_0_1_0").is_some(),
            exports: module.exports().map(|e| e.name().to_string()).collect(),
            digest: hex::encode(digest),
            size: bytes.len(),
            code: arc_swap::ArcSwap::from_pointee(code),
            compile_time: start.elapsed(),
            from_disk,
        });
        self.cache.insert(digest, compiled.clone());
        if compiled.tier() == Tier::Baseline && self.compilers == Compilers::Tiered {
            self.optimize_later(Upgrade {
                compiled: compiled.clone(),
                bytes: bytes.to_vec(),
                artifact,
            });
        }
        Ok((compiled, false))
    }

    /// Queues a baseline module for its optimized code. One background thread compiles
    /// them one at a time (Cranelift compiles a module's functions in parallel itself), so
    /// a burst of deploys never takes more than the cores one compile takes.
    fn optimize_later(&self, job: Upgrade) {
        let (engine, linker) = (self.engine.clone(), self.linker.clone());
        self.optimizer.send("wasmgate-optimize", job, move || {
            // Cranelift on this one thread: the other cores stay free for requests and
            // for the baseline compiles of the next deploys (with its parallel
            // compilation, a 24 ms Winch compile took 140-240 ms beside it)
            let mut config = engine_config();
            config.parallel_compilation(false);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
            let serial = Engine::new(&config).ok();
            move |job| upgrade(serial.as_ref(), &engine, &linker, job)
        });
    }

    /// Waits until every module and function queued for optimized code has it (tests,
    /// benchmarks).
    pub fn wait_optimized(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if let Some(c) = self.components.get() {
            if !c.wait_optimized(timeout) {
                return false;
            }
        }
        while self.compilers == Compilers::Tiered
            && self.cache.iter().any(|c| c.tier() == Tier::Baseline)
        {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Where the precompiled code of the module with `digest` lives, for `engine` (its
    /// compatibility hash is part of the name); `None` when artifacts are not kept.
    fn artifact_path(&self, engine: &Engine, digest: &str, ext: &str) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        let d = self.cache_dir.get()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Some(d.join(format!("{digest}-{:016x}.{ext}", h.finish())))
    }

    /// Builds a plugin: compile, then start one VM to run `on_vm_start` and `on_configure`,
    /// so a configuration the guest rejects is a conf error, not a runtime surprise.
    pub fn plugin(
        &self,
        mut spec: PluginSpec,
        bytes: &[u8],
        metrics: &Metrics,
    ) -> Result<Arc<Plugin>, ModuleError> {
        if spec.limits.memory_bytes > MAX_MEMORY_BYTES {
            return Err(ModuleError::MemoryTooLarge {
                mb: spec.limits.memory_bytes >> 20,
                max: MAX_MEMORY_BYTES >> 20,
            });
        }
        let start = Instant::now();
        let (compiled, in_memory) = self.compile_found(bytes)?;
        let config = self.configuration(&spec.tenant, &spec.config)?;
        tracing::info!(
            tenant = %spec.tenant,
            module = %spec.name,
            digest = &compiled.digest[..12],
            precompiled = in_memory || compiled.from_disk,
            tier = ?compiled.tier(),
            compile_ms = start.elapsed().as_millis() as u64,
            "module loaded"
        );
        let labels = [spec.tenant.as_str(), spec.name.as_str()];
        let pm = PluginMetrics {
            invocations: metrics.hook_invocations.with_label_values(&labels),
            fuel: metrics.hook_fuel.with_label_values(&labels),
            cpu: metrics.hook_cpu.with_label_values(&labels),
            failures: metrics.hook_events.clone(),
            guest_counters: metrics.guest_metrics.clone(),
            guest_gauges: metrics.guest_gauges.clone(),
        };
        let max = spec.limits.max_instances;
        let plugin = Arc::new(Plugin {
            compiled,
            shared: self.shared.clone(),
            idle: ArrayQueue::new(max.max(1)),
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            metrics: pm,
            usage: self.meter.usage(&spec.tenant, &spec.name),
            log: self.meter.log(&spec.tenant),
            tick_ms: AtomicU32::new(0),
            metric_ids: DashMap::new(),
            guest_metrics: DashMap::new(),
            next_metric: AtomicU32::new(1),
            generation: AtomicU64::new(0),
            pending_queues: crossbeam_queue::SegQueue::new(),
            quota: self.shared.quota(&spec.tenant),
            quota_warned: AtomicU64::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
            has_queues: std::sync::atomic::AtomicBool::new(false),
            kv: std::sync::OnceLock::new(),
            config: arc_swap::ArcSwap::from_pointee(config),
            config_gen: AtomicU64::new(0),
            queue_waiters: std::sync::atomic::AtomicUsize::new(0),
            queue_signal: tokio::sync::Notify::new(),
            dispatch: self.dispatch.clone(),
            upstreams: arc_swap::ArcSwap::from_pointee(std::mem::take(&mut spec.allowed_upstreams)),
            snap: Default::default(),
            renewals: AtomicU64::new(0),
            renews: self.renewal,
            spec,
        });
        let first = vm::Vm::start(&plugin, false).map_err(ModuleError::Start)?;
        plugin.give_back(first);
        if plugin.spec.isolation == Isolation::Request && self.snapshots {
            self.snapshot(&plugin, bytes);
        }
        Ok(plugin)
    }

    /// Gives a plugin whose instances are fresh per request a snapshot of its start:
    /// `_initialize`, `on_vm_start` and `on_configure` run once, in an instance of the
    /// module wizer instrumented; wizer then writes its memory and globals into a new
    /// module, which fresh instances start from (a copy-on-write image) without running
    /// any of them. The snapshot is kept beside the artifacts, named by the module, its
    /// configuration and the engine, with its own digest: one that does not match it is
    /// taken again, never trusted. What is frozen: the start's clock readings and log
    /// lines (written once, when the snapshot is taken); a start that reads random bytes,
    /// makes callouts or is configured with secrets is not snapshotted (every instance
    /// would share its bytes; its callouts would have no answer; secrets stay off disk).
    fn snapshot(&self, plugin: &Arc<Plugin>, bytes: &[u8]) {
        let spec = &plugin.spec;
        let config = plugin.config.load_full();
        let why_not = if *config != spec.config {
            Err("its configuration holds secrets".to_string())
        } else {
            Ok(())
        };
        let start = Instant::now();
        let key = {
            let mut h = Sha256::new();
            // everything the start can see or be limited by: the module, its identity
            // (name, tenant, root id, node: properties), its configuration and limits
            let limits = [
                spec.limits.memory_bytes,
                spec.limits.budget.as_nanos() as u64,
            ]
            .map(u64::to_le_bytes)
            .concat();
            for part in [
                &b"wasmgate snapshot 2"[..],
                plugin.compiled.digest.as_bytes(),
                spec.tenant.as_bytes(),
                spec.name.as_bytes(),
                spec.root_id.as_bytes(),
                &plugin.shared.node().to_protobuf(),
                &spec.vm_config,
                &config,
                &limits,
            ] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            hex::encode(h.finalize())
        };
        let path = self.artifact_path(&self.engine, &key, "snap");
        let kept = path.as_deref().and_then(read_verified);
        let from_disk = kept.is_some();
        let taken = why_not.and_then(|()| match kept {
            Some(snap) => Ok(snap),
            None => {
                let snap = self.take_snapshot(plugin, bytes)?;
                if let Some(path) = &path {
                    let digest: [u8; 32] = Sha256::digest(&snap).into();
                    write_artifact(path, &[&digest[..], &snap].concat());
                }
                Ok(snap)
            }
        });
        let compiled = taken.and_then(|snap| {
            // its VMs are renewed after each request when nothing else of them can change
            let (snap, renewed) = match renew::prepare(&snap) {
                Ok(prepared) => (prepared, "yes".to_string()),
                Err(why) => (snap, format!("no: {why}")),
            };
            let (compiled, _) = self.compile_found(&snap).map_err(|e| e.to_string())?;
            Ok((compiled, renewed))
        });
        let (tenant, module) = (&spec.tenant, &spec.name);
        match compiled {
            Ok((compiled, renewed)) => {
                tracing::info!(
                    %tenant, %module, from_disk, renewed,
                    ms = start.elapsed().as_millis() as u64,
                    "module snapshotted: fresh instances skip its start"
                );
                plugin.snap.store(Some(Arc::new(Snap {
                    compiled,
                    config_gen: 0,
                })));
            }
            Err(why) => tracing::info!(%tenant, %module, why, "module not snapshotted"),
        }
    }

    fn take_snapshot(&self, plugin: &Arc<Plugin>, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let wizer = wasmtime_wizer::Wizer::new();
        let (cx, instrumented) = wizer.instrument(bytes).map_err(|e| e.to_string())?;
        // the instrumented module runs once: the quickest compiler will do
        let (engine, linker, tier) = match &self.baseline {
            Some((engine, linker)) => (engine, linker, Tier::Baseline),
            None => (&self.engine, &self.linker, Tier::Optimized),
        };
        let module = Module::new(engine, &instrumented).map_err(|e| root_cause(&e))?;
        let code = Arc::new(Code::new(linker, &module, tier).map_err(|e| e.to_string())?);
        let (mut vm, instance) = vm::Vm::start_on(plugin, code, false, vm::Boot::Full)
            .map_err(|f| format!("{}: {}", f.callback, f.cause))?;
        let snap = vm.snapshot(instance, &wizer, &cx);
        plugin.dispose(vm);
        snap
    }

    /// Modules with `isolation = "request"` start from snapshots (the default); off, they
    /// run their start in every instance (tests and benchmarks compare the two).
    pub fn set_snapshots(&mut self, on: bool) {
        self.snapshots = on;
    }

    /// VMs started from a snapshot are renewed after their request (the default); off,
    /// each request instantiates the snapshot anew (tests and benchmarks compare the two).
    pub fn set_renewal(&mut self, on: bool) {
        self.renewal = on;
    }
}

impl Plugin {
    /// The tenant's state store, if the gateway has one.
    pub(crate) fn state(&self) -> Option<crate::state::TenantState> {
        let services = self.shared.services.get()?;
        Some(
            self.kv
                .get_or_init(|| {
                    services
                        .store
                        .tenant(&self.spec.tenant, Some(self.usage.clone()))
                })
                .clone(),
        )
    }

    /// The allowed upstream a callout names, as it is now.
    pub(crate) fn allowed_upstream(&self, name: &[u8]) -> Option<Arc<Upstream>> {
        self.upstreams
            .load()
            .iter()
            .find(|u| u.name.as_bytes() == name)
            .cloned()
    }

    /// Points the module's callouts at these upstreams (the same names, rebuilt by a
    /// reload); the old ones, and their health checks, end when nothing else holds them.
    pub fn set_upstreams(&self, upstreams: Vec<Arc<Upstream>>) {
        self.upstreams.store(Arc::new(upstreams));
    }

    /// Takes a VM for one request: an idle one, or a new one if under `max_instances`;
    /// waits up to [`INSTANCE_WAIT`] for one to free up.
    pub async fn lease(self: &Arc<Self>) -> Result<Lease, Failure> {
        let busy = || Failure {
            callback: "instantiate",
            cause: Cause::Busy,
        };
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::time::timeout(INSTANCE_WAIT, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| busy())?
                .map_err(|_| busy())?,
        };
        self.lease_with(permit)
    }

    /// Fuel this module's callbacks have burned so far, all instances together.
    pub fn fuel_spent(&self) -> u64 {
        self.metrics.fuel.get()
    }

    /// Like [`Plugin::lease`] without waiting: `Busy` at once when at `max_instances`.
    pub fn try_lease(self: &Arc<Self>) -> Result<Lease, Failure> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Failure {
                callback: "instantiate",
                cause: Cause::Busy,
            })?;
        self.lease_with(permit)
    }

    fn lease_with(
        self: &Arc<Self>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Lease, Failure> {
        let vm = match self.unpark() {
            Some(vm) => vm,
            None => vm::Vm::start(self, true)?,
        };
        Ok(Lease::new(self.clone(), vm, permit))
    }

    pub(crate) fn give_back(self: &Arc<Self>, vm: Box<vm::Vm>) {
        if self.spec.isolation == Isolation::Shared {
            self.park(vm);
        } else {
            self.renew(vm);
        }
    }

    /// Ends a VM's root context as [`Plugin::dispose`] does; then, instead of dropping a
    /// VM started from the module's snapshot, puts it back as the snapshot starts every
    /// instance ([`vm::Vm::renew`]) and pools it for the next request. The pool holds
    /// only renewed VMs: no timer or queue callback runs in them (see
    /// [`Plugin::tick_idle`]), as none runs in a fresh instance before its request.
    fn renew(self: &Arc<Self>, mut vm: Box<vm::Vm>) {
        match vm.shutdown(self) {
            vm::Ended::Deleted => {}
            vm::Ended::Waiting => return self.await_done(vm),
            vm::Ended::Failed => return,
        }
        if !self.renews || self.retired.load(Ordering::Acquire) || !vm.renew(self) {
            return;
        }
        self.renewals.fetch_add(1, Ordering::Relaxed);
        let _ = self.pool(vm); // no room: dropped, its root context already ended
    }

    /// Puts an idle VM in the pool, unless the plugin is retired. A VM whose root context
    /// has callouts to make, or gRPC streams open, stays out of the pool until they are
    /// answered or closed.
    fn park(self: &Arc<Self>, mut vm: Box<vm::Vm>) {
        let root_busy = vm.has_root_calls() || vm.has_root_streams();
        if self.retired.load(Ordering::Acquire) || vm.is_stale(self) {
            return self.dispose(vm);
        }
        if vm.runs_old_code(self) && !root_busy {
            // its replacement on the new code takes its place (unbilled, like the VM a
            // module starts with), so the module's root context lives on: its ticks and
            // queues do not wait for the next request
            self.dispose(vm);
            match vm::Vm::start(self, false) {
                Ok(vm) => return self.park(vm),
                Err(f) => return self.report(&f),
            }
        }
        if root_busy {
            if let (Some(d), Ok(rt)) = (self.dispatch.get(), tokio::runtime::Handle::try_current())
            {
                let calls = vm.take_root_calls();
                rt.spawn(Self::answer_root(self.clone(), vm, d.clone(), calls));
                return;
            }
            // no proxy yet (the conf is loading): sent once the timers start
        }
        if let Err(vm) = self.pool(vm) {
            self.dispose(vm);
        }
    }

    /// Puts `vm` in the idle pool, within the gateway's [`MAX_IDLE_VMS`]; gives it back
    /// when there is no room.
    fn pool(&self, vm: Box<vm::Vm>) -> Result<(), Box<vm::Vm>> {
        let idle = &self.shared.idle_vms;
        if idle.fetch_add(1, Ordering::AcqRel) >= MAX_IDLE_VMS {
            idle.fetch_sub(1, Ordering::AcqRel);
            return Err(vm);
        }
        if let Err(vm) = self.idle.push(vm) {
            idle.fetch_sub(1, Ordering::AcqRel);
            return Err(vm);
        }
        if self.retired.load(Ordering::Acquire) {
            self.drain_idle(); // retired meanwhile
        }
        Ok(())
    }

    /// Sends a root context's callouts and hands it each answer (`on_http_call_response`
    /// on the root context) and each event of its gRPC streams as it comes, then returns
    /// the VM to the pool. Calls time out like any callout and streams live at most
    /// [`host::GRPC_STREAM_LIFETIME`], so the VM always comes back, or is dropped if a
    /// callback fails.
    async fn answer_root(
        p: Arc<Plugin>,
        mut vm: Box<vm::Vm>,
        d: Arc<dyn Dispatch>,
        calls: Vec<PendingCall>,
    ) {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut out: FuturesUnordered<_> =
            calls.into_iter().map(|c| d.clone().dispatch(c)).collect();
        let mut streams = futures::stream::SelectAll::new();
        streams.extend(vm.take_root_streams());
        loop {
            let a = tokio::select! {
                Some(a) = out.next(), if !out.is_empty() => a,
                ev = streams.next(), if !streams.is_empty() => match ev {
                    Some(a) => a,
                    None => continue, // the last stream ended
                },
                else => break,
            };
            if p.retired.load(Ordering::Acquire) {
                break; // `park` ends its root context (and resets its streams)
            }
            if let Err(f) = vm.root_answer(&p, &a) {
                p.report(&f);
                return;
            }
            out.extend(
                vm.take_root_calls()
                    .into_iter()
                    .map(|c| d.clone().dispatch(c)),
            );
            streams.extend(vm.take_root_streams());
        }
        p.park(vm);
    }

    /// Counts a request waiting on its VM's root context while the guard lives.
    pub fn root_waiter(&self) -> RootWaiter<'_> {
        self.queue_waiters.fetch_add(1, Ordering::AcqRel);
        RootWaiter(self)
    }

    /// A queue id with items for `on_queue_ready`, if any is pending.
    pub fn pending_queue(&self) -> Option<u32> {
        self.pending_queues.pop()
    }

    /// Resolves when a queue of this plugin gets items (see [`Plugin::queue_ready`]).
    pub fn queue_signal(&self) -> &tokio::sync::Notify {
        &self.queue_signal
    }

    /// An idle VM from the pool, if there is one.
    fn unpark(&self) -> Option<Box<vm::Vm>> {
        let vm = self.idle.pop()?;
        self.shared.idle_vms.fetch_sub(1, Ordering::AcqRel);
        Some(vm)
    }

    fn drain_idle(&self) {
        while let Some(vm) = self.unpark() {
            self.dispose(vm);
        }
    }

    /// Ends a healthy VM's root context (`on_done`, `on_delete`; see
    /// [`vm::Vm::shutdown`]) and drops it. A root context waiting for its `proxy_done`
    /// keeps the VM on a task of its own, for at most [`DONE_WAIT`].
    fn dispose(&self, mut vm: Box<vm::Vm>) {
        if vm.shutdown(self) == vm::Ended::Waiting {
            self.await_done(vm);
        }
    }

    /// Keeps a VM whose root context waits for `proxy_done` on a task of its own.
    fn await_done(&self, mut vm: Box<vm::Vm>) {
        match (tokio::runtime::Handle::try_current(), vm.plugin()) {
            (Ok(rt), p) => {
                rt.spawn(vm.await_done(p));
            }
            // no runtime to wait on (a conf check): end it now
            (Err(_), p) => vm.give_up_done(&p),
        }
    }

    /// The plugin was replaced (a reload built a new one, a redeploy or delete removed
    /// it): its idle VMs go and its timer loop ends. Idle VMs hold the plugin (their host
    /// state points back at it), so without this a replaced plugin and its VMs would live,
    /// and tick, forever. Requests still running on it keep working: they get fresh VMs,
    /// dropped when they end.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.drain_idle();
    }

    /// Gives new VMs `config` (a secret it names changed): idle VMs go, VMs serving a
    /// request finish it and are not pooled again; the next request starts a VM that runs
    /// `on_configure` with the new configuration.
    pub fn reconfigure(&self, config: Vec<u8>) {
        if **self.config.load() == config {
            return;
        }
        self.config.store(Arc::new(config));
        self.config_gen.fetch_add(1, Ordering::AcqRel);
        self.drain_idle();
    }

    /// The code a fresh instance starts from when the module has a snapshot for its
    /// current configuration (a reconfiguration leaves the old one behind).
    pub(crate) fn snapshot(&self) -> Option<Arc<Code>> {
        let snap = self.snap.load();
        let snap = snap.as_ref()?;
        (snap.config_gen == self.config_gen.load(Ordering::Acquire)).then(|| snap.compiled.code())
    }

    /// How many VMs were renewed for another request instead of dropped.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// Whether fresh instances start from a snapshot now.
    pub fn snapshotted(&self) -> bool {
        self.snapshot().is_some()
    }

    pub(crate) fn next_metric_id(&self) -> u32 {
        self.next_metric.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts and logs a failed callback, naming tenant, module, callback and cause.
    pub fn report(&self, f: &Failure) {
        self.metrics
            .failures
            .with_label_values(&[&self.spec.tenant, &self.spec.name, f.cause.label()])
            .inc();
        match f.cause {
            Cause::Overrun => {
                self.usage.budget_overruns.fetch_add(1, Ordering::Relaxed);
            }
            Cause::Trap(_) => {
                self.usage.traps.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.log.push(
            &self.spec.name,
            "error",
            &format!("{} failed: {} ({})", f.callback, f.cause.label(), f.cause),
        );
        tracing::warn!(
            tenant = %self.spec.tenant,
            module = %self.spec.name,
            callback = f.callback,
            cause = f.cause.label(),
            detail = %f.cause,
            "hook failed"
        );
    }

    /// Counts fuel burned outside a request's lease accounting or at its end, and bills
    /// it to the tenant.
    pub(crate) fn bill_fuel(&self, fuel: u64) {
        if fuel > 0 {
            self.metrics.fuel.inc_by(fuel);
            self.usage.add_fuel(fuel);
        }
    }

    /// Counts a write refused because the tenant's shared data or queues are full (cause
    /// `shared_data_full`, `queue_full`); logs it at most once a second per module.
    /// `detail` is only formatted for the line that is logged: a guest looping on a full
    /// quota makes no string per call.
    pub(crate) fn quota_exceeded(&self, cause: &'static str, detail: impl FnOnce() -> String) {
        self.metrics
            .failures
            .with_label_values(&[&self.spec.tenant, &self.spec.name, cause])
            .inc();
        let now = meter::now_secs();
        let last = self.quota_warned.load(Ordering::Relaxed);
        if last == now
            || self
                .quota_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let detail = detail();
        self.log
            .push(&self.spec.name, "error", &format!("{cause}: {detail}"));
        tracing::warn!(
            tenant = %self.spec.tenant,
            module = %self.spec.name,
            cause,
            detail,
            "shared state write refused"
        );
    }

    /// Runs `on_tick` on idle VMs every period the guest asked for, while the plugin lives.
    pub fn spawn_ticks(self: &Arc<Self>) {
        // Outside a runtime (a restore at startup) the timers start with the services.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let gen = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // VMs started before the proxy ran (the conf load) send their root callouts now
        let n = self.idle.len();
        for vm in (0..n).filter_map(|_| self.unpark()).collect::<Vec<_>>() {
            self.park(vm);
        }
        rt.spawn(async move {
            // as in Envoy, the first `on_tick` comes one period after the timer is set
            let mut first = true;
            loop {
                let period = match weak.upgrade() {
                    Some(p) if p.generation.load(Ordering::Relaxed) == gen => {
                        let ms = p.tick_ms.load(Ordering::Relaxed) as u64;
                        if ms > 0 && !std::mem::take(&mut first) {
                            p.tick_idle();
                        }
                        p.deliver_queues();
                        Duration::from_millis(if ms == 0 { 200 } else { ms })
                    }
                    _ => return,
                };
                tokio::time::sleep(period).await;
            }
        });
    }

    /// Notes that queue `id` has items; delivers `on_queue_ready` now if a runtime is at
    /// hand, else at the next tick of the plugin's timer loop.
    pub(crate) fn queue_ready(self: &Arc<Self>, id: u32) {
        self.pending_queues.push(id);
        if self.queue_waiters.load(Ordering::Acquire) > 0 {
            // a request waits on its root context: it takes the notice (if it left
            // meanwhile, the timer loop delivers it to an idle VM)
            self.queue_signal.notify_waiters();
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let p = self.clone();
            rt.spawn(async move { p.deliver_queues() });
        }
    }

    /// `on_queue_ready` on one idle VM for every pending queue. With every VM busy the
    /// notices wait for the next attempt; nothing is lost, the items stay queued.
    fn deliver_queues(self: &Arc<Self>) {
        // renewed VMs stay as their snapshot left them (a request waiting on its root
        // context takes the notices)
        if self.pending_queues.is_empty() || self.spec.isolation == Isolation::Request {
            return;
        }
        let Some(mut vm) = self.unpark() else {
            return;
        };
        while let Some(id) = self.pending_queues.pop() {
            if let Err(f) = vm.queue_ready(self, id) {
                self.report(&f);
                return; // the VM is dropped; a new one comes with the next request
            }
        }
        self.park(vm);
    }

    /// `on_tick` on each idle VM. Not on renewed ones (`isolation = "request"`): each
    /// request's instance starts as the snapshot left it, as a fresh instance would.
    fn tick_idle(self: &Arc<Self>) {
        if self.spec.isolation == Isolation::Request {
            return;
        }
        let n = self.idle.len();
        let mut done = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(mut vm) = self.unpark() else { break };
            match vm.tick(self) {
                Ok(()) => done.push(vm),
                Err(f) => self.report(&f),
            }
        }
        for vm in done {
            self.park(vm);
        }
    }
}

/// `module`'s code, once it is known to be a Proxy-Wasm module whose imports link.
fn checked(linker: &Linker<host::Host>, module: &Module, tier: Tier) -> Result<Code, ModuleError> {
    vm::check_exports(module).map_err(ModuleError::NotProxyWasm)?;
    Code::new(linker, module, tier)
}

/// A precompiled artifact, if one is there and loads.
/// A snapshot kept on disk: its SHA-256, then the module. `None` when missing or when
/// the bytes do not match their digest (then it is taken again).
fn read_verified(path: &Path) -> Option<Vec<u8>> {
    let kept = std::fs::read(path).ok()?;
    let (digest, snap) = kept.split_at_checked(32)?;
    (Sha256::digest(snap).as_slice() == digest).then(|| snap.to_vec())
}

fn load_artifact(engine: &Engine, path: Option<&Path>) -> Option<Module> {
    let path = path.filter(|p| p.exists())?;
    // SAFETY: the artifact was written by `Module::serialize` of an engine with the same
    // compatibility hash (part of the file name), into the gateway's own data directory;
    // wasmtime checks its header and version again.
    unsafe { Module::deserialize_file(engine, path) }.ok()
}

/// Compiles `bytes` with Cranelift and keeps the artifact at `artifact`.
fn optimize(engine: &Engine, bytes: &[u8], artifact: Option<&Path>) -> Result<Module, ModuleError> {
    let module =
        Module::new(engine, bytes).map_err(|e| ModuleError::DoesNotCompile(root_cause(&e)))?;
    if let (Some(path), Ok(ser)) = (artifact, module.serialize()) {
        write_artifact(path, &ser);
    }
    Ok(module)
}

/// A queue of jobs for one background thread, started with the first job (and again if it
/// is ever gone): the background compilers of modules and of components.
pub(crate) struct Background<J>(std::sync::Mutex<Option<std::sync::mpsc::Sender<J>>>);

impl<J> Default for Background<J> {
    fn default() -> Self {
        Background(Default::default())
    }
}

impl<J: Send + 'static> Background<J> {
    /// Queues `job`. Without a thread, starts one named `name` that gives each job to the
    /// handler `start` makes on it. `false` if no thread could be started.
    pub(crate) fn send<F: FnMut(J)>(
        &self,
        name: &str,
        job: J,
        start: impl FnOnce() -> F + Send + 'static,
    ) -> bool {
        let mut tx = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let job = match tx.as_ref() {
            Some(sender) => match sender.send(job) {
                Ok(()) => return true,
                // the thread is gone (it cannot panic, but if it did): start another
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (send, jobs) = std::sync::mpsc::channel::<J>();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || jobs.into_iter().for_each(start()));
        let sent = spawned.is_ok() && send.send(job).is_ok();
        if sent {
            *tx = Some(send);
        }
        sent
    }
}

/// Writes an artifact under a temporary name, then renames it: a reader never sees half a
/// file.
pub(crate) fn write_artifact(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Gives a baseline module its optimized code (the background compiler's one job):
/// compiled by `serial` (Cranelift on one thread) and loaded into `engine`, whose
/// settings it shares; if that fails, compiled by `engine` itself.
fn upgrade(serial: Option<&Engine>, engine: &Engine, linker: &Linker<host::Host>, job: Upgrade) {
    let start = Instant::now();
    let module = serial
        .and_then(|serial| serial.precompile_module(&job.bytes).ok())
        // SAFETY: the bytes were just made by `precompile_module` of an engine with this
        // engine's code settings (only its thread count and allocator differ); wasmtime
        // checks that they are compatible and refuses them otherwise.
        .and_then(|ser| unsafe { Module::deserialize(engine, &ser) }.ok());
    let serial_ok = module.is_some();
    let module = match module {
        Some(module) => {
            if let (Some(path), Ok(ser)) = (&job.artifact, module.serialize()) {
                write_artifact(path, &ser);
            }
            Ok(module)
        }
        None => optimize(engine, &job.bytes, job.artifact.as_deref()),
    };
    let code = module.and_then(|module| Code::new(linker, &module, Tier::Optimized));
    let digest = &job.compiled.digest[..12];
    match code {
        Ok(code) => {
            job.compiled.code.store(Arc::new(code));
            let ms = start.elapsed().as_millis() as u64;
            tracing::info!(
                digest,
                compile_ms = ms,
                one_thread = serial_ok,
                "module optimized"
            );
        }
        // it runs on baseline code, so this is the optimizer's limit, not the module's
        // fault: it keeps its baseline code
        Err(e) => tracing::warn!(digest, error = %e, "module stays on baseline code"),
    }
}

/// Winch: the same limits, fuel and stack as [`engine_config`], without the pooling
/// allocator (baseline code serves a module only until its optimized code is ready, so
/// its instances are few; their memory is still capped per store).
fn baseline_config() -> Config {
    let mut c = engine_config();
    c.strategy(wasmtime::Strategy::Winch);
    c.allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
    c
}

fn engine_config() -> Config {
    let mut c = Config::new();
    c.consume_fuel(true);
    // Backtraces make every trap of a hostile module expensive; the trap kind is enough.
    c.wasm_backtrace_max_frames(None);
    c.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable);
    c.max_wasm_stack(MAX_WASM_STACK);
    c.cranelift_opt_level(OptLevel::Speed);
    c.parallel_compilation(true);
    let pagemap = wasmtime::PoolingAllocationConfig::is_pagemap_scan_available();
    let mut pool = wasmtime::PoolingAllocationConfig::default();
    pool.total_core_instances(POOL_INSTANCES)
        .total_memories(POOL_INSTANCES)
        .total_tables(POOL_INSTANCES)
        .max_memory_size(MAX_MEMORY_BYTES as usize)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .table_elements(20_000)
        .max_core_instance_size(1 << 20)
        // A slot's memory is reset for its next instance. Without help that is a memset of
        // the first `keep_resident` bytes (36 µs per fresh instance with 1 MiB for SDK-built
        // guests) or an madvise plus page faults on every first touch (24 µs with none).
        // Linux's PAGEMAP_SCAN (6.7+) finds the pages the instance actually touched: only
        // those are reset, and they stay mapped, so the next instance takes no page faults.
        // A fresh instance: 21.2 → 12.2 µs (benches/hooks.rs `hook_chain/fresh_instance`;
        // the same with 2 or 64 MiB). Pages past 1 MiB go back to the kernel, so an idle
        // slot keeps at most 1 MiB resident. Without the scan, nothing is kept.
        .linear_memory_keep_resident(if pagemap { 1 << 20 } else { 0 })
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto)
        // Returning a slot to the kernel is an madvise plus a TLB flush; batching 32 slots
        // per flush made a fresh instance 21.7 → 19.6 µs (a full pool flushes early).
        .decommit_batch_size(32);
    c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    c
}

/// An error with its causes, on one line.
pub(crate) fn root_cause(e: &wasmtime::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Keeps a request counted as waiting on its VM's root context.
pub struct RootWaiter<'a>(&'a Plugin);

impl Drop for RootWaiter<'_> {
    fn drop(&mut self) {
        self.0.queue_waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The ordered hooks of one route.
#[derive(Default, Clone)]
pub struct HookChain {
    pub plugins: Vec<Arc<Plugin>>,
}

impl HookChain {
    pub fn new(plugins: Vec<Arc<Plugin>>) -> HookChain {
        HookChain { plugins }
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}

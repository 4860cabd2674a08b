//! Function backends: WASI-HTTP components (the `wasi:http/proxy` world, exporting
//! `wasi:http/incoming-handler@0.2.x`) run in-process, one fresh instance per request, or
//! (opt-in per function) one instance for consecutive requests.
//!
//! This module owns the component side of the wasm runtime: its own [`Engine`] (component
//! model, async, pooling allocator with copy-on-write memory images), one [`Linker`] with
//! every WASI 0.2 interface real components import, detection of what a module is
//! ([`ComponentRuntime::compile`]), and the per-request call ([`Function::handle`]) with its
//! limits. It knows nothing of Pingora: requests and responses are hyper types, output lines
//! go to a caller's [`LineSink`], outgoing HTTP to a caller's [`OutgoingPolicy`].
//!
//! **Capabilities.** A guest gets clocks, random, an empty stdin, stdout/stderr as log
//! lines, and wasi:http. `wasi:cli`, `wasi:filesystem` and `wasi:sockets` are linked so
//! components built by Rust std, componentize-js and componentize-py instantiate, but
//! grant nothing: an empty environment, no arguments, no preopened directories, sockets
//! and name lookups denied. Outgoing HTTP goes only where the [`OutgoingPolicy`] resolves
//! the authority; anything else fails with `HttpRequestDenied`.
//!
//! **CPU budget: epochs, not fuel** (fuel is what Proxy-Wasm filters use, see
//! [`crate::wasm`]). Both are implemented ([`CpuBudget`]) and cost the same here, measured
//! by `benches/components.rs` on this 2-core machine (fresh instance + one request + drop,
//! criterion medians, epoch vs fuel): Rust hello 22.9 vs 23.1 µs, JavaScript hello 238 vs
//! 247 µs, Python hello 1.18 vs 1.18 ms, 2M rounds of a PRNG in Rust (pure compute)
//! 3.137 vs 3.139 ms, echoing 1 MiB 1.84 vs 1.50 ms (noisy: a shared machine). A fresh
//! request is dominated by instantiation, and the checks hide behind the guest's own
//! dependency chains. So the choice is on meaning, not cost: components run for
//! milliseconds, in interpreters (SpiderMonkey, CPython) whose wasm instruction count per
//! request has no stable relation to time, so a budget in milliseconds is what a tenant can
//! reason about, and fuel would need a per-workload calibration: at [`FUEL_PER_MS`] (one
//! unit per nanosecond) loop-rs spends a 50 ms fuel budget in 3.8 ms (about 13 wasm
//! instructions per ns), while an epoch budget of 50 ms trips after 55 ms. The cost of epochs: their time is wall time
//! while the guest runs, so a guest descheduled on a loaded machine is charged for it;
//! at millisecond budgets that is slack, not a false trip.
//!
//! How the epoch budget counts: the engine's epoch advances every [`EPOCH_TICK`] from one
//! ticker thread; each time a running guest reaches its deadline, the store's callback
//! charges one tick and yields to the executor (so the wall-clock deadline and other
//! requests get their turn), and the guest traps ([`Failure::Overrun`]) once its ticks are
//! spent. Time spent waiting on the host (a body read, an outgoing request) is charged at
//! most one tick per wait, because the callback fires at most once per return to wasm.

mod codecache;
mod guarded;
mod kv;
mod state;
mod stdio;
#[cfg(test)]
mod tests;

pub use state::{denied, DenyAll, Grants, Outgoing, OutgoingPolicy, SendFuture};
pub use stdio::{LineSink, Stdio, MAX_BYTES_PER_REQUEST, MAX_LINE_BYTES};

use super::write_artifact;
pub use super::{Compilers, Tier};
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use state::Host;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::WasiHttpView;

pub use wasmtime_wasi_http::p2::body::{HyperIncomingBody, HyperOutgoingBody};

/// How often the engine's epoch advances: the granularity of the CPU budget.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Fuel per millisecond of budget when the runtime meters with fuel (measurements only).
pub const FUEL_PER_MS: u64 = 1_000_000;
/// With fuel, how much a guest runs between yields to the executor.
const FUEL_YIELD_INTERVAL: u64 = 100_000;
/// The export a function backend must have, without its patch version.
pub const INCOMING_HANDLER: &str = "wasi:http/incoming-handler@0.2.";

/// Instances alive at once across all functions of one runtime (pool slots).
pub const POOL_INSTANCES: u32 = 256;
/// Core instances per component instance: componentize-py's components have about a dozen.
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
/// Memories and tables per component instance, across its core instances.
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 8;
/// The largest linear memory any function may ask for (its own limit is usually lower).
pub const MAX_MEMORY_BYTES: usize = 1 << 30;
/// Idle instances of all functions of a runtime together: a quarter of the pool, so
/// tenants' reusing functions can never take the slots fresh instances need.
pub const MAX_IDLE_TOTAL: usize = POOL_INSTANCES as usize / 4;
/// Idle instances a reusing function keeps at most (each holds a pool slot while it
/// waits), below its `max_instances`: enough for the requests it serves at once, so under
/// concurrent load consecutive requests find a warm instance instead of instantiating.
pub const MAX_IDLE_PER_FUNCTION: usize = 32;
/// Resident memory kept per slot across instances, so a fresh instance reuses warm pages
/// instead of faulting them in again (the tuning `wasmtime serve` is fastest with).
const MEMORY_KEEP_RESIDENT: usize = 64 << 20;
const TABLE_KEEP_RESIDENT: usize = 1 << 20;
const ASYNC_STACK_KEEP_RESIDENT: usize = 1 << 20;

/// How the CPU budget is metered (the choice is argued in the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuBudget {
    /// Epoch interruption, one tick every [`EPOCH_TICK`]. The default.
    Epoch,
    /// Fuel, [`FUEL_PER_MS`] units per millisecond. Kept to measure the difference.
    Fuel,
}

/// A function's limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory of one instance, all memories together.
    pub memory_bytes: usize,
    /// CPU the guest may use per request.
    pub cpu: Duration,
    /// Wall-clock time from instantiation to the end of the guest's work (body included).
    pub deadline: Duration,
    /// Instances of this function alive at once; past it, [`Failure::Busy`].
    pub max_instances: usize,
    /// Requests one instance serves, one after another, before it is retired. 1 (the
    /// default) is a fresh instance per request; more is *reuse* (see [`Function::handle`]).
    pub requests_per_instance: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 128 << 20,
            cpu: Duration::from_millis(100),
            deadline: Duration::from_secs(10),
            max_instances: 32,
            requests_per_instance: 1,
        }
    }
}

/// Why a request got no (complete) answer from the function.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Failure {
    #[error("the function trapped: {0}")]
    Trap(String),
    #[error("the function used up its CPU budget")]
    Overrun,
    #[error("the function exceeded its memory limit")]
    Memory,
    #[error("the function missed its deadline")]
    Deadline,
    #[error("the function has all its instances busy")]
    Busy,
    #[error("the function returned without setting a response")]
    NoResponse,
    #[error("the function answered with an error: {0}")]
    ErrorCode(String),
    #[error("the host could not run the function: {0}")]
    Host(String),
}

/// Called with each instance's [`Outcome`].
pub type OnEnd = Arc<dyn Fn(&Outcome) + Send + Sync>;

/// Per-request inputs besides the request itself.
#[derive(Clone)]
pub struct Io {
    /// Where the guest's stdout and stderr lines go.
    pub sink: LineSink,
    /// Where outgoing HTTP may go.
    pub outgoing: Arc<dyn OutgoingPolicy>,
    /// The tenant's state and secrets this request may use (none by default).
    pub grants: Grants,
    /// Called once when the instance is gone, with how it ended and what it used: the
    /// only place a failure after the response was set (mid-body) shows, and the figures
    /// for usage metering.
    pub on_end: Option<OnEnd>,
}

/// How one instance ended and what it used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<(), Failure>,
    /// Highest linear memory of the instance, all memories together.
    pub peak_memory: usize,
    /// CPU charged: epoch ticks times [`EPOCH_TICK`], or fuel consumed over [`FUEL_PER_MS`].
    pub cpu: Duration,
    /// From the start of instantiation to the end of the guest's work.
    pub wall: Duration,
}

impl Default for Io {
    fn default() -> Self {
        Io {
            sink: Arc::new(|_, _| {}),
            outgoing: Arc::new(DenyAll),
            grants: Grants::default(),
            on_end: None,
        }
    }
}

/// Runs components: one engine and linker, shared by every function compiled from it.
pub struct ComponentRuntime {
    engine: Engine,
    linker: Linker<Host>,
    budget: CpuBudget,
    /// Stops the epoch ticker when the runtime is dropped.
    ticker_stop: Arc<AtomicBool>,
    /// A place per idle (reused) instance of any of its functions, `idle_cap` in all: a
    /// kept instance holds a permit until it leaves its queue.
    idle: Arc<Semaphore>,
    idle_cap: usize,
    compilers: Compilers,
    /// Winch and its linker: a component nowhere compiled yet goes live on its code while
    /// the background compiler makes Cranelift's (see [`Tier`]).
    baseline: Option<(Engine, Linker<Host>)>,
    /// Cranelift's incremental cache, shared with the background compiler's engine.
    code_cache: Arc<codecache::CodeCache>,
    /// The background compiler's queue, once it runs.
    optimizer: super::Background<Upgrade>,
    /// Functions queued for their optimized code and not there yet.
    upgrading: Arc<std::sync::atomic::AtomicUsize>,
}

/// A function that went live on baseline code, for the background compiler.
struct Upgrade {
    code: Arc<arc_swap::ArcSwap<Code>>,
    bytes: Vec<u8>,
    artifact: Option<std::path::PathBuf>,
}

/// The engine settings every component engine shares: the component model, copy-on-write
/// memory images, and the CPU budget's mechanism.
fn base_config(budget: CpuBudget) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true).memory_init_cow(true);
    match budget {
        CpuBudget::Epoch => config.epoch_interruption(true),
        CpuBudget::Fuel => config.consume_fuel(true),
    };
    config
}

/// All of WASI 0.2 (cli, clocks, filesystem, io, random, sockets), then wasi:http and the
/// gateway's key-value interface.
fn new_linker(engine: &Engine) -> Result<Linker<Host>, String> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
        .and_then(|()| kv::add_to_linker(&mut linker))
        .map_err(|e| format!("component linker: {e:#}"))?;
    Ok(linker)
}

impl ComponentRuntime {
    /// A runtime metering CPU with epochs, compiling with Cranelift only.
    pub fn new() -> Result<Self, String> {
        Self::with_budget(CpuBudget::Epoch)
    }

    pub fn with_budget(budget: CpuBudget) -> Result<Self, String> {
        Self::with_compilers(budget, Compilers::Optimized)
    }

    /// A runtime compiling as `compilers` says: `Tiered` (the gateway when it serves)
    /// puts a component compiled nowhere yet live on Winch's code at once (a JavaScript
    /// hello: 1.4 s instead of 5.3 s of Cranelift) and swaps Cranelift's in when the
    /// background compiler has it.
    pub fn with_compilers(budget: CpuBudget, compilers: Compilers) -> Result<Self, String> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * CORE_INSTANCES_PER_COMPONENT)
            .total_memories(POOL_INSTANCES * MEMORIES_PER_COMPONENT)
            .total_tables(POOL_INSTANCES * TABLES_PER_COMPONENT)
            .total_stacks(POOL_INSTANCES)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .max_memory_size(MAX_MEMORY_BYTES)
            .table_elements(state::MAX_TABLE_ELEMENTS)
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            .async_stack_keep_resident(ASYNC_STACK_KEEP_RESIDENT);
        let code_cache = Arc::new(codecache::CodeCache::default());
        let mut config = base_config(budget);
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .enable_incremental_compilation(code_cache.clone())
            .map_err(|e| format!("component engine: {e:#}"))?;
        let engine = Engine::new(&config).map_err(|e| format!("component engine: {e:#}"))?;
        let linker = new_linker(&engine)?;
        // Winch: the same budget mechanism (it supports epochs and fuel alike), instances
        // allocated on demand (baseline code serves a function only until its optimized
        // code is in)
        let baseline = match compilers {
            Compilers::Optimized => None,
            Compilers::Tiered | Compilers::Baseline => {
                let mut config = base_config(budget);
                config.strategy(wasmtime::Strategy::Winch);
                let engine =
                    Engine::new(&config).map_err(|e| format!("component engine: {e:#}"))?;
                let linker = new_linker(&engine)?;
                Some((engine, linker))
            }
        };

        let ticker_stop = Arc::new(AtomicBool::new(false));
        if budget == CpuBudget::Epoch {
            let engines: Vec<Engine> = std::iter::once(engine.clone())
                .chain(baseline.as_ref().map(|(e, _)| e.clone()))
                .collect();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engines.iter().for_each(Engine::increment_epoch);
                    }
                })
                .map_err(|e| format!("epoch ticker: {e}"))?;
        }
        Ok(ComponentRuntime {
            engine,
            linker,
            budget,
            ticker_stop,
            idle: Arc::new(Semaphore::new(MAX_IDLE_TOTAL)),
            idle_cap: MAX_IDLE_TOTAL,
            compilers,
            baseline,
            code_cache,
            optimizer: Default::default(),
            upgrading: Default::default(),
        })
    }

    /// Waits until every function queued for optimized code has it (tests, benchmarks).
    pub fn wait_optimized(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.upgrading.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Queues a function on baseline code for its optimized code. One background thread
    /// compiles them one at a time, with Cranelift on that thread only (the other core
    /// stays free for requests and the next deploy's baseline compile), in an engine with
    /// the serving engine's code settings; the code is then loaded into the serving engine
    /// and written as the function's artifact.
    fn optimize_later(&self, job: Upgrade) {
        self.upgrading.fetch_add(1, Ordering::AcqRel);
        let (engine, linker) = (self.engine.clone(), self.linker.clone());
        let mut config = base_config(self.budget);
        config.parallel_compilation(false);
        let code_cache = self.code_cache.clone();
        let upgrading = self.upgrading.clone();
        let started = self.optimizer.send("wasmgate-optimize-fn", job, move || {
            let serial = config
                .enable_incremental_compilation(code_cache)
                .ok()
                .and_then(|c| Engine::new(c).ok());
            move |job| {
                upgrade(serial.as_ref(), &engine, &linker, job);
                upgrading.fetch_sub(1, Ordering::AcqRel);
            }
        });
        if !started {
            self.upgrading.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The same runtime with at most `cap` idle instances across its functions (set before
    /// compiling any).
    pub fn with_idle_cap(mut self, cap: usize) -> Self {
        self.idle = Arc::new(Semaphore::new(cap));
        self.idle_cap = cap;
        self
    }

    /// Idle instances now, across all functions.
    pub fn idle_instances(&self) -> usize {
        self.idle_cap - self.idle.available_permits()
    }

    /// Compiles a function backend with default limits. See [`Self::compile_with`].
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<Function>, String> {
        self.compile_with(bytes, Limits::default())
    }

    /// Compiles `bytes` if they are a component exporting
    /// `wasi:http/incoming-handler@0.2.x` and links it once (the `InstancePre` every request
    /// instantiates). A core module is refused as "a core module, not a component" (the
    /// caller tries Proxy-Wasm for those); other components are refused naming their
    /// exports or the import that cannot be satisfied.
    pub fn compile_with(&self, bytes: &[u8], limits: Limits) -> Result<Arc<Function>, String> {
        self.compile_cached(bytes, limits, None)
    }

    /// [`Self::compile_with`], keeping the compiled code in `artifact` (read when it is
    /// there, written when it is not): a JavaScript or Python component takes seconds to
    /// compile, a precompiled one milliseconds to load.
    pub fn compile_cached(
        &self,
        bytes: &[u8],
        limits: Limits,
        artifact: Option<&std::path::Path>,
    ) -> Result<Arc<Function>, String> {
        match wasm_kind(bytes) {
            Some(Kind::Core) => return Err("a core module, not a component".into()),
            Some(Kind::Component) => {}
            None => return Err("not WebAssembly (no wasm header)".into()),
        }
        let cached = artifact.filter(|p| p.exists()).and_then(|p| {
            // SAFETY: the artifact was written by `Component::serialize` of an engine with
            // the same compatibility hash (part of its name, see the caller), into the
            // gateway's own data directory; wasmtime checks its header and version again.
            unsafe { Component::deserialize_file(&self.engine, p) }.ok()
        });
        // Winch does not compile every proposal Cranelift does: then Cranelift it is
        let baseline = match (&cached, &self.baseline) {
            (None, Some((engine, linker))) => Component::new(engine, bytes)
                .ok()
                .map(|c| (c, engine, linker)),
            _ => None,
        };
        let (component, engine, linker, tier) = match (cached, baseline) {
            (Some(c), _) => (c, &self.engine, &self.linker, Tier::Optimized),
            (None, Some((c, engine, linker))) => (c, engine, linker, Tier::Baseline),
            (None, None) => {
                let c = Component::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
                if let (Some(path), Ok(ser)) = (artifact, c.serialize()) {
                    write_artifact(path, &ser);
                }
                (c, &self.engine, &self.linker, Tier::Optimized)
            }
        };
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let handler = ty
            .exports(engine)
            .map(|(name, _)| name)
            .find(|name| name.starts_with(INCOMING_HANDLER))
            .map(str::to_string);
        let Some(handler) = handler else {
            let names = if exports.is_empty() {
                "nothing".into()
            } else {
                exports.join(", ")
            };
            return Err(format!(
                "a component without a wasi:http/incoming-handler@0.2.x export (it exports {names})"
            ));
        };
        let pre = link(linker, &component)?;
        let code = Arc::new(arc_swap::ArcSwap::from_pointee(Code { pre, tier }));
        if tier == Tier::Baseline && self.compilers == Compilers::Tiered {
            self.optimize_later(Upgrade {
                code: code.clone(),
                bytes: bytes.to_vec(),
                artifact: artifact.map(std::path::Path::to_path_buf),
            });
        }
        Ok(Function::new(
            code,
            handler,
            self.budget,
            limits,
            self.idle.clone(),
        ))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for ComponentRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// The `InstancePre` of a component exporting `wasi:http/proxy`'s handler.
fn link(linker: &Linker<Host>, component: &Component) -> Result<ProxyPre<Host>, String> {
    let instance_pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("cannot link the component: {e:#}"))?;
    ProxyPre::new(instance_pre).map_err(|e| format!("cannot use the component's handler: {e:#}"))
}

/// Gives a function on baseline code its optimized code: compiled by `serial` (Cranelift
/// on one thread) and loaded into `engine`, whose code settings it shares; if that fails,
/// compiled by `engine` itself. New instances start on it; running ones, and idle ones
/// kept for reuse, finish on the baseline code (idle ones are not reused again).
fn upgrade(serial: Option<&Engine>, engine: &Engine, linker: &Linker<Host>, job: Upgrade) {
    let start = std::time::Instant::now();
    let from_serial = serial
        .and_then(|serial| serial.precompile_component(&job.bytes).ok())
        .and_then(|ser| {
            // SAFETY: the bytes were just made by `precompile_component` of an engine with
            // this engine's code settings (only its thread count and allocator differ);
            // wasmtime checks that they are compatible and refuses them otherwise.
            let c = unsafe { Component::deserialize(engine, &ser) }.ok()?;
            Some((c, ser))
        });
    let compiled = match from_serial {
        Some((c, ser)) => Ok((c, ser)),
        None => Component::new(engine, &job.bytes)
            .and_then(|c| Ok((c.clone(), c.serialize()?)))
            .map_err(|e| format!("{e:#}")),
    };
    let linked = compiled.and_then(|(c, ser)| Ok((link(linker, &c)?, ser)));
    match linked {
        Ok((pre, ser)) => {
            if let Some(path) = &job.artifact {
                write_artifact(path, &ser);
            }
            job.code.store(Arc::new(Code {
                pre,
                tier: Tier::Optimized,
            }));
            tracing::info!(
                ms = start.elapsed().as_millis() as u64,
                "component: optimized code in, new instances start on it"
            );
        }
        Err(e) => tracing::warn!(error = %e, "component: no optimized code, baseline code stays"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Core,
    Component,
}

/// Whether `bytes` are a component (not a core module): what a module is loaded as.
pub fn is_component(bytes: &[u8]) -> bool {
    matches!(wasm_kind(bytes), Some(Kind::Component))
}

/// Reads the preamble: `\0asm`, then a version (1 for core modules) and a layer (0 for core
/// modules, 1 for components).
fn wasm_kind(bytes: &[u8]) -> Option<Kind> {
    const MAGIC: &[u8; 4] = b"\0asm";
    const CORE_LAYER: [u8; 2] = [0, 0];
    const COMPONENT_LAYER: [u8; 2] = [1, 0];
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return None;
    }
    match [bytes[6], bytes[7]] {
        CORE_LAYER => Some(Kind::Core),
        COMPONENT_LAYER => Some(Kind::Component),
        _ => None,
    }
}

/// A compiled function backend: linked once, instantiated fresh per request (or reused
/// for consecutive requests when its limits say so).
/// A function's machine code, ready to instantiate, and which compiler made it.
struct Code {
    pre: ProxyPre<Host>,
    tier: Tier,
}

pub struct Function {
    /// Swapped once when a function that went live on baseline code has its optimized
    /// code (shared with the copies [`Function::with_limits`] makes).
    code: Arc<arc_swap::ArcSwap<Code>>,
    handler: String,
    budget: CpuBudget,
    limits: Limits,
    /// One permit per busy instance; held until the guest's work (body included) ends.
    slots: Arc<Semaphore>,
    /// Instances waiting for their next request (reuse only): lock-free, bounded.
    idle: Option<Arc<ArrayQueue<Idle>>>,
    /// Set when a reused instance failed before answering: the guest cannot serve
    /// consecutive requests, so this function runs fresh instances from then on.
    reuse_off: Arc<AtomicBool>,
    /// Set once a reused instance has answered: the guest can serve consecutive requests,
    /// so later failures are the requests' own and nothing is kept for a replay.
    reuse_works: AtomicBool,
    /// The runtime's places for idle instances, one of which every kept instance holds.
    idle_budget: Arc<Semaphore>,
}

/// An instance between two requests, and how many it has served.
struct Idle {
    store: Store<Host>,
    proxy: Proxy,
    served: u32,
    /// The code it runs: not reused once the function has newer code.
    tier: Tier,
    /// Its place among the runtime's idle instances, given back when it leaves the queue.
    _slot: OwnedSemaphorePermit,
}

impl Function {
    fn new(
        code: Arc<arc_swap::ArcSwap<Code>>,
        handler: String,
        budget: CpuBudget,
        limits: Limits,
        idle_budget: Arc<Semaphore>,
    ) -> Arc<Self> {
        let idle = (limits.requests_per_instance > 1).then(|| {
            let idle = limits.max_instances.clamp(1, MAX_IDLE_PER_FUNCTION);
            Arc::new(ArrayQueue::new(idle))
        });
        Arc::new(Function {
            code,
            handler,
            budget,
            slots: Arc::new(Semaphore::new(limits.max_instances)),
            idle,
            reuse_off: Arc::new(AtomicBool::new(false)),
            reuse_works: AtomicBool::new(false),
            idle_budget,
            limits,
        })
    }

    /// The incoming-handler export this function serves (its version says what built it).
    pub fn handler_export(&self) -> &str {
        &self.handler
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The same compiled function under other limits (no recompilation; its own instance
    /// slots).
    pub fn with_limits(&self, limits: Limits) -> Arc<Function> {
        let idle = self.idle_budget.clone();
        Function::new(
            self.code.clone(),
            self.handler.clone(),
            self.budget,
            limits,
            idle,
        )
    }

    /// Which compiler made the code new instances start on.
    pub fn tier(&self) -> Tier {
        self.code.load().tier
    }

    /// Instances that could start now.
    pub fn available_instances(&self) -> usize {
        self.slots.available_permits()
    }

    /// Answers one request with a fresh instance. Returns as soon as the guest sets the
    /// response; its body is a stream the guest may still be writing (the instance lives
    /// on in a task until it finishes, traps or hits a limit, which ends the body with an
    /// error). The body's end waits for the instance's end, so a guest that keeps working
    /// after finishing its body delays the end of stream (within its deadline). Must be
    /// called within a tokio runtime.
    ///
    /// **Reuse** (`requests_per_instance > 1`): an instance whose call returned cleanly is
    /// kept for the next request of this same function (never two requests at once: it
    /// is out of the idle queue while it serves; never another function's or tenant's:
    /// the queue is this function's). It is retired, not kept, once it has served
    /// `requests_per_instance` requests, when anything of the request is left in its
    /// resource table (a body the guest never dropped), when its memory grew past half its
    /// limit, or on any failure (a trap, an overrun, the deadline): a failed instance is
    /// never called again. Each request gets its own CPU budget, deadline, output sink,
    /// outgoing policy and usage figures.
    ///
    /// A guest that cannot serve twice (StarlingMonkey, componentize-js 0.23: "respondWith
    /// can't be called twice") fails its second request without answering. When a reused
    /// instance fails before answering, a request without a body is replayed on a fresh
    /// instance: if that one answers, reuse was the cause and is turned off for this
    /// function (a line on its stderr says why); if it fails too, the request was (reuse
    /// stays on). A request with a body cannot be replayed: it gets the failure, and reuse
    /// is turned off, erring on the side of answering the next ones. Once a reused instance
    /// has answered, the guest is known to serve consecutive requests: from then on a
    /// request is neither copied for a replay nor replayed.
    pub async fn handle(
        &self,
        request: hyper::Request<HyperIncomingBody>,
        io: Io,
    ) -> Result<hyper::Response<HyperOutgoingBody>, Failure> {
        let tier = self.tier();
        let idle = self
            .idle
            .as_ref()
            .filter(|_| !self.reuse_off.load(Ordering::Relaxed))
            .and_then(|q| std::iter::from_fn(|| q.pop()).find(|idle| idle.tier == tier));
        let Some(idle) = idle else {
            return self.run(request, io, None).await;
        };
        if self.reuse_works.load(Ordering::Relaxed) {
            return self.run(request, io, Some(idle)).await;
        }
        let (parts, body) = request.into_parts();
        let replay = http_body::Body::is_end_stream(&body).then(|| parts.clone());
        let request = hyper::Request::from_parts(parts, body);
        let failure = match self.run(request, io.clone(), Some(idle)).await {
            Err(failure @ (Failure::NoResponse | Failure::Trap(_))) => failure,
            other => {
                if other.is_ok() {
                    self.reuse_works.store(true, Ordering::Relaxed);
                }
                return other;
            }
        };
        let Some(parts) = replay else {
            self.turn_reuse_off(&io, &failure);
            return Err(failure);
        };
        let request = hyper::Request::from_parts(parts, body::empty());
        let fresh = self.run(request, io.clone(), None).await;
        if fresh.is_ok() {
            self.turn_reuse_off(&io, &failure);
        }
        fresh
    }

    fn turn_reuse_off(&self, io: &Io, failure: &Failure) {
        if self.reuse_off.swap(true, Ordering::Relaxed) {
            return;
        }
        while let Some(idle) = self.idle.as_ref().and_then(|q| q.pop()) {
            drop(idle);
        }
        let why = format!("[wasmgate] instance reuse turned off for this function: a reused instance failed ({failure}) where a fresh one did not; fresh instances from now on");
        tracing::warn!("component: {why}");
        (io.sink)(Stdio::Stderr, &why);
    }

    /// One request on `idle` (a reused instance) or a fresh one.
    async fn run(
        &self,
        request: hyper::Request<HyperIncomingBody>,
        io: Io,
        idle: Option<Idle>,
    ) -> Result<hyper::Response<HyperOutgoingBody>, Failure> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Failure::Busy)?;
        let on_end = io.on_end.clone();
        let code = self.code.load_full();
        let (mut store, proxy, served, tier) = match idle {
            Some(idle) => {
                let mut store = idle.store;
                store.data_mut().rebind(io.sink, io.outgoing, io.grants);
                self.arm(&mut store)?;
                (store, Some(idle.proxy), idle.served, idle.tier)
            }
            None => (self.new_store(&code.pre, io)?, None, 0, code.tier),
        };
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        let (req, out) = {
            let mut http = store.data_mut().http();
            let req = http
                .new_incoming_request(Scheme::Http, request)
                .map_err(|e| Failure::Host(format!("{e:#}")))?;
            let out = http
                .new_response_outparam(sender)
                .map_err(|e| Failure::Host(format!("{e:#}")))?;
            (req, out)
        };
        let pre = code.pre.clone();
        let deadline = self.limits.deadline;
        let (budget, cpu_limit) = (self.budget, self.limits.cpu);
        let keep = self.idle.clone().map(|queue| {
            let max = self.limits.requests_per_instance;
            let off = self.reuse_off.clone();
            let budget = self.idle_budget.clone();
            (queue, max, self.limits.memory_bytes / 2, off, budget)
        });
        // The guest runs in its own task so it can keep writing the body after it has set
        // the response (which is when this function returns).
        let task = tokio::spawn(async move {
            let _permit = permit;
            let started = std::time::Instant::now();
            let run = async {
                let proxy = match proxy {
                    Some(proxy) => proxy,
                    None => pre.instantiate_async(&mut store).await?,
                };
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
                    .map(|()| proxy)
            };
            let (result, proxy) = match tokio::time::timeout(deadline, run).await {
                Err(_) => (Err(Failure::Deadline), None),
                Ok(Ok(proxy)) => (Ok(()), Some(proxy)),
                Ok(Err(e)) => (Err(classify(&e, &store.data().memory)), None),
            };
            if let Err(failure) = &result {
                tracing::debug!(%failure, "component: instance ended");
            }
            let cpu = match budget {
                CpuBudget::Epoch => {
                    EPOCH_TICK * u32::try_from(store.data().ticks_charged).unwrap_or(u32::MAX)
                }
                CpuBudget::Fuel => {
                    let left = store.get_fuel().unwrap_or(0);
                    let used = fuel_for(cpu_limit).saturating_sub(left);
                    Duration::from_micros(used / (FUEL_PER_MS / 1000))
                }
            };
            let outcome = Outcome {
                result: result.clone(),
                peak_memory: store.data().memory.peak,
                cpu,
                wall: started.elapsed(),
            };
            // Kept before the body ends, so the client's next request finds it.
            if let (Some((queue, max, memory_bound, off, budget)), Some(proxy)) = (keep, proxy) {
                let served = served + 1;
                let data = store.data_mut();
                let reusable = served < max
                    && !off.load(Ordering::Relaxed)
                    && data.is_clean()
                    && data.memory.total <= memory_bound;
                // A full queue, or no place left in the runtime, drops the instance.
                let slot = reusable.then(|| budget.try_acquire_owned().ok()).flatten();
                if let Some(slot) = slot {
                    let _ = queue.push(Idle {
                        store,
                        proxy,
                        served,
                        tier,
                        _slot: slot,
                    });
                }
            }
            // The response body's end waits for this (see `guarded`).
            let _ = ended_tx.send(result.clone());
            if let Some(on_end) = on_end {
                on_end(&outcome);
            }
            result
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(response.map(|body| {
                http_body_util::BodyExt::boxed_unsync(guarded::Guarded::new(body, ended_rx))
            })),
            Ok(Err(code)) => Err(Failure::ErrorCode(format!("{code:?}"))),
            // The outparam was dropped unset: the instance ended, say why.
            Err(_) => match task.await {
                Ok(Ok(())) => Err(Failure::NoResponse),
                Ok(Err(failure)) => Err(failure),
                Err(join) => Err(Failure::Host(join.to_string())),
            },
        }
    }

    fn new_store(&self, pre: &ProxyPre<Host>, io: Io) -> Result<Store<Host>, Failure> {
        let host = Host::new(self.limits.memory_bytes, io.sink, io.outgoing, io.grants);
        let mut store = Store::new(pre.engine(), host);
        store.limiter(|host| &mut host.memory);
        if self.budget == CpuBudget::Epoch {
            let budget = ticks(self.limits.cpu);
            store.epoch_deadline_callback(move |mut store| {
                // Reached at most once per tick while wasm runs: charge it, then yield
                // so the deadline timer and other requests get the thread.
                let charged = &mut store.data_mut().ticks_charged;
                *charged += 1;
                if *charged >= budget {
                    Ok(UpdateDeadline::Interrupt)
                } else {
                    Ok(UpdateDeadline::Yield(1))
                }
            });
        }
        self.arm(&mut store)?;
        Ok(store)
    }

    /// Gives the store a full CPU budget for one request.
    fn arm(&self, store: &mut Store<Host>) -> Result<(), Failure> {
        match self.budget {
            CpuBudget::Epoch => {
                store.set_epoch_deadline(1);
                Ok(())
            }
            CpuBudget::Fuel => store
                .set_fuel(fuel_for(self.limits.cpu))
                .and_then(|()| store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL)))
                .map_err(|e| Failure::Host(format!("{e:#}"))),
        }
    }
}

/// Fuel in a CPU budget.
fn fuel_for(cpu: Duration) -> u64 {
    u64::try_from(cpu.as_micros())
        .unwrap_or(u64::MAX)
        .saturating_mul(FUEL_PER_MS / 1000)
}

/// Epoch ticks in a CPU budget, at least one.
fn ticks(cpu: Duration) -> u64 {
    let tick = EPOCH_TICK.as_micros().max(1);
    u64::try_from(cpu.as_micros().div_ceil(tick))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Names what ended an instance.
fn classify(error: &wasmtime::Error, memory: &state::MemoryCap) -> Failure {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt | Trap::OutOfFuel) => Failure::Overrun,
        // A refused growth usually ends as an abort (unreachable) in the guest's allocator.
        Some(_) if memory.refused => Failure::Memory,
        Some(trap) => Failure::Trap(trap.to_string()),
        None if memory.refused => Failure::Memory,
        None => Failure::Trap(format!("{error:#}")),
    }
}

/// Bodies for callers and tests.
pub mod body {
    use super::{Bytes, HyperIncomingBody};
    use http_body_util::{BodyExt, Empty, Full};

    pub fn empty() -> HyperIncomingBody {
        Empty::new().map_err(|never| match never {}).boxed_unsync()
    }

    pub fn full(bytes: impl Into<Bytes>) -> HyperIncomingBody {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

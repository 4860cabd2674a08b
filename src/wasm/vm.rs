//! One Proxy-Wasm VM (a wasm instance with its root context) and the per-request lease
//! through which the proxy drives a VM's HTTP context.

use super::abi::{BufferType, ACTION_CONTINUE};
use super::host::{
    fuel_for, with_frame, CallResponse, Effects, Host, LocalResponse, PendingCall, RequestInfo,
    StreamEvent, StreamEvents, View,
};
use super::renew::{Handles, Pristine};
use super::{Cause, Failure, Plugin};
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wasmtime::{Extern, Instance, Module, Store, StoreLimitsBuilder, Trap, TypedFunc};

const ROOT: i32 = super::host::ROOT_CONTEXT;
/// Budget multiplier for VM start (`_initialize`, `on_vm_start`, `on_configure`).
const START_BUDGET_FACTOR: u64 = 50;

type F1 = TypedFunc<i32, ()>;
type F2 = TypedFunc<(i32, i32), ()>;
type F2R = TypedFunc<(i32, i32), i32>;
type F3 = TypedFunc<(i32, i32, i32), ()>;
type F3R = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;
/// Picks one callback of a module's exports (`None`: a callback the caller has no use for).
type Pick<F> = fn(&Exports) -> Option<&Cb<F>>;

struct Exports {
    on_context_create: Cb<F2>,
    on_vm_start: Cb<F2R>,
    on_configure: Cb<F2R>,
    on_request_headers: Cb<F3R>,
    on_request_body: Cb<F3R>,
    on_response_headers: Cb<F3R>,
    /// v0.1.0 modules' header callbacks, which have no end-of-stream argument.
    on_request_headers_01: Cb<F2R>,
    on_response_headers_01: Cb<F2R>,
    on_response_body: Cb<F3R>,
    on_response_trailers: Cb<F2R>,
    on_log: Cb<F1>,
    on_done: Cb<TypedFunc<i32, i32>>,
    on_delete: Cb<F1>,
    on_http_call_response: Cb<F5>,
    on_grpc_receive: Cb<F3>,
    on_grpc_close: Cb<F3>,
    on_grpc_receive_initial_metadata: Cb<F3>,
    on_grpc_receive_trailing_metadata: Cb<F3>,
    on_tick: Cb<F1>,
    on_queue_ready: Cb<F2>,
    on_foreign_function: Cb<F3>,
}

/// A callback the module exports, resolved on its first call. A fresh instance (one per
/// request under `isolation = "request"`) calls a handful of its twenty-odd callbacks,
/// and resolving one costs wasmtime a function reference set up in the instance and a
/// type looked up under the engine's lock, then dropped with the store.
struct Cb<F> {
    at: Option<(Instance, wasmtime::ModuleExport)>,
    func: std::sync::OnceLock<F>,
}

impl<F> Cb<F> {
    fn absent() -> Cb<F> {
        Cb {
            at: None,
            func: std::sync::OnceLock::new(),
        }
    }

    fn exists(&self) -> bool {
        self.at.is_some()
    }
}

impl<P: wasmtime::WasmParams, R: wasmtime::WasmResults> Cb<TypedFunc<P, R>> {
    /// The callback, if the module exports it.
    fn get(&self, s: &mut Store<Host>) -> Option<&TypedFunc<P, R>> {
        if let Some(f) = self.func.get() {
            return Some(f);
        }
        let (inst, at) = self.at.as_ref()?;
        let func = inst
            .get_module_export(&mut *s, at)
            .and_then(Extern::into_func)?;
        // SAFETY: `Cb`s of a module's known exports are made only after its first
        // instance had each checked against its type (`Vm::boot`); a module's export
        // types are the same in every instance.
        Some(
            self.func
                .get_or_init(|| unsafe { TypedFunc::new_unchecked(&*s, func) }),
        )
    }

    /// The callback itself, for one kept outside [`Exports`] (the allocator): resolved
    /// once and moved out, not cloned (a clone copies its type from the engine again).
    fn take(self, s: &mut Store<Host>) -> Option<TypedFunc<P, R>> {
        self.get(s)?;
        self.func.into_inner()
    }
}

/// How a VM's instance gets ready for requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Boot {
    /// The module's start runs: `_initialize`, the root context's creation,
    /// `on_vm_start`, `on_configure`.
    Full,
    /// The instance comes from a snapshot taken after that start: nothing runs.
    Snapshot,
}

/// An instance's state as wizer reads it for a snapshot.
struct Frozen<'a> {
    store: &'a mut Store<Host>,
    instance: Instance,
}

impl wasmtime_wizer::InstanceState for Frozen<'_> {
    async fn global_get(
        &mut self,
        name: &str,
        _: wasmtime_wizer::ValType,
    ) -> wasmtime_wizer::SnapshotVal {
        use wasmtime::Val;
        use wasmtime_wizer::SnapshotVal as S;
        let global = self.instance.get_global(&mut *self.store, name);
        match global.map(|g| g.get(&mut *self.store)) {
            Some(Val::I64(x)) => S::I64(x),
            Some(Val::F32(x)) => S::F32(x),
            Some(Val::F64(x)) => S::F64(x),
            Some(Val::V128(x)) => S::V128(x.as_u128()),
            Some(Val::I32(x)) => S::I32(x),
            // wizer exported every global it asks for, with a value type
            _ => unreachable!("instrumented global {name}"),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(m) => contents(m.data(&*self.store)),
            None => contents(&[]),
        }
    }
}

pub struct Vm {
    store: Store<Host>,
    /// The code it runs (a module's baseline code until its optimized code is ready).
    code: Arc<super::Code>,
    f: Exports,
    next_ctx: i32,
    /// Callouts the root context made outside any request (`on_configure`, `on_tick`,
    /// `on_queue_ready`, its own callout answers), not yet sent: the plugin sends them and
    /// keeps this VM out of its pool until they are answered (see `Plugin::park`).
    root_calls: Vec<PendingCall>,
    /// Its memory and mutable globals, when it can be renewed (see [`Vm::renew`]).
    renew: Option<Handles>,
}

/// How a root context's end went (see [`Vm::shutdown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// `on_done` and `on_delete` ran.
    Deleted,
    /// `on_done` answered false: the root context waits for the guest's `proxy_done`.
    Waiting,
    /// A callback failed (reported).
    Failed,
}

/// Rejects modules that are not Proxy-Wasm filters, with the reason.
pub(crate) fn check_exports(m: &Module) -> Result<(), String> {
    let has = |n: &str| m.get_export(n).is_some();
    if !has("memory") {
        return Err("does not export its memory".into());
    }
    if !has("proxy_abi_version_0_2_1")
        && !has("proxy_abi_version_0_2_0")
        && !has("proxy_abi_version_0_1_0")
    {
        return Err(
            "does not export proxy_abi_version_0_2_1: not a Proxy-Wasm module (v0.2.x or v0.1.0)"
                .into(),
        );
    }
    if !has("proxy_on_context_create") {
        return Err("does not export proxy_on_context_create".into());
    }
    if !has("proxy_on_memory_allocate") && !has("malloc") {
        return Err("exports no allocator (proxy_on_memory_allocate or malloc)".into());
    }
    Ok(())
}

fn failure(callback: &'static str, e: wasmtime::Error, host: &Host) -> Failure {
    let cause = if host.out_of_fuel {
        Cause::Overrun
    } else if e.is::<wasmtime::PoolConcurrencyLimitError>() {
        // every slot of the instance pool is taken: busy, not the guest's fault
        Cause::Busy
    } else {
        match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => Cause::Overrun,
            Some(t) => Cause::Trap(t.to_string()),
            None => Cause::Trap(super::root_cause(&e)),
        }
    };
    Failure { callback, cause }
}

/// The host state of a new store (or of a renewed one).
fn new_host(plugin: &Arc<Plugin>, config_gen: u64) -> Host {
    Host {
        config_gen,
        limits: StoreLimitsBuilder::new()
            .memory_size(plugin.spec.limits.memory_bytes as usize)
            .instances(1)
            .tables(4)
            .table_elements(20_000)
            .memories(1)
            .build(),
        plugin: plugin.clone(),
        config: plugin.config.load_full(),
        frame: Default::default(),
        effects: Effects::default(),
        memory: None,
        alloc: None,
        out_of_fuel: false,
        grpc_tokens: Vec::new(),
        grpc_streams: Vec::new(),
        stream_events: Vec::new(),
        root_stream_events: Vec::new(),
        http_ctx: 0,
        effective: ROOT,
        parked: Default::default(),
        abi01: plugin.compiled.abi01,
        awaiting_done: false,
        read_random: false,
    }
}

impl Vm {
    /// Instantiates the module and configures its root context. The fuel this burns is
    /// billed to the tenant like any callback's when `billed` (VMs started to serve
    /// requests; with `isolation = "request"` it is paid on every request). The VM the
    /// gateway starts itself when it loads a module (deploy, conf load, restart) checks
    /// the module and is not billed: a gateway restart costs tenants nothing.
    pub(crate) fn start(plugin: &Arc<Plugin>, billed: bool) -> Result<Box<Vm>, Failure> {
        let started = match plugin.snapshot() {
            Some(code) => Self::start_on(plugin, code, billed, Boot::Snapshot),
            None => Self::start_on(plugin, plugin.compiled.code(), billed, Boot::Full),
        };
        started.map(|(vm, _)| vm)
    }

    /// [`Vm::start`] on `code`, started as `boot` says; also the instance (a snapshot
    /// reads its memory and globals).
    pub(crate) fn start_on(
        plugin: &Arc<Plugin>,
        code: Arc<super::Code>,
        billed: bool,
        boot: Boot,
    ) -> Result<(Box<Vm>, Instance), Failure> {
        // the generation first: a configuration newer than it only makes the VM stale
        let config_gen = plugin.config_gen.load(Ordering::Acquire);
        let host = new_host(plugin, config_gen);
        let mut store = Store::new(code.engine(), host);
        store.limiter(|h| &mut h.limits);
        let start_fuel = fuel_for(plugin.spec.limits.budget).saturating_mul(START_BUDGET_FACTOR);
        store.set_fuel(start_fuel).map_err(|e| Failure {
            callback: "instantiate",
            cause: Cause::Trap(e.to_string()),
        })?;
        let booted = Self::boot(plugin, &code, &mut store, boot);
        if billed {
            plugin.bill_fuel(start_fuel - store.get_fuel().unwrap_or(0).min(start_fuel));
        }
        let root_calls = std::mem::take(&mut store.data_mut().effects.calls);
        let (f, instance) = booted?;
        // What renewing puts back: a snapshot's instance before any code ran in it. Read
        // from an instance of its own: reading every page of this one would map them all,
        // and the scan that renews it walks every mapped page.
        let renew = match boot {
            Boot::Snapshot => code
                .pristine
                .get_or_init(|| {
                    let mut s = Store::new(code.engine(), new_host(plugin, config_gen));
                    s.limiter(|h| &mut h.limits);
                    let first = code.pre.instantiate(&mut s).ok()?;
                    Pristine::take(&mut s, first, code.pre.module())
                })
                .as_ref()
                .and_then(|p| p.handles(&mut store, instance)),
            Boot::Full => None,
        };
        let vm = Box::new(Vm {
            store,
            code,
            f,
            next_ctx: ROOT + 1,
            root_calls,
            renew,
        });
        Ok((vm, instance))
    }

    fn boot(
        plugin: &Arc<Plugin>,
        code: &super::Code,
        store: &mut Store<Host>,
        boot: Boot,
    ) -> Result<(Exports, Instance), Failure> {
        let fail = |cb: &'static str, msg: String| Failure {
            callback: cb,
            cause: Cause::Trap(msg),
        };
        let inst = code
            .pre
            .instantiate(&mut *store)
            .map_err(|e| failure("instantiate", e, store.data()))?;
        // Callbacks are taken by export index. The first instance of a module finds the
        // indices by name and has wasmtime check each callback's type; they are kept then,
        // so the module's later instances (a fresh one per request under `isolation =
        // "request"`) skip both the name lookups and the type checks, and resolve each
        // callback only when it is first called (see `Cb`).
        let known = code.callbacks.get();
        let module = code.pre.module();
        let wrong = |name: &str, e: String| {
            fail(
                "instantiate",
                format!("export {name} has the wrong type: {e}"),
            )
        };
        let mut found = Vec::new();
        let mut k = 0;
        // each callback in turn (the same order in every instance of a module): resolved
        // and type-checked now in the module's first instance, on its first call after
        macro_rules! cb {
            ($name:expr) => {{
                k += 1;
                let at = match known {
                    Some(known) => known[k - 1],
                    None => {
                        found.push(module.get_export_index($name));
                        found[k - 1]
                    }
                };
                match (at, known) {
                    (None, _) => Cb::absent(),
                    (Some(at), Some(_)) => Cb {
                        at: Some((inst, at)),
                        func: std::sync::OnceLock::new(),
                    },
                    (Some(at), None) => {
                        let func = inst
                            .get_module_export(&mut *store, &at)
                            .and_then(Extern::into_func)
                            .ok_or_else(|| wrong($name, "not a function".into()))?;
                        let typed = func
                            .typed(&*store)
                            .map_err(|e| wrong($name, e.to_string()))?;
                        Cb {
                            at: Some((inst, at)),
                            func: typed.into(),
                        }
                    }
                }
            }};
        }
        let memory = inst.get_memory(&mut *store, "memory");
        let alloc = match cb!("proxy_on_memory_allocate").take(store) {
            Some(f) => f,
            None => cb!("malloc")
                .take(store)
                .ok_or_else(|| fail("instantiate", "no allocator".into()))?,
        };
        store.data_mut().memory = memory;
        store.data_mut().alloc = Some(alloc);
        // v0.1.0 header callbacks have no end-of-stream argument: another type, another field
        let abi01 = store.data().abi01;
        macro_rules! by_abi {
            ($name:literal) => {
                if abi01 {
                    (Cb::absent(), cb!($name))
                } else {
                    (cb!($name), Cb::absent())
                }
            };
        }
        let (on_request_headers, on_request_headers_01) = by_abi!("proxy_on_request_headers");
        let (on_response_headers, on_response_headers_01) = by_abi!("proxy_on_response_headers");
        let on_context_create = cb!("proxy_on_context_create");
        if !on_context_create.exists() {
            return Err(fail("instantiate", "no proxy_on_context_create".into()));
        }
        // every other callback is optional and exported as `proxy_` + its field's name
        macro_rules! exports {
            ($($cb:ident),* $(,)?) => {
                Exports {
                    $($cb: cb!(concat!("proxy_", stringify!($cb))),)*
                    on_context_create,
                    on_request_headers,
                    on_request_headers_01,
                    on_response_headers,
                    on_response_headers_01,
                }
            };
        }
        let f = exports! {
            on_vm_start, on_configure, on_request_body, on_response_body, on_response_trailers,
            on_log, on_done, on_delete, on_http_call_response, on_foreign_function,
            on_grpc_receive, on_grpc_close, on_grpc_receive_initial_metadata,
            on_grpc_receive_trailing_metadata, on_tick, on_queue_ready,
        };
        // WASI reactors (`_initialize`) and commands (`_start`) set up their runtime first.
        let initialize: Cb<TypedFunc<(), ()>> = cb!("_initialize");
        let init = if initialize.exists() {
            (initialize, "_initialize")
        } else {
            (cb!("_start"), "_start")
        };
        if known.is_none() {
            let _ = code.callbacks.set(found.into());
        }
        if boot == Boot::Snapshot {
            // its memory and globals are those of an instance that ran all of the below
            return Ok((f, inst));
        }
        if let Some(func) = init.0.get(store) {
            func.call(&mut *store, ())
                .map_err(|e| failure(init.1, e, store.data()))?;
        }
        if let Some(func) = f.on_context_create.get(store) {
            func.call(&mut *store, (ROOT, 0))
                .map_err(|e| failure("on_context_create", e, store.data()))?;
        }
        let p = &plugin.spec;
        if let Some(func) = f.on_vm_start.get(store) {
            let ok = func
                .call(&mut *store, (ROOT, p.vm_config.len() as i32))
                .map_err(|e| failure("on_vm_start", e, store.data()))?;
            if ok == 0 {
                return Err(Failure {
                    callback: "on_vm_start",
                    cause: Cause::Misbehaved("the guest rejected its VM configuration"),
                });
            }
        }
        if let Some(func) = f.on_configure.get(store) {
            let size = store.data().config.len() as i32;
            let ok = func
                .call(&mut *store, (ROOT, size))
                .map_err(|e| failure("on_configure", e, store.data()))?;
            if ok == 0 {
                return Err(Failure {
                    callback: "on_configure",
                    cause: Cause::Misbehaved("the guest rejected its plugin configuration"),
                });
            }
        }
        Ok((f, inst))
    }

    /// A pre-initialized module of this VM's instance (`instance`, started from the
    /// module `cx` instrumented): its memory and globals as the start left them. `Err`
    /// says why the start cannot be frozen.
    pub(crate) fn snapshot(
        &mut self,
        instance: Instance,
        wizer: &wasmtime_wizer::Wizer,
        cx: &wasmtime_wizer::ModuleContext<'_>,
    ) -> Result<Vec<u8>, String> {
        if self.store.data().read_random {
            return Err("its start reads random bytes, which every instance would share".into());
        }
        if self.has_root_calls() || self.has_root_streams() {
            return Err("its start makes callouts".into());
        }
        let mut state = Frozen {
            store: &mut self.store,
            instance,
        };
        // wizer panics on a global no snapshot value holds (a reference): no snapshot then
        let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(wizer.snapshot(cx, &mut state))
        }));
        match taken {
            Ok(snap) => snap.map_err(|e| e.to_string()),
            Err(_) => Err("a global holds a value a snapshot cannot".into()),
        }
    }

    pub(crate) fn queue_ready(&mut self, plugin: &Plugin, queue: u32) -> Result<(), Failure> {
        self.root_call(plugin, "on_queue_ready", View::default(), |s, f| {
            match f.on_queue_ready.get(s) {
                Some(func) => func.call(s, (ROOT, queue as i32)),
                None => Ok(()),
            }
        })
    }

    pub(crate) fn tick(&mut self, plugin: &Plugin) -> Result<(), Failure> {
        self.root_call(plugin, "on_tick", View::default(), |s, f| {
            match f.on_tick.get(s) {
                Some(func) => func.call(s, ROOT),
                None => Ok(()),
            }
        })
    }

    /// The answer to one of the root context's own callouts, outside any request.
    pub(crate) fn root_answer(&mut self, plugin: &Plugin, a: &CallResponse) -> Result<(), Failure> {
        let view = View {
            call: Some(a),
            root: true,
            ..View::default()
        };
        self.root_call(plugin, answer_callback(a), view, |s, f| {
            deliver_answer(s, f, ROOT, a)
        })
    }

    /// The root context's callouts not yet sent.
    /// Whether the plugin was reconfigured after this VM took its configuration.
    /// Started with a configuration since replaced: not pooled again.
    pub(crate) fn is_stale(&self, plugin: &Plugin) -> bool {
        self.store.data().config_gen != plugin.config_gen.load(Ordering::Acquire)
    }

    /// Runs code since replaced by the module's optimized code: not pooled again once its
    /// root context has nothing open (callouts, gRPC streams), which would be lost.
    pub(crate) fn runs_old_code(&self, plugin: &Plugin) -> bool {
        !plugin.compiled.is_current(&self.code)
    }

    pub(crate) fn take_root_calls(&mut self) -> Vec<PendingCall> {
        std::mem::take(&mut self.root_calls)
    }

    pub(crate) fn has_root_calls(&self) -> bool {
        !self.root_calls.is_empty()
    }

    /// Events of the root context's gRPC streams opened since they were last taken.
    pub(crate) fn take_root_streams(&mut self) -> Vec<StreamEvents> {
        std::mem::take(&mut self.store.data_mut().root_stream_events)
    }

    pub(crate) fn has_root_streams(&self) -> bool {
        !self.store.data().root_stream_events.is_empty()
    }

    /// The end of the VM's root context, when the VM is let go: `on_done`, then
    /// `on_delete` unless `on_done` answered false. Then the root context waits for the
    /// guest's `proxy_done` (see [`Vm::await_done`]); returns whether it does.
    pub(crate) fn shutdown(&mut self, plugin: &Plugin) -> Ended {
        let mut done = true;
        let r = self.root_call(plugin, "on_done", View::default(), |s, f| {
            match f.on_done.get(s) {
                Some(func) => func.call(&mut *s, ROOT).map(|v| done = v != 0),
                None => Ok(()),
            }
        });
        if let Err(f) = r {
            plugin.report(&f);
            return Ended::Failed; // dropped without on_delete, like any failed VM
        }
        if !done {
            self.store.data_mut().awaiting_done = true;
            return Ended::Waiting;
        }
        match self.delete_root(plugin) {
            Ok(()) => Ended::Deleted,
            Err(()) => Ended::Failed,
        }
    }

    /// Puts a VM started from its module's current snapshot, whose root context ended,
    /// back as the snapshot starts every instance (see [`super::renew`]): its memory,
    /// globals, contexts and host state. `false` when it cannot be (the memory grew, the
    /// snapshot or the configuration changed, the scan failed): then it is dropped.
    pub(crate) fn renew(&mut self, plugin: &Arc<Plugin>) -> bool {
        let (Some(handles), Some(Some(pristine))) = (&self.renew, self.code.pristine.get()) else {
            return false;
        };
        let current = plugin
            .snapshot()
            .is_some_and(|code| Arc::ptr_eq(&code, &self.code));
        if !current || self.is_stale(plugin) || !pristine.restore(&mut self.store, handles) {
            return false;
        }
        let h = self.store.data_mut();
        let mut host = new_host(plugin, h.config_gen);
        host.memory = h.memory;
        host.alloc = h.alloc.take();
        *h = host;
        self.next_ctx = ROOT + 1;
        self.root_calls.clear();
        true
    }

    /// A root context that answered `on_done` with false keeps getting `on_tick` at its
    /// period until it calls `proxy_done` or [`super::DONE_WAIT`] passes, then gets
    /// `on_delete` and the VM is dropped.
    pub(crate) async fn await_done(mut self: Box<Self>, plugin: Arc<Plugin>) {
        let deadline = tokio::time::Instant::now() + super::DONE_WAIT;
        while self.store.data().awaiting_done && tokio::time::Instant::now() < deadline {
            let ms = plugin.tick_ms.load(std::sync::atomic::Ordering::Relaxed) as u64;
            let period = std::time::Duration::from_millis(if ms == 0 { 50 } else { ms });
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + period)).await;
            if ms > 0 && self.store.data().awaiting_done {
                if let Err(f) = self.tick(&plugin) {
                    plugin.report(&f);
                    return;
                }
            }
        }
        self.store.data_mut().awaiting_done = false;
        let _ = self.delete_root(&plugin);
    }

    /// Ends a root context waiting for `proxy_done` at once.
    pub(crate) fn give_up_done(&mut self, plugin: &Plugin) {
        self.store.data_mut().awaiting_done = false;
        let _ = self.delete_root(plugin);
    }

    /// The plugin this VM runs.
    pub(crate) fn plugin(&self) -> Arc<Plugin> {
        self.store.data().plugin.clone()
    }

    fn delete_root(&mut self, plugin: &Plugin) -> Result<(), ()> {
        let r = self.root_call(plugin, "on_delete", View::default(), |s, f| {
            match f.on_delete.get(s) {
                Some(func) => func.call(s, ROOT),
                None => Ok(()),
            }
        });
        r.map_err(|f| plugin.report(&f))
    }

    /// A root-context callback outside any request, under the module's callback budget.
    /// Callouts it makes are kept in [`Vm::root_calls`].
    fn root_call(
        &mut self,
        plugin: &Plugin,
        name: &'static str,
        view: View<'_>,
        call: impl FnOnce(&mut Store<Host>, &Exports) -> wasmtime::Result<()>,
    ) -> Result<(), Failure> {
        let Vm {
            store,
            f,
            root_calls,
            ..
        } = self;
        {
            let h = store.data_mut();
            h.out_of_fuel = false;
            h.effective = ROOT;
            h.http_ctx = 0;
            h.effects = Effects {
                next_token: h.effects.next_token,
                ..Effects::default()
            };
        }
        let fuel = fuel_for(plugin.spec.limits.budget);
        let (r, left) = with_frame(store, view, |store| {
            let _ = store.set_fuel(fuel);
            let r = call(store, f).map_err(|e| failure(name, e, store.data()));
            (r, store.get_fuel().unwrap_or(0))
        });
        plugin.bill_fuel(fuel - left.min(fuel));
        let h = store.data_mut();
        let fx = std::mem::take(&mut h.effects);
        h.effects.next_token = fx.next_token;
        count_callouts(plugin, &fx.calls);
        root_calls.extend(fx.calls);
        r
    }
}

/// Which half of the exchange a stream callback is about.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

/// What wakes a request's root context while the request waits on it.
#[derive(Clone, Copy)]
pub enum RootEvent<'a> {
    Tick,
    Queue(u32),
    Answer(&'a CallResponse),
}

/// What a stream callback asks the proxy to do next.
#[derive(Debug)]
pub enum Outcome {
    Continue,
    /// Stop and answer with this response.
    Respond(LocalResponse),
    /// Wait for these callouts, then call [`Lease::on_http_call_response`] for each.
    Wait(Vec<PendingCall>),
    /// The guest returned Pause (buffer more body, or wait without a callout).
    Pause,
    Failed(Failure),
}

/// A VM lent to one request, with that request's HTTP context inside it.
pub struct Lease {
    plugin: Arc<Plugin>,
    vm: Option<Box<Vm>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    ctx: i32,
    fuel_left: u64,
    /// Fuel body callbacks may spend beyond their per-callback budget: grows with every
    /// body byte that arrives ([`super::BODY_FUEL_PER_BYTE`]), shrinks by what they spend.
    body_fuel: u64,
    /// Per direction (request, response): body length after the last body callback,
    /// and whether it paused (then the next callback sees that body plus new bytes).
    body_seen: [(usize, bool); 2],
    /// Whether the callback being run is a body callback (see [`Lease::run`]).
    in_body: bool,
    /// Fuel this request's callbacks burned: the deterministic measure of the wasm CPU
    /// it used (metered and billed; see [`super::FUEL_PER_US`]).
    pub fuel_used: u64,
    pub failed: Option<Failure>,
    finished: bool,
}

impl Lease {
    pub(crate) fn new(
        plugin: Arc<Plugin>,
        vm: Box<Vm>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Lease {
        Lease {
            fuel_left: fuel_for(plugin.spec.limits.request_budget),
            body_fuel: 0,
            body_seen: [(0, false); 2],
            in_body: false,
            plugin,
            vm: Some(vm),
            _permit: permit,
            ctx: 0,
            fuel_used: 0,
            failed: None,
            finished: false,
        }
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Which compiler made the code this request runs on.
    pub fn tier(&self) -> Option<super::Tier> {
        self.vm.as_ref().map(|vm| vm.code.tier)
    }

    /// Whether this request's HTTP context exists and has not failed: Envoy calls a
    /// filter's response callbacks for a local reply only then.
    pub fn is_live(&self) -> bool {
        self.ctx != 0 && self.failed.is_none() && self.vm.is_some()
    }

    /// Runs one callback with the frame pointing at `view`; classifies what came of it.
    fn run<R>(
        &mut self,
        name: &'static str,
        view: View<'_>,
        call: impl FnOnce(&mut Store<Host>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<(R, Effects), Failure> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let Some(vm) = self.vm.as_mut() else {
            return Err(Failure {
                callback: name,
                cause: Cause::Misbehaved("instance_lost"),
            });
        };
        // Body callbacks run on their own budget plus the body allowance, never on the
        // request's: a filter doing fixed work per chunk must not fail because the body
        // came in many chunks (the request budget would run out after budget/work chunks).
        let budget = fuel_for(self.plugin.spec.limits.budget);
        let fuel = if self.in_body {
            budget.saturating_add(self.body_fuel)
        } else {
            budget.min(self.fuel_left)
        };
        let Vm { store, f, .. } = &mut **vm;
        {
            let h = store.data_mut();
            h.out_of_fuel = false;
            h.effects = Effects {
                next_token: h.effects.next_token,
                ..Effects::default()
            };
            h.http_ctx = self.ctx;
            h.effective = if view.root { ROOT } else { self.ctx };
        }
        let (result, left) = with_frame(store, view, |store| {
            let _ = store.set_fuel(fuel);
            let r = call(store, f);
            (r, store.get_fuel().unwrap_or(0))
        });
        let used = fuel - left.min(fuel);
        if self.in_body {
            self.body_fuel = self.body_fuel.saturating_sub(used.saturating_sub(budget));
        } else {
            self.fuel_left = self.fuel_left.saturating_sub(used);
        }
        self.fuel_used += used;
        let h = store.data_mut();
        let effects = std::mem::take(&mut h.effects);
        h.effects.next_token = effects.next_token;
        if effects.local.is_some() {
            self.plugin
                .usage
                .local_responses
                .fetch_add(1, Ordering::Relaxed);
        }
        count_callouts(&self.plugin, &effects.calls);
        match result {
            Ok(r) if effects.local_too_large => {
                let _ = r;
                self.fail(Failure {
                    callback: name,
                    cause: Cause::Misbehaved("local_response_too_large"),
                })
            }
            Ok(r) => Ok((r, effects)),
            Err(e) => {
                let f = failure(name, e, store.data());
                self.fail(f)
            }
        }
    }

    fn fail<T>(&mut self, f: Failure) -> Result<T, Failure> {
        // A VM that trapped or overran may be in any state: it is dropped, never reused.
        self.vm = None;
        self.plugin.report(&f);
        self.failed = Some(f.clone());
        Err(f)
    }

    /// Marks the request failed for a reason found outside a callback.
    pub fn misbehaved(&mut self, callback: &'static str, why: &'static str) -> Failure {
        let f = Failure {
            callback,
            cause: Cause::Misbehaved(why),
        };
        let _ = self.fail::<()>(f.clone());
        f
    }

    fn ensure_context(&mut self) -> Result<(), Failure> {
        if self.ctx != 0 {
            return Ok(());
        }
        let vm = self.vm.as_mut().ok_or(Failure {
            callback: "on_context_create",
            cause: Cause::Misbehaved("instance_lost"),
        })?;
        let ctx = vm.next_ctx;
        vm.next_ctx = vm.next_ctx.wrapping_add(1).max(ROOT + 1);
        self.run("on_context_create", View::default(), |s, f| {
            f.on_context_create
                .get(s)
                .map_or(Ok(()), |g| g.call(s, (ctx, ROOT)))
        })?;
        self.ctx = ctx;
        self.plugin.metrics.invocations.inc();
        self.plugin
            .usage
            .invocations
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn stream(
        &mut self,
        name: &'static str,
        pick: Pick<F3R>,
        a: i32,
        b: i32,
        view: View<'_>,
    ) -> Outcome {
        self.stream_either(name, pick, |_| None, a, b, view)
    }

    /// A stream callback that v0.1.0 modules (`pick01`) take without its last argument.
    fn stream_either(
        &mut self,
        name: &'static str,
        pick: Pick<F3R>,
        pick01: Pick<F2R>,
        a: i32,
        b: i32,
        view: View<'_>,
    ) -> Outcome {
        if let Err(e) = self.ensure_context() {
            return Outcome::Failed(e);
        }
        if !self.exports(pick) && !self.exports(pick01) {
            return Outcome::Continue;
        }
        let ctx = self.ctx;
        match self.run(name, view, |s, f| {
            match (
                pick(f).and_then(|c| c.get(s)),
                pick01(f).and_then(|c| c.get(s)),
            ) {
                (Some(func), _) => func.call(s, (ctx, a, b)),
                (None, Some(func)) => func.call(s, (ctx, a)),
                (None, None) => Ok(ACTION_CONTINUE),
            }
        }) {
            Err(e) => Outcome::Failed(e),
            Ok((action, fx)) => outcome(action, fx),
        }
    }

    /// A headers callback with `n` headers, v0.1.0 modules' form included.
    fn headers(&mut self, side: Side, n: i32, end_of_stream: bool, view: View<'_>) -> Outcome {
        let (name, pick, pick01): (_, Pick<F3R>, Pick<F2R>) = match side {
            Side::Request => (
                "on_request_headers",
                |e| Some(&e.on_request_headers),
                |e| Some(&e.on_request_headers_01),
            ),
            Side::Response => (
                "on_response_headers",
                |e| Some(&e.on_response_headers),
                |e| Some(&e.on_response_headers_01),
            ),
        };
        self.stream_either(name, pick, pick01, n, end_of_stream as i32, view)
    }

    /// Whether the leased VM's module exports the callback for callout answer `a`.
    fn answer_exported(&self, a: &CallResponse) -> bool {
        self.vm
            .as_ref()
            .is_some_and(|v| answer_callback_exported(&v.f, a))
    }

    /// Whether the leased VM's module exports the callback `pick` selects.
    fn exports<T>(&self, pick: Pick<T>) -> bool {
        self.vm
            .as_ref()
            .is_some_and(|v| pick(&v.f).is_some_and(Cb::exists))
    }

    pub fn on_request_headers(
        &mut self,
        req: &mut RequestHeader,
        info: &mut RequestInfo,
        end_of_stream: bool,
    ) -> Outcome {
        // the pseudo-headers, and Host only as `:authority`
        let n =
            (req.headers.len() - req.headers.contains_key(http::header::HOST) as usize) as i32 + 4;
        let view = View {
            req: Some(req),
            ..View::of(info)
        };
        self.headers(Side::Request, n, end_of_stream, view)
    }

    /// `head_sent`: the request head already went upstream, so its headers are
    /// read-only (changes answer `BadArgument`, as Envoy once the headers continued).
    pub fn on_request_body(
        &mut self,
        req: &mut RequestHeader,
        head_sent: bool,
        info: &mut RequestInfo,
        body: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Outcome {
        let (req, req_ro) = if head_sent {
            (None, Some(&*req))
        } else {
            (Some(req), None)
        };
        let view = View {
            req,
            req_ro,
            ..View::of(info)
        };
        self.body(BufferType::RequestBody, view, body, end_of_stream)
    }

    /// A body callback (`t`: which body): `view` plus the body, on the body's own
    /// budget (see `run`).
    fn body(
        &mut self,
        t: BufferType,
        view: View<'_>,
        body: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Outcome {
        let (dir, name, pick): (usize, _, Pick<F3R>) = match t {
            BufferType::RequestBody => (0, "on_request_body", |e| Some(&e.on_request_body)),
            _ => (1, "on_response_body", |e| Some(&e.on_response_body)),
        };
        let n = body.len() as i32;
        self.body_arrived(dir, body.len());
        let view = View {
            body: Some((t, &mut *body)),
            ..view
        };
        self.in_body = true;
        let out = self.stream(name, pick, n, end_of_stream as i32, view);
        self.in_body = false;
        self.body_seen[dir] = (body.len(), matches!(out, Outcome::Pause));
        out
    }

    /// Adds the allowance for the body bytes that arrived since direction `dir`'s last
    /// body callback: all of `len` unless that callback paused and kept the body buffered.
    fn body_arrived(&mut self, dir: usize, len: usize) {
        let (seen, paused) = self.body_seen[dir];
        let new = if paused {
            len.saturating_sub(seen)
        } else {
            len
        };
        self.body_fuel = self
            .body_fuel
            .saturating_add(new as u64 * super::BODY_FUEL_PER_BYTE);
    }

    pub fn on_response_headers(
        &mut self,
        req: &RequestHeader,
        resp: &mut ResponseHeader,
        info: &mut RequestInfo,
        end_of_stream: bool,
    ) -> Outcome {
        let n = resp.headers.len() as i32 + 1;
        let view = View {
            req_ro: Some(req),
            resp: Some(resp),
            ..View::of(info)
        };
        self.headers(Side::Response, n, end_of_stream, view)
    }

    /// `head`: the response head while the client has not got it (a module holds it, or
    /// a local reply goes through the chain): the body callback may still change it.
    pub fn on_response_body(
        &mut self,
        req: &RequestHeader,
        head: Option<&mut ResponseHeader>,
        info: &mut RequestInfo,
        body: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Outcome {
        let view = View {
            req_ro: Some(req),
            resp: head,
            ..View::of(info)
        };
        self.body(BufferType::ResponseBody, view, body, end_of_stream)
    }

    pub fn on_response_trailers(
        &mut self,
        req: &RequestHeader,
        info: &mut RequestInfo,
        trailers: &mut http::HeaderMap,
    ) -> Outcome {
        let n = trailers.len() as i32;
        let view = View {
            req_ro: Some(req),
            resp_trailers: Some(trailers),
            ..View::of(info)
        };
        // (ctx, headers): the shape of a v0.1.0 header callback
        let pick: Pick<F2R> = |e| Some(&e.on_response_trailers);
        self.stream_either("on_response_trailers", |_| None, pick, n, 0, view)
    }

    /// Delivers a callout's answer. `Continue` means the guest resumed the request.
    /// `view` is what the callback that made the call could reach: the request while it
    /// can still change, the request and response head in the response phase, and the
    /// body buffered so far when a body callback made the call.
    pub fn on_http_call_response<'a>(&mut self, view: View<'a>, resp: &'a CallResponse) -> Outcome {
        if resp.root {
            return self.on_root_event(RootEvent::Answer(resp), view);
        }
        // a stream's event goes through even when its callback is not exported: the
        // stream's close must be noted
        if resp.stream.is_none() && !self.answer_exported(resp) {
            return Outcome::Continue;
        }
        let ctx = self.ctx;
        let phase = Phase::of(&view);
        let view = View {
            call: Some(resp),
            ..view
        };
        let r = self.run(answer_callback(resp), view, |s, f| {
            deliver_answer(s, f, ctx, resp)
        });
        resumed(r, phase)
    }

    /// Events of the gRPC streams this request's context opened since they were last
    /// taken; the proxy hands them back with [`Lease::park_stream_events`] when it stops
    /// waiting, so events that come meanwhile are delivered at the next wait.
    pub fn take_stream_events(&mut self) -> Vec<StreamEvents> {
        self.vm
            .as_mut()
            .map(|v| std::mem::take(&mut v.store.data_mut().stream_events))
            .unwrap_or_default()
    }

    /// Keeps the events of streams still open for the next wait; dropped (and the
    /// streams reset) once the context has ended or failed.
    pub fn park_stream_events(&mut self, events: impl IntoIterator<Item = StreamEvents>) {
        if self.finished || self.failed.is_some() {
            return;
        }
        if let Some(v) = self.vm.as_mut() {
            v.store.data_mut().stream_events.extend(events);
        }
    }

    /// Whether this request's context has gRPC streams open (not closed remotely).
    pub fn has_open_streams(&self) -> bool {
        self.vm.as_ref().is_some_and(|v| {
            let streams = &v.store.data().grpc_streams;
            streams.iter().any(|s| !s.root && !s.remote_closed)
        })
    }

    /// The root context's callouts made before this request (its `on_configure`), to be
    /// sent while the request waits on the root context.
    pub fn take_root_calls(&mut self) -> Vec<PendingCall> {
        self.vm
            .as_mut()
            .map(|v| v.take_root_calls())
            .unwrap_or_default()
    }

    /// Whether the request can still be woken while it waits: its context has gRPC
    /// streams open, or the leased VM's root context can still act (it has callouts to
    /// make, it ticks, or it registered a queue).
    pub fn root_can_wake(&self) -> bool {
        self.has_open_streams()
            || self.vm.as_ref().is_some_and(|v| v.has_root_calls())
            || self
                .plugin
                .tick_ms
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
            || self
                .plugin
                .has_queues
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A root-context event while this request waits on it (`on_tick`, `on_queue_ready`,
    /// the answer to a root callout). The root reaches the request, resumes it or answers
    /// it only after `proxy_set_effective_context` to its HTTP context.
    pub fn on_root_event<'a>(&mut self, ev: RootEvent<'a>, mut view: View<'a>) -> Outcome {
        view.root = true;
        let phase = Phase::of(&view);
        let (name, has) = match ev {
            RootEvent::Tick => ("on_tick", self.exports(|e| Some(&e.on_tick))),
            RootEvent::Queue(_) => ("on_queue_ready", self.exports(|e| Some(&e.on_queue_ready))),
            RootEvent::Answer(a) => {
                view.call = Some(a);
                (answer_callback(a), self.answer_exported(a))
            }
        };
        if !has {
            return Outcome::Pause;
        }
        let r = self.run(name, view, |s, f| match ev {
            RootEvent::Tick => f.on_tick.get(s).map_or(Ok(()), |g| g.call(s, ROOT)),
            RootEvent::Queue(id) => f
                .on_queue_ready
                .get(s)
                .map_or(Ok(()), |g| g.call(s, (ROOT, id as i32))),
            RootEvent::Answer(a) => deliver_answer(s, f, ROOT, a),
        });
        resumed(r, phase)
    }

    /// `on_log`, `on_done`, `on_delete`: the end of the HTTP context; then bills what the
    /// request's callbacks burned, failed ones included (an overrun burned its whole
    /// budget and is the most expensive request there is).
    pub fn finish(
        &mut self,
        req: Option<&RequestHeader>,
        resp: Option<&ResponseHeader>,
        info: &mut RequestInfo,
    ) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(vm) = self.vm.as_mut() {
            let h = vm.store.data_mut();
            h.grpc_tokens.clear(); // calls still out die with the request
                                   // its streams are reset and never call back; the root context's live on
            h.grpc_streams.retain(|s| s.root);
            h.stream_events.clear();
        }
        if self.ctx != 0 && self.failed.is_none() {
            self.end_context(req, resp, info);
        }
        if self.ctx == 0 && self.fuel_used == 0 {
            return; // no callback ran: nothing to bill
        }
        self.plugin.bill_fuel(self.fuel_used);
        if let Some(vm) = &self.vm {
            if let Some(m) = vm.store.data().memory {
                self.plugin.usage.peak(m.data_size(&vm.store) as u64);
            }
        }
        self.plugin
            .metrics
            .cpu
            .observe(self.fuel_used as f64 / (super::FUEL_PER_US as f64 * 1e6));
    }

    /// `on_done`, `on_log`, `on_delete`, in Envoy's order. `on_log` reads the request and
    /// the response as they were sent, as Envoy's access-log phase does.
    fn end_context(
        &mut self,
        req: Option<&RequestHeader>,
        resp: Option<&ResponseHeader>,
        info: &mut RequestInfo,
    ) {
        let ctx = self.ctx;
        let done = self.run("on_done", View::default(), |s, f| match f.on_done.get(s) {
            Some(func) => func.call(s, ctx).map(drop),
            None => Ok(()),
        });
        if done.is_err() {
            return;
        }
        let view = View {
            req_ro: req,
            resp_ro: resp,
            log: true,
            ..View::of(&mut *info)
        };
        let logged = self.run("on_log", view, |s, f| match f.on_log.get(s) {
            Some(func) => func.call(s, ctx),
            None => Ok(()),
        });
        if logged.is_err() {
            return;
        }
        let _ = self.run("on_delete", View::default(), |s, f| {
            match f.on_delete.get(s) {
                Some(func) => func.call(s, ctx),
                None => Ok(()),
            }
        });
    }
}

/// Counts the HTTP and gRPC callouts among `calls` in usage (state calls count as state
/// reads and writes, where they are made).
fn count_callouts(plugin: &Plugin, calls: &[PendingCall]) {
    let n = calls.iter().filter(|c| c.store.is_none()).count() as u64;
    if n > 0 {
        plugin.usage.http_callouts.fetch_add(n, Ordering::Relaxed);
    }
}

/// The callback that receives a callout's answer.
fn answer_callback(a: &CallResponse) -> &'static str {
    if let Some(ev) = a.stream {
        return match ev {
            StreamEvent::InitialMetadata => "on_grpc_receive_initial_metadata",
            StreamEvent::Message => "on_grpc_receive",
            StreamEvent::TrailingMetadata => "on_grpc_receive_trailing_metadata",
            StreamEvent::Close => "on_grpc_close",
        };
    }
    if a.foreign {
        return "on_foreign_function";
    }
    match &a.grpc {
        None => "on_http_call_response",
        Some(g) if g.code == 0 => "on_grpc_receive",
        Some(_) => "on_grpc_close",
    }
}

fn answer_callback_exported(e: &Exports, a: &CallResponse) -> bool {
    if let Some(ev) = a.stream {
        return stream_callback(e, ev).exists();
    }
    if a.foreign {
        return e.on_foreign_function.exists();
    }
    match &a.grpc {
        None => e.on_http_call_response.exists(),
        Some(g) if g.code == 0 => e.on_grpc_receive.exists(),
        Some(_) => e.on_grpc_close.exists(),
    }
}

fn stream_callback(e: &Exports, ev: StreamEvent) -> &Cb<F3> {
    match ev {
        StreamEvent::InitialMetadata => &e.on_grpc_receive_initial_metadata,
        StreamEvent::Message => &e.on_grpc_receive,
        StreamEvent::TrailingMetadata => &e.on_grpc_receive_trailing_metadata,
        StreamEvent::Close => &e.on_grpc_close,
    }
}

/// Hands a gRPC stream's event to the guest, on the root context as Envoy does (the SDKs
/// find the stream's context by the token), unless the stream was cancelled. After its
/// close callback the stream is forgotten if the guest closed it too, or when it does
/// (as in Envoy).
fn deliver_stream_event(
    s: &mut Store<Host>,
    f: &Exports,
    a: &CallResponse,
    ev: StreamEvent,
) -> wasmtime::Result<()> {
    let streams = &mut s.data_mut().grpc_streams;
    let Some(i) = streams.iter().position(|t| t.token == a.token) else {
        return Ok(()); // cancelled, or the context moved on
    };
    if streams[i].remote_closed {
        return Ok(());
    }
    let arg = match ev {
        StreamEvent::InitialMetadata => a.headers.len() as i32,
        StreamEvent::Message => a.body.len() as i32,
        StreamEvent::TrailingMetadata => a.trailers.len() as i32,
        StreamEvent::Close => {
            streams[i].remote_closed = true;
            a.grpc.as_ref().map_or(0, |g| g.code as i32)
        }
    };
    let token = a.token as i32;
    let r = stream_callback(f, ev)
        .get(s)
        .map_or(Ok(()), |g| g.call(&mut *s, (ROOT, token, arg)));
    if ev == StreamEvent::Close {
        let streams = &mut s.data_mut().grpc_streams;
        streams.retain(|t| t.token != a.token || !t.local_closed);
        // closed remotely and never by the guest (the SDKs do not close them): the
        // oldest are forgotten beyond a bound, or a long-lived root context would pile
        // them up
        let root = streams.iter().find(|t| t.token == a.token).map(|t| t.root);
        let kept = |t: &&super::host::StreamSlot| t.remote_closed && Some(t.root) == root;
        if streams.iter().filter(kept).count() > super::host::MAX_CLOSED_GRPC_STREAMS {
            if let Some(i) = streams.iter().position(|t| kept(&t)) {
                streams.remove(i);
            }
        }
    }
    r
}

/// Hands a callout's answer to the guest: `on_http_call_response` on context `ctx` (the
/// stream's or the root's), or for a gRPC call, as Envoy does, `on_grpc_receive` with the
/// message (status 0) or `on_grpc_close` with the status, on the root context (the SDKs
/// find the calling context by the token). The answer to a gRPC call the guest cancelled
/// is dropped unseen.
fn deliver_answer(
    s: &mut Store<Host>,
    f: &Exports,
    ctx: i32,
    a: &CallResponse,
) -> wasmtime::Result<()> {
    let token = a.token as i32;
    if let Some(ev) = a.stream {
        return deliver_stream_event(s, f, a, ev);
    }
    if a.foreign {
        // a state call's result (`wasmgate.kv.*`), read as CallData
        return f
            .on_foreign_function
            .get(s)
            .map_or(Ok(()), |g| g.call(s, (ctx, token, a.body.len() as i32)));
    }
    let Some(g) = &a.grpc else {
        let (nh, nb, nt) = if a.status == 0 {
            (0, 0, 0) // the connection was lost before an answer
        } else {
            (
                a.headers.len() as i32 + 1,
                a.body.len() as i32,
                a.trailers.len() as i32,
            )
        };
        return f
            .on_http_call_response
            .get(s)
            .map_or(Ok(()), |g| g.call(s, (ctx, token, nh, nb, nt)));
    };
    let tokens = &mut s.data_mut().grpc_tokens;
    let Some(i) = tokens.iter().position(|t| *t == a.token) else {
        return Ok(()); // cancelled
    };
    tokens.swap_remove(i);
    let (func, arg) = if g.code == 0 {
        (&f.on_grpc_receive, a.body.len() as i32)
    } else {
        (&f.on_grpc_close, g.code as i32)
    };
    func.get(s)
        .map_or(Ok(()), |g| g.call(s, (ROOT, token, arg)))
}

/// Which way a waiting stream is paused.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Response,
}

impl Phase {
    /// The phase a wait's view belongs to: the response's once its head or body is there.
    fn of(view: &View<'_>) -> Phase {
        let response_body = matches!(view.body, Some((BufferType::ResponseBody, _)));
        if view.resp.is_some() || response_body {
            Phase::Response
        } else {
            Phase::Request
        }
    }
}

/// What a callback that is not a stream callback (a callout's answer, a root event) asks
/// for: the guest resumes the stream with `proxy_continue_stream`, not a return value.
/// Only the paused direction resumes: as in Envoy, continuing the request while the
/// response is paused (or the other way round) does nothing.
fn resumed(r: Result<((), Effects), Failure>, phase: Phase) -> Outcome {
    match r {
        Err(e) => Outcome::Failed(e),
        Ok(((), fx)) => {
            let cont = match phase {
                Phase::Request => fx.continue_request,
                Phase::Response => fx.continue_response,
            };
            outcome(if cont { ACTION_CONTINUE } else { 1 }, fx)
        }
    }
}

fn outcome(action: i32, fx: Effects) -> Outcome {
    if let Some(l) = fx.local {
        Outcome::Respond(l)
    } else if !fx.calls.is_empty() {
        Outcome::Wait(fx.calls)
    } else if action == ACTION_CONTINUE {
        Outcome::Continue
    } else {
        Outcome::Pause
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.finished {
            let mut info = RequestInfo::default();
            self.finish(None, None, &mut info);
        }
        if let Some(vm) = self.vm.take() {
            self.plugin.give_back(vm);
        }
    }
}

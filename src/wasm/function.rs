//! Function backends: WASI-HTTP components with the tenancy filters have — a tenant and
//! a name, limits from the conf or the deploy, the tenant's log for their output, usage
//! metering, and outgoing HTTP only to their `allowed_upstreams`. The component runtime
//! itself is [`super::component`]; the proxy bridges a backend to Pingora's session.

use super::component::{self, Io, Limits, Outcome, Stdio};
use super::meter::{TenantLog, Usage};
use super::{FailurePolicy, ModuleError, Runtime, FUEL_PER_US};
use crate::upstream::{client, Upstream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A component as the conf or a deploy declares it.
pub struct FunctionSpec {
    pub name: String,
    pub tenant: String,
    pub limits: Limits,
    /// What a failure before the response head turns into.
    pub policy: FailurePolicy,
    /// Outgoing HTTP may reach these, addressed by name (`http://NAME/...`); the backend
    /// takes them over (see [`FunctionBackend::set_upstreams`]).
    pub allowed_upstreams: Vec<Arc<Upstream>>,
    /// The most response body bytes the function may send: a larger declared length is
    /// a failure (its policy answers), a stream past it is cut off.
    pub max_response_bytes: u64,
}

/// 64 MiB: a function's response body limit unless the conf says otherwise.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// A loaded function backend, ready to serve requests.
pub struct FunctionBackend {
    pub spec: FunctionSpec,
    pub function: Arc<component::Function>,
    /// Hex digest of the component's bytes.
    pub digest: String,
    wiring: Arc<Wiring>,
    /// The per-request wiring, made once: a request clones three `Arc`s.
    io: Io,
}

/// What a function's instances report to and reach through: the tenant's log and usage,
/// and the upstreams outgoing HTTP may reach. Not the backend itself, so the `Io` the
/// backend keeps does not keep the backend alive.
struct Wiring {
    tenant: String,
    name: String,
    log: Arc<TenantLog>,
    usage: Arc<Usage>,
    /// Re-pointed when a reload brings new upstreams.
    upstreams: arc_swap::ArcSwap<Vec<Arc<Upstream>>>,
    /// The gateway's state services (set when the server starts, maybe after this
    /// function was loaded) and this tenant's handle on them, made on first use.
    shared: Arc<super::SharedState>,
    kv: std::sync::OnceLock<crate::state::TenantState>,
}

impl FunctionBackend {
    /// The per-request wiring: output lines to the tenant's log, outgoing HTTP through
    /// the allow-list, what the instance used into usage, and the tenant's key-value
    /// namespace and secrets (as they are now).
    pub fn io(&self) -> Io {
        let mut io = self.io.clone();
        let w = &self.wiring;
        if let Some(s) = w.shared.services.get() {
            let kv =
                w.kv.get_or_init(|| s.store.tenant(&w.tenant, Some(w.usage.clone())));
            io.grants = component::Grants {
                state: Some(kv.clone()),
                config: s.secrets.cached(&w.tenant),
            };
        }
        io
    }

    /// Records a failure the proxy saw (not the instance): a line in the tenant's log and
    /// the gateway's, naming tenant, module and cause.
    pub fn report(&self, cause: &str) {
        let w = &self.wiring;
        w.log.push(&w.name, "error", cause);
        tracing::warn!(tenant = %w.tenant, module = %w.name, failure = %cause, "function failed");
    }

    /// Counts a request's body bytes from the client and to it.
    pub fn count_bytes(&self, bytes_in: u64, bytes_out: u64) {
        let u = &self.wiring.usage;
        u.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        u.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }

    /// Replaces the upstreams outgoing HTTP may reach (after a reload or a change of the
    /// tenant's allowed upstreams).
    pub fn set_upstreams(&self, upstreams: Vec<Arc<Upstream>>) {
        self.wiring.upstreams.store(Arc::new(upstreams));
    }
}

impl Wiring {
    fn io(self: &Arc<Self>) -> Io {
        let (log, allow, meter) = (self.clone(), self.clone(), self.clone());
        Io {
            sink: Arc::new(move |stream, line| log.line(stream, line)),
            outgoing: allow,
            grants: component::Grants::default(),
            on_end: Some(Arc::new(move |o: &Outcome| meter.bill(o))),
        }
    }

    fn line(&self, stream: Stdio, line: &str) {
        let level = match stream {
            Stdio::Stdout => "info",
            Stdio::Stderr => "warn",
        };
        self.log.push(&self.name, level, line);
        tracing::info!(target: "wasmgate::guest", tenant = %self.tenant, module = %self.name, "{line}");
    }

    fn bill(&self, o: &Outcome) {
        let u = &self.usage;
        u.invocations.fetch_add(1, Ordering::Relaxed);
        u.add_fuel((o.cpu.as_micros() as u64).saturating_mul(FUEL_PER_US));
        u.peak(o.peak_memory as u64);
        match &o.result {
            Err(component::Failure::Overrun) => {
                u.budget_overruns.fetch_add(1, Ordering::Relaxed);
            }
            Err(component::Failure::Trap(_) | component::Failure::Memory) => {
                u.traps.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let Err(f) = &o.result {
            self.log.push(&self.name, "error", &f.to_string());
            tracing::warn!(tenant = %self.tenant, module = %self.name, failure = %f, "function failed");
        }
    }
}

impl Runtime {
    /// The component runtime, started with the first component loaded (it runs an epoch
    /// ticker thread).
    fn components(&self) -> Result<&component::ComponentRuntime, ModuleError> {
        if let Some(c) = self.components.get() {
            return Ok(c);
        }
        let c = component::ComponentRuntime::with_compilers(
            component::CpuBudget::Epoch,
            self.compilers,
        )
        .map_err(ModuleError::DoesNotCompile)?;
        Ok(self.components.get_or_init(|| c))
    }

    /// Loads a function backend: compiles the component (or loads its precompiled
    /// artifact, keyed by digest and engine, from the cache directory).
    pub fn function(
        &self,
        mut spec: FunctionSpec,
        bytes: &[u8],
    ) -> Result<Arc<FunctionBackend>, ModuleError> {
        use sha2::{Digest, Sha256};
        let rt = self.components()?;
        let digest = hex::encode(Sha256::digest(bytes));
        let artifact = self.artifact_path(rt.engine(), &digest, "component.cwasm");
        let function = rt
            .compile_cached(bytes, spec.limits.clone(), artifact.as_deref())
            .map_err(ModuleError::NotProxyWasm)?;
        tracing::info!(tenant = %spec.tenant, module = %spec.name, digest = &digest[..12], export = function.handler_export(), tier = ?function.tier(), "function loaded");
        let wiring = Arc::new(Wiring {
            tenant: spec.tenant.clone(),
            name: spec.name.clone(),
            log: self.meter.log(&spec.tenant),
            usage: self.meter.usage(&spec.tenant, &spec.name),
            upstreams: arc_swap::ArcSwap::from_pointee(std::mem::take(&mut spec.allowed_upstreams)),
            shared: self.shared.clone(),
            kv: std::sync::OnceLock::new(),
        });
        Ok(Arc::new(FunctionBackend {
            io: wiring.io(),
            wiring,
            spec,
            function,
            digest,
        }))
    }
}

/// Outgoing HTTP of a function: only to its allowed upstreams, named by the authority
/// (`http://NAME/...`, any port ignored), through the gateway's upstream connection pool
/// and the upstream's timeouts (see [`crate::upstream::client`]). Each call counts in the
/// module's usage.
impl component::OutgoingPolicy for Wiring {
    fn send(
        &self,
        authority: &str,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
    ) -> component::SendFuture {
        let name = authority.split(':').next().unwrap_or(authority);
        let upstreams = self.upstreams.load();
        let Some(u) = upstreams.iter().find(|u| &*u.name == name).cloned() else {
            return component::denied(authority);
        };
        self.usage.http_callouts.fetch_add(1, Ordering::Relaxed);
        let o = options.unwrap_or_default();
        let deadlines = u.deadlines([
            o.connect_timeout,
            o.first_byte_timeout,
            o.between_bytes_timeout,
        ]);
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, pump) = client::send(&u, request, deadlines)
                .await
                .map_err(error_code)?;
            let response = response.map(|b| b.map_err(error_code).boxed_unsync());
            // on a task of its own: wasi-http aborts the work it is handed when the guest
            // drops the response, and the pump must outlive that to drain what the guest
            // left of the body and give the connection back to the pool
            tokio::spawn(pump);
            let done = async { Ok(()) };
            Ok((
                response,
                Box::new(done) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}

/// A failed call as the guest sees it (wasi:http's `error-code`).
fn error_code(e: client::CallError) -> wasmtime_wasi_http::Error {
    use client::CallError as C;
    use wasmtime_wasi_http::Error as E;
    match e {
        C::Unavailable => E::DestinationUnavailable,
        C::ConnectionRefused => E::ConnectionRefused,
        C::ConnectionTimeout => E::ConnectionTimeout,
        C::Tls => E::TlsProtocolError,
        C::ReadTimeout => E::ConnectionReadTimeout,
        C::WriteTimeout => E::ConnectionWriteTimeout,
        C::Terminated => E::ConnectionTerminated,
        C::BadRequest => E::HttpRequestUriInvalid,
        C::Body(m) | C::Protocol(m) => E::InternalError(Some(m)),
    }
}

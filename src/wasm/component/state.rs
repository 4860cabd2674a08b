//! What one instance's `Store` holds: the WASI context (capability-free), the wasi:http
//! context with wasmgate's outgoing-request hook, the resource table, and the memory cap.

use super::stdio::{LineSink, SinkStream, Stdio};
use http::uri::{Authority, Uri};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

/// Where a guest's outgoing requests go. `send` gets the authority the guest named (an
/// upstream name, `host[:port]`) and sends the request there, or fails it with
/// `HttpRequestDenied`. A closure resolving an authority to an [`Outgoing`] address is a
/// policy too: it sends over a connection of its own (wasi-http's default client, no
/// pool; what the unit tests use).
pub trait OutgoingPolicy: Send + Sync {
    fn send(
        &self,
        authority: &str,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> SendFuture;
}

impl<F: Fn(&str) -> Option<Outgoing> + Send + Sync> OutgoingPolicy for F {
    fn send(
        &self,
        authority: &str,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> SendFuture {
        match self(authority) {
            Some(target) => target.send(request, options),
            None => denied(authority),
        }
    }
}

/// What a policy answers a request it does not let through.
pub fn denied(authority: &str) -> SendFuture {
    tracing::debug!(%authority, "component: outgoing request denied");
    Box::new(async { Err(HttpError::HttpRequestDenied) })
}

/// Where an allowed outgoing request goes, and the longest it may wait: the upstream's own
/// timeouts, which a guest's `request-options` may shorten but not extend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// `host:port` to connect to.
    pub address: String,
    pub connect_timeout: Duration,
    /// For the response head, and between body frames.
    pub read_timeout: Duration,
}

impl Outgoing {
    /// `address` with default timeouts (5 s to connect, 60 s to read).
    pub fn to(address: impl Into<String>) -> Self {
        Outgoing {
            address: address.into(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
        }
    }

    /// The guest's options, each capped by this upstream's timeout.
    pub(super) fn options(&self, asked: Option<RequestOptions>) -> RequestOptions {
        let asked = asked.unwrap_or_default();
        let cap = |t: Option<Duration>, max: Duration| Some(t.map_or(max, |t| t.min(max)));
        RequestOptions {
            connect_timeout: cap(asked.connect_timeout, self.connect_timeout),
            first_byte_timeout: cap(asked.first_byte_timeout, self.read_timeout),
            between_bytes_timeout: cap(asked.between_bytes_timeout, self.read_timeout),
        }
    }

    /// Sends `request` to this address over a connection of its own; the Host header keeps
    /// the name the guest used.
    fn send(
        &self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> SendFuture {
        let mut parts = request.uri().clone().into_parts();
        match self.address.parse::<Authority>() {
            Ok(authority) => parts.authority = Some(authority),
            Err(_) => return Box::new(async { Err(HttpError::HttpRequestUriInvalid) }),
        }
        match Uri::from_parts(parts) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => return Box::new(async { Err(HttpError::HttpRequestUriInvalid) }),
        }
        let options = Some(self.options(options));
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// The policy of a function granted no outgoing HTTP at all.
pub struct DenyAll;

impl OutgoingPolicy for DenyAll {
    fn send(
        &self,
        authority: &str,
        _: http::Request<WasiBody>,
        _: Option<RequestOptions>,
    ) -> SendFuture {
        denied(authority)
    }
}

/// What a request of a function may reach besides HTTP: its tenant's key-value namespace
/// (`wasi:keyvalue`) and secrets (`wasi:config`). Nothing by default.
#[derive(Clone, Default)]
pub struct Grants {
    pub state: Option<crate::state::TenantState>,
    pub config: Option<Arc<std::collections::BTreeMap<String, String>>>,
}

/// The store data of one instance (one request, or consecutive requests when reused).
pub struct Host {
    wasi: WasiCtx,
    /// The handles the guest's stdout and stderr write to, re-pointed per request.
    stdout: SinkStream,
    stderr: SinkStream,
    http: WasiHttpCtx,
    pub(super) table: ResourceTable,
    pub(super) grants: Grants,
    /// Where host notes for the tenant go (as the guest's stderr lines do).
    pub(super) sink: LineSink,
    hooks: Hooks,
    pub(super) memory: MemoryCap,
    /// Epoch ticks charged to the guest so far (epoch budgets only).
    pub(super) ticks_charged: u64,
}

impl Host {
    pub fn new(
        max_memory: usize,
        sink: LineSink,
        policy: Arc<dyn OutgoingPolicy>,
        grants: Grants,
    ) -> Self {
        // Granted nothing by default: no env, args or preopened directories (the builder's
        // defaults), no sockets or name lookups; stdin is empty; clocks and random work.
        let stdout = SinkStream::new(Stdio::Stdout, sink.clone());
        let stderr = SinkStream::new(Stdio::Stderr, sink.clone());
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Host {
            wasi,
            stdout,
            stderr,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            grants,
            sink,
            hooks: Hooks { policy },
            memory: MemoryCap {
                max: max_memory,
                total: 0,
                peak: 0,
                refused: false,
            },
            ticks_charged: 0,
        }
    }
}

impl Host {
    /// Readies a reused instance for its next request: output to `sink`, outgoing HTTP by
    /// `policy`, state by `grants`, the CPU charge and the memory peak counted from here.
    pub fn rebind(&mut self, sink: LineSink, policy: Arc<dyn OutgoingPolicy>, grants: Grants) {
        self.grants = grants;
        self.stdout.rebind(sink.clone());
        self.stderr.rebind(sink.clone());
        self.sink = sink;
        self.hooks.policy = policy;
        self.ticks_charged = 0;
        self.memory.peak = self.memory.total;
        self.memory.refused = false;
    }

    /// Whether the last request's response side was released (the guest dropped its
    /// outparam, response and response body) and no outgoing call is still open: the
    /// condition for serving another request. A body the guest kept open would otherwise
    /// never end for its client while the instance waits for its next request. The
    /// incoming request may stay (StarlingMonkey keeps it until its GC runs), and so may
    /// what a runtime opens once and keeps (its stdout handle).
    pub fn is_clean(&mut self) -> bool {
        use wasmtime_wasi_http::p2::{body, types};
        !self.table.iter_mut().any(|entry| {
            entry.is::<types::HostResponseOutparam>()
                || entry.is::<types::HostOutgoingResponse>()
                || entry.is::<body::HostOutgoingBody>()
                || entry.is::<types::HostOutgoingRequest>()
                || entry.is::<types::HostFutureIncomingResponse>()
        })
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Caps the linear memory of one instance (all its memories together) and remembers the
/// peak and whether a growth was refused, so a trap after a refusal reads as `Memory`.
pub struct MemoryCap {
    pub max: usize,
    /// Bytes of all memories now.
    pub total: usize,
    pub peak: usize,
    pub refused: bool,
}

/// Table elements one instance may grow its tables to (StarlingMonkey's tables are large).
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.max {
            self.refused = true;
            return Ok(false);
        }
        self.total = total;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// wasmgate's wasi:http hooks: outgoing requests go only where the policy says.
struct Hooks {
    policy: Arc<dyn OutgoingPolicy>,
}

/// What sending an outgoing request gives the guest: the response head with its body, and
/// the work that moves the body (run beside it), or why it failed.
pub type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

pub type SendFuture = Box<dyn Future<Output = SendResult> + Send>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let asked = request
            .uri()
            .authority()
            .map(Authority::as_str)
            .unwrap_or_default();
        let asked = asked.to_string();
        self.policy.send(&asked, request, options)
    }
}

//! The host side of the Proxy-Wasm v0.2.1 ABI: every `env.proxy_*` import, one file per
//! capability, as proxy-wasm-cpp-host splits its exports and wasi-http its interfaces.
//!
//! Each host call decodes its words (guest pointers and lengths, through [`call`]) and
//! acts on the VM's [`Host`]: the request state the proxy lent for this callback
//! ([`frame`], the only unsafe code here), what the guest asks of the proxy
//! ([`Effects`]), and the plugin's shared state. Every call is charged fuel before it
//! runs, and answers a status, never a host crash.

/// Links host functions under their ABI names: `link!(l, get_property, …)` links
/// `env.proxy_get_property` to the function `get_property` of the capability's file.
macro_rules! link {
    ($l:expr, $($f:ident),+ $(,)?) => {{
        $($l.func_wrap("env", concat!("proxy_", stringify!($f)), $f)?;)+
        Ok(())
    }};
}

mod buffers;
mod call;
mod callouts;
mod frame;
mod grpc;
mod headers;
pub mod kv;
mod log_time;
mod metrics;
mod properties;
mod shared;
mod stream;
mod unsupported;
pub(crate) mod wasi;

pub(crate) use call::{charge, charge_fuel};
pub use frame::View;
pub(crate) use frame::{with_frame, Frame};
pub(crate) use log_time::guest_log;
pub use properties::response_head_bytes;

use super::{Plugin, FUEL_PER_US};
use crate::upstream::Upstream;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{Linker, Memory, StoreLimits, TypedFunc};

/// Store data of one VM.
pub struct Host {
    pub(crate) limits: StoreLimits,
    pub(crate) plugin: Arc<Plugin>,
    /// The plugin configuration this VM was configured with (secrets substituted).
    pub(crate) config: Arc<Vec<u8>>,
    /// The plugin's `config_gen` when this VM took `config`.
    pub(crate) config_gen: u64,
    pub(crate) frame: Frame,
    pub(crate) effects: Effects,
    pub(crate) memory: Option<Memory>,
    pub(crate) alloc: Option<TypedFunc<i32, i32>>,
    /// Set when a host call ran out of fuel, so the trap is reported as an overrun.
    pub(crate) out_of_fuel: bool,
    /// gRPC calls of the current request not yet answered or cancelled: an answer whose
    /// token is no longer here was cancelled and is dropped (`proxy_grpc_cancel`).
    pub(crate) grpc_tokens: Vec<u32>,
    /// gRPC streams of the current HTTP context (`proxy_grpc_stream`) not yet closed on
    /// both sides nor cancelled: an event whose token is no longer here is dropped unseen.
    pub(crate) grpc_streams: Vec<StreamSlot>,
    /// Events of streams opened since the proxy last took them (see
    /// [`super::Lease::take_stream_events`]).
    pub(crate) stream_events: Vec<StreamEvents>,
    /// Events of the root context's streams, delivered while the VM is idle (see
    /// `Plugin::answer_root`).
    pub(crate) root_stream_events: Vec<StreamEvents>,
    /// The HTTP context of the request holding this VM (0 when it is idle).
    pub(crate) http_ctx: i32,
    /// The context the guest acts for (`proxy_set_effective_context`): the root context
    /// in root callbacks, the HTTP context in stream callbacks.
    pub(crate) effective: i32,
    /// The request's frame while the root context is effective: a root callback reaches
    /// the paused request's headers only after switching to its context, as in Envoy.
    pub(crate) parked: Frame,
    /// The module is a Proxy-Wasm v0.1.0 one (a missing header reads as empty, Ok).
    pub(crate) abi01: bool,
    /// The root context answered `on_done` with false and waits for `proxy_done`.
    pub(crate) awaiting_done: bool,
    /// The guest asked for random bytes (`random_get`): its start cannot be snapshotted,
    /// or every instance started from the snapshot would share them.
    pub(crate) read_random: bool,
}

/// The root context's id: the first context every VM creates.
pub(crate) const ROOT_CONTEXT: i32 = 1;

/// What the guest asked for during a callback, read by the proxy afterwards.
#[derive(Default)]
pub(crate) struct Effects {
    pub local: Option<LocalResponse>,
    pub local_too_large: bool,
    pub calls: Vec<PendingCall>,
    pub continue_request: bool,
    pub continue_response: bool,
    pub next_token: u32,
}

impl Effects {
    /// Queues a call (an HTTP callout or a state call) for the proxy to make when the
    /// callback returns, made by `call` with its new token; at most
    /// [`callouts::MAX_CALLS_PER_CALLBACK`] per callback.
    pub(crate) fn queue(
        &mut self,
        call: impl FnOnce(u32) -> PendingCall,
    ) -> crate::wasm::abi::HostResult<u32> {
        if self.calls.len() >= callouts::MAX_CALLS_PER_CALLBACK {
            return Err(crate::wasm::abi::Status::InternalFailure);
        }
        self.next_token = self.next_token.wrapping_add(1).max(1);
        let token = self.next_token;
        self.calls.push(call(token));
        Ok(token)
    }
}

/// Facts about the request that are not in its headers.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// Unique per process; shown to guests as 16 hex digits.
    pub id: u64,
    pub scheme: &'static str,
    pub protocol: &'static str,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
    pub response_code: u16,
    /// Properties set by guests (`proxy_set_property`), visible to later hooks.
    pub props: Vec<(Vec<u8>, Vec<u8>)>,
    /// When the request arrived (`request.time`, `request.duration`).
    pub start: Option<std::time::SystemTime>,
    /// The client connection's id, unique in this process (`connection.id`); 0: unknown.
    pub connection_id: u64,
    /// The client connection's TLS session, when it is TLS.
    pub tls: Option<Arc<ConnTls>>,
    /// Request body bytes received so far (`request.size` without a Content-Length).
    pub request_body_bytes: u64,
    /// The upstream target the request went to, once chosen (`upstream.address`).
    pub upstream_address: Option<SocketAddr>,
    /// Why the response is what it is (`response.code_details`): `via_upstream`, a
    /// guest's local reply details, or the gateway's error code.
    pub code_details: Option<std::borrow::Cow<'static, str>>,
    /// Envoy's response flags bit vector (`response.flags`).
    pub response_flags: u64,
    /// Response body bytes sent to the client (`response.size`), known in `on_log`.
    pub response_body_bytes: u64,
    /// Bytes of the response head sent, known in `on_log` (`response.total_size`).
    pub response_header_bytes: Option<u64>,
}

/// What the TLS handshake of a client connection settled.
#[derive(Debug, Clone, Default)]
pub struct ConnTls {
    /// `TLSv1.2`, `TLSv1.3`.
    pub version: String,
    /// The server name the client asked for (SNI), if any.
    pub sni: Option<String>,
    /// Whether the client presented a certificate.
    pub peer_cert: bool,
    /// The first URI SAN of the client's certificate.
    pub uri_san: Option<String>,
}

/// This gateway as Envoy's `node` property describes a proxy: an id, a cluster and
/// string metadata, from the conf's `[node]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl NodeInfo {
    /// The `envoy.config.core.v3.Node` message with its `id` (1), `cluster` (2) and
    /// `metadata` (3, a `google.protobuf.Struct` of string values), protobuf-encoded as
    /// Envoy hands it to a guest that reads `node` whole.
    pub fn to_protobuf(&self) -> Vec<u8> {
        fn varint(out: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        fn field(out: &mut Vec<u8>, n: u64, bytes: &[u8]) {
            varint(out, n << 3 | 2);
            varint(out, bytes.len() as u64);
            out.extend_from_slice(bytes);
        }
        let mut out = Vec::new();
        if !self.id.is_empty() {
            field(&mut out, 1, self.id.as_bytes());
        }
        if !self.cluster.is_empty() {
            field(&mut out, 2, self.cluster.as_bytes());
        }
        if !self.metadata.is_empty() {
            let mut fields = Vec::new();
            for (k, v) in &self.metadata {
                let mut value = Vec::new();
                field(&mut value, 3, v.as_bytes()); // Value.string_value
                let mut entry = Vec::new();
                field(&mut entry, 1, k.as_bytes());
                field(&mut entry, 2, &value);
                field(&mut fields, 1, &entry); // Struct.fields
            }
            field(&mut out, 3, &fields);
        }
        out
    }
}

/// An answer a guest produced instead of (or in place of) the upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub grpc_status: i32,
}

/// A `proxy_http_call` waiting to be made by the proxy.
#[derive(Clone)]
pub struct PendingCall {
    pub token: u32,
    /// Where an HTTP or gRPC callout goes (none for a state call).
    pub upstream: Option<Arc<Upstream>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
    /// Made by the root context: its answer goes to the root's callback, not the stream's.
    pub root: bool,
    /// Set for a `proxy_grpc_call`: `headers` are then its initial metadata and `body` its
    /// message.
    pub grpc: Option<GrpcTarget>,
    /// Set for a `wasmgate.kv.*` foreign function: the state call to make; its answer
    /// comes back through `proxy_on_foreign_function`.
    pub store: Option<kv::StoreCall>,
}

/// Where a `proxy_grpc_call` goes, besides its upstream.
#[derive(Debug, Clone)]
pub struct GrpcTarget {
    pub service: String,
    pub method: String,
    /// `:authority` of the call: the upstream's name, as Envoy sends the cluster's.
    pub authority: String,
}

/// Most gRPC streams one context (an HTTP context, or the root context) may have open
/// (not closed remotely) at once, as callouts per callback.
pub const MAX_GRPC_STREAMS: usize = 8;
/// Streams closed remotely but not by the guest a context remembers (`proxy_grpc_close`
/// on them is `Ok`, as in Envoy); beyond this the oldest are forgotten (`NotFound`).
pub const MAX_CLOSED_GRPC_STREAMS: usize = 32;
/// Longest a gRPC stream lives: then it is reset and closes with DEADLINE_EXCEEDED.
pub const GRPC_STREAM_LIFETIME: Duration = Duration::from_secs(60);
/// Largest message a guest may send on a gRPC stream, and that a stream may receive.
pub const MAX_GRPC_MESSAGE: usize = 1 << 20;
/// Stream events queued before the stream stops reading (HTTP/2 flow control then holds
/// the upstream back) until the guest takes them.
pub const GRPC_STREAM_QUEUE: usize = 16;

/// What the guest asks of an open gRPC stream; dropping the sender resets the stream.
#[derive(Debug)]
pub enum StreamCmd {
    /// One message (the stream frames it); `true` half-closes after it.
    Send(bytes::Bytes, bool),
    /// Half-closes (`proxy_grpc_close`).
    Close,
}

/// What a gRPC stream's event is (delivered as a [`CallResponse`] with this set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// `headers` are the initial metadata.
    InitialMetadata,
    /// `body` is one message.
    Message,
    /// `trailers` are the trailing metadata.
    TrailingMetadata,
    /// The stream ended with the status in `grpc`; nothing follows.
    Close,
}

/// The events of one open stream, in order.
pub type StreamEvents = futures::channel::mpsc::Receiver<CallResponse>;

/// One open gRPC stream, as the guest's context sees it.
pub(crate) struct StreamSlot {
    pub token: u32,
    /// Opened by the root context: it outlives the requests.
    pub root: bool,
    pub cmds: tokio::sync::mpsc::UnboundedSender<StreamCmd>,
    /// `proxy_grpc_close` was called: the slot goes once the remote side closes too.
    pub local_closed: bool,
    /// The stream closed remotely (`proxy_on_grpc_close` was delivered): the slot goes once
    /// the guest closes it too, as in Envoy; sends until then are dropped.
    pub remote_closed: bool,
}

/// How a gRPC callout ended (`proxy_get_status` in its callback).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcStatus {
    pub code: u32,
    pub message: Vec<u8>,
}

impl GrpcStatus {
    pub fn new(code: u32, message: &str) -> GrpcStatus {
        GrpcStatus {
            code,
            message: message.as_bytes().to_vec(),
        }
    }
}

impl PendingCall {
    /// An HTTP callout to `upstream` (a gRPC call once `grpc` is set); the token is set
    /// when it is queued.
    pub fn to(
        upstream: Arc<Upstream>,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        timeout: Duration,
        root: bool,
    ) -> PendingCall {
        PendingCall {
            token: 0,
            upstream: Some(upstream),
            headers,
            body,
            timeout,
            root,
            grpc: None,
            store: None,
        }
    }

    /// The callout's upstream name, for logs ("" for a state call).
    pub fn upstream_name(&self) -> &str {
        self.upstream.as_ref().map_or("", |u| &u.name)
    }

    /// A peer of the callout's upstream, if it has a healthy one.
    pub fn peer(&self) -> Option<Box<pingora::upstreams::peer::HttpPeer>> {
        self.upstream.as_ref().and_then(|u| u.peer(b""))
    }
}

impl std::fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.upstream {
            Some(u) => write!(f, "PendingCall({} to {})", self.token, u.name),
            None => write!(f, "PendingCall({} to the state store)", self.token),
        }
    }
}

/// A callout's timeout when the guest passes 0.
pub const DEFAULT_CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to a `proxy_http_call`; `status == 0` means the connection was lost before a
/// response (the guest sees no headers).
#[derive(Debug, Default, Clone)]
pub struct CallResponse {
    pub token: u32,
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Set for the answer to a `proxy_grpc_call`: its status; `body` is then the message,
    /// `headers` and `trailers` the initial and trailing metadata.
    pub grpc: Option<GrpcStatus>,
    /// The call was the root context's (see [`PendingCall::root`]).
    pub root: bool,
    /// Set for an event of a gRPC stream (`proxy_grpc_stream`): which one it is.
    pub stream: Option<StreamEvent>,
    /// The answer to a `wasmgate.kv.*` call: `body` is its JSON result, read as
    /// `CallData` in `proxy_on_foreign_function`.
    pub foreign: bool,
}

/// A metric a guest defined with `proxy_define_metric`.
pub(crate) enum GuestMetric {
    Counter(prometheus::IntCounter),
    Gauge(prometheus::IntGauge),
    /// Histogram samples are counted and summed (exported as counters).
    Histogram(prometheus::IntCounter, prometheus::IntCounter),
}

/// Registers every `env.proxy_*` host function, and WASI preview 1.
pub(crate) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    log_time::add_to_linker(l)?;
    buffers::add_to_linker(l)?;
    headers::add_to_linker(l)?;
    properties::add_to_linker(l)?;
    stream::add_to_linker(l)?;
    callouts::add_to_linker(l)?;
    grpc::add_to_linker(l)?;
    shared::add_to_linker(l)?;
    metrics::add_to_linker(l)?;
    unsupported::add_to_linker(l)?;
    Ok(())
}

/// Fuel for a budget.
pub(crate) fn fuel_for(budget: Duration) -> u64 {
    (budget.as_micros() as u64).saturating_mul(FUEL_PER_US)
}

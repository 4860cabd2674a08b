//! The host side of the Proxy-Wasm v0.2.1 ABI: every `env.proxy_*` import.
//!
//! During one callback the [`Frame`] points at the request's header maps and bodies,
//! which the proxy owns; host functions read and change them in place, so a guest that
//! reads one header costs no copies. Guest pointers and lengths are checked against the
//! guest's memory before any access ([`abi::guest_range`]); an invalid one gets the ABI's
//! status code, never a host crash.

use super::abi::{self, BufferType, HostResult, MapType, Status};
use super::{
    Plugin, TenantQuota, FUEL_PER_US, HOST_CALL_FUEL, LOG_LINE_FUEL, MAX_LOCAL_RESPONSE_BYTES,
    MAX_QUEUE_NAME_BYTES, SHARED_ENTRY_OVERHEAD,
};
use crate::upstream::Upstream;
use dashmap::mapref::entry::Entry;
use http::header::HeaderMap;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use std::net::SocketAddr;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{Caller, Extern, Linker, Memory, StoreLimits, TypedFunc};

/// Store data of one VM.
pub struct Host {
    pub(crate) limits: StoreLimits,
    pub(crate) plugin: Arc<Plugin>,
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
}

/// The root context's id: the first context every VM creates.
pub(crate) const ROOT_CONTEXT: i32 = 1;

/// Pointers into the proxy's request state, valid for exactly one callback.
///
/// Set by [`super::Lease`] from `&mut` borrows that outlive the call and cleared when the
/// call returns; nothing keeps them beyond that, so no dangling access is possible.
#[derive(Default)]
pub(crate) struct Frame {
    pub req: Option<NonNull<RequestHeader>>,
    pub req_writable: bool,
    pub resp: Option<NonNull<ResponseHeader>>,
    pub resp_writable: bool,
    pub resp_trailers: Option<NonNull<HeaderMap>>,
    pub body: Option<(BufferType, NonNull<Vec<u8>>)>,
    pub info: Option<NonNull<RequestInfo>>,
    pub call: Option<NonNull<CallResponse>>,
}

// SAFETY: the pointers are only dereferenced on the thread running the callback, while
// the borrows they were made from are alive (see `Frame`'s doc).
unsafe impl Send for Frame {}
unsafe impl Sync for Frame {}

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
    pub upstream: Arc<Upstream>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
    /// Made by the root context: its answer goes to the root's callback, not the stream's.
    pub root: bool,
    /// Set for a `proxy_grpc_call`: `headers` are then its initial metadata and `body` its
    /// message.
    pub grpc: Option<GrpcTarget>,
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

impl std::fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingCall({} to {})", self.token, self.upstream.name)
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
}

/// A metric a guest defined with `proxy_define_metric`.
pub(crate) enum GuestMetric {
    Counter(prometheus::IntCounter),
    Gauge(prometheus::IntGauge),
    /// Histogram samples are counted and summed (exported as counters).
    Histogram(prometheus::IntCounter, prometheus::IntCounter),
}

type C<'a> = Caller<'a, Host>;

/// Charges the fixed fuel cost of a host call (bytes copied are charged by `read` and
/// `give`); fails the call when the budget is gone.
pub(crate) fn charge(c: &mut C) -> wasmtime::Result<()> {
    charge_fuel(c, HOST_CALL_FUEL)
}

/// Charges `cost` fuel up front, before the work it pays for is done: a call the budget
/// cannot pay for fails as an overrun without doing it.
pub(crate) fn charge_fuel(c: &mut C, cost: u64) -> wasmtime::Result<()> {
    let left = c.get_fuel()?;
    if left < cost {
        c.data_mut().out_of_fuel = true;
        let _ = c.set_fuel(0);
        wasmtime::bail!("budget exhausted in a host call");
    }
    c.set_fuel(left - cost)?;
    Ok(())
}

fn memory(c: &mut C) -> HostResult<Memory> {
    match c.data().memory {
        Some(m) => Ok(m),
        None => match c.get_export("memory") {
            Some(Extern::Memory(m)) => Ok(m),
            _ => Err(Status::InternalFailure),
        },
    }
}

/// Copies `[ptr, ptr+len)` out of guest memory, charging fuel for the bytes copied.
fn read(c: &mut C, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let m = memory(c)?;
    let data = m.data(&*c);
    let r = abi::guest_range(data.len(), ptr, len)?;
    let out = data[r].to_vec();
    charge_bytes(c, out.len());
    Ok(out)
}

/// Charges for copied bytes. Running dry leaves the guest with no fuel, so it traps as
/// an overrun on its next instruction.
fn charge_bytes(c: &mut C, bytes: usize) {
    let cost = (bytes as u64) / 8;
    let left = c.get_fuel().unwrap_or(0);
    if left <= cost {
        c.data_mut().out_of_fuel = true;
    }
    let _ = c.set_fuel(left.saturating_sub(cost));
}

fn write_u32(c: &mut C, ptr: i32, v: u32) -> HostResult {
    let m = memory(c)?;
    let data = m.data_mut(&mut *c);
    let r = abi::guest_range(data.len(), ptr, 4)?;
    data[r].copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn write_u64(c: &mut C, ptr: i32, v: u64) -> HostResult {
    let m = memory(c)?;
    let data = m.data_mut(&mut *c);
    let r = abi::guest_range(data.len(), ptr, 8)?;
    data[r].copy_from_slice(&v.to_le_bytes());
    Ok(())
}

/// Copies `bytes` into memory the guest allocates, and writes its address and size to
/// the guest's return pointers.
fn give(c: &mut C, bytes: &[u8], ret_ptr: i32, ret_len: i32) -> wasmtime::Result<HostResult> {
    charge_bytes(c, bytes.len());
    // Check the return slots before allocating so a bad pointer does not leak guest memory.
    {
        let m = match memory(c) {
            Ok(m) => m,
            Err(s) => return Ok(Err(s)),
        };
        let len = m.data_size(&*c);
        if abi::guest_range(len, ret_ptr, 4).is_err() || abi::guest_range(len, ret_len, 4).is_err()
        {
            return Ok(Err(Status::InvalidMemoryAccess));
        }
    }
    let addr = if bytes.is_empty() {
        0
    } else {
        let Some(alloc) = c.data().alloc.clone() else {
            return Ok(Err(Status::InternalFailure));
        };
        let p = alloc.call(&mut *c, bytes.len() as i32)?;
        if p == 0 {
            return Ok(Err(Status::InternalFailure));
        }
        let m = memory(c).map_err(|_| wasmtime::format_err!("memory vanished"))?;
        let data = m.data_mut(&mut *c);
        match abi::guest_range(data.len(), p, bytes.len() as i32) {
            Ok(r) => data[r].copy_from_slice(bytes),
            Err(s) => return Ok(Err(s)),
        }
        p
    };
    Ok(write_u32(c, ret_ptr, addr as u32).and_then(|_| write_u32(c, ret_len, bytes.len() as u32)))
}

fn frame_req<'a>(c: &C) -> HostResult<&'a RequestHeader> {
    // SAFETY: see `Frame`.
    c.data()
        .frame
        .req
        .map(|p| unsafe { &*p.as_ptr() })
        .ok_or(Status::NotFound)
}

fn frame_req_mut<'a>(c: &C) -> HostResult<&'a mut RequestHeader> {
    let f = &c.data().frame;
    match f.req {
        // SAFETY: see `Frame`; writable only when the proxy lent it mutably.
        Some(p) if f.req_writable => Ok(unsafe { &mut *p.as_ptr() }),
        Some(_) => Err(Status::BadArgument),
        None => Err(Status::NotFound),
    }
}

fn frame_resp<'a>(c: &C) -> HostResult<&'a ResponseHeader> {
    // SAFETY: see `Frame`.
    c.data()
        .frame
        .resp
        .map(|p| unsafe { &*p.as_ptr() })
        .ok_or(Status::NotFound)
}

fn frame_resp_mut<'a>(c: &C) -> HostResult<&'a mut ResponseHeader> {
    let f = &c.data().frame;
    match f.resp {
        // SAFETY: see `Frame`; writable only when the proxy lent it mutably.
        Some(p) if f.resp_writable => Ok(unsafe { &mut *p.as_ptr() }),
        Some(_) => Err(Status::BadArgument),
        None => Err(Status::NotFound),
    }
}

fn frame_info<'a>(c: &C) -> Option<&'a mut RequestInfo> {
    // SAFETY: see `Frame`.
    c.data().frame.info.map(|p| unsafe { &mut *p.as_ptr() })
}

fn frame_call<'a>(c: &C) -> HostResult<&'a CallResponse> {
    // SAFETY: see `Frame`.
    c.data()
        .frame
        .call
        .map(|p| unsafe { &*p.as_ptr() })
        .ok_or(Status::NotFound)
}

/// The answer being delivered, if it is an HTTP callout's.
fn frame_http_call<'a>(c: &C) -> HostResult<&'a CallResponse> {
    frame_call(c).and_then(|r| match r.grpc {
        None => Ok(r),
        Some(_) => Err(Status::NotFound),
    })
}

/// The answer being delivered, if it is a gRPC callout's.
fn frame_grpc_call<'a>(c: &C) -> HostResult<(&'a CallResponse, &'a GrpcStatus)> {
    frame_call(c).and_then(|r| match &r.grpc {
        Some(g) => Ok((r, g)),
        None => Err(Status::NotFound),
    })
}

fn host_header(req: &RequestHeader) -> &[u8] {
    req.headers
        .get(http::header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or(b"")
}

/// All pairs of a map, pseudo-headers first, as the guest sees them.
fn map_pairs(c: &C, t: MapType) -> HostResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let push_map = |out: &mut Vec<(Vec<u8>, Vec<u8>)>, m: &HeaderMap| {
        for (k, v) in m {
            out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
    };
    match t {
        MapType::RequestHeaders => {
            let r = frame_req(c)?;
            let scheme = frame_info(c).map(|i| i.scheme).unwrap_or("http");
            out.push((b":method".to_vec(), r.method.as_str().as_bytes().to_vec()));
            out.push((b":path".to_vec(), path_and_query(r).as_bytes().to_vec()));
            out.push((b":authority".to_vec(), host_header(r).to_vec()));
            out.push((b":scheme".to_vec(), scheme.as_bytes().to_vec()));
            // as in Envoy, HTTP/1's Host is `:authority` and only that
            for (k, v) in &r.headers {
                if k != http::header::HOST {
                    out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
                }
            }
        }
        MapType::ResponseHeaders => {
            let r = frame_resp(c)?;
            out.push((b":status".to_vec(), r.status.as_str().as_bytes().to_vec()));
            push_map(&mut out, &r.headers);
        }
        MapType::ResponseTrailers => {
            // SAFETY: see `Frame`.
            let t = c
                .data()
                .frame
                .resp_trailers
                .map(|p| unsafe { &*p.as_ptr() });
            push_map(&mut out, t.ok_or(Status::NotFound)?);
        }
        MapType::RequestTrailers => return Err(Status::NotFound),
        MapType::GrpcReceiveInitialMetadata | MapType::GrpcReceiveTrailingMetadata => {
            let (call, _) = frame_grpc_call(c)?;
            let src = if t == MapType::GrpcReceiveInitialMetadata {
                &call.headers
            } else {
                &call.trailers
            };
            for (k, v) in src {
                out.push((k.as_bytes().to_vec(), v.clone()));
            }
        }
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => {
            let call = frame_http_call(c)?;
            if t == MapType::HttpCallResponseHeaders {
                out.push((b":status".to_vec(), call.status.to_string().into_bytes()));
            }
            let src = if t == MapType::HttpCallResponseHeaders {
                &call.headers
            } else {
                &call.trailers
            };
            for (k, v) in src {
                out.push((k.as_bytes().to_vec(), v.clone()));
            }
        }
    }
    Ok(out)
}

fn path_and_query(r: &RequestHeader) -> &str {
    r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

fn map_get(c: &C, t: MapType, key: &[u8]) -> HostResult<Vec<u8>> {
    match t {
        MapType::RequestHeaders => {
            let r = frame_req(c)?;
            match key {
                b":path" => return Ok(path_and_query(r).as_bytes().to_vec()),
                b":method" => return Ok(r.method.as_str().as_bytes().to_vec()),
                b":authority" | b"host" => return Ok(host_header(r).to_vec()),
                b":scheme" => {
                    return Ok(frame_info(c)
                        .map(|i| i.scheme)
                        .unwrap_or("http")
                        .as_bytes()
                        .to_vec())
                }
                _ => {}
            }
            let v = r.headers.get(header_name(key)?).ok_or(Status::NotFound)?;
            Ok(v.as_bytes().to_vec())
        }
        MapType::ResponseHeaders => {
            let r = frame_resp(c)?;
            if key == b":status" {
                return Ok(r.status.as_str().as_bytes().to_vec());
            }
            let v = r.headers.get(header_name(key)?).ok_or(Status::NotFound)?;
            Ok(v.as_bytes().to_vec())
        }
        _ => map_pairs(c, t)?
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
            .ok_or(Status::NotFound),
    }
}

fn header_name(key: &[u8]) -> HostResult<HeaderName> {
    HeaderName::from_bytes(key).map_err(|_| Status::BadArgument)
}

fn header_value(v: &[u8]) -> HostResult<HeaderValue> {
    HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Replace,
    Remove,
}

/// Applies one header change to the map the frame lends mutably.
fn map_change(c: &C, t: MapType, key: &[u8], value: &[u8], op: Op) -> HostResult {
    match t {
        MapType::RequestHeaders => {
            let r = frame_req_mut(c)?;
            if key.first() == Some(&b':') {
                return set_request_pseudo(r, key, value, op);
            }
            let n = header_name(key)?;
            match op {
                Op::Remove => {
                    r.remove_header(&n);
                }
                Op::Replace => r
                    .insert_header(n, header_value(value)?)
                    .map_err(|_| Status::BadArgument)?,
                Op::Add => {
                    r.append_header(n, header_value(value)?)
                        .map_err(|_| Status::BadArgument)?;
                }
            }
            Ok(())
        }
        MapType::ResponseHeaders => {
            let r = frame_resp_mut(c)?;
            if key == b":status" {
                let s = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or(Status::BadArgument)?;
                return r.set_status(s).map_err(|_| Status::BadArgument);
            }
            let n = header_name(key)?;
            match op {
                Op::Remove => {
                    r.remove_header(&n);
                }
                Op::Replace => r
                    .insert_header(n, header_value(value)?)
                    .map_err(|_| Status::BadArgument)?,
                Op::Add => {
                    r.append_header(n, header_value(value)?)
                        .map_err(|_| Status::BadArgument)?;
                }
            }
            Ok(())
        }
        MapType::ResponseTrailers => {
            // SAFETY: see `Frame`.
            let m = c
                .data()
                .frame
                .resp_trailers
                .map(|p| unsafe { &mut *p.as_ptr() })
                .ok_or(Status::NotFound)?;
            let n = header_name(key)?;
            match op {
                Op::Remove => {
                    m.remove(&n);
                }
                Op::Replace => {
                    m.insert(n, header_value(value)?);
                }
                Op::Add => {
                    m.append(n, header_value(value)?);
                }
            }
            Ok(())
        }
        _ => Err(Status::BadArgument), // read-only maps
    }
}

fn set_request_pseudo(r: &mut RequestHeader, key: &[u8], value: &[u8], op: Op) -> HostResult {
    if op == Op::Remove {
        return Err(Status::BadArgument);
    }
    match key {
        b":path" => {
            let uri = http::Uri::try_from(value).map_err(|_| Status::BadArgument)?;
            if uri.scheme().is_some() || !value.starts_with(b"/") {
                return Err(Status::BadArgument);
            }
            r.set_uri(uri);
            Ok(())
        }
        b":method" => {
            let m = http::Method::from_bytes(value).map_err(|_| Status::BadArgument)?;
            r.set_method(m);
            Ok(())
        }
        b":authority" => r
            .insert_header(http::header::HOST, header_value(value)?)
            .map_err(|_| Status::BadArgument),
        // the scheme is the connection's; setting it to what it is already is accepted
        b":scheme" => Ok(()),
        _ => Err(Status::BadArgument),
    }
}

fn property(c: &C, path: &[u8]) -> HostResult<Vec<u8>> {
    let plugin = &c.data().plugin;
    let info = frame_info(c);
    if let Some(i) = &info {
        if let Some((_, v)) = i.props.iter().find(|(k, _)| k == path) {
            return Ok(v.clone());
        }
    }
    let ri: Option<&RequestInfo> = frame_info(c).map(|i| &*i);
    let parts = abi::property_path(path);
    let s = |v: &str| Ok(v.as_bytes().to_vec());
    let int = |v: i64| Ok(v.to_le_bytes().to_vec());
    match parts.as_slice() {
        [b"plugin_name"] => s(&plugin.spec.name),
        [b"plugin_root_id"] => s(&plugin.spec.root_id),
        [b"plugin_vm_id"] | [b"tenant"] => s(&plugin.spec.tenant),
        [b"request", b"headers", name] => {
            // one header's value (Envoy's `request.headers['name']`)
            let pairs = map_pairs(c, MapType::RequestHeaders)?;
            pairs
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .ok_or(Status::NotFound)
        }
        [b"request", b"time"] => {
            // nanoseconds since the Unix epoch, as Envoy's timestamps reach guests
            let t = info.and_then(|i| i.start).ok_or(Status::NotFound)?;
            let ns = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| Status::NotFound)?
                .as_nanos();
            int(ns as i64)
        }
        [b"request", b"duration"] => {
            let t = info.and_then(|i| i.start).ok_or(Status::NotFound)?;
            int(t.elapsed().unwrap_or_default().as_nanos() as i64)
        }
        [b"request", b"size"] => {
            // as Envoy: the declared length when there is one, else the bytes received
            let declared = frame_req(c)
                .ok()
                .and_then(|r| r.headers.get(http::header::CONTENT_LENGTH));
            match declared {
                Some(v) => int(std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .ok_or(Status::NotFound)?),
                None => int(ri.map_or(0, |i| i.request_body_bytes) as i64),
            }
        }
        [b"request", b"total_size"] => {
            // body bytes received plus the head's names and values (Envoy's byteSize)
            let head: usize = map_pairs(c, MapType::RequestHeaders)
                .map(|p| p.iter().map(|(k, v)| k.len() + v.len()).sum())
                .unwrap_or(0);
            int((ri.map_or(0, |i| i.request_body_bytes) + head as u64) as i64)
        }
        [b"connection", b"id"] | [b"connection_id"] => {
            let id = ri.map_or(0, |i| i.connection_id);
            if id == 0 {
                return Err(Status::NotFound);
            }
            Ok(id.to_le_bytes().to_vec())
        }
        [b"connection", b"mtls"] => Ok(vec![ri
            .and_then(|i| i.tls.as_ref())
            .is_some_and(|t| t.peer_cert) as u8]),
        [b"connection", b"requested_server_name"] => Ok(ri
            .and_then(|i| i.tls.as_ref())
            .and_then(|t| t.sni.as_deref())
            .unwrap_or("")
            .as_bytes()
            .to_vec()),
        [b"connection", b"tls_version"] => s(&ri
            .and_then(|i| i.tls.as_ref())
            .ok_or(Status::NotFound)?
            .version),
        [b"connection", b"uri_san_peer_certificate"] => s(ri
            .and_then(|i| i.tls.as_ref())
            .and_then(|t| t.uri_san.as_deref())
            .ok_or(Status::NotFound)?),
        [b"upstream", b"address"] => s(&ri
            .and_then(|i| i.upstream_address)
            .ok_or(Status::NotFound)?
            .to_string()),
        [b"upstream", b"port"] => int(ri
            .and_then(|i| i.upstream_address)
            .ok_or(Status::NotFound)?
            .port() as i64),
        [b"response", b"code_details"] => s(ri
            .and_then(|i| i.code_details.as_deref())
            .ok_or(Status::NotFound)?),
        [b"response", b"flags"] => int(ri.map_or(0, |i| i.response_flags) as i64),
        [b"response", b"size"] => int(ri.map_or(0, |i| i.response_body_bytes) as i64),
        [b"response", b"total_size"] => {
            let head = match frame_resp(c) {
                Ok(r) => response_head_bytes(r),
                Err(_) => ri.and_then(|i| i.response_header_bytes).unwrap_or(0),
            };
            int((ri.map_or(0, |i| i.response_body_bytes) + head) as i64)
        }
        [b"node"] => Ok(plugin.shared.node().to_protobuf()),
        [b"node", b"id"] => s(&plugin.shared.node().id),
        [b"node", b"cluster"] => s(&plugin.shared.node().cluster),
        [b"node", b"metadata"] => {
            let node = plugin.shared.node();
            Ok(abi::serialize_map(
                node.metadata
                    .iter()
                    .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            ))
        }
        [b"node", b"metadata", key] => {
            let node = plugin.shared.node();
            let key = std::str::from_utf8(key).map_err(|_| Status::NotFound)?;
            Ok(node
                .metadata
                .get(key)
                .ok_or(Status::NotFound)?
                .as_bytes()
                .to_vec())
        }
        [b"request", field] => {
            let r = frame_req(c)?;
            match *field {
                b"referer" => r
                    .headers
                    .get(http::header::REFERER)
                    .map(|v| v.as_bytes().to_vec())
                    .ok_or(Status::NotFound),
                b"path" => s(path_and_query(r)),
                b"url_path" => s(r.uri.path()),
                b"query" => s(r.uri.query().unwrap_or("")),
                b"method" => s(r.method.as_str()),
                b"host" => Ok(host_header(r).to_vec()),
                b"scheme" => s(info.map(|i| i.scheme).unwrap_or("http")),
                b"protocol" => s(info.map(|i| i.protocol).unwrap_or("HTTP/1.1")),
                b"id" => s(&format!("{:016x}", info.ok_or(Status::NotFound)?.id)),
                b"useragent" => Ok(r
                    .headers
                    .get(http::header::USER_AGENT)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default()),
                b"headers" => {
                    let pairs = map_pairs(c, MapType::RequestHeaders)?;
                    Ok(abi::serialize_map(
                        pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                    ))
                }
                _ => Err(Status::NotFound),
            }
        }
        [b"response", b"code"] => {
            let code = match frame_resp(c) {
                Ok(r) => r.status.as_u16(),
                Err(_) => info
                    .map(|i| i.response_code)
                    .filter(|c| *c != 0)
                    .ok_or(Status::NotFound)?,
            };
            int(code as i64)
        }
        [b"response", b"headers", name] => {
            // one header's value (Envoy's `response.headers['name']`)
            let pairs = map_pairs(c, MapType::ResponseHeaders)?;
            pairs
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .ok_or(Status::NotFound)
        }
        [b"response", b"headers"] => {
            let pairs = map_pairs(c, MapType::ResponseHeaders)?;
            Ok(abi::serialize_map(
                pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
            ))
        }
        [b"source", b"address"] => s(&info
            .and_then(|i| i.source)
            .ok_or(Status::NotFound)?
            .to_string()),
        [b"source", b"port"] => {
            int(info.and_then(|i| i.source).ok_or(Status::NotFound)?.port() as i64)
        }
        [b"destination", b"address"] => s(&info
            .and_then(|i| i.destination)
            .ok_or(Status::NotFound)?
            .to_string()),
        [b"destination", b"port"] => int(info
            .and_then(|i| i.destination)
            .ok_or(Status::NotFound)?
            .port() as i64),
        [b"route_name"] => s(&info.ok_or(Status::NotFound)?.route),
        [b"cluster_name"] | [b"upstream", b"name"] => s(info
            .and_then(|i| i.upstream.as_deref())
            .ok_or(Status::NotFound)?),
        _ => Err(Status::NotFound),
    }
}

/// A response head's size as Envoy counts it for `response.total_size`: `:status` and
/// its value, plus every header's name and value.
pub fn response_head_bytes(r: &ResponseHeader) -> u64 {
    (":status".len() + 3) as u64
        + r.headers
            .iter()
            .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
            .sum::<u64>()
}

/// Registers every `env.proxy_*` host function.
pub(crate) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C, level: i32, p: i32, n: i32| {
            charge_fuel(&mut c, HOST_CALL_FUEL + LOG_LINE_FUEL)?;
            let msg = match read(&mut c, p, n) {
                Ok(m) => m,
                Err(s) => return Ok(s as i32),
            };
            guest_log(&c.data().plugin, level, &String::from_utf8_lossy(&msg));
            Ok::<i32, wasmtime::Error>(0)
        },
    )?;
    l.func_wrap("env", "proxy_get_log_level", |mut c: C, ret: i32| {
        charge(&mut c)?;
        let level = if tracing::enabled!(tracing::Level::TRACE) {
            0
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            1
        } else {
            2
        };
        Ok::<i32, wasmtime::Error>(abi::status(write_u32(&mut c, ret, level)))
    })?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C, ret: i32| {
            charge(&mut c)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            Ok::<i32, wasmtime::Error>(abi::status(write_u64(&mut c, ret, now)))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C, ms: i32| {
            charge(&mut c)?;
            let p = &c.data().plugin;
            let ms = (ms as u32).max(p.spec.min_tick.as_millis() as u32 * (ms != 0) as u32);
            p.tick_ms.store(ms, Ordering::Relaxed);
            Ok::<i32, wasmtime::Error>(0)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C, t: i32, start: i32, max: i32, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            let bytes = match buffer(&c, t) {
                Ok(b) => b,
                Err(s) => return Ok(s as i32),
            };
            let start = start as u32 as usize;
            if start > bytes.len() {
                return Ok(Status::BadArgument as i32);
            }
            let end = start.saturating_add(max as u32 as usize).min(bytes.len());
            let slice = bytes[start..end].to_vec();
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &slice, ret_p, ret_n)?))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C, t: i32, start: i32, size: i32, p: i32, n: i32| {
            charge(&mut c)?;
            let data = match read(&mut c, p, n) {
                Ok(d) => d,
                Err(s) => return Ok(s as i32),
            };
            let Ok(t) = BufferType::from_i32(t) else {
                return Ok(Status::BadArgument as i32);
            };
            let Some((bt, ptr)) = c.data().frame.body else {
                return Ok(Status::NotFound as i32);
            };
            if bt != t {
                return Ok(Status::BadArgument as i32);
            }
            // SAFETY: see `Frame`.
            let body = unsafe { &mut *ptr.as_ptr() };
            let start = (start as u32 as usize).min(body.len());
            let end = start.saturating_add(size as u32 as usize).min(body.len());
            body.splice(start..end, data);
            Ok::<i32, wasmtime::Error>(0)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C, t: i32, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            let pairs = match MapType::from_i32(t).and_then(|t| map_pairs(&c, t)) {
                Ok(p) => p,
                Err(s) => return Ok(s as i32),
            };
            let bytes = abi::serialize_map(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &bytes, ret_p, ret_n)?))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C, t: i32, p: i32, n: i32| {
            charge(&mut c)?;
            let r = (|| {
                let t = MapType::from_i32(t)?;
                let bytes = read(&mut c, p, n)?;
                let pairs = abi::deserialize_map(&bytes)?;
                // Replace the whole map: drop regular headers, keep pseudo-headers unless given.
                let names: Vec<Vec<u8>> = map_pairs(&c, t)?
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| k.first() != Some(&b':'))
                    .collect();
                for k in names {
                    map_change(&c, t, &k, b"", Op::Remove)?;
                }
                let has_authority = pairs.iter().any(|(k, _)| *k == b":authority");
                for (k, v) in pairs {
                    if has_authority && k.eq_ignore_ascii_case(b"host") {
                        continue; // the same header as :authority
                    }
                    let op = if k.first() == Some(&b':') {
                        Op::Replace
                    } else {
                        Op::Add
                    };
                    map_change(&c, t, k, v, op)?;
                }
                Ok(())
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C, t: i32, kp: i32, kn: i32, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            let v = match read(&mut c, kp, kn)
                .and_then(|k| MapType::from_i32(t).and_then(|t| map_get(&c, t, &k)))
            {
                Ok(v) => v,
                // as Envoy answers v0.1.0 modules: a missing header is an empty value
                Err(Status::NotFound) if c.data().abi01 => Vec::new(),
                Err(s) => return Ok(s as i32),
            };
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &v, ret_p, ret_n)?))
        },
    )?;
    for (name, op) in [
        ("proxy_replace_header_map_value", Op::Replace),
        ("proxy_add_header_map_value", Op::Add),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32| {
                charge(&mut c)?;
                let r = (|| {
                    let k = read(&mut c, kp, kn)?;
                    let v = read(&mut c, vp, vn)?;
                    map_change(&c, MapType::from_i32(t)?, &k, &v, op)
                })();
                Ok::<i32, wasmtime::Error>(abi::status(r))
            },
        )?;
    }
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C, t: i32, kp: i32, kn: i32| {
            charge(&mut c)?;
            let r = (|| {
                let k = read(&mut c, kp, kn)?;
                map_change(&c, MapType::from_i32(t)?, &k, b"", Op::Remove)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C, pp: i32, pn: i32, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            let v = match read(&mut c, pp, pn).and_then(|p| property(&c, &p)) {
                Ok(v) => v,
                Err(s) => return Ok(s as i32),
            };
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &v, ret_p, ret_n)?))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C, pp: i32, pn: i32, vp: i32, vn: i32| {
            charge(&mut c)?;
            let r = (|| {
                let p = read(&mut c, pp, pn)?;
                let v = read(&mut c, vp, vn)?;
                let info = frame_info(&c).ok_or(Status::NotFound)?;
                if let Some(slot) = info.props.iter_mut().find(|(k, _)| *k == p) {
                    slot.1 = v;
                } else if info.props.len() < 64 {
                    info.props.push((p, v));
                } else {
                    return Err(Status::BadArgument);
                }
                Ok(())
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    define_shared(l)?;
    define_streams(l)?;
    define_status_and_done(l)?;
    define_metrics(l)?;
    define_grpc(l)?;
    define_unsupported(l)?;
    Ok(())
}

fn buffer(c: &C, t: i32) -> HostResult<Vec<u8>> {
    let t = BufferType::from_i32(t)?;
    let p = &c.data().plugin;
    match t {
        BufferType::PluginConfiguration => Ok(p.spec.config.clone()),
        BufferType::VmConfiguration => Ok(p.spec.vm_config.clone()),
        BufferType::HttpCallResponseBody => Ok(frame_http_call(c)?.body.clone()),
        BufferType::GrpcReceiveBuffer => Ok(frame_grpc_call(c)?.0.body.clone()),
        BufferType::RequestBody | BufferType::ResponseBody => match c.data().frame.body {
            // SAFETY: see `Frame`.
            Some((bt, ptr)) if bt == t => Ok(unsafe { &*ptr.as_ptr() }.clone()),
            _ => Err(Status::NotFound),
        },
    }
}

fn define_shared(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C, kp: i32, kn: i32, ret_p: i32, ret_n: i32, ret_cas: i32| {
            charge(&mut c)?;
            let key = match read(&mut c, kp, kn) {
                Ok(k) => k,
                Err(s) => return Ok(s as i32),
            };
            let p = c.data().plugin.clone();
            let found = p
                .shared
                .data
                .get(&(p.spec.tenant.clone(), key))
                .map(|e| e.value().clone());
            let Some((v, cas)) = found else {
                return Ok(Status::NotFound as i32);
            };
            if let Err(s) = write_u32(&mut c, ret_cas, cas) {
                return Ok(s as i32);
            }
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &v, ret_p, ret_n)?))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32| {
            charge(&mut c)?;
            let r = (|| {
                let k = read(&mut c, kp, kn)?;
                let v = read(&mut c, vp, vn)?;
                let p = c.data().plugin.clone();
                set_shared(&p, k, v, cas as u32)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C, np: i32, nn: i32, ret: i32| {
            charge(&mut c)?;
            let r = (|| {
                let p = c.data().plugin.clone();
                // Names are kept for the gateway's life: an unbounded one is a leak.
                if nn as u32 as usize > MAX_QUEUE_NAME_BYTES {
                    p.quota_exceeded("queue_name_too_long", || {
                        format!("a queue name of {} bytes", nn as u32)
                    });
                    return Err(Status::BadArgument);
                }
                let name = read(&mut c, np, nn)?;
                let tenant = p.spec.tenant.clone();
                let id = match p.shared.queue_ids.entry((tenant.clone(), name)) {
                    Entry::Occupied(e) => *e.get(),
                    Entry::Vacant(e) => {
                        let max = p.quota.limits().queues;
                        if !TenantQuota::reserve(&p.quota.queues, 1, max) {
                            p.quota_exceeded("queue_full", || format!("{max} queues registered"));
                            return Err(Status::InternalFailure);
                        }
                        *e.insert(p.shared.next_queue.fetch_add(1, Ordering::Relaxed) + 1)
                    }
                };
                // (re-)registering makes this plugin the one notified, e.g. after a reload
                let mut q = p.shared.queues.entry(id).or_insert_with(|| super::Queue {
                    tenant,
                    items: Default::default(),
                    bytes: 0,
                    owner: std::sync::Weak::new(),
                });
                q.owner = Arc::downgrade(&p);
                drop(q);
                p.has_queues.store(true, Ordering::Relaxed);
                write_u32(&mut c, ret, id)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C, _vp: i32, _vn: i32, np: i32, nn: i32, ret: i32| {
            charge(&mut c)?;
            let r = (|| {
                // Queues are scoped by tenant; the vm_id argument cannot reach another's.
                let name = read(&mut c, np, nn)?;
                let p = c.data().plugin.clone();
                let id = *p
                    .shared
                    .queue_ids
                    .get(&(p.spec.tenant.clone(), name))
                    .ok_or(Status::NotFound)?;
                write_u32(&mut c, ret, id)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C, id: i32, vp: i32, vn: i32| {
            charge(&mut c)?;
            let r = (|| {
                let v = read(&mut c, vp, vn)?;
                let p = c.data().plugin.clone();
                let owner = {
                    let mut q = p
                        .shared
                        .queues
                        .get_mut(&(id as u32))
                        .ok_or(Status::NotFound)?;
                    if q.tenant != p.spec.tenant {
                        return Err(Status::NotFound);
                    }
                    let lim = p.quota.limits();
                    let n = v.len() as u64;
                    if n > lim.queue_bytes.min(lim.tenant_queue_bytes) {
                        p.quota_exceeded("queue_full", || format!("an item of {n} bytes"));
                        return Err(Status::BadArgument);
                    }
                    if q.items.len() as u64 >= lim.queue_items || q.bytes + n > lim.queue_bytes {
                        p.quota_exceeded("queue_full", || {
                            format!(
                                "queue {id} holds {} items, {} bytes",
                                q.items.len(),
                                q.bytes
                            )
                        });
                        return Err(Status::InternalFailure);
                    }
                    if !TenantQuota::reserve(&p.quota.queue_bytes, n, lim.tenant_queue_bytes) {
                        p.quota_exceeded("queue_full", || {
                            format!("{} bytes queued in all queues", lim.tenant_queue_bytes)
                        });
                        return Err(Status::InternalFailure);
                    }
                    q.bytes += n;
                    q.items.push_back(v);
                    q.owner.upgrade()
                };
                if let Some(owner) = owner {
                    owner.queue_ready(id as u32);
                }
                Ok(())
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C, id: i32, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            let p = c.data().plugin.clone();
            let item = {
                let Some(mut q) = p.shared.queues.get_mut(&(id as u32)) else {
                    return Ok(Status::NotFound as i32);
                };
                if q.tenant != p.spec.tenant {
                    return Ok(Status::NotFound as i32);
                }
                let item = q.items.pop_front();
                if let Some(v) = &item {
                    q.bytes -= v.len() as u64;
                    p.quota
                        .queue_bytes
                        .fetch_sub(v.len() as u64, Ordering::Relaxed);
                }
                item
            };
            match item {
                None => Ok(Status::Empty as i32),
                Some(v) => Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &v, ret_p, ret_n)?)),
            }
        },
    )?;
    Ok(())
}

/// `proxy_set_shared_data` within the tenant's byte quota. A write that can never fit
/// is `BadArgument`; one that does not fit now is `InternalFailure`, the status this
/// host gives for its other full tables (the ABI has no "resource exhausted"; Envoy sets
/// no cap at all, Kong traps the guest).
fn set_shared(p: &Plugin, k: Vec<u8>, v: Vec<u8>, cas: u32) -> HostResult {
    let max = p.quota.limits().data_bytes;
    let size = |k: &[u8], v: &[u8]| k.len() as u64 + v.len() as u64 + SHARED_ENTRY_OVERHEAD;
    let new = size(&k, &v);
    if new > max {
        p.quota_exceeded("shared_data_full", || {
            format!("a key and value of {new} bytes")
        });
        return Err(Status::BadArgument);
    }
    let full = || {
        p.quota_exceeded("shared_data_full", || {
            format!("{max} bytes of shared data stored")
        });
        Err(Status::InternalFailure)
    };
    match p.shared.data.entry((p.spec.tenant.clone(), k)) {
        Entry::Occupied(mut e) => {
            if cas != 0 && cas != e.get().1 {
                return Err(Status::CasMismatch);
            }
            let old = size(&e.key().1, &e.get().0);
            if new > old {
                if !TenantQuota::reserve(&p.quota.data_bytes, new - old, max) {
                    return full();
                }
            } else {
                p.quota.data_bytes.fetch_sub(old - new, Ordering::Relaxed);
            }
            let slot = e.get_mut();
            slot.0 = v;
            slot.1 = slot.1.wrapping_add(1).max(1);
        }
        Entry::Vacant(e) => {
            if cas != 0 {
                return Err(Status::CasMismatch);
            }
            if !TenantQuota::reserve(&p.quota.data_bytes, new, max) {
                return full();
            }
            e.insert((v, 1));
        }
    }
    Ok(())
}

/// What Envoy's root context answers for stream calls (`continue`, local replies) made
/// without switching to an HTTP context first.
const UNIMPLEMENTED_AT_ROOT: i32 = Status::Unimplemented as i32;

fn define_streams(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    // Switches the context the following calls act for: the root context, or the HTTP
    // context of the request that holds this VM (so a root callback can resume or answer
    // a paused request, with its headers in reach). Any other id is BadArgument.
    l.func_wrap("env", "proxy_set_effective_context", |mut c: C, id: i32| {
        charge(&mut c)?;
        let h = c.data_mut();
        Ok::<i32, wasmtime::Error>(if id == h.effective {
            Status::Ok as i32
        } else if id == ROOT_CONTEXT {
            h.parked = std::mem::take(&mut h.frame);
            h.frame.call = h.parked.call; // an answer being delivered stays readable
            h.effective = ROOT_CONTEXT;
            Status::Ok as i32
        } else if id > ROOT_CONTEXT && id == h.http_ctx {
            h.frame = std::mem::take(&mut h.parked);
            h.effective = id;
            Status::Ok as i32
        } else {
            Status::BadArgument as i32
        })
    })?;
    l.func_wrap("env", "proxy_continue_stream", |mut c: C, t: i32| {
        charge(&mut c)?;
        if c.data().effective == ROOT_CONTEXT {
            return Ok(UNIMPLEMENTED_AT_ROOT);
        }
        let e = &mut c.data_mut().effects;
        Ok::<i32, wasmtime::Error>(match t {
            0 => {
                e.continue_request = true;
                0
            }
            1 => {
                e.continue_response = true;
                0
            }
            _ => Status::BadArgument as i32,
        })
    })?;
    // v0.1.0 names, still imported by some SDKs.
    l.func_wrap("env", "proxy_continue_request", |mut c: C| {
        charge(&mut c)?;
        if c.data().effective == ROOT_CONTEXT {
            return Ok(UNIMPLEMENTED_AT_ROOT);
        }
        c.data_mut().effects.continue_request = true;
        Ok::<i32, wasmtime::Error>(0)
    })?;
    l.func_wrap("env", "proxy_continue_response", |mut c: C| {
        charge(&mut c)?;
        if c.data().effective == ROOT_CONTEXT {
            return Ok(UNIMPLEMENTED_AT_ROOT);
        }
        c.data_mut().effects.continue_response = true;
        Ok::<i32, wasmtime::Error>(0)
    })?;
    l.func_wrap("env", "proxy_close_stream", |mut c: C, _t: i32| {
        charge(&mut c)?;
        if c.data().effective == ROOT_CONTEXT {
            return Ok(UNIMPLEMENTED_AT_ROOT);
        }
        // Closing is answered like Envoy's reset: the request ends with a local 502 unless
        // the guest already chose an answer.
        if let Some(info) = frame_info(&c) {
            info.code_details
                .get_or_insert(std::borrow::Cow::Borrowed("wasm_close_stream"));
        }
        let e = &mut c.data_mut().effects;
        if e.local.is_none() {
            e.local = Some(LocalResponse {
                status: 502,
                headers: Vec::new(),
                body: Vec::new(),
                grpc_status: -1,
            });
        }
        Ok::<i32, wasmtime::Error>(0)
    })?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C, status: i32, dp: i32, dn: i32, bp: i32, bn: i32, hp: i32, hn: i32, grpc: i32| {
            charge(&mut c)?;
            if c.data().effective == ROOT_CONTEXT {
                return Ok(UNIMPLEMENTED_AT_ROOT);
            }
            let r = (|| {
                if !(200..=599).contains(&status) {
                    return Err(Status::BadArgument);
                }
                if bn as u32 as usize > MAX_LOCAL_RESPONSE_BYTES {
                    c.data_mut().effects.local_too_large = true;
                    return Err(Status::BadArgument);
                }
                let body = read(&mut c, bp, bn)?;
                let hbytes = read(&mut c, hp, hn)?;
                // as Envoy, the details are the response's `response.code_details` (and
                // the access log's `details`), whitespace replaced by `_`
                let details: String = String::from_utf8_lossy(&read(&mut c, dp, dn.min(256))?)
                    .chars()
                    .map(|ch| if ch.is_whitespace() { '_' } else { ch })
                    .collect();
                let headers = abi::deserialize_map(&hbytes)?
                    .into_iter()
                    .map(|(k, v)| {
                        header_name(k)?;
                        header_value(v)?;
                        Ok((String::from_utf8_lossy(k).into_owned(), v.to_vec()))
                    })
                    .collect::<HostResult<Vec<_>>>()?;
                if let Some(info) = frame_info(&c) {
                    info.code_details = Some(details.into());
                }
                c.data_mut().effects.local = Some(LocalResponse {
                    status: status as u16,
                    headers,
                    body,
                    grpc_status: grpc,
                });
                Ok(())
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C,
         up: i32,
         un: i32,
         hp: i32,
         hn: i32,
         bp: i32,
         bn: i32,
         _tp: i32,
         _tn: i32,
         timeout_ms: i32,
         ret: i32| {
            charge(&mut c)?;
            let r = (|| {
                let name = read(&mut c, up, un)?;
                let hbytes = read(&mut c, hp, hn)?;
                let body = read(&mut c, bp, bn)?;
                let headers = abi::deserialize_map(&hbytes)?
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
                    .collect::<Vec<_>>();
                // like Envoy: a callout needs its method, path and authority; none is sent
                // without them
                for required in [":method", ":path", ":authority"] {
                    if !headers.iter().any(|(k, v)| k == required && !v.is_empty()) {
                        return Err(Status::BadArgument);
                    }
                }
                let p = c.data().plugin.clone();
                let upstream = p.allowed_upstream(&name).ok_or(Status::BadArgument)?;
                if c.data().effects.calls.len() >= 8 {
                    return Err(Status::InternalFailure);
                }
                let e = &mut c.data_mut().effects;
                e.next_token = e.next_token.wrapping_add(1).max(1);
                let token = e.next_token;
                e.calls.push(PendingCall {
                    token,
                    upstream,
                    headers,
                    body,
                    // 0 asks for the default (Envoy would wait without limit; here a
                    // callout never waits longer than a minute)
                    timeout: match timeout_ms as u32 {
                        0 => DEFAULT_CALLOUT_TIMEOUT,
                        ms => Duration::from_millis(ms.min(60_000) as u64),
                    },
                    root: false,
                    grpc: None,
                });
                let root = c.data().effective == ROOT_CONTEXT;
                if let Some(call) = c.data_mut().effects.calls.last_mut() {
                    call.root = root;
                }
                write_u32(&mut c, ret, token)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    Ok(())
}

/// `proxy_get_status`, `proxy_done`, and the v0.1.0 calls `proxy_get_configuration` and
/// `proxy_clear_route_cache`.
fn define_status_and_done(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C, code_ptr: i32, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            // Envoy: the status of the callout being answered. A gRPC call's is its gRPC
            // status and message; an HTTP callout whose connection was lost before a
            // response is BrokenConnection "reset"; anything else (an answer, or no
            // callout at hand) is 0 and no message.
            let (code, msg): (u32, Vec<u8>) = match frame_call(&c) {
                Ok(call) => match &call.grpc {
                    Some(g) => (g.code, g.message.clone()),
                    None if call.status == 0 => {
                        (Status::BrokenConnection as u32, b"reset".to_vec())
                    }
                    None => (0, Vec::new()),
                },
                Err(_) => (0, Vec::new()),
            };
            if let Err(s) = write_u32(&mut c, code_ptr, code) {
                return Ok(s as i32);
            }
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &msg, ret_p, ret_n)?))
        },
    )?;
    l.func_wrap("env", "proxy_done", |mut c: C| {
        charge(&mut c)?;
        // Only a root context that answered `on_done` with false is waiting for this
        // (see `Vm::shutdown`); from anywhere else it is NotFound, as in Envoy.
        let h = c.data_mut();
        Ok::<i32, wasmtime::Error>(if h.awaiting_done {
            h.awaiting_done = false;
            0
        } else {
            Status::NotFound as i32
        })
    })?;
    l.func_wrap(
        "env",
        "proxy_get_configuration",
        |mut c: C, ret_p: i32, ret_n: i32| {
            charge(&mut c)?;
            let cfg = c.data().plugin.spec.config.clone();
            Ok::<i32, wasmtime::Error>(abi::status(give(&mut c, &cfg, ret_p, ret_n)?))
        },
    )?;
    // The route is chosen before the hooks run and is not chosen again (see the README).
    l.func_wrap("env", "proxy_clear_route_cache", |mut c: C| {
        charge(&mut c)?;
        Ok::<i32, wasmtime::Error>(0)
    })?;
    Ok(())
}

fn define_metrics(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C, kind: i32, np: i32, nn: i32, ret: i32| {
            charge(&mut c)?;
            let r = (|| {
                let name =
                    String::from_utf8(read(&mut c, np, nn)?).map_err(|_| Status::BadArgument)?;
                if name.is_empty() || name.len() > 128 || !(0..=2).contains(&kind) {
                    return Err(Status::BadArgument);
                }
                let p = c.data().plugin.clone();
                let key = format!("{kind}:{name}");
                let id = match p.metric_ids.get(&key) {
                    Some(id) => *id,
                    None => {
                        if p.metric_ids.len() >= 256 {
                            return Err(Status::InternalFailure);
                        }
                        let labels = [p.spec.tenant.as_str(), p.spec.name.as_str(), name.as_str()];
                        let m = match kind {
                            0 => GuestMetric::Counter(
                                p.metrics.guest_counters.with_label_values(&labels),
                            ),
                            1 => GuestMetric::Gauge(
                                p.metrics.guest_gauges.with_label_values(&labels),
                            ),
                            _ => {
                                let count = format!("{name}_count");
                                let sum = format!("{name}_sum");
                                let l2 = |n: &str| {
                                    p.metrics.guest_counters.with_label_values(&[
                                        p.spec.tenant.as_str(),
                                        p.spec.name.as_str(),
                                        n,
                                    ])
                                };
                                GuestMetric::Histogram(l2(&count), l2(&sum))
                            }
                        };
                        let id = p.next_metric_id();
                        p.guest_metrics.insert(id, m);
                        p.metric_ids.insert(key, id);
                        id
                    }
                };
                write_u32(&mut c, ret, id)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C, id: i32, off: i64| {
            charge(&mut c)?;
            let p = c.data().plugin.clone();
            let r = match p.guest_metrics.get(&(id as u32)).as_deref() {
                Some(GuestMetric::Counter(m)) if off >= 0 => {
                    m.inc_by(off as u64);
                    Ok(())
                }
                Some(GuestMetric::Gauge(m)) => {
                    m.add(off);
                    Ok(())
                }
                Some(_) => Err(Status::BadArgument),
                None => Err(Status::NotFound),
            };
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap("env", "proxy_record_metric", |mut c: C, id: i32, v: i64| {
        charge(&mut c)?;
        let p = c.data().plugin.clone();
        let r = match p.guest_metrics.get(&(id as u32)).as_deref() {
            Some(GuestMetric::Counter(m)) => {
                let cur = m.get();
                if (v as u64) >= cur {
                    m.inc_by(v as u64 - cur);
                    Ok(())
                } else {
                    Err(Status::BadArgument)
                }
            }
            Some(GuestMetric::Gauge(m)) => {
                m.set(v);
                Ok(())
            }
            Some(GuestMetric::Histogram(count, sum)) => {
                count.inc();
                sum.inc_by(v as u64);
                Ok(())
            }
            None => Err(Status::NotFound),
        };
        Ok::<i32, wasmtime::Error>(abi::status(r))
    })?;
    l.func_wrap("env", "proxy_get_metric", |mut c: C, id: i32, ret: i32| {
        charge(&mut c)?;
        let p = c.data().plugin.clone();
        let v = match p.guest_metrics.get(&(id as u32)).as_deref() {
            Some(GuestMetric::Counter(m)) => m.get(),
            Some(GuestMetric::Gauge(m)) => m.get() as u64,
            Some(GuestMetric::Histogram(count, _)) => count.get(),
            None => return Ok(Status::NotFound as i32),
        };
        Ok::<i32, wasmtime::Error>(abi::status(write_u64(&mut c, ret, v)))
    })?;
    Ok(())
}

/// Host calls this gateway does not offer answer an error status, never trap; a foreign
/// function is simply `NotFound`.
fn define_unsupported(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| Status::NotFound as i32,
    )?;
    Ok(())
}

/// The upstream a `proxy_grpc_call` names and the `:authority` it is called with: a name
/// in the module's `allowed_upstreams`, or (as Envoy takes it) a serialized `GrpcService`
/// whose `envoy_grpc.cluster_name` is one. Anything else is `ParseFailure`, Envoy's answer
/// for a cluster it does not know; nothing is sent.
fn grpc_upstream(p: &Plugin, arg: &[u8]) -> HostResult<(Arc<Upstream>, String)> {
    let find = |name: &[u8]| p.allowed_upstream(name);
    if let Some(u) = find(arg) {
        let a = u.name.to_string();
        return Ok((u, a));
    }
    let (cluster, authority) = abi::grpc_service_cluster(arg)?;
    let u = find(cluster).ok_or(Status::ParseFailure)?;
    let authority = match authority {
        Some(a) => {
            header_value(a).map_err(|_| Status::ParseFailure)?;
            String::from_utf8(a.to_vec()).map_err(|_| Status::ParseFailure)?
        }
        None => u.name.to_string(),
    };
    Ok((u, authority))
}

/// A gRPC service or method name: what can stand in a path segment.
fn grpc_name(b: Vec<u8>) -> HostResult<String> {
    let ok = !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_graphic() && !matches!(c, b'/' | b'?' | b'#' | b'%'));
    if !ok {
        return Err(Status::ParseFailure);
    }
    String::from_utf8(b).map_err(|_| Status::ParseFailure)
}

type GrpcRequest = (Arc<Upstream>, GrpcTarget, Vec<(String, Vec<u8>)>);

/// The parts of a `proxy_grpc_call` or `proxy_grpc_stream` the guest names: upstream and
/// `:authority`, service, method and initial metadata (pseudo-headers dropped).
#[allow(clippy::too_many_arguments)]
fn grpc_request(
    c: &mut C,
    up: i32,
    un: i32,
    sp: i32,
    sn: i32,
    mp: i32,
    mn: i32,
    hp: i32,
    hn: i32,
) -> HostResult<GrpcRequest> {
    let upstream = read(c, up, un)?;
    let service = grpc_name(read(c, sp, sn)?)?;
    let method = grpc_name(read(c, mp, mn)?)?;
    let hbytes = read(c, hp, hn)?;
    let headers = abi::deserialize_map(&hbytes)
        .map_err(|_| Status::ParseFailure)?
        .into_iter()
        .filter(|(k, _)| k.first() != Some(&b':'))
        .map(|(k, v)| {
            let n = header_name(k).map_err(|_| Status::ParseFailure)?;
            header_value(v).map_err(|_| Status::ParseFailure)?;
            Ok((n.as_str().to_string(), v.to_vec()))
        })
        .collect::<HostResult<Vec<_>>>()?;
    let p = c.data().plugin.clone();
    let (upstream, authority) = grpc_upstream(&p, &upstream)?;
    let target = GrpcTarget {
        service,
        method,
        authority,
    };
    Ok((upstream, target, headers))
}

/// The next gRPC token: odd for calls, even for streams, as Envoy tells them apart.
fn next_grpc_token(e: &mut Effects, stream: bool) -> u32 {
    loop {
        e.next_token = e.next_token.wrapping_add(1);
        if e.next_token != 0 && e.next_token.is_multiple_of(2) == stream {
            return e.next_token;
        }
    }
}

/// gRPC callouts, to upstreams in the module's `allowed_upstreams`. Unary calls
/// (`proxy_grpc_call`, odd tokens) are answered through `proxy_on_grpc_receive` or
/// `proxy_on_grpc_close`. Streams (`proxy_grpc_stream`, even tokens) of an HTTP context
/// start at once; their events (`proxy_on_grpc_receive_initial_metadata`,
/// `proxy_on_grpc_receive` per message, `proxy_on_grpc_receive_trailing_metadata`,
/// `proxy_on_grpc_close`) are delivered while the request waits on the module (see
/// `Callouts::settle`); those of the root context's streams while the VM is idle (see
/// `Plugin::answer_root`). Errors
/// a guest can cause answer statuses the Rust SDK returns as `Err` (`ParseFailure`,
/// `InternalFailure`, `NotFound`, `BadArgument` where it expects them), never trap.
fn define_grpc(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C,
         up: i32,
         un: i32,
         sp: i32,
         sn: i32,
         mp: i32,
         mn: i32,
         hp: i32,
         hn: i32,
         bp: i32,
         bn: i32,
         timeout_ms: i32,
         ret: i32| {
            charge(&mut c)?;
            let r = (|| {
                let (upstream, target, headers) =
                    grpc_request(&mut c, up, un, sp, sn, mp, mn, hp, hn)?;
                let body = read(&mut c, bp, bn)?;
                if c.data().effects.calls.len() >= 8 {
                    return Err(Status::InternalFailure);
                }
                let h = c.data_mut();
                let token = next_grpc_token(&mut h.effects, false);
                h.grpc_tokens.push(token);
                let root = h.effective == ROOT_CONTEXT;
                h.effects.calls.push(PendingCall {
                    token,
                    upstream,
                    headers,
                    body,
                    timeout: match timeout_ms as u32 {
                        0 => DEFAULT_CALLOUT_TIMEOUT,
                        ms => Duration::from_millis(ms.min(60_000) as u64),
                    },
                    root,
                    grpc: Some(target),
                });
                write_u32(&mut c, ret, token)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: C,
         up: i32,
         un: i32,
         sp: i32,
         sn: i32,
         mp: i32,
         mn: i32,
         hp: i32,
         hn: i32,
         ret: i32| {
            charge(&mut c)?;
            let r = (|| {
                let (upstream, target, headers) =
                    grpc_request(&mut c, up, un, sp, sn, mp, mn, hp, hn)?;
                // check the return slot first: nothing starts for a call that fails
                write_u32(&mut c, ret, 0)?;
                let h = c.data_mut();
                let root = h.effective == ROOT_CONTEXT;
                let open = h.grpc_streams.iter();
                if open.filter(|s| s.root == root && !s.remote_closed).count() >= MAX_GRPC_STREAMS {
                    return Err(Status::InternalFailure);
                }
                let Some(d) = h.plugin.dispatch.get().cloned() else {
                    return Err(Status::InternalFailure);
                };
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(Status::InternalFailure);
                }
                let token = next_grpc_token(&mut h.effects, true);
                let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
                let (ev_tx, ev_rx) = futures::channel::mpsc::channel(GRPC_STREAM_QUEUE);
                let call = PendingCall {
                    token,
                    upstream,
                    headers,
                    body: Vec::new(),
                    timeout: GRPC_STREAM_LIFETIME,
                    root,
                    grpc: Some(target),
                };
                d.open_stream(call, cmd_rx, ev_tx);
                h.grpc_streams.push(StreamSlot {
                    token,
                    root,
                    cmds: cmd_tx,
                    local_closed: false,
                    remote_closed: false,
                });
                if root {
                    h.root_stream_events.push(ev_rx);
                } else {
                    h.stream_events.push(ev_rx);
                }
                h.plugin.usage.http_callouts.fetch_add(1, Ordering::Relaxed);
                write_u32(&mut c, ret, token)
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: C, token: i32, mp: i32, mn: i32, end: i32| {
            charge(&mut c)?;
            let token = token as u32;
            let r = (|| {
                // a call's token is the wrong kind (as Envoy answers)
                if !token.is_multiple_of(2) {
                    return Err(Status::BadArgument);
                }
                let Some(i) = c.data().grpc_streams.iter().position(|s| s.token == token) else {
                    return Err(Status::NotFound);
                };
                if mn as u32 as usize > MAX_GRPC_MESSAGE {
                    return Err(Status::BadArgument);
                }
                let msg = read(&mut c, mp, mn)?;
                let slot = &c.data().grpc_streams[i];
                // once closed (either side) a send goes nowhere, Ok as in Envoy
                if !slot.remote_closed {
                    let _ = slot.cmds.send(StreamCmd::Send(msg.into(), end != 0));
                }
                Ok(())
            })();
            Ok::<i32, wasmtime::Error>(abi::status(r))
        },
    )?;
    // On a call, close is cancel (as in Envoy): the answer is dropped unseen. On a stream,
    // close half-closes it (events still come until it closes remotely) and cancel resets
    // it (no further events).
    for (name, cancel) in [("proxy_grpc_cancel", true), ("proxy_grpc_close", false)] {
        l.func_wrap("env", name, move |mut c: C, token: i32| {
            charge(&mut c)?;
            let h = c.data_mut();
            let token = token as u32;
            if let Some(i) = h.grpc_tokens.iter().position(|t| *t == token) {
                h.grpc_tokens.swap_remove(i);
                h.effects.calls.retain(|p| p.token != token);
                return Ok::<i32, wasmtime::Error>(0);
            }
            let Some(i) = h.grpc_streams.iter().position(|s| s.token == token) else {
                return Ok(Status::NotFound as i32);
            };
            let slot = &mut h.grpc_streams[i];
            if cancel || slot.remote_closed {
                h.grpc_streams.remove(i); // dropping its sender resets an open stream
            } else if !slot.local_closed {
                slot.local_closed = true;
                let _ = slot.cmds.send(StreamCmd::Close);
            }
            Ok(0)
        })?;
    }
    Ok(())
}

/// A guest's `proxy_log` line, as a tracing event with tenant and module fields.
pub(crate) fn guest_log(p: &Plugin, level: i32, msg: &str) {
    let (t, m) = (p.spec.tenant.as_str(), p.spec.name.as_str());
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "critical"];
    p.log.push(m, LEVELS[level.clamp(0, 5) as usize], msg);
    match level {
        0 => tracing::trace!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        1 => tracing::debug!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        2 => tracing::info!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        3 => tracing::warn!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        _ => tracing::error!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
    }
}

/// Fuel for a budget.
pub(crate) fn fuel_for(budget: Duration) -> u64 {
    (budget.as_micros() as u64).saturating_mul(FUEL_PER_US)
}

//! The tenant's state store for filters: foreign functions `wasmgate.kv.get`, `.set`,
//! `.cas`, `.incr`, `.delete` and `.list`, called with `proxy_call_foreign_function`.
//!
//! A state call never blocks the proxy: the foreign function checks its arguments and
//! answers at once with a **token** (4 bytes, little-endian u32) in its result; the guest
//! returns `Pause` from its callback (like after `proxy_http_call`); the proxy makes the
//! call and delivers the result through `proxy_on_foreign_function(context, token,
//! size)`, where `proxy_get_buffer_bytes(CallData = 8, 0, size)` reads it. The guest then
//! resumes the request (`proxy_continue_stream`) or answers it. The root context may call
//! too (from `on_configure`, `on_tick`, ...): its results come to the root context.
//!
//! **Arguments** are a JSON object; **results** are a JSON object with `"ok"`:
//!
//! | function | arguments | result |
//! | --- | --- | --- |
//! | `get` | `{"key"}` | `{"ok":true,"found":true,"value":"…","version":7}` or `{"ok":true,"found":false}` |
//! | `set` | `{"key","value","ttl_ms"?}` | `{"ok":true,"version":8}` |
//! | `cas` | `{"key","value","version","ttl_ms"?}` (`version` 0: only if absent) | `{"ok":true,"version":9}` or `{"ok":false,"error":"conflict","version":8}` |
//! | `incr` | `{"key","delta"?}` (default 1) | `{"ok":true,"value":42}` |
//! | `delete` | `{"key","version"?}` | `{"ok":true}` or a conflict |
//! | `list` | `{"prefix"?,"after"?,"limit"?}` (limit ≤ 1000) | `{"ok":true,"keys":["…"]}` |
//!
//! Values are UTF-8 text in `value`; a binary value goes as `value_base64` (arguments) and
//! comes back as `value_base64` when it is not UTF-8. A failure is
//! `{"ok":false,"error":CODE,"message":"…"}` with CODE one of `bad_key`,
//! `value_too_large`, `over_quota`, `rate_limited`, `not_a_number`, `unavailable`,
//! `timeout`. Malformed arguments are refused at once with `BadArgument`; a gateway
//! without a state store answers `NotFound`, as for an unknown function.

use super::call::C;
use super::{CallResponse, PendingCall, ROOT_CONTEXT};
use crate::state::{Page, StateError, TenantState, Written};
use crate::wasm::abi::{HostResult, Status};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use std::time::Duration;

/// Longest a state call may take before the guest gets `timeout`.
pub const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A state call waiting to be made by the proxy.
#[derive(Clone)]
pub struct StoreCall {
    state: TenantState,
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    Get(String),
    Set {
        key: String,
        value: Bytes,
        expect: Option<u64>,
        ttl: Option<Duration>,
    },
    Delete(String, Option<u64>),
    Incr(String, i64),
    List {
        prefix: String,
        after: Option<String>,
        limit: usize,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    key: Option<String>,
    value: Option<String>,
    value_base64: Option<String>,
    version: Option<u64>,
    ttl_ms: Option<u64>,
    delta: Option<i64>,
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

impl Args {
    fn key(&mut self) -> HostResult<String> {
        self.key.take().ok_or(Status::BadArgument)
    }

    fn value(&mut self) -> HostResult<Bytes> {
        match (self.value.take(), self.value_base64.take()) {
            (Some(v), None) => Ok(Bytes::from(v)),
            (None, Some(b)) => B64
                .decode(b)
                .map(Bytes::from)
                .map_err(|_| Status::BadArgument),
            _ => Err(Status::BadArgument),
        }
    }
}

fn parse(op: &[u8], args: &[u8]) -> HostResult<Op> {
    let mut a: Args = serde_json::from_slice(if args.is_empty() { b"{}" } else { args })
        .map_err(|_| Status::BadArgument)?;
    let ttl = a.ttl_ms.map(Duration::from_millis);
    Ok(match op {
        b"get" => Op::Get(a.key()?),
        b"set" => Op::Set {
            key: a.key()?,
            value: a.value()?,
            expect: None,
            ttl,
        },
        b"cas" => Op::Set {
            key: a.key()?,
            value: a.value()?,
            expect: Some(a.version.ok_or(Status::BadArgument)?),
            ttl,
        },
        b"incr" => Op::Incr(a.key()?, a.delta.unwrap_or(1)),
        b"delete" => Op::Delete(a.key()?, a.version),
        b"list" => Op::List {
            prefix: a.prefix.unwrap_or_default(),
            after: a.after,
            limit: a.limit.unwrap_or(100).clamp(1, 1000),
        },
        _ => return Err(Status::NotFound),
    })
}

/// Checks a `wasmgate.kv.OP` call and queues it; the token the answer will carry.
pub(super) fn start(c: &mut C, op: &[u8], args: &[u8]) -> HostResult<u32> {
    let h = c.data_mut();
    let state = h.plugin.state().ok_or(Status::NotFound)?;
    let op = parse(op, args)?;
    let root = h.effective == ROOT_CONTEXT;
    h.effects.queue(|token| PendingCall {
        token,
        upstream: None,
        headers: Vec::new(),
        body: Vec::new(),
        timeout: STORE_CALL_TIMEOUT,
        root,
        grpc: None,
        store: Some(StoreCall { state, op }),
    })
}

/// The answer being delivered, if it is a state call's.
pub(super) fn answer(r: &CallResponse) -> HostResult<&CallResponse> {
    if r.foreign {
        Ok(r)
    } else {
        Err(Status::NotFound)
    }
}

fn failure(e: &StateError) -> Value {
    json!({"ok": false, "error": e.code(), "message": e.to_string()})
}

fn written(w: Written) -> Value {
    match w {
        Written::Done(0) => json!({"ok": true}),
        Written::Done(v) => json!({"ok": true, "version": v}),
        Written::Conflict(v) => json!({"ok": false, "error": "conflict", "version": v}),
    }
}

impl StoreCall {
    /// Makes the call; the JSON result the guest reads.
    pub async fn run(self, timeout: Duration) -> Vec<u8> {
        let result = match tokio::time::timeout(timeout, self.exec()).await {
            Ok(v) => v,
            Err(_) => {
                json!({"ok": false, "error": "timeout", "message": "the state store did not answer in time"})
            }
        };
        serde_json::to_vec(&result).unwrap_or_default()
    }

    async fn exec(self) -> Value {
        let s = &self.state;
        let r = match self.op {
            Op::Get(key) => s.get(&key).await.map(|e| match e {
                None => json!({"ok": true, "found": false}),
                Some(e) => match std::str::from_utf8(&e.value) {
                    Ok(text) => json!({"ok": true, "found": true, "value": text, "version": e.version}),
                    Err(_) => json!({"ok": true, "found": true, "value_base64": B64.encode(&e.value), "version": e.version}),
                },
            }),
            Op::Set {
                key,
                value,
                expect,
                ttl,
            } => s.set(&key, value, expect, ttl).await.map(written),
            Op::Delete(key, expect) => s.delete(&key, expect).await.map(written),
            Op::Incr(key, delta) => s.incr(&key, delta).await.map(|n| json!({"ok": true, "value": n})),
            Op::List {
                prefix,
                after,
                limit,
            } => s
                .list(Page::new(&prefix, after.as_deref(), limit))
                .await
                .map(|keys| json!({"ok": true, "keys": keys})),
        };
        r.unwrap_or_else(|e| failure(&e))
    }
}

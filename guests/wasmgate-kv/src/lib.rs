//! The tenant's key-value store for Rust Proxy-Wasm filters on wasmgate: thin wrappers
//! over the `wasmgate.kv.*` foreign functions.
//!
//! Every call returns at once with a token; return `Action::Pause` from the callback, and
//! the result arrives in `Context::on_foreign_function(token, size)`, where [`result`]
//! reads it. Then resume (`resume_http_request`) or answer the request.
//!
//! ```ignore
//! fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
//!     self.pending = wasmgate_kv::incr("hits", 1).ok();
//!     Action::Pause
//! }
//! fn on_foreign_function(&mut self, token: u32, size: usize) {
//!     if Some(token) == self.pending {
//!         let hits = wasmgate_kv::result(size).and_then(|r| r.number());
//!         ...
//!         self.resume_http_request();
//!     }
//! }
//! ```

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, Status};
use serde_json::{json, Value};

fn call(op: &str, args: Value) -> Result<u32, Status> {
    let name = format!("wasmgate.kv.{op}");
    let args = args.to_string();
    let out = hostcalls::call_foreign_function(&name, Some(args.as_bytes()))?;
    match out.as_deref() {
        Some([a, b, c, d, ..]) => Ok(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => Err(Status::InternalFailure),
    }
}

/// Reads a key: the result has `found`, and `value` and `version` when it was.
pub fn get(key: &str) -> Result<u32, Status> {
    call("get", json!({ "key": key }))
}

/// Stores a UTF-8 value (for bytes, see [`set_bytes`]); `ttl_ms` 0 keeps it until deleted.
pub fn set(key: &str, value: &str, ttl_ms: u64) -> Result<u32, Status> {
    let mut a = json!({ "key": key, "value": value });
    if ttl_ms > 0 {
        a["ttl_ms"] = ttl_ms.into();
    }
    call("set", a)
}

/// Stores bytes (sent as base64).
pub fn set_bytes(key: &str, value: &[u8]) -> Result<u32, Status> {
    call("set", json!({ "key": key, "value_base64": base64(value) }))
}

/// Stores `value` only if the key's version is `version` now (0: only if absent); the
/// result is a `conflict` with the current version otherwise.
pub fn cas(key: &str, value: &str, version: u64) -> Result<u32, Status> {
    call("cas", json!({ "key": key, "value": value, "version": version }))
}

/// Adds `delta` to a decimal counter (absent: 0); the result's `value` is the new count.
pub fn incr(key: &str, delta: i64) -> Result<u32, Status> {
    call("incr", json!({ "key": key, "delta": delta }))
}

/// Deletes a key (only at `version`, if given).
pub fn delete(key: &str, version: Option<u64>) -> Result<u32, Status> {
    call("delete", json!({ "key": key, "version": version }))
}

/// Keys starting with `prefix`, after `after`, at most `limit`.
pub fn list(prefix: &str, after: Option<&str>, limit: usize) -> Result<u32, Status> {
    call("list", json!({ "prefix": prefix, "after": after, "limit": limit }))
}

/// Any call by name with JSON arguments, as the wire format documents them.
pub fn raw(op: &str, args: &[u8]) -> Result<u32, Status> {
    let name = format!("wasmgate.kv.{op}");
    match hostcalls::call_foreign_function(&name, Some(args))?.as_deref() {
        Some([a, b, c, d, ..]) => Ok(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => Err(Status::InternalFailure),
    }
}

/// A call's result, in `on_foreign_function`.
pub struct Reply(pub Value);

impl Reply {
    pub fn ok(&self) -> bool {
        self.0["ok"] == true
    }
    /// `conflict`, `over_quota`, `unavailable`, ... when not ok.
    pub fn error(&self) -> Option<&str> {
        self.0["error"].as_str()
    }
    pub fn found(&self) -> bool {
        self.0["found"] == true
    }
    pub fn text(&self) -> Option<&str> {
        self.0["value"].as_str()
    }
    pub fn number(&self) -> Option<i64> {
        self.0["value"].as_i64()
    }
    pub fn version(&self) -> Option<u64> {
        self.0["version"].as_u64()
    }
}

/// The raw JSON result delivered to `on_foreign_function(_, size)`.
pub fn result_bytes(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::CallData, 0, size).ok().flatten()
}

/// The result delivered to `on_foreign_function(_, size)`.
pub fn result(size: usize) -> Option<Reply> {
    let bytes = result_bytes(size)?;
    serde_json::from_slice(&bytes).ok().map(Reply)
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

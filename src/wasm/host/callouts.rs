//! HTTP callouts: `proxy_http_call` and `proxy_get_status`. A callout goes to an
//! upstream in the module's `allowed_upstreams`; the proxy sends it when the callback
//! returns and delivers the answer through `proxy_on_http_call_response`, on the
//! context that made it (the root context's own callouts included).

use super::call::{give, read, run, run_alloc, write_u32, Ret, C};
use super::{Host, PendingCall, DEFAULT_CALLOUT_TIMEOUT, ROOT_CONTEXT};
use crate::wasm::abi::{self, Status};
use std::time::Duration;
use wasmtime::Linker;

/// Callouts one callback may start (HTTP and gRPC together).
pub(super) const MAX_CALLS_PER_CALLBACK: usize = 8;
/// Longest a callout waits, whatever timeout the guest asks for.
const MAX_CALLOUT_TIMEOUT_MS: u32 = 60_000;

/// The timeout a guest asked for: 0 is the default (Envoy would wait without limit;
/// here a callout never waits longer than a minute).
pub(super) fn callout_timeout(ms: i32) -> Duration {
    match ms as u32 {
        0 => DEFAULT_CALLOUT_TIMEOUT,
        ms => Duration::from_millis(ms.min(MAX_CALLOUT_TIMEOUT_MS) as u64),
    }
}

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(l, http_call, get_status)
}

#[allow(clippy::too_many_arguments)] // the ABI's arity
fn http_call(
    mut c: C,
    up: i32,
    un: i32,
    hp: i32,
    hn: i32,
    bp: i32,
    bn: i32,
    _tp: i32,
    _tn: i32,
    timeout_ms: i32,
    ret: i32,
) -> Ret {
    run(&mut c, |c| {
        let name = read(c, up, un)?;
        let hbytes = read(c, hp, hn)?;
        let body = read(c, bp, bn)?;
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
        let h = c.data_mut();
        let upstream = h
            .plugin
            .allowed_upstream(&name)
            .ok_or(Status::BadArgument)?;
        let root = h.effective == ROOT_CONTEXT;
        let call = PendingCall::to(upstream, headers, body, callout_timeout(timeout_ms), root);
        let token = h.effects.queue(|token| PendingCall { token, ..call })?;
        write_u32(c, ret, token)
    })
}

fn get_status(mut c: C, code_ptr: i32, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        // Envoy: the status of the callout being answered. A gRPC call's is its
        // gRPC status and message; an HTTP callout whose connection was lost
        // before a response is BrokenConnection "reset"; anything else (an
        // answer, or no callout at hand) is 0 and no message.
        let (code, msg): (u32, Vec<u8>) = match c.data().frame.call() {
            Ok(call) => match &call.grpc {
                Some(g) => (g.code, g.message.clone()),
                None if call.status == 0 => (Status::BrokenConnection as u32, b"reset".to_vec()),
                None => (0, Vec::new()),
            },
            Err(_) => (0, Vec::new()),
        };
        if let Err(s) = write_u32(c, code_ptr, code) {
            return Ok(Err(s));
        }
        give(c, Ok(msg), ret_p, ret_n)
    })
}

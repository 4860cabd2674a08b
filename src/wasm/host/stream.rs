//! Stream control: `proxy_set_effective_context`, `proxy_continue_stream` (and v0.1.0's
//! `proxy_continue_request`/`_response`), `proxy_close_stream`,
//! `proxy_send_local_response`, `proxy_done`, `proxy_clear_route_cache`. Calls only
//! record what the guest asked for in [`Effects`](super::Effects); the proxy acts on it
//! when the callback returns.

use super::call::{read, run, Ret, C};
use super::headers::{header_name, header_value};
use super::{Host, LocalResponse, ROOT_CONTEXT};
use crate::wasm::abi::{self, HostResult, Status};
use crate::wasm::MAX_LOCAL_RESPONSE_BYTES;
use std::borrow::Cow;
use wasmtime::Linker;

/// Longest `details` of a local reply kept (`response.code_details`, the access log).
const MAX_DETAILS_BYTES: i32 = 256;

/// Envoy's root context answers stream calls (`continue`, local replies) made without
/// switching to an HTTP context first with `Unimplemented`.
fn at_root(h: &Host) -> HostResult {
    if h.effective == ROOT_CONTEXT {
        Err(Status::Unimplemented)
    } else {
        Ok(())
    }
}

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(
        l,
        set_effective_context,
        continue_stream,
        continue_request,
        continue_response,
        close_stream,
        send_local_response,
        done,
        clear_route_cache
    )
}

/// Switches the context the following calls act for: the root context, or the HTTP
/// context of the request that holds this VM (so a root callback can resume or answer
/// a paused request, with its headers in reach). Any other id is BadArgument.
fn set_effective_context(mut c: C, id: i32) -> Ret {
    run(&mut c, |c| {
        let h = c.data_mut();
        if id == h.effective {
        } else if id == ROOT_CONTEXT {
            h.parked = std::mem::take(&mut h.frame);
            h.frame = h.parked.answer_only(); // an answer being delivered stays readable
            h.effective = ROOT_CONTEXT;
        } else if id > ROOT_CONTEXT && id == h.http_ctx {
            h.frame = std::mem::take(&mut h.parked);
            h.effective = id;
        } else {
            return Err(Status::BadArgument);
        }
        Ok(())
    })
}

fn continue_stream(mut c: C, t: i32) -> Ret {
    run(&mut c, |c| {
        at_root(c.data())?;
        let e = &mut c.data_mut().effects;
        match t {
            0 => e.continue_request = true,
            1 => e.continue_response = true,
            _ => return Err(Status::BadArgument),
        }
        Ok(())
    })
}

/// v0.1.0 names, still imported by some SDKs.
fn continue_request(mut c: C) -> Ret {
    run(&mut c, |c| {
        at_root(c.data())?;
        c.data_mut().effects.continue_request = true;
        Ok(())
    })
}

fn continue_response(mut c: C) -> Ret {
    run(&mut c, |c| {
        at_root(c.data())?;
        c.data_mut().effects.continue_response = true;
        Ok(())
    })
}

fn close_stream(mut c: C, _t: i32) -> Ret {
    run(&mut c, |c| {
        at_root(c.data())?;
        // Closing is answered like Envoy's reset: the request ends with a local 502
        // unless the guest already chose an answer.
        let h = c.data_mut();
        if let Some(info) = h.frame.info_mut() {
            info.code_details
                .get_or_insert(Cow::Borrowed("wasm_close_stream"));
        }
        h.effects.local.get_or_insert(LocalResponse {
            status: 502,
            headers: Vec::new(),
            body: Vec::new(),
            grpc_status: -1,
        });
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)] // the ABI's arity
fn send_local_response(
    mut c: C,
    status: i32,
    dp: i32,
    dn: i32,
    bp: i32,
    bn: i32,
    hp: i32,
    hn: i32,
    grpc: i32,
) -> Ret {
    run(&mut c, |c| {
        at_root(c.data())?;
        if !(200..=599).contains(&status) {
            return Err(Status::BadArgument);
        }
        if bn as u32 as usize > MAX_LOCAL_RESPONSE_BYTES {
            c.data_mut().effects.local_too_large = true;
            return Err(Status::BadArgument);
        }
        let body = read(c, bp, bn)?;
        let hbytes = read(c, hp, hn)?;
        // as Envoy, the details are the response's `response.code_details` (and
        // the access log's `details`), whitespace replaced by `_`
        let details: String = String::from_utf8_lossy(&read(c, dp, dn.min(MAX_DETAILS_BYTES))?)
            .chars()
            .map(|ch| if ch.is_whitespace() { '_' } else { ch })
            .collect();
        // A header no HTTP message can carry is dropped and the reply still goes out
        // (refusing the whole reply would let a denied request through); the tenant's
        // log says which.
        let mut headers = Vec::new();
        for (k, v) in abi::deserialize_map(&hbytes)? {
            if header_name(k).is_ok() && header_value(v).is_ok() {
                headers.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
            } else {
                let name = String::from_utf8_lossy(k);
                let msg = format!("local reply header {name:?} dropped: not a valid HTTP header");
                super::log_time::guest_log(&c.data().plugin, 3, &msg);
            }
        }
        let h = c.data_mut();
        if let Some(info) = h.frame.info_mut() {
            info.code_details = Some(details.into());
        }
        h.effects.local = Some(LocalResponse {
            status: status as u16,
            headers,
            body,
            grpc_status: grpc,
        });
        Ok(())
    })
}

fn done(mut c: C) -> Ret {
    run(&mut c, |c| {
        // Only a root context that answered `on_done` with false is waiting for this
        // (see `Vm::shutdown`); from anywhere else it is NotFound, as in Envoy.
        let h = c.data_mut();
        if !h.awaiting_done {
            return Err(Status::NotFound);
        }
        h.awaiting_done = false;
        Ok(())
    })
}

/// The route is chosen before the hooks run and is not chosen again (see the README).
fn clear_route_cache(mut c: C) -> Ret {
    run(&mut c, |_| Ok(()))
}

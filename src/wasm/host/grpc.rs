//! gRPC callouts, to upstreams in the module's `allowed_upstreams`. Unary calls
//! (`proxy_grpc_call`, odd tokens) are answered through `proxy_on_grpc_receive` or
//! `proxy_on_grpc_close`. Streams (`proxy_grpc_stream`, even tokens) of an HTTP context
//! start at once; their events (`proxy_on_grpc_receive_initial_metadata`,
//! `proxy_on_grpc_receive` per message, `proxy_on_grpc_receive_trailing_metadata`,
//! `proxy_on_grpc_close`) are delivered while the request waits on the module (see
//! `Callouts::settle`); those of the root context's streams while the VM is idle (see
//! `Plugin::answer_root`). Errors a guest can cause answer statuses the Rust SDK
//! returns as `Err` (`ParseFailure`, `InternalFailure`, `NotFound`, `BadArgument` where
//! it expects them), never trap.

use super::call::{read, run, write_u32, Ret, C};
use super::callouts::{callout_timeout, MAX_CALLS_PER_CALLBACK};
use super::headers::{header_name, header_value};
use super::{
    Effects, GrpcTarget, Host, PendingCall, StreamCmd, StreamSlot, GRPC_STREAM_LIFETIME,
    GRPC_STREAM_QUEUE, MAX_GRPC_MESSAGE, MAX_GRPC_STREAMS, ROOT_CONTEXT,
};
use crate::upstream::Upstream;
use crate::wasm::abi::{self, HostResult, Status};
use crate::wasm::Plugin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wasmtime::Linker;

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
    let (upstream, authority) = grpc_upstream(&c.data().plugin, &upstream)?;
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

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(
        l,
        grpc_call,
        grpc_stream,
        grpc_send,
        grpc_cancel,
        grpc_close
    )
}

// (upstream, service, method, initial metadata, message: a pointer and a length each)
#[rustfmt::skip]
#[allow(clippy::too_many_arguments)] // the ABI's arity
fn grpc_call(mut c: C, up: i32, un: i32, sp: i32, sn: i32, mp: i32, mn: i32, hp: i32, hn: i32,
    bp: i32, bn: i32, timeout_ms: i32, ret: i32) -> Ret {
    run(&mut c, |c| {
        let (upstream, target, headers) = grpc_request(c, up, un, sp, sn, mp, mn, hp, hn)?;
        let body = read(c, bp, bn)?;
        if c.data().effects.calls.len() >= MAX_CALLS_PER_CALLBACK {
            return Err(Status::InternalFailure);
        }
        let h = c.data_mut();
        let token = next_grpc_token(&mut h.effects, false);
        h.grpc_tokens.push(token);
        let root = h.effective == ROOT_CONTEXT;
        let call = PendingCall::to(upstream, headers, body, callout_timeout(timeout_ms), root);
        h.effects.calls.push(PendingCall {
            token,
            grpc: Some(target),
            ..call
        });
        write_u32(c, ret, token)
    })
}

#[rustfmt::skip]
#[allow(clippy::too_many_arguments)] // the ABI's arity
fn grpc_stream(mut c: C, up: i32, un: i32, sp: i32, sn: i32, mp: i32, mn: i32, hp: i32, hn: i32,
    ret: i32) -> Ret {
    run(&mut c, |c| {
        let (upstream, target, headers) = grpc_request(c, up, un, sp, sn, mp, mn, hp, hn)?;
        // check the return slot first: nothing starts for a call that fails
        write_u32(c, ret, 0)?;
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
            grpc: Some(target),
            ..PendingCall::to(upstream, headers, Vec::new(), GRPC_STREAM_LIFETIME, root)
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
        write_u32(c, ret, token)
    })
}

fn grpc_send(mut c: C, token: i32, mp: i32, mn: i32, end: i32) -> Ret {
    let token = token as u32;
    run(&mut c, |c| {
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
        let msg = read(c, mp, mn)?;
        let slot = &c.data().grpc_streams[i];
        // once closed (either side) a send goes nowhere, Ok as in Envoy
        if !slot.remote_closed {
            let _ = slot.cmds.send(StreamCmd::Send(msg.into(), end != 0));
        }
        Ok(())
    })
}

/// On a call, cancel drops the answer unseen; on a stream it resets it (no further
/// events).
fn grpc_cancel(c: C, token: i32) -> Ret {
    grpc_end(c, token, true)
}

/// On a call, close is cancel (as in Envoy); on a stream it half-closes it (events
/// still come until it closes remotely).
fn grpc_close(c: C, token: i32) -> Ret {
    grpc_end(c, token, false)
}

fn grpc_end(mut c: C, token: i32, cancel: bool) -> Ret {
    run(&mut c, |c| {
        let h = c.data_mut();
        let token = token as u32;
        if let Some(i) = h.grpc_tokens.iter().position(|t| *t == token) {
            h.grpc_tokens.swap_remove(i);
            h.effects.calls.retain(|p| p.token != token);
            return Ok(());
        }
        let i = (h.grpc_streams.iter())
            .position(|s| s.token == token)
            .ok_or(Status::NotFound)?;
        let slot = &mut h.grpc_streams[i];
        if cancel || slot.remote_closed {
            h.grpc_streams.remove(i); // dropping its sender resets an open stream
        } else if !slot.local_closed {
            slot.local_closed = true;
            let _ = slot.cmds.send(StreamCmd::Close);
        }
        Ok(())
    })
}

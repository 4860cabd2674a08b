//! Buffers: `proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`, and v0.1.0's
//! `proxy_get_configuration`. The body buffer is the chunk the callback was given; the
//! callout buffers are the answer being delivered; the configurations are the module's.

use super::call::{give, read, run, run_alloc, Ret, C};
use super::headers::{grpc_answer, http_answer};
use super::Host;
use crate::wasm::abi::{BufferType, HostResult, Status};
use wasmtime::Linker;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(l, get_buffer_bytes, set_buffer_bytes, get_configuration)
}

fn get_buffer_bytes(mut c: C, t: i32, start: i32, max: i32, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let slice = buffer(c.data(), t).and_then(|bytes| {
            let start = start as u32 as usize;
            if start > bytes.len() {
                return Err(Status::BadArgument);
            }
            let end = start.saturating_add(max as u32 as usize).min(bytes.len());
            Ok(bytes[start..end].to_vec())
        });
        give(c, slice, ret_p, ret_n)
    })
}

fn set_buffer_bytes(mut c: C, t: i32, start: i32, size: i32, p: i32, n: i32) -> Ret {
    run(&mut c, |c| {
        let data = read(c, p, n)?;
        let t = BufferType::from_i32(t)?;
        let body = c.data_mut().frame.body_mut(t)?;
        let start = (start as u32 as usize).min(body.len());
        let end = start.saturating_add(size as u32 as usize).min(body.len());
        body.splice(start..end, data);
        Ok(())
    })
}

fn get_configuration(mut c: C, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let cfg = c.data().config.to_vec();
        give(c, Ok(cfg), ret_p, ret_n)
    })
}

fn buffer(h: &Host, t: i32) -> HostResult<&[u8]> {
    let t = BufferType::from_i32(t)?;
    let spec = &h.plugin.spec;
    Ok(match t {
        BufferType::PluginConfiguration => &h.config,
        BufferType::VmConfiguration => &spec.vm_config,
        BufferType::HttpCallResponseBody => &http_answer(h)?.body,
        BufferType::GrpcReceiveBuffer => &grpc_answer(h)?.body,
        BufferType::CallData => &h.frame.call().and_then(super::kv::answer)?.body,
        BufferType::RequestBody | BufferType::ResponseBody => h.frame.body(t)?,
    })
}

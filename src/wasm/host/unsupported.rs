//! Foreign functions: `wasmgate.kv.*` reach the tenant's state store (see [`super::kv`]);
//! any other name is `NotFound`, as Envoy answers for a name it does not know.

use super::call::{give, read, run_alloc, Ret, C};
use super::Host;
use crate::wasm::abi::Status;
use wasmtime::Linker;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(l, call_foreign_function)
}

fn call_foreign_function(mut c: C, np: i32, nn: i32, ap: i32, an: i32, rp: i32, rn: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let name = match read(c, np, nn) {
            Ok(n) => n,
            Err(s) => return Ok(Err(s)),
        };
        let Some(op) = name.strip_prefix(b"wasmgate.kv.") else {
            return Ok(Err(Status::NotFound));
        };
        let token = match read(c, ap, an).and_then(|args| super::kv::start(c, op, &args)) {
            Ok(t) => t,
            Err(s) => return Ok(Err(s)),
        };
        give(c, Ok(token.to_le_bytes()), rp, rn)
    })
}

//! Host calls this gateway does not offer: they answer an error status, never trap.
//! A foreign function is `NotFound`, as Envoy answers for a name it does not know.

use super::call::{run, Ret, C};
use super::Host;
use crate::wasm::abi::Status;
use wasmtime::Linker;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(l, call_foreign_function)
}

fn call_foreign_function(mut c: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32) -> Ret {
    run(&mut c, |_| Err(Status::NotFound))
}

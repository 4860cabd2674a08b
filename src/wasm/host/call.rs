//! What every host call shares: charging fuel, reading and writing guest memory, and
//! turning a result into the ABI's status word.
//!
//! A host call is written as `|mut c: C, …| run(&mut c, |c| …)`: [`run`] (or
//! [`run_alloc`]) charges the call's fixed cost first (a call the budget cannot pay for traps as an overrun
//! without doing anything), then runs the body, whose result is the guest's status.
//! Guest pointers and lengths are checked against the guest's memory before any access
//! ([`abi::guest_range`]); an invalid one gets the ABI's status code, never a host crash.

use super::Host;
use crate::wasm::abi::{self, HostResult, Status};
use crate::wasm::HOST_CALL_FUEL;
use wasmtime::{Caller, Extern, Memory};

pub(crate) type C<'a> = Caller<'a, Host>;

/// What a host call returns: the status word for the guest, or a trap.
pub(crate) type Ret = wasmtime::Result<i32>;

/// Charges a host call's fixed cost, runs its body and maps the result to the status
/// the guest receives.
pub(crate) fn run(c: &mut C, body: impl FnOnce(&mut C) -> HostResult) -> Ret {
    charge(c)?;
    Ok(abi::status(body(c)))
}

/// [`run`] for a body that hands bytes to the guest ([`give`]): the guest's allocator
/// runs, so the call may also trap.
pub(crate) fn run_alloc(
    c: &mut C,
    body: impl FnOnce(&mut C) -> wasmtime::Result<HostResult>,
) -> Ret {
    charge(c)?;
    body(c).map(abi::status)
}

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

/// Charges for copied bytes. Running dry leaves the guest with no fuel, so it traps as
/// an overrun on its next instruction.
pub(crate) fn charge_bytes(c: &mut C, bytes: usize) {
    let cost = (bytes as u64) / 8;
    let left = c.get_fuel().unwrap_or(0);
    if left <= cost {
        c.data_mut().out_of_fuel = true;
    }
    let _ = c.set_fuel(left.saturating_sub(cost));
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
pub(crate) fn read(c: &mut C, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let m = memory(c)?;
    let data = m.data(&*c);
    let r = abi::guest_range(data.len(), ptr, len)?;
    let out = data[r].to_vec();
    charge_bytes(c, out.len());
    Ok(out)
}

/// Writes `bytes` at `[ptr, ptr+len)` of guest memory.
pub(crate) fn write(c: &mut C, ptr: i32, bytes: &[u8]) -> HostResult {
    let m = memory(c)?;
    let data = m.data_mut(&mut *c);
    let r = abi::guest_range(data.len(), ptr, bytes.len() as i32)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(c: &mut C, ptr: i32, v: u32) -> HostResult {
    write(c, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(c: &mut C, ptr: i32, v: u64) -> HostResult {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and writes its address and size to
/// the guest's return pointers. An `Err` is passed through as the call's status.
pub(crate) fn give(
    c: &mut C,
    bytes: HostResult<impl AsRef<[u8]>>,
    ret_ptr: i32,
    ret_len: i32,
) -> wasmtime::Result<HostResult> {
    let bytes = match &bytes {
        Ok(b) => b.as_ref(),
        Err(s) => return Ok(Err(*s)),
    };
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
        if let Err(s) = write(c, p, bytes) {
            return Ok(Err(s));
        }
        p
    };
    Ok(write_u32(c, ret_ptr, addr as u32).and_then(|_| write_u32(c, ret_len, bytes.len() as u32)))
}

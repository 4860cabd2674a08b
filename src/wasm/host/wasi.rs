//! A capability-free WASI preview 1 for guests built for `wasm32-wasip1`: standard output
//! and error go to the tenant's log, the environment and arguments are empty, there is no
//! filesystem and no socket. Any other WASI function a module imports answers ENOSYS.

use super::{charge, charge_fuel, guest_log, Host};
use crate::wasm::LOG_LINE_FUEL;
use wasmtime::{Caller, Extern, Linker, Module, Val, ValType};

const WASI: &str = "wasi_snapshot_preview1";
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOSYS: i32 = 52;

type C<'a> = Caller<'a, Host>;

/// Iovecs one `fd_write` reads (Linux allows 1,024; the rest is a short write).
const FD_WRITE_MAX_IOVS: i32 = 64;
/// Bytes one `fd_write` takes (the rest is a short write).
const FD_WRITE_MAX_BYTES: usize = 64 * 1024;
/// Largest `random_get`; more is EINVAL (getrandom users ask for 16-256 bytes).
const RANDOM_MAX_BYTES: usize = 1 << 20;
const RANDOM_FUEL_PER_BYTE: u64 = 3;

/// The WASI functions [`define`] provides.
const DEFINED: &[&str] = &[
    "fd_write",
    "environ_sizes_get",
    "args_sizes_get",
    "environ_get",
    "args_get",
    "proc_exit",
    "sched_yield",
    "clock_time_get",
    "random_get",
    "fd_close",
    "fd_sync",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_read",
    "fd_seek",
];

fn mem<'a>(c: &'a mut C) -> Option<&'a mut [u8]> {
    match c.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m.data_mut(c)),
        _ => None,
    }
}

fn put_u32(m: &mut [u8], at: i32, v: u32) -> bool {
    let at = at as u32 as usize;
    match m.get_mut(at..at.saturating_add(4)) {
        Some(s) if s.len() == 4 => {
            s.copy_from_slice(&v.to_le_bytes());
            true
        }
        _ => false,
    }
}

pub(crate) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        WASI,
        "fd_write",
        |mut c: C, fd: i32, iovs: i32, n: i32, ret: i32| -> wasmtime::Result<i32> {
            charge(&mut c)?;
            if fd != 1 && fd != 2 {
                return Ok(EBADF);
            }
            let Some(m) = mem(&mut c) else {
                return Ok(EFAULT);
            };
            // A short write is legal and every libc loops on it, so the limits below cost a
            // well-behaved guest nothing but another call.
            let mut text = Vec::new();
            let iovecs = n.clamp(0, FD_WRITE_MAX_IOVS) as usize;
            for i in 0..iovecs {
                let at = iovs as u32 as usize + i * 8;
                let Some(iov) = m.get(at..at + 8) else {
                    return Ok(EFAULT);
                };
                let p = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]) as usize;
                let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]) as usize;
                let Some(b) = m.get(p..p.saturating_add(len)) else {
                    return Ok(EFAULT);
                };
                text.extend_from_slice(&b[..len.min(FD_WRITE_MAX_BYTES - text.len())]);
                if text.len() == FD_WRITE_MAX_BYTES {
                    break;
                }
            }
            let msg = String::from_utf8_lossy(&text);
            let lines = msg.lines().filter(|l| !l.is_empty()).count() as u64;
            charge_fuel(
                &mut c,
                iovecs as u64 * 8 + text.len() as u64 / 8 + lines * LOG_LINE_FUEL,
            )?;
            let Some(m) = mem(&mut c) else {
                return Ok(EFAULT);
            };
            if !put_u32(m, ret, text.len() as u32) {
                return Ok(EFAULT);
            }
            let level = if fd == 2 { 3 } else { 2 };
            for line in msg.lines().filter(|l| !l.is_empty()) {
                guest_log(&c.data().plugin, level, line);
            }
            Ok(ESUCCESS)
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(WASI, name, |mut c: C, count: i32, size: i32| {
            charge(&mut c)?;
            let Some(m) = mem(&mut c) else {
                return Ok(EFAULT);
            };
            Ok(if put_u32(m, count, 0) && put_u32(m, size, 0) {
                ESUCCESS
            } else {
                EFAULT
            })
        })?;
    }
    answer_two(l, &["environ_get", "args_get"], ESUCCESS)?;
    l.func_wrap(
        WASI,
        "proc_exit",
        |_: C, code: i32| -> wasmtime::Result<()> {
            wasmtime::bail!("guest called proc_exit({code})")
        },
    )?;
    l.func_wrap(WASI, "sched_yield", |mut c: C| {
        charge(&mut c).map(|_| ESUCCESS)
    })?;
    l.func_wrap(
        WASI,
        "clock_time_get",
        |mut c: C, id: i32, _prec: i64, ret: i32| {
            charge(&mut c)?;
            let now = match id {
                0 => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                1 => monotonic_ns(),
                _ => return Ok(EINVAL),
            };
            let Some(m) = mem(&mut c) else {
                return Ok(EFAULT);
            };
            let at = ret as u32 as usize;
            Ok(match m.get_mut(at..at.saturating_add(8)) {
                Some(s) if s.len() == 8 => {
                    s.copy_from_slice(&now.to_le_bytes());
                    ESUCCESS
                }
                _ => EFAULT,
            })
        },
    )?;
    l.func_wrap(WASI, "random_get", |mut c: C, p: i32, n: i32| {
        use ring::rand::SecureRandom;
        charge(&mut c)?;
        let n = n as u32 as usize;
        if n > RANDOM_MAX_BYTES {
            return Ok(EINVAL);
        }
        // 20 MiB took 40-60 ms here (2-3 ns a byte): three fuel units a byte, paid first.
        charge_fuel(&mut c, n as u64 * RANDOM_FUEL_PER_BYTE)?;
        c.data_mut().read_random = true;
        let Some(m) = mem(&mut c) else {
            return Ok(EFAULT);
        };
        let at = p as u32 as usize;
        let Some(s) = m.get_mut(at..at.saturating_add(n)) else {
            return Ok(EFAULT);
        };
        if s.len() != n {
            return Ok(EFAULT);
        }
        if ring::rand::SystemRandom::new().fill(s).is_err() {
            return Ok(ENOSYS);
        }
        Ok(ESUCCESS)
    })?;
    for name in ["fd_close", "fd_sync", "fd_datasync"] {
        l.func_wrap(WASI, name, |mut c: C, _: i32| charge(&mut c).map(|_| EBADF))?;
    }
    answer_two(l, &["fd_fdstat_get", "fd_prestat_get"], EBADF)?;
    l.func_wrap(
        WASI,
        "fd_prestat_dir_name",
        |mut c: C, _: i32, _: i32, _: i32| charge(&mut c).map(|_| EBADF),
    )?;
    l.func_wrap(
        WASI,
        "fd_read",
        |mut c: C, _: i32, _: i32, _: i32, _: i32| charge(&mut c).map(|_| EBADF),
    )?;
    l.func_wrap(
        WASI,
        "fd_seek",
        |mut c: C, _: i32, _: i64, _: i32, _: i32| charge(&mut c).map(|_| EBADF),
    )?;
    Ok(())
}

/// Links each of `names` (two pointer arguments) to answer `errno`, charging the call.
fn answer_two(l: &mut Linker<Host>, names: &[&str], errno: i32) -> wasmtime::Result<()> {
    for name in names {
        l.func_wrap(WASI, name, move |mut c: C, _: i32, _: i32| {
            charge(&mut c).map(|_| errno)
        })?;
    }
    Ok(())
}

fn monotonic_ns() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Any other WASI function the module imports answers ENOSYS (or traps if its type has
/// no errno result), so a module built against a bigger WASI still loads.
pub(crate) fn stub_unknown(l: &mut Linker<Host>, m: &Module) -> Result<(), String> {
    for imp in m.imports() {
        if imp.module() != WASI {
            continue;
        }
        let Some(ty) = imp.ty().func().cloned() else {
            continue;
        };
        if DEFINED.contains(&imp.name()) {
            continue;
        }
        let errno = ty.results().len() == 1 && matches!(ty.results().next(), Some(ValType::I32));
        let name = imp.name().to_string();
        l.func_new(WASI, imp.name(), ty, move |mut c, _, results| {
            charge(&mut c)?;
            if errno {
                results[0] = Val::I32(ENOSYS);
                Ok(())
            } else {
                wasmtime::bail!("WASI function {name} is not available to hooks")
            }
        })
        .map_err(|e| format!("cannot stub WASI import {}: {e}", imp.name()))?;
    }
    Ok(())
}
